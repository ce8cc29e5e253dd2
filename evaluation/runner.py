"""The distributed, resumable evaluation loop and the report writer.

Flow of :func:`run_evaluation` (every process runs it; torchrun / srun start the processes):

1. Prompts come from the benchmark, ordered by global index; sample ``i`` gets seed
   ``seed + i``. Rank ``r`` of ``W`` owns indices ``r, r + W, ...`` (no padding, no duplicates),
   so results do not depend on ``W``.
2. Generation: every missing ``videos/000123.mp4`` of the rank's shard is generated (bf16 autocast
   around the generator only, when asked) and written at once. Existing files are skipped, so a
   killed run resumes. ``stop_after`` (debug) stops after that many new videos, without a report.
3. Scoring: every video is decoded back from its mp4 (what is scored is what was saved, and a
   resumed run sees exactly the same pixels), cut as configured and fed to the metrics, in float32
   outside autocast. FVD real statistics come from the benchmark's real clips (cached on disk).
4. Rank 0 writes ``report.json`` (every number and every protocol choice), ``report.md`` (beside the
   paper's numbers) and logs the same to wandb.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from evaluation.benchmarks import Benchmark, ClipSpec, cut_clip
from evaluation.dist_guard import RankGuard
from evaluation.fingerprint import check_or_write_fingerprint, claim_output_dir, generator_fingerprint
from evaluation.generators import VideoGenerator, video_filename, write_manifest
from show1_lightning.data.video_io import decode_video, to_uint8_frames, write_mp4
from show1_lightning.fileio import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

METRIC_NAMES = ("is", "fvd", "clipsim", "color_adherence", "motion_adherence")
ADHERENCE_METRICS = ("color_adherence", "motion_adherence")  # benchmark=toy: evaluation.toy_benchmark
SEEDS_RULE = "seed(i) = base_seed + i for global sample index i; rank r of W takes i = r, r+W, ..."


# ---------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False
    guard: RankGuard | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Rank-local work ending in a sync point; a rank that raises in it stops every rank (``dist_guard``)."""
        return self.guard.phase(name) if self.guard is not None else contextlib.nullcontext()

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def init_distributed(
    device: str = "auto",
    backend: str | None = None,
    timeout_s: float | None = None,
    peer_timeout_s: float = 300.0,
    sync_timeout_s: float | None = None,
) -> DistContext:
    """Join the process group described by torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or SLURM
    (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR must be exported) environment variables.

    One process: no process group. Backend: nccl on GPU, gloo on CPU (unless given). ``timeout_s``: the
    process group's collective timeout (None: torch's default); ``peer_timeout_s`` / ``sync_timeout_s``: see
    :class:`evaluation.dist_guard.RankGuard` (every collective of the runner follows one of its sync points).
    """
    world = _env_int("WORLD_SIZE")
    if world is not None:
        rank, local = _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
    elif (_env_int("SLURM_NTASKS") or 1) > 1:
        world, rank, local = _env_int("SLURM_NTASKS"), _env_int("SLURM_PROCID") or 0, _env_int("SLURM_LOCALID") or 0
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "SLURM multi-task evaluation needs MASTER_ADDR, e.g. "
                "export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)"
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    else:
        world, rank, local = 1, 0, 0
    if device == "auto":
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        kwargs = {} if timeout_s is None else {"timeout": _dt.timedelta(seconds=float(timeout_s))}
        dist.init_process_group(
            backend=backend or ("nccl" if dev.type == "cuda" else "gloo"), rank=rank, world_size=world, **kwargs
        )
        ctx.initialized_here = True
    elif world > 1:
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    if ctx.world_size > 1:
        from torch.distributed.distributed_c10d import _get_default_store

        ctx.guard = RankGuard(
            _get_default_store(),
            ctx.rank,
            ctx.world_size,
            peer_timeout_s=peer_timeout_s,
            sync_timeout_s=sync_timeout_s,
        )
    return ctx


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Global indices owned by ``rank``: ``rank, rank + world_size, ...`` (no padding)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(range(rank, num_samples, world_size))


def sample_seed(base_seed: int, index: int) -> int:
    """Seed of global sample ``index`` (independent of the number of processes)."""
    return int(base_seed) + int(index)


def _all_true(ctx: DistContext, flag: bool) -> bool:
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.long, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def _broadcast_bool(ctx: DistContext, flag: bool) -> bool:
    if ctx.world_size == 1:
        return flag
    obj = [flag]
    dist.broadcast_object_list(obj, src=0)
    return bool(obj[0])


# ---------------------------------------------------------------------------- generation


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(items), size):
        yield list(items[s : s + size])


def _autocast(ctx: DistContext, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
    if precision in ("fp32", "32"):
        return contextlib.nullcontext()
    raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")


def generate_missing(
    generator: VideoGenerator,
    prompts: Sequence[str],
    indices: Sequence[int],
    video_dir: Path,
    ctx: DistContext,
    base_seed: int,
    batch_size: int,
    precision: str = "fp32",
    stop_after: int | None = None,
) -> tuple[int, int, bool]:
    """Generate and write every missing video of ``indices``.

    Returns:
        (number generated now, number already on disk, complete) where ``complete`` is False when
        ``stop_after`` ended the loop early.
    """
    todo = [i for i in indices if not (video_dir / video_filename(i)).is_file()]
    existing = len(indices) - len(todo)
    if stop_after is not None:
        todo_now = todo[: max(int(stop_after), 0)]
    else:
        todo_now = todo
    made = 0
    for batch in _batches(todo_now, batch_size):
        seeds = [sample_seed(base_seed, i) for i in batch]
        with torch.no_grad(), _autocast(ctx, precision):
            videos = generator.generate([prompts[i] for i in batch], seeds)
        if videos.ndim != 5 or videos.shape[0] != len(batch) or videos.shape[1] != 3:
            raise ValueError(
                f"generator returned shape {tuple(videos.shape)} for {len(batch)} prompts; expected B x 3 x T x H x W"
            )
        for i, video in zip(batch, videos.float()):
            write_mp4(video_dir / video_filename(i), to_uint8_frames(video), fps=float(generator.fps))
        made += len(batch)
        log.info("rank %d: generated %d/%d new videos", ctx.rank, made, len(todo))
    return made, existing, made == len(todo)


# ---------------------------------------------------------------------------- scoring


def load_generated(video_dir: Path, index: int) -> torch.Tensor:
    """Decoded generated video ``index``: float ``3 x T x H x W`` in [-1, 1]."""
    path = video_dir / video_filename(index)
    if not path.is_file():
        raise FileNotFoundError(f"generated video {path} missing at scoring time")
    from show1_lightning.data.video_io import to_float_video

    return to_float_video(decode_video(path).frames)


def _fvd_real_stats(
    fvd: Any, benchmark: Benchmark, ctx: DistContext, cache_dir: str | None, batch_size: int
) -> dict[str, Any]:
    """Fill the FVD real statistics (from cache, or from the benchmark's real clips); describe them."""
    from evaluation.fvd import real_stats_cache_path

    protocol = {**benchmark.real_protocol(), "fvd": fvd.protocol()}
    path = real_stats_cache_path(cache_dir, benchmark.name, protocol) if cache_dir else None
    cached = _broadcast_bool(ctx, bool(path is not None and path.is_file()))
    if cached:
        fvd.load_real_stats(path, protocol)
        return {"source": "cache", "path": str(path)}
    n = benchmark.num_real_clips()
    with ctx.phase("FVD real clips"):
        for batch in _batches(shard_indices(n, ctx.rank, ctx.world_size), batch_size):
            clips = torch.stack([benchmark.real_clip(i) for i in batch]).to(ctx.device)
            fvd.update(clips, real=True)
    if path is not None:
        fvd.save_real_stats(path, protocol)  # every rank (all-reduce); rank 0 writes
        return {"source": "computed, cached", "path": str(path)}
    return {"source": "computed"}


def score(
    metrics: Mapping[str, Any],
    benchmark: Benchmark,
    prompts: Sequence[str],
    indices: Sequence[int],
    video_dir: Path,
    ctx: DistContext,
    clip: ClipSpec,
    batch_size: int,
    fvd_cache_dir: str | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Feed this rank's videos to the metrics and compute them (collective: every rank calls it).

    Returns:
        (values, details): metric values by report key, and per-metric details (e.g. FVD stats source).
    """
    details: dict[str, Any] = {}
    if "fvd" in metrics:
        details["fvd_real_stats"] = _fvd_real_stats(metrics["fvd"], benchmark, ctx, fvd_cache_dir, batch_size)
    with ctx.phase("scoring"):  # rank-local updates; the computes below are collective
        for batch in _batches(indices, batch_size):
            videos = [load_generated(video_dir, i) for i in batch]
            if "clipsim" in metrics:  # every frame of the video as generated
                for i, v in zip(batch, videos):  # videos may differ in length: one at a time
                    metrics["clipsim"].update(v[None].to(ctx.device), [prompts[i]])
            for name in ADHERENCE_METRICS:  # every frame of the video as generated, on the CPU
                if name in metrics:
                    for i, v in zip(batch, videos):
                        metrics[name].update(v[None], [prompts[i]])
            if "is" in metrics or "fvd" in metrics:
                clips = torch.stack([cut_clip(to_uint8_frames(v), clip, i) for i, v in zip(batch, videos)]).to(
                    ctx.device
                )
                if "is" in metrics:
                    metrics["is"].update(clips, indices=torch.tensor(batch, device=ctx.device))
                if "fvd" in metrics:
                    metrics["fvd"].update(clips, real=False, indices=torch.tensor(batch))
    values: dict[str, float] = {}
    if "is" in metrics:
        mean, std = metrics["is"].compute()
        values["is_mean"], values["is_std"] = float(mean), float(std)
    if "fvd" in metrics:
        values["fvd"] = float(metrics["fvd"].compute())
    if "clipsim" in metrics:
        values["clipsim"] = float(metrics["clipsim"].compute())
    for name in ADHERENCE_METRICS:
        if name in metrics:
            values[name] = float(metrics[name].compute())
    from evaluation.protocols import extra_values, metric_counts

    values.update(extra_values(metrics))  # FVD per generated set (collective, like the computes)
    details["counts"] = metric_counts(metrics, ctx.world_size, ctx.device)
    return values, details


# ---------------------------------------------------------------------------- report


def weight_files(node: Any) -> dict[str, str]:
    """sha256 of every existing file named in a (resolved) metric config."""
    found: dict[str, str] = {}

    def walk(x: Any) -> None:
        if isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, str) and len(x) < 4096 and os.path.isfile(x):
            found[str(Path(x).resolve())] = sha256_file(x)

    walk(node)
    return found


def _metric_protocol(name: str, metric: Any, cfg_node: Any) -> dict[str, Any]:
    if name == "is":
        return {
            "classifier": type(metric.classifier).__name__,
            "num_splits": metric.num_splits,
            "repeats": metric.repeats,
            "eps": metric.eps,
            "std": "population std over repeats x splits",
            "input": "16 frames; C3D preprocessing: BGR*128, bilinear align_corners=True to 112, +128-mean crop",
        }
    if name == "fvd":
        return (
            {**metric.protocol(), **metric.generated_protocol()}
            if hasattr(metric, "generated_protocol")
            else metric.protocol()
        )
    if name in ADHERENCE_METRICS:
        return metric.describe()
    if name == "clipsim" and metric.scale == "clipscore":
        return {
            "scale": "clipscore",
            "scale_note": "torchmetrics CLIPScore arithmetic; clipsim on the 0-1 scale, "
            "clipsim_x100 is torchmetrics' number",
            "clip": metric.clip.description,
            "preprocessing": "the model folder's CLIPProcessor (images: uint8 frames; text: padding, ids cut at 77)",
            "frames": "every frame of every video scored with its caption; max(mean over all frames, 0)",
        }
    if name == "clipsim":
        return {
            "scale": metric.scale,
            "clip": metric.clip.description,
            "preprocessing": "bicubic antialiased short-side resize, centre crop, CLIP mean/std; 77 tokens",
            "frames": "all frames of each generated video, mean over frames then videos",
        }
    return {}


def _log_wandb(cfg: DictConfig, report: Mapping[str, Any], md_path: Path) -> None:
    wcfg = cfg.logger
    os.environ.setdefault("WANDB_MODE", str(wcfg.get("mode", "offline")))
    import wandb

    run = wandb.init(
        project=wcfg.get("project", "show1-eval"),
        name=wcfg.get("name"),
        id=wcfg.get("id"),
        group=report["run"].get("wandb_group"),
        dir=str(Path(cfg.output_dir)),
        config=OmegaConf.to_container(cfg, resolve=True),
        job_type="evaluation",
        resume="allow",
    )
    try:
        bench = report["benchmark"]["name"]
        run.log({f"{bench}/{k}": v for k, v in report["metrics"].items()})
        for k, v in report["metrics"].items():
            run.summary[f"{bench}/{k}"] = v
        run.log({"report": wandb.Html(f"<pre>{md_path.read_text()}</pre>")})
        artifact = wandb.Artifact(f"eval-report-{bench}", type="evaluation")
        artifact.add_file(str(md_path.with_suffix(".json")))
        run.log_artifact(artifact)
    finally:
        run.finish()


# ---------------------------------------------------------------------------- entry


def _sweep_entries(cfg: DictConfig) -> dict[str, Any]:
    """Report entries of a Hydra multirun job (its overrides, number, wandb group); the group alone otherwise."""
    from evaluation.sweep import hydra_job, wandb_group

    job = hydra_job()
    out: dict[str, Any] = {"wandb_group": wandb_group(OmegaConf.select(cfg, "logger.group"), job)}
    if job is not None:
        out.update(hydra_job_num=job["num"], hydra_overrides=job["overrides"], sweep_dir=job["sweep_dir"])
    return out


def _check_existing_manifest(video_dir: Path, prompts: Sequence[str], base_seed: int) -> None:
    """Refuse to resume into a folder whose videos were made for other prompts or seeds."""
    from evaluation.generators import MANIFEST_NAME, read_manifest

    if not (video_dir / MANIFEST_NAME).is_file():
        return
    for e in read_manifest(video_dir):
        i = int(e["index"])
        if i < len(prompts) and (e["prompt"] != prompts[i] or int(e["seed"]) != sample_seed(base_seed, i)):
            raise ValueError(
                f"{video_dir} holds videos made for another prompt list or seed (sample {i}: "
                f"{e['prompt']!r}, seed {e['seed']}); use another run_name / output_dir"
            )


def _serves_output_videos(generator_cfg: Any, video_dir: Path) -> bool:
    """Whether the generator config names the output's own video folder (a folder generator scoring in place)."""
    target = video_dir.resolve()
    if isinstance(generator_cfg, Mapping):
        return any(_serves_output_videos(v, video_dir) for v in generator_cfg.values())
    if isinstance(generator_cfg, (list, tuple)):
        return any(_serves_output_videos(v, video_dir) for v in generator_cfg)
    return isinstance(generator_cfg, str) and bool(generator_cfg) and Path(generator_cfg).resolve() == target


def run_evaluation(cfg: DictConfig) -> dict[str, Any] | None:
    """Run one evaluation described by ``cfg`` (see ``conf/eval.yaml``) in every process.

    Rank 0 holds ``<output_dir>/.lock`` for the whole run and checks the generator fingerprint recorded in
    ``<output_dir>/generator.json`` (:mod:`evaluation.fingerprint`): a folder never holds two generators'
    videos. Rank-local work runs in phases ending in sync points (:mod:`evaluation.dist_guard`): a rank
    that raises stops every rank at once, with its error in their messages.

    Returns:
        None when ``stop_after`` ended generation early (on every rank); else the report dict on
        rank 0 and an empty dict on the other ranks.
    """
    from hydra.utils import instantiate

    ctx = init_distributed(
        cfg.get("device", "auto"),
        cfg.get("dist_backend"),
        cfg.get("dist_timeout_s"),
        float(cfg.get("dist_peer_timeout_s") or 300.0),
        cfg.get("dist_sync_timeout_s"),
    )
    claim = contextlib.ExitStack()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # metric networks in true float32
        torch.backends.cudnn.allow_tf32 = False
        out_dir = Path(cfg.output_dir)
        video_dir = out_dir / "videos"
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

        fingerprint: dict[str, Any] = {}
        with ctx.phase("start"):
            names = [m for m in cfg.metrics]
            unknown = set(names) - set(METRIC_NAMES)
            if unknown:
                raise ValueError(f"unknown metrics {sorted(unknown)}; available: {METRIC_NAMES}")
            benchmark: Benchmark = instantiate(cfg.benchmark.adapter)
            items = benchmark.prompts()
            if cfg.get("limit_samples") is not None:
                items = items[: int(cfg.limit_samples)]
            prompts = [it.prompt for it in items]
            n = len(prompts)
            if n == 0:
                raise ValueError("the benchmark produced no prompts")
            base_seed = int(cfg.seed)
            if ctx.is_main:  # one job per folder, one generator per folder
                claim.enter_context(claim_output_dir(out_dir))
                gen_cfg = OmegaConf.to_container(cfg.generator, resolve=True)
                fingerprint = generator_fingerprint(gen_cfg, str(cfg.precision), video_dir)
                fingerprint["status"] = check_or_write_fingerprint(
                    out_dir, fingerprint, in_place=_serves_output_videos(gen_cfg, video_dir)
                )
            _check_existing_manifest(video_dir, prompts, base_seed)
        with ctx.phase("manifest"):  # after the sync: every rank has read the old manifest
            if ctx.is_main:
                write_manifest(
                    video_dir,
                    ({"index": i, "prompt": p, "seed": sample_seed(base_seed, i)} for i, p in enumerate(prompts)),
                )
        mine = shard_indices(n, ctx.rank, ctx.world_size)

        with ctx.phase("generation"):
            generator: VideoGenerator = instantiate(cfg.generator)
            for attr in ("name", "fps", "generate"):
                if not hasattr(generator, attr):
                    raise TypeError(
                        f"generator {type(generator).__name__} lacks '{attr}' "
                        "(see evaluation.generators.VideoGenerator)"
                    )
            made, existing, complete = generate_missing(
                generator,
                prompts,
                mine,
                video_dir,
                ctx,
                base_seed,
                int(cfg.batch_size),
                str(cfg.precision),
                None if cfg.get("stop_after") is None else int(cfg.stop_after),
            )
            gen_info = {"name": str(generator.name), "fps": float(generator.fps)}
            if callable(getattr(generator, "describe", None)):
                gen_info.update(generator.describe())
            del generator  # free its memory before the metric networks load
        if not _all_true(ctx, complete):
            log.warning("rank %d: stopped after %d new videos (stop_after); re-run to resume", ctx.rank, made)
            return None
        counts = torch.tensor([made, existing], dtype=torch.long, device=ctx.device)
        if ctx.world_size > 1:
            dist.all_reduce(counts)

        with ctx.phase("metric networks"):
            from evaluation.protocols import metric_config_key

            metric_keys = {
                m: metric_config_key(cfg, m) for m in names
            }  # the protocol picks the CLIPSIM implementation
            metrics = {m: instantiate(cfg.eval_metrics[metric_keys[m]]).to(ctx.device) for m in names}
            if "fvd" in metrics:  # the FVD metric does not register its network as a submodule
                metrics["fvd"].feature_extractor.to(ctx.device)
            clip = ClipSpec(**OmegaConf.to_container(cfg.generated_clip, resolve=True))
        values, details = score(
            metrics,
            benchmark,
            prompts,
            mine,
            video_dir,
            ctx,
            clip,
            int(cfg.score_batch_size),
            cfg.get("fvd_cache_dir"),
        )

        report: dict[str, Any] = {}
        with ctx.phase("report"):
            if ctx.is_main:
                from evaluation.protocols import markdown_report as protocol_markdown
                from evaluation.protocols import protocol_report, video_encoding

                metric_cfgs = {
                    m: OmegaConf.to_container(cfg.eval_metrics[metric_keys[m]], resolve=True) for m in names
                }
                counts_clips = details.pop("counts", {})
                report = {
                    "benchmark": {"name": benchmark.name},
                    "metrics_run": names,
                    "metrics": values,
                    "protocol": {
                        "num_samples": n,
                        "seeds_rule": SEEDS_RULE,
                        "base_seed": base_seed,
                        "precision": str(cfg.precision),
                        "generated_clip": clip.describe(),
                        "benchmark": benchmark.protocol(),
                        **{m: _metric_protocol(m, metrics[m], metric_cfgs[m]) for m in names},
                        **details,
                    },
                    "metric_configs": metric_cfgs,
                    "weights": weight_files(metric_cfgs),
                    "generator": {
                        **gen_info,
                        "config": OmegaConf.to_container(cfg.generator, resolve=True),
                        "fingerprint": fingerprint.get("fingerprint"),
                        "weights": fingerprint.get("weights"),
                    },
                    "paper": OmegaConf.to_container(cfg.benchmark.paper, resolve=True),
                    "eval_protocol": protocol_report(
                        cfg,
                        benchmark,
                        metrics,
                        clip,
                        n,
                        OmegaConf.to_container(cfg.benchmark.paper, resolve=True),
                        OmegaConf.select(cfg, "benchmark.paper_protocols", default=None),
                    ),
                    "counts": {"generated_samples": n, **counts_clips},
                    "generated_videos": video_encoding(video_dir, list(range(n)), writer_defaults=int(counts[0]) > 0),
                    "run": {
                        "world_size": ctx.world_size,
                        "device": str(ctx.device),
                        "host": socket.gethostname(),
                        "started": started,
                        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        "generated_this_run": int(counts[0]),
                        "found_on_disk": int(counts[1]),
                        "output_dir": str(out_dir.resolve()),
                        "generator_record": fingerprint.get("status"),
                        **_sweep_entries(cfg),
                    },
                }
                # temp file + rename: a kill leaves the previous report or the new one, never half of one
                json_path = atomic_write_text(
                    out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n"
                )
                md_path = atomic_write_text(out_dir / "report.md", protocol_markdown(report))
                log.info("report written to %s", json_path)
                if cfg.logger.get("wandb", False):
                    _log_wandb(cfg, report, md_path)
        return report
    finally:
        claim.close()
        ctx.close()
        if ctx.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
