"""Inference FLOPs and peak memory: Show-1's hybrid cascade vs an all-pixel cascade (the paper's 15 GB vs 72 GB).

    python bench/efficiency.py            # full-size estimate (meta device) + real CPU validation, ~2-3 min
    python bench/efficiency.py --quick    # estimate only, fused-attention costing only, no validation (tests)

Part 1 (estimate, meta device, bf16): for every model of both cascades at the paper's sizes, FLOPs of one forward
(torch.utils.flop_counter: matmuls/convs/attention only) x forwards per generation (steps x windows, CFG batch 2),
and device memory = weights of that model + its inputs + peak live activation bytes of one forward without grad
(bench/efficiency_lib.LiveBytesTracker), under three attention costings: fused memory-efficient kernel,
materialised bf16 scores, materialised fp32 scores (torch's math path default). The cascade's peak = the max over
its models (one model on the device at a time, as the official pipeline's CPU offload does).

Part 2 (validation, real tensors on the CPU, fp32): the last stage of each cascade at reduced widths (every
channel count / k), one forward, in a fresh process: peak-RSS delta and the tracker's count on the real tensors,
next to the meta-device prediction for the same reduced model and inputs.
"""

from __future__ import annotations

import argparse
import time

import torch
from efficiency_lib import (
    POLICIES,
    GiB,
    MiB,
    StageEstimate,
    estimate_stage,
    paper_stages,
    predict_peak,
    real_peak_subprocess,
    reduced_unet_config,
)

PAPER_HYBRID_GB, PAPER_PIXEL_GB = 15.0, 72.0
SHORT = {"efficient": "eff", "materialised": "mat16", "materialised_fp32": "mat32"}

# Validation runs: (cascade, released config, inputs). Batch 1 and few frames keep the CPU time small; widths
# are divided by each divisor. Full spatial size of each last stage.
VALIDATION = [
    ("hybrid", "show-1-sr2", dict(batch=1, channels=4, frames=8, height=40, width=72, text=[77, 1024])),
    (
        "all_pixel",
        "show-1-sr1",
        dict(batch=1, channels=6, frames=2, height=320, width=576, text=[77, 4096], noise_level=True),
    ),
]


def _fmt_flops(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f}"


def estimate_cascades(divisor: int = 1, policies: tuple[str, ...] = POLICIES) -> dict[str, list[StageEstimate]]:
    """Estimate every stage of both cascades (shared stages are costed once) under the given attention policies."""
    cache: dict[str, StageEstimate] = {}
    result: dict[str, list[StageEstimate]] = {}
    for cascade, specs in paper_stages(divisor).items():
        result[cascade] = []
        for spec in specs:
            if spec.name not in cache:
                cache[spec.name] = estimate_stage(spec, policies=policies)
            result[cascade].append(cache[spec.name])
    return result


def cascade_peak(stages: list[StageEstimate], policy: str) -> tuple[int, str]:
    """Peak device memory of a cascade (one model at a time) and the stage that sets it."""
    best = max(stages, key=lambda s: s.peak_bytes(policy))
    return best.peak_bytes(policy), best.name


def print_estimates(estimates: dict[str, list[StageEstimate]]) -> dict[str, float]:
    """Print the per-stage table and the totals; return the (b)/(a) peak ratios per policy."""
    policies = tuple(estimates["hybrid"][0].activation_bytes)
    head = (
        f"{'cascade':9s} | {'stage':26s} | {'schedule':52s} | {'FLOPs/fwd':>10s} | {'FLOPs/gen':>10s} | "
        f"{'weights':>8s} | " + " | ".join(f"{'mem ' + SHORT[p]:>10s}" for p in policies)
    )
    print(
        "Part 1: estimate at paper size (meta device, bf16). mem = weights + inputs + peak activations of one "
        "forward, GiB"
    )
    print(head)
    print("-" * len(head))
    ratios: dict[str, float] = {}
    peaks: dict[str, dict[str, tuple[int, str]]] = {}
    for cascade, stages in estimates.items():
        for s in stages:
            mems = " | ".join(f"{s.peak_bytes(p) / GiB:10.2f}" for p in policies)
            print(
                f"{cascade:9s} | {s.name:26s} | {s.schedule:52s} | {_fmt_flops(s.flops_per_forward):>10s} | "
                f"{_fmt_flops(s.flops_per_generation):>10s} | {s.weight_bytes / GiB:8.2f} | {mems}"
            )
        total = sum(s.flops_per_generation for s in stages)
        peaks[cascade] = {p: cascade_peak(stages, p) for p in policies}
        mems = " | ".join(f"{peaks[cascade][p][0] / GiB:10.2f}" for p in policies)
        print(
            f"{cascade:9s} | {'TOTAL (peak = max stage)':26s} | {'':52s} | {'':>10s} | {_fmt_flops(total):>10s} | "
            f"{'':>8s} | {mems}"
        )
        print("-" * len(head))
    hybrid_flops = sum(s.flops_per_generation for s in estimates["hybrid"])
    pixel_flops = sum(s.flops_per_generation for s in estimates["all_pixel"])
    print(f"FLOPs per generation, all-pixel / hybrid: {pixel_flops / hybrid_flops:.2f}x")
    print(
        f"Peak memory ratio (b) all-pixel / (a) hybrid   [paper: {PAPER_PIXEL_GB:.0f} GB / {PAPER_HYBRID_GB:.0f} GB "
        f"= {PAPER_PIXEL_GB / PAPER_HYBRID_GB:.2f}]"
    )
    for p in policies:
        (a, a_stage), (b, b_stage) = peaks["hybrid"][p], peaks["all_pixel"][p]
        ratios[p] = b / a
        print(
            f"  attention {p:18s}: hybrid {a / GiB:6.2f} GiB ({a_stage}), all-pixel {b / GiB:6.2f} GiB ({b_stage})"
            f" -> ratio {b / a:.2f}"
        )
    for p in policies:  # the same ratio over the UNet stages only (text encoders set aside: T5-XXL weights)
        a = max(s.peak_bytes(p) for s in estimates["hybrid"] if "text" not in s.name)
        b = max(s.peak_bytes(p) for s in estimates["all_pixel"] if "text" not in s.name)
        print(
            f"  without text encoders, {p:18s}: hybrid {a / GiB:6.2f} GiB, all-pixel {b / GiB:6.2f} GiB -> "
            f"ratio {b / a:.2f}"
        )
    return ratios


def run_validation(divisors: list[int]) -> list[dict]:
    """Real CPU peaks vs meta predictions for each cascade's last stage at reduced widths."""
    print(
        "\nPart 2: validation, real tensors on the CPU (fp32, 1 thread, fresh process per run) vs the meta "
        "estimate for the same reduced model and inputs. Activation peak of one forward, MiB"
    )
    head = (
        f"{'cascade':9s} | {'last stage':11s} | {'width':>5s} | {'inputs (B,C,F,H,W)':22s} | {'FLOPs':>9s} | "
        f"{'predicted':>9s} | {'RSS delta':>9s} | {'tracked real':>12s} | {'RSS/pred':>8s}"
    )
    print(head)
    print("-" * len(head))
    rows = []
    for cascade, name, spec in VALIDATION:
        for d in divisors:
            cfg = reduced_unet_config(name, d)
            pred = predict_peak(cfg, spec)
            real = real_peak_subprocess(cfg, spec)
            shape = f"({spec['batch']},{spec['channels']},{spec['frames']},{spec['height']},{spec['width']})"
            print(
                f"{cascade:9s} | {name:11s} | {'1/' + str(d):>5s} | {shape:22s} | {_fmt_flops(pred.flops):>9s} | "
                f"{pred.peak_activation_bytes / MiB:9.1f} | {real['rss_delta'] / MiB:9.1f} | "
                f"{real['tracked'] / MiB:12.1f} | {real['rss_delta'] / pred.peak_activation_bytes:8.2f}",
                flush=True,
            )
            rows.append({"cascade": cascade, "divisor": d, "predicted": pred.peak_activation_bytes, **real})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="estimate with the efficient-attention costing only, no validation (for tests)",
    )
    parser.add_argument("--divisors", type=int, nargs="+", default=None, help="validation width divisors")
    parser.add_argument("--no-validate", action="store_true", help="skip the real-tensor CPU validation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    print_estimates(estimate_cascades(policies=("efficient",) if args.quick else POLICIES))
    if not (args.no_validate or args.quick):
        run_validation(args.divisors or [32, 16, 8])
    print(f"\n(total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
