"""Integration tests of train.py: compose API runs, resume, config errors, multirun and DDP subprocesses."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import train
from show1_lightning.callbacks.toy_adherence import ToyColorAdherence, toy_eval_prompts
from show1_lightning.data.toy_data import color_adherence
from show1_lightning.runtime import ConfigError, validate_train_config
from show1_lightning.stages.loading import load_stage_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]


# The toy default (tiny Show-1 UNet) by default; the stock diffusers UNet (35 s) with -m slow: the toy conditional
# stages' experiments train stock UNets through Hydra in the default suite already.
@pytest.mark.parametrize("model", [None, pytest.param("unet3d_tiny", marks=pytest.mark.slow)])
def test_short_run_writes_checkpoint_samples_export_and_adherence(compose_train, tmp_path, model):
    # min_steps=0: score the adherence of this 2-step run too (a debug-length run skips it by default)
    cfg = compose_train(tmp_path, "callbacks.toy_adherence.min_steps=0", *([f"model={model}"] if model else []))
    metrics = train.train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "val/loss" in metrics
    prompts = toy_eval_prompts(per_color=1)
    for when in ("before", "after"):  # a fraction of the prompts
        hits = metrics[f"toy/color_adherence_{when}"] * len(prompts)
        assert hits == pytest.approx(round(hits)), when
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    mp4s = sorted((tmp_path / "samples").rglob("*.mp4"))
    assert len(mp4s) == 4  # the 4 fixed prompts, at the end of fit
    unet_dir = tmp_path / "export" / "unet"
    assert (unet_dir / "config.json").exists() and (unet_dir / "diffusion_pytorch_model.safetensors").exists()
    # The export holds the EMA weights and loads with diffusers' from_pretrained.
    stage = load_stage_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    if model == "unet3d_tiny":
        from diffusers import UNet3DConditionModel as unet_class
    else:
        from show1_lightning.models.show1_unet import Show1UNet3DConditionModel as unet_class
    assert type(stage.unet) is unet_class
    exported = unet_class.from_pretrained(unet_dir)
    with stage.ema_weights():
        for (name, p), q in zip(stage.unet.named_parameters(), exported.parameters()):
            assert torch.equal(p, q), name  # float32 EMA weights copied through safetensors: bit for bit
    # The stage rebuilt from the checkpoint samples at the configured shape.
    video = stage.generate(["a red circle moving left"], [0], num_steps=2)
    assert video.shape == (1, 3, cfg.stage.num_frames, cfg.stage.height, cfg.stage.width)
    # "after" scores the final EMA weights' samples of the callback's prompts and seeds.
    seed = cfg.callbacks.toy_adherence.seed
    steps = cfg.callbacks.toy_adherence.num_steps  # fewer sampling steps than the stage's own (README)
    videos = stage.generate(prompts, [seed + i for i in range(len(prompts))], num_steps=steps)
    assert metrics["toy/color_adherence_after"] == color_adherence(videos.float(), prompts)


def test_toy_adherence_skips_debug_length_runs_only() -> None:
    def trainer(max_steps: int) -> L.Trainer:
        return L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False)

    default = ToyColorAdherence(per_color=1)
    assert default.skipped(trainer(2)) and default.skipped(trainer(99))
    assert not default.skipped(trainer(100)) and not default.skipped(trainer(600))  # the toy run: scored
    assert not default.skipped(trainer(-1))  # no step limit
    assert not ToyColorAdherence(per_color=1, min_steps=0).skipped(trainer(2))


def test_time_budget_stops_training_and_the_score_says_after_how_many_steps(compose_train, tmp_path, capsys):
    # The default run's trainer.max_time: a CPU too slow for max_steps stops early; the printed score says so.
    cfg = compose_train(
        tmp_path,
        "trainer.max_steps=100000",
        "trainer.max_time=00:00:00:02",
        "callbacks.toy_adherence.per_color=1",
        "callbacks.toy_adherence.num_steps=1",
        "callbacks.samples=null",
        "callbacks.export=null",
    )
    assert cfg.trainer.max_time == "00:00:00:02"
    train.train(cfg)
    done = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < done < 100000
    assert f"colour adherence after training ({done} of 100000 steps: stopped early" in capsys.readouterr().out


def test_last_ckpt_holds_the_final_step_when_training_ends_between_saves(compose_train, tmp_path):
    # Lightning left last.ckpt at the last periodic save (step 2 here): a resume then redid the steps after it.
    lean = ("callbacks.samples=null", "callbacks.toy_adherence=null", "callbacks.export=null")
    train.train(
        compose_train(tmp_path, *lean, "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2")
    )
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert (tmp_path / "checkpoints" / "step_0000002.ckpt").exists()


def test_resume_continues_from_last_ckpt(compose_train, tmp_path):
    lean = ("callbacks.samples=null", "callbacks.toy_adherence=null", "callbacks.export=null")
    # export_dir=null (the callback kept) exports nothing; it used to fail at the end of fit
    train.train(compose_train(tmp_path, *lean[:2], "export_dir=null"))
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    assert not (tmp_path / "export").exists()
    cfg = compose_train(tmp_path, *lean, "trainer.max_steps=4")
    with_ckpt = train.train(cfg)
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 4
    assert "ema" in resumed and resumed["ema"]["optimization_step"] == 4
    assert math.isfinite(with_ckpt["train/loss"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage.caption_dropout=1.5", "stage.caption_dropout"),
        ("stage.noise_scheduler.prediction_type=x0", "stage.noise_scheduler.prediction_type"),
        ("stage.t_max=1000", "stage.t_min/t_max"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.precision=fp8", "trainer.precision"),
    ],
)
def test_impossible_values_fail_at_start_naming_the_key(compose_train, tmp_path, override, key):
    cfg = compose_train(tmp_path, override)
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate_train_config(cfg)


def test_unknown_key_fails_naming_it(compose_train, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="stage.no_such_key"):
        compose_train(tmp_path, "stage.no_such_key=1")


def test_unet_channel_mismatch_is_reported(compose_train, tmp_path):
    import hydra
    import hydra.errors

    cfg = compose_train(tmp_path, "model.in_channels=7")  # the tiny Show-1 UNet builds with 7 inputs
    with pytest.raises((ValueError, hydra.errors.InstantiationException), match="in_channels=7"):
        hydra.utils.instantiate(cfg.stage)


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _tiny_cli(tmp_path: Path) -> list[str]:
    from tests.conftest import TINY_TRAIN

    return [a for a in TINY_TRAIN if not a.startswith("logger=")] + [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "callbacks.samples.at_fit_end=false",
    ]


def test_multirun_separate_dirs_and_wandb_runs_and_survives_a_failing_job(tmp_path):
    """`train.py -m` as a user runs it (the subprocess is the point: Hydra's launcher and job dirs). One sweep of
    three jobs: job 0 fails at start-up (impossible dropout) and writes error.txt naming the key, jobs 1 and 2 still
    train, each in its own dir with its own checkpoint and its own offline wandb run; the sweep exits 0."""
    res = _run(
        ["train.py", "-m", "stage.caption_dropout=2.0,0.1,0.2", *_tiny_cli(tmp_path), "callbacks.toy_adherence=null"],
        ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1", "2"]
    assert "stage.caption_dropout" in (jobs[0] / "error.txt").read_text()
    assert not (jobs[0] / "checkpoints" / "last.ckpt").exists()
    run_ids = set()
    for job in jobs[1:]:
        assert not (job / "error.txt").exists()
        assert (job / "checkpoints" / "last.ckpt").exists()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
    assert len(run_ids) == 2


@pytest.mark.slow
def test_ddp_two_cpu_processes_bf16(tmp_path):
    res = _run(
        [
            "train.py",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=bf16-mixed",
            "run_name=ddp",
            *_tiny_cli(tmp_path),
            "callbacks.toy_adherence=null",
        ],
        ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "logs" / "train" / "runs" / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2


def test_paper_keyframe_config_builds_the_released_structure_on_meta(compose_train, tmp_path):
    import hydra

    cfg = compose_train(
        tmp_path,
        "experiment=paper_keyframe",
        "text_encoder.pretrained_path=/models/t5",
        "data.train_shards=/x/0.tar",
        "data.val_shards=/x/0.tar",
        tiny=False,
    )
    validate_train_config(cfg)
    assert (cfg.stage.num_frames, cfg.stage.height, cfg.stage.width) == (8, 40, 64)
    assert cfg.stage.sampling.num_steps == 75 and cfg.stage.sampling.guidance_scale == 9.0
    assert cfg.stage.noise_scheduler.beta_schedule == "squaredcos_cap_v2"
    with torch.device("meta"):
        unet = hydra.utils.instantiate(cfg.model, _convert_="all")
    assert unet.config.in_channels == 3 and unet.config.out_channels == 6  # eps + learned variance
    assert unet.config.encoder_hid_dim == cfg.text_dim == 4096


def test_fsdp_with_rank_zero_sampling_callbacks_fails_at_start(compose_train, tmp_path):
    """Rank-0-only sampling would hang an FSDP run at its first sample: refused at start-up, naming the callbacks."""
    from show1_lightning.runtime import ConfigError

    cfg = compose_train(tmp_path, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
    with pytest.raises(ConfigError, match=r"callbacks\.samples=null"):
        validate_train_config(cfg)
    lean = compose_train(
        tmp_path, "trainer=fsdp", "trainer.accelerator=cpu", "callbacks.samples=null", "callbacks.toy_adherence=null"
    )
    validate_train_config(lean)
