"""Frozen text encoders for the cascade: T5 (pixel stages; Show-1 uses T5-XXL, 77 tokens, 4096-d)
and CLIP (the latent expert SR stage: the OpenCLIP-H text tower as ``CLIPTextModel``, 1024-d).

With ``pretrained_path`` the encoder and tokenizer are loaded from a local folder (what
``save_pretrained`` writes; a diffusers pipeline folder with ``text_encoder/`` and ``tokenizer/``
subfolders works too). Without it, a small randomly initialised model with the byte-level
``ByT5Tokenizer`` (no vocabulary file needed) is built from a fixed seed, so it is identical in every
process and run: enough for tests, the toy dataset and offline smoke runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from show1_lightning.models.word_tokenizer import WordHashTokenizer
from show1_lightning.precision import to_dtype

__all__ = ["TextEncoder"]

_KINDS = ("t5", "clip")


def _resolve_dirs(path: Path) -> tuple[Path, Path]:
    """(model dir, tokenizer dir): the folder itself, or its diffusers-style subfolders."""
    if (path / "config.json").exists():
        return path, path
    if (path / "text_encoder" / "config.json").exists():
        tok = path / "tokenizer" if (path / "tokenizer").is_dir() else path / "text_encoder"
        return path / "text_encoder", tok
    raise FileNotFoundError(
        f"no text encoder in {path}: expected config.json (save_pretrained layout) or text_encoder/config.json"
    )


class TextEncoder(nn.Module):
    """A frozen text encoder: ``encode(captions) -> (embeddings B x L x D float, mask B x L bool)``.

    Args:
        kind: "t5" (``T5EncoderModel``) or "clip" (``CLIPTextModel``).
        pretrained_path: local folder with model + tokenizer; None: the tiny seeded default.
        max_length: tokens per caption (padded/truncated), 77 in Show-1.
        seed: seed of the tiny default's random weights.
        tiny_dim / tiny_layers: size of the tiny default.
        tiny_tokenizer: the tiny default's tokenizer: "byte" (``ByT5Tokenizer``, a token per character) or "word"
            (:class:`~show1_lightning.models.word_tokenizer.WordHashTokenizer`, a token per word, as real
            tokenizers give common words).
        use_attention_mask: pass the padding mask to the model (default: True for T5 as DeepFloyd IF
            and Show-1 do, False for CLIP as the zeroscope/ModelScope pipelines do).
        torch_dtype: dtype to load pretrained weights in (e.g. torch.bfloat16 for T5-XXL).
    """

    def __init__(
        self,
        kind: str = "t5",
        pretrained_path: str | Path | None = None,
        max_length: int = 77,
        seed: int = 0,
        tiny_dim: int = 64,
        tiny_layers: int = 2,
        tiny_tokenizer: str = "byte",
        use_attention_mask: bool | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.kind, self.max_length = kind, int(max_length)
        self.use_attention_mask = (kind == "t5") if use_attention_mask is None else bool(use_attention_mask)
        if isinstance(torch_dtype, str):
            torch_dtype = to_dtype(torch_dtype, what="text_encoder.torch_dtype")
        if pretrained_path is not None:
            self.model, self.tokenizer = self._load(kind, Path(pretrained_path), torch_dtype)
            self.source = os.path.normpath(os.path.abspath(pretrained_path))
        else:
            if tiny_tokenizer not in ("byte", "word"):
                raise ValueError(f"tiny_tokenizer must be 'byte' or 'word', got {tiny_tokenizer!r}")
            self.model, self.tokenizer = self._tiny(kind, self.max_length, seed, tiny_dim, tiny_layers, tiny_tokenizer)
            words = "-words" if tiny_tokenizer == "word" else ""  # byte: the identity older caches were made with
            self.source = f"tiny-seed-{seed}-d{tiny_dim}-l{tiny_layers}{words}"
        self.model.requires_grad_(False)
        self.model.eval()

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def _load(kind: str, path: Path, torch_dtype: torch.dtype | None) -> tuple[nn.Module, object]:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        if not path.is_dir():
            raise FileNotFoundError(f"pretrained_path {path} is not a folder")
        model_dir, tok_dir = _resolve_dirs(path)
        cls = T5EncoderModel if kind == "t5" else CLIPTextModel
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = cls.from_pretrained(str(model_dir), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        return model, tokenizer

    @staticmethod
    def _tiny(
        kind: str, max_length: int, seed: int, dim: int, layers: int, tokenizer_kind: str = "byte"
    ) -> tuple[nn.Module, object]:
        from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        tokenizer = ByT5Tokenizer() if tokenizer_kind == "byte" else WordHashTokenizer()
        heads = max(1, dim // 16)
        with torch.random.fork_rng(devices=[]):  # same weights in every process, global RNG untouched
            torch.manual_seed(seed)
            if kind == "t5":
                cfg = T5Config(
                    vocab_size=len(tokenizer),
                    d_model=dim,
                    d_kv=dim // heads,
                    d_ff=2 * dim,
                    num_layers=layers,
                    num_heads=heads,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id,
                )
                model = T5EncoderModel(cfg)
            else:
                cfg = CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=dim,
                    intermediate_size=2 * dim,
                    num_hidden_layers=layers,
                    num_attention_heads=heads,
                    max_position_embeddings=max_length,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.pad_token_id,
                )
                model = CLIPTextModel(cfg)
        return model, tokenizer

    # -- API -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Width D of the embeddings."""
        cfg = self.model.config
        return int(cfg.d_model if self.kind == "t5" else cfg.hidden_size)

    @property
    def identity(self) -> str:
        """Stable description (kind, weights, max_length) used to validate embedding caches."""
        return f"{self.kind}|{self.source}|L{self.max_length}|D{self.dim}"

    def train(self, mode: bool = True) -> TextEncoder:
        # Always frozen: stays in eval mode even when a parent module is put in train mode.
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed captions: (float ``B x L x D`` on the model's device, bool ``B x L`` mask), L = max_length."""
        if isinstance(captions, str):
            raise TypeError("encode expects a list of captions, not one string")
        if len(captions) == 0:
            raise ValueError("encode needs at least one caption")
        tokens = self.tokenizer(
            [str(c) for c in captions],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids = tokens["input_ids"].to(device)
        mask = tokens["attention_mask"].to(device).bool()
        kwargs = {"attention_mask": mask.long()} if self.use_attention_mask else {}
        hidden = self.model(input_ids=ids, **kwargs).last_hidden_state
        return hidden.float(), mask

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions)
