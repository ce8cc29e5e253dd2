"""scripts/toy_loop.py: reading evaluate.py's report (the loop died there once, after 29 minutes of training)."""

import toy_loop  # scripts/ is on the test path (pyproject.toml)


def test_report_metrics_reads_evaluate_reports_floats() -> None:
    # The shape evaluate.py writes: metrics maps a name to its float (a prefix run has no FVD).
    report = {"benchmark": "toy", "metrics": {"color_adherence": 0.75, "motion_adherence": 0.15625}}
    assert toy_loop.report_metrics(report) == {
        "fvd": None,
        "color_adherence": 0.75,
        "motion_adherence": 0.15625,
    }
