"""Where this process sits in a multi-process job, read once from the launcher's environment variables.

One home for the rule both training data sharding (``data.datamodule.resolve_rank``) and the evaluation's process
group (``evaluation.distributed.init_distributed``) use: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` first,
then (only where asked) SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` for multi-task ``srun`` jobs.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["LauncherRanks", "env_int", "launcher_ranks"]


class LauncherRanks(NamedTuple):
    """Rank, world size and local rank (GPU index on the node) of this process."""

    rank: int
    world_size: int
    local_rank: int
    source: str  # "torchrun" or "slurm"


def env_int(name: str) -> int | None:
    """An integer environment variable; None when unset or empty."""
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def launcher_ranks(slurm: bool = True) -> LauncherRanks | None:
    """The ranks torchrun (``WORLD_SIZE`` set) or, with ``slurm``, a multi-task SLURM step describes; None when
    neither does (a single process). SLURM is opt-in because a single process started inside a multi-task
    allocation (``salloc -n 4`` then ``python ...``) inherits ``SLURM_NTASKS`` without being one of its tasks:
    code that can ask an initialised process group instead should do that first."""
    world = env_int("WORLD_SIZE")
    if world is not None:
        return LauncherRanks(env_int("RANK") or 0, world, env_int("LOCAL_RANK") or 0, "torchrun")
    if slurm and (env_int("SLURM_NTASKS") or 1) > 1:
        return LauncherRanks(
            env_int("SLURM_PROCID") or 0, env_int("SLURM_NTASKS") or 1, env_int("SLURM_LOCALID") or 0, "slurm"
        )
    return None
