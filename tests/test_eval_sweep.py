"""Evaluation sweeps: a real Hydra multirun of evaluate.py, one folder and report per job, one wandb group,
and the summary written by the SweepSummary callback at the end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from test_toy_benchmark import write_toy_conf

REPO = Path(__file__).resolve().parents[1]


def run_evaluate_py(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """``python evaluate.py <args>`` in this process (Hydra's command line, launcher and callbacks included)."""
    import evaluate

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [str(REPO / "evaluate.py"), *args])
    try:
        evaluate.main()
    finally:
        GlobalHydra.instance().clear()


def run_toy_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb: bool) -> Path:
    """``evaluate.py -m benchmark=toy generator=toy_real,toy_static`` on 4 tiny clips; returns the sweep folder."""
    conf = write_toy_conf(tmp_path / "conf")
    sweep = tmp_path / "sweep"
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_evaluate_py(
        monkeypatch,
        "-m",
        "--config-dir",
        str(conf),
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        f"hydra.sweep.dir={sweep}",
        "benchmark=toy",
        "eval_metrics=tiny_toy",
        "generator=toy_real,toy_static",  # the swept value
        "benchmark.adapter.num_samples=4",
        "benchmark.adapter.num_frames=8",
        "benchmark.adapter.height=32",
        "benchmark.adapter.width=48",
        # 8 frames spanning the clip (keyframe rate): at 16 fps the shape moves ~1 pixel in 8 frames at 32 high, which
        # the mp4 round trip of a 48x32 video can blur below motion_adherence's threshold
        "benchmark.adapter.fps=4",
        "generated_clip.frames=8",
        f"fvd_cache_dir={tmp_path / 'cache'}",
        f"logger.wandb={str(wandb).lower()}",
    )
    return sweep


def test_multirun_writes_one_report_per_job_and_a_summary(tmp_path, monkeypatch):
    sweep = run_toy_sweep(tmp_path, monkeypatch, wandb=False)
    reports = [json.loads((sweep / str(j) / "report.json").read_text()) for j in (0, 1)]
    assert [r["generator"]["name"] for r in reports] == ["toy_real", "toy_static"]  # one folder per job
    assert "generator=toy_real" in reports[0]["run"]["hydra_overrides"]
    groups = {r["run"]["wandb_group"] for r in reports}
    assert groups == {f"{tmp_path.name}/sweep"}  # every job in the sweep's wandb group

    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["swept"] == ["generator"]
    assert [j["overrides"]["generator"] for j in summary["jobs"]] == ["toy_real", "toy_static"]
    assert summary["metrics"][:3] == ["fvd", "color_adherence", "motion_adherence"]
    for job, report in zip(summary["jobs"], reports):
        assert job["metrics"] == report["metrics"]
    assert summary["jobs"][0]["metrics"]["motion_adherence"] == 1.0
    assert summary["jobs"][1]["metrics"]["motion_adherence"] == 0.0
    md = (sweep / "summary.md").read_text()
    assert "| job | generator | fvd | color_adherence | motion_adherence |" in md
    assert md.count("| toy_static |") == 1 and "| 0 | toy_real | " in md


def test_multirun_jobs_log_to_one_wandb_group(tmp_path, monkeypatch):
    """The same sweep with wandb (offline): each job's run is in the sweep's group."""
    sweep = run_toy_sweep(tmp_path, monkeypatch, wandb=True)
    group = f"{tmp_path.name}/sweep".encode()
    for j in (0, 1):
        runs = list((sweep / str(j) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1 and group in runs[0].read_bytes()
    assert (sweep / "summary.md").is_file()
