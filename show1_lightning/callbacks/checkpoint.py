"""Periodic checkpoints that keep the newest ``keep_last`` instead of only one.

Lightning's ``ModelCheckpoint(save_top_k=1, monitor=None)`` keeps a single periodic checkpoint: each save
deletes the one before, so a diverged or corrupted latest state leaves nothing to go back to (and ``save_top_k
> 1`` needs a monitored metric). ``PeriodicCheckpoint(keep_last=N)`` monitors the global step (always among
ModelCheckpoint's candidates) in ``max`` mode: the N newest periodic checkpoints stay, older ones go.
``keep_last: null`` keeps every one. ``last.ckpt`` (``save_last``) is kept as before, and always overwritten
(no ``last-v1.ckpt``: the file a re-run resumes from must be the newest state), and written once more when
training ends after the last periodic save (``trainer.max_time``, ``max_steps`` off the save interval): Lightning
only writes it at the end when no ``last.ckpt`` was saved at all, so a run stopped by its time budget at step 582
resumed from its step-450 save.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for periodic saves (``every_n_train_steps`` ...) keeping the newest ``keep_last``.

    Args:
        keep_last: how many periodic checkpoints to keep (None: all of them).
        **kwargs: ``ModelCheckpoint`` arguments except ``monitor``, ``mode`` and ``save_top_k`` (set from keep_last).
    """

    def __init__(self, keep_last: int | None = 5, **kwargs: Any) -> None:
        taken = sorted(k for k in ("monitor", "mode", "save_top_k") if kwargs.get(k) is not None)
        if taken:
            raise ValueError(
                f"PeriodicCheckpoint sets {taken} from keep_last; remove them from the config "
                "(or use lightning's ModelCheckpoint to monitor a metric)"
            )
        for k in ("monitor", "mode", "save_top_k"):
            kwargs.pop(k, None)
        # last.ckpt is what a re-run resumes from: always overwrite it, never write last-v1.ckpt beside it (Lightning
        # versions a file its callback state does not know, e.g. after auto_resume=false in the same folder).
        kwargs.setdefault("enable_version_counter", False)
        if keep_last is None:
            super().__init__(monitor=None, save_top_k=-1, **kwargs)
        else:
            if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
                raise ValueError(f"keep_last must be a positive integer or null (keep all), got {keep_last!r}")
            super().__init__(monitor="step", mode="max", save_top_k=keep_last, **kwargs)
        self.keep_last = keep_last

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``last.ckpt`` holds the final step, however training stopped (Lightning's own hook skips that when an
        earlier ``last.ckpt`` exists)."""
        super().on_train_end(trainer, pl_module)
        if self.save_last and trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
