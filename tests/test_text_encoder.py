"""TextEncoder: the tiny seeded default, loading local weights (both layouts), freezing, identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from numerics import assert_close_rel, assert_differ_rel
from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from show1_lightning.models.text_encoder import TextEncoder


@pytest.fixture(scope="module")
def tiny_t5() -> TextEncoder:
    return TextEncoder(kind="t5")


def test_tiny_default_shapes_and_mask(tiny_t5: TextEncoder) -> None:
    emb, mask = tiny_t5.encode(["a red circle moving left", "", "x" * 500])
    assert emb.shape == (3, 77, 64) and emb.dtype == torch.float32 and tiny_t5.dim == 64
    assert mask.shape == (3, 77) and mask.dtype == torch.bool
    # byte-level tokens: 24 bytes + </s>; empty caption: </s> only; long caption truncated to 77
    assert mask.sum(1).tolist() == [25, 1, 77]
    assert torch.isfinite(emb).all()
    assert_differ_rel(emb[0], emb[1])


def test_tiny_default_identical_across_instances(tiny_t5: TextEncoder) -> None:
    torch.manual_seed(123)  # the global RNG state must not matter ...
    other = TextEncoder(kind="t5")
    state = torch.random.get_rng_state()
    a, _ = tiny_t5.encode(["same weights everywhere"])
    b, _ = other.encode(["same weights everywhere"])
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), state)  # ... and is left untouched
    c, _ = TextEncoder(kind="t5", seed=1).encode(["same weights everywhere"])
    assert_differ_rel(a, c)
    assert tiny_t5.identity == other.identity != TextEncoder(kind="t5", seed=1).identity


def test_frozen(tiny_t5: TextEncoder) -> None:
    assert not any(p.requires_grad for p in tiny_t5.parameters())
    parent = torch.nn.Sequential(tiny_t5)
    parent.train()
    assert not tiny_t5.model.training  # stays in eval mode (no dropout) inside a training module
    emb1, _ = tiny_t5.encode(["dropout would change this"])
    emb2, _ = tiny_t5.encode(["dropout would change this"])
    assert torch.equal(emb1, emb2) and not emb1.requires_grad


def test_identity_contents(tiny_t5: TextEncoder) -> None:
    assert tiny_t5.identity == "t5|tiny-seed-0-d64-l2|L77|D64"
    assert TextEncoder(kind="t5", max_length=32).identity.endswith("|L32|D64")


def test_clip_kind_tiny() -> None:
    enc = TextEncoder(kind="clip", tiny_dim=32)
    emb, mask = enc.encode(["a blue square", "a cat"])
    assert emb.shape == (2, 77, 32) and enc.dim == 32 and enc.identity.startswith("clip|")
    assert not enc.use_attention_mask  # as the zeroscope/ModelScope pipelines call CLIPTextModel


def _save_t5(folder: Path, seed: int = 5) -> T5EncoderModel:
    tok = ByT5Tokenizer()
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=48, d_kv=12, d_ff=96, num_layers=1, num_heads=4))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


def test_load_t5_from_local_folder(tmp_path: Path) -> None:
    model = _save_t5(tmp_path / "t5")
    enc = TextEncoder(kind="t5", pretrained_path=tmp_path / "t5", max_length=16)
    assert enc.dim == 48 and str(tmp_path / "t5") in enc.identity
    emb, mask = enc.encode(["hello world", "hi"])
    tok = ByT5Tokenizer()(["hello world", "hi"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model.eval()(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    assert emb.shape == (2, 16, 48)
    assert_close_rel(emb, ref)  # the same T5 forward through our wrapper: rounding at most
    assert torch.equal(mask, tok.attention_mask.bool())
    assert not any(p.requires_grad for p in enc.parameters())


def test_load_diffusers_pipeline_layout(tmp_path: Path) -> None:
    tok = ByT5Tokenizer()
    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
        )
    )
    clip.save_pretrained(tmp_path / "pipe" / "text_encoder")
    tok.save_pretrained(tmp_path / "pipe" / "tokenizer")
    enc = TextEncoder(kind="clip", pretrained_path=tmp_path / "pipe")
    emb, _ = enc.encode(["a video"])
    ids = tok(["a video"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = clip.eval()(input_ids=ids).last_hidden_state
    assert_close_rel(emb, ref)  # the same CLIP forward through our wrapper: rounding at most


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        TextEncoder(kind="bert")
    with pytest.raises(FileNotFoundError):
        TextEncoder(pretrained_path=tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder(pretrained_path=tmp_path / "empty")
    enc = TextEncoder(tiny_dim=32)
    with pytest.raises(TypeError):
        enc.encode("not a list")
    with pytest.raises(ValueError):
        enc.encode([])


def test_word_tokenizer_gives_a_word_one_token() -> None:
    """``tiny_tokenizer="word"``: one id per word (hash, no vocabulary file), then EOS and padding; a change of one
    word changes one token, where bytes shift every later token when the word's length changes."""
    from show1_lightning.models.word_tokenizer import WordHashTokenizer

    tok = WordHashTokenizer()
    out = tok(["a red circle moving left", "A blue circle moving left."], max_length=8)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 8) and mask.sum(1).tolist() == [6, 7]  # 5 words + EOS; "." is a token
    assert ids[0, 5] == tok.eos_token_id and ids[0, 6:].eq(tok.pad_token_id).all()
    assert (ids[0, :5] != ids[1, :5]).tolist() == [False, True, False, False, False]  # case-insensitive words
    assert tok(["one two three"], max_length=3)["input_ids"][0].tolist()[-1] == tok.eos_token_id  # truncated
    enc = TextEncoder(kind="t5", max_length=16, tiny_dim=32, tiny_layers=1, tiny_tokenizer="word")
    emb, mask = enc.encode(["a red circle moving left", "a red circle moving right"])
    assert emb.shape == (2, 16, 32) and mask.sum(1).tolist() == [6, 6]
    assert enc.identity != TextEncoder(kind="t5", max_length=16, tiny_dim=32, tiny_layers=1).identity
    clip = TextEncoder(kind="clip", max_length=16, tiny_dim=32, tiny_layers=1, tiny_tokenizer="word")
    assert clip.encode(["a cat"])[0].shape == (1, 16, 32)
    with pytest.raises(ValueError, match="tiny_tokenizer"):
        TextEncoder(kind="t5", tiny_tokenizer="bpe")
