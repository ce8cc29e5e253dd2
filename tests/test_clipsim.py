"""CLIPSIM: cosine convention, scales, preprocessing and a tiny random open_clip model."""

from __future__ import annotations

import fixtures_eval as fx
import pytest
import torch
import torch.nn.functional as F

from evaluation.clipsim import CLIP_MEAN, CLIP_STD, CLIPSim, clip_preprocess, cosine_per_frame, load_clip


@pytest.fixture(scope="module")
def tiny():
    return fx.tiny_clip(seed=0)


def test_cosine_on_constructed_embeddings():
    text = torch.tensor([3.0, 4.0, 0.0])
    img = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [-6.0, -8.0, 0.0], [4.0, 3.0, 0.0]])
    cos = cosine_per_frame(img, text)
    assert cos.dtype == torch.float64
    # Exact small integers in float64: allclose's defaults (rtol 1e-5) leave room only for the sqrt's rounding.
    assert torch.allclose(cos, torch.tensor([1.0, 0.0, -1.0, 24 / 25], dtype=torch.float64))


def test_scales_mean_over_frames_then_videos(tiny):
    raw = CLIPSim(tiny, scale="raw")
    tm = CLIPSim(tiny, scale="torchmetrics")
    # Video means 0.5 (frames 1.0 and 0.0) and -0.1: CLIPSIM = 0.2; torchmetrics 20.
    for m in (raw, tm):
        m.update_similarities(torch.tensor([0.5, -0.1], dtype=torch.float64))
    assert float(raw.compute()) == pytest.approx(0.2, abs=1e-15)
    assert float(tm.compute()) == pytest.approx(20.0, abs=1e-12)
    neg = CLIPSim(tiny, scale="torchmetrics")
    neg.update_similarities(torch.tensor([-0.3]))
    assert float(neg.compute()) == 0.0  # clamped at 0 after averaging
    with pytest.raises(ValueError, match="scale"):
        CLIPSim(tiny, scale="x100")


def test_preprocess_bicubic_short_side_centre_crop():
    frames = torch.zeros(1, 3, 40, 80)
    frames[..., :, 20:60] = 1.0  # white centre square, black sides
    out = clip_preprocess(frames, 32, CLIP_MEAN, CLIP_STD)
    assert out.shape == (1, 3, 32, 32)
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    # The crop is the white square: its centre is pure white after normalisation (values ~2; the bicubic
    # weights sum to 1 up to float32 rounding, so 1e-4 is far above rounding and far below a wrong crop).
    assert torch.allclose(out[0, :, 16, 16], white, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        clip_preprocess(torch.zeros(3, 8, 8), 32, CLIP_MEAN, CLIP_STD)


def test_metric_matches_manual_computation(tiny):
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 3, 3, 40, 56, generator=g) * 2 - 1
    captions = ["a red ball " * 60, "a dog runs on the beach"]  # the first exceeds 77 tokens: truncated
    tokens = tiny.tokenizer(captions)
    assert tokens.shape == (2, 77)
    metric = CLIPSim(tiny, frame_batch_size=4)
    metric.update(videos[:1], captions[:1])
    metric.update(videos[1:], captions[1:])
    with torch.no_grad():
        text = F.normalize(tiny.model.encode_text(tokens), dim=-1)
        per_video = []
        for v in range(2):
            x = clip_preprocess(videos[v].transpose(0, 1), tiny.image_size, CLIP_MEAN, CLIP_STD)
            img = F.normalize(tiny.model.encode_image(x), dim=-1)
            per_video.append((img @ text[v]).mean())
    expected = torch.stack(per_video).double().mean()
    # Cosines are bounded by 1, so an absolute 1e-6 is relative to their scale (float32 dot products of dim 32).
    assert float(metric.compute()) == pytest.approx(float(expected), abs=1e-6)
    assert int(metric.n_videos) == 2


def test_identical_embedding_direction_gives_one(tiny):
    """A model whose image and text towers return the same vector: CLIPSIM must be exactly 1."""

    class Same(torch.nn.Module):
        def encode_text(self, tokens):
            return torch.ones(tokens.shape[0], 8)

        def encode_image(self, x):
            return torch.full((x.shape[0], 8), 2.5)

    bundle = type(tiny)(model=Same(), tokenizer=tiny.tokenizer, image_size=16)
    m = CLIPSim(bundle)
    m.update(torch.zeros(3, 3, 2, 20, 20), ["a", "b", "c"])
    assert float(m.compute()) == pytest.approx(1.0, abs=1e-12)


def test_input_errors(tiny):
    m = CLIPSim(tiny)
    with pytest.raises(ValueError, match="one caption per video"):
        m.update(torch.zeros(2, 3, 2, 32, 32), ["only one"])
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    with pytest.raises(FileNotFoundError, match="CLIP checkpoint"):
        load_clip("ViT-B-32", checkpoint="/nonexistent/clip.bin")
    with pytest.raises(ValueError, match="checkpoint"):
        load_clip("ViT-B-32")


@pytest.mark.slow
def test_vit_b32_from_local_checkpoint(tmp_path):
    """The real architecture: a ViT-B-32 state dict saved to disk loads through the local-path route."""
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "vit_b32.pt"
    torch.save(model.state_dict(), path)
    bundle = load_clip("ViT-B-32", checkpoint=path)
    assert bundle.image_size == 224 and bundle.description["context_length"] == 77
    for a, b in zip(model.state_dict().values(), bundle.model.state_dict().values()):
        assert torch.equal(a, b)
    m = CLIPSim(bundle)
    m.update(torch.rand(1, 3, 2, 320, 576) * 2 - 1, ["a cat"])
    assert -1.0 <= float(m.compute()) <= 1.0
