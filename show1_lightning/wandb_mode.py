"""The one switch that takes wandb online, for every entry point: wandb's own ``WANDB_MODE`` environment variable.

``train.py``, ``generate.py`` and ``evaluate.py`` log offline (no account or network needed; ``wandb sync`` uploads
later) unless ``WANDB_MODE`` is set: ``WANDB_MODE=online python train.py``, ``WANDB_MODE=disabled`` for no wandb
files at all. No config key overrides it (Lightning's ``WandbLogger(offline=True)`` would rewrite the variable, so
``conf/logger/wandb.yaml`` leaves ``offline`` unset).
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_WANDB_MODE", "wandb_mode"]

DEFAULT_WANDB_MODE = "offline"


def wandb_mode() -> str:
    """The wandb mode of this process: ``WANDB_MODE`` when set, else :data:`DEFAULT_WANDB_MODE`, which is then put
    in the environment so that ``wandb.init``, Lightning's ``WandbLogger`` and child processes (DDP ranks, Hydra
    jobs) all run in the same mode."""
    return os.environ.setdefault("WANDB_MODE", DEFAULT_WANDB_MODE)
