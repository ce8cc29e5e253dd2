"""Tests of the VAE latent cache (show1_lightning.data.latent_cache, data/precompute_latents.py)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import DictConfig, open_dict

import train
from show1_lightning.data.datamodule import VideoDataModule, _ClipMaker
from show1_lightning.data.latent_cache import (
    LatentCache,
    LatentCacheMismatchError,
    condition_video,
    encode_posterior,
    latent_shard_name,
    precompute_latents,
)
from show1_lightning.data.shards import VideoShardWriter, read_shard_samples, shard_key
from show1_lightning.data.toy_data import make_toy_clip, toy_caption
from show1_lightning.data.video_io import encode_mp4
from show1_lightning.models.vae import VideoVAE, tiny_autoencoder
from show1_lightning.stages.latent_sr import LatentSRStage
from show1_lightning.stages.loading import build_stage

torch.set_num_threads(1)

H, W, IH, IW, T, FPS = 32, 48, 16, 24, 2, 16
# A tiny residual latent SR stage (the toy recipe) on the tiny f=8 VAE: 32x48 clips -> 4x6 latents.
STAGE = [
    "experiment=toy_latent_sr",
    "vae@stage.vae=tiny",
    "text_dim=32",
    "model.block_out_channels=[16,32]",
    "model.down_block_types=[DownBlock3D,CrossAttnDownBlock3D]",
    "model.up_block_types=[CrossAttnUpBlock3D,UpBlock3D]",
    f"stage.height={H}",
    f"stage.width={W}",
    f"stage.input_height={IH}",
    f"stage.input_width={IW}",
    f"stage.num_frames={T}",
    "stage.residual=true",
    "logger=csv",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.batch_size=2",
    "data.epoch_length=2",
    "data.val_batches=1",
    "data.shuffle_buffer=4",
    "data.toy_root=null",
    f"data.target_fps={FPS}",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two shards of 4 videos (64x40, 12 frames at 16 fps); one video of shard 0 is too short (1 frame)."""
    root = tmp_path_factory.mktemp("videos")
    colors = ["red", "green", "blue", "yellow"]
    with VideoShardWriter(root, samples_per_shard=4) as w:
        for n in range(8):
            frames = make_toy_clip(colors[n % 4], "circle", "left", seed=n, height=40, width=64, num_frames=12)
            w.write(
                encode_mp4(frames[:1] if n == 1 else frames, fps=FPS), toy_caption(colors[n % 4], "circle", "left")
            )
    return [str(root / "00000.tar"), str(root / "00001.tar")]


def _cfg(tmp_path: Path, shards: list[str], *overrides: str) -> DictConfig:
    cfg = compose_config(
        tmp_path / "data",
        tmp_path / "out",
        *STAGE,
        f"data.train_shards=[{','.join(shards)}]",
        f"data.val_shards={shards[1]}",
        *overrides,
        tiny=False,
    )
    with open_dict(cfg):
        cfg.paths.work_dir = str(tmp_path)
        cfg.callbacks = {}
    return cfg


def _vae(seed: int = 0) -> VideoVAE:
    tiny = {"block_out_channels": [8, 16, 16, 32], "layers_per_block": 1, "latent_channels": 4}
    return VideoVAE(tiny_autoencoder(**tiny, norm_num_groups=4, mid_block_add_attention=False, seed=seed))


def _precompute(shards: list[str], out: Path, vae: VideoVAE, **kw) -> dict:
    args = dict(num_frames=T, height=H, width=W, target_fps=FPS, input_height=IH, input_width=IW, clips_per_video=2)
    args.update(kw)
    return precompute_latents(shards, vae, out, **args)


@pytest.fixture(scope="module")
def cache(shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    counts = _precompute(shards, out, _vae())
    assert counts == {"shards": 2, "computed_shards": 2, "samples": 7, "skipped": {"too_short": 1}}
    return out


def test_keys_and_latents_match_the_videos_encoded_by_the_vae(shards: list[str], cache: Path) -> None:
    vae = _vae()
    stage = hydra.utils.instantiate(_cfg(cache.parent, shards).stage, vae=vae)
    maker = _ClipMaker(T, H, W, FPS, 1, 0, None)
    for url in shards:
        videos = {s["__key__"]: s for s in read_shard_samples(url)}
        cached = read_shard_samples(cache / latent_shard_name(url))
        # Same keys, in the same order, minus the video the training stream would skip too.
        assert [s["__key__"] for s in cached] == [k for k in videos if k != shard_key(0, 1)]
        for s in cached:
            info = json.loads(s["json"])
            assert info["shard"] == os.path.abspath(url) and s["txt"] == videos[s["__key__"]]["txt"]
            clips = torch.stack(
                [maker(videos[s["__key__"]], None, start)["video"] for start in info["starts"]]
            )  # K x 3 x T x H x W, decoded as the training stream does
            latents = torch.from_numpy(np.load(io.BytesIO(s["latents.npy"])))
            cond = torch.from_numpy(np.load(io.BytesIO(s["cond.npy"])))
            assert latents.shape == (2, 4, T, H // 8, W // 8)
            torch.testing.assert_close(latents, vae.encode(clips), rtol=1e-5, atol=1e-6)
            # The low-res condition is the stage's own make_upstream + resize_to_output, encoded.
            lowres = stage.resize_to_output(stage.make_upstream(clips))
            torch.testing.assert_close(condition_video(clips, IH, IW, "bicubic"), lowres)
            torch.testing.assert_close(cond, vae.encode(lowres), rtol=1e-5, atol=1e-6)
    starts = [json.loads(s["json"])["starts"] for s in read_shard_samples(cache / latent_shard_name(shards[1]))]
    assert len({tuple(st) for st in starts}) > 1 and any(a != b for a, b in starts)  # seeded random starts


@pytest.fixture(scope="module")
def cache1(shards: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One clip per video."""
    out = tmp_path_factory.mktemp("latents1")
    _precompute(shards, out, _vae(), clips_per_video=1)
    return out


def test_loss_from_cached_latents_equals_on_the_fly(shards: list[str], cache1: Path) -> None:
    cfg = _cfg(cache1.parent, shards, "stage.ema.enabled=false")
    stage: LatentSRStage = build_stage(cfg.stage)
    stage.train()
    dm = VideoDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    dm.setup()
    dm._latent_cache = LatentCache(cache1)  # the fit-time check against the stage is tested below
    dm._latent_train_urls = dm._latent_cache.shard_urls(dm.train_urls)
    cached = next(iter(dm.train_dataset(start_step=0)))
    assert cached["latents"].shape == (2, 4, T, 4, 6) and cached["video"].shape == (2, 3, 0, H, W)
    # The same clips decoded from the videos, at the start the cache recorded (one clip per video).
    maker = _ClipMaker(T, H, W, FPS, 1, 0, None)
    videos = {s["__key__"]: s for url in shards for s in read_shard_samples(url)}
    starts = {
        s["__key__"]: json.loads(s["json"])["starts"]
        for url in shards
        for s in read_shard_samples(cache1 / latent_shard_name(url))
    }
    clips = [maker(videos[key], None, starts[key][0])["video"] for key in cached["key"]]
    on_the_fly = {**cached, "video": torch.stack(clips)}
    for name in ("latents", "cond_latents"):
        on_the_fly.pop(name)
    losses = []
    for batch in (cached, on_the_fly):
        g = torch.Generator().manual_seed(3)
        losses.append(stage.diffusion_step(batch, generator=g)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    assert losses[0].item() > 0
    # and the residual target really uses the cached condition: without it the loss changes
    g = torch.Generator().manual_seed(3)
    stage.residual = False
    assert not torch.allclose(stage.diffusion_step(cached, generator=g)[0], losses[0])


def test_stage_trains_from_the_cache_through_train(shards: list[str], cache: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, shards, f"data.latent_cache_dir={cache}")
    calls = []
    encode = VideoVAE.encode

    def counting_encode(self: VideoVAE, video: torch.Tensor, generator: torch.Generator | None = None):  # noqa: ANN202
        calls.append(torch.is_grad_enabled())  # True in training steps, False in validation (no_grad)
        return encode(self, video, generator)

    VideoVAE.encode = counting_encode  # a spy: the real encoder runs; validation still encodes its videos
    try:
        metrics = train.train(cfg)
    finally:
        VideoVAE.encode = encode
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and "val/loss" in metrics
    # the training steps encoded nothing; validation (pixels, under no_grad) still encodes its clips
    assert calls and not any(calls)


def test_mismatched_cache_fails_at_startup(shards: list[str], cache: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, shards, f"data.latent_cache_dir={cache}", "stage.vae.seed=1")
    with pytest.raises(LatentCacheMismatchError, match="vae_identity is 'AutoencoderKL-[0-9a-f]+' in the cache but"):
        train.train(cfg)
    cfg = _cfg(tmp_path, shards, f"data.latent_cache_dir={cache}", "stage.input_width=16", "data.target_fps=8")
    with pytest.raises(LatentCacheMismatchError, match="target_fps is 16.0 in the cache but 8.0 here") as err:
        train.train(cfg)
    assert "input_width is 24 in the cache but 16 here" in str(err.value)
    assert "vae_identity" not in str(err.value)
    # a VAE that samples its posterior needs cached log-variances
    with pytest.raises(LatentCacheMismatchError, match="mean_logvar"):
        LatentCache(cache, sample_posterior=True)


def test_changed_or_missing_shards_are_refused(shards: list[str], cache: Path, tmp_path: Path) -> None:
    lc = LatentCache(cache)
    assert len(lc.shard_urls(shards)) == 2
    with pytest.raises(LatentCacheMismatchError, match="not in latent cache"):
        lc.shard_urls([str(tmp_path / "other.tar")])
    copy = tmp_path / "copy"
    copy.mkdir()
    target = copy / "00000.tar"
    target.write_bytes(Path(shards[0]).read_bytes())
    out = tmp_path / "lat"
    _precompute([str(target)], out, _vae(), clips_per_video=1)
    os.utime(target, ns=(0, 0))
    with pytest.raises(LatentCacheMismatchError, match="changed after its latents were cached"):
        LatentCache(out).shard_urls([str(target)])
    # a rerun with other settings is refused rather than mixed in
    with pytest.raises(LatentCacheMismatchError, match="clips_per_video: 1 there, 2 here"):
        _precompute([str(target)], out, _vae(), clips_per_video=2)


def test_posterior_logvar_reproduces_posterior_sampling() -> None:
    vae = _vae()
    vae.scaling_factor = 0.5
    video = torch.rand(1, 3, 2, H, W) * 2 - 1
    mean, logvar = encode_posterior(vae, video)
    torch.testing.assert_close(mean, vae.encode(video))
    vae.sample_posterior = True
    noise = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(0))
    sampled = vae.encode(video, generator=torch.Generator().manual_seed(0))
    expected = mean + torch.exp(0.5 * logvar) * noise.reshape(1, 2, 4, H // 8, W // 8).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-6)
