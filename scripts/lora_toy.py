"""LoRA vs full fine-tune of the trained toy keyframe stage onto a colour it never saw, on a CPU.

    OMP_NUM_THREADS=1 python scripts/lora_toy.py [--steps 120] [--rank 16]

The toy keyframe stage of the released structure (``python train.py run_name=toy_released stage.layout=null
model.in_channels=3``: ``experiment=toy`` without its layout planner, which LoRA does not adapt) knows six colours. This script adds a
seventh, ``orange`` (hue ~24 degrees, between red and yellow), renders fine-tuning shards of the toy world with it
(half orange clips, half the six known colours as replay), and fine-tunes the stage for the same steps, batch and
learning rate twice: (a) a LoRA adapter on the attention projections (``stage.lora``), starting from the stage's
checkpoint, and (b) every UNet parameter, starting from the stage's export (the same EMA weights). Then it
samples orange prompts (every shape x motion, two seeds) and prompts of the known colours, and prints a table:
trainable parameters, checkpoint and export sizes, train time, orange adherence (the fraction of samples whose
dominant colour is orange, with orange added to the palette the score classifies hues by) and the adherence to
the known colours (what the fine-tune kept).

While the script runs, orange is registered in ``toy_data.TOY_COLORS`` (:func:`extra_toy_color`): the toy
renderer and the colour score read that palette, and nothing else in the process uses it meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from show1_lightning.data import toy_data
from show1_lightning.data.shards import VideoShardWriter
from show1_lightning.data.toy_data import (
    GENERATOR_VERSION,
    TOY_MOTIONS,
    TOY_SHAPES,
    color_adherence,
    make_toy_clip,
    motion_adherence,
    toy_caption,
)
from show1_lightning.data.video_io import encode_mp4

ROOT = Path(__file__).resolve().parents[1]
NEW_COLOR, NEW_RGB = "orange", (240, 112, 24)


@contextlib.contextmanager
def extra_toy_color(name: str, rgb: tuple[int, int, int]) -> Iterator[None]:
    """Add ``name`` to the toy palette (renderer and colour score) for the duration of the block."""
    if name in toy_data.TOY_COLORS:
        raise ValueError(f"{name} is already a toy colour")
    toy_data.TOY_COLORS[name] = rgb
    try:
        yield
    finally:
        del toy_data.TOY_COLORS[name]


def make_shards(out_dir: Path, num_new: int, num_old: int, split: int) -> list[str]:
    """``num_new`` clips of the new colour and ``num_old`` of the known ones (every shape and motion, interleaved),
    as toy shards under ``out_dir``; returns their paths."""
    marker = out_dir / "params.json"
    params = {"num_new": num_new, "num_old": num_old, "split": split, "version": GENERATOR_VERSION}
    if marker.exists() and json.loads(marker.read_text()) == params:  # made by an earlier invocation
        return sorted(str(p) for p in out_dir.glob("[0-9]*.tar"))
    old = [c for c in toy_data.TOY_COLORS if c != NEW_COLOR]
    specs = [(NEW_COLOR, TOY_SHAPES[i % 3], TOY_MOTIONS[(i // 3) % 4]) for i in range(num_new)]
    olds = [
        (old[i % len(old)], TOY_SHAPES[(i // len(old)) % 3], TOY_MOTIONS[(i // (3 * len(old))) % 4])
        for i in range(num_old)
    ]
    mixed = [s for pair in zip(specs, olds) for s in pair] + specs[len(olds) :] + olds[len(specs) :]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    with VideoShardWriter(out_dir, samples_per_shard=64) as writer:
        for i, (color, shape, motion) in enumerate(mixed):
            frames = make_toy_clip(color, shape, motion, seed=(GENERATOR_VERSION, 100 + split, i))
            meta = {"url": f"toy-lora://{split}/{i}", "color": color, "shape": shape, "motion": motion}
            writer.write(encode_mp4(frames, fps=toy_data.TOY_FPS), toy_caption(color, shape, motion), meta)
    marker.write_text(json.dumps(params))
    return sorted(str(p) for p in out_dir.glob("[0-9]*.tar"))


def compose_train(overrides: list[str]) -> DictConfig:
    """The composed ``train`` config, as ``python train.py <overrides>`` sees it."""
    import train  # noqa: F401  (registers the OmegaConf resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def fine_tune(name: str, out: Path, shards: dict[str, list[str]], args: argparse.Namespace, extra: list[str]) -> dict:
    """One fine-tuning run (fresh); returns its output dir, wall time and checkpoint path."""
    import train

    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = [
        "experiment=toy",
        # LoRA adapts the UNet of a released-structure stage: no layout planner (stage.layout refuses LoRA)
        "stage.layout=null",
        "model.in_channels=3",
        f"run_name=lora_toy_{name}",
        f"trainer.max_steps={args.steps}",
        "trainer.limit_val_batches=0",
        "trainer.val_check_interval=null",
        f"trainer.log_every_n_steps={max(1, args.steps // 10)}",
        f"callbacks.model_checkpoint.every_n_train_steps={args.steps}",
        "callbacks.toy_adherence=null",
        "callbacks.samples=null",
        "callbacks.export=null",
        "callbacks.progress_bar=null",
        "logger=csv",
        "data.toy_root=null",
        f"data.train_shards=[{','.join(shards['train'])}]",
        f"data.val_shards=[{','.join(shards['val'])}]",
        f"data.batch_size={args.batch_size}",
        f"stage.optimizer.lr={args.lr}",
        *extra,
    ]
    cfg = compose_train(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.work_dir = str(ROOT)  # composed outside a Hydra run: no hydra:runtime.cwd to resolve
    if name == "full":  # every parameter trains, from the export (the base checkpoint's EMA weights)
        with open_dict(cfg):
            cfg.model = OmegaConf.create(
                {"_target_": cfg.model._target_, "config": cfg.model.config, "pretrained_path": str(args.base_export)}
            )
    t0 = time.time()
    train.train(cfg)
    return {"dir": run_dir, "seconds": time.time() - t0, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


@torch.no_grad()
def score(stage, prompts: list[str], seeds: list[int]) -> tuple[float, float]:
    """(colour adherence, motion adherence) of the stage's samples (EMA weights, the stage's sampling)."""
    videos = stage.generate(prompts, seeds).float().cpu()
    return color_adherence(videos, prompts), motion_adherence(videos, prompts)


def trainable(stage) -> int:
    """Parameters the run trained (and its optimizer and EMA held): the adapter's, or the whole UNet's."""
    return sum(p.numel() for p in stage.ema_parameters())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # a keyframe stage of the released structure: python train.py run_name=toy_released stage.layout=null model.in_channels=3
    ap.add_argument("--base", type=Path, default=ROOT / "logs/train/runs/toy_released/checkpoints/last.ckpt")
    ap.add_argument("--base-export", type=Path, default=None, help="default: <base run>/export")
    ap.add_argument("--out", type=Path, default=ROOT / "logs/lora_toy")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-new", type=int, default=96)
    ap.add_argument("--num-old", type=int, default=96)
    ap.add_argument("--eval-seeds", type=int, default=2, help="samples per orange prompt (12 prompts)")
    ap.add_argument("--runs", default="base,lora,full", help="any of base, lora, full (rows kept in results.json)")
    args = ap.parse_args(argv)
    args.base_export = args.base_export or args.base.parent.parent / "export"
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from show1_lightning.callbacks.export import export_stage
    from show1_lightning.callbacks.toy_adherence import toy_eval_prompts
    from show1_lightning.diffusion.lora import export_lora_stage
    from show1_lightning.stages.loading import load_stage

    results = args.out / "results.json"
    # Rows by run; a later invocation with other --runs adds to them (same evaluation prompts and seeds).
    rows: dict[str, dict] = {r["key"]: r for r in json.loads(results.read_text())} if results.exists() else {}
    with extra_toy_color(NEW_COLOR, NEW_RGB):
        t0 = time.time()
        shards = {
            "train": make_shards(args.out / "data" / "train", args.num_new, args.num_old, 0),
            "val": make_shards(args.out / "data" / "val", 8, 8, 1),
        }
        print(f"[lora_toy] shards ready in {time.time() - t0:.0f}s", flush=True)
        new_prompts = [toy_caption(NEW_COLOR, s, m) for s in TOY_SHAPES for m in TOY_MOTIONS] * args.eval_seeds
        new_seeds = [5000 + i for i in range(len(new_prompts))]
        old_prompts = [p for p in toy_eval_prompts(per_color=2) if NEW_COLOR not in p]
        old_seeds = [7000 + i for i in range(len(old_prompts))]

        def evaluate(
            key: str, name: str, stage, ckpt: Path | None, export: Path | None, seconds: float | None
        ) -> None:
            new_c, new_m = score(stage, new_prompts, new_seeds)
            old_c, old_m = score(stage, old_prompts, old_seeds)
            row = {
                "key": key,
                "run": name,
                "steps": None if ckpt is None else args.steps,
                "eval_prompts": [len(new_prompts), len(old_prompts)],
                "trainable_params": trainable(stage) if ckpt is not None else 0,
                "ckpt_mb": ckpt.stat().st_size / 2**20 if ckpt else None,
                "export_mb": dir_bytes(export) / 2**20 if export else None,
                "train_s": seconds,
                "orange_adherence": new_c,
                "orange_motion": new_m,
                "known_colour_adherence": old_c,
            }
            if results.exists():  # rows another invocation wrote meanwhile
                rows.update({r["key"]: r for r in json.loads(results.read_text()) if r["key"] != key})
            rows[key] = row
            results.write_text(json.dumps(list(rows.values()), indent=2, default=str))
            print(f"[lora_toy] {json.dumps(row)}", flush=True)

        for run in args.runs.split(","):
            if run == "base":
                base = load_stage(args.base)
                print(f"[lora_toy] base: {sum(p.numel() for p in base.unet.parameters())} UNet parameters", flush=True)
                evaluate("base", "base (no fine-tune)", base, None, None, None)
            elif run == "lora":
                res = fine_tune(
                    "lora",
                    args.out,
                    shards,
                    args,
                    [f"stage.lora.rank={args.rank}", f"stage.lora.init_from={args.base.resolve()}"],
                )
                stage = load_stage(res["ckpt"])
                export = export_lora_stage(stage, res["dir"] / "export")
                evaluate("lora", f"LoRA r={args.rank}", stage, res["ckpt"], export, res["seconds"])
            elif run == "full":
                res = fine_tune("full", args.out, shards, args, [])
                stage = load_stage(res["ckpt"])
                export = export_stage(stage, res["dir"] / "export")
                evaluate("full", "full fine-tune", stage, res["ckpt"], export, res["seconds"])
            else:
                raise SystemExit(f"unknown run {run!r}")

    print(
        f"\nbatch {args.batch_size}, lr {args.lr}; orange prompts: {len(new_prompts)}, "
        f"known-colour prompts: {len(old_prompts)} (chance 1/7)"
    )
    print("| run | steps | trainable params | checkpoint | export | train time | orange adherence | known colours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows.values(), key=lambda r: ["base", "lora", "full"].index(r["key"])):
        mb = lambda v: "-" if v is None else f"{v:.2f} MB"  # noqa: E731
        secs = "-" if r["train_s"] is None else f"{r['train_s'] / 60:.1f} min"
        print(
            f"| {r['run']} | {r['steps'] or '-'} | {r['trainable_params']:,} | {mb(r['ckpt_mb'])} | {mb(r['export_mb'])} | {secs} | "
            f"{r['orange_adherence']:.2f} | {r['known_colour_adherence']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
