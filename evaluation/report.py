"""The evaluation report: the protocol description of each metric, the weight hashes, the wandb log.

:func:`build_report` assembles ``report.json``'s content on rank 0 after scoring; :func:`write_report` writes
``report.json`` and ``report.md`` atomically and logs them to wandb when asked.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evaluation.benchmarks import Benchmark, ClipSpec
from evaluation.distributed import SEEDS_RULE, DistContext
from show1_lightning.fileio import atomic_write_text, sha256_file
from show1_lightning.wandb_mode import wandb_mode

log = logging.getLogger(__name__)

ADHERENCE_METRICS = ("color_adherence", "motion_adherence")  # benchmark=toy: evaluation.toy_benchmark


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


def _metric_protocol(name: str, metric: Any, cfg_node: Any, clip: ClipSpec) -> dict[str, Any]:
    if name == "is":
        return {
            "classifier": type(metric.classifier).__name__,
            "num_splits": metric.num_splits,
            "repeats": metric.repeats,
            "eps": metric.eps,
            "std": "population std over repeats x splits",
            "input": f"{clip.frames} frames (eval_protocol.clip_frames); C3D preprocessing: BGR*128, "
            "bilinear align_corners=True to 112, +128-mean crop",
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
    import wandb

    run = wandb.init(
        mode=wandb_mode(),  # offline unless WANDB_MODE says otherwise, as in train.py and generate.py
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


def _sweep_entries(cfg: DictConfig) -> dict[str, Any]:
    """Report entries of a Hydra multirun job (its overrides, number, wandb group); the group alone otherwise."""
    from evaluation.sweep import hydra_job, wandb_group

    job = hydra_job()
    out: dict[str, Any] = {"wandb_group": wandb_group(OmegaConf.select(cfg, "logger.group"), job)}
    if job is not None:
        out.update(hydra_job_num=job["num"], hydra_overrides=job["overrides"], sweep_dir=job["sweep_dir"])
    return out


def build_report(
    cfg: DictConfig,
    benchmark: Benchmark,
    names: list[str],
    metrics: Mapping[str, Any],
    metric_keys: Mapping[str, str],
    values: Mapping[str, float],
    details: dict[str, Any],
    clip: ClipSpec,
    n: int,
    base_seed: int,
    fingerprint: Mapping[str, Any],
    gen_info: Mapping[str, Any],
    ctx: DistContext,
    started: str,
    made: int,
    existing: int,
) -> dict[str, Any]:
    """The content of ``report.json``: every number and every protocol choice of one evaluation (rank 0).

    ``names``: the metrics run; ``metric_keys``: their ``eval_metrics`` config keys; ``values`` / ``details``: what
    :func:`evaluation.runner.score` returned; ``n``: number of samples; ``made`` / ``existing``: videos generated
    in this run / found on disk (summed over ranks).
    """
    from evaluation.protocols import protocol_report, video_encoding

    out_dir = Path(cfg.output_dir)
    video_dir = out_dir / "videos"
    metric_cfgs = {m: OmegaConf.to_container(cfg.eval_metrics[metric_keys[m]], resolve=True) for m in names}
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
            **{m: _metric_protocol(m, metrics[m], metric_cfgs[m], clip) for m in names},
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
        "generated_videos": video_encoding(video_dir, list(range(n)), writer_defaults=made > 0),
        "run": {
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "host": socket.gethostname(),
            "started": started,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "generated_this_run": made,
            "found_on_disk": existing,
            "output_dir": str(out_dir.resolve()),
            "generator_record": fingerprint.get("status"),
            **_sweep_entries(cfg),
        },
    }
    return report


def write_report(cfg: DictConfig, report: Mapping[str, Any]) -> Path:
    """Write ``report.json`` and ``report.md`` to ``cfg.output_dir`` (and log them to wandb when asked).

    Returns:
        The path of ``report.json``.
    """
    from evaluation.protocols import markdown_report as protocol_markdown

    out_dir = Path(cfg.output_dir)
    # temp file + rename: a kill leaves the previous report or the new one, never half of one
    json_path = atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    md_path = atomic_write_text(out_dir / "report.md", protocol_markdown(report))
    log.info("report written to %s", json_path)
    if cfg.logger.get("wandb", False):
        _log_wandb(cfg, report, md_path)
    return json_path
