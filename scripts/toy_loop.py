"""The whole loop on the toy world in one command: train the four toy stages, score every stage against its
baseline, score the cascade, each prefix of it, the naive cascade and the real floor with evaluate.py, and write
``<out>/report.json`` and ``<out>/report.md``; every run (training, stage check, evaluation) in one wandb group.

    python scripts/toy_loop.py                      # everything (2-core AVX-512 CPU: 28-30 minutes on a fresh clone; AVX2-only: longer; README)
    python scripts/toy_loop.py --skip-train         # re-score the stages trained before
    python scripts/toy_loop.py --num-samples 8 --train-overrides trainer.max_steps=20   # a quick dry run
    python scripts/toy_loop.py --workers 1          # one job at a time, all threads each (the former schedule)

Steps (each resumable: re-running picks up finished training runs and evaluation folders). With ``--workers N`` (default
2 where there are 2+ cores) N jobs run at once with ``cores / N`` threads each: the four trainings as parallel jobs
of the multirun (``hydra/launcher=submitit_local``; the keyframe stage's wall-clock budget ``trainer.max_time`` is
then lifted, its 600 steps decide), then the stage checks and evaluations as jobs that start as soon as a worker is
free and what they need is done (:func:`run_jobs`). On a CPU two one-thread jobs do more work than one two-thread
job (the toy cascade runs 1.4x faster on 2 threads than on 1, not 2x).

1. ``train.py -m experiment=toy,toy_interpolation,toy_pixel_sr,toy_latent_sr``: one Hydra multirun, one job per
   stage, each run in ``<out>/train/<experiment>`` (named ``toy_loop_<experiment>``).
2. Every conditional stage on held-out toy clips at its output size (``evaluation.toy_benchmark``, seeds the
   training shards never use): PSNR of its output and of its baseline (linear blend, bicubic, the VAE round trip
   of bicubic; ``show1_lightning.stages.validation``), side-by-side mp4s under ``<out>/stages``.
3. ``evaluate.py benchmark=toy`` for the cascade (saving each stage's output), each prefix (at the prefix's output
   size and frame count, scored from those saved outputs: ``generator=folder``), the naive cascade (keyframe stage +
   linear blend + bicubic + VAE round trip) and the real floor (``generator=toy_real``): FVD (real I3D), colour
   adherence, motion adherence.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evaluation.generators import video_filename
from evaluation.toy_benchmark import toy_heldout_clips
from show1_lightning.data.video_io import to_uint8_frames, write_mp4
from show1_lightning.fileio import atomic_write_json, atomic_write_text
from show1_lightning.pipelines.cascade import STAGE_ORDER, load_stage
from show1_lightning.stages.validation import compare_to_baseline

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = {
    "keyframe": "toy",
    "interpolation": "toy_interpolation",
    "pixel_sr": "toy_pixel_sr",
    "latent_sr": "toy_latent_sr",
}
FPS = 16  # the cascade's output rate: keyframes at 4 fps, 3 frames inserted between each pair


def default_workers() -> int:
    """Jobs at once: 2 on a machine with 2+ cores, else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def threads_per_worker(workers: int) -> int:
    """CPU threads of each of ``workers`` jobs running at once (all cores shared out, at least one each)."""
    return max(1, (os.cpu_count() or 1) // workers)


def thread_env(threads: int | None) -> dict[str, str]:
    """This process's environment, with the torch / OpenMP / MKL thread count set where ``threads`` is given."""
    env = os.environ.copy()
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run(cmd: list[str], log_path: Path, threads: int | None = None) -> None:
    """Run ``cmd`` from the repository root (with ``threads`` CPU threads if given), its output teed into
    ``log_path``; fail loudly."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=thread_env(threads))
    print(f"  ({time.perf_counter() - t0:.0f} s, log {log_path})", flush=True)
    if proc.returncode:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


#: Clips (stage checks) and prompts (evaluations) per stage call. On a CPU small calls are faster: the toy SR stages
#: ran 1.15-1.55x faster at 2 clips a call than at 8 (bench/bench_stage_batch.py); every clip has its own seed, so the
#: videos do not depend on it.
CALL_BATCH = 2


def checkpoint(out: Path, name: str) -> Path:
    """The last checkpoint of the toy run of stage ``name``."""
    return out / "train" / EXPERIMENTS[name] / "checkpoints" / "last.ckpt"


def parallel_train_overrides(out: Path) -> list[str]:
    """Overrides that run the multirun's jobs at once: each stage in its own process (Hydra's submitit launcher
    on this machine), step-budgeted (a wall-clock budget would shrink with the jobs sharing the cores)."""
    return [
        "hydra/launcher=submitit_local",
        f"hydra.launcher.submitit_folder={out}/train/.submitit/%j",
        "hydra.launcher.timeout_min=600",
        "++trainer.max_time=null",  # only the keyframe experiment sets one
    ]


def train(out: Path, group: str, overrides: list[str], workers: int = 1) -> float:
    """Step 1: the four toy stages as one Hydra multirun (``workers`` > 1: all four jobs at once, each with
    ``cores / workers`` threads; else one after another); returns the seconds taken."""
    t0 = time.perf_counter()
    parallel = parallel_train_overrides(out) if workers > 1 else []
    run(
        [
            sys.executable,
            "train.py",
            "-m",
            "experiment=" + ",".join(EXPERIMENTS.values()),
            "run_name=toy_loop_${experiment_name}",
            f"hydra.sweep.dir={out}/train",
            "hydra.sweep.subdir=${experiment_name}",  # a fixed folder per stage: a re-run resumes it
            f"logger.wandb.group={group}",
            *parallel,
            *overrides,
        ],
        out / "logs" / "train.log",
        threads=threads_per_worker(workers) if workers > 1 else None,
    )
    return time.perf_counter() - t0


def stage_output_size(stages: dict[str, Any], name: str) -> tuple[int, int, int]:
    """(frames, height, width) of the output of the cascade prefix ending at stage ``name``."""
    kf = stages["keyframe"]
    frames, h, w = int(kf.num_frames), int(kf.height), int(kf.width)
    for n in STAGE_ORDER[1 : STAGE_ORDER.index(name) + 1]:
        st = stages[n]
        if n == "interpolation":
            frames = st.output_frames(frames)
        elif n == "pixel_sr":
            h, w = h * st.scale_factor, w * st.scale_factor
        else:
            h, w = int(st.height), int(st.width)
    return frames, h, w


def score_stage(out: Path, stages: dict[str, Any], name: str, num_samples: int) -> dict[str, Any]:
    """Step 2 for one conditional stage: its output and its baseline on held-out clips at its output size (PSNR),
    and side-by-side mp4s of the first four under ``<out>/stages/<name>``."""
    stage = stages[name]
    frames, h, w = stage_output_size(stages, name)
    clips, prompts = toy_heldout_clips(num_samples, frames, h, w, split="test", fps=FPS)
    seeds = list(range(len(prompts)))
    t0 = time.perf_counter()
    with torch.no_grad():
        cmp = compare_to_baseline(stage, clips, prompts, seeds, batch_size=CALL_BATCH)
    result = {
        "psnr": cmp.psnr["output"],
        "psnr_baseline": cmp.psnr["baseline"],
        **{f"psnr_{k}": v for k, v in cmp.psnr.items() if k not in ("output", "baseline")},
        "seconds": time.perf_counter() - t0,
        "clips": len(prompts),
        "size": [frames, h, w],
    }
    panels = cmp.side_by_side()
    for i in range(min(4, len(prompts))):
        write_mp4(out / "stages" / name / f"{i:02d}.mp4", to_uint8_frames(panels[i]), fps=FPS)
    print(f"[stage] {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items() if "psnr" in k), flush=True)
    return result


@dataclass(frozen=True)
class Job:
    """One scoring job: ``run()`` once every job named in ``after`` has finished."""

    name: str
    run: Callable[[], Any]
    after: tuple[str, ...] = ()


def run_jobs(jobs: list[Job], workers: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Run ``jobs`` on ``workers`` threads: whenever a thread is free it takes the first job in list order whose
    ``after`` jobs have all finished (so list the long chains first). A failure is raised once the jobs running
    beside it have ended; nothing new starts after it.
    Returns each job's result and its seconds."""
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}")
    unknown = sorted({a for j in jobs for a in j.after} - set(names))
    if unknown:
        raise ValueError(f"jobs wait for unknown jobs: {unknown}")
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    pending = list(jobs)
    running: dict[Future, str] = {}

    def timed(job: Job) -> Any:
        t0 = time.perf_counter()
        try:
            return job.run()
        finally:
            seconds[job.name] = time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                if all(a in results for a in job.after):
                    pending.remove(job)
                    running[pool.submit(timed, job)] = job.name
            if not running:
                raise RuntimeError(f"jobs waiting on each other: {[j.name for j in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                if fut.exception() is not None:
                    raise fut.exception()  # no new job starts; those running finish first (the pool waits)
                results[name] = fut.result()
    return results, seconds


def evaluate_args(
    out: Path, name: str, generator: list[str], size: tuple[int, int, int], num_samples: int, group: str
) -> list[str]:
    """The ``evaluate.py benchmark=toy`` overrides that score generator ``name`` at ``size`` (frames, h, w).

    Keyframes (8 frames at 4 fps) are compared with held-out clips sampled at 4 fps; I3D needs more than 8
    frames, so the keyframe prefix is scored on the adherences only.
    """
    frames, h, w = size
    fps = FPS if frames > 8 else 4
    metrics = ["fvd", "color_adherence", "motion_adherence"] if frames > 8 else ["color_adherence", "motion_adherence"]
    return [
        "benchmark=toy",
        *generator,
        f"benchmark.adapter.num_samples={num_samples}",
        f"batch_size={CALL_BATCH}",
        f"benchmark.adapter.num_frames={frames}",
        f"benchmark.adapter.height={h}",
        f"benchmark.adapter.width={w}",
        f"benchmark.adapter.fps={fps}",
        "benchmark.metrics=[" + ",".join(metrics) + "]",
        f"eval_protocol.clip_frames={min(16, frames)}",
        f"run_name=toy_loop_{name}",
        f"output_dir={out / 'eval' / name}",
        f"fvd_cache_dir={out}/eval/cache",
        f"logger.group={group}",
    ]


def evaluate(
    out: Path,
    name: str,
    generator: list[str],
    size: tuple[int, int, int],
    num_samples: int,
    group: str,
    extra: tuple[str, ...] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Step 3: ``evaluate.py`` for one generator (:func:`evaluate_args`, then ``extra``; ``threads`` CPU threads if
    given); returns its metrics."""
    run(
        [sys.executable, "evaluate.py", *evaluate_args(out, name, generator, size, num_samples, group), *extra],
        out / "logs" / f"eval_{name}.log",
        threads=threads,
    )
    return report_metrics(json.loads((out / "eval" / name / "report.json").read_text()))


def saved_folder(out: Path, label: str, num_samples: int) -> list[str] | None:
    """``generator=folder`` overrides that score ``label`` (a prefix, or ``naive``) from the videos the whole
    cascade's evaluation saved (``save_intermediates``: a prefix's last stage; ``generator.baseline_branch``: the
    naive cascade of the same keyframes). The same seeds, so the same videos as generating them again; None when
    that evaluation did not save all of them (e.g. it resumed videos made before)."""
    last = "naive" if label == "naive" else label.removeprefix("prefix_").split("+")[-1]
    folder = out / "eval" / "cascade" / "intermediates" / last
    if not (folder / "manifest.jsonl").is_file() or not all(
        (folder / video_filename(i)).is_file() for i in range(num_samples)
    ):
        return None
    fps = FPS if last != "keyframe" else 4
    return ["generator=folder", f"generator.root={folder}", f"generator.name={label}", f"generator.fps={fps}"]


def generators(ckpts: dict[str, Path], sizes: dict[str, tuple[int, int, int]]) -> dict[str, Any]:
    """name -> (evaluate.py generator overrides, output size) for every prefix of the cascade (the whole one is
    ``cascade``), the naive cascade and the real floor; ``sizes[stage]``: the output size of the prefix ending there.
    """
    out: dict[str, Any] = {}
    for k, name in enumerate(STAGE_ORDER):
        prefix = STAGE_ORDER[: k + 1]
        label = "cascade" if len(prefix) == len(STAGE_ORDER) else "prefix_" + "+".join(prefix)
        gen = ["generator=cascade", f"generator.name={label}"] + [f"generator.{n}={ckpts[n]}" for n in prefix]
        out[label] = (gen, sizes[name])
    final = sizes[STAGE_ORDER[-1]]
    # generator=naive: the keyframe stage, then every later stage's baseline (conf/generator/naive.yaml)
    out["naive"] = (["generator=naive", *[f"generator.{n}={ckpts[n]}" for n in STAGE_ORDER]], final)
    out["real"] = (["generator=toy_real"], final)
    return out


def report_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """FVD and the two adherences from an evaluate.py ``report.json`` (``metrics``: name -> float); None if absent."""
    got = report["metrics"]
    return {k: float(got[k]) if k in got else None for k in ("fvd", "color_adherence", "motion_adherence")}


def _log_wandb(out: Path, group: str, name: str, values: dict[str, Any]) -> None:
    """One offline wandb run (WANDB_MODE decides) in the loop's group."""
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run_ = wandb.init(project="show1-lightning", group=group, name=name, dir=str(out), job_type="toy_loop")
    run_.log(values)
    run_.finish()


def markdown(report: dict[str, Any]) -> str:
    """The report as the README's toy table."""
    lines = [
        "| generator | FVD (lower is better) | colour adherence | motion adherence |",
        "|---|---:|---:|---:|",
    ]
    for name, m in report["generators"].items():
        fvd = "n/a (8 frames)" if m["fvd"] is None else f"{m['fvd']:.1f}"
        lines.append(f"| {name} | {fvd} | {m['color_adherence']:.3f} | {m['motion_adherence']:.3f} |")
    lines += [
        "",
        "| stage (held-out clips) | PSNR (dB) | baseline | baseline PSNR (dB) | others |",
        "|---|---:|---|---:|---|",
    ]
    base_name = {"interpolation": "linear blend", "pixel_sr": "bicubic", "latent_sr": "VAE(bicubic)"}
    for name, s in report["stages"].items():
        others = ", ".join(f"{k[5:]} {v:.2f}" for k, v in s.items() if k.startswith("psnr_") and k != "psnr_baseline")
        lines.append(f"| {name} | {s['psnr']:.2f} | {base_name[name]} | {s['psnr_baseline']:.2f} | {others} |")
    c, n = report["cascade"], report["naive"]
    lines += [
        "",
        f"Checks: cascade FVD below naive: {c['fvd'] < n['fvd']}; adherences kept (within 0.05 of naive): "
        f"{report['checks']['adherence_kept']}; every stage above its baseline: {report['checks']['stages_beat_baseline']}.",
        f"Time: {report['seconds']['total']:.0f} s in all (training {report['seconds']['train']:.0f} s).",
    ]
    return "\n".join(lines) + "\n"


def score_all(
    out: Path, ckpts: dict[str, Path], num_samples: int, group: str, workers: int
) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, float]]:
    """Steps 2 and 3 as jobs on ``workers`` threads (:func:`run_jobs`): the stage checks (in this process) and the
    evaluations (``evaluate.py`` processes), each with ``cores / workers`` threads where ``workers`` > 1 (all
    threads, one job at a time, where it is 1). The cascade goes first and saves every stage's output and the naive
    cascade of its keyframes (``generator.baseline_branch``); the prefixes and the naive cascade are scored from those
    (after it); the stage checks and the real floor fill in beside it, longest first. Returns the stage results, the scores by generator (the report's order) and the seconds of the
    stage checks, of each job and of the whole step.
    """
    t0 = time.perf_counter()
    stages = {n: load_stage(c) for n, c in ckpts.items()}
    gens = generators(ckpts, {n: stage_output_size(stages, n) for n in STAGE_ORDER})
    threads = threads_per_worker(workers) if workers > 1 else None

    def evaluate_gen(name: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        gen, size = gens[name]
        if name in from_cascade:
            gen = saved_folder(out, name, num_samples) or gen
        return evaluate(out, name, gen, size, num_samples, group, extra, threads=threads)

    def eval_job(name: str, *extra: str) -> Job:
        return Job(name, lambda: evaluate_gen(name, extra), ("cascade",) if name in from_cascade else ())

    def check_job(name: str) -> Job:
        return Job("stage_" + name, lambda: score_stage(out, stages, name, num_samples))

    prefixes = sorted((n for n in gens if n.startswith("prefix_")), key=len, reverse=True)  # the longest first
    from_cascade = {*prefixes, "naive"}  # scored from the videos the cascade's evaluation saves
    jobs = [
        # the longest; it saves every stage's output and the naive cascade of its keyframes, which the others score
        eval_job("cascade", "save_intermediates=true", "generator.baseline_branch=true"),
        check_job("latent_sr"),
        eval_job("naive"),
        *[eval_job(n) for n in prefixes],
        check_job("pixel_sr"),
        eval_job("real"),
        check_job("interpolation"),
    ]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # the stage checks' share (they run in this process)
    try:
        results, seconds = run_jobs(jobs, workers)
    finally:
        torch.set_num_threads(previous_threads)
    stage_results = {n: results["stage_" + n] for n in STAGE_ORDER[1:]}
    _log_wandb(out, group, "toy_loop_stages", {f"{n}/{k}": v for n, r in stage_results.items() for k, v in r.items()})
    return (
        stage_results,
        {name: results[name] for name in gens},
        {
            "stage_checks": sum(seconds["stage_" + n] for n in STAGE_ORDER[1:]),
            "jobs": seconds,
            "scoring": time.perf_counter() - t0,
        },
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "logs" / "toy_loop")
    p.add_argument("--num-samples", type=int, default=32, help="held-out prompts per evaluation (balanced)")
    p.add_argument("--skip-train", action="store_true", help="score the stages already trained under --out")
    p.add_argument("--train-overrides", nargs="*", default=[], help="extra train.py overrides (every stage)")
    p.add_argument("--group", default=None, help="wandb group (default: toy_loop_<time>)")
    p.add_argument("--workers", type=int, default=default_workers(), help="jobs at once, cores / workers threads each")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    out = args.out.resolve()
    group = args.group or f"toy_loop_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    t0 = time.perf_counter()
    train_s = 0.0 if args.skip_train else train(out, group, args.train_overrides, args.workers)

    ckpts = {n: checkpoint(out, n) for n in STAGE_ORDER}
    missing = [str(c) for c in ckpts.values() if not c.is_file()]
    if missing:
        raise SystemExit(f"missing trained stages (run without --skip-train): {missing}")
    stage_results, scores, score_s = score_all(out, ckpts, args.num_samples, group, args.workers)

    cascade, naive = scores["cascade"], scores["naive"]
    report = {
        "cascade": cascade,
        "naive": naive,
        "real": scores["real"],
        "prefixes": {k: v for k, v in scores.items() if k.startswith("prefix_")},
        "generators": scores,
        "stages": stage_results,
        "checks": {
            "cascade_beats_naive_fvd": cascade["fvd"] < naive["fvd"],
            "adherence_kept": all(cascade[m] >= naive[m] - 0.05 for m in ("color_adherence", "motion_adherence")),
            "stages_beat_baseline": all(s["psnr"] > s["psnr_baseline"] for s in stage_results.values()),
        },
        "num_samples": args.num_samples,
        "wandb_group": group,
        "seconds": {"train": train_s, **score_s, "total": time.perf_counter() - t0},
        "machine": {
            "cpus": os.cpu_count(),
            "workers": args.workers,
            "threads_per_worker": threads_per_worker(args.workers) if args.workers > 1 else torch.get_num_threads(),
        },
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    print(markdown(report))
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return report


if __name__ == "__main__":
    main()
