"""Tests of the chunked video VAE wrapper (show1_lightning.models.vae) and the toy VAE (models.toy_vae)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from numerics import assert_close_rel, assert_differ_rel

from show1_lightning.models.toy_vae import ensure_toy_vae, fit_vae, reconstruction_psnr
from show1_lightning.models.vae import PixelSkipAutoencoderKL, VideoVAE, build_video_vae, tiny_autoencoder

torch.set_num_threads(1)

TINY = {"block_out_channels": [8, 16, 16, 32], "norm_num_groups": 4}


def _video(b: int = 2, t: int = 5, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return VideoVAE(tiny_autoencoder(**TINY, scaling_factor=0.5, seed=0), chunk_frames=3)


def test_shapes_and_factor(vae: VideoVAE) -> None:
    x = _video()
    z = vae.encode(x)
    assert vae.downsample_factor == 8
    assert z.shape == (2, 4, 5, 4, 6) and z.dtype == torch.float32
    y = vae.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert vae.latent_size(320, 576) == (40, 72)


def test_chunked_equals_unchunked(vae: VideoVAE) -> None:
    x = _video()
    whole = VideoVAE(vae.vae, chunk_frames=1000, scaling_factor=vae.scaling_factor)
    for chunk in (1, 3, 4):
        part = VideoVAE(vae.vae, chunk_frames=chunk, scaling_factor=vae.scaling_factor)
        z = part.encode(x)
        # Chunks are other batch shapes for the same convolutions: equal up to reordered float32 sums.
        assert_close_rel(z, whole.encode(x), msg=f"encode, chunk {chunk}")
        assert_close_rel(part.decode(z), whole.decode(z), msg=f"decode, chunk {chunk}")


def test_frames_are_independent_and_time_order_kept(vae: VideoVAE) -> None:
    """Frame i's latent depends only on frame i: the fold into the batch keeps (b, t) positions."""
    x = _video(b=2, t=3)
    z = vae.encode(x)
    z_single = vae.encode(x[1:2, :, 2:3])
    assert_close_rel(z_single, z[1:2, :, 2:3])  # batch of 1 vs 6 frames: reordered float32 sums at most
    assert_differ_rel(z[:, :, 0], z[:, :, 1])


def test_encode_is_scaled_posterior_mean(vae: VideoVAE) -> None:
    x = _video(b=1, t=2)
    frames = x.permute(0, 2, 1, 3, 4).reshape(2, 3, 32, 48)
    with torch.no_grad():
        mean = vae.vae.encode(frames).latent_dist.mean
    expected = (mean * 0.5).reshape(1, 2, 4, 4, 6).permute(0, 2, 1, 3, 4)
    assert_close_rel(vae.encode(x), expected)  # the same convolutions, possibly another batch blocking
    assert torch.equal(vae.encode(x), vae.encode(x))  # deterministic


def test_seeded_posterior_sample_independent_of_chunking(vae: VideoVAE) -> None:
    x = _video(b=1, t=4)
    a = VideoVAE(vae.vae, chunk_frames=1, sample_posterior=True)
    b = VideoVAE(vae.vae, chunk_frames=8, sample_posterior=True)
    za = a.encode(x, generator=torch.Generator().manual_seed(3))
    zb = b.encode(x, generator=torch.Generator().manual_seed(3))
    assert_close_rel(za, zb)  # same noise draws; the encoder's sums may be blocked differently per chunk
    zc = a.encode(x, generator=torch.Generator().manual_seed(4))
    assert_differ_rel(za, zc)
    mean = VideoVAE(vae.vae, scaling_factor=1.0).encode(x)
    assert_differ_rel(za, mean)


def test_bf16_runs_in_bf16_returns_fp32_and_ignores_autocast(vae: VideoVAE) -> None:
    x = _video(b=1, t=2)
    ref = vae.encode(x)
    half = VideoVAE(tiny_autoencoder(**TINY, scaling_factor=0.5, seed=0), dtype="bfloat16")
    assert next(half.vae.parameters()).dtype == torch.bfloat16
    z = half.encode(x)
    assert z.dtype == torch.float32
    assert (z - ref).abs().max() < 0.1 * ref.abs().max()
    assert half.decode(z).dtype == torch.float32
    # Under a trainer's autocast the fp32 VAE still runs in fp32: identical result.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # bf16 would differ by ~1e-2 of the scale; fp32 matches to rounding (numerics.REORDER).
        assert_close_rel(vae.encode(x), ref)


def test_frozen(vae: VideoVAE) -> None:
    vae.train()
    assert not vae.vae.training
    assert all(not p.requires_grad for p in vae.parameters())


def test_errors(vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        vae.encode(_video(h=30))
    with pytest.raises(ValueError, match="B x 3 x T"):
        vae.encode(torch.zeros(1, 3, 32, 48))
    with pytest.raises(ValueError, match="B x 4 x T"):
        vae.decode(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(ValueError, match="chunk_frames"):
        VideoVAE(vae.vae, chunk_frames=0)
    with pytest.raises(ValueError, match="unknown VAE dtype"):
        VideoVAE(vae.vae, dtype="int8")


def test_from_pretrained_subfolder(tmp_path: Path, vae: VideoVAE) -> None:
    vae.vae.save_pretrained(tmp_path / "model" / "vae")
    loaded = build_video_vae(pretrained_path=str(tmp_path / "model"), subfolder="vae", chunk_frames=2)
    assert loaded.scaling_factor == 0.5 and loaded.chunk_frames == 2
    x = _video(b=1, t=2)
    assert_close_rel(loaded.encode(x), vae.encode(x))  # same weights, another module instance
    with pytest.raises(FileNotFoundError, match="set subfolder: vae"):
        VideoVAE.from_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="either"):
        build_video_vae(pretrained_path=str(tmp_path), fit_on_toy={"root": "x", "toy_root": "y"})


def test_build_default_is_seeded_tiny() -> None:
    a = build_video_vae(tiny=TINY, seed=1)
    b = build_video_vae(tiny=TINY, seed=1)
    c = build_video_vae(tiny=TINY, seed=2)
    x = _video(b=1, t=1)
    assert torch.equal(a.encode(x), b.encode(x))
    assert not torch.equal(a.encode(x), c.encode(x))


def test_fit_vae_learns_to_reconstruct_and_sets_scaling_factor() -> None:
    # Smooth frames (blobs of colour): a few dozen steps must beat the untrained reconstruction clearly.
    g = torch.Generator().manual_seed(0)
    frames = torch.nn.functional.interpolate(
        torch.rand(16, 3, 4, 4, generator=g) * 2 - 1, size=(32, 32), mode="bilinear", align_corners=False
    )
    model = tiny_autoencoder(**TINY, seed=0)
    video = frames.unsqueeze(0).permute(0, 2, 1, 3, 4)

    def mse() -> float:
        v = VideoVAE(model, scaling_factor=1.0)
        return float(((v(video) - video) ** 2).mean())

    before = mse()
    stats = fit_vae(model, frames, steps=100, batch_size=4, crop=32, lr=3e-3, seed=0)
    after = mse()
    assert stats["steps"] == 100
    assert after < 0.6 * before, (before, after)
    # scaling_factor = 1 / std of the latent means: scaled latents have unit std on the fitted frames.
    z = VideoVAE(model).encode(video)
    assert model.config.scaling_factor == pytest.approx(1.0 / stats["latent_std"])
    assert float(z.std()) == pytest.approx(1.0, rel=0.05)


def test_pixel_skip_vae_starts_at_pooling_and_bilinear_and_loads_as_itself(tmp_path: Path) -> None:
    model = tiny_autoencoder([8, 16], norm_num_groups=4, pixel_skip=True, seed=0)
    assert isinstance(model, PixelSkipAutoencoderKL) and model.pixel_factor == 2
    video = _video(1, 3, 16, 24)
    frames = video[0].permute(1, 0, 2, 3)
    vae = VideoVAE(model)
    z = vae.encode(video)[0].permute(1, 0, 2, 3)
    # Learned paths at zero: latents = [pooled RGB, 0], reconstruction = bilinear upsampling of the pooled frame.
    pooled = torch.nn.functional.avg_pool2d(frames, 2)
    torch.testing.assert_close(z[:, :3], pooled, rtol=1e-5, atol=1e-6)
    assert float(z[:, 3].abs().max()) == 0.0
    up = torch.nn.functional.interpolate(pooled, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(vae(video)[0].permute(1, 0, 2, 3), up, rtol=1e-5, atol=1e-6)
    # The learned paths add to the pixel path: perturbing them changes the output, and a saved model loads as
    # itself (a plain AutoencoderKL would drop the pixel path).
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(0.1)
    model.save_pretrained(tmp_path / "skip")
    loaded = VideoVAE.from_pretrained(tmp_path / "skip")
    assert isinstance(loaded.vae, PixelSkipAutoencoderKL)
    torch.testing.assert_close(loaded(video), VideoVAE(model)(video))
    torch.testing.assert_close(loaded(video)[0].permute(1, 0, 2, 3), up + 0.1, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latent_channels"):
        tiny_autoencoder([8, 16], norm_num_groups=4, latent_channels=2, pixel_skip=True)
    with pytest.raises(NotImplementedError, match="tiling"):
        model.enable_tiling()


@pytest.mark.slow
def test_ensure_toy_vae_fits_once_then_reuses_cache(tmp_path: Path) -> None:
    """The toy recipe, shortened (80 steps): cached with save_pretrained, reused, refitted when the recipe changes."""
    root, toy = tmp_path / "toy_vae", tmp_path / "toy"
    kw = dict(height=80, width=128, tiny=TINY, steps=80, num_clips=16, frames_per_clip=2)
    path = ensure_toy_vae(root, toy, **kw)
    assert (path / "config.json").exists() and (path / "diffusion_pytorch_model.safetensors").exists()
    stamp = (path / "DONE.json").stat().st_mtime_ns
    assert ensure_toy_vae(root, toy, **kw) == path
    assert (path / "DONE.json").stat().st_mtime_ns == stamp  # reused, not refitted
    fitted = VideoVAE.from_pretrained(path)
    random = VideoVAE(tiny_autoencoder(**TINY, seed=0))
    assert reconstruction_psnr(fitted, toy, 80, 128) > reconstruction_psnr(random, toy, 80, 128) + 3.0
    ensure_toy_vae(root, toy, **{**kw, "steps": 81})
    assert json.loads((path / "DONE.json").read_text())["params"]["steps"] == 81


def test_ensure_toy_vae_keeps_a_fit_stopped_early_until_asked(toy_data_dir: Path, tmp_path: Path) -> None:
    """time_limit_s stops a fit early: that VAE stays cached (stages trained on it need it as it is, and a slow
    machine must not get a new VAE at every load) until refit_incomplete asks for a full fit."""
    root = tmp_path / "toy_vae"
    kw = dict(height=16, width=24, tiny=TINY, steps=3, num_clips=8, frames_per_clip=1, crop=16)
    ensure_toy_vae(root, toy_data_dir / "toy", time_limit_s=0.0, **kw)  # stops after its first step
    first = json.loads((root / "DONE.json").read_text())
    assert first["stats"]["steps"] == 1
    weights = (root / "diffusion_pytorch_model.safetensors").read_bytes()
    ensure_toy_vae(root, toy_data_dir / "toy", time_limit_s=None, **kw)  # kept as it is
    assert json.loads((root / "DONE.json").read_text()) == first
    assert (root / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    ensure_toy_vae(root, toy_data_dir / "toy", time_limit_s=None, refit_incomplete=True, **kw)  # refitted
    second = json.loads((root / "DONE.json").read_text())
    assert second["stats"]["steps"] == 3
    stamp = (root / "DONE.json").stat().st_mtime_ns
    ensure_toy_vae(root, toy_data_dir / "toy", time_limit_s=None, refit_incomplete=True, **kw)  # complete: reused
    assert (root / "DONE.json").stat().st_mtime_ns == stamp
