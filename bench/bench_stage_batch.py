"""Clips per stage call: one stage run on held-out toy clips at several call sizes, side by side in one run.

    python bench/bench_stage_batch.py --stages-dir logs/toy_loop/train [--stages interpolation,pixel_sr,latent_sr]
                                      [--clips 8] [--batches 8,4,2,1] [--rounds 2] [--threads 2]

Each stage (a conditional toy stage's ``last.ckpt`` under ``--stages-dir``) runs on ``--clips`` held-out clips at its
output size (``stage.make_upstream`` of the clip, as the toy loop's stage checks do), ``--batches`` clips per call,
the call sizes alternated ``--rounds`` times (best time kept, so a drifting machine slows all alike). Prints seconds
per clip per call size, the speed-up over the largest call and the max abs difference of the outputs from the
largest call's (every clip has its own seed, so only float rounding may differ).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from evaluation.toy_benchmark import toy_heldout_clips
from show1_lightning.stages.loading import load_stage
from show1_lightning.stages.validation import run_in_calls

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"interpolation": "toy_interpolation", "pixel_sr": "toy_pixel_sr", "latent_sr": "toy_latent_sr"}
#: output size (frames, height, width) of each stage in the toy cascade
SIZES = {"interpolation": (29, 16, 24), "pixel_sr": (29, 32, 48), "latent_sr": (29, 64, 96)}


@torch.no_grad()
def compare_call_sizes(
    stage, clips: torch.Tensor, prompts: list[str], batches: list[int], rounds: int = 1
) -> list[tuple[int, float, float, float]]:
    """(clips per call, seconds per clip, speed-up over the largest call, max |diff| from its output) per call size,
    the call sizes alternated ``rounds`` times (best time kept) on ``stage.make_upstream(clips)``."""
    batches = sorted(set(batches), reverse=True)
    upstream = stage.make_upstream(clips)
    seeds = list(range(len(prompts)))
    stage.run(upstream[:1], prompts[:1], seeds[:1])  # warm-up
    best: dict[int, float] = {}
    outs: dict[int, torch.Tensor] = {}
    for _ in range(rounds):
        for b in batches:
            t0 = time.perf_counter()
            outs[b] = run_in_calls(stage, upstream, prompts, seeds, b)
            best[b] = min(best.get(b, float("inf")), time.perf_counter() - t0)
    top, n = batches[0], len(prompts)
    return [(b, best[b] / n, best[top] / best[b], (outs[b] - outs[top]).abs().max().item()) for b in batches]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages-dir", default=str(ROOT / "logs" / "toy_loop" / "train"))
    ap.add_argument("--stages", default=",".join(RUNS))
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--batches", default="8,4,2,1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.stages.split(","):
        stage = load_stage(Path(args.stages_dir) / RUNS[name] / "checkpoints" / "last.ckpt")
        clips, prompts = toy_heldout_clips(args.clips, *SIZES[name], split="test")
        rows += [(name, *r) for r in compare_call_sizes(stage, clips, prompts, batches, args.rounds)]
    load = os.getloadavg()
    print(
        f"\n{args.clips} held-out clips per stage, threads={args.threads}, torch {torch.__version__}, best of {args.rounds}"
    )
    print(f"load average (1/5/15 min) {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':<15}{'clips/call':>11}{'s per clip':>11}{'speed-up':>10}{'max |diff|':>12}")
    for name, b, s, up, diff in rows:
        print(f"{name:<15}{b:>11}{s:>11.2f}{up:>9.2f}x{diff:>12.1e}")
    print(
        f"speed-up: against {batches[0]} clips a call; max |diff|: of the outputs from that call size's (video in [-1, 1])"
    )


if __name__ == "__main__":
    main()
