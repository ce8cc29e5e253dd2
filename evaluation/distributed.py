"""Distributed plumbing of the evaluation: where a process sits in the job, the process group, sample sharding.

Processes are started by torchrun or srun; :func:`init_distributed` reads their environment variables, joins the
process group and arms a :class:`evaluation.dist_guard.RankGuard` so a rank that fails stops every rank.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from evaluation.dist_guard import RankGuard
from show1_lightning.ranks import launcher_ranks

SEEDS_RULE = "seed(i) = base_seed + i for global sample index i; rank r of W takes i = r, r+W, ..."


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    guard: RankGuard | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Rank-local work ending in a sync point; a rank that raises in it stops every rank (``dist_guard``)."""
        return self.guard.phase(name) if self.guard is not None else contextlib.nullcontext()

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()


def init_distributed(
    device: str = "auto",
    backend: str | None = None,
    timeout_s: float | None = None,
    peer_timeout_s: float = 300.0,
    sync_timeout_s: float | None = None,
) -> DistContext:
    """Join the process group described by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM
    (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR must be exported) environment variables.

    One process: no process group. Backend: nccl on GPU, gloo on CPU (unless given). ``timeout_s``: the
    process group's collective timeout (None: torch's default); ``peer_timeout_s`` / ``sync_timeout_s``: see
    :class:`evaluation.dist_guard.RankGuard` (every collective of the runner follows one of its sync points).
    """
    ranks = launcher_ranks(slurm=True)
    world, rank, local = (ranks.world_size, ranks.rank, ranks.local_rank) if ranks is not None else (1, 0, 0)
    if ranks is not None and ranks.source == "slurm":
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "SLURM multi-task evaluation needs MASTER_ADDR, e.g. "
                "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)"
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    if device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        kwargs = {} if timeout_s is None else {"timeout": _dt.timedelta(seconds=float(timeout_s))}
        dist.init_process_group(
            backend=backend or ("nccl" if dev.type == "cuda" else "gloo"), rank=rank, world_size=world, **kwargs
        )
        ctx.initialized_here = True
    elif world > 1:
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    if ctx.world_size > 1:
        from torch.distributed.distributed_c10d import _get_default_store

        ctx.guard = RankGuard(
            _get_default_store(),
            ctx.rank,
            ctx.world_size,
            peer_timeout_s=peer_timeout_s,
            sync_timeout_s=sync_timeout_s,
        )
    return ctx


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Global indices owned by ``rank``: ``rank, rank + world_size, ...`` (no padding)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(range(rank, num_samples, world_size))


def sample_seed(base_seed: int, index: int) -> int:
    """Seed of global sample ``index`` (independent of the number of processes)."""
    return int(base_seed) + int(index)


def all_true(ctx: DistContext, flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (collective)."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.long, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def broadcast_bool(ctx: DistContext, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (collective)."""
    if ctx.world_size == 1:
        return flag
    obj = [flag]
    dist.broadcast_object_list(obj, src=0)
    return bool(obj[0])
