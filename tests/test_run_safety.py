"""Training runs that cannot go silently wrong (issue 13): start-up checks naming the key, sampling arguments,
cascade stage-to-stage checks, one run folder per multi-node job, requeue with a last checkpoint, kept periodic
checkpoints, a fresh wandb run for a fresh start, an export that is never half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import train
from show1_lightning.runtime import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LEAN = ("callbacks.samples=null", "callbacks.toy_adherence=null", "callbacks.export=null")


def _steps(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("*.ckpt"))


# ---------------------------------------------------------------------------- configs that fail late


@pytest.mark.parametrize(
    "overrides, key",
    [
        # text_encoder=none: nothing can encode the sample prompts; before, this failed at the first sample step
        (
            (
                "text_encoder=none",
                "text_dim=64",
                "data.text_cache_dir=/nonexistent",
                "callbacks.toy_adherence=null",
                "callbacks.samples.every_n_steps=5000",
            ),
            "callbacks.samples",
        ),
        (
            ("text_encoder=none", "text_dim=64", "data.text_cache_dir=/nonexistent", "callbacks.samples=null"),
            "callbacks.toy_adherence",
        ),
        (("text_encoder=none", "text_dim=64", *LEAN), "data.text_cache_dir"),
        # sizes the UNet's 2 downsamplers cannot halve twice (the stock diffusers UNet resizes its skips silently)
        (("model=unet3d_tiny", "stage.height=18", *LEAN), "stage.height/stage.width"),
        (("stage.width=30", *LEAN), "stage.height/stage.width"),
        # data delivering another size than the stage samples at
        (("data.height=32", *LEAN), "data.height"),
        (("data.num_frames=4", *LEAN), "data.num_frames"),
        # sampling values that were silently replaced or accepted
        (("stage.sampling.num_steps=0", *LEAN), "stage.sampling.num_steps"),
        (("stage.sampling.guidance_scale=0", *LEAN), "stage.sampling.guidance_scale"),
        (("stage.sampling.guidance_scale=-2.0", *LEAN), "stage.sampling.guidance_scale"),
        (("callbacks.samples.num_steps=0", "callbacks.toy_adherence=null"), "callbacks.samples.num_steps"),
        (
            ("+callbacks.toy_adherence.guidance_scale=0", "callbacks.samples=null"),
            "callbacks.toy_adherence.guidance_scale",
        ),
        (("experiment=toy_latent_sr", "vae@stage.vae=tiny", "stage.strength=1.5"), "stage.strength"),
        (
            ("experiment=toy_latent_sr", "vae@stage.vae=tiny", "stage.strength=0.01", "stage.sampling.num_steps=20"),
            "stage.strength",
        ),
        # 16x24 pixels are whole latents of the f=8 VAE (2x3) but the UNet cannot halve 2x3 twice
        (("experiment=toy_latent_sr", "vae@stage.vae=tiny", "stage.train_crop=[16,24]"), "stage.train_crop"),
    ],
)
def test_late_failing_configs_fail_at_start_naming_the_key(compose_train, tmp_path, overrides, key):
    latent = "experiment=toy_latent_sr" in overrides  # its experiment has no sample callback for TINY_TRAIN to tune
    cfg = compose_train(tmp_path, *overrides, "trainer.max_steps=2", tiny=not latent)
    with pytest.raises(ConfigError, match=f"config error at '{key}'"):
        train.train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before any training step


def test_num_steps_zero_is_refused_not_replaced_by_the_default(compose_train, tmp_path):
    cfg = compose_train(tmp_path)
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all").eval()
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        stage.generate(["a red circle moving left"], [0], num_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be > 0"):
        stage.generate(["a red circle moving left"], [0], num_steps=1, guidance_scale=0.0)
    with pytest.raises(ValueError, match="guidance_scale must be > 0"):
        stage.generate(["a red circle moving left"], [0], num_steps=1, guidance_scale=-3.0)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        stage.generate(
            ["a red circle moving left"], [0], num_steps=1, strength=1.5, init=torch.zeros(1, *stage.sample_shape())
        )
    with pytest.raises(ValueError, match="leaves no denoising step"):
        stage.generate(
            ["a red circle moving left"], [0], num_steps=4, strength=0.2, init=torch.zeros(1, *stage.sample_shape())
        )
    assert stage.generate(["a red circle moving left"], [0], num_steps=1).shape[0] == 1  # 1 step still runs


# ---------------------------------------------------------------------------- cascade built with checks


@pytest.fixture(scope="module")
def small_stages(toy_data_dir, tmp_path_factory):
    from conftest import compose_config

    out = tmp_path_factory.mktemp("cascade_checks")

    def build(experiment: str, *overrides: str):
        cfg = compose_config(toy_data_dir, out, f"experiment={experiment}", *overrides, tiny=False)
        torch.manual_seed(0)
        return hydra.utils.instantiate(cfg.stage, _convert_="all").eval()

    return {
        "keyframe": build("toy", "stage.height=20", "stage.width=32"),  # the interpolation stage's size
        "keyframe_small": build("toy", "stage.height=8", "stage.width=16"),  # another size
        "keyframe_one": build("toy", "stage.num_frames=1", "stage.height=20", "stage.width=32"),
        "interpolation": build("toy_interpolation", "stage.height=20", "stage.width=32"),
    }


def test_cascade_checks_stage_to_stage_sizes_when_built(small_stages, caplog):
    from show1_lightning.pipelines.cascade import Show1Cascade

    kf, interp = small_stages["keyframe"], small_stages["interpolation"]
    cascade = Show1Cascade(kf, interp, device="cpu")
    assert cascade.size_notes == []
    # Keyframes at another size than interpolation was trained at: reported (in the notes that go into
    # evaluation reports), and refused with strict_sizes.
    loose = Show1Cascade(small_stages["keyframe_small"], interp, device="cpu")
    assert len(loose.size_notes) == 1
    assert "trained on 20x32" in loose.size_notes[0] and "gets 8x16" in loose.size_notes[0]
    with pytest.raises(ValueError, match=r"interpolation was trained on 20x32 .* gets 8x16 .*strict_sizes"):
        Show1Cascade(small_stages["keyframe_small"], interp, device="cpu", strict_sizes=True)
    # What cannot run at all is refused at once, before minutes of keyframe sampling.
    with pytest.raises(ValueError, match="interpolation needs at least 2 keyframes"):
        Show1Cascade(small_stages["keyframe_one"], interp, device="cpu")
    with pytest.raises(ValueError, match=r"sampling\.keyframe: num_steps must be a positive integer, got 0"):
        Show1Cascade(kf, interp, device="cpu", sampling={"keyframe": {"num_steps": 0}})
    with pytest.raises(ValueError, match=r"sampling\.interpolation: guidance_scale must be > 0"):
        Show1Cascade(kf, interp, device="cpu", sampling={"interpolation": {"guidance_scale": 0.0}})


# ---------------------------------------------------------------------------- one run folder per multi-node job


NAME_SCRIPT = """
import os, sys, time
time.sleep(1.5 * int(os.environ["GROUP_RANK"]))  # node 1 reaches config resolution later, as real nodes do
from omegaconf import OmegaConf
from show1_lightning.runtime import register_resolvers
register_resolvers()
name = OmegaConf.create({{"run_name": "${{run_name_default:toy}}"}}).run_name
open(os.path.join(sys.argv[1], "node%s.txt" % os.environ["GROUP_RANK"]), "w").write(name)
"""


def test_multinode_torchrun_without_run_name_gives_one_run_folder(tmp_path):
    import socket

    script = tmp_path / "name.py"
    script.write_text(NAME_SCRIPT.format(root=str(ROOT)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]
    nodes = [
        subprocess.Popen(
            [*torchrun, "--node-rank", str(r), str(script), str(tmp_path)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [n.communicate(timeout=180)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs
    names = {(tmp_path / f"node{r}.txt").read_text() for r in (0, 1)}
    assert len(names) == 1, names  # both nodes: logs/train/runs/<this name>
    assert names.pop().startswith("toy_")


# ---------------------------------------------------------------------------- cluster life


class SignalAt(L.Callback):
    """Sends ``signum`` to this process at the end of training step ``step`` (SLURM's warning before the limit)."""

    def __init__(self, step: int, signum: str = "SIGUSR2") -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def _requeue_cfg(compose_train, tmp_path, *extra):
    return compose_train(
        tmp_path,
        *LEAN,
        "trainer.max_steps=12",
        "data.epoch_length=20",
        "trainer.val_check_interval=1000",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        "+callbacks.signal_at._target_=test_run_safety.SignalAt",
        "+callbacks.signal_at.step=3",
        *extra,
    )


def test_submitit_requeue_signal_saves_last_checkpoint_before_submitit_exits(compose_train, tmp_path, monkeypatch):
    """hydra-submitit-launcher: submitit's USR2 handler requeues and exits at once. The checkpoint of the step the
    signal arrived in must be on disk before it runs."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    last = tmp_path / "checkpoints" / "last.ckpt"
    seen: list = []

    def submitit_handler(signum, frame):  # what submitit's checkpoint_and_try_requeue does on rank 0
        seen.append(torch.load(last, weights_only=False)["global_step"] if last.exists() else None)
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            train.train(_requeue_cfg(compose_train, tmp_path))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert len(seen) == 1 and seen[0] in (3, 4), seen  # the step of the signal (or the one after), not "nothing"


def test_plain_slurm_requeue_saves_stops_requeues_and_resumes(compose_train, tmp_path, monkeypatch):
    """No submitit: the callback saves last.ckpt, stops the fit, runs `scontrol requeue`; the requeued job resumes."""
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        train.train(_requeue_cfg(compose_train, tmp_path, "+callbacks.signal_at.signum=SIGUSR1"))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls.read_text().split() == ["requeue", "4243"]
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert step in (3, 4)
    # The requeued job: same command, same run folder; resumes from that step and finishes.
    train.train(
        compose_train(
            tmp_path,
            *LEAN,
            "trainer.max_steps=12",
            "data.epoch_length=20",
            "trainer.val_check_interval=1000",
            "callbacks.model_checkpoint.every_n_train_steps=6",
        )
    )
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 12
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("step_*"))] == [
        "step_0000006.ckpt",
        "step_0000012.ckpt",
    ]


@pytest.mark.parametrize(
    "keep_last, expected",
    [
        (2, ["last.ckpt", "step_0000003.ckpt", "step_0000004.ckpt"]),
        ("null", ["last.ckpt", "step_0000001.ckpt", "step_0000002.ckpt", "step_0000003.ckpt", "step_0000004.ckpt"]),
    ],
)
def test_keep_last_periodic_checkpoints(compose_train, tmp_path, keep_last, expected):
    train.train(
        compose_train(
            tmp_path,
            *LEAN,
            "trainer.max_steps=4",
            "data.epoch_length=4",
            f"callbacks.model_checkpoint.keep_last={keep_last}",
        )
    )
    assert _steps(tmp_path / "checkpoints") == expected


def test_default_keeps_more_than_one_periodic_checkpoint(compose_train, tmp_path):
    train.train(compose_train(tmp_path, *LEAN, "trainer.max_steps=4", "data.epoch_length=4"))
    assert _steps(tmp_path / "checkpoints") == [
        "last.ckpt",
        "step_0000001.ckpt",
        "step_0000002.ckpt",
        "step_0000003.ckpt",
        "step_0000004.ckpt",
    ]


def _wandb_runs(out: Path) -> list[str]:
    """The run id of every offline wandb run folder (``offline-run-<time>-<id>``), one entry per process."""
    return sorted(p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*"))


def test_fresh_start_gets_a_fresh_wandb_run_resume_continues_it(compose_train, tmp_path):
    wandb_args = ("logger=wandb", *LEAN)
    record = tmp_path / "wandb_run_id.txt"
    train.train(compose_train(tmp_path, *wandb_args))
    first = record.read_text().strip()
    assert _wandb_runs(tmp_path) == [first]
    # Same run_name (same folder), auto_resume=false: training starts again at step 0, so the wandb run is new.
    train.train(compose_train(tmp_path, *wandb_args, "auto_resume=false"))
    second = record.read_text().strip()
    assert second != first and sorted(_wandb_runs(tmp_path)) == sorted([first, second])
    # Resuming the newest checkpoint continues the newest wandb run (its steps go on from 2).
    train.train(compose_train(tmp_path, *wandb_args, "trainer.max_steps=4"))
    assert record.read_text().strip() == second and _wandb_runs(tmp_path).count(second) == 2
    # An explicit older checkpoint of the same run: its steps would go back in that wandb run, so a new one.
    train.train(
        compose_train(
            tmp_path, *wandb_args, "trainer.max_steps=3", f"ckpt_path={tmp_path / 'checkpoints' / 'step_0000001.ckpt'}"
        )
    )
    fourth = record.read_text().strip()
    assert fourth not in (first, second) and fourth in _wandb_runs(tmp_path)


@pytest.mark.slow  # whole train.py / DDP processes (tens of seconds): run with -m slow
def test_multirun_job_keeps_the_sweep_folder_its_launcher_made(tmp_path):
    """hydra-submitit-launcher runs each job in another process (another node, again after a requeue); the sweep
    folder name ends in the launcher's pid. The job must write into the folder the launcher made and printed,
    else a requeued job starts in a new folder and never finds its last.ckpt."""
    from conftest import TINY_TRAIN

    cli = [a for a in TINY_TRAIN if not a.startswith("logger=")] + [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=csv",
        *LEAN,
        "hydra/launcher=submitit_local",
        f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}",
        "hydra.launcher.timeout_min=10",
    ]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "train.py", "-m", *cli], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweeps = list((tmp_path / "logs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps  # one folder: the launcher's, not one per process
    assert (sweeps[0] / "0" / "checkpoints" / "last.ckpt").is_file()


# ---------------------------------------------------------------------------- partial files


class _Killed(BaseException):
    pass


def test_a_kill_during_export_leaves_the_previous_export(compose_train, tmp_path, monkeypatch):
    from show1_lightning.callbacks.export import export_stage
    from show1_lightning.pipelines.cascade import load_stage

    cfg = compose_train(tmp_path)
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    stage.stage_config = OmegaConf.to_container(cfg.stage, resolve=True)
    out = tmp_path / "export"
    export_stage(stage, out, use_ema=False)
    before = {k: v.clone() for k, v in load_stage(out).unet.state_dict().items()}
    with torch.no_grad():
        for p in stage.unet.parameters():
            p.add_(1.0)
    # Killed after the new UNet weights were written, before the scheduler and stage.json.
    monkeypatch.setattr(
        type(stage.noise_scheduler), "save_pretrained", lambda self, *a, **k: (_ for _ in ()).throw(_Killed())
    )
    with pytest.raises(_Killed):
        export_stage(stage, out, use_ema=False)
    monkeypatch.undo()
    after = load_stage(out).unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the previous export, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export")) == []
    # A finished export replaces the previous one (the atomic swap, and the rename-aside fallback).
    export_stage(stage, out, use_ema=False)
    name = next(n for n, _ in stage.unet.named_parameters())
    assert torch.equal(load_stage(out).unet.state_dict()[name], before[name] + 1.0)
    import show1_lightning.fileio as fileio

    monkeypatch.setattr(fileio, "_rename_exchange", lambda a, b: False)
    export_stage(stage, out, use_ema=False)
    assert (out / "stage.json").is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
