"""The `released` behaviour preset: every switch changes what it says (each test fails if its switch is ignored),
the preset files set every switch, and the slow parity check against the official code when its env exists."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from show1_lightning.pipelines import released as rel
from show1_lightning.pipelines.released import ReleasedBehaviour, ReleasedCascade, load_released_stage
from show1_lightning.pipelines.released_tiny import build_tiny_released_folders

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "keyframe": {"num_steps": 2, "guidance_scale": 9.0, "num_frames": 3, "height": 8, "width": 12},
    "interpolation": {"num_steps": 1, "guidance_scale": 4.0},
    "image_sr": {"num_steps": 1, "guidance_scale": 4.0, "noise_level": 150},
    "pixel_sr": {"num_steps": 1, "guidance_scale": 7.0, "noise_level": 250, "window_frames": 8},
    "latent_sr": {
        "num_steps": 2,
        "guidance_scale": 15.0,
        "strength": 0.8,
        "height": 16,
        "width": 24,
        "negative_prompt": "low resolution, blur",
    },
}


def beh(**switches) -> ReleasedBehaviour:
    return ReleasedBehaviour(schedules=FAST, **switches)


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("released")
    build_tiny_released_folders(root, names=("show-1-base", "show-1-interpolation", "show-1-sr1", "show-1-sr2"))
    names = {
        "keyframe": "show-1-base",
        "interpolation": "show-1-interpolation",
        "pixel_sr": "show-1-sr1",
        "latent_sr": "show-1-sr2",
    }
    return {k: load_released_stage(root / v, k) for k, v in names.items()}


@pytest.fixture()
def spy(monkeypatch):
    """Record every official_denoise call (initial x, concat, per_frame) and return call index k as output."""
    calls: list[dict] = []

    def fake(model, scheduler, x, timesteps, guidance_scale, step_kwargs, per_frame=True, concat=None):
        calls.append(
            {
                "x": x.clone(),
                "concat": None if concat is None else concat.clone(),
                "per_frame": per_frame,
                "scheduler": scheduler,
            }
        )
        return torch.full_like(x, float(len(calls) - 1))

    monkeypatch.setattr(rel, "official_denoise", fake)
    return calls


def _compose_behaviour(name: str) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "behaviour"), version_base="1.3"):
        cfg = compose(config_name=name)
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg, resolve=True)


def test_preset_files_set_every_switch():
    """released.yaml names every switch with the official value; released_fast differs only in schedules."""
    full = _compose_behaviour("released")
    fast = _compose_behaviour("released_fast")
    switches = {f.name for f in dataclasses.fields(ReleasedBehaviour)} - {"name", "schedules"}
    assert switches <= set(full)
    assert ReleasedBehaviour.from_dict(full) == dataclasses.replace(ReleasedBehaviour(), schedules=full["schedules"])
    assert {k: v for k, v in fast.items() if k not in ("name", "schedules")} == {
        k: v for k, v in full.items() if k not in ("name", "schedules")
    }
    assert full["schedules"]["pixel_sr"]["num_steps"] == 125 and fast["schedules"]["pixel_sr"]["num_steps"] == 50
    assert full["schedules"]["image_sr"]["num_steps"] == 70 and fast["schedules"]["image_sr"]["num_steps"] == 50
    assert fast["schedules"]["keyframe"] == full["schedules"]["keyframe"]
    with pytest.raises(ValueError, match="unknown released-behaviour switches"):
        ReleasedBehaviour.from_dict({"text_atention_mask": True})


def test_text_attention_mask_switch(stages, monkeypatch):
    """1. Off: the UNet is called without encoder_attention_mask; on: with it."""
    stage = stages["keyframe"]
    seen: list[bool] = []
    forward = stage.unet.forward

    def record(*args, **kwargs):
        seen.append("encoder_attention_mask" in kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(stage.unet, "forward", record)
    rel.run_released_stage("keyframe", stage, None, ["a cat"], [0], beh(text_attention_mask=False))
    assert seen and not any(seen)
    seen.clear()
    rel.run_released_stage("keyframe", stage, None, ["a cat"], [0], beh(text_attention_mask=True))
    assert seen and all(seen)


def test_prompt_preprocessing_switch(stages, monkeypatch):
    """2. lower_strip: T5 sees '  A Cat ' as 'a cat'; none: as given. SR2 (CLIP) never lower-cases."""
    stage = stages["keyframe"]
    seen: list[str] = []
    encode = stage.encode_text
    monkeypatch.setattr(stage, "encode_text", lambda caps: (seen.extend(caps), encode(caps))[1])
    rel.run_released_stage("keyframe", stage, None, ["  A Cat "], [0], beh(prompt_preprocessing="lower_strip"))
    assert "a cat" in seen and "  A Cat " not in seen
    seen.clear()
    rel.run_released_stage("keyframe", stage, None, ["  A Cat "], [0], beh(prompt_preprocessing="none"))
    assert "  A Cat " in seen


def test_train_mode_dropout_switch(stages):
    """3. On: dropout active while sampling (output differs from dropout off), still reproducible per seed."""
    stage = stages["keyframe"]
    run = lambda b: rel.run_released_stage("keyframe", stage, None, ["a cat"], [5], b)  # noqa: E731
    on, on2 = run(beh(train_mode_dropout=True)), run(beh(train_mode_dropout=True))
    off = run(beh(train_mode_dropout=False))
    # Same seed -> the same dropout masks: identical arithmetic, so exact equality.
    assert torch.equal(on, on2)
    # Dropout p=0.1 in the temporal convs changes the sample by far more than float noise (relative 1e-3).
    assert (on - off).abs().max() > 1e-3 * off.abs().max()
    assert not stage.unet.training


def test_interp_model_keyframes_switch(stages, spy):
    """4a. On: the windows' outputs overwrite the keyframe positions; off: the keyframes are copied back."""
    stage = stages["interpolation"]
    keys = torch.rand(1, 3, 3, 8, 12) * 2 - 1
    out = rel.run_released_stage("interpolation", stage, keys, ["a cat"], [0], beh(interp_model_keyframes=True))
    # window j returns the constant j: positions 0 and 4 come from windows 0 and 1, position 8 from window 1.
    assert out[0, :, 0].eq(0).all() and out[0, :, 4].eq(1).all() and out[0, :, 8].eq(1).all()
    out = rel.run_released_stage("interpolation", stage, keys, ["a cat"], [0], beh(interp_model_keyframes=False))
    assert torch.equal(out[:, :, ::4], keys)


def test_interp_shared_noise_switch(stages, spy):
    """4b. On: every window starts from the same noise; off: each window from its own seed."""
    stage = stages["interpolation"]
    keys = torch.rand(1, 3, 3, 8, 12) * 2 - 1
    rel.run_released_stage("interpolation", stage, keys, ["a cat"], [0], beh(interp_shared_noise=True))
    assert torch.equal(spy[0]["x"], spy[1]["x"])
    spy.clear()
    rel.run_released_stage("interpolation", stage, keys, ["a cat"], [0], beh(interp_shared_noise=False))
    assert not torch.allclose(spy[0]["x"], spy[1]["x"])


def test_sr1_overlapping_windows_switch(stages, spy):
    """5a. On: 8-frame windows with stride 7 (15 frames: 0-8, 7-15); off: 0-8, 8-15."""
    stage = stages["pixel_sr"]
    video = torch.rand(1, 3, 15, 2, 3) * 2 - 1
    rel.run_released_stage(
        "pixel_sr", stage, video, ["a cat"], [0], beh(sr1_overlapping_windows=True, sr1_first_frame="noisy")
    )
    assert [c["x"].shape[2] for c in spy] == [8, 8]
    spy.clear()
    rel.run_released_stage(
        "pixel_sr", stage, video, ["a cat"], [0], beh(sr1_overlapping_windows=False, sr1_first_frame="noisy")
    )
    assert [c["x"].shape[2] for c in spy] == [8, 7]


def test_sr1_first_frame_switch(stages, spy):
    """5b. image_sr: window 0's condition frame 0 is the image-SR output (clean); noisy: it is noise-augmented."""
    stage = stages["pixel_sr"]
    video = torch.rand(1, 3, 8, 2, 3) * 2 - 1
    fake_sr = lambda image, emb, neg, h, w, seed, *a: torch.full((1, 3, h, w), 0.25)  # noqa: E731
    rel.run_released_stage("pixel_sr", stage, video, ["a cat"], [0], beh(sr1_first_frame="image_sr"), image_sr=fake_sr)
    assert spy[0]["concat"][:, :, 0].eq(0.25).all()
    spy.clear()
    rel.run_released_stage("pixel_sr", stage, video, ["a cat"], [0], beh(sr1_first_frame="noisy"), image_sr=fake_sr)
    assert not spy[0]["concat"][:, :, 0].eq(0.25).any()


def test_image_sr_fallback_is_announced(stages, capsys):
    """Without an IF-II-L folder the cascade says so and uses the documented fallback."""
    rc = ReleasedCascade({"pixel_sr": stages["pixel_sr"]}, {"name": "released"}, if_ii_l=None)
    assert rc.image_sr() is None
    assert "no IF-II-L folder configured" in capsys.readouterr().out


def test_sr1_later_windows_condition_on_previous_output_and_overwrite(stages, spy):
    """5b/5c. Window 1's frame 0 condition is window 0's output; with overwrite the shared frame is window 1's."""
    stage = stages["pixel_sr"]
    video = torch.rand(1, 3, 15, 2, 3) * 2 - 1
    out = rel.run_released_stage(
        "pixel_sr", stage, video, ["a cat"], [0], beh(sr1_first_frame="noisy", sr1_overwrite_shared_frame=True)
    )
    assert spy[1]["concat"][:, :, 0].eq(0).all()  # window 0 returned zeros
    assert out[0, :, 7].eq(1).all()
    out = rel.run_released_stage(
        "pixel_sr", stage, video, ["a cat"], [0], beh(sr1_first_frame="noisy", sr1_overwrite_shared_frame=False)
    )
    assert out[0, :, 7].eq(2).all()  # third call overall = window 0 of this run: the shared frame stays its


def test_sr2_uint8_pil_resize_switch(stages, monkeypatch):
    """6a. On: SR2 encodes uint8-quantised PIL-resized frames; off: the float antialiased resize."""
    stage = stages["latent_sr"]
    seen: list[torch.Tensor] = []
    encode = stage.vae.encode
    monkeypatch.setattr(
        stage.vae, "encode", lambda v, generator=None: (seen.append(v.clone()), encode(v, generator))[1]
    )
    video = torch.rand(1, 3, 2, 8, 12) * 2 - 1
    rel.run_released_stage("latent_sr", stage, video, ["a cat"], [0], beh(sr2_uint8_pil_resize=True))
    levels = (seen[0] + 1) / 2 * 255
    # uint8 / 255 * 2 - 1 in float32: back on the 0..255 grid up to float rounding (1e-3 of a level).
    assert (levels - levels.round()).abs().max() < 1e-3
    seen.clear()
    rel.run_released_stage("latent_sr", stage, video, ["a cat"], [0], beh(sr2_uint8_pil_resize=False))
    levels = (seen[0] + 1) / 2 * 255
    assert (levels - levels.round()).abs().max() > 0.1


def test_sr2_sample_posterior_switch(stages, monkeypatch):
    """6b. On: the VAE posterior is sampled while encoding; off: its mean."""
    stage = stages["latent_sr"]
    seen: list[bool] = []
    encode = stage.vae.encode
    monkeypatch.setattr(
        stage.vae,
        "encode",
        lambda v, generator=None: (seen.append(stage.vae.sample_posterior), encode(v, generator))[1],
    )
    video = torch.rand(1, 3, 2, 8, 12) * 2 - 1
    rel.run_released_stage("latent_sr", stage, video, ["a cat"], [0], beh(sr2_sample_posterior=True))
    rel.run_released_stage("latent_sr", stage, video, ["a cat"], [0], beh(sr2_sample_posterior=False))
    assert seen == [True, False] and stage.vae.sample_posterior is False


def test_folder_scheduler_switch(stages, spy):
    """7a. On: the folder's scheduler (sr2: DDIM); off: the stage's own DPM-Solver++."""
    stage = stages["latent_sr"]
    video = torch.rand(1, 3, 2, 8, 12) * 2 - 1
    rel.run_released_stage("latent_sr", stage, video, ["a cat"], [0], beh(folder_scheduler=True))
    rel.run_released_stage("latent_sr", stage, video, ["a cat"], [0], beh(folder_scheduler=False))
    assert [type(c["scheduler"]).__name__ for c in spy] == ["DDIMScheduler", "DPMSolverMultistepScheduler"]


def test_per_frame_scheduler_step_changes_thresholding():
    """7b. Per-frame steps threshold each frame by its own quantile: different from one quantile per video."""
    from diffusers import DPMSolverMultistepScheduler

    def run(per_frame: bool) -> torch.Tensor:
        sched = DPMSolverMultistepScheduler(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9)
        ts = rel._timesteps(sched, 3, torch.device("cpu"))
        x = torch.randn(1, 3, 4, 6, 6, generator=torch.Generator().manual_seed(0))
        scale = torch.tensor([1.0, 3.0, 0.3, 6.0]).view(1, 1, 4, 1, 1)  # frames of very different ranges
        return rel.official_denoise(lambda inp, t: inp * scale, sched, x, ts, 1.0, {}, per_frame=per_frame)

    a, b = run(True), run(False)
    assert (a - b).abs().max() > 1e-3 * b.abs().max()


def test_clamp_between_stages_switch(stages):
    """Official stages hand on unclamped outputs; clamp_between_stages restores our clamp."""
    x = torch.tensor([1.5, -2.0])
    keep = ReleasedCascade({"keyframe": stages["keyframe"]}, {"name": "released", "clamp_between_stages": False})
    clamp = ReleasedCascade({"keyframe": stages["keyframe"]}, {"name": "released", "clamp_between_stages": True})
    assert torch.equal(keep.hand_on("keyframe", x), x)
    assert torch.equal(clamp.hand_on("keyframe", x), x.clamp(-1, 1))


@pytest.mark.slow
def test_official_parity_script():
    """scripts/official_parity.py (tiny released weights, official pipelines in their pinned env): every stage
    within 1e-4 (step counts capped at 10: minutes instead of ~18 on 2 cores; the same code paths). Skipped unless
    `python scripts/official_parity.py --setup` has been run."""
    import official_parity  # scripts/ is on the test path (pyproject.toml)

    if not official_parity.reference_ready():
        pytest.skip("reference environment missing: python scripts/official_parity.py --setup")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "official_parity.py"),
            "--seed",
            "3",
            "--prompt",
            "A Panda playing guitar",
            "--max-steps",
            "10",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("max_abs_diff=") == 5


def test_trained_stage_keeps_its_size_under_the_preset(stages, monkeypatch):
    """apply_to=all on a trained stage: the preset's released sizes (8 x 40x64) do not override the stage's."""
    stage = stages["keyframe"]
    monkeypatch.setattr(stage, "released", None)
    monkeypatch.setattr(stage, "num_frames", 2)
    monkeypatch.setattr(stage, "height", 8)
    monkeypatch.setattr(stage, "width", 12)
    sched = {**FAST, "keyframe": {**FAST["keyframe"], "num_frames": 8, "height": 40, "width": 64, "num_steps": 1}}
    out = rel.run_released_stage("keyframe", stage, None, ["a cat"], [0], ReleasedBehaviour(schedules=sched))
    assert out.shape == (1, 3, 2, 8, 12)
