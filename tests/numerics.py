"""Scale-aware float comparisons for the tests (importable as ``numerics``: tests/ is on sys.path).

Why relative to the magnitude: float32 kernels are blocked differently on different CPU kinds (AVX-512/AMX vs
AVX2 vs the generic path) and for different batch shapes, so the same arithmetic in another order rounds
differently. The error of a sum is bounded by ~n * eps * sum|terms|, i.e. it scales with the magnitude of the
values, not with an absolute constant: an untrained UNet sampled with DPM-Solver++ gives values of order 1e4
(the x0 estimate divides by a tiny alpha at t ~ T), where a fixed ``atol=1e-5`` asks for 10 significant digits.

The tolerances the tests use, relative to ``max|expected|``:

- ``REORDER = 1e-4`` for the same maths through differently blocked kernels or code paths (batch of 1 vs 2,
  chunked vs whole, a reloaded model): float32 eps is 1.2e-7 and a deep network with a sampler compounds a few
  hundred roundings, leaving two orders of magnitude of headroom while a real bug (wrong frame, wrong seed,
  wrong weight) changes the output by O(1) of its scale.
- ``DIFFERENT = 1e-2`` as the floor below which two outputs count as "the same" for assertions that two things
  must differ (another seed, another noise level).
"""

from __future__ import annotations

import numpy as np
import torch

REORDER = 1e-4
DIFFERENT = 1e-2


def _as_tensor(x: torch.Tensor | np.ndarray | float) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def max_rel_diff(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    """max|actual - expected| / max|expected| (the scale floored at 1e-30 so an all-zero reference works)."""
    a, e = _as_tensor(actual), _as_tensor(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {tuple(a.shape)} vs {tuple(e.shape)}")
    scale = float(e.abs().max()) if e.numel() else 0.0
    return float((a - e).abs().max()) / max(scale, 1e-30) if e.numel() else 0.0


def assert_close_rel(
    actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, rel: float = REORDER, msg: str = ""
) -> None:
    """Assert max|actual - expected| <= rel * max|expected| (see the module docstring for the choice of rel)."""
    d = max_rel_diff(actual, expected)
    assert d <= rel, f"{msg + ': ' if msg else ''}max abs diff is {d:.3g} of the reference's scale (allowed {rel:g})"


def assert_differ_rel(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, rel: float = DIFFERENT, msg: str = ""
) -> None:
    """Assert the two differ by more than ``rel`` of ``b``'s scale (rounding noise can never pass for a change)."""
    d = max_rel_diff(a, b)
    assert d > rel, f"{msg + ': ' if msg else ''}expected a real difference, got {d:.3g} of the scale"
