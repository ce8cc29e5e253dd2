"""Save a last checkpoint before SLURM stops the job, then requeue: one handler for the requeue signal.

SLURM warns a job ``signal_delay_s`` before its time limit (``#SBATCH --signal=USR2@120``, which
hydra-submitit-launcher writes; Lightning's docs use USR1). Two handlers compete for it:

- submitit's (installed before ``train.py`` runs, on USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise)
  requeues the job and exits at once, in the middle of whatever step is running: everything since the
  last periodic checkpoint is lost;
- Lightning's (``SLURMEnvironment(auto_requeue=True)``) listens on USR1 only, and is not installed at all
  when another handler already holds its signal (``_SignalConnector``), so under submitit it never runs;
  and it writes its checkpoint from inside the signal handler, which can happen mid-backward
  (Lightning-AI/pytorch-lightning#21406).

This callback takes both signals for the duration of fit. Its handler only raises a flag. At the next
training-batch end (a consistent point on every rank; the flag is max-reduced over ranks, so a signal seen by
any rank counts for all) every rank saves ``<checkpoints>/last.ckpt`` through ``trainer.save_checkpoint``, then
the requeue happens: the handler that held the signal before (submitit's: it re-pickles the job, runs
``scontrol requeue`` and exits; Lightning's: it requeues), or, with none, ``scontrol requeue $SLURM_JOB_ID``
run by global rank 0 followed by a graceful stop. The requeued job finds ``last.ckpt`` (the run folder is
stable, see ``runtime.CACHED_RESOLVERS``) and resumes.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


def _signal(name: str | int) -> signal.Signals:
    if isinstance(name, int):
        return signal.Signals(name)
    name = str(name).upper()
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")


class RequeueCheckpoint(L.Callback):
    """On a requeue signal: checkpoint at the next batch end on every rank, then requeue (see module docstring).

    Args:
        signals: signals to take over (default USR1 and USR2: Lightning's and submitit's).
        only_under_slurm: install the handlers only when ``SLURM_JOB_ID`` is set (elsewhere USR1/USR2 keep their
            default meaning).
        requeue_command: run by global rank 0 when no earlier handler does the requeue; ``{job_id}`` is
            ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID`` for array jobs, else ``SLURM_JOB_ID``.
        dirpath: where ``last.ckpt`` goes (None: the ModelCheckpoint callback's dirpath, else
            ``<default_root_dir>/checkpoints``).
    """

    def __init__(
        self,
        signals: Sequence[str | int] = ("SIGUSR1", "SIGUSR2"),
        only_under_slurm: bool = True,
        requeue_command: Sequence[str] = ("scontrol", "requeue", "{job_id}"),
        dirpath: str | None = None,
    ) -> None:
        self.signals = [_signal(s) for s in signals]
        self.only_under_slurm = only_under_slurm
        self.requeue_command = list(requeue_command)
        self.dirpath = dirpath
        self._previous: dict[signal.Signals, Any] = {}
        self._received: signal.Signals | None = None
        self._active = False
        self.saved_path: str | None = None

    # ------------------------------------------------------------------ handlers
    def _handler(self, signum: int, frame: Any) -> None:
        if not self._active:  # outside fit: behave as before
            self._call_previous(signal.Signals(signum), frame)
            return
        self._received = signal.Signals(signum)  # nothing else here: the work happens at the next batch end

    def _call_previous(self, sig: signal.Signals, frame: Any = None) -> bool:
        prev = self._previous.get(sig)
        if callable(prev) and prev is not self._handler:
            prev(int(sig), frame)
            return True
        return False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning's _SignalConnector registers its own (Trainer._run: setup hooks come first): finding
        # ours in place, Lightning leaves the requeue signal to us.
        if stage != "fit" or (self.only_under_slurm and not os.environ.get("SLURM_JOB_ID")):
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("RequeueCheckpoint: not in the main thread, cannot install signal handlers")
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        self._active = True
        self._received = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False  # a late signal goes to the earlier handler (see _handler)
        if threading.current_thread() is threading.main_thread():
            for sig, prev in self._previous.items():
                if signal.getsignal(sig) == self._handler and prev is not None:
                    signal.signal(sig, prev)

    # ------------------------------------------------------------------ the safe point
    def _any_rank_received(self, trainer: L.Trainer) -> int:
        flag = int(self._received) if self._received is not None else 0
        if trainer.world_size > 1:
            t = torch.tensor([flag], dtype=torch.long, device=trainer.strategy.root_device)
            t = trainer.strategy.reduce(t, reduce_op="max")
            flag = int(t.item())
        return flag

    @staticmethod
    def _model_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
        return next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)

    def _last_path(self, trainer: L.Trainer) -> Path:
        mc = self._model_checkpoint(trainer)
        if self.dirpath:
            d = Path(self.dirpath)
        else:
            d = Path(mc.dirpath) if mc is not None else Path(trainer.default_root_dir) / "checkpoints"
        return d / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        signum = self._any_rank_received(trainer)
        if not signum:
            return
        sig = signal.Signals(signum)
        path = self._last_path(trainer)
        log.warning(
            "received %s: saving %s at step %d before the job is requeued", sig.name, path, trainer.global_step
        )
        mc = self._model_checkpoint(trainer)
        if mc is not None and Path(mc.dirpath).resolve() == path.parent.resolve():
            # Recorded in the ModelCheckpoint state saved with it: the resumed run's callback knows last.ckpt as its
            # own and keeps overwriting it (instead of writing last-v1.ckpt beside a file it does not know).
            mc.last_model_path = str(path)
        trainer.save_checkpoint(str(path))  # every rank calls it (it synchronises); rank 0 writes
        self.saved_path = str(path)
        self._active = False
        for logger in trainer.loggers:
            logger.finalize("requeued")
        if self._call_previous(sig):  # submitit: requeue + exit on rank 0; other ranks return
            trainer.should_stop = True
            return
        if trainer.is_global_zero:
            self._requeue()
        trainer.should_stop = True

    def _requeue(self) -> None:
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")
        if not re.fullmatch(r"[0-9_]+", job_id or ""):
            log.error("cannot requeue: no valid SLURM job id (%r)", job_id)
            return
        cmd = [part.format(job_id=job_id) for part in self.requeue_command]
        try:
            result = subprocess.run(cmd, check=False).returncode
        except FileNotFoundError:
            log.error("cannot requeue: %s not found", cmd[0])
            return
        if result == 0:
            log.warning("requeued SLURM job %s", job_id)
        else:
            log.error("requeueing SLURM job %s failed (exit code %d)", job_id, result)
