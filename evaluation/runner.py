"""The distributed, resumable evaluation loop: generate the missing videos, score them, hand over to the report.

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

Process group, sharding and seeds: :mod:`evaluation.distributed`; the report: :mod:`evaluation.report`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from evaluation.benchmarks import Benchmark, ClipSpec, cut_clip
from evaluation.distributed import (  # noqa: F401 (shard_indices, sample_seed: the runner's public rules)
    DistContext,
    all_true,
    broadcast_bool,
    init_distributed,
    sample_seed,
    shard_indices,
)
from evaluation.fingerprint import check_or_write_fingerprint, claim_output_dir, generator_fingerprint
from evaluation.generators import VideoGenerator, video_filename, write_manifest
from evaluation.report import ADHERENCE_METRICS, build_report, write_report
from show1_lightning.data.video_io import decode_video, to_uint8_frames, write_mp4
from show1_lightning.fileio import atomic_write_bytes
from show1_lightning.precision import autocast

log = logging.getLogger(__name__)

METRIC_NAMES = ("is", "fvd", "clipsim", *ADHERENCE_METRICS)


# ---------------------------------------------------------------------------- generation


def _batches(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(items), size):
        yield list(items[s : s + size])


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
    intermediates_dir: Path | None = None,
) -> tuple[int, int, bool]:
    """Generate and write every missing video of ``indices``.

    With ``intermediates_dir``, a generator that exposes ``last_intermediates`` (stage name -> its output of the last
    call; the cascade's earlier stages) also has them written, as ``<intermediates_dir>/<stage>/<index>.mp4``.

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
    copy_from = getattr(generator, "source_file", None)  # a folder generator: its files as they are
    for batch in _batches(todo_now, batch_size):
        seeds = [sample_seed(base_seed, i) for i in batch]
        sources = [copy_from(prompts[i], s) for i, s in zip(batch, seeds)] if copy_from else [None]
        if all(src is not None for src in sources):
            for i, src in zip(batch, sources):
                atomic_write_bytes(video_dir / video_filename(i), src.read_bytes())
            made += len(batch)
            continue
        with torch.no_grad(), autocast(ctx.device.type, precision):
            videos = generator.generate([prompts[i] for i in batch], seeds)
        if videos.ndim != 5 or videos.shape[0] != len(batch) or videos.shape[1] != 3:
            raise ValueError(
                f"generator returned shape {tuple(videos.shape)} for {len(batch)} prompts; expected B x 3 x T x H x W"
            )
        folders = {video_dir: videos}
        if intermediates_dir is not None:
            for name, outputs in (getattr(generator, "last_intermediates", None) or {}).items():
                folders[intermediates_dir / name] = outputs.clamp(-1, 1)
        for folder, outputs in folders.items():
            for i, video in zip(batch, outputs.float()):
                write_mp4(folder / video_filename(i), to_uint8_frames(video), fps=float(generator.fps))
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
    cached = broadcast_bool(ctx, bool(path is not None and path.is_file()))
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


# ---------------------------------------------------------------------------- entry


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
        entries = [{"index": i, "prompt": p, "seed": sample_seed(base_seed, i)} for i, p in enumerate(prompts)]
        inter_dir = out_dir / "intermediates" if cfg.get("save_intermediates") else None
        with ctx.phase("manifest"):  # after the sync: every rank has read the old manifest
            if ctx.is_main:
                write_manifest(video_dir, entries)
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
                inter_dir,
            )
            if inter_dir is not None and ctx.is_main:  # each stage folder: what generator=folder scores
                for name in getattr(generator, "intermediate_names", ()):
                    write_manifest(inter_dir / name, entries)
            gen_info = {"name": str(generator.name), "fps": float(generator.fps)}
            if callable(getattr(generator, "describe", None)):
                gen_info.update(generator.describe())
            del generator  # free its memory before the metric networks load
        if not all_true(ctx, complete):
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
                report = build_report(
                    cfg,
                    benchmark,
                    names,
                    metrics,
                    metric_keys,
                    values,
                    details,
                    clip,
                    n,
                    base_seed,
                    fingerprint,
                    gen_info,
                    ctx,
                    started,
                    made=int(counts[0]),
                    existing=int(counts[1]),
                )
                write_report(cfg, report)
        return report
    finally:
        claim.close()
        ctx.close()
        if ctx.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
