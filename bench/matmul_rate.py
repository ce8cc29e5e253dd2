"""The machine's delivered dense rate: the ceiling the benchmarks divide their achieved FLOP/s by."""

from __future__ import annotations

import time

import torch


def matmul_gflops(
    n: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> float:
    """Best rate (GFLOP/s) of an n x n x n matrix product over ``repeats`` timed calls, after one warm-up, at the
    current thread count (CUDA: synchronised around each call)."""
    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
