"""Cascade sampling benchmark: every stage before / eager / ``torch.compile``-d, side by side in one run, with FLOPs.

    python bench/bench_generate.py [--stages-dir logs/toy_loop/train] [--num-steps 4] [--backend inductor]
                                   [--repeats 2] [--threads 2] [--only keyframe,pixel_sr] [--no-compile]

Loads the toy cascade once (``generate.py``'s default stages), then per stage, on the previous stage's eager
output: "before" (the temporal convolutions as plain ``Conv3d``, ``stage.frame_convs=false``), eager (the
default) and compiled calls interleaved (``--repeats`` each, best time kept, so a loaded machine slows all
alike), the first compiled call (compilation included) reported apart, the max abs difference of the outputs, and
the stage's FLOPs (``torch.utils.flop_counter``) divided by its time against the machine's measured fp32 matmul
rate (a 2048^3 matmul at the same thread count): the fraction of the physical ceiling the stage reaches.

``--num-steps`` overrides every stage's sampling steps (the conditional stages run ``int(steps * strength)``); the
default 4 keeps the run short, ``--num-steps 0`` uses each stage's configured steps (generate.py's settings).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from matmul_rate import matmul_gflops
from torch.utils.flop_counter import FlopCounterMode

from show1_lightning.diffusion.compile import compile_options
from show1_lightning.models.frame_conv import use_frame_convs, use_plain_convs
from show1_lightning.pipelines.cascade import STAGE_ORDER, Show1Cascade

ROOT = Path(__file__).resolve().parents[1]
STAGE_RUNS = {"keyframe": "toy", "interpolation": "toy_interpolation", "pixel_sr": "toy_pixel_sr"}
STAGE_RUNS["latent_sr"] = "toy_latent_sr"


def timed(fn) -> tuple[float, torch.Tensor]:
    """Seconds of one call and its output."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages-dir", default=str(ROOT / "logs" / "toy_loop" / "train"))
    ap.add_argument("--num-steps", type=int, default=4, help="sampling steps of every stage (0: configured)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    ap.add_argument("--mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved eager/compiled calls per stage")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", default="", help="comma-separated stages to time (the others still feed them)")
    ap.add_argument("--last", default="latent_sr", choices=STAGE_ORDER, help="last stage of the cascade built")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-compile", action="store_true", help="time only before (plain Conv3d) vs eager")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = Path(args.stages_dir)
    t0 = time.perf_counter()
    used = STAGE_ORDER[: STAGE_ORDER.index(args.last) + 1]
    sampling = {n: {"num_steps": args.num_steps} for n in used} if args.num_steps else {}
    cascade = Show1Cascade(
        **{n: d / r / "checkpoints" / "last.ckpt" for n, r in STAGE_RUNS.items() if n in used},
        device=args.device,
        sampling=sampling,
    )
    load_s = time.perf_counter() - t0
    spec = {"backend": args.backend, **({"mode": args.mode} if args.mode else {})}
    compile_options(spec)
    peak = matmul_gflops()
    only = [s for s in args.only.split(",") if s] or list(cascade.stages)
    prompts, seeds = ["a red circle moving left"], [0]
    rows = []
    x = None
    for name, stage in cascade.stages.items():
        stage.to(cascade.device)
        if name not in only:
            x = cascade._run(name, prompts, seeds, x)
            continue
        run = lambda: cascade._run(name, prompts, seeds, x)  # noqa: E731
        with FlopCounterMode(display=False) as fc:
            run()
        flops = fc.get_total_flops()
        first_s, compiled_call = float("nan"), None
        if not args.no_compile:
            # Compile in place once (the stage's own switch), then toggle the compiled call on and off.
            stage.compile_spec = spec
            torch._dynamo.reset()
            first_s, _ = timed(run)  # compiles (and recompiles per input shape) while sampling
            compiled_call = stage.unet._compiled_call_impl
        before, eager, compiled = [], [], []
        out_c = None
        for _ in range(args.repeats):
            stage.unet._compiled_call_impl = None
            stage.compile_spec = False
            use_plain_convs(stage.unet)  # "before": the temporal convolutions as plain Conv3d
            s, out_b = timed(run)
            before.append(s)
            use_frame_convs(stage.unet)
            s, out_e = timed(run)
            eager.append(s)
            if compiled_call is not None:
                stage.unet._compiled_call_impl = compiled_call
                stage.compile_spec = spec
                s, out_c = timed(run)
                compiled.append(s)
        stage.unet._compiled_call_impl = None
        stage.compile_spec = False
        diff_b = (out_e.float() - out_b.float()).abs().max().item()
        diff = float("nan") if out_c is None else (out_e.float() - out_c.float()).abs().max().item()
        comp = min(compiled) if compiled else float("nan")
        rows.append((name, tuple(out_e.shape), min(before), min(eager), comp, first_s, diff_b, diff, flops))
        x = out_e
        stage.to("cpu")
    load = os.getloadavg()
    print(
        f"\ntoy cascade, 1 prompt, num_steps={args.num_steps or 'configured'}, threads={args.threads}, "
        f"torch {torch.__version__}, compile backend={args.backend} mode={args.mode}; stages loaded in {load_s:.0f} s"
    )
    print(f"load average (1/5/15 min) {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s (2048^3, {args.threads} threads)")
    head = (
        f"{'stage':<14}{'before s':>9}{'eager s':>9}{'speed-up':>9}{'|diff|':>9}{'compiled s':>11}{'speed-up':>9}"
        f"{'1st comp. s':>12}{'|diff|':>9}{'GFLOP':>8}{'eager GF/s':>11}{'eager/peak':>11}"
    )
    print(head)
    for name, _, b, e, c, first, diff_b, diff, flops in rows:
        g = flops / 1e9
        print(
            f"{name:<14}{b:>9.2f}{e:>9.2f}{b / e:>8.2f}x{diff_b:>9.1e}{c:>11.2f}{e / c:>8.2f}x{first:>12.1f}{diff:>9.1e}"
            f"{g:>8.1f}{g / e:>11.2f}{g / e / peak:>10.0%}"
        )
    tb, te, tc = (sum(r[i] for r in rows) for i in (2, 3, 4))
    print(f"{'total':<14}{tb:>9.2f}{te:>9.2f}{tb / te:>8.2f}x{'':>9}{tc:>11.2f}{te / tc:>8.2f}x")
    print(
        "before: the temporal convolutions as plain Conv3d (stage.frame_convs=false); eager: as Conv2d (the default);"
        " compiled: eager + torch.compile. |diff|: max abs difference of the stage's output from eager's"
        " (video in [-1, 1]); tolerance 1e-3"
    )


if __name__ == "__main__":
    main()
