"""Tests for the frame interpolation stage (show1_lightning/stages/interpolation.py) on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet3DConditionModel
from numerics import assert_close_rel, assert_differ_rel

from show1_lightning.diffusion.sampling import window_seeds
from show1_lightning.models.text_encoder import TextEncoder
from show1_lightning.stages.interpolation import InterpolationStage

torch.set_num_threads(1)

TEXT_DIM = 32


def make_stage(**kwargs) -> InterpolationStage:
    torch.manual_seed(0)
    defaults = dict(
        unet=UNet3DConditionModel(
            in_channels=7,
            out_channels=3,
            down_block_types=["DownBlock3D", "CrossAttnDownBlock3D"],
            up_block_types=["CrossAttnUpBlock3D", "UpBlock3D"],
            block_out_channels=[16, 32],
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            cross_attention_dim=TEXT_DIM,
        ),
        noise_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type="fixed_small"
        ),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        text_encoder=TextEncoder(kind="t5", max_length=8, tiny_dim=TEXT_DIM, tiny_layers=1),
        num_frames=5,
        insert_frames=3,
        height=8,
        width=16,
        ema={"enabled": False},
        sampling={"num_steps": 2, "guidance_scale": 4.0},
    )
    defaults.update(kwargs)
    return InterpolationStage(**defaults)


@pytest.fixture(scope="module")
def stage() -> InterpolationStage:
    return make_stage()


def video(b: int, t: int, h: int = 8, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def test_window_condition_is_linear_blend_and_mask(stage: InterpolationStage) -> None:
    clip = video(2, 5)
    x0, cond = stage.training_inputs({"video": clip})
    assert x0 is clip and cond.class_labels is None
    assert cond.concat.shape == (2, 4, 5, 8, 16)
    f0, f4 = clip[:, :, 0], clip[:, :, 4]
    for i in range(5):
        # Values in [-1, 1] and one multiply-add per element: rounding is below 1e-6 on every CPU kind.
        assert torch.allclose(cond.concat[:, :3, i], (1 - i / 4) * f0 + (i / 4) * f4, rtol=0, atol=1e-6)
    mask = cond.concat[:, 3]
    assert torch.equal(mask[:, [0, 4]], torch.ones_like(mask[:, [0, 4]]))
    assert torch.equal(mask[:, 1:4], torch.zeros_like(mask[:, 1:4]))


def test_training_step_loss_finite_and_gradients_reach_unet(stage: InterpolationStage) -> None:
    stage.train()
    stage.unet.zero_grad()
    batch = {"video": video(2, 5), "caption": ["a red circle", "a blue square"]}
    seen: list[torch.Tensor] = []
    handle = stage.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    try:
        loss, _ = stage.diffusion_step(batch)
    finally:
        handle.remove()
    assert torch.isfinite(loss)
    assert seen[0].shape == (2, 7, 5, 8, 16)  # noisy 3 + blend 3 + mask 1 reach the UNet
    assert torch.equal(seen[0][:, 3:], stage.window_condition(batch["video"][:, :, 0], batch["video"][:, :, 4]).concat)
    loss.backward()
    for name in ("conv_in.weight", "conv_out.weight"):
        grad = dict(stage.unet.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # The condition channels matter: gradients flow into the conv_in weights of channels 3..6.
    assert stage.unet.conv_in.weight.grad[:, 3:].abs().sum() > 0
    stage.unet.zero_grad()


def test_stitching_places_windows_and_keeps_keyframes(
    stage: InterpolationStage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in denoiser that returns its blend condition: the stitched video is then the linear interpolation
    of the keyframes over 29 frames, which checks every window lands at its place."""
    calls = []

    def fake_generate(prompts, seeds, cond=None, shape=None, text=None, **kw):
        calls.append((list(prompts), list(seeds), text[0].shape[0]))
        return cond.concat[:, :3] + 0.0

    monkeypatch.setattr(stage, "generate", fake_generate)
    keys = video(2, 8, seed=3)
    out = stage.interpolate(keys, ["a", "b"], [10, 11])
    assert out.shape == (2, 3, 29, 8, 16) and stage.output_frames(8) == 29
    assert torch.equal(out[:, :, 0::4], keys)  # exact values at indices 0, 4, ..., 28
    expected = F.interpolate(keys, size=(29, 8, 16), mode="trilinear", align_corners=True)
    # Inputs in [-1, 1]: a blend computed by another formula than trilinear's differs by float32 rounding only.
    assert_close_rel(out, expected, rel=1e-5)
    # One call for all 14 windows (window_batch_size None), sample-major, each window its own seed.
    assert len(calls) == 1
    prompts, seeds, n_text = calls[0]
    assert prompts == ["a"] * 7 + ["b"] * 7 and n_text == 14
    assert seeds == window_seeds(10, 7) + window_seeds(11, 7) and len(set(seeds)) == 14


def test_window_batch_size_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = make_stage(window_batch_size=3)
    sizes = []

    def fake_generate(prompts, seeds, cond=None, **kw):
        sizes.append(len(prompts))
        return cond.concat[:, :3] + 0.0

    monkeypatch.setattr(stage, "generate", fake_generate)
    keys = video(1, 8)
    out = stage.interpolate(keys, ["a"], [0])
    assert sizes == [3, 3, 1]
    # Inputs in [-1, 1]: the blend and trilinear differ by float32 rounding only.
    assert_close_rel(out, F.interpolate(keys, size=(29, 8, 16), mode="trilinear", align_corners=True), rel=1e-5)


def test_interpolate_real_sampler_8_to_29(stage: InterpolationStage) -> None:
    keys = video(2, 8, seed=4)
    out = stage.interpolate(keys, ["a red circle", "a blue square"], [5, 6])
    assert out.shape == (2, 3, 29, 8, 16) and torch.isfinite(out).all()
    assert torch.equal(out[:, :, ::4], keys)
    new = torch.ones(29, dtype=torch.bool)
    new[::4] = False
    # The model writes the new frames (not a blend that slipped through): far above rounding noise.
    assert_differ_rel(
        out[:, :, new], F.interpolate(keys, size=(29, 8, 16), mode="trilinear", align_corners=True)[:, :, new]
    )
    # A video's frames depend on its own prompt and seed only, not on the batch. A batch of 1 runs kernels
    # blocked differently from a batch of 2, so equal up to reordered float32 sums (numerics.REORDER).
    single = stage.interpolate(keys[1:], ["a blue square"], [6])
    assert_close_rel(single, out[1:])


def test_errors(stage: InterpolationStage) -> None:
    with pytest.raises(ValueError, match="insert_frames \\+ 2"):
        make_stage(num_frames=4)
    with pytest.raises(ValueError, match="interpolate"):
        stage.generate(["a"], [0])
    with pytest.raises(ValueError, match="5-frame windows"):
        stage.training_inputs({"video": video(1, 8)})
    with pytest.raises(ValueError, match="N >= 2"):
        stage.interpolate(video(1, 1), ["a"], [0])
    with pytest.raises(ValueError, match="3 sample \\+ 4 condition"):
        make_stage(
            num_frames=6,
            insert_frames=4,
            unet=UNet3DConditionModel(
                in_channels=3,
                out_channels=3,
                down_block_types=["DownBlock3D"],
                up_block_types=["UpBlock3D"],
                block_out_channels=[16],
                layers_per_block=1,
                norm_num_groups=8,
                cross_attention_dim=TEXT_DIM,
            ),
        )


def test_toy_experiment_trains_through_hydra(compose_train, tmp_path: Path) -> None:
    """`python train.py experiment=toy_interpolation`, shortened: compose, 2 steps, checkpoint and EMA export."""
    from omegaconf import open_dict

    import train

    cfg = compose_train(
        tmp_path,
        "experiment=toy_interpolation",
        "logger=csv",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.epoch_length=2",
        "data.val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.samples.num_steps=4",  # strength 0.25: one denoising step
        "callbacks.samples.num_val_clips=2",
        tiny=False,
    )
    with open_dict(cfg):
        cfg.callbacks.pop("progress_bar", None)
    assert cfg.stage._target_.endswith("InterpolationStage")
    assert (cfg.data.num_frames, cfg.data.target_fps, cfg.model.in_channels) == (5, 16, 7)
    metrics = train.train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # The sample callback runs the stage on validation clips: input | output | ground truth, PSNR vs the blend.
    assert math.isfinite(metrics["val/psnr"]) and math.isfinite(metrics["val/psnr_baseline"])
    assert len(list((tmp_path / "samples").glob("step_*/*.mp4"))) == 2


def test_paper_experiment_config(compose_train, tmp_path) -> None:
    """experiment=paper_interpolation: paper numbers, the released UNet config (input channels = 3 + condition), GPU bf16."""
    from show1_lightning.models.show1_unet import load_released_config

    cfg = compose_train(tmp_path, "experiment=paper_interpolation", tiny=False)
    assert cfg.stage._target_.endswith("InterpolationStage") and cfg.model.config == "show-1-interpolation"
    assert load_released_config("show-1-interpolation")["in_channels"] == 3 + 4
    assert (cfg.stage.sampling.num_steps, cfg.stage.sampling.guidance_scale) == (75, 4.0)
    assert cfg.stage.noise_scheduler.beta_schedule == "squaredcos_cap_v2"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.text_dim == 4096 and cfg.data.target_fps == 8
    assert (cfg.stage.num_frames, cfg.stage.insert_frames, cfg.stage.height, cfg.stage.width) == (5, 3, 40, 64)
