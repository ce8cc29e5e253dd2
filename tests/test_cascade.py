"""The cascade: toy stages end to end (pipeline, export loading, generate.py) and the paper's shapes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_config
from numerics import assert_close_rel, assert_differ_rel
from omegaconf import OmegaConf

from show1_lightning.callbacks.export import export_stage
from show1_lightning.pipelines.cascade import Show1Cascade, load_stage
from show1_lightning.pipelines.generator import CascadeGenerator

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("keyframe", "interpolation", "pixel_sr", "latent_sr")
TOY = {
    "keyframe": "toy",
    "interpolation": "toy_interpolation",
    "pixel_sr": "toy_pixel_sr",
    "latent_sr": "toy_latent_sr",
}
# Few denoising steps: interpolation and latent SR refine their baseline at strength 0.25 (8 x 0.25 = 2 steps);
# pixel SR samples from noise, truncated at t = 850 (8 steps).
TWO_STEPS = {name: {"num_steps": 2 if name == "keyframe" else 8} for name in STAGES}


def build_stage(compose_train, tmp_path: Path, experiment: str, *overrides: str):
    extra = ["vae@stage.vae=tiny"] if "latent_sr" in experiment else []
    cfg = compose_train(tmp_path, f"experiment={experiment}", *extra, *overrides, tiny=False)
    torch.manual_seed(0)
    stage = hydra.utils.instantiate(cfg.stage, _convert_="all")
    stage.stage_config = OmegaConf.to_container(cfg.stage, resolve=True)
    return stage.eval()


@pytest.fixture(scope="module")
def toy_stages(toy_data_dir, tmp_path_factory):
    """The four toy stages (untrained, seeded), built once for the module: the tests only read them."""
    out = tmp_path_factory.mktemp("cascade")

    def compose_train(output_dir, *overrides, tiny=True):
        return compose_config(toy_data_dir, output_dir, *overrides, tiny=tiny)

    # Keyframes at 16x8 instead of the toy experiment's 24x16: every later stage runs 3x fewer pixels (pixel SR
    # dominates the cascade's time) and the stage-to-stage shape logic is the same.
    small = {"keyframe": ("stage.height=8", "stage.width=16")}
    return {name: build_stage(compose_train, out, exp, *small.get(name, ())) for name, exp in TOY.items()}


def test_toy_cascade_shapes_and_reports(toy_stages):
    cascade = Show1Cascade(**toy_stages, device="cpu", sampling=TWO_STEPS)
    result = cascade(["a red circle moving left"], [3])
    shapes = {r.name: r.output_shape for r in result.reports}
    assert shapes == {
        # keyframes 16x8 here; interpolation keeps the size, toy pixel SR scales it 2x, and the latent expert
        # resizes to its configured output (as the paper's 256x160 -> 576x320 changes the aspect ratio too)
        "keyframe": (1, 3, 8, 8, 16),
        "interpolation": (1, 3, 29, 8, 16),
        "pixel_sr": (1, 3, 29, 16, 32),
        "latent_sr": (1, 3, 29, 64, 96),
    }
    assert result.video.shape == (1, 3, 29, 64, 96)
    assert result.video.min() >= -1 and result.video.max() <= 1
    # The interpolation keeps the keyframes at every 4th frame: copied, so bit for bit.
    assert torch.equal(result.intermediates["interpolation"][:, :, ::4], result.intermediates["keyframe"])
    assert all(r.seconds > 0 and r.peak_bytes > 0 for r in result.reports)


def test_naive_cascade_hands_on_baselines(toy_stages):
    """baseline_stages: the later stages hand on their baseline (blend, bicubic, VAE round trip), not a sample."""
    later = ["interpolation", "pixel_sr", "latent_sr"]
    naive = Show1Cascade(**toy_stages, device="cpu", sampling=TWO_STEPS, baseline_stages=later)
    result = naive(["a red circle moving left"], [3])
    x = result.intermediates["keyframe"]
    for name in later:
        x = toy_stages[name].baseline(x)
        assert torch.equal(result.intermediates[name], x), name
    learned = Show1Cascade(toy_stages["keyframe"], toy_stages["interpolation"], device="cpu", sampling=TWO_STEPS)
    other = learned(["a red circle moving left"], [3])
    assert torch.equal(other.intermediates["keyframe"], result.intermediates["keyframe"])  # the same keyframes
    # The untrained toy interpolation stage (zero-initialised residual) samples exactly its baseline.
    assert_close_rel(other.intermediates["interpolation"], result.intermediates["interpolation"])
    with pytest.raises(ValueError, match="baseline_stages"):
        Show1Cascade(toy_stages["keyframe"], device="cpu", baseline_stages=["keyframe"])


def test_baseline_branch_is_the_naive_cascade_of_the_same_keyframes(toy_stages):
    """baseline_branch: beside the learned cascade, the naive one from the same keyframes, equal to running the naive
    cascade (baseline_stages) on its own; the generator hands it on as the ``naive`` intermediate."""
    from show1_lightning.pipelines.generator import CascadeGenerator

    later = ["interpolation", "pixel_sr", "latent_sr"]
    both = Show1Cascade(**toy_stages, device="cpu", sampling=TWO_STEPS, baseline_branch=True)
    result = both(["a red circle moving left", "a blue square moving up"], [3, 4])
    naive = Show1Cascade(**toy_stages, device="cpu", sampling=TWO_STEPS, baseline_stages=later)
    alone = naive(["a red circle moving left", "a blue square moving up"], [3, 4])
    assert torch.equal(alone.intermediates["keyframe"], result.intermediates["keyframe"])
    assert result.baseline_video is not None and torch.equal(result.baseline_video, alone.video)
    assert Show1Cascade(**toy_stages, device="cpu", sampling=TWO_STEPS)(["a red circle"], [3]).baseline_video is None
    with pytest.raises(ValueError, match="baseline_branch"):
        Show1Cascade(toy_stages["keyframe"], device="cpu", baseline_branch=True)
    gen = CascadeGenerator.__new__(CascadeGenerator)  # the stages above, without loading them from paths
    gen.cascade, gen.last_intermediates = both, {}
    video = gen.generate(["a red circle moving left"], [3])
    assert gen.intermediate_names == ["keyframe", "interpolation", "pixel_sr", "naive"]
    assert gen.last_intermediates["naive"].shape == video.shape


def test_cascade_prefix_and_order_checks(toy_stages):
    two = Show1Cascade(toy_stages["keyframe"], toy_stages["interpolation"], device="cpu", sampling=TWO_STEPS)
    assert two(["a blue square moving up"], [0]).video.shape == (1, 3, 29, 8, 16)
    with pytest.raises(ValueError, match="prefix"):
        Show1Cascade(toy_stages["keyframe"], pixel_sr=toy_stages["pixel_sr"], device="cpu")
    with pytest.raises(ValueError, match="unknown stages"):
        Show1Cascade(toy_stages["keyframe"], device="cpu", sampling={"sr3": {}})


def test_exports_reload_and_generate_py_writes_mp4s(toy_stages, tmp_path):
    exports = {}
    for name, stage in toy_stages.items():
        exports[name] = export_stage(stage, tmp_path / "exports" / name)
    # An export rebuilds the same UNet weights (EMA copied in).
    reloaded = load_stage(exports["keyframe"])
    with toy_stages["keyframe"].ema_weights():
        for p, q in zip(toy_stages["keyframe"].unet.parameters(), reloaded.unet.parameters()):
            assert torch.equal(p, q)  # float32 weights copied through safetensors: bit for bit
    out = tmp_path / "gen"
    args = [
        sys.executable,
        "generate.py",
        f"output_dir={out}",
        "prompts=[a green triangle moving right]",
        "batch_size=1",
        *[f"stages.{n}={p}" for n, p in exports.items()],
        *[f"+sampling.{n}.num_steps={TWO_STEPS[n]['num_steps']}" for n in STAGES],
    ]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "latent_sr" in res.stdout and "peak memory" in res.stdout
    finals = list(out.glob("000_*.mp4"))
    assert len(finals) == 1
    from show1_lightning.data.video_io import decode_video

    video = decode_video(finals[0])
    assert video.frames.shape == (29, 64, 96, 3)
    assert len(list((out / "stages").glob("000_*.mp4"))) == 4


def test_cascade_generator_satisfies_the_evaluation_interface(toy_stages, tmp_path):
    from evaluation.generators import VideoGenerator

    path = export_stage(toy_stages["keyframe"], tmp_path / "kf")
    gen = CascadeGenerator(keyframe=path, device="cpu", sampling={"keyframe": {"num_steps": 2}})
    assert isinstance(gen, VideoGenerator)
    videos = gen.generate(["a red circle moving left", "a blue square moving up"], [0, 1])
    assert videos.shape == (2, 3, 8, 8, 16)
    # Seeded per sample: the second video does not depend on its batch neighbour. (Same batch size:
    # at t ~ T the x0 estimate divides by a tiny alpha, which amplifies float rounding differences of
    # other batch shapes far beyond a tolerance that would still be meaningful.)
    again = gen.generate(["a yellow circle moving down", "a blue square moving up"], [7, 1])
    assert_close_rel(again[1], videos[1])  # same kernels, another neighbour: at most reordered sums
    assert_differ_rel(again[0], videos[0])
    assert gen.describe()["stages"] == {"keyframe": str(path)}


def test_cascade_generator_keeps_each_earlier_stage_output_equal_to_running_that_prefix(toy_stages, tmp_path):
    """``last_intermediates`` (what evaluate.py's ``save_intermediates`` writes) holds the keyframes the two-stage
    cascade made: the same videos the keyframe stage alone makes for the same prompts and seeds."""
    paths = {n: export_stage(toy_stages[n], tmp_path / n) for n in ("keyframe", "interpolation")}
    steps = {n: TWO_STEPS[n] for n in paths}
    prompts, seeds = ["a red circle moving left", "a blue square moving up"], [3, 4]
    two = CascadeGenerator(**paths, device="cpu", sampling=steps)
    assert two.intermediate_names == ["keyframe"]
    final = two.generate(prompts, seeds)
    assert set(two.last_intermediates) == {"keyframe"}
    keyframes = two.last_intermediates["keyframe"]
    assert keyframes.shape == (2, 3, 8, 8, 16) and final.shape[2] > 8
    alone = CascadeGenerator(keyframe=paths["keyframe"], device="cpu", sampling=steps)
    assert alone.intermediate_names == []
    assert_close_rel(keyframes.clamp(-1, 1), alone.generate(prompts, seeds))


@pytest.mark.slow
def test_paper_shapes_29_frames_at_576x320_with_tiny_widths(compose_train, tmp_path):
    """The paper experiments' resolutions, frame counts and UNet types, at tiny widths on CPU."""
    tiny_text = "text_encoder=tiny_t5"
    stages = {
        "keyframe": build_stage(
            compose_train,
            tmp_path,
            "paper_keyframe",
            tiny_text,
            "+model.block_out_channels=[32,32,32,32]",
            "+model.attention_head_dim=8",
            "+model.encoder_hid_dim=64",
            "+model.cross_attention_dim=32",
        ),
        "interpolation": build_stage(
            compose_train,
            tmp_path,
            "paper_interpolation",
            tiny_text,
            "+model.block_out_channels=[32,32,32,32]",
            "+model.attention_head_dim=8",
            "+model.encoder_hid_dim=64",
            "+model.cross_attention_dim=32",
        ),
        "pixel_sr": build_stage(
            compose_train,
            tmp_path,
            "paper_pixel_sr",
            tiny_text,
            "+model.block_out_channels=[32,32,32,32,32]",
            "+model.attention_head_dim=8",
            "+model.encoder_hid_dim=64",
            "+model.cross_attention_dim=32",
        ),
        "latent_sr": build_stage(
            compose_train,
            tmp_path,
            "paper_latent_sr",
            "text_encoder=tiny_clip",
            "+model.block_out_channels=[32,32,32,32]",
            "+model.attention_head_dim=8",
            "+model.cross_attention_dim=64",
        ),
    }
    cascade = Show1Cascade(**stages, device="cpu", sampling=TWO_STEPS)
    result = cascade(["a panda playing guitar"], [0])
    shapes = {r.name: r.output_shape for r in result.reports}
    assert shapes == {
        "keyframe": (1, 3, 8, 40, 64),
        "interpolation": (1, 3, 29, 40, 64),
        "pixel_sr": (1, 3, 29, 160, 256),
        "latent_sr": (1, 3, 29, 320, 576),
    }


def test_frozen_modules_follow_device_moves(compose_train, tmp_path):
    stage = build_stage(compose_train, tmp_path, "toy_latent_sr")  # its own: the move below is destructive
    stage.to("meta")
    assert next(stage.text_encoder.parameters()).device.type == "meta"
    assert next(stage._frozen["vae"].parameters()).device.type == "meta"
