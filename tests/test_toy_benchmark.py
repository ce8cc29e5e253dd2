"""benchmark=toy: held-out clips, the motion adherence, the toy_real floor, and evaluations end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import fixtures_eval as fx
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from evaluation.runner import run_evaluation
from evaluation.toy_benchmark import (
    TOY_SPLIT_IDS,
    ToyAdherence,
    ToyBenchmark,
    ToyRealGenerator,
    toy_heldout_clips,
    toy_seed,
    toy_spec,
)
from show1_lightning.data.toy_data import (
    GENERATOR_VERSION,
    TOY_COLORS,
    TOY_FRAMES,
    TOY_HEIGHT,
    TOY_WIDTH,
    color_adherence,
    make_toy_clip,
    motion_adherence,
    motion_direction,
    toy_caption,
)

REPO = Path(__file__).resolve().parents[1]
# Small clips: the adherences and the tiny FVD features take milliseconds on them.
SMALL = ["benchmark.adapter.num_frames=12", "benchmark.adapter.height=32", "benchmark.adapter.width=48"]

TINY_TOY_METRICS = fx.TINY_METRICS_YAML + (
    "color_adherence: {_target_: evaluation.toy_benchmark.ToyAdherence, kind: color}\n"
    "motion_adherence: {_target_: evaluation.toy_benchmark.ToyAdherence, kind: motion}\n"
)


class StaticToyGenerator(ToyRealGenerator):
    """A bad generator: the first frame of the real2 clip, held (right colour, no motion)."""

    def generate(self, prompts, seeds):
        v = super().generate(prompts, seeds)
        return v[:, :, :1].expand_as(v).contiguous()


class WrongColorGenerator(ToyRealGenerator):
    """A bad generator: real2 clips of the prompted shape and motion, in the next palette colour."""

    def generate(self, prompts, seeds):
        colors = list(TOY_COLORS)
        swapped = []
        for p in prompts:
            c = next(c for c in colors if f" {c} " in p)
            swapped.append(p.replace(f" {c} ", f" {colors[(colors.index(c) + 1) % len(colors)]} "))
        return super().generate(swapped, seeds)


def write_toy_conf(conf: Path) -> Path:
    """Test config dir: eval_metrics=tiny_toy (tiny FVD features + the adherences), generators static/wrong_color."""
    (conf / "eval_metrics").mkdir(parents=True, exist_ok=True)
    (conf / "eval_metrics" / "tiny_toy.yaml").write_text(TINY_TOY_METRICS)
    (conf / "generator").mkdir(parents=True, exist_ok=True)
    sizes = "num_frames: ${benchmark.adapter.num_frames}\nheight: ${benchmark.adapter.height}\nwidth: ${benchmark.adapter.width}\n"
    for name, cls in (("toy_static", "StaticToyGenerator"), ("toy_wrong_color", "WrongColorGenerator")):
        (conf / "generator" / f"{name}.yaml").write_text(f"_target_: test_toy_benchmark.{cls}\nname: {name}\n{sizes}")
    return conf


@pytest.fixture(scope="module")
def toy_conf(tmp_path_factory) -> Path:
    return write_toy_conf(tmp_path_factory.mktemp("toyconf"))


def compose_toy(conf: Path, out: Path, *extra: str):
    overrides = [
        f"hydra.searchpath=[file://{conf}]",
        "benchmark=toy",
        "generator=toy_real",
        "eval_metrics=tiny_toy",
        "benchmark.adapter.num_samples=6",
        *SMALL,
        "generated_clip.frames=8",
        "benchmark.adapter.clip.frames=8",
        f"output_dir={out}",
        f"fvd_cache_dir={out.parent / 'cache'}",
        "logger.wandb=false",
        "batch_size=6",
        "score_batch_size=6",
        *extra,
    ]
    overrides = list({o.split("=", 1)[0]: o for o in overrides}.values())  # a later value of a key wins
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


# ---------------------------------------------------------------------------- held-out clips


def test_heldout_seeds_are_disjoint_from_the_training_and_validation_shards():
    # The shards seed clip i with (GENERATOR_VERSION, 0 | 1, i); the benchmark uses other split ids.
    assert set(TOY_SPLIT_IDS.values()).isdisjoint({0, 1}) and len(set(TOY_SPLIT_IDS.values())) == 2
    assert toy_seed("test", 5) == (GENERATOR_VERSION, TOY_SPLIT_IDS["test"], 5)
    with pytest.raises(ValueError, match="split"):
        toy_seed("train", 0)
    # Same caption, same index, same size as the training clip 0: different pixels.
    color, shape, motion = toy_spec(0)
    args = (TOY_FRAMES, TOY_HEIGHT, TOY_WIDTH)
    train0 = make_toy_clip(
        color, shape, motion, seed=(GENERATOR_VERSION, 0, 0), num_frames=args[0], height=args[1], width=args[2]
    )
    test0 = make_toy_clip(
        color, shape, motion, seed=toy_seed("test", 0), num_frames=args[0], height=args[1], width=args[2]
    )
    assert np.abs(train0.astype(int) - test0.astype(int)).mean() > 5


def test_heldout_clips_balanced_sized_and_two_disjoint_splits():
    videos, prompts = toy_heldout_clips(48, 8, 32, 48)
    assert videos.shape == (48, 3, 8, 32, 48) and videos.dtype == torch.float32
    assert -1 <= float(videos.min()) and float(videos.max()) <= 1
    words = [p.split() for p in prompts]  # "a <colour> <shape> moving <motion>"
    assert Counter(w[1] for w in words) == {c: 8 for c in TOY_COLORS}
    assert set(Counter(w[2] for w in words).values()) == {16} and set(Counter(w[4] for w in words).values()) == {12}
    assert len({toy_caption(*toy_spec(i)) for i in range(72)}) == 72  # 72 samples: every combination once
    real2, prompts2 = toy_heldout_clips(48, 8, 32, 48, split="real2")
    assert prompts2 == prompts
    assert (real2 - videos).abs().flatten(1).mean(1).min() > 0.02  # every pair differs
    again, _ = toy_heldout_clips(3, 8, 32, 48)
    assert torch.equal(again, videos[:3])  # deterministic


# ---------------------------------------------------------------------------- motion adherence


def _moving_square(dx: int, dy: int, frames: int = 12) -> torch.Tensor:
    """A red square on grey moving by (dx, dy) pixels per frame: ``3 x T x 40 x 60`` in [-1, 1]."""
    v = torch.zeros(3, frames, 40, 60)
    for t in range(frames):
        x, y = 20 + dx * t, (15 if dy >= 0 else 30) + dy * t
        v[0, t, y : y + 8, x : x + 8] = 0.8
        v[1:, t, y : y + 8, x : x + 8] = -0.8
    return v


def test_motion_direction_reads_the_saturated_shape():
    assert motion_direction(_moving_square(2, 0)) == "right"
    assert motion_direction(_moving_square(-1, 0)) == "left"
    assert motion_direction(_moving_square(0, 1)) == "down"
    assert motion_direction(_moving_square(1, -2)) == "up"  # the larger displacement decides
    assert motion_direction(_moving_square(0, 0)) is None  # static: no direction
    assert motion_direction(torch.zeros(3, 12, 40, 60)) is None  # grey: no saturated shape


def test_motion_adherence_on_heldout_clips_and_broken_ones():
    videos, prompts = toy_heldout_clips(24, 12, 32, 48)
    assert motion_adherence(videos, prompts) == 1.0 and color_adherence(videos, prompts) == 1.0
    assert motion_adherence(videos.flip(2), prompts) == 0.0  # played backwards: the opposite direction
    assert motion_adherence(videos[:, :, :1].expand_as(videos), prompts) == 0.0  # frozen
    # Prompts of the wrong direction: only the ones that happen to name the clip's motion count.
    rolled = prompts[1:] + prompts[:1]
    same = sum(a.split()[-1] == b.split()[-1] for a, b in zip(prompts, rolled)) / len(prompts)
    assert motion_adherence(videos, rolled) == pytest.approx(same)
    with pytest.raises(ValueError):
        motion_adherence(videos, prompts[:3])


def test_toy_adherence_metric_accumulates():
    videos, prompts = toy_heldout_clips(6, 8, 32, 48)
    m = ToyAdherence("motion")
    m.update(videos[:4], prompts[:4])
    m.update(videos[4:].flip(2), prompts[4:])
    assert float(m.compute()) == pytest.approx(4 / 6)
    c = ToyAdherence("color")
    c.update(videos, prompts)
    assert float(c.compute()) == 1.0
    with pytest.raises(ValueError, match="kind"):
        ToyAdherence("shape")


# ---------------------------------------------------------------------------- toy_real generator


def test_toy_real_generator_serves_real2_clips_of_the_prompts():
    real2, prompts = toy_heldout_clips(5, 8, 32, 48, split="real2")
    gen = ToyRealGenerator(num_frames=8, height=32, width=48)
    assert torch.equal(gen.generate(prompts, list(range(5))), real2)  # seed i = sample i of real2
    test, _ = toy_heldout_clips(5, 8, 32, 48, split="test")
    assert (gen.generate(prompts, list(range(5))) - test).abs().mean() > 0.02
    with pytest.raises(ValueError, match="toy caption"):
        gen.generate(["a dog running"], [0])


def test_benchmark_prompts_and_real_clips():
    b = ToyBenchmark(num_samples=7, num_frames=12, height=32, width=48, clip={"frames": 8, "start": "first"})
    items = b.prompts()
    assert [it.index for it in items] == list(range(7)) and items[3].prompt == toy_caption(*toy_spec(3))
    videos, _ = toy_heldout_clips(7, 12, 32, 48)
    assert b.num_real_clips() == 7 and torch.allclose(b.real_clip(3), videos[3, :, :8], atol=1e-6)
    assert b.real_protocol()["rendering"]["height"] == 32


# ---------------------------------------------------------------------------- evaluate end to end


def test_evaluation_of_toy_real_and_bad_generators(toy_conf, tmp_path):
    real = run_evaluation(compose_toy(toy_conf, tmp_path / "real"))
    assert real["benchmark"]["name"] == "toy" and real["metrics_run"] == ["fvd", "color_adherence", "motion_adherence"]
    m = real["metrics"]
    assert set(m) == {"fvd", "color_adherence", "motion_adherence"}
    assert m["color_adherence"] >= 0.95 and m["motion_adherence"] >= 0.95 and m["fvd"] > 0
    assert real["counts"]["motion_adherence_videos"] == 6 and real["counts"]["fvd_real_clips"] == 6
    assert "centroid" in real["protocol"]["motion_adherence"]["rule"]
    md = (tmp_path / "real" / "report.md").read_text()
    assert "| toy | motion adherence (higher is better) |" in md

    static = run_evaluation(compose_toy(toy_conf, tmp_path / "static", "generator=toy_static"))
    assert static["protocol"]["fvd_real_stats"]["source"] == "cache"  # the held-out statistics, cached
    assert static["metrics"]["motion_adherence"] == 0.0 and static["metrics"]["color_adherence"] >= 0.95
    wrong = run_evaluation(compose_toy(toy_conf, tmp_path / "wrong", "generator=toy_wrong_color"))
    assert wrong["metrics"]["color_adherence"] == 0.0 and wrong["metrics"]["motion_adherence"] >= 0.95

    # Metrics are selectable like the other benchmarks' (metrics= / benchmark.metrics=).
    only = run_evaluation(compose_toy(toy_conf, tmp_path / "only", "benchmark.metrics=[motion_adherence]"))
    assert set(only["metrics"]) == {"motion_adherence"} and "fvd_real_stats" not in only["protocol"]
    on_disk = json.loads((tmp_path / "only" / "report.json").read_text())
    assert on_disk["metrics"] == only["metrics"]


@pytest.mark.slow
def test_real_i3d_fvd_floor_is_far_below_static_videos(toy_conf, tmp_path):
    """The real I3D FVD (conf/eval_metrics/default.yaml) on 48 prompts: real2 vs test far below frozen videos
    (measured at the default size: 130 vs 294; at 16 prompts the small-sample bias hides it: 318 vs 404).
    About 150 I3D clips: minutes on a CPU."""
    common = [
        "eval_metrics=default",
        "benchmark.adapter.num_samples=48",
        "benchmark.adapter.num_frames=16",
        "benchmark.adapter.height=64",
        "benchmark.adapter.width=96",
        "generated_clip.frames=16",
        "benchmark.adapter.clip.frames=16",
        "batch_size=8",
        "score_batch_size=8",
    ]
    real = run_evaluation(compose_toy(toy_conf, tmp_path / "real", *common))
    static = run_evaluation(compose_toy(toy_conf, tmp_path / "static", *common, "generator=toy_static"))
    assert real["eval_protocol"]["deviations"] == {}  # the tf_fvd protocol's FVD: real I3D, 16 frames
    assert real["metrics"]["color_adherence"] >= 0.95 and real["metrics"]["motion_adherence"] >= 0.95
    assert static["metrics"]["motion_adherence"] == 0.0
    assert real["metrics"]["fvd"] < 0.6 * static["metrics"]["fvd"]
