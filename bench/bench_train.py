"""Training-step benchmark: the Lightning stage vs a plain PyTorch loop, float32 vs bf16-mixed.

Same model, same batch, same optimizer, measured side by side in one run:

    python bench/bench_train.py [--experiment toy] [--steps 6] [--warmup 2] [--threads 2] [--compile [BACKEND]]
    python bench/bench_train.py --ab "model.attention_head_dim=16" [--rounds 2]

Prints a table of seconds per optimizer step (median over ``--steps`` after ``--warmup``). ``--compile`` adds the
same loops with ``stage.compile`` (torch.compile of the UNet in place; the warmup steps include compilation) and
the final losses of eager vs compiled runs from the same seed (equal to float tolerance).

``--ab OVERRIDES`` instead times the plain float32 loop of the experiment (A) and of the experiment with the given
Hydra overrides (B, e.g. a cheaper model or batch), alternating A and B ``--rounds`` times in one process: shared
CPUs drift by tens of percent within an hour, so only an interleaved ratio is a claim. Each side uses its own
config's batch (``data.*`` overrides change it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, Dataset

import train  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]


class RepeatBatch(Dataset):
    """The same batch, ``n`` times (collated already: the loader uses batch_size=None)."""

    def __init__(self, batch: dict, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.batch


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *a) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *a) -> None:
        self.times.append(time.perf_counter() - self._t)


def build(experiment: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                "paths.output_dir=/tmp/bench_train",
                "data.num_workers=0",
                *overrides,
            ],
        )
    return cfg


def one_batch(cfg) -> dict:
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def make_stage(cfg, compile_spec: dict | None):
    """The experiment's stage, its UNet compiled in place when ``compile_spec`` is given."""
    L.seed_everything(0)
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    stage.compile_spec = compile_spec or False
    return stage


def lightning_steps(cfg, batch: dict, precision: str, n: int, compile_spec: dict | None = None) -> list[float]:
    stage = make_stage(cfg, compile_spec)  # compiled by Lightning's configure_model hook
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=n,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(stage, train_dataloaders=DataLoader(RepeatBatch(batch, n), batch_size=None))
    LOSSES[("Lightning stage", precision, bool(compile_spec))] = float(trainer.callback_metrics["train/loss"])
    return timer.times


#: final training loss per (loop, precision, compiled): eager and compiled runs must agree.
LOSSES: dict[tuple[str, str, bool], float] = {}


def plain_steps(cfg, batch: dict, precision: str, n: int, compile_spec: dict | None = None) -> list[float]:
    """The same work without Lightning: loss, backward, clipping, AdamW, EMA."""
    stage = make_stage(cfg, compile_spec)
    stage.configure_model()
    stage.train()
    optimizer = stage.optimizer_factory(params=[p for p in stage.unet.parameters() if p.requires_grad])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss, _ = stage.diffusion_step(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.unet.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stage.ema.step(stage.unet.parameters())
        times.append(time.perf_counter() - t0)
    LOSSES[("plain PyTorch loop", precision, bool(compile_spec))] = float(loss)
    return times


def ab_rounds(experiment: str, overrides: list[str], variant: list[str], rounds: int, n: int, warmup: int) -> None:
    """Plain float32 loops of A (the experiment) and B (plus ``variant``), alternated ``rounds`` times; prints the
    median s/step of every round and the ratio of B to A over all rounds."""
    sides = {}
    for name, extra in (("A", []), ("B", variant)):
        cfg = build(experiment, [*overrides, *extra])
        sides[name] = (cfg, one_batch(cfg))
    medians: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(rounds):
        for name, (cfg, batch) in sides.items():
            times = plain_steps(cfg, batch, "32-true", n + warmup)[warmup:]
            medians[name].append(statistics.median(times))
            print(f"round {r + 1} {name}: {medians[name][-1]:.3f} s/step (median of {n})", flush=True)
    overall = {name: statistics.median(times) for name, times in medians.items()}
    print(f"\nexperiment={experiment}  A: (as configured)  B: {' '.join(variant)}  threads={torch.get_num_threads()}")
    print(f"{'side':<5} {'s/step per round':<30} {'median':>8}")
    for name, times in medians.items():
        print(f"{name:<5} {' / '.join(f'{t:.3f}' for t in times):<30} {overall[name]:>8.3f}")
    print(f"B / A step time: {overall['B'] / overall['A']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="toy")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--compile", nargs="?", const="inductor", default=None, help="also time stage.compile (torch.compile backend)"
    )
    ap.add_argument("--ab", default=None, help="B's extra Hydra overrides (space-separated): interleaved A/B timing")
    ap.add_argument("--rounds", type=int, default=2, help="with --ab: alternations of A and B")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ab is not None:
        ab_rounds(args.experiment, args.overrides, args.ab.split(), args.rounds, args.steps, args.warmup)
        return
    cfg = build(args.experiment, args.overrides)
    batch = one_batch(cfg)
    n = args.steps + args.warmup
    rows = []
    specs = [None] + ([{"backend": args.compile}] if args.compile else [])
    for precision in ("32-true", "bf16-mixed"):
        for name, fn in (("plain PyTorch loop", plain_steps), ("Lightning stage", lightning_steps)):
            for spec in specs:  # eager and compiled one after the other: the same machine load
                torch._dynamo.reset()
                times = fn(cfg, batch, precision, n, spec)[args.warmup :]
                label = name + (" +compile" if spec else "")
                rows.append((label, precision, statistics.median(times), min(times)))
    clips = batch["video"].shape[0]
    shape = "x".join(str(s) for s in batch["video"].shape[1:])
    print(
        f"\nexperiment={args.experiment}  batch={clips} clips of {shape}  threads={args.threads}  "
        f"torch {torch.__version__}"
    )
    print(f"{'loop':<29} {'precision':<11} {'s/step (median)':>16} {'s/step (min)':>13} {'clips/s':>8}")
    base = {p: t for (name, p, t, _) in rows if name == "plain PyTorch loop"}
    for name, p, med, mn in rows:
        rel = f"  ({med / base[p]:.2f}x plain)" if name != "plain PyTorch loop" else ""
        print(f"{name:<29} {p:<11} {med:>16.3f} {mn:>13.3f} {clips / med:>8.2f}{rel}")
    f32 = {name: t for (name, p, t, _) in rows if p == "32-true"}
    for name, p, med, _ in rows:
        if p == "bf16-mixed":
            print(f"bf16-mixed vs float32, {name}: {f32[name] / med:.2f}x speed-up")
    if args.compile:
        for (name, p, compiled), loss in LOSSES.items():
            if compiled:
                eager = LOSSES[(name, p, False)]
                print(
                    f"final loss {name} {p}: eager {eager:.6f} compiled {loss:.6f} "
                    f"(|diff| {abs(eager - loss):.1e}; tolerance 1e-3 x loss)"
                )


if __name__ == "__main__":
    main()
