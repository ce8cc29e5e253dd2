"""Tests for the pixel super-resolution stage (show1_lightning/stages/pixel_sr.py) on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet3DConditionModel
from numerics import assert_close_rel, assert_differ_rel

from show1_lightning.diffusion.module import StageCondition
from show1_lightning.models.show1_unet import build_show1_unet
from show1_lightning.models.text_encoder import TextEncoder
from show1_lightning.stages.pixel_sr import PixelSRStage

torch.set_num_threads(1)

TEXT_DIM = 32
# A tiny show-1-sr1-style UNet: the released sr1 config with small widths (channels multiples of 32: the temporal
# convolutions and the group-normed text states use 32 norm groups).
TINY_SR = dict(
    in_channels=6,
    out_channels=6,
    block_out_channels=[32, 32],
    layers_per_block=[1, 1],
    down_block_types=["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
    up_block_types=["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    norm_num_groups=8,
    attention_head_dim=8,
    cross_attention_dim=32,
    encoder_hid_dim=TEXT_DIM,
    addition_embed_type_num_heads=2,
    time_embedding_dim=32,
    sample_size=16,
)


def make_stage(**kwargs) -> PixelSRStage:
    torch.manual_seed(0)
    defaults = dict(
        unet=build_show1_unet("show-1-sr1", **TINY_SR),
        noise_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, variance_type="fixed_small"
        ),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        text_encoder=TextEncoder(kind="t5", max_length=8, tiny_dim=TEXT_DIM, tiny_layers=1),
        num_frames=3,
        height=16,
        width=32,
        scale_factor=4,
        max_aug_level=999,
        noise_level=250,
        window_frames=3,
        ema={"enabled": False},
        sampling={"num_steps": 2, "guidance_scale": 3.0},
    )
    defaults.update(kwargs)
    return PixelSRStage(**defaults)


@pytest.fixture(scope="module")
def stage() -> PixelSRStage:
    return make_stage()


def video(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


class RecordClassLabels:
    """Forward pre-hook recording the UNet's class labels and inputs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.labels: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.labels.append(kwargs["class_labels"].clone())
        self.inputs.append(args[0].clone())

    def remove(self) -> None:
        self.handle.remove()


def test_training_step_loss_finite_and_gradients_reach_unet(stage: PixelSRStage) -> None:
    stage.train()
    stage.unet.zero_grad()
    batch = {"video": video(2, 3, 16, 32), "caption": ["a red circle", "a blue square"]}
    loss, _ = stage.diffusion_step(batch)
    assert torch.isfinite(loss)
    loss.backward()
    for name in ("conv_in.weight", "class_embedding.linear_1.weight", "conv_out.weight"):
        grad = dict(stage.unet.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    stage.unet.zero_grad()


def test_training_aug_level_reaches_class_labels_and_condition_is_the_forward_step() -> None:
    stage = make_stage(max_aug_level=40)
    stage.train()
    torch.manual_seed(3)
    hr = video(64, 2, 16, 32, seed=1)
    x0, cond = stage.training_inputs({"video": hr})
    assert x0 is hr
    levels = cond.class_labels
    assert levels.shape == (64,) and levels.dtype == torch.long
    assert 0 <= int(levels.min()) and int(levels.max()) <= 40 and len(levels.unique()) > 10
    # The condition is q(x_s | x_0) of the upsampled low-res copy: (cond - sqrt(abar) up) / sqrt(1 - abar) ~ N(0, 1).
    up = stage.upsample_condition(stage.downsample(hr), (16, 32))
    abar = stage.noise_scheduler.alphas_cumprod[levels].view(-1, 1, 1, 1, 1)
    eps = (cond.concat - abar.sqrt() * up) / (1 - abar).sqrt()
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05
    # The labels reach the UNet.
    rec = RecordClassLabels(stage.unet)
    try:
        stage.diffusion_step({"video": hr[:4], "caption": ["x"] * 4})
    finally:
        rec.remove()
    assert len(rec.labels) == 1 and rec.labels[0].shape == (4,) and int(rec.labels[0].max()) <= 40


def test_downsample_is_antialiased_4x(stage: PixelSRStage) -> None:
    hr = torch.zeros(1, 3, 1, 16, 32)
    hr[..., ::2] = 1.0  # a 1-pixel stripe pattern: an antialiased 4x reduction averages it to 0.5
    lr = stage.downsample(hr)
    assert lr.shape == (1, 3, 1, 4, 8)
    # Values in [0, 1]: the tolerance is the antialias filter's ripple, far from the 0/1 of aliased sampling.
    assert torch.allclose(lr, torch.full_like(lr, 0.5), rtol=0, atol=0.05)


def test_validation_uses_inference_level_and_fixed_noise(stage: PixelSRStage) -> None:
    stage.eval()
    hr = video(2, 3, 16, 32)
    _, c1 = stage.training_inputs({"video": hr})
    _, c2 = stage.training_inputs({"video": hr})
    assert torch.equal(c1.class_labels, torch.tensor([250, 250]))
    assert torch.equal(c1.concat, c2.concat)
    stage.train()


def test_train_crop_and_clean_first_frame() -> None:
    stage = make_stage(train_crop=[8, 16], clean_first_frame_prob=1.0)
    stage.train()
    hr = video(3, 3, 16, 32)
    x0, cond = stage.training_inputs({"video": hr})
    assert x0.shape == (3, 3, 3, 8, 16) and cond.concat.shape == x0.shape
    assert torch.equal(cond.concat[:, :, 0], x0[:, :, 0])  # clean first condition frame
    for crop in x0:  # every crop is a window of its clip at offsets that are multiples of the scale factor
        assert any(
            torch.equal(crop, clip[..., y : y + 8, x : x + 16])
            for clip in hr
            for y in range(0, 9, 4)
            for x in range(0, 17, 4)
        )
    with pytest.raises(ValueError, match="train_crop"):
        make_stage(train_crop=[6, 16])


def test_windows() -> None:
    s = make_stage(window_frames=8)
    assert s.windows(29) == [(0, 8), (8, 16), (16, 24), (24, 29)]
    s = make_stage(window_frames=8, window_overlap=True)
    assert s.windows(29) == [(0, 8), (7, 15), (14, 22), (21, 29)]
    assert s.windows(5) == [(0, 5)]


@pytest.mark.parametrize("overlap", [False, True])
def test_upsample_stitching(overlap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in denoiser returning its condition + 1, the stitched output shows which condition went where."""
    stage = make_stage(window_frames=3, window_overlap=overlap)
    calls: list[StageCondition] = []

    def fake_generate(prompts, seeds, cond=None, shape=None, text=None, **kw):
        assert cond.concat.shape[0] == len(prompts) == len(seeds) == text[0].shape[0]
        assert tuple(shape) == tuple(cond.concat.shape[1:])
        calls.append(cond)
        return cond.concat + 1.0

    monkeypatch.setattr(stage, "generate", fake_generate)
    low = video(2, 7, 4, 8)
    out = stage.upsample(low, ["a", "b"], [1, 2], noise_level=100)
    assert out.shape == (2, 3, 7, 16, 32)
    for c in calls:
        assert torch.equal(c.class_labels, torch.full_like(c.class_labels, 100))
    if not overlap:
        # Windows of equal length batched together: (0,3), (3,6) of both videos in one call, (6,7) in another.
        assert [c.concat.shape[:3] for c in calls] == [(4, 3, 3), (2, 3, 1)]
        full = torch.cat(
            [
                torch.cat([calls[0].concat[0], calls[0].concat[1], calls[1].concat[0]], dim=1)[None],
                torch.cat([calls[0].concat[2], calls[0].concat[3], calls[1].concat[1]], dim=1)[None],
            ]
        )
        assert torch.equal(out, full + 1.0)
    else:
        # Windows (0,3), (2,5), (4,7) one after another; frame 0 of later windows is conditioned on the output.
        assert len(calls) == 3 and all(c.concat.shape[:3] == (2, 3, 3) for c in calls)
        assert torch.equal(calls[1].concat[:, :, 0], out[:, :, 2])
        assert torch.equal(calls[2].concat[:, :, 0], out[:, :, 4])
        assert torch.equal(out[:, :, 0:3], calls[0].concat + 1.0)
        assert torch.equal(out[:, :, 3:5], calls[1].concat[:, :, 1:] + 1.0)
        assert torch.equal(out[:, :, 5:7], calls[2].concat[:, :, 1:] + 1.0)
    # Either way every output frame is its own (never replaced) condition frame + 1, and the condition is the
    # upsampled low-res video noised at level 100: (cond - sqrt(abar) up) / sqrt(1 - abar) ~ N(0, 1).
    up = stage.upsample_condition(low, (16, 32))
    abar = float(stage.noise_scheduler.alphas_cumprod[100])
    eps = ((out - 1.0) - math.sqrt(abar) * up) / math.sqrt(1 - abar)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05


def test_upsample_real_sampler_shapes_labels_and_batch_independence(stage: PixelSRStage) -> None:
    low = video(2, 4, 4, 8, seed=5)
    rec = RecordClassLabels(stage.unet)
    try:
        out = stage.upsample(low, ["a red circle", "a blue square"], [7, 8])
    finally:
        rec.remove()
    assert out.shape == (2, 3, 4, 16, 32) and torch.isfinite(out).all()
    # 2 windows of lengths 3 and 1, 2 steps each, guided: class labels 2 x batch, all at the inference level.
    assert len(rec.labels) == 4 and all(torch.equal(lb, torch.full_like(lb, 250)) for lb in rec.labels)
    single = stage.upsample(low[1:], ["a blue square"], [8])
    # Untrained weights sampled in 2 steps give values of order 1e4, and a batch of 1 runs kernels blocked
    # differently from a batch of 2: equal up to reordered float32 sums, relative to that scale.
    assert_close_rel(single, out[1:])
    other_level = stage.upsample(low[1:], ["a blue square"], [8], noise_level=0)
    assert_differ_rel(other_level, single)


def test_errors(stage: PixelSRStage) -> None:
    with pytest.raises(ValueError, match="upsample"):
        stage.generate(["a"], [0])
    with pytest.raises(ValueError, match="class embedding"):
        make_stage(
            unet=UNet3DConditionModel(
                in_channels=6,
                out_channels=3,
                down_block_types=["DownBlock3D"],
                up_block_types=["UpBlock3D"],
                block_out_channels=[32],
                layers_per_block=1,
                norm_num_groups=8,
                cross_attention_dim=TEXT_DIM,
            )
        )
    with pytest.raises(ValueError, match="high-res clips"):
        stage.training_inputs({"video": video(1, 3, 8, 16)})
    with pytest.raises(ValueError, match="noise_level"):
        stage.upsample(video(1, 2, 4, 8), ["a"], [0], noise_level=1000)


def test_toy_experiment_trains_through_hydra(compose_train, tmp_path: Path) -> None:
    """`python train.py experiment=toy_pixel_sr`, shortened: compose, 2 steps, checkpoint and EMA export."""
    from omegaconf import open_dict

    import train

    cfg = compose_train(
        tmp_path,
        "experiment=toy_pixel_sr",
        "logger=csv",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "data.batch_size=1",
        "data.num_workers=0",
        "data.epoch_length=2",
        "data.val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.samples.num_steps=4",  # strength 0.25: one denoising step
        "callbacks.samples.num_val_clips=1",
        tiny=False,
    )
    with open_dict(cfg):
        cfg.callbacks.pop("progress_bar", None)
    assert cfg.stage._target_.endswith("PixelSRStage") and cfg.data.target_fps == 16
    metrics = train.train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # The sample callback runs the stage on validation clips' low-res copies, PSNR beside bicubic's.
    assert math.isfinite(metrics["val/psnr"]) and math.isfinite(metrics["val/psnr_baseline"])
    assert len(list((tmp_path / "samples").glob("step_*/*.mp4"))) == 1
    assert (tmp_path / "export").is_dir()


def test_paper_experiment_config(compose_train, tmp_path) -> None:
    """experiment=paper_pixel_sr: paper numbers, the released UNet config (input channels = 3 + condition), GPU bf16."""
    from show1_lightning.models.show1_unet import load_released_config

    cfg = compose_train(tmp_path, "experiment=paper_pixel_sr", tiny=False)
    assert cfg.stage._target_.endswith("PixelSRStage") and cfg.model.config == "show-1-sr1"
    assert load_released_config("show-1-sr1")["in_channels"] == 3 + 3
    assert (cfg.stage.sampling.num_steps, cfg.stage.sampling.guidance_scale) == (125, 7.0)
    assert cfg.stage.noise_scheduler.beta_schedule == "squaredcos_cap_v2"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.text_dim == 4096 and cfg.data.target_fps == 8
    assert (cfg.stage.height, cfg.stage.width, cfg.stage.scale_factor, cfg.stage.noise_level) == (160, 256, 4, 250)
    assert cfg.stage.window_frames == 8
