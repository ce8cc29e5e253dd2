"""What the Hydra entry points share: config resolvers, start-up validation, run naming, resume,
building loggers and callbacks, and the task wrapper that keeps a multirun alive."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from show1_lightning.diffusion.objectives import PREDICTION_TYPES, timestep_range
from show1_lightning.precision import LIGHTNING_PRECISIONS

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _agreed_launch_time(prefix: str, timeout_s: float = 120.0) -> str | None:
    """Under multi-node torchrun with static rendezvous (``--master-addr/--master-port``, no ``--rdzv-id``:
    ``TORCHELASTIC_RUN_ID`` is "none") every node would name the run by its own clock, and each node would
    write its own run folder. The first process to ask stores its launch time in the agents' store at
    ``MASTER_ADDR:MASTER_PORT`` (the store torchrun's workers join), every other process reads it; restarts
    within the same torchrun invocation get the same name (and resume). None when there is no such store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    import datetime

    from torch.distributed import TCPStore

    try:
        store = TCPStore(
            addr, int(port), is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        mine = time.strftime("%Y-%m-%d_%H-%M-%S")
        agreed = store.compare_set(f"show1/run_name_default/{prefix}", "", mine)
    except Exception as e:  # the names would differ per node: refuse rather than split the run
        raise ConfigError(
            f"config error at 'run_name': multi-node torchrun without a rendezvous id; could not agree on a run "
            f"name through the store at {addr}:{port} ({e}). Set run_name=... (the same on every node) or pass "
            "torchrun --rdzv-id"
        ) from e
    return agreed.decode() if isinstance(agreed, bytes) else str(agreed)


def _run_name_default(prefix: str) -> str:
    """``<prefix>_<id>``: the id is the scheduler's job id when there is one (every rank of a torchrun
    or SLURM job then agrees on it); under multi-node torchrun without one, the launch time agreed through
    torchrun's store (:func:`_agreed_launch_time`); else the launch time."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if job and job != "none":
        return f"{prefix}_{job}"
    agreed = _agreed_launch_time(prefix)
    if agreed:
        return f"{prefix}_{agreed}"
    return f"{prefix}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"


# Evaluated once per config and remembered in it: Hydra copies a config's resolver cache into the jobs a
# launcher starts elsewhere (hydra-submitit-launcher: another process, another node, again after a requeue),
# so the sweep folder (``..._${pid:}``) and the run name stay those the launcher created and printed.
CACHED_RESOLVERS = ("run_name_default", "pid")


def register_resolvers() -> None:
    """OmegaConf resolvers used by conf/: run_name_default, stable_id, project_root, pid."""
    resolvers: dict[str, Callable[..., Any]] = {
        "run_name_default": _run_name_default,
        "stable_id": lambda s: hashlib.sha1(str(s).encode()).hexdigest()[:16],
        "project_root": lambda: str(PROJECT_ROOT),
        "pid": lambda: str(os.getpid()),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=(name in CACHED_RESOLVERS))


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config error at '{key}': {msg}")


def validate_train_config(cfg: DictConfig) -> None:
    """Fail at start-up, naming the key, on values that would fail (or silently misbehave) later."""
    st, data, tr = cfg.stage, cfg.data, cfg.trainer
    for key in ("num_frames", "height", "width"):
        if key in st:
            _check(int(st[key]) > 0, f"stage.{key}", f"must be positive, got {st[key]}")
    _check(
        0.0 <= float(st.caption_dropout) <= 1.0,
        "stage.caption_dropout",
        f"must be in [0, 1], got {st.caption_dropout}",
    )
    ns = st.noise_scheduler
    _check(
        ns.prediction_type in PREDICTION_TYPES,
        "stage.noise_scheduler.prediction_type",
        f"must be one of {PREDICTION_TYPES}, got {ns.prediction_type!r}",
    )
    # The stage constructor runs the same check; here it fails before the models are built, naming the keys.
    try:
        timestep_range(int(st.t_min), st.t_max, int(ns.num_train_timesteps))
    except ValueError as exc:
        raise ConfigError(f"config error at 'stage.t_min/t_max': {exc}") from exc
    _check(float(st.optimizer.lr) > 0, "stage.optimizer.lr", f"must be positive, got {st.optimizer.lr}")
    _check(int(data.batch_size) > 0, "data.batch_size", f"must be positive, got {data.batch_size}")
    _check(int(data.num_workers) >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    _check(int(data.epoch_length) > 0, "data.epoch_length", f"must be positive, got {data.epoch_length}")
    if data.get("target_fps") is not None:
        _check(float(data.target_fps) > 0, "data.target_fps", f"must be positive or null, got {data.target_fps}")
    _check(int(tr.max_steps) != 0, "trainer.max_steps", "must be positive (or -1 for unlimited)")
    vci = tr.get("val_check_interval")
    if isinstance(vci, int):
        _check(vci > 0, "trainer.val_check_interval", f"must be positive, got {vci}")
    prec = str(tr.precision)
    _check(
        prec in LIGHTNING_PRECISIONS,
        "trainer.precision",
        f"unknown precision {prec!r}",
    )
    if tr.get("accelerator") == "cpu":
        _check(prec != "16-mixed", "trainer.precision", "16-mixed needs a GPU; use bf16-mixed on CPU")
    _validate_sampling(cfg)
    _validate_data_sizes(cfg)
    _validate_sharded_callbacks(cfg)


# Callbacks that call the stage's generate() during fit (their _target_ class names).
SAMPLING_CALLBACKS = ("VideoSampleCallback", "ToyColorAdherence", "TrainingFVD")


def _sampling_callbacks(cfg: DictConfig) -> dict[str, DictConfig]:
    out = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and str(node.get("_target_", "")).rsplit(".", 1)[-1] in SAMPLING_CALLBACKS:
            out[str(name)] = node
    return out


def _validate_sharded_callbacks(cfg: DictConfig) -> None:
    """Under FSDP every forward is a collective of all ranks, so callbacks that sample on rank 0 only would hang
    the run at their first sample: refuse them at start-up, naming them."""
    strategy = (cfg.trainer.get("strategy") if isinstance(cfg.trainer.get("strategy"), DictConfig) else None) or {}
    if "fsdp" not in str(strategy.get("_target_", "")).lower():
        return
    sampling = sorted(_sampling_callbacks(cfg))
    _check(
        not sampling,
        "callbacks",
        f"{', '.join(sampling)} sample on rank 0 only, which hangs under FSDP (every sharded forward needs all "
        f"ranks): set {' '.join(f'callbacks.{n}=null' for n in sampling)} with trainer=fsdp",
    )


def _check_steps_guidance(num_steps: Any, guidance: Any, key: str) -> None:
    if num_steps is not None:
        _check(
            not isinstance(num_steps, bool) and isinstance(num_steps, int) and num_steps >= 1,
            f"{key}.num_steps",
            f"must be a positive integer (null: the stage's sampling.num_steps), got {num_steps!r}",
        )
    if guidance is not None:
        _check(
            not isinstance(guidance, bool) and isinstance(guidance, (int, float)) and guidance > 0,
            f"{key}.guidance_scale",
            f"must be > 0 (1 = no guidance), got {guidance!r}",
        )


def _validate_sampling(cfg: DictConfig) -> None:
    """Sampling settings that would fail (or be silently replaced) at the first sample step, thousands of
    steps in: num_steps >= 1, guidance > 0, strength in (0, 1], and a text encoder for callbacks that sample."""
    st = cfg.stage
    sampling = st.get("sampling") or {}
    _check_steps_guidance(sampling.get("num_steps"), sampling.get("guidance_scale"), "stage.sampling")
    if st.get("strength") is not None:
        strength = st.strength
        _check(
            isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0.0 < strength <= 1.0,
            "stage.strength",
            f"must be in (0, 1], got {strength!r}",
        )
        n = sampling.get("num_steps")
        if n is not None:
            _check(
                int(n * strength) >= 1,
                "stage.strength",
                f"strength {strength} x stage.sampling.num_steps {n} leaves no denoising step",
            )
    # Conditional stages refining their baseline (sampling.strength < 1): every step count must leave a step.
    s_strength = sampling.get("strength")
    if s_strength is not None:
        _check(
            isinstance(s_strength, (int, float)) and not isinstance(s_strength, bool) and 0.0 < s_strength <= 1.0,
            "stage.sampling.strength",
            f"must be in (0, 1], got {s_strength!r}",
        )
    callbacks = _sampling_callbacks(cfg)
    for name, node in callbacks.items():
        _check_steps_guidance(node.get("num_steps"), node.get("guidance_scale"), f"callbacks.{name}")
    if s_strength is not None:
        for key, n in [("stage.sampling", sampling.get("num_steps"))] + [
            (f"callbacks.{k}", v.get("num_steps")) for k, v in callbacks.items()
        ]:
            if n is not None:
                _check(
                    int(n * s_strength) >= 1,
                    f"{key}.num_steps",
                    f"{n} steps x stage.sampling.strength {s_strength} leaves no denoising step",
                )
    if cfg.get("text_encoder") is None:
        for name in callbacks:
            raise ConfigError(
                f"config error at 'callbacks.{name}': it samples from text prompts during training, but "
                "text_encoder=none has no encoder for them (it would fail at its first sample step). Set "
                f"callbacks.{name}=null or pick a text encoder (text_encoder=...)"
            )
        _check(
            bool(cfg.data.get("text_cache_dir")),
            "data.text_cache_dir",
            "text_encoder=none trains on cached text embeddings: set the cache folder written by "
            "data/precompute_text_embeddings.py",
        )


def _validate_data_sizes(cfg: DictConfig) -> None:
    """The clips the data delivers must be the size the stage trains and samples at."""
    st, data = cfg.stage, cfg.data
    for key in ("num_frames", "height", "width"):
        if key in st and key in data and data[key] is not None:
            _check(
                int(data[key]) == int(st[key]),
                f"data.{key}",
                f"{data[key]} disagrees with stage.{key}={st[key]}: the stage would train on clips of one size "
                f"and sample another (leave data.{key} at its default, ${{stage.{key}}})",
            )


def unet_size_multiple(unet: Any) -> int:
    """The factor height and width must be multiples of for the UNet: 2 ** (number of spatial downsamplers)."""
    blocks = getattr(unet, "down_blocks", None)
    if blocks is None:
        return 1
    n = sum(1 for b in blocks if getattr(b, "downsamplers", None))
    return 2**n


def validate_built_stage(stage: Any) -> None:
    """Checks that need the built stage: every size the UNet sees (samples, training crops) divisible by its
    downsampling (a Show-1 UNet raises at the first forward, diffusers' resizes its skips silently)."""
    multiple = unet_size_multiple(stage.unet)
    if multiple == 1:
        return
    shape = tuple(stage.sample_shape())
    h, w = shape[-2:]
    latent = getattr(stage, "latent_height", None) is not None
    what = f"latents {h}x{w} of stage.height/width {stage.height}x{stage.width}" if latent else f"{h}x{w}"
    _check(
        h % multiple == 0 and w % multiple == 0,
        "stage.height/stage.width",
        f"the UNet downsamples {multiple}x ({int(multiple).bit_length() - 1} downsamplers), so the sample size it "
        f"sees must be a multiple of {multiple}; got {what}",
    )
    crop = getattr(stage, "train_crop", None)
    if crop is not None:
        f = stage.vae.downsample_factor if latent else 1  # a latent stage crops output pixels: the UNet sees /f
        _check(
            crop[0] % (multiple * f) == 0 and crop[1] % (multiple * f) == 0,
            "stage.train_crop",
            f"the UNet downsamples {multiple}x; the training crop {list(crop)} must be a multiple of {multiple * f}"
            + (f" (latents: the VAE factor {f} x {multiple})" if latent else ""),
        )


def _own_latest_checkpoint(cfg: DictConfig) -> Path | None:
    """The run's newest resumable state: ``<output_dir>/checkpoints/last.ckpt`` or, if newer, an
    ``hpc_ckpt_*.ckpt`` written by Lightning's own SLURM requeue handler into ``<output_dir>``."""
    out = Path(cfg.paths.output_dir)
    found = [p for p in [out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def find_resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if set, else the run's newest ``last.ckpt`` (or Lightning
    ``hpc_ckpt_*.ckpt``) when one exists and ``auto_resume`` is on."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.exists():
            raise FileNotFoundError(f"ckpt_path={path} does not exist")
        return str(path)
    last = _own_latest_checkpoint(cfg)
    if cfg.get("auto_resume", True) and last is not None:
        return str(last)
    return None


WANDB_ID_FILE = "wandb_run_id.txt"


def _global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def wandb_run_id(cfg: DictConfig, ckpt_path: str | None) -> str:
    """The wandb run id of this start: the run's own id when it continues from its newest checkpoint (steps go
    on), a new one otherwise (a fresh start, ``auto_resume=false``, or an explicit older checkpoint), so one
    wandb run never sees its step go backwards. Recorded in ``<output_dir>/wandb_run_id.txt`` by global rank 0
    (runs started before that file existed used ``stable_id(output_dir)``)."""
    out = Path(cfg.paths.output_dir)
    base = hashlib.sha1(str(out).encode()).hexdigest()[:16]
    record = out / WANDB_ID_FILE
    latest = _own_latest_checkpoint(cfg)
    continuing = ckpt_path is not None and latest is not None and Path(ckpt_path).resolve() == latest.resolve()
    if continuing:
        run_id = record.read_text().strip() if record.is_file() else base
    else:
        run_id = base + uuid.uuid4().hex[:8]
    if _global_rank() == 0:
        from show1_lightning.fileio import atomic_write_text

        atomic_write_text(record, run_id + "\n")
    return run_id


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a group (callbacks, loggers); skip null entries."""
    out: list[Any] = []
    if not cfg:
        return out
    for name, node in cfg.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"config error at '{name}': expected a node with _target_, got {node!r}")
        out.append(hydra.utils.instantiate(node))
    return out


def hydra_multirun_info() -> tuple[bool, str | None, str | None]:
    """(is_multirun, sweep name, job label) of the running Hydra job; (False, None, None) outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:
        return False, None, None
    if hc.mode != RunMode.MULTIRUN:
        return False, None, None
    label = hc.job.override_dirname or str(hc.job.num)
    return True, Path(hc.sweep.dir).name, label


def finish_wandb() -> None:
    """Close the wandb run of this process, if any (two jobs must never log into one run)."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:  # wandb missing or already torn down
        pass


def task_wrapper(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Always finish wandb; in a multirun, log a failed job (and write ``error.txt`` in its dir) and let
    the sweep go on; in a single run re-raise so the exit code shows the failure."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> Any:
        multirun, _, _ = hydra_multirun_info()
        try:
            return fn(cfg)
        except Exception:
            tb = traceback.format_exc()
            log.error("job failed:\n%s", tb)
            if not multirun:
                raise
            try:
                out = Path(cfg.paths.output_dir)
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.txt").write_text(tb)
            except Exception:
                pass
            return None
        finally:
            finish_wandb()

    return wrapped


def set_in(cfg: DictConfig, key: str, value: Any) -> None:
    """Set a dotted key in a struct config."""
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)
