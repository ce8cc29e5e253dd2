"""Evaluation protocols in reports: what the chosen protocol fixes, what the run actually used, which
published numbers are comparable with ours, how the scored videos were encoded, and ``report.md``.

A protocol is a ``conf/eval_protocol/*.yaml`` node (``cfg.eval_protocol``) that sets every
number-changing choice at once (FVD network, resize, covariance, distance, sample counts, real-clip
sampling, IS splits / repeats, CLIPSIM implementation). The metric and benchmark configs read it by
interpolation; a command-line override can still change one choice, and then the run no longer
follows the protocol: :func:`deviations` finds such differences by comparing the protocol with the
objects that computed the numbers, and :func:`comparability` shows a published number beside ours
only when the paper used the same protocol and the run did not deviate from it.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "conf" / "eval_protocol"
# Choices a run may change and still follow its protocol: FVD repeats score R generated sets, each of
# the protocol's size against the protocol's real statistics (each set's FVD is a protocol FVD).
FREE_CHOICES = ("fvd.repeats",)
LABELS = {
    "is": ("IS", "higher", "is_mean"),
    "fvd": ("FVD", "lower", "fvd"),
    "clipsim": ("CLIPSIM", "higher", "clipsim"),
    "color_adherence": ("colour adherence", "higher", "color_adherence"),
    "motion_adherence": ("motion adherence", "higher", "motion_adherence"),
}


def protocol_node(cfg: DictConfig) -> dict[str, Any]:
    """The resolved ``eval_protocol`` node (empty when the config has none)."""
    node = OmegaConf.select(cfg, "eval_protocol", default=None)
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}  # type: ignore[return-value]


def metric_config_key(cfg: DictConfig, name: str) -> str:
    """The ``eval_metrics`` key that implements metric ``name`` under the protocol.

    CLIPSIM has two implementations: ``clipsim`` (open_clip cosine) and ``clipscore`` (torchmetrics'
    CLIPScore arithmetic); ``eval_protocol.clipsim.metric`` picks one. Other metrics map to themselves.
    """
    if name == "clipsim":
        key = OmegaConf.select(cfg, "eval_protocol.clipsim.metric", default=None)
        if key is not None:
            if key not in cfg.eval_metrics:
                raise ValueError(
                    f"eval_protocol.clipsim.metric={key!r} names no entry of eval_metrics ({list(cfg.eval_metrics)})"
                )
            return str(key)
    return name


def declared_choices(protocol: Mapping[str, Any], benchmark: str, metrics: Sequence[str]) -> dict[str, Any]:
    """The protocol's choices for ``benchmark`` and the metrics run, as flat ``key: value``."""
    if not protocol:
        return {}
    out: dict[str, Any] = {"clip_frames": protocol.get("clip_frames")}
    if "fvd" in metrics:
        out.update({f"fvd.{k}": v for k, v in protocol.get("fvd", {}).items()})
    if "is" in metrics:
        out.update({f"is.{k}": v for k, v in protocol.get("is", {}).items()})
    if "clipsim" in metrics:
        out.update({f"clipsim.{k}": v for k, v in protocol.get("clipsim", {}).items()})
    bench = dict(protocol.get(benchmark, {}))
    real = bench.pop("real", {})
    if "fvd" not in metrics:
        bench.pop("fvd_generated", None)
    out.update({f"{benchmark}.{k}": v for k, v in bench.items()})
    if "fvd" in metrics:
        out.update({f"{benchmark}.real.{k}": v for k, v in real.items()})
    return out


def _network_name(metric: Any) -> str:
    net = metric.feature_extractor
    return str(getattr(net, "variant", type(net).__name__))


def actual_choices(
    benchmark: Any, metrics: Mapping[str, Any], generated_clip: Any, num_samples: int
) -> dict[str, Any]:
    """The same keys as :func:`declared_choices`, read from the objects that computed the numbers."""
    name = benchmark.name
    out: dict[str, Any] = {"clip_frames": generated_clip.frames}
    if "fvd" in metrics:
        f = metrics["fvd"]
        out.update(
            {
                "fvd.network": _network_name(f),
                "fvd.resize": f.resize,
                "fvd.covariance": f.covariance,
                "fvd.distance": getattr(f, "distance", "eigh_float64"),
                f"{name}.fvd_generated": getattr(f, "num_generated", None),
                "fvd.repeats": getattr(f, "repeats", 1),
            }
        )
        if f.clip_length != generated_clip.frames:
            out["clip_frames"] = f"{generated_clip.frames} (FVD clip_length {f.clip_length})"
        real = {
            "split": getattr(benchmark, "real_split", None),
            "clips": benchmark.real_clips,
            "sampling": benchmark.real_sampling,
            "start": benchmark.clip.start,
        }
        out.update({f"{name}.real.{k}": v for k, v in real.items()})
        if benchmark.clip.frames != generated_clip.frames:
            out["clip_frames"] = f"{generated_clip.frames} (real clips {benchmark.clip.frames})"
    if "is" in metrics:
        out.update({"is.num_splits": metrics["is"].num_splits, "is.repeats": metrics["is"].repeats})
    if "clipsim" in metrics:
        c = metrics["clipsim"]
        out.update({"clipsim.metric": "clipscore" if c.scale == "clipscore" else "clipsim", "clipsim.scale": c.scale})
    resolution = None if generated_clip.resolution is None else list(generated_clip.resolution)
    real_res = None if benchmark.clip.resolution is None else list(benchmark.clip.resolution)
    out[f"{name}.resolution"] = resolution if resolution == real_res else f"generated {resolution}, real {real_res}"
    out[f"{name}.clip_resize"] = (
        generated_clip.resize
        if generated_clip.resize == benchmark.clip.resize
        else f"generated {generated_clip.resize}, real {benchmark.clip.resize}"
    )
    if hasattr(benchmark, "num_samples"):
        out[f"{name}.num_samples"] = num_samples
    if hasattr(benchmark, "sampling"):
        out[f"{name}.sampling"] = benchmark.sampling
    return out


def pristine_protocol(name: str, folder: Path = PROTOCOL_DIR) -> dict[str, Any] | None:
    """The protocol ``name`` as its yaml file defines it (its ``defaults`` merged), or None if unknown."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        return None
    node = OmegaConf.load(path)
    merged = OmegaConf.create()
    for entry in list(node.pop("defaults", [])) or ["_self_"]:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, node)
        else:
            parent = pristine_protocol(str(entry), folder)
            if parent is None:
                return None
            merged = OmegaConf.merge(merged, parent)
    if "_self_" not in list(OmegaConf.load(path).get("defaults", ["_self_"])):
        merged = OmegaConf.merge(merged, node)
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and k != "comparable":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def overridden(protocol: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Entries of the composed ``eval_protocol`` node that differ from its yaml file (command-line
    overrides of the protocol itself): ``{"eval_protocol.<key>": {"protocol": file value, "used": value}}``."""
    if not protocol:
        return {}
    pristine = pristine_protocol(str(protocol.get("name")))
    if pristine is None:
        return {"eval_protocol": {"protocol": f"no conf/eval_protocol/{protocol.get('name')}.yaml", "used": "custom"}}
    a, b = _flatten(pristine), _flatten(protocol)
    return {
        f"eval_protocol.{k}": {"protocol": a.get(k), "used": b.get(k)}
        for k in sorted(set(a) | set(b))
        if _norm(a.get(k)) != _norm(b.get(k)) and k not in FREE_CHOICES
    }


def deviations(declared: Mapping[str, Any], actual: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Choices where the run did not use the protocol's value: ``{key: {"protocol": v, "used": w}}``."""
    out = {}
    for key, want in declared.items():
        if key in actual and _norm(actual[key]) != _norm(want) and key not in FREE_CHOICES:
            out[key] = {"protocol": want, "used": actual[key]}
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def comparability(
    protocol: Mapping[str, Any],
    benchmark: str,
    deviated: Mapping[str, Any],
    paper: Mapping[str, Mapping[str, float]],
    paper_protocols: Mapping[str, str],
) -> dict[str, dict[str, Any]]:
    """For each metric and published method: its value, its protocol, and whether it is comparable with ours.

    Comparable means: the paper's protocol is one of ``protocol.comparable[benchmark]`` (the same
    choices) and this run did not deviate from its protocol.
    """
    same = set((protocol.get("comparable") or {}).get(benchmark, [protocol.get("name")] if protocol else []))
    out: dict[str, dict[str, Any]] = {}
    for metric, rows in paper.items():
        out[metric] = {}
        for method, value in rows.items():
            theirs = str(paper_protocols.get(method, "unknown"))
            if deviated:
                ok, note = False, "different protocol (this run deviates from its protocol)"
            elif theirs in same:
                ok, note = True, "comparable"
            elif theirs == "unknown":
                ok, note = False, "different protocol (not stated by the paper)"
            else:
                ok, note = False, f"different protocol ({theirs})"
            out[metric][method] = {"value": value, "protocol": theirs, "comparable": ok, "note": note}
    return out


# ---------------------------------------------------------------------------- counts and encoding


def metric_counts(metrics: Mapping[str, Any], world_size: int, device: torch.device) -> dict[str, int]:
    """How many real / generated clips each metric saw, summed over processes (collective: every rank calls)."""
    keys, vals = [], []
    if "fvd" in metrics:
        keys += ["fvd_real_clips", "fvd_generated_clips"]
        vals += [float(metrics["fvd"].real_count), float(metrics["fvd"].fake_count)]
    if "is" in metrics:
        probs = metrics["is"].probs
        keys.append("is_generated_clips")
        vals.append(float(sum(p.shape[0] for p in probs) if isinstance(probs, list) else probs.shape[0]))
    if "clipsim" in metrics:
        c = metrics["clipsim"]
        if hasattr(c, "n_frames"):
            keys.append("clipsim_frames")
            vals.append(float(c.n_frames))
        if hasattr(c, "n_videos"):
            keys.append("clipsim_videos")
            vals.append(float(c.n_videos))
    for name in ("color_adherence", "motion_adherence"):
        if name in metrics:
            keys.append(f"{name}_videos")
            vals.append(float(metrics[name].total))
    if not keys:
        return {}
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t)
    return {k: int(round(float(v))) for k, v in zip(keys, t.cpu())}


def extra_values(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Values beside the headline ones: FVD per generated set (mean +- std), CLIPScore x100.

    Collective when FVD has repeats (every rank calls it after ``compute``)."""
    out: dict[str, Any] = {}
    f = metrics.get("fvd")
    if f is not None and getattr(f, "repeats", 1) > 1:
        f.compute()  # synced over processes (cached when already computed); sets repeat_values
        per_set = f.repeat_values
        out.update({"fvd_std": float(per_set.std(unbiased=False)), "fvd_repeats": [float(v) for v in per_set]})
    c = metrics.get("clipsim")
    if c is not None and getattr(c, "scale", "") == "clipscore":
        out["clipsim_x100"] = 100.0 * float(c.compute())  # torchmetrics' CLIPScore number
    return out


def video_encoding(video_dir: Path, indices: Sequence[int], writer_defaults: bool) -> dict[str, Any]:
    """Codec, pixel format, CRF (from the x264 settings string in the stream, when present) of the
    scored videos, probed on the first, middle and last one; and the runner's encoder settings."""
    import av

    from evaluation.generators import video_filename
    from show1_lightning.data.video_io import encode_mp4

    picks = sorted({indices[0], indices[len(indices) // 2], indices[-1]}) if indices else []
    probes = []
    for i in picks:
        path = video_dir / video_filename(i)
        if not path.is_file():
            continue
        with av.open(str(path)) as container:
            s = container.streams.video[0]
            cc = s.codec_context
            info: dict[str, Any] = {
                "file": path.name,
                "container": container.format.name,
                "codec": cc.name,
                "pix_fmt": cc.pix_fmt,
                "width": cc.width,
                "height": cc.height,
                "fps": float(s.average_rate) if s.average_rate else None,
            }
        head = path.read_bytes()[: 1 << 20]
        m = re.search(rb"x264 - core (\d+)[^\x00]*?options: ([^\x00]*)", head)
        if m:
            opts = m.group(2).decode("ascii", "replace")
            crf = re.search(r"\bcrf=([\d.]+)", opts)
            info.update(
                {
                    "encoder": f"x264 core {m.group(1).decode()}",
                    "crf": float(crf.group(1)) if crf else None,
                    "x264_options": opts,
                }
            )
        else:
            info["crf"] = "unknown (no x264 settings in the stream)"
        probes.append(info)
    keys = ("container", "codec", "pix_fmt", "crf")
    out: dict[str, Any] = {k: probes[0].get(k) for k in keys} if probes else {}
    out["consistent_over_probes"] = all(all(p.get(k) == probes[0].get(k) for k in keys) for p in probes)
    out["probes"] = probes
    if writer_defaults:
        crf = inspect.signature(encode_mp4).parameters["crf"].default
        out["runner_writer"] = (
            f"show1_lightning.data.video_io.encode_mp4: libx264, crf {crf}, preset veryfast, "
            "yuv420p, odd sizes padded by one edge pixel; scoring decodes these files"
        )
    return out


# ---------------------------------------------------------------------------- report.md


def _ours(name: str, metrics: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    label, better, key = LABELS[name]
    val = metrics[key]
    if name == "is":
        return f"{val:.2f} +- {metrics['is_std']:.2f}"
    if name == "fvd":
        return f"{val:.2f} +- {metrics['fvd_std']:.2f}" if "fvd_std" in metrics else f"{val:.2f}"
    if name != "clipsim":
        return f"{val:.4f}"
    scale = report["protocol"].get("clipsim", {}).get("scale")
    if scale == "clipscore":
        return f"{val:.4f} (x100: {100 * val:.2f})"
    if scale == "torchmetrics":
        return f"{val:.4f} (torchmetrics scale)"
    return f"{val:.4f}"


def markdown_report(report: Mapping[str, Any]) -> str:
    """``report.md``: our numbers beside the published ones that used the same protocol, then the protocol."""
    b = report["benchmark"]["name"]
    ep = report.get("eval_protocol", {})
    comp = ep.get("comparable_with", {})
    methods: list[str] = []
    for rows in report.get("paper", {}).values():
        methods += [m for m in rows if m not in methods]
    gen = report["generator"].get("name", "?")
    head = f"| benchmark | metric | ours ({gen}, protocol {ep.get('name', '?')}) |" + "".join(
        f" {m} |" for m in methods
    )
    lines = [
        f"# Evaluation: {b}",
        "",
        f"Protocol: **{ep.get('name', 'none')}** ({ep.get('title', '')}). "
        "A published number is shown only when it was measured under a comparable protocol.",
        "",
        head,
        "|" + "---|" * (3 + len(methods)),
    ]
    for name in report["metrics_run"]:
        label, better, _ = LABELS[name]
        cells = []
        for m in methods:
            c = comp.get(name, {}).get(m)
            cells.append("-" if c is None else (str(c["value"]) if c["comparable"] else "different protocol"))
        lines.append(
            f"| {b} | {label} ({better} is better) | {_ours(name, report['metrics'], report)} |"
            + "".join(f" {c} |" for c in cells)
        )
    lines += ["", "## Published numbers and the protocols they used", ""]
    for name in report["metrics_run"]:
        for m, c in comp.get(name, {}).items():
            lines.append(f"- {LABELS[name][0]}, {m}: {c['value']} (protocol: {c['protocol']}; {c['note']})")
    lines += ["", "## Protocol", ""]
    lines.append(f"- name: {ep.get('name')}; choices: {json.dumps(ep.get('choices', {}), default=str)}")
    dev = ep.get("deviations", {})
    lines.append(f"- deviations from the protocol: {json.dumps(dev, default=str) if dev else 'none'}")
    lines.append(f"- clips: {json.dumps(report.get('counts', {}))}")
    lines.append(
        f"- generated videos as scored: {json.dumps({k: v for k, v in report.get('generated_videos', {}).items() if k != 'probes'}, default=str)}"
    )
    p = report["protocol"]
    lines.append(f"- samples: {p['num_samples']}; world size: {report['run']['world_size']}; seeds: {p['seeds_rule']}")
    lines.append(f"- generated clips for IS / FVD: {json.dumps(p['generated_clip'])}")
    lines.append(f"- benchmark: {json.dumps(p['benchmark'], default=str)}")
    for name in report["metrics_run"]:
        lines.append(f"- {name}: {json.dumps(p.get(name, {}), default=str)}")
    lines.append(f"- weights: {json.dumps(report['weights'])}")
    lines.append("")
    return "\n".join(lines)


def protocol_report(
    cfg: DictConfig,
    benchmark: Any,
    metrics: Mapping[str, Any],
    generated_clip: Any,
    num_samples: int,
    paper: Mapping[str, Mapping[str, float]],
    paper_protocols: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The ``eval_protocol`` section of ``report.json``: name, every choice, deviations, comparability."""
    node = protocol_node(cfg)
    names = list(metrics)
    declared = declared_choices(node, benchmark.name, names)
    actual = actual_choices(benchmark, metrics, generated_clip, num_samples)
    dev = {**overridden(node), **deviations(declared, actual)}
    return {
        "name": node.get("name"),
        "title": node.get("title"),
        "choices": declared,
        "used": actual,
        "deviations": dev,
        "comparable_with": comparability(
            node, benchmark.name, dev, {k: v for k, v in paper.items() if k in names}, dict(paper_protocols or {})
        ),
    }
