"""FVD during training (evaluation/train_callbacks.py) with the real I3D, and train.py's optimized_metric."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from numerics import REORDER, max_rel_diff

import train
from evaluation.train_callbacks import FolderHeldout, ToyHeldout, TrainingFVD, stretch_to_clip_length
from show1_lightning.data.video_io import write_mp4
from show1_lightning.runtime import ConfigError

# The FVD callback at the smallest useful size: 2 clips, 2 sampling steps, 9 frames into I3D (its minimum).
TINY_FVD = (
    "callbacks=[default,fvd]",
    "callbacks.fvd.num_clips=2",
    "callbacks.fvd.num_steps=2",
    "callbacks.fvd.clip_length=9",
    "callbacks.toy_adherence=null",
    "callbacks.samples=null",
    "callbacks.export=null",
)


def test_stretch_repeats_frames_in_order_and_leaves_long_clips():
    video = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(2, 3, 8, 2, 2)
    out = stretch_to_clip_length(video, 16)
    assert out.shape == (2, 3, 16, 2, 2)
    assert out[0, 0, :, 0, 0].tolist() == [i // 2 for i in range(16)]  # every frame twice, in order
    long = torch.zeros(1, 3, 20, 2, 2)
    assert stretch_to_clip_length(long, 16) is long  # FVD itself takes the first 16


def test_fvd_of_a_stage_with_cached_real_statistics(compose_train, tmp_path):
    """The callback's evaluation on an untrained toy keyframe stage with the real I3D: the real statistics are
    computed once and cached; a second callback reads them from the cache and gives the same value (same weights,
    same seeds), and a stage with other weights another value."""
    cfg = compose_train(tmp_path, *TINY_FVD)
    torch.manual_seed(0)  # unseeded, some random inits gave two FVDs within 0.6% of each other after the change below
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    kwargs = dict(num_clips=2, num_steps=2, clip_length=9, cache_dir=str(tmp_path / "cache"))
    first = TrainingFVD(ToyHeldout(), **kwargs)
    a = first.evaluate(stage)
    assert first.real_source == "computed, cached" and math.isfinite(a) and a > 0
    assert len(list((tmp_path / "cache" / "fvd_real_stats").glob("toy_heldout_test-*.safetensors"))) == 1
    second = TrainingFVD(ToyHeldout(), **kwargs)
    b = second.evaluate(stage)
    assert second.real_source == "cache"
    assert max_rel_diff(torch.tensor(b), torch.tensor(a)) < REORDER
    with torch.no_grad():
        for p in stage.unet.parameters():
            p.mul_(0.5)
    stage.ema = None  # sample with the changed weights
    c = second.evaluate(stage)
    # Two-clip FVDs of untrained stages are dominated by the real statistics' trace (~1e4), so two different
    # untrained UNets differ by well under 1% (0.7%, even for a UNet that predicts zero); the same weights
    # reproduce within REORDER, so a tenfold margin over it tells "other samples" from "the same samples".
    assert max_rel_diff(torch.tensor(c), torch.tensor(a)) > 10 * REORDER


def test_fvd_during_training_feeds_callback_metrics_checkpoint_and_optimized_metric(compose_train, tmp_path):
    """val/fvd computed at step 2 reaches trainer.callback_metrics before ModelCheckpoint(monitor="val/fvd") runs
    at that step (it saves and records the score), then train.train's metrics and optimized_metric."""
    cfg = compose_train(
        tmp_path,
        *TINY_FVD,
        "callbacks.fvd.every_n_steps=2",
        f"callbacks.fvd.cache_dir={tmp_path / 'cache'}",
        "+callbacks.best._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.best.dirpath={tmp_path / 'best'}",
        "+callbacks.best.filename=best",
        "+callbacks.best.monitor=val/fvd",
        "+callbacks.best.mode=min",
        "+callbacks.best.every_n_train_steps=2",
        "optimized_metric=val/fvd",
    )
    metrics = train.train(cfg)
    fvd = metrics["val/fvd"]
    assert math.isfinite(fvd) and fvd > 0  # untrained samples vs real clips: far apart
    assert train.optimized_value(metrics, cfg.optimized_metric) == fvd
    ckpt = torch.load(tmp_path / "best" / "best.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and "val/fvd" in k]
    assert float(state["best_model_score"]) == pytest.approx(fvd, rel=1e-6)


def test_optimized_metric_returns_float_dict_or_names_the_missing_key():
    metrics = {"val/loss": 0.5, "val/fvd": 123.0}
    assert train.optimized_value(metrics, "val/fvd") == 123.0
    assert isinstance(train.optimized_value(metrics, "val/loss"), float)
    assert train.optimized_value(metrics, None) is metrics
    assert train.optimized_value(None, "val/fvd") is None  # a failed multirun job: the sweeper marks it failed
    with pytest.raises(ConfigError, match="optimized_metric.*toy/color_adherence_after.*val/fvd"):
        train.optimized_value(metrics, "toy/color_adherence_after")


def test_optimized_metric_default_is_null(compose_train, tmp_path):
    assert compose_train(tmp_path).optimized_metric is None
    assert "fvd" not in compose_train(tmp_path).callbacks  # off in the default run (I3D time)


def test_folder_heldout_reads_captioned_videos_resized_and_skips_uncaptioned(tmp_path: Path):
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red circle", None, "a blue square"]):
        frames = rng.integers(0, 256, (6, 20, 30, 3), dtype=np.uint8)
        write_mp4(tmp_path / "clips" / f"{i:02d}.mp4", frames, fps=8)
        if caption:
            (tmp_path / "clips" / f"{i:02d}.txt").write_text(caption + "\n")
    held = FolderHeldout(str(tmp_path / "clips"))
    videos, prompts = held.clips(2, num_frames=4, height=16, width=24)
    assert videos.shape == (2, 3, 4, 16, 24) and videos.dtype == torch.float32
    assert -1.0 <= float(videos.min()) and float(videos.max()) <= 1.0
    assert prompts == ["a red circle", "a blue square"]  # 01.mp4 has no caption: skipped
    with pytest.raises(ValueError, match="2 usable captioned videos, need 3"):
        held.clips(3, num_frames=4, height=16, width=24)
    before = held.describe()
    (tmp_path / "clips" / "02.txt").write_text("a green triangle, longer\n")
    assert held.describe() != before  # a changed file changes the real-statistics cache key


def test_fvd_config_validation():
    with pytest.raises(ValueError, match="num_clips >= 2"):
        TrainingFVD(ToyHeldout(), num_clips=1)


@pytest.mark.slow
def test_fvd_in_two_process_ddp_equals_the_single_process_value(tmp_path):
    """train.py with 2 CPU DDP processes and 3 held-out clips (2 on rank 0, 1 on rank 1): no deadlock, val/fvd logged
    and monitored, and equal to the FVD of the saved weights computed in one process."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, TINY_TRAIN

    from show1_lightning.stages.loading import load_stage_from_checkpoint

    run_dir = tmp_path / "logs" / "train" / "runs" / "ddp"
    cache = tmp_path / "cache"
    args = [a for a in TINY_TRAIN if not a.startswith("callbacks.toy_adherence")] + [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",  # as the single-process check below samples (ddp's default is bf16-mixed)
        "run_name=ddp",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *TINY_FVD,
        "callbacks.fvd.num_clips=3",
        "callbacks.fvd.every_n_steps=2",
        f"callbacks.fvd.cache_dir={cache}",
        "+callbacks.best._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        f"+callbacks.best.dirpath={tmp_path / 'best'}",
        "+callbacks.best.filename=best",
        "+callbacks.best.monitor=val/fvd",
        "+callbacks.best.every_n_train_steps=2",
    ]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (csv,) = list(run_dir.rglob("metrics.csv"))
    header, *rows = csv.read_text().splitlines()
    col = header.split(",").index("val/fvd")
    (logged,) = [float(r.split(",")[col]) for r in rows if r.split(",")[col]]
    ckpt = torch.load(tmp_path / "best" / "best.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint") and "val/fvd" in k]
    assert float(state["best_model_score"]) == pytest.approx(logged, rel=1e-6)
    stage = load_stage_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    single = TrainingFVD(ToyHeldout(), num_clips=3, num_steps=2, clip_length=9, cache_dir=str(cache))
    value = single.evaluate(stage)
    assert single.real_source == "cache"  # written by the DDP run (all-reduced real sums)
    # Clips 0, 2 sampled and scored in a batch of 2 on rank 0, clip 1 alone on rank 1, all three together here.
    assert max_rel_diff(torch.tensor(value), torch.tensor(logged)) < REORDER
