"""The one stage interface (run / make_upstream / baseline), the residual option, the stage-vs-baseline check,
the naive cascade and the single stage loader, on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from numerics import assert_close_rel
from test_stage_interpolation import make_stage as make_interpolation
from test_stage_pixel_sr import make_stage as make_pixel_sr

from show1_lightning.diffusion.objectives import (
    diffusion_loss,
    frame_difference_loss,
    min_snr_weights,
    training_target,
)
from show1_lightning.stages.loading import load_stage
from show1_lightning.stages.validation import compare_to_baseline, video_psnr

torch.set_num_threads(1)

# Thresholded x0 predictions keep the untrained UNets' samples of order 1, so float32 rounding stays far below
# the size of the residual base (order 1) that the residual checks look for.
BOUNDED = {"num_steps": 2, "guidance_scale": 4.0, "thresholding": True, "sample_max_value": 1.5}


def clip(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def linear_in_time(b: int, t: int, h: int, w: int, step: int) -> torch.Tensor:
    """A video that is exactly linear between every step-th frame (what the blend baseline reproduces)."""
    keys = clip(b, (t - 1) // step + 1, h, w, seed=3)
    return F.interpolate(keys, size=(t, h, w), mode="trilinear", align_corners=True)


def test_interpolation_interface_and_linear_baseline() -> None:
    st = make_interpolation()
    video = linear_in_time(2, 9, 8, 16, step=4)  # 3 keyframes -> 9 frames
    up = st.make_upstream(video)
    assert up.shape == (2, 3, 3, 8, 16) and torch.equal(up, video[:, :, ::4])
    assert_close_rel(st.baseline(up), video)  # the blend of a linear video is the video
    out = st.run(up, ["a", "b"], [1, 2])
    assert out.shape == video.shape and torch.equal(out[:, :, ::4], up)  # given frames kept exactly
    with pytest.raises(ValueError, match="needs keyframes"):
        st.run(None, ["a"], [0])
    with pytest.raises(ValueError, match=r"\(N-1\)\*4\+1"):
        st.make_upstream(video[:, :, :8])


def test_interpolation_residual_target_and_sampling() -> None:
    plain, res = make_interpolation(sampling=BOUNDED), make_interpolation(residual=True, sampling=BOUNDED)
    window = linear_in_time(2, 5, 8, 16, step=4)
    target, cond = res.training_inputs({"video": window})
    assert target.abs().max() < 1e-6  # linear motion: nothing left for the model to learn
    target_plain, _ = plain.training_inputs({"video": window})
    assert torch.equal(target_plain, window)
    keys = clip(2, 3, 8, 16)
    out_res, out_plain = res.interpolate(keys, ["a", "b"], [5, 6]), plain.interpolate(keys, ["a", "b"], [5, 6])
    inserted = [i for i in range(9) if i % 4]
    # The same UNet and noise: the residual stage adds the blend to what the plain stage returns.
    assert_close_rel(out_res[:, :, inserted] - out_plain[:, :, inserted], res.baseline(keys)[:, :, inserted])
    assert torch.equal(out_res[:, :, ::4], keys)


def test_pixel_sr_interface_residual_and_bicubic_baseline() -> None:
    plain, res = make_pixel_sr(sampling=BOUNDED), make_pixel_sr(residual=True, sampling=BOUNDED)
    hr = clip(2, 3, 16, 32)
    low = res.make_upstream(hr)
    assert low.shape == (2, 3, 3, 4, 8) and torch.equal(low, res.downsample(hr))
    frames = low.permute(0, 2, 1, 3, 4).reshape(6, 3, 4, 8)
    bicubic = F.interpolate(frames, size=(16, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.equal(res.baseline(low), bicubic.reshape(2, 3, 3, 16, 32).permute(0, 2, 1, 3, 4))
    target, _ = res.training_inputs({"video": hr})
    assert_close_rel(target, hr - res.baseline(low))
    out_res = res.run(low, ["a", "b"], [1, 2])
    out_plain = plain.run(low, ["a", "b"], [1, 2])
    assert_close_rel(out_res - out_plain, res.baseline(low))  # the baseline added back after sampling


def test_residual_scale_multiplies_the_target_and_divides_the_sample() -> None:
    one, ten = (
        make_pixel_sr(residual=True, sampling=BOUNDED),
        make_pixel_sr(residual=True, residual_scale=10.0, sampling=BOUNDED),
    )
    ten.unet.load_state_dict(one.unet.state_dict())
    hr = clip(2, 3, 16, 32)
    low = ten.make_upstream(hr)
    target, _ = ten.training_inputs({"video": hr})
    assert_close_rel(target, 10.0 * (hr - ten.baseline(low)))
    # The same UNet and noise: what the unscaled stage adds to the baseline, the scaled one adds a tenth of.
    base = ten.baseline(low)
    assert_close_rel(ten.run(low, ["a", "b"], [1, 2]) - base, (one.run(low, ["a", "b"], [1, 2]) - base) / 10.0)
    with pytest.raises(ValueError, match="residual_scale"):
        make_pixel_sr(residual=True, residual_scale=0.0)


def test_compare_to_baseline_scores_output_baseline_and_panels() -> None:
    st = make_interpolation()
    video = clip(2, 5, 8, 16)
    cmp = compare_to_baseline(st, video, ["a", "b"], [0, 1])
    assert set(cmp.psnr) == {"output", "baseline"}
    assert cmp.psnr["baseline"] == pytest.approx(video_psnr(st.baseline(video[:, :, ::4]), video))
    assert math.isfinite(cmp.psnr["output"])
    assert cmp.side_by_side().shape == (2, 3, 5, 8, 48)  # input | output | ground truth
    # One clip per stage call: the same outputs (each clip's noise comes from its own seed). v-prediction here: an
    # epsilon model's clean estimate at t = 999 divides by sqrt(alpha_bar) ~ 5e-5, which turns the UNet's 1e-6
    # batch-size rounding into 0.1 (the toy stages predict x0 or v).
    st = make_interpolation(
        noise_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    )
    both = compare_to_baseline(st, video, ["a", "b"], [0, 1])
    one = compare_to_baseline(st, video, ["a", "b"], [0, 1], batch_size=1)
    torch.testing.assert_close(one.videos["output"], both.videos["output"], atol=1e-4, rtol=0)
    other = compare_to_baseline(st, video, ["a", "b"], [5, 1], batch_size=1)  # the seed decides, not the call
    assert (other.videos["output"][0] - one.videos["output"][0]).abs().max() > 0.1
    torch.testing.assert_close(other.videos["output"][1], one.videos["output"][1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="batch_size"):
        compare_to_baseline(st, video, ["a", "b"], [0, 1], batch_size=0)
    with pytest.raises(ValueError, match="takes no upstream"):
        compare_to_baseline(type("K", (), {"takes_upstream": False})(), video, ["a"], [0])


def test_video_psnr() -> None:
    a = torch.zeros(2, 3, 2, 4, 4)
    b = a.clone()
    b[0] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB; video 1 identical: capped, still larger
    assert video_psnr(a[:1], b[:1]) == pytest.approx(20.0, abs=1e-4)
    with pytest.raises(ValueError, match="different shapes"):
        video_psnr(a, b[:1])


def test_load_stage_export_builds_no_ema(tmp_path: Path) -> None:
    import json

    from safetensors.torch import save_file

    st = make_interpolation(ema={"enabled": True, "decay": 0.9})
    config = {
        "_target_": "show1_lightning.stages.interpolation.InterpolationStage",
        "num_frames": 5,
        "insert_frames": 3,
        "height": 8,
        "width": 16,
        "ema": {"enabled": True, "decay": 0.9},
        "unet": {
            "_target_": "diffusers.UNet3DConditionModel",
            **{k: v for k, v in dict(st.unet.config).items() if not k.startswith("_")},
        },
        "noise_scheduler": {"_target_": "diffusers.DDPMScheduler", "num_train_timesteps": 1000},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        "text_encoder": None,
    }
    (tmp_path / "unet").mkdir()
    (tmp_path / "stage.json").write_text(json.dumps(config))
    save_file(st.unet.state_dict(), str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    loaded = load_stage(tmp_path)
    assert loaded.ema is None and loaded.stage_config["ema"]["enabled"] is True  # stored config unchanged
    for k, v in st.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_stage(tmp_path / "unet")


def test_strength_leaving_no_step_fails_at_start_up(compose_train, tmp_path: Path) -> None:
    """A callback sampling 2 steps at strength 0.25 would fail after training: refused before any step."""
    from show1_lightning.runtime import ConfigError, validate_train_config

    # 8 stage steps: the toy recipe's own 2 at strength 0.25 would be refused too (stage.sampling.num_steps).
    short = ("experiment=toy_interpolation", "stage.sampling.strength=0.25", "stage.sampling.num_steps=8")
    short = (*short, "stage.t_min=0", "stage.t_max=300")
    cfg = compose_train(tmp_path, *short, "callbacks.samples.num_steps=2", tiny=False)
    with pytest.raises(ConfigError, match=r"callbacks.samples.num_steps"):
        validate_train_config(cfg)
    ok = compose_train(tmp_path, *short, "callbacks.samples.num_steps=4", tiny=False)
    validate_train_config(ok)


def test_log_snr_time_input_tells_the_unet_the_noise_level_in_training_and_sampling() -> None:
    """``time_input="log_snr"``: every UNet call, in the loss and in the sampler, gets the step's log-SNR on the step
    range (monotone, same endpoints), which spreads the near-pure-noise end the cosine schedule crowds into its last
    steps; the default passes the steps through."""
    from show1_lightning.diffusion.objectives import log_snr_time_table

    stage = make_pixel_sr(residual=True, sampling=BOUNDED, time_input="log_snr")
    table = log_snr_time_table(stage.noise_scheduler)
    assert table[0] == 0 and math.isclose(float(table[-1]), 999, rel_tol=1e-6)
    assert bool((table[1:] > table[:-1]).all())
    # the last 50 steps cover about half the range
    assert float(table[975]) < 900 < float(table[999]) and float(table[950]) < 650
    seen: list[torch.Tensor] = []
    stage.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    hr = clip(2, 3, 16, 32)
    stage.diffusion_step({"video": hr, "caption": ["a", "b"]}, timesteps=torch.tensor([950, 10]))
    torch.testing.assert_close(seen[-1], table[[950, 10]])
    seen.clear()
    stage.run(stage.make_upstream(hr), ["a", "b"], [1, 2])
    assert seen and all(bool(torch.isin(s, table).all()) for s in seen)
    plain = make_pixel_sr(residual=True, sampling=BOUNDED)
    seen.clear()
    plain.unet.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    plain.diffusion_step({"video": hr, "caption": ["a", "b"]}, timesteps=torch.tensor([950, 10]))
    torch.testing.assert_close(seen[-1], torch.tensor([950, 10]))
    with pytest.raises(ValueError, match="time_input"):
        make_pixel_sr(time_input="sigma")


def test_bench_stage_batch_compares_call_sizes_on_one_stage() -> None:
    """bench/bench_stage_batch.py's core: every call size times the same clips and gives the same videos."""
    from bench_stage_batch import compare_call_sizes

    st = make_interpolation(
        noise_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    )
    rows = compare_call_sizes(st, clip(4, 5, 8, 16), ["a", "b", "c", "d"], [1, 4, 2])
    assert [r[0] for r in rows] == [4, 2, 1] and rows[0][2] == 1.0 and rows[0][3] == 0.0
    assert all(r[1] > 0 and r[2] > 0 and r[3] < 1e-4 for r in rows)


def _frame_correlation(x: torch.Tensor) -> float:
    """Mean correlation between consecutive frames of B x C x T x H x W noise."""
    a, b = x[:, :, :-1].flatten(), x[:, :, 1:].flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_frame_correlated_noise_in_training_and_sampling() -> None:
    """``noise_frame_correlation=rho``: the training noise and the sampler's starting noise share rho of their
    variance between frames (unit variance kept); 0 is exactly the independent draw of before."""
    from show1_lightning.diffusion.sampling import seeded_noise

    plain = seeded_noise((3, 6, 16, 32), [4, 5])
    assert torch.equal(seeded_noise((3, 6, 16, 32), [4, 5], frame_correlation=0.0), plain)
    mixed = seeded_noise((3, 6, 16, 32), [4, 5], frame_correlation=0.9)
    assert _frame_correlation(plain) < 0.1 < 0.8 < _frame_correlation(mixed)
    assert 0.8 < float(mixed.std()) < 1.2
    assert torch.equal(seeded_noise((3, 6, 16, 32), [5], frame_correlation=0.9)[0], mixed[1])  # per seed

    hr = clip(2, 3, 16, 32)
    for rho, corr_range in ((0.0, (-0.1, 0.1)), (0.9, (0.8, 1.0))):
        stage = make_pixel_sr(residual=True, sampling=BOUNDED, noise_frame_correlation=rho)
        seen: list[torch.Tensor] = []
        stage.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, :3].detach().clone()))
        stage.diffusion_step({"video": hr, "caption": ["a", "b"]}, timesteps=torch.tensor([999, 999]))
        assert corr_range[0] < _frame_correlation(seen[-1]) < corr_range[1]  # x_t at t = 999 is the noise
        seen.clear()
        stage.run(stage.make_upstream(hr), ["a", "b"], [1, 2])
        assert corr_range[0] < _frame_correlation(seen[0]) < corr_range[1]  # the sampler's first input
    with pytest.raises(ValueError, match="frame noise correlation"):
        make_pixel_sr(noise_frame_correlation=1.0)


def test_frame_difference_loss_weighs_what_changes_between_frames() -> None:
    """The frame-difference loss ignores an error shared by all frames and sees one that moves; the stage adds
    ``frame_difference_loss_weight`` times it to the plain loss (0: the plain loss, unchanged)."""
    target = torch.zeros(2, 3, 4, 8, 8)
    still = target + torch.randn(2, 3, 1, 8, 8)  # the same error in every frame
    assert frame_difference_loss(still, target) == 0 and diffusion_loss(still, target) > 0
    moving = target.clone()
    moving[:, :, 1, 2, 2] = 1.0  # a dot in one frame only: per clip and channel two differences of 1 in 3*8*8
    torch.testing.assert_close(frame_difference_loss(moving, target), torch.tensor(2 / (3 * 8 * 8)))
    with pytest.raises(ValueError, match="T >= 2"):
        frame_difference_loss(torch.zeros(2, 3, 1, 8, 8), torch.zeros(2, 3, 1, 8, 8))

    stage = make_pixel_sr(residual=True, sampling=BOUNDED, snr_gamma=5.0, snr_floor=1.0)
    stage.eval()
    outputs: list[torch.Tensor] = []
    stage.unet.register_forward_hook(lambda m, args, out: outputs.append(out.sample[:, :3].detach().clone()))
    batch, t = {"video": clip(2, 3, 16, 32), "caption": ["a", "b"]}, torch.tensor([900, 100])
    losses = {}
    for w in (0.0, 2.0):
        stage.frame_difference_loss_weight = w
        losses[w], _ = stage.diffusion_step(batch, generator=torch.Generator().manual_seed(3), timesteps=t)
    x0, _ = stage.training_inputs(batch)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    target = training_target(stage.noise_scheduler, x0, noise, t)
    weights = min_snr_weights(stage.noise_scheduler, t, 5.0, 1.0)
    torch.testing.assert_close(losses[0.0], diffusion_loss(outputs[0], target, weights))
    torch.testing.assert_close(losses[2.0] - losses[0.0], 2.0 * frame_difference_loss(outputs[1], target, weights))
    with pytest.raises(ValueError, match="frame_difference_loss_weight"):
        make_pixel_sr(frame_difference_loss_weight=-1.0)
