"""Evaluation protocols (conf/eval_protocol/): what each preset sets, TATS's real-clip preprocessing and
window sampling, StyleGAN-V's first-sorted sampling, FVD repeats, and reports that say what is comparable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fixtures_eval as fx
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from evaluation.benchmarks import resize_short_side_crop_tats
from evaluation.fvd import FVD
from evaluation.protocols import comparability, deviations, overridden, pristine_protocol
from evaluation.runner import run_evaluation, sample_seed
from evaluation.ucf101_benchmark import UCF101Benchmark
from show1_lightning.data.video_io import decode_video

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PROTOCOLS = ("tf_fvd", "tats", "show1", "stylegan_v_16f", "stylegan_v_128f")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="eval", overrides=list(overrides)), resolve=True)


def test_tf_fvd_is_the_default_and_keeps_the_previous_settings():
    # The values every metric and benchmark had before protocols existed (tf_fvd must not move a number).
    for bench in ("ucf101", "msrvtt"):
        default, tf = _compose(f"benchmark={bench}"), _compose(f"benchmark={bench}", "eval_protocol=tf_fvd")
        assert default == tf and default["eval_protocol"]["name"] == "tf_fvd"
    c = _compose("benchmark=ucf101")
    fvd, is_, a = c["eval_metrics"]["fvd"], c["eval_metrics"]["is"], c["benchmark"]["adapter"]
    assert (
        fvd["clip_length"],
        fvd["resize"],
        fvd["covariance"],
        fvd["distance"],
        fvd["num_generated"],
        fvd["repeats"],
    ) == (16, "tf1_bilinear", "unbiased", "eigh_float64", None, 1)
    assert fvd["feature_extractor"]["variant"] == "tf"
    assert (is_["num_splits"], is_["repeats"]) == (10, 1)
    assert (a["num_samples"], a["sampling"], a["real_split"], a["real_clips"], a["real_sampling"]) == (
        10000,
        "proportional",
        "train",
        10000,
        "permutation",
    )
    assert a["clip"] == {
        "frames": 16,
        "stride": 1,
        "start": "random",
        "resolution": None,
        "resize": "cover_antialias",
        "seed": 0,
    }
    assert c["generated_clip"] == {
        "frames": 16,
        "stride": 1,
        "start": "first",
        "resolution": None,
        "resize": "cover_antialias",
        "seed": 0,
    }
    m = _compose("benchmark=msrvtt")
    assert m["benchmark"]["resolution"] == [256, 256] and m["benchmark"]["adapter"]["real_clips"] is None
    assert m["eval_protocol"]["clipsim"] == {"metric": "clipsim", "scale": "raw"}


def test_tats_and_show1_set_every_tats_choice():
    for name in ("tats", "show1"):
        c = _compose("benchmark=ucf101", f"eval_protocol={name}")
        fvd, a = c["eval_metrics"]["fvd"], c["benchmark"]["adapter"]
        assert fvd["feature_extractor"]["variant"] == "tats"  # BN eps 1e-5
        assert (fvd["resize"], fvd["covariance"], fvd["distance"], fvd["num_generated"]) == (
            "bilinear",
            "unbiased",
            "tfgan_svd_float32",
            2048,
        )
        assert (a["num_samples"], a["sampling"], a["real_split"], a["real_clips"], a["real_sampling"]) == (
            10000,
            "uniform",
            "train",
            2048,
            "all_windows",
        )
        assert a["clip"]["resolution"] == [128, 128] and a["clip"]["resize"] == "tats_short_side"
        assert c["generated_clip"]["resolution"] == [128, 128] and c["generated_clip"]["resize"] == "tats_short_side"
    show1 = _compose("benchmark=msrvtt", "eval_protocol=show1")
    assert show1["eval_metrics"]["fvd"]["num_generated"] is None  # FVD on all 2,990 MSR-VTT samples
    assert show1["eval_protocol"]["clipsim"]["metric"] == "clipscore"
    assert show1["eval_metrics"]["clipscore"]["_target_"] == "evaluation.clipsim.CLIPScoreSim"
    sg = _compose("benchmark=ucf101", "eval_protocol=stylegan_v_128f")
    assert (sg["eval_metrics"]["fvd"]["covariance"], sg["eval_metrics"]["fvd"]["distance"]) == (
        "biased",
        "scipy_sqrtm",
    )
    assert (
        sg["benchmark"]["adapter"]["real_sampling"] == "first_sorted"
        and sg["eval_metrics"]["fvd"]["clip_length"] == 128
    )
    assert sg["generated_clip"]["frames"] == 128 and sg["benchmark"]["adapter"]["clip"]["frames"] == 128


def test_every_protocol_file_matches_its_composed_node():
    for name in PROTOCOLS:
        node = _compose(f"eval_protocol={name}")["eval_protocol"]
        assert node == pristine_protocol(name) and overridden(node) == {}
    node = _compose("eval_protocol=tats", "eval_protocol.ucf101.real.clips=16", "eval_protocol.fvd.repeats=4")[
        "eval_protocol"
    ]
    assert overridden(node) == {"eval_protocol.ucf101.real.clips": {"protocol": 2048, "used": 16}}


def test_tats_short_side_resize_truncates_like_tats_float32_arithmetic():
    # Frames already R x R (the resize is an exact copy): TATS computes ((c / 255 - 0.5) + 0.5) * 255 in
    # float32 and truncates (.byte()), which turns some levels c into c - 1. Independent numpy emulation.
    levels = np.arange(256, dtype=np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (256, 4, 4, 3)).copy()
    out = resize_short_side_crop_tats(frames, 4)
    c = levels.astype(np.float32) / np.float32(255)
    expected = ((c - np.float32(0.5) + np.float32(0.5)) * np.float32(255)).astype(np.uint8)
    assert out.shape == (256, 4, 4, 3)
    assert np.array_equal(out[:, 0, 0, 0], expected)
    assert (expected != levels).any()  # the truncation is real: some levels drop by one
    # Shape rule: short side to R, long side ceil(L * R / S), centre crop at floor((L' - R) / 2).
    g = np.random.default_rng(0).integers(0, 256, (2, 24, 33, 3), dtype=np.uint8)
    x = torch.from_numpy(g).permute(0, 3, 1, 2).float() / 255
    full = torch.nn.functional.interpolate(x, size=(16, 22), mode="bilinear", align_corners=False)  # ceil(33*16/24)=22
    ref = ((full[..., :, 3:19] - 0.5 + 0.5) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(resize_short_side_crop_tats(g, 16), ref)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    return fx.make_ucf101(tmp_path_factory.mktemp("ucf"), num_frames=20)


def test_all_windows_sampling_draws_distinct_stride1_windows(ucf):
    bench = UCF101Benchmark(ucf, real_clips=12, real_sampling="all_windows", clip={"frames": 16, "start": "random"})
    windows = bench._tats_windows()
    # 6 train videos x (20 - 16 + 1) windows = 30 windows; 12 drawn without replacement.
    assert len(windows) == 12 == bench.num_real_clips() and len(set(windows)) == 12
    assert all(0 <= s <= 4 for _, s in windows) and {p for p, _ in windows} <= set(bench.reference_videos())
    path, start = windows[3]
    frames = decode_video(path).frames
    expected = torch.from_numpy(frames[start : start + 16]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.equal(bench.real_clip(3), expected)
    again = UCF101Benchmark(ucf, real_clips=12, real_sampling="all_windows", clip={"frames": 16})._tats_windows()
    assert again == windows  # seeded
    with pytest.raises(RuntimeError, match="only 30 windows"):
        UCF101Benchmark(ucf, real_clips=31, real_sampling="all_windows", clip={"frames": 16})._tats_windows()
    assert bench.real_protocol()["real_sampling"] == "all_windows"


def test_first_sorted_sampling_takes_sorted_videos_long_enough(ucf):
    bench = UCF101Benchmark(ucf, real_clips=4, real_sampling="first_sorted", clip={"frames": 16})
    chosen = bench._first_sorted_videos()
    assert chosen == sorted(bench.reference_videos(), key=str)[:4]
    too_long = UCF101Benchmark(ucf, real_clips=4, real_sampling="first_sorted", clip={"frames": 21})
    with pytest.raises(RuntimeError, match="no reference video has 21 frames"):
        too_long.num_real_clips()


def test_uniform_class_sampling(ucf):
    bench = UCF101Benchmark(ucf, num_samples=7, sampling="uniform")
    counts = {c: sum(it.source == c for it in bench.prompts()) for c in fx.UCF_CLASSES}
    assert sorted(counts.values()) == [2, 2, 3]  # equal quotas (largest remainder), not the 3/2/1 train split
    assert bench.protocol()["prompt_distribution"] == "every class equally (TATS)"


def test_fvd_repeats_score_each_generated_set_on_its_own():
    g = torch.Generator().manual_seed(0)
    real, fake = (
        torch.randn(300, 6, generator=g, dtype=torch.float64),
        torch.randn(90, 6, generator=g, dtype=torch.float64) + 0.3,
    )
    rep = FVD(feature_extractor=nn.Identity(), num_features=6, num_generated=30, repeats=3)
    rep.add_features(real, real=True)
    rep.features = lambda v: v.to(torch.float64)  # videos are the features here
    for start in range(0, 95, 19):  # batches across set boundaries; index 90+ is beyond 3 x 30: skipped
        idx = torch.arange(start, min(start + 19, 95))
        rep.update(torch.cat([fake, fake[:5]])[idx], real=False, indices=idx)
    per_set = rep.compute_repeats()
    for r in range(3):
        one = FVD(feature_extractor=nn.Identity(), num_features=6)
        one.add_features(real, real=True)
        one.add_features(fake[30 * r : 30 * (r + 1)], real=False)
        # Same float64 sums accumulated in another order: 1e-9 relative.
        assert abs(float(per_set[r]) - float(one.compute())) <= 1e-9 * float(one.compute())
    assert float(rep.compute()) == pytest.approx(float(per_set.mean()), rel=1e-12)
    assert int(rep.fake_count) == 90
    with pytest.raises(ValueError, match="needs num_generated"):
        FVD(feature_extractor=nn.Identity(), repeats=2)


@pytest.mark.slow  # ~15 s: two spawned processes import torch
def test_fvd_repeats_are_exact_over_two_processes(tmp_path):
    import fvd_repeats_worker as w
    import torch.multiprocessing as mp

    single = w.repeats_fvd(0, 1)
    mp.spawn(w.worker, args=(2, str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2, join=True)
    for rank in range(2):
        multi = json.loads((tmp_path / f"res.{rank}").read_text())
        # float64 sums over interleaved shards: equal to 1e-9 relative (the mean and each set).
        assert multi == pytest.approx(single, rel=1e-9, abs=0)


def test_comparability_shows_published_rows_only_under_the_same_protocol():
    proto = {"name": "show1", "comparable": {"ucf101": ["show1", "tats"]}}
    paper = {"fvd": {"Show-1": 394.46, "Make-A-Video": 367.23, "X": 1.0}}
    who = {"Show-1": "show1", "Make-A-Video": "unknown", "X": "stylegan_v_16f"}
    c = comparability(proto, "ucf101", {}, paper, who)["fvd"]
    assert c["Show-1"]["comparable"] and c["Show-1"]["note"] == "comparable"
    assert c["Make-A-Video"]["note"] == "different protocol (not stated by the paper)"
    assert c["X"]["note"] == "different protocol (stylegan_v_16f)"
    dev = deviations({"fvd.resize": "bilinear", "fvd.repeats": 1}, {"fvd.resize": "tf1_bilinear", "fvd.repeats": 1})
    assert dev == {"fvd.resize": {"protocol": "bilinear", "used": "tf1_bilinear"}}
    c = comparability(proto, "ucf101", dev, paper, who)["fvd"]
    assert not c["Show-1"]["comparable"] and "deviates" in c["Show-1"]["note"]


# ---------------------------------------------------------------------------- reports end to end


@pytest.fixture(scope="module")
def eval_env(tmp_path_factory, ucf):
    root = tmp_path_factory.mktemp("protoenv")
    conf = root / "conf"
    fx.write_tiny_metrics_conf(conf)
    (conf / "generator").mkdir(parents=True, exist_ok=True)
    (conf / "generator" / "pattern.yaml").write_text("_target_: fixtures_eval.PatternGenerator\nnum_frames: 16\n")
    return {"root": root, "ucf": ucf, "conf": conf}


def _run(env, out: Path, *extra: str) -> dict:
    overrides = [
        f"hydra.searchpath=[file://{env['conf']}]",
        "eval_metrics=tiny",
        "generator=pattern",
        f"assets.ucf101_root={env['ucf']}",
        f"output_dir={out}",
        f"fvd_cache_dir={env['root'] / 'cache'}",
        "logger.wandb=false",
        "batch_size=3",
        "score_batch_size=3",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return run_evaluation(compose(config_name="eval", overrides=overrides))


def test_show1_report_names_protocol_choices_counts_codec_and_comparability(eval_env, tmp_path):
    report = _run(
        eval_env,
        tmp_path / "run",
        "eval_protocol=show1",
        "benchmark.adapter.num_samples=6",
        "benchmark.adapter.real_clips=10",
        "eval_metrics.fvd.clip_length=16",
        "+eval_metrics.fvd.num_generated=4",
    )
    ep = report["eval_protocol"]
    assert (
        ep["name"] == "show1" and ep["choices"]["fvd.network"] == "tats" and ep["choices"]["ucf101.real.clips"] == 2048
    )
    # What the run changed is named, the tiny test networks included; so nothing is "comparable".
    assert set(ep["deviations"]) == {
        "fvd.network",
        "fvd.resize",
        "fvd.distance",
        "ucf101.num_samples",
        "ucf101.real.clips",
        "ucf101.fvd_generated",
        "is.num_splits",
    }
    assert (
        ep["used"]["ucf101.real.sampling"] == "all_windows" and ep["used"]["ucf101.clip_resize"] == "tats_short_side"
    )
    assert all(not c["comparable"] for rows in ep["comparable_with"].values() for c in rows.values())
    assert report["counts"] == {
        "generated_samples": 6,
        "fvd_real_clips": 10,
        "fvd_generated_clips": 4,
        "is_generated_clips": 6,
    }
    enc = report["generated_videos"]
    assert (enc["container"].split(",")[0], enc["codec"], enc["pix_fmt"], enc["crf"]) == (
        "mov",
        "h264",
        "yuv420p",
        18.0,
    )
    assert enc["consistent_over_probes"] and "crf 18" in enc["runner_writer"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Protocol: **show1**" in md and md.count("| ucf101 |") == 2 and "35.42" not in md.split("## Published")[0]
    assert "different protocol (this run deviates from its protocol)" in md and "394.46" in md


def test_fvd_repeats_in_the_report(eval_env, tmp_path):
    report = _run(
        eval_env,
        tmp_path / "run",
        "benchmark.adapter.num_samples=6",
        "benchmark.adapter.real_clips=4",
        "metrics=[fvd]",
        "eval_metrics.fvd.clip_length=16",
        "+eval_metrics.fvd.num_generated=3",
        "+eval_metrics.fvd.repeats=2",
    )
    v = report["metrics"]
    assert len(v["fvd_repeats"]) == 2 and v["fvd"] == pytest.approx(np.mean(v["fvd_repeats"]), rel=1e-12)
    assert v["fvd_std"] == pytest.approx(np.std(v["fvd_repeats"]), rel=1e-9) and v["fvd_std"] > 0
    assert report["protocol"]["fvd"]["repeats"] == 2 and report["counts"]["fvd_generated_clips"] == 6
    dev = report["eval_protocol"]["deviations"]
    assert "ucf101.fvd_generated" in dev and "fvd.repeats" not in dev  # R sets of the protocol's size still follow it
    row = next(
        line for line in (tmp_path / "run" / "report.md").read_text().splitlines() if line.startswith("| ucf101 | FVD")
    )
    assert f"{v['fvd']:.2f} +- {v['fvd_std']:.2f}" in row


def test_show1_msrvtt_clipscore_run_is_comparable_with_show1(eval_env, tmp_path):
    from test_clipscore import make_tiny_hf_clip

    msr = fx.make_msrvtt(tmp_path / "msr", num_frames=20)
    hf = make_tiny_hf_clip(tmp_path / "hf_clip", seed=2)
    conf = tmp_path / "conf"
    (conf / "eval_metrics").mkdir(parents=True)
    (conf / "eval_metrics" / "tiny_hf.yaml").write_text(
        "clipscore:\n  _target_: evaluation.clipsim.CLIPScoreSim\n"
        f"  clip: {{_target_: evaluation.clipsim.load_hf_clip, path: {hf}}}\n  frame_batch_size: 8\n"
    )
    (conf / "generator").mkdir(parents=True)
    (conf / "generator" / "pattern.yaml").write_text("_target_: fixtures_eval.PatternGenerator\nnum_frames: 16\n")
    overrides = [
        f"hydra.searchpath=[file://{conf}]",
        "eval_metrics=tiny_hf",
        "generator=pattern",
        "benchmark=msrvtt",
        "eval_protocol=show1",
        f"assets.msrvtt_root={msr}",
        "benchmark.adapter.expected_videos=4",
        "metrics=[clipsim]",
        f"output_dir={tmp_path / 'run'}",
        "logger.wandb=false",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        report = run_evaluation(compose(config_name="eval", overrides=overrides))
    ep = report["eval_protocol"]
    # Every CLIPSIM choice is the protocol's (the tiny model stands in for ViT-L/14: a weights choice, not a protocol one).
    assert ep["deviations"] == {} and ep["used"]["clipsim.metric"] == "clipscore"
    assert ep["comparable_with"]["clipsim"]["Show-1"]["comparable"]
    assert not ep["comparable_with"]["clipsim"]["Video LDM"]["comparable"]
    v = report["metrics"]
    assert 0 <= v["clipsim"] <= 1 and v["clipsim_x100"] == pytest.approx(100 * v["clipsim"], rel=1e-12)
    assert report["counts"]["clipsim_frames"] == 4 * 16
    md = (tmp_path / "run" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| msrvtt | CLIPSIM"))
    assert "0.3072" in row and row.count("different protocol") == 2 and "x100" in row


@pytest.mark.slow
def test_evaluate_py_show1_ucf101_folder_with_the_tats_i3d(eval_env, tmp_path):
    """The issue's command on the fixture data with the real TATS-variant I3D (FVD only: no C3D weights here)."""
    bench = UCF101Benchmark(eval_env["ucf"], num_samples=6, sampling="uniform")
    prompts = [it.prompt for it in bench.prompts()]
    folder = fx.make_generated_folder(tmp_path / "generated", prompts, [sample_seed(0, i) for i in range(6)])
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}", WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [
        sys.executable,
        "evaluate.py",
        "benchmark=ucf101",
        "eval_protocol=show1",
        "generator=folder",
        f"generator.root={folder}",
        "generator.name=fixture-folder",
        f"assets.ucf101_root={eval_env['ucf']}",
        "metrics=[fvd]",
        "benchmark.adapter.num_samples=6",
        "benchmark.adapter.real_clips=8",
        f"output_dir={out}",
        "fvd_cache_dir=null",
        "logger.wandb=false",
        "score_batch_size=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    ep = report["eval_protocol"]
    # Every choice is TATS's; only the sample counts the fixture cannot hold deviate.
    assert set(ep["deviations"]) == {"ucf101.num_samples", "ucf101.real.clips"}
    assert (
        report["protocol"]["fvd"]["network_variant"] == "tats"
        and report["protocol"]["fvd"]["distance"] == "tfgan_svd_float32"
    )
    assert report["counts"]["fvd_real_clips"] == 8 and report["counts"]["fvd_generated_clips"] == 6
    assert report["metrics"]["fvd"] > 0
