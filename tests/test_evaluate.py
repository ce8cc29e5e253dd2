"""The evaluation runner: sharding, 2-process metric equality, resume, and evaluate.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fixtures_eval as fx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation.clipsim import CLIPSim
from evaluation.fvd import FVD
from evaluation.inception_score import InceptionScore
from evaluation.msrvtt_benchmark import MSRVTTBenchmark
from evaluation.runner import run_evaluation, sample_seed, shard_indices

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def test_shard_indices_cover_everything_once():
    for world in (1, 2, 3, 5):
        shards = [shard_indices(11, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(11))
    assert shard_indices(5, 1, 2) == [1, 3]
    assert sample_seed(100, 7) == 107
    with pytest.raises(ValueError):
        shard_indices(5, 2, 2)


# ---------------------------------------------------------------------------- 2 processes


def _metric_inputs():
    g = torch.Generator().manual_seed(1)
    videos = torch.rand(5, 3, 8, 24, 32, generator=g) * 2 - 1
    captions = [f"caption number {i}" for i in range(5)]
    return videos, captions


def _compute_metrics(rank: int, world: int) -> dict[str, float]:
    videos, captions = _metric_inputs()
    is_metric = InceptionScore(classifier=fx.TinyClassifier(seed=0), num_splits=2, batch_size=3)
    clip = CLIPSim(fx.tiny_clip(seed=0), frame_batch_size=8)
    fvd = FVD(feature_extractor=fx.TinyVideoFeatures(seed=0), clip_length=8, feature_batch_size=4)
    mine = shard_indices(5, rank, world)
    for i in mine:
        is_metric.update(videos[i : i + 1], indices=torch.tensor([i]))
        clip.update(videos[i : i + 1], captions[i : i + 1])
        # One clip per call: float32 network outputs can depend on the batch composition.
        fvd.update(videos[i : i + 1], real=False)
        fvd.update(videos[i : i + 1].flip(-1), real=True)
    mean, std = is_metric.compute()
    return {
        "is_mean": float(mean),
        "is_std": float(std),
        "clipsim": float(clip.compute()),
        "fvd": float(fvd.compute()),
    }


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = _compute_metrics(rank, world)
        Path(f"{out}.{rank}").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    # Same thread count as the workers: float32 network outputs depend on the BLAS split of the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _compute_metrics(0, 1)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    for rank in range(2):
        multi = json.loads((tmp_path / f"res.{rank}").read_text())
        for k, v in single.items():
            # Per-sample float32 features are computed with the same shapes either way; only the float64
            # state sums are added in another order: equal to ~1e-15 relative, so 1e-9 of the value's scale.
            assert multi[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert single["is_mean"] > 1.05  # the tiny classifier is not uniform: a real score


# ---------------------------------------------------------------------------- runner, resume


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalenv")
    ucf = fx.make_ucf101(root / "ucf", num_frames=20)
    msr = fx.make_msrvtt(root / "msr", num_frames=20)
    conf = root / "conf"
    fx.write_tiny_metrics_conf(conf)
    (conf / "generator").mkdir(parents=True, exist_ok=True)
    (conf / "generator" / "pattern.yaml").write_text("_target_: fixtures_eval.PatternGenerator\nnum_frames: 16\n")
    return {"root": root, "ucf": ucf, "msr": msr, "conf": conf}


def _compose(env, out: Path, *extra: str):
    return fx.compose_eval(env, out, *extra)


def _comparable(report: dict) -> dict:
    r = {k: v for k, v in report.items() if k != "run"}
    r["protocol"] = {k: v for k, v in r["protocol"].items() if k != "fvd_real_stats"}
    return r


def test_interrupted_evaluation_resumes_to_the_same_report(eval_env, tmp_path):
    full = run_evaluation(_compose(eval_env, tmp_path / "full"))
    assert set(full["metrics"]) == {"is_mean", "is_std", "fvd"}
    assert full["run"]["generated_this_run"] == 6 and full["protocol"]["num_samples"] == 6
    assert (
        full["protocol"]["fvd"]["covariance"] == "unbiased"
        and full["protocol"]["benchmark"]["real"]["real_clips"] == 3
    )
    assert (tmp_path / "full" / "report.md").read_text().count("| ucf101 |") == 2

    out = tmp_path / "resumed"
    assert run_evaluation(_compose(eval_env, out, "stop_after=2")) is None  # "killed" after 2 videos
    assert len(list((out / "videos").glob("*.mp4"))) == 2 and not (out / "report.json").exists()
    resumed = run_evaluation(_compose(eval_env, out))
    assert resumed["run"]["generated_this_run"] == 4 and resumed["run"]["found_on_disk"] == 2
    assert resumed["protocol"]["fvd_real_stats"]["source"] == "cache"
    assert _comparable(resumed) == _comparable(full)

    for name in ("000001.mp4", "000005.mp4"):  # lost videos are made again, same numbers
        (out / "videos" / name).unlink()
    again = run_evaluation(_compose(eval_env, out))  # same settings (bf16 here: refused, see test_eval_safety)
    assert again["run"]["generated_this_run"] == 2
    assert again["metrics"] == full["metrics"]
    assert json.loads((out / "report.json").read_text())["metrics"] == full["metrics"]


def test_runner_rejects_unknown_metric_and_foreign_video_folder(eval_env, tmp_path):
    with pytest.raises(ValueError, match="unknown metrics"):
        run_evaluation(_compose(eval_env, tmp_path / "bad", "metrics=[is,psnr]"))
    # Resuming into a folder made for other prompts would score the wrong videos: refused.
    assert run_evaluation(_compose(eval_env, tmp_path / "bad", "stop_after=1")) is None
    with pytest.raises(ValueError, match="another prompt list"):
        run_evaluation(_compose(eval_env, tmp_path / "bad", "benchmark.adapter.template='a clip of {words}'"))


# ---------------------------------------------------------------------------- evaluate.py end to end


def test_evaluate_py_end_to_end_msrvtt_folder_generator(eval_env, tmp_path):
    bench = MSRVTTBenchmark(eval_env["msr"], expected_videos=4)
    prompts = [it.prompt for it in bench.prompts()]
    folder = fx.make_generated_folder(
        tmp_path / "generated", prompts, [sample_seed(0, i) for i in range(len(prompts))]
    )
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}", WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [
        sys.executable,
        "evaluate.py",
        "--config-dir",
        str(eval_env["conf"]),
        "benchmark=msrvtt",
        "eval_metrics=tiny",
        f"assets.msrvtt_root={eval_env['msr']}",
        "benchmark.adapter.expected_videos=4",
        "benchmark.resolution=[64,64]",
        "generated_clip.frames=8",
        "benchmark.adapter.clip.frames=8",
        f"generator.root={folder}",
        "generator.name=fixture-folder",
        f"output_dir={out}",
        "fvd_cache_dir=null",
        "logger.wandb=true",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"]["name"] == "msrvtt" and report["metrics_run"] == ["clipsim", "fvd"]
    assert -1 <= report["metrics"]["clipsim"] <= 1 and report["metrics"]["fvd"] > 0
    p = report["protocol"]
    assert p["num_samples"] == 4 and p["benchmark"]["captions"] == "one" and p["clipsim"]["scale"] == "raw"
    assert p["generated_clip"]["resolution"] == [64, 64] and p["fvd"]["resize"] == "tf1_bilinear"
    assert report["generator"]["name"] == "fixture-folder" and report["run"]["world_size"] == 1
    assert report["paper"]["clipsim"]["Show-1"] == 0.3072
    md = (out / "report.md").read_text()
    assert "CLIPSIM" in md and "0.3072" in md and "FVD" in md
    assert any((out / "wandb").glob("offline-run-*"))
    # The generated videos were written by index, with the manifest: the folder can be re-scored.
    assert sorted(x.name for x in (out / "videos").glob("*.mp4")) == [f"{i:06d}.mp4" for i in range(4)]
    assert (out / "videos" / "manifest.jsonl").read_text().count("\n") == 4


def _runner_worker(rank: int, world: int, port: int, env: dict, out: str, result: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    report = run_evaluation(_compose(env, Path(out), "score_batch_size=1"))
    if rank == 0:
        Path(result).write_text(json.dumps(report))


@pytest.mark.slow
def test_two_process_runner_gives_the_one_process_report(eval_env, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_evaluation(_compose(eval_env, tmp_path / "one", "score_batch_size=1"))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(
        _runner_worker,
        args=(2, port, eval_env, str(tmp_path / "two"), str(tmp_path / "two.json")),
        nprocs=2,
        join=True,
    )
    multi = json.loads((tmp_path / "two.json").read_text())
    assert multi["run"]["world_size"] == 2
    for k, v in single["metrics"].items():
        # As in test_two_processes_equal_one_process: same per-sample shapes, float64 sums in another order.
        assert multi["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert _comparable(multi)["protocol"] == _comparable(single)["protocol"]


def test_save_intermediates_writes_a_folder_that_scores_the_prefix(eval_env, tmp_path):
    """``save_intermediates=true``: a generator's earlier-stage outputs land in ``intermediates/<stage>/`` with a
    manifest, so ``generator=folder`` scores the prefix without generating it again (scripts/toy_loop.py)."""
    from evaluation.generators import FolderGenerator

    (eval_env["conf"] / "generator" / "two_stage.yaml").write_text(
        "_target_: fixtures_eval.TwoStagePatternGenerator\nnum_frames: 16\n"
    )
    out = tmp_path / "two"
    run_evaluation(_compose(eval_env, out, "generator=two_stage", "save_intermediates=true", "metrics=[fvd]"))
    folder = out / "intermediates" / "first"
    assert sorted(p.name for p in folder.glob("*.mp4")) == [f"{i:06d}.mp4" for i in range(6)]
    manifest = [json.loads(line) for line in (out / "videos" / "manifest.jsonl").read_text().splitlines()]
    prompts, seeds = [e["prompt"] for e in manifest], [e["seed"] for e in manifest]
    prefix = FolderGenerator(folder).generate(prompts, seeds)
    final = FolderGenerator(out / "videos").generate(prompts, seeds)
    assert prefix.shape[2] == 8 and final.shape[2] == 16
    # the same frames, each through its own mp4 encode and decode
    assert (prefix - final[:, :, ::2]).abs().mean() < 0.02
    scored = run_evaluation(
        _compose(eval_env, tmp_path / "prefix", "generator=folder", f"generator.root={folder}", "metrics=[fvd]")
    )
    assert scored is not None and "fvd" in scored["metrics"]
    for i in range(6):  # copied as they are, not decoded and encoded a second time (lossy)
        assert (tmp_path / "prefix" / "videos" / f"{i:06d}.mp4").read_bytes() == (folder / f"{i:06d}.mp4").read_bytes()
    plain = tmp_path / "plain"
    run_evaluation(_compose(eval_env, plain, "generator=two_stage", "metrics=[fvd]"))  # off by default
    assert not (plain / "intermediates").exists()
