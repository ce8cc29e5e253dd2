"""CLIPSIM: mean CLIP image-text cosine similarity of generated videos and their captions.

GODIVA / NUWA definition: for each frame, the cosine between the L2-normalised CLIP image embedding
and the caption's text embedding; mean over frames, then over videos. Reported raw (``scale="raw"``,
about 0.29-0.31 for ViT-B/32 on MSR-VTT). ``scale="torchmetrics"`` gives torchmetrics' CLIPScore
convention instead: 100 x the mean, clamped at 0 after averaging.

Preprocessing is CLIP's: bicubic resize of the short side to the model's image size (antialiased, as
PIL does), centre crop, CLIP mean / std; captions tokenised to the model's context (77), truncated.

:class:`CLIPScoreSim` is the ``clipscore`` variant: CLIPSIM exactly as ``torchmetrics.multimodal.CLIPScore``
computes it (a Hugging Face ``CLIPModel`` + ``CLIPProcessor`` from a local folder, ViT-L/14 by
default, every frame scored against its caption, clamp at 0 applied to the mean), reported on the
0-1 scale and x100 (torchmetrics' number). ``tests/test_clipscore.py`` checks it against CLIPScore.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchvision.transforms.v2 import functional as TF

from show1_lightning.plain import plain

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCALES = ("raw", "torchmetrics")


@dataclass
class ClipBundle:
    """An open_clip model with what CLIPSIM needs to feed it."""

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    image_size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    description: dict[str, Any] = field(default_factory=dict)


def load_clip(
    model_name: str = "ViT-B-32",
    checkpoint: str | Path | None = None,
    model_cfg: dict | None = None,
    seed: int = 0,
) -> ClipBundle:
    """Build an open_clip model for CLIPSIM.

    Args:
        model_name: open_clip architecture name (``ViT-B-32`` for the paper protocol).
        checkpoint: local path of the weights (e.g. open_clip's ``ViT-B-32`` / ``openai`` file).
            Required unless ``model_cfg`` is given: CLIPSIM with random weights is meaningless.
        model_cfg: test-only: an open_clip model config dict (``embed_dim``, ``vision_cfg``,
            ``text_cfg``) for a small randomly initialised model (seeded by ``seed``).
        seed: seed of the random initialisation for ``model_cfg``.
    """
    import open_clip  # heavy import, only when CLIPSIM is used

    if model_cfg is not None:
        torch.manual_seed(seed)
        model = open_clip.CLIP(**plain(model_cfg))
        ctx = int(model.context_length)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
        image_size = _image_size(model_cfg["vision_cfg"].get("image_size", 224))
        desc = {"model": "custom (test-only, random init)", "model_cfg": plain(model_cfg), "seed": seed}
    else:
        if checkpoint is None:
            raise ValueError("CLIPSIM needs a CLIP checkpoint path (clip.checkpoint); see docs/evaluation.md")
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"CLIP checkpoint not found at {checkpoint}; see docs/evaluation.md")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
        tokenizer = open_clip.get_tokenizer(model_name)
        image_size = _image_size(model.visual.image_size)
        desc = {"model": model_name, "checkpoint": str(checkpoint.resolve())}
    desc.update({"image_size": image_size, "context_length": int(model.context_length)})
    return ClipBundle(model=model.eval(), tokenizer=tokenizer, image_size=image_size, description=desc)


def _image_size(size: int | Sequence[int]) -> int:
    if isinstance(size, int):
        return size
    size = tuple(size)
    if size[0] != size[1]:
        raise ValueError(f"non-square CLIP image size {size} is not supported")
    return int(size[0])


def clip_preprocess(
    frames: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """CLIP preprocessing of float frames ``N x 3 x H x W`` in [-1, 1] -> normalised ``N x 3 x S x S``."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected N x 3 x H x W frames, got shape {tuple(frames.shape)}")
    x = (frames.float().clamp(-1, 1) + 1.0) / 2.0
    h, w = x.shape[-2:]
    short = min(h, w)
    new_h, new_w = round(h * image_size / short), round(w * image_size / short)
    if (new_h, new_w) != (h, w):
        x = TF.resize(x, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    x = TF.center_crop(x, [image_size, image_size])
    return TF.normalize(x, list(mean), list(std))


def cosine_per_frame(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``image_emb`` (``N x D``) with ``text_emb`` (``D`` or ``N x D``)."""
    return (F.normalize(image_emb.double(), dim=-1) * F.normalize(text_emb.double(), dim=-1)).sum(-1)


class CLIPSim(Metric):
    """CLIPSIM of (video, caption) pairs; sum states, so it is exact under any sharding.

    Args:
        clip: the CLIP model bundle (:func:`load_clip`).
        scale: ``"raw"`` (mean cosine, the paper convention) or ``"torchmetrics"`` (100 x mean,
            clamped at 0).
        frame_batch_size: frames per image-encoder pass.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, clip: ClipBundle, scale: str = "raw", frame_batch_size: int = 32, **kwargs) -> None:
        super().__init__(**kwargs)
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        self.clip = clip
        self.clip_model = clip.model.eval().requires_grad_(False)  # registered so .to(device) moves it
        self.scale = scale
        self.frame_batch_size = int(frame_batch_size)
        self.add_state("sim_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_videos", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def video_similarities(self, videos: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Per-video mean-over-frames cosine (float64, ``B``) of ``B x 3 x T x H x W`` videos in [-1, 1]."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected B x 3 x T x H x W videos, got shape {tuple(videos.shape)}")
        if isinstance(captions, str) or len(captions) != videos.shape[0]:
            raise ValueError(f"need one caption per video: {videos.shape[0]} videos")
        device = videos.device
        with torch.autocast(device_type=device.type, enabled=False):
            tokens = self.clip.tokenizer(list(captions)).to(device)
            text = self.clip_model.encode_text(tokens).float()
            b, _, t = videos.shape[:3]
            frames = videos.transpose(1, 2).reshape(b * t, *videos.shape[1:2], *videos.shape[3:])
            img = []
            for i in range(0, frames.shape[0], self.frame_batch_size):
                x = clip_preprocess(
                    frames[i : i + self.frame_batch_size], self.clip.image_size, self.clip.mean, self.clip.std
                )
                img.append(self.clip_model.encode_image(x).float())
            image = torch.cat(img).reshape(b, t, -1)
        return cosine_per_frame(image, text[:, None, :]).mean(1)

    def update(
        self,
        videos: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
        *,
        similarities: torch.Tensor | None = None,
    ) -> None:
        """Add videos ``B x 3 x T x H x W`` in [-1, 1] with their ``B`` captions, or precomputed
        per-video ``similarities`` (mean over frames of the raw cosine)."""
        if similarities is None:
            if videos is None or captions is None:
                raise ValueError("CLIPSim.update needs videos and captions (or similarities=)")
            similarities = self.video_similarities(videos, captions)
        sims = torch.as_tensor(similarities, dtype=torch.float64, device=self.sim_sum.device).reshape(-1)
        self.sim_sum += sims.sum()
        self.n_videos += sims.numel()

    def update_similarities(self, sims: torch.Tensor) -> None:
        """Add precomputed per-video similarities (mean over frames of the raw cosine)."""
        self.update(similarities=sims)

    def compute(self) -> torch.Tensor:
        """CLIPSIM (float64 scalar) in the configured scale."""
        if int(self.n_videos) == 0:
            raise RuntimeError("CLIPSim.compute() called before any update()")
        mean = self.sim_sum / self.n_videos
        if self.scale == "torchmetrics":
            return torch.clamp(100.0 * mean, min=0.0)
        return mean


# ---------------------------------------------------------------------------- torchmetrics CLIPScore


@dataclass
class HFClipBundle:
    """A Hugging Face ``CLIPModel`` with its ``CLIPProcessor`` (what torchmetrics' CLIPScore uses)."""

    model: nn.Module
    processor: Any
    description: dict[str, Any] = field(default_factory=dict)


def load_hf_clip(path: str | Path) -> HFClipBundle:
    """``CLIPModel`` + ``CLIPProcessor`` from a local Hugging Face folder (no download).

    torchmetrics' default is ``openai/clip-vit-large-patch14``: put that repository's files
    (``config.json``, ``model.safetensors``, ``preprocessor_config.json``, tokenizer files) in a folder
    and give its path (``assets.clip_hf_dir``).
    """
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face CLIP folder at {path} (config.json missing); set assets.clip_hf_dir, "
            "see docs/evaluation.md"
        )
    model = CLIPModel.from_pretrained(str(path), local_files_only=True).float().eval()
    processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    desc = {
        "model": "transformers CLIPModel + CLIPProcessor",
        "path": str(path.resolve()),
        "name_or_path": str(getattr(model.config, "_name_or_path", "")),
        "max_text_tokens": int(model.config.text_config.max_position_embeddings),
    }
    return HFClipBundle(model=model, processor=processor, description=desc)


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` output: a tensor (transformers 4) or an output whose ``pooler_output`` is
    the projected embedding (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def clipscore_per_frame(bundle: HFClipBundle, frames: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """``100 * cos(E_I, E_C)`` per frame, computed as torchmetrics' ``CLIPScore.update`` does.

    Args:
        bundle: the Hugging Face model and processor.
        frames: uint8 ``N x 3 x H x W`` (0..255), one caption per frame.
        captions: ``N`` strings.

    Steps (torchmetrics ``functional/multimodal/clip_score.py``): the processor prepares the
    images (CPU tensors) and the text (``padding=True``, no truncation), token ids and mask are then
    cut to the text model's ``max_position_embeddings`` (77), both embeddings are divided by their
    L2 norms and the score is 100 x their dot product (float32).
    """
    model, processor = bundle.model, bundle.processor
    device = next(model.parameters()).device
    images = processor(images=[f.cpu() for f in frames], return_tensors="pt", padding=True)
    image = _features(model.get_image_features(images["pixel_values"].to(device)))
    text_in = processor(text=list(captions), return_tensors="pt", padding=True)
    limit = int(model.config.text_config.max_position_embeddings)
    ids, mask = text_in["input_ids"][..., :limit], text_in["attention_mask"][..., :limit]
    text = _features(model.get_text_features(ids.to(device), mask.to(device)))
    image = image / image.norm(p=2, dim=-1, keepdim=True)
    text = text / text.norm(p=2, dim=-1, keepdim=True)
    return 100 * (image * text).sum(dim=-1)


class CLIPScoreSim(Metric):
    """CLIPSIM as torchmetrics' ``CLIPScore`` computes it, over every frame of every video.

    Each frame is scored against its video's caption (:func:`clipscore_per_frame`); the result is
    ``max(mean over all frames, 0)`` (torchmetrics clamps the mean, not each score), i.e. what
    ``CLIPScore`` returns when fed every frame with its caption. :meth:`compute` returns it on the
    0-1 scale (the papers' CLIPSIM, e.g. Show-1's 0.3072); ``compute() * 100`` is torchmetrics'
    number. Sums are float64 states, so any sharding gives the same value.

    Args:
        clip: :func:`load_hf_clip` bundle.
        frame_batch_size: frames per model call.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    scale = "clipscore"

    def __init__(self, clip: HFClipBundle, frame_batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clip = clip
        self.clip_model = clip.model.eval().requires_grad_(False)  # registered so .to(device) moves it
        self.frame_batch_size = int(frame_batch_size)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_frames", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def frame_scores(self, videos: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """torchmetrics scores (0-100, float32) of every frame of ``B x 3 x T x H x W`` videos in [-1, 1]."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected B x 3 x T x H x W videos, got shape {tuple(videos.shape)}")
        if isinstance(captions, str) or len(captions) != videos.shape[0]:
            raise ValueError(f"need one caption per video: {videos.shape[0]} videos")
        b, _, t = videos.shape[:3]
        # The uint8 frames of the decoded video (exact: [-1, 1] floats come from uint8 levels).
        frames = (
            ((videos.float().clamp(-1, 1) + 1) * 127.5)
            .round()
            .to(torch.uint8)
            .transpose(1, 2)
            .reshape(b * t, 3, *videos.shape[3:])
        )
        caps = [c for c in captions for _ in range(t)]
        with torch.autocast(device_type=videos.device.type, enabled=False):
            out = [
                clipscore_per_frame(
                    self.clip, frames[i : i + self.frame_batch_size], caps[i : i + self.frame_batch_size]
                )
                for i in range(0, b * t, self.frame_batch_size)
            ]
        return torch.cat(out)

    def update(self, videos: torch.Tensor, captions: Sequence[str]) -> None:
        """Add videos ``B x 3 x T x H x W`` in [-1, 1] with their ``B`` captions."""
        scores = self.frame_scores(videos, captions)
        self.score_sum += scores.to(self.score_sum.device, torch.float64).sum()
        self.n_frames += scores.numel()

    def compute(self) -> torch.Tensor:
        """``max(mean frame score, 0) / 100`` (float64): CLIPSIM on the 0-1 scale."""
        if int(self.n_frames) == 0:
            raise RuntimeError("CLIPScoreSim.compute() called before any update()")
        return torch.clamp(self.score_sum / self.n_frames, min=0.0) / 100.0
