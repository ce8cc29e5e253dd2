"""What the Hydra entry points share: config resolvers, start-up validation, run naming, resume,
building loggers and callbacks, and the task wrapper that keeps a multirun alive."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _run_name_default(prefix: str) -> str:
    """``<prefix>_<id>``: the id is the scheduler's job id when there is one (every rank of a torchrun
    or SLURM job then agrees on it), else the launch time."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if job and job != "none":
        return f"{prefix}_{job}"
    return f"{prefix}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"


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
            # run_name_default must be evaluated once per process, not on every access.
            OmegaConf.register_new_resolver(name, fn, use_cache=(name == "run_name_default"))


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
    _check(0.0 <= float(st.caption_dropout) <= 1.0, "stage.caption_dropout",
           f"must be in [0, 1], got {st.caption_dropout}")
    ns = st.noise_scheduler
    _check(ns.prediction_type in ("epsilon", "v_prediction"), "stage.noise_scheduler.prediction_type",
           f"must be 'epsilon' or 'v_prediction', got {ns.prediction_type!r}")
    n = int(ns.num_train_timesteps)
    t_max = n - 1 if st.t_max is None else int(st.t_max)
    _check(0 <= int(st.t_min) <= t_max < n, "stage.t_min/t_max",
           f"need 0 <= t_min <= t_max < {n}, got t_min={st.t_min}, t_max={st.t_max}")
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
    _check(prec in {"32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"},
           "trainer.precision", f"unknown precision {prec!r}")
    if tr.get("accelerator") == "cpu":
        _check(prec != "16-mixed", "trainer.precision", "16-mixed needs a GPU; use bf16-mixed on CPU")


def find_resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if set, else ``<output_dir>/checkpoints/last.ckpt``
    when it exists and ``auto_resume`` is on."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.exists():
            raise FileNotFoundError(f"ckpt_path={path} does not exist")
        return str(path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.get("auto_resume", True) and last.exists():
        return str(last)
    return None


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
