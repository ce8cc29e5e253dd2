"""Light worker for the 2-process FVD-repeats test (spawned processes import only this and its metric)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from evaluation.fvd import FVD
from evaluation.protocols import extra_values


def repeats_fvd(rank: int, world: int) -> list[float]:
    """FVD (mean over 3 generated sets) and each set's FVD, with rank's share of fixed features."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 6, generator=g, dtype=torch.float64)
    fake = torch.randn(60, 6, generator=g, dtype=torch.float64) + 0.3
    fvd = FVD(feature_extractor=nn.Identity(), num_features=6, num_generated=20, repeats=3)
    fvd.features = lambda v: v.to(torch.float64)  # the "videos" are the features
    fvd.add_features(real[rank::world], real=True)
    idx = torch.arange(60)[rank::world]
    fvd.update(fake[idx], real=False, indices=idx)
    return [float(fvd.compute()), *extra_values({"fvd": fvd})["fvd_repeats"]]


def worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        Path(f"{out}.{rank}").write_text(json.dumps(repeats_fvd(rank, world)))
    finally:
        torch.distributed.destroy_process_group()
