"""The shared homes of utilities: precision names, build-once caches, plain config values, the one resize rule,
the benchmark registry, and the import layering (show1_lightning never imports evaluation)."""

from __future__ import annotations

import ast
import json
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from show1_lightning.fileio import DONE_MARKER, build_once
from show1_lightning.plain import plain
from show1_lightning.precision import autocast, inference_precision, to_dtype
from show1_lightning.video_ops import resize_cover_crop

ROOT = Path(__file__).resolve().parents[1]


def test_precision_spellings_map_to_one_dtype() -> None:
    for name in ("32", "fp32", "float32", "32-true"):
        assert to_dtype(name) is torch.float32 and inference_precision(name) == "32"
    for name in ("bf16", "bfloat16", "bf16-mixed", "torch.bfloat16"):
        assert to_dtype(name) is torch.bfloat16 and inference_precision(name) == "bf16"
    assert to_dtype("16-mixed") is torch.float16 and to_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="unknown VAE dtype"):
        to_dtype("int8", what="VAE dtype")
    with pytest.raises(ValueError, match="inference precision"):
        inference_precision("16-mixed")
    with autocast("cpu", "bf16-mixed"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


def test_build_once_builds_once_rebuilds_when_stale_and_serialises_processes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    calls: list[int] = []

    def build(version: int):
        def run() -> dict:
            calls.append(version)
            root.mkdir(exist_ok=True)
            (root / "data.txt").write_text(str(version))
            return {"version": version}

        return run

    threads = [
        threading.Thread(target=build_once, args=(root, lambda d: d == {"version": 1}, build(1))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]  # the waiting callers found the marker
    assert json.loads((root / DONE_MARKER).read_text()) == {"version": 1}
    assert build_once(root, lambda d: d == {"version": 2}, build(2)) == {"version": 2}
    assert calls == [1, 2] and (root / "data.txt").read_text() == "2"

    def broken() -> dict:
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError):
        build_once(root, lambda d: d == {"version": 3}, broken)
    assert not (root / DONE_MARKER).exists()  # a half-built folder is never taken as done


def test_plain_turns_configs_paths_and_tuples_into_plain_values(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"a": [1, 2], "b": {"c": "${a}"}})
    assert plain(cfg) == {"a": [1, 2], "b": {"c": [1, 2]}}
    assert plain({"p": tmp_path, "t": (1, (2, 3))}) == {"p": str(tmp_path), "t": [1, [2, 3]]}


def test_resize_cover_crop_is_shared_by_training_and_evaluation() -> None:
    from evaluation.benchmarks import ClipSpec, cut_clip
    from show1_lightning.data.shards import resize_center_crop

    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 48, 80, 3), generator=g, dtype=torch.uint8)
    video = frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # 3 x T x H x W in [-1, 1]
    for size in ((24, 24), (96, 96)):  # shrinking (antialiased) and enlarging
        ours = resize_cover_crop(video, size)
        assert ours.shape == (3, 4, *size)
        assert torch.equal(resize_center_crop(video, *size), ours)
        evaluated = cut_clip(frames.numpy(), ClipSpec(frames=4, stride=1, start="first", resolution=list(size)), 0)
        assert torch.allclose(evaluated, ours, atol=1e-6)
    batched = resize_cover_crop(video[None].repeat(2, 1, 1, 1, 1), (24, 24))
    assert torch.equal(batched[1], resize_cover_crop(video, (24, 24)))


def test_benchmark_registry() -> None:
    from evaluation.benchmarks import BENCHMARKS, benchmark_class
    from evaluation.msrvtt_benchmark import MSRVTTBenchmark
    from evaluation.ucf101_benchmark import UCF101Benchmark

    assert benchmark_class("ucf101") is UCF101Benchmark and benchmark_class("msrvtt") is MSRVTTBenchmark
    for name in BENCHMARKS:
        target = OmegaConf.load(ROOT / "conf" / "benchmark" / f"{name}.yaml").adapter._target_
        assert target == BENCHMARKS[name]  # the configs and the registry name the same class
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmark_class("kinetics")


def test_show1_lightning_never_imports_evaluation() -> None:
    offenders = []
    for path in (ROOT / "show1_lightning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "evaluation"]
    assert not offenders


def test_launcher_ranks_one_rule_for_training_and_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's variables win; SLURM's count only where asked (evaluation) and for multi-task steps; the data
    module and the evaluation's process group read the same values."""
    from evaluation.distributed import init_distributed
    from show1_lightning.data.datamodule import resolve_rank
    from show1_lightning.ranks import launcher_ranks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_ranks() is None and resolve_rank() == (0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launcher_ranks() == (3, 4, 1, "slurm")
    assert launcher_ranks(slurm=False) is None and resolve_rank() == (0, 1)  # no process group: one process
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert launcher_ranks() == (0, 1, 0, "torchrun") == launcher_ranks(slurm=False)
    ctx = init_distributed(device="cpu")
    try:
        assert (ctx.rank, ctx.world_size) == resolve_rank() == (0, 1)
    finally:
        ctx.close()
