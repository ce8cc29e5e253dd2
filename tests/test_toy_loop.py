"""scripts/toy_loop.py: reading evaluate.py's report (the loop died there once, after 29 minutes of training)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _toy_loop():
    spec = importlib.util.spec_from_file_location("toy_loop", ROOT / "scripts" / "toy_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_metrics_reads_evaluate_reports_floats() -> None:
    # The shape evaluate.py writes: metrics maps a name to its float (a prefix run has no FVD).
    report = {"benchmark": "toy", "metrics": {"color_adherence": 0.75, "motion_adherence": 0.15625}}
    assert _toy_loop().report_metrics(report) == {"fvd": None, "color_adherence": 0.75, "motion_adherence": 0.15625}
