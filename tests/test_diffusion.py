"""Unit tests for the shared diffusion mechanics (schedule, targets, guidance, sampling)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from show1_lightning.diffusion.guidance import drop_captions, guided_prediction
from show1_lightning.diffusion.objectives import sample_timesteps, split_learned_variance, training_target
from show1_lightning.diffusion.sampling import denoise, make_sampler, seeded_noise, start_index

torch.set_num_threads(1)


def cosine_scheduler(kind: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=kind, clip_sample=False
    )


def test_timesteps_stay_in_the_closed_range():
    t = sample_timesteps(20000, 0, 900, generator=torch.Generator().manual_seed(0))
    assert t.min().item() == 0 and t.max().item() == 900
    with pytest.raises(ValueError, match="t_min"):
        sample_timesteps(4, 10, 5)


def test_cosine_schedule_matches_the_closed_form():
    s = cosine_scheduler()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):
        expected = 1.0
        for i in range(t + 1):
            expected *= 1 - min(1 - f(i + 1) / f(i), 0.999)
        assert s.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-4)


def test_v_target_reconstructs_x0_and_noise():
    s = cosine_scheduler("v_prediction")
    x0, noise = torch.randn(3, 3, 2, 4, 4), torch.randn(3, 3, 2, 4, 4)
    t = torch.tensor([10, 500, 990])
    v = training_target(s, x0, noise, t)
    a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1, 1)
    sig = (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1, 1)
    x_t = s.add_noise(x0, noise, t)
    # Unit-variance inputs and three multiply-adds per element: float32 rounding stays far below 1e-5.
    torch.testing.assert_close(a * x_t - sig * v, x0, atol=1e-5, rtol=1e-5)
    assert torch.equal(training_target(cosine_scheduler(), x0, noise, t), noise)


def test_learned_variance_channels_are_dropped():
    out = torch.randn(2, 6, 3, 4, 4)
    assert torch.equal(split_learned_variance(out, 3), out[:, :3])
    assert split_learned_variance(out[:, :3], 3).shape[1] == 3
    with pytest.raises(ValueError, match="channels"):
        split_learned_variance(torch.randn(2, 5, 1, 2, 2), 3)


def test_caption_dropout_rate_and_replacement():
    emb, mask = torch.ones(4000, 5, 2), torch.ones(4000, 5, dtype=torch.bool)
    null, null_mask = torch.zeros(1, 5, 2), torch.zeros(1, 5, dtype=torch.bool)
    e, m, dropped = drop_captions(emb, mask, null, null_mask, 0.25, torch.Generator().manual_seed(0))
    assert 0.22 < dropped.float().mean().item() < 0.28
    assert torch.all(e[dropped] == 0) and torch.all(e[~dropped] == 1)
    assert not m[dropped].any() and m[~dropped].all()


def test_guidance_formula():
    u, c = torch.tensor([1.0]), torch.tensor([3.0])
    assert guided_prediction(u, c, 1.0).item() == 3.0
    assert guided_prediction(u, c, 9.0).item() == 1.0 + 9.0 * 2.0


def test_seeded_noise_does_not_depend_on_the_batch():
    a = seeded_noise((3, 2, 4, 4), [5, 6, 7])
    b = seeded_noise((3, 2, 4, 4), [7])
    assert torch.equal(a[2], b[0])  # one generator per seed, same draws: bit for bit
    assert not torch.equal(a[0], a[1])


def unguided_denoise(model, scheduler: DDPMScheduler, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """``denoise`` of one sample with a dummy 3-token text and no guidance."""
    text, mask = torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.bool)
    return denoise(model, make_sampler(scheduler), noise, text, mask, None, None, **kwargs)


def test_strength_point_08_of_50_steps_starts_at_t799():
    s = make_sampler(cosine_scheduler())
    s.set_timesteps(50)
    assert start_index(50, 0.8) == 10
    assert int(s.timesteps[start_index(50, 0.8)]) == 799
    seen: list[int] = []

    def model(x, t, e, m):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    x0 = torch.zeros(1, 4, 2, 4, 4)
    unguided_denoise(model, cosine_scheduler(), torch.randn_like(x0), num_steps=50, init=x0, strength=0.8)
    assert seen[0] == 799 and len(seen) == 40


def test_denoise_with_an_oracle_recovers_the_sample():
    """A model that returns the true noise of x_t w.r.t. a known x0 must lead DPM-Solver++ back to x0."""
    sched = cosine_scheduler()
    x0 = torch.rand(2, 3, 2, 4, 4) * 1.6 - 0.8
    ac = sched.alphas_cumprod

    def oracle(x, t, e, m):
        a = ac[t.long()].view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1, 1)) / (1 - a).sqrt()

    out = denoise(
        oracle,
        make_sampler(sched),
        seeded_noise(x0.shape[1:], [0, 1]),
        torch.zeros(2, 3, 2),
        torch.ones(2, 3, dtype=torch.bool),
        torch.zeros(1, 3, 2),
        torch.ones(1, 3, dtype=torch.bool),
        num_steps=20,
        guidance_scale=5.0,
    )
    # x0 in [-0.8, 0.8]: 2e-3 is the 20-step solver's discretisation error, orders above float32 rounding.
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)


def test_min_snr_weights():
    from show1_lightning.diffusion.objectives import min_snr_weights

    s = cosine_scheduler()
    t = torch.tensor([1, 500, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    w = min_snr_weights(s, t, 5.0)
    # Weights of order 1 from the same float32 formula: assert_close's float32 defaults (rtol 1.3e-6) hold.
    torch.testing.assert_close(w, snr.clamp(max=5.0) / snr)
    assert w[0] < 1 and w[2] == pytest.approx(1.0)
    wv = min_snr_weights(cosine_scheduler("v_prediction"), t, 5.0)
    torch.testing.assert_close(wv, snr.clamp(max=5.0) / (snr + 1))


def test_min_snr_weights_with_truncated_snr_floor():
    from show1_lightning.diffusion.objectives import min_snr_weights

    s = cosine_scheduler("v_prediction")
    t = torch.tensor([1, 300, 700, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    w = min_snr_weights(s, t, 5.0, floor=1.0)
    # x0 weight max(min(SNR, 5), 1): in v terms the noisy end keeps ~plain v-loss weight, the clean end is capped
    torch.testing.assert_close(w, snr.clamp(1.0, 5.0) / (snr + 1))
    assert w[3] == pytest.approx(1.0, abs=1e-3) and w[3] > 100 * min_snr_weights(s, t, 5.0)[3]
    torch.testing.assert_close(w[:2], min_snr_weights(s, t, 5.0)[:2])
    with pytest.raises(ValueError, match="snr_floor"):
        min_snr_weights(s, t, 5.0, floor=6.0)


def test_truncated_sampling_stops_at_last_timestep_and_returns_the_clean_estimate():
    """A model trained on t >= 600 is only called there; the result is its x0 estimate at the last step."""
    seen: list[int] = []
    x0 = torch.full((1, 3, 2, 4, 4), 0.3)

    def model(x, t, e, m):  # sample prediction: always the same clean estimate
        seen.append(int(t[0]))
        return x0.expand_as(x)

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    out = unguided_denoise(model, sched, torch.randn_like(x0), num_steps=5, last_timestep=600)
    assert seen == [999, 899, 800, 700, 600]
    torch.testing.assert_close(out, x0)
    with pytest.raises(ValueError, match="last_timestep"):
        unguided_denoise(model, sched, x0, num_steps=5, last_timestep=1000)


def test_schedule_shift_divides_every_snr_and_the_sampler_follows():
    from show1_lightning.diffusion.objectives import shift_noise_schedule

    s = cosine_scheduler()
    assert shift_noise_schedule(s, 1.0) is s
    shifted = shift_noise_schedule(s, 2.0)
    t = torch.arange(7, 990, 7)  # float32 alpha_bar resolves the SNR of the first and last steps too coarsely
    snr = lambda a: a[t].double() / (1 - a[t].double())  # noqa: E731
    torch.testing.assert_close(snr(shifted.alphas_cumprod) * 4, snr(s.alphas_cumprod), rtol=1e-4, atol=0)
    assert shifted.config.beta_schedule == s.config.beta_schedule  # the rest of the config is kept
    sampler = make_sampler(shifted)
    torch.testing.assert_close(sampler.alphas_cumprod, shifted.alphas_cumprod)
    with pytest.raises(ValueError, match="noise_schedule_shift"):
        shift_noise_schedule(s, 0.0)
