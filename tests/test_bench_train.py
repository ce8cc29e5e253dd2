"""bench/bench_train.py --ab: the interleaved A/B timing runs both sides and reports their ratio."""

from __future__ import annotations

from pathlib import Path

import bench_train  # bench/ is on the test path (pyproject.toml)
from hydra.core.global_hydra import GlobalHydra


def test_ab_rounds_times_both_sides_alternately(toy_data_dir: Path, capsys) -> None:
    GlobalHydra.instance().clear()
    base = [f"paths.data_dir={toy_data_dir}", "data.batch_size=2"]
    bench_train.ab_rounds("toy", base, ["data.batch_size=1"], rounds=2, n=1, warmup=0)
    out = capsys.readouterr().out
    order = [line.split(":")[0] for line in out.splitlines() if line.startswith("round ")]
    assert order == ["round 1 A", "round 1 B", "round 2 A", "round 2 B"]
    assert "B: data.batch_size=1" in out and "B / A step time:" in out
    ratio = float(out.rsplit("B / A step time:", 1)[1].strip().rstrip("x"))
    assert ratio > 0
