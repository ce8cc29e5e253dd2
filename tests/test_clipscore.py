"""The ``clipscore`` CLIPSIM variant against ``torchmetrics.multimodal.CLIPScore`` itself, on a tiny
random Hugging Face CLIP (model, image processor and a BPE tokenizer built here, saved to a folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from evaluation.clipsim import CLIPScoreSim, HFClipBundle, clipscore_per_frame, load_hf_clip


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP convention)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def make_tiny_hf_clip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``CLIPModel`` + ``CLIPProcessor`` (32 px images, 77 text positions) to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = _byte_alphabet()
    merges = [("a", "t</w>"), ("c", "at</w>"), ("t", "h"), ("th", "e</w>")]
    tokens = (
        chars
        + [c + "</w>" for c in chars]
        + ["at</w>", "cat</w>", "th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    )
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


class _TensorFeatures(nn.Module):
    """transformers 5 returns model outputs from ``get_*_features``; torchmetrics 1.9 expects the
    projected embedding tensor (what transformers 4 returned). Same numbers, tensor return type."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> HFClipBundle:
    # Seed 2: mean frame score +21 on _videos() (frames from -17 to +45), so the clamp is inactive.
    return load_hf_clip(make_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip"), seed=2))


@pytest.fixture(scope="module")
def negative_bundle(tmp_path_factory: pytest.TempPathFactory) -> HFClipBundle:
    # Seed 0: mean frame score -31 on _videos(): the result is clamped to 0.
    return load_hf_clip(make_tiny_hf_clip(tmp_path_factory.mktemp("tiny_hf_clip_neg"), seed=0))


def _videos() -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(0)
    uint8 = torch.randint(0, 256, (3, 3, 5, 40, 48), generator=g, dtype=torch.uint8)
    long = " ".join(["the cat"] * 60)  # > 77 tokens: torchmetrics cuts the ids (and the end token) at 77
    return uint8, ["a cat", "the cat sat on the mat", long]


def _torchmetrics_score(bundle: HFClipBundle, uint8: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """(CLIPScore's result, its unclamped mean score) with every frame fed with its video's caption."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(bundle.model), bundle.processor))
    for video, caption in zip(uint8, captions):
        frames = list(video.transpose(0, 1))  # T x (3 x H x W)
        metric.update(frames, [caption] * len(frames))
    return float(metric.compute()), float(metric.score / metric.n_samples)


def test_clipscore_equals_torchmetrics_clipscore(bundle: HFClipBundle) -> None:
    uint8, captions = _videos()
    with pytest.warns(UserWarning, match="longer than"):  # torchmetrics warns about the long caption
        expected, _ = _torchmetrics_score(bundle, uint8, captions)
    assert expected > 10  # the clamp is not what makes the two agree
    metric = CLIPScoreSim(bundle, frame_batch_size=4)  # batches that cut across videos
    metric.update(uint8.float() / 127.5 - 1, captions)
    ours = float(metric.compute())
    # float32 CLIP features, scores summed in float32 by torchmetrics and float64 here: 1e-6 relative.
    assert abs(ours * 100 - expected) <= 1e-6 * abs(expected), (ours * 100, expected)
    assert int(metric.n_frames) == 15


def test_clipscore_negative_mean_is_clamped_like_torchmetrics(negative_bundle: HFClipBundle) -> None:
    uint8, captions = _videos()
    with pytest.warns(UserWarning, match="longer than"):
        expected, unclamped = _torchmetrics_score(negative_bundle, uint8, captions)
    metric = CLIPScoreSim(negative_bundle)
    metric.update(uint8.float() / 127.5 - 1, captions)
    assert unclamped < -10 and expected == 0.0 and float(metric.compute()) == 0.0
    ours_unclamped = float(metric.score_sum / metric.n_frames)
    assert abs(ours_unclamped - unclamped) <= 1e-6 * abs(unclamped)


def test_clipscore_clamps_the_mean_not_each_frame(bundle: HFClipBundle) -> None:
    uint8, captions = _videos()
    scores = CLIPScoreSim(bundle).frame_scores(uint8.float() / 127.5 - 1, captions)
    assert scores.shape == (15,) and float(scores.min()) < 0 < float(scores.max())  # random model: both signs
    metric = CLIPScoreSim(bundle)
    metric.update(uint8.float() / 127.5 - 1, captions)
    mean = float(scores.double().mean())
    assert float(metric.compute()) == pytest.approx(max(mean, 0.0) / 100, rel=1e-6)
    # A per-frame clamp would give a larger value: the mean of max(s, 0).
    assert float(scores.clamp(min=0).double().mean()) / 100 > float(metric.compute())


def test_long_caption_is_cut_at_77_tokens_like_torchmetrics(bundle: HFClipBundle) -> None:
    uint8, captions = _videos()
    frames = uint8[2].transpose(0, 1)[:1]
    long_score = clipscore_per_frame(bundle, frames, [captions[2]])
    longer_score = clipscore_per_frame(bundle, frames, [captions[2] + " the cat the cat"])
    # Past 77 tokens the caption no longer matters (its ids are cut, end token included).
    assert torch.equal(long_score, longer_score)


def test_load_hf_clip_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="clip_hf_dir"):
        load_hf_clip(tmp_path / "nothing")
