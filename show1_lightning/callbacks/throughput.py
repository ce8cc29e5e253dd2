"""Training throughput in clips per second (all ranks together)."""

from __future__ import annotations

import time

import lightning as L


class ClipThroughput(L.Callback):
    """Logs ``train/clips_per_sec``: clips of the global batch per second of wall time between steps."""

    def __init__(self, log_every_n_steps: int = 10) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._t0: float | None = None
        self._clips = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._clips += batch["video"].shape[0] * trainer.world_size
        if trainer.global_step % self.log_every_n_steps == 0 and self._t0 is not None:
            dt = time.perf_counter() - self._t0
            if dt > 0:
                pl_module.log(
                    "train/clips_per_sec", self._clips / dt, on_step=True, on_epoch=False, rank_zero_only=True
                )
            self._t0, self._clips = time.perf_counter(), 0
