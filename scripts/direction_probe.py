"""Does a trained keyframe stage follow the direction word? Same seeds, four direction words (the toy world).

Samples ``--seeds`` seeds, each with the four captions that differ only in the direction word, and prints the
mean displacement per word, the adherence and the fraction of seeds whose motion changes with the word
(``evaluation/direction_probe.py``)::

    python scripts/direction_probe.py logs/train/runs/<run_name>/checkpoints/last.ckpt --seeds 12

A stage that ignores the word prints four equal mean displacements, adherence 0.25 and a sensitivity near 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", help="a keyframe stage: a train.py checkpoint (*.ckpt) or an export folder")
    ap.add_argument("--seeds", type=int, default=12, help="seeds, each sampled with the four words (default 12)")
    ap.add_argument("--first-seed", type=int, default=7000)
    ap.add_argument("--num-steps", type=int, default=None, help="sampling steps (default: the stage's)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the stage's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)

    import torch

    from evaluation.direction_probe import direction_swap, stage_generator
    from show1_lightning.stages.loading import load_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    stage = load_stage(args.stage)
    sampling = {k: v for k, v in (("num_steps", args.num_steps), ("guidance_scale", args.guidance_scale)) if v}
    t0 = time.time()
    report = direction_swap(stage_generator(stage, **sampling), num_seeds=args.seeds, first_seed=args.first_seed)
    print(f"{args.stage}: {args.seeds} seeds x 4 direction words, {time.time() - t0:.0f} s")
    print(report.table())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
