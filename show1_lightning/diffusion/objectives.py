"""Training objective: timestep sampling, noising and the regression target (epsilon, v or the sample x0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def timestep_range(t_min: int, t_max: int | None, num_train_timesteps: int) -> tuple[int, int]:
    """The closed range of training timesteps, ``t_max`` None meaning the last one; the one check of it (stage
    constructors and the start-up config check both call this)."""
    t_max = num_train_timesteps - 1 if t_max is None else int(t_max)
    if not 0 <= int(t_min) <= t_max < num_train_timesteps:
        raise ValueError(
            f"training timestep range [{t_min}, {t_max}] must lie in [0, {num_train_timesteps - 1}] "
            "(need 0 <= t_min <= t_max < num_train_timesteps)"
        )
    return int(t_min), t_max


def shift_noise_schedule(scheduler: DDPMScheduler, shift: float) -> DDPMScheduler:
    """``scheduler`` with the signal-to-noise ratio of every timestep divided by ``shift ** 2`` (the same scheduler
    when ``shift`` is 1), as a DDPM scheduler with explicit ``trained_betas`` (so samplers made ``from_config``
    follow it).

    The schedule shift of simple diffusion (Hoogeboom et al., 2023) and SD3: the more pixels (and frames) show the
    same content, the more noise it takes to hide it, so a schedule made for one image size leaves too few steps
    where the sample is still undecided and only the condition can decide it.
    """
    if not shift > 0:
        raise ValueError(f"stage.noise_schedule_shift must be > 0, got {shift}")
    if shift == 1:
        return scheduler
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar) / float(shift) ** 2
    shifted = snr / (1 + snr)
    previous = torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    betas = (1 - shifted / previous).clamp(max=0.9999)
    return DDPMScheduler.from_config(scheduler.config, trained_betas=betas.tolist())


def log_snr_time_table(scheduler: DDPMScheduler) -> torch.Tensor:
    """For every integer timestep, the time value a UNet sees when it is told the noise level instead of the step:
    the log-SNR mapped linearly onto the same range, ``(T - 1) * (lambda(0) - lambda(t)) / (lambda(0) - lambda(T - 1))``.

    Why: under the cosine schedule the last few dozen steps cover most of the log-SNR range (t = 950 -> 999: log-SNR
    -5 -> -20), while their sinusoidal step embeddings barely differ, so the UNet cannot tell "the frames still show
    the shape" from "pure noise" and learns neither the conditional mean nor the prompt's layout at the noisy end
    (EDM and VDM condition on the noise level for the same reason). Same endpoints as the steps: 0 and T - 1.
    """
    alpha_bar = scheduler.alphas_cumprod.double().clamp(1e-20, 1 - 1e-20)
    lam = torch.log(alpha_bar / (1 - alpha_bar))
    n = len(alpha_bar)
    return ((n - 1) * (lam[0] - lam) / (lam[0] - lam[-1])).float()


def sample_timesteps(
    batch_size: int,
    t_min: int,
    t_max: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform integer timesteps in the closed range [t_min, t_max].

    The latent "expert" stage trains on t in [0, 900] only; the other stages on [0, T-1].
    """
    if not 0 <= t_min <= t_max:
        raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
    t = torch.randint(t_min, t_max + 1, (batch_size,), generator=generator, device="cpu")
    return t.to(device)


def check_frame_correlation(rho: float) -> None:
    """Refuse a frame noise correlation outside [0, 1) (1 would give every frame the same noise)."""
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"frame noise correlation must be in [0, 1), got {rho}")


def correlate_frames(noise: torch.Tensor, shared: torch.Tensor, rho: float) -> torch.Tensor:
    """``sqrt(rho) * shared + sqrt(1 - rho) * noise``: video noise whose frames share a fraction ``rho`` of their variance.

    ``noise`` is ``... x T x H x W`` with independent frames, ``shared`` the same with ``T = 1`` (broadcast over the
    frames); the result is still unit-variance Gaussian per pixel, with correlation ``rho`` between any two frames
    (the "mixed noise" prior of PYoCo, Ge et al. 2023, for video diffusion). 0 returns ``noise`` unchanged.
    """
    check_frame_correlation(rho)
    if rho == 0.0:
        return noise
    return rho**0.5 * shared + (1.0 - rho) ** 0.5 * noise


def training_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target of the configured prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":  # x0 itself (diffusers' "sample"): suits near-deterministic refinement targets
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")


def split_learned_variance(model_output: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` output channels.

    UNets with learned variance (DeepFloyd IF, Show-1 base/sr1) predict 2x channels: the mean
    part first, the variance interpolation second. Sampling with a fixed-variance scheduler and the
    simple MSE loss use only the first half.
    """
    if model_output.shape[1] == channels:
        return model_output
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels]
    raise ValueError(
        f"UNet returned {model_output.shape[1]} channels; expected {channels} or {2 * channels} (learned variance)"
    )


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, floor: float | None = None
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per sample, for the scheduler's prediction type.

    In x0 terms the weight is ``min(SNR, gamma)``; with ``floor`` it is ``clamp(SNR, floor, gamma)``, the
    truncated-SNR floor of Salimans & Ho (2022) (``floor=1``: ``max(SNR, 1)`` at the noisy end), which keeps
    the high-noise steps, where a sample's layout and colours are decided from the text, from being
    weighted down to nothing. Converted to the prediction's loss: epsilon ``w / SNR``, v ``w / (SNR + 1)``,
    sample ``w``.
    """
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {gamma}")
    if floor is not None and not 0 < floor <= gamma:
        raise ValueError(f"snr_floor must be in (0, snr_gamma={gamma}], got {floor}")
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = ac / (1 - ac)
    clipped = snr.clamp(min=floor, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if scheduler.config.prediction_type == "sample":
        return clipped
    return clipped / snr


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in float32 whatever the autocast dtype; optionally weighted per sample."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (per_sample * weights.to(per_sample.device)).mean()


def frame_difference_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`diffusion_loss` of the frame-to-frame differences of ``B x C x T x H x W`` prediction and target.

    An error that is the same in every frame (the background, the shape's colour) cancels in the differences; what
    remains is where the frames change: the motion. Added to the plain loss it gives motion errors a weight of their
    own, where the plain per-pixel loss lets a video's appearance outweigh its motion (VideoJAM, Chefer et al. 2025,
    makes the same observation and adds a motion target).
    """
    if prediction.ndim != 5 or prediction.shape[2] < 2:
        raise ValueError(f"frame differences need B x C x T x H x W with T >= 2, got {tuple(prediction.shape)}")
    return diffusion_loss(prediction.diff(dim=2), target.diff(dim=2), weights)
