"""Sweeps of evaluations: ``python evaluate.py -m benchmark=toy generator=... a.b=1,2,3``.

Hydra's multirun runs one job per combination of the swept values. Each job evaluates into its own
folder ``<sweep dir>/<job number>`` (``evaluate.py``), records its command-line overrides in
``report.json`` (``run.hydra_overrides``) and logs to one wandb group per sweep (:func:`wandb_group`).
At the end, :class:`SweepSummary` (a Hydra callback configured in ``conf/eval.yaml``) reads every job's
``report.json`` and writes ``<sweep dir>/summary.json`` and ``<sweep dir>/summary.md``: the swept values
of each job beside its metrics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from show1_lightning.fileio import atomic_write_text

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"


def hydra_job() -> dict[str, Any] | None:
    """This job's place in a Hydra multirun (``{"num", "overrides", "output_dir", "sweep_dir"}``), or None
    outside a multirun (a single run, or a config composed without Hydra's runtime)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return {
        "num": int(hc.job.num),
        "overrides": list(hc.overrides.task),
        "output_dir": str(hc.runtime.output_dir),
        "sweep_dir": str(hc.sweep.dir),
    }


def wandb_group(configured: str | None, job: dict[str, Any] | None) -> str | None:
    """The wandb group of a run: the configured one, else (in a multirun) the sweep folder's name."""
    if configured:
        return str(configured)
    if job is None:
        return None
    sweep = Path(job["sweep_dir"])
    return f"{sweep.parent.name}/{sweep.name}"


def _parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect(sweep_dir: str | Path) -> dict[str, Any]:
    """Read every job's ``report.json`` under ``sweep_dir`` (one level down) into a summary.

    Returns:
        ``{"sweep_dir", "swept": [keys whose value differs between jobs], "metrics": [names],
        "jobs": [{"job", "overrides": {key: value}, "metrics": {name: value}, "report"}]}`` with jobs in
        job-number order (folders whose name is no number last, by name).
    """
    sweep_dir = Path(sweep_dir)
    jobs = []
    for path in sorted(sweep_dir.glob(f"*/{REPORT_NAME}")):
        report = json.loads(path.read_text())
        run = report.get("run", {})
        overrides = dict(_parse_override(o) for o in run.get("hydra_overrides") or [])
        jobs.append(
            {
                "job": run.get("hydra_job_num", path.parent.name),
                "overrides": overrides,
                "benchmark": report.get("benchmark", {}).get("name"),
                "generator": report.get("generator", {}).get("name"),
                "metrics": _scalar_metrics(report.get("metrics", {})),
                "report": str(path.relative_to(sweep_dir)),
            }
        )
    jobs.sort(
        key=lambda j: (not isinstance(j["job"], int), j["job"] if isinstance(j["job"], int) else 0, str(j["job"]))
    )
    keys: list[str] = []
    for j in jobs:
        keys += [k for k in j["overrides"] if k not in keys]
    swept = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1] or (keys if len(jobs) == 1 else [])
    names: list[str] = []
    for j in jobs:
        names += [m for m in j["metrics"] if m not in names]
    return {"sweep_dir": str(sweep_dir), "swept": swept, "metrics": names, "jobs": jobs}


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v).replace("|", "\\|")


def markdown(summary: dict[str, Any], extra_keys: Sequence[str] = ()) -> str:
    """``summary.md``: one row per job, its swept values, then its metrics."""
    keys = list(summary["swept"]) + [k for k in extra_keys if k not in summary["swept"]]
    head = ["job", *keys, *summary["metrics"]]
    lines = [
        f"# Evaluation sweep: {summary['sweep_dir']}",
        "",
        f"{len(summary['jobs'])} jobs; swept: {', '.join(summary['swept']) or 'nothing'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for j in summary["jobs"]:
        row = [j["job"], *(j["overrides"].get(k) for k in keys), *(j["metrics"].get(m) for m in summary["metrics"])]
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    lines.append("")
    return "\n".join(lines)


def write_summary(sweep_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` into ``sweep_dir``; return the summary."""
    summary = collect(sweep_dir)
    atomic_write_text(Path(sweep_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(Path(sweep_dir) / "summary.md", markdown(summary))
    return summary


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, the sweep's ``summary.json`` / ``summary.md``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarise the jobs' reports (a failed job, without a report, is left out and logged)."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            log.warning("sweep folder %s not found: no summary", sweep_dir)
            return
        summary = write_summary(sweep_dir)
        log.info("sweep summary of %d jobs: %s", len(summary["jobs"]), sweep_dir / "summary.md")
