"""Tests of the FVD metric, the Frechet distance, the FVD preprocessing and the TF1 legacy resize."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp
from torch import nn

from evaluation.fvd import FVD, frechet_distance, preprocess_for_fvd, real_stats_cache_path
from evaluation.resize import resize_video

# ----------------------------------------------------------------------------- helpers


class LookupFeatures(nn.Module):
    """A feature extractor with exactly controlled features: the clip's constant uint8 levels in
    channels 0 and 1 encode a row index into ``table`` (row = level0 + 256 * level1)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.double())
        self.calls_dtypes: list[torch.dtype] = []
        self.calls_tf32: list[bool] = []

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        assert clip.shape[1:] == (3, clip.shape[2], 224, 224)
        self.calls_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else clip.dtype)
        self.calls_tf32.append(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        levels = ((clip[:, :2, 0, 0, 0] + 1) * 127.5).round().long()
        return self.table[levels[:, 0] + 256 * levels[:, 1]]


def index_videos(indices: range | list[int], frames: int = 1, size: int = 4) -> torch.Tensor:
    """Constant videos (B, 3, frames, size, size) in [-1, 1] whose levels encode ``indices``."""
    idx = torch.as_tensor(list(indices))
    levels = torch.stack([idx % 256, idx // 256, torch.full_like(idx, 7)], dim=1).double()
    v = levels / 127.5 - 1
    return v[:, :, None, None, None].expand(-1, -1, frames, size, size).float().contiguous()


def gaussian_samples(n: int, mu: np.ndarray, cov: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean is exactly mu and unbiased sample covariance exactly cov."""
    z = np.random.default_rng(seed).normal(size=(n, mu.shape[0]))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mu + z @ np.linalg.cholesky(cov).T


def tfgan_frechet(mu1, s1, mu2, s2) -> float:
    """The TF-GAN / pytorch-fid formula with scipy's matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def random_spd(d: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, rank))
    return a @ a.T / rank + 1e-3 * np.eye(d)


# ----------------------------------------------------------------------------- frechet_distance


@pytest.mark.parametrize("d", [16, 128, pytest.param(400, marks=pytest.mark.slow)])
def test_frechet_matches_scipy_sqrtm(d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(d, d + 10, rng), random_spd(d, d // 2 + 3, rng)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = tfgan_frechet(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)
    # torch inputs (float32 too) give the same float64 computation
    torch_val = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert torch_val == pytest.approx(ours, rel=1e-12)


def test_frechet_closed_form_and_errors() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # commuting covariances: trace term = sum (sqrt a - sqrt b)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(mu1, np.eye(5), mu2, np.eye(6))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu1 * np.nan, np.eye(6), mu2, np.eye(6))


# ----------------------------------------------------------------------------- resize


def tf1_resize_numpy(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Explicit TF1 legacy resize_bilinear (align_corners=False, half_pixel_centers=False): pixel values
    in float64, source coordinates ``dst * (in / out)`` in float32 as TF's kernel computes them."""
    in_h, in_w = img.shape[-2:]
    out = np.empty(img.shape[:-2] + (out_h, out_w))
    f32 = np.float32
    for y in range(out_h):
        sy = float(f32(y) * (f32(in_h) / f32(out_h)))
        y0 = int(math.floor(sy))
        y1 = min(y0 + 1, in_h - 1)
        ly = sy - y0
        for x in range(out_w):
            sx = float(f32(x) * (f32(in_w) / f32(out_w)))
            x0 = int(math.floor(sx))
            x1 = min(x0 + 1, in_w - 1)
            lx = sx - x0
            top = img[..., y0, x0] * (1 - lx) + img[..., y0, x1] * lx
            bottom = img[..., y1, x0] * (1 - lx) + img[..., y1, x1] * lx
            out[..., y, x] = top * (1 - ly) + bottom * ly
    return out


@pytest.mark.parametrize("in_hw, out_hw", [((32, 40), (56, 48)), ((50, 37), (16, 20)), ((7, 9), (7, 9))])
def test_tf1_resize_matches_formula(in_hw, out_hw) -> None:
    v = torch.rand(2, 3, 2, *in_hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 255
    ours = resize_video(v, out_hw, "tf1_bilinear")
    ref = tf1_resize_numpy(v.numpy(), *out_hw)
    assert ours.shape == (2, 3, 2, *out_hw)
    # float64 values in 0..255: 1e-9 is ~4e-12 of the range, i.e. the same formula up to float64 rounding.
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-9)
    # float32 input: same up to float32 rounding of the coordinates
    np.testing.assert_allclose(resize_video(v.float(), out_hw).numpy(), ref, rtol=0, atol=3e-3)


def test_resize_methods_differ_and_errors() -> None:
    v = torch.rand(1, 3, 2, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tf1, bil, aa = (resize_video(v, (40, 40), m) for m in ("tf1_bilinear", "bilinear", "antialias"))
    assert tf1.shape == bil.shape == aa.shape == (1, 3, 2, 40, 40)
    assert (tf1 - bil).abs().max() > 1e-2 and (bil - aa).abs().max() > 1e-2
    assert torch.equal(tf1[..., 0, 0], v[..., 0, 0])  # legacy mapping samples the top-left pixel exactly
    with pytest.raises(ValueError, match="unknown resize"):
        resize_video(v, (40, 40), "bicubic")
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        resize_video(v[0], (40, 40))


@pytest.mark.slow
def test_tf1_resize_matches_jax_scale_and_translate() -> None:
    """jax.image.scale_and_translate with translation 0.5 (1 - s) is the legacy mapping src = dst / s."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    for in_hw, out_hw in (((128, 171), (224, 224)), ((256, 256), (224, 224)), ((240, 320), (224, 224))):
        img = np.random.default_rng(0).uniform(0, 255, (3, *in_hw)).astype(np.float32)
        scale = jnp.array([o / i for o, i in zip(out_hw, in_hw)], jnp.float32)
        ref = jax.image.scale_and_translate(
            jnp.asarray(img), (3, *out_hw), (1, 2), scale, 0.5 * (1 - scale), method="linear", antialias=False
        )
        ours = resize_video(torch.from_numpy(img)[None, :, None], out_hw)[0, :, 0]
        # jax computes the coordinates as (x + 0.5) / s - t / s - 0.5 in float32: tiny position
        # rounding, up to ~0.005 of 255 on noise images. Torch's half-pixel bilinear is far off.
        np.testing.assert_allclose(ours.numpy(), np.asarray(ref), rtol=0, atol=1e-2)
        half_pixel = resize_video(torch.from_numpy(img)[None, :, None], out_hw, "bilinear")[0, :, 0]
        assert np.abs(half_pixel.numpy() - np.asarray(ref)).max() > 10


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_for_fvd() -> None:
    g = torch.Generator().manual_seed(2)
    v = torch.rand(2, 3, 20, 30, 40, generator=g) * 2.2 - 1.1  # slightly out of range: clamped
    out = preprocess_for_fvd(v, clip_length=16)
    assert out.shape == (2, 3, 16, 224, 224) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # reference: uint8 frames, TF1 resize in 0..255, then 2x/255 - 1
    u8 = np.round((np.clip(v[:, :, :16].numpy().astype(np.float64), -1, 1) + 1) * 127.5)
    ref = tf1_resize_numpy(u8[:1, :, :2], 224, 224) * 2 / 255 - 1
    # Values in [-1, 1] computed in float32: 2e-5 is ~100 float32 ulps of the range.
    np.testing.assert_allclose(out[:1, :, :2].numpy(), ref, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="16 frames"):
        preprocess_for_fvd(v[:, :, :10])
    with pytest.raises(ValueError, match="RGB"):
        preprocess_for_fvd(v[:, :1])


# ----------------------------------------------------------------------------- FVD metric


def test_fvd_of_set_with_itself_is_zero_and_float32() -> None:
    table = torch.from_numpy(np.random.default_rng(3).normal(size=(20, 8)))
    net = LookupFeatures(table)
    fvd = FVD(net, clip_length=1, num_features=8, feature_batch_size=3)
    tf32_before = torch.backends.cudnn.allow_tf32
    videos = index_videos(range(20))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the metric must switch autocast off
        fvd.update(videos, real=True)
        fvd.update(videos, real=False)
    assert set(net.calls_dtypes) == {torch.float32} and len(net.calls_dtypes) == 2 * 7
    assert not any(net.calls_tf32) and torch.backends.cudnn.allow_tf32 == tf32_before  # off inside, restored after
    assert fvd.real_count == 20 and fvd.real_sum.dtype == torch.float64
    assert abs(float(fvd.compute())) < 1e-9
    assert fvd.compute().dtype == torch.float64


def test_fvd_gaussian_closed_form_and_covariance_options() -> None:
    d, n = 6, 40
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    real = gaussian_samples(n, mu1, q @ np.diag(a) @ q.T, seed=5)
    fake = gaussian_samples(n, mu2, q @ np.diag(b) @ q.T, seed=6)
    table = torch.from_numpy(np.concatenate([real, fake]))
    mean_term = np.sum((mu1 - mu2) ** 2)
    trace_term = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    results = {}
    for cov in ("unbiased", "biased"):
        fvd = FVD(LookupFeatures(table), clip_length=1, covariance=cov, num_features=d)
        fvd.update(index_videos(range(n)), real=True)
        fvd.update(index_videos(range(n, 2 * n)), real=False)
        results[cov] = float(fvd.compute())
    assert results["unbiased"] == pytest.approx(mean_term + trace_term, rel=1e-9)
    # biased covariances are (n-1)/n times the unbiased ones; the trace term scales the same way
    assert results["biased"] == pytest.approx(mean_term + trace_term * (n - 1) / n, rel=1e-9)
    assert results["biased"] < results["unbiased"]


def test_fvd_errors_and_reset(tmp_path: Path) -> None:
    net = LookupFeatures(torch.eye(8))
    with pytest.raises(ValueError, match="covariance"):
        FVD(net, covariance="ml")
    fvd = FVD(net, clip_length=2, num_features=8, reset_real_features=False)
    fvd.update(index_videos([0], frames=2), real=True)
    fvd.update(index_videos([1, 2], frames=3), real=False)
    with pytest.raises(RuntimeError, match="at least 2 real clips"):
        fvd.compute()
    with pytest.raises(ValueError, match="2 frames"):
        fvd.update(index_videos([0], frames=1), real=True)
    fvd.reset()
    assert fvd.real_count == 1 and fvd.fake_count == 0  # real statistics kept
    wrong = FVD(LookupFeatures(torch.eye(8)[:, :5]), clip_length=1, num_features=8)
    with pytest.raises(ValueError, match="feature extractor returned"):
        wrong.update(index_videos([0, 1]), real=True)


def test_real_stats_save_load_and_cache_path(tmp_path: Path) -> None:
    table = torch.from_numpy(np.random.default_rng(7).normal(size=(30, 8)))
    protocol = {"dataset": "ucf101", "clip_length": 2, "resize": "tf1_bilinear", "clips": 20}
    p1 = real_stats_cache_path(tmp_path, "UCF-101/train", protocol)
    assert p1 == real_stats_cache_path(tmp_path, "UCF-101/train", dict(reversed(protocol.items())))
    assert p1 != real_stats_cache_path(tmp_path, "UCF-101/train", {**protocol, "clips": 21})
    assert p1.parent == tmp_path / "fvd_real_stats" and "/" not in p1.name

    full = FVD(LookupFeatures(table), clip_length=1, num_features=8)
    full.update(index_videos(range(20)), real=True)
    full.update(index_videos(range(20, 30)), real=False)
    full.save_real_stats(p1, protocol)
    stats = full.real_stats()
    assert set(stats) == {"sum", "outer", "count"} and float(stats["count"]) == 20

    cached = FVD(LookupFeatures(table), clip_length=1, num_features=8)
    cached.load_real_stats(p1, protocol)
    cached.update(index_videos(range(20, 30)), real=False)
    assert float(cached.compute()) == float(full.compute())
    with pytest.raises(ValueError, match="protocol"):
        cached.load_real_stats(p1, {**protocol, "clips": 99})
    with pytest.raises(FileNotFoundError):
        cached.load_real_stats(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(
    rank: int, world: int, port: int, table: torch.Tensor, shards: list, stats_path: str, out_dir: str
) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fvd = FVD(LookupFeatures(table), clip_length=1, num_features=table.shape[1], feature_batch_size=2)
        real_idx, fake_idx = shards[rank]
        fvd.update(index_videos(real_idx), real=True)
        if fake_idx:
            fvd.update(index_videos(fake_idx), real=False)
        value = fvd.compute()  # every rank calls compute (all-gather)
        count = fvd.real_stats()["count"]
        cached = FVD(LookupFeatures(table), clip_length=1, num_features=table.shape[1])
        cached.load_real_stats(stats_path)
        if fake_idx:
            cached.update(index_videos(fake_idx), real=False)
        torch.save({"fvd": value, "count": count, "cached": cached.compute()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_fvd_equals_single_process(tmp_path: Path) -> None:
    table = torch.from_numpy(np.random.default_rng(8).normal(size=(23, 5)))
    real_all, fake_all = list(range(13)), list(range(13, 23))
    single = FVD(LookupFeatures(table), clip_length=1, num_features=5)
    single.update(index_videos(real_all), real=True)
    single.update(index_videos(fake_all), real=False)
    expected = float(single.compute())
    stats_path = str(single.save_real_stats(tmp_path / "real.safetensors"))
    # uneven shards; rank 1 has no fake clips at all
    shards = [(real_all[:9], fake_all), (real_all[9:], [])]
    mp.spawn(_ddp_worker, args=(2, _free_port(), table, shards, stats_path, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(float(res["fvd"]) - expected) <= 1e-9 * max(1.0, abs(expected)), (rank, res, expected)
        assert float(res["count"]) == 13
        assert abs(float(res["cached"]) - expected) <= 1e-9 * max(1.0, abs(expected))


# ----------------------------------------------------------------------------- with the real I3D


def test_fvd_with_real_i3d_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default extractor (real I3D, loaded lazily): a set against itself is 0, against another > 0."""
    monkeypatch.setenv("SHOW1_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(9)
    a = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
    b = (a[1:] * 0.3 + torch.linspace(-0.5, 0.5, 32).view(1, 1, 1, 1, 32)).clamp(-1, 1)
    fvd = FVD(clip_length=9, feature_batch_size=2)
    feats_a = fvd.features(a)
    feats_b = fvd.features(b)
    assert feats_a.shape == (2, 400) and feats_a.dtype == torch.float64
    assert fvd.protocol()["weights_id"] == fvd.feature_extractor.weights_id != ""
    fvd.add_features(feats_a, real=True)
    fvd.add_features(feats_a, real=False)
    # 2 clips in 400-d: rank-1 covariances; rounding-noise eigenvalues must not add sqrt(eps)-size terms.
    scale = float(torch.cov(feats_a.T).trace())
    assert abs(float(fvd.compute())) < 1e-9 * scale, (float(fvd.compute()), scale)
    fvd.reset()
    fvd.add_features(feats_a, real=True)
    fvd.add_features(torch.cat([feats_a[:1], feats_b]), real=False)
    assert float(fvd.compute()) > 1.0
