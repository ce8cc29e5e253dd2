"""Sampling: seeded initial noise, the guided denoising loop over a diffusers scheduler, strength."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from show1_lightning.diffusion.guidance import guided_prediction
from show1_lightning.diffusion.objectives import correlate_frames

# model_fn(x_t, t, text_emb, text_mask) -> prediction with the sample's channel count.
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_sampler(noise_scheduler: DDPMScheduler, **overrides) -> SchedulerMixin:
    """A DPM-Solver++ sampler sharing the training schedule's betas and prediction type.

    ``overrides`` are DPMSolverMultistepScheduler arguments (solver_order, thresholding,
    dynamic_thresholding_ratio, sample_max_value, algorithm_type, ...).
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, **overrides)


def seeded_noise(
    shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu", frame_correlation: float = 0.0
) -> torch.Tensor:
    """Gaussian noise of shape (len(seeds), *shape), sample i drawn from its own seed.

    A sample's noise depends only on its seed, not on the batch it is generated in, so results do
    not change with batch size or the number of processes. ``frame_correlation`` (rho, for ``C x T x H x W``
    samples) mixes every frame's noise with one noise image drawn next from the same seed and shared by all
    frames (:func:`~show1_lightning.diffusion.objectives.correlate_frames`); 0 gives exactly the plain draw.
    """
    out = []
    for s in seeds:
        g = torch.Generator("cpu").manual_seed(int(s))
        noise = torch.randn(tuple(shape), generator=g)
        if frame_correlation:
            shared = torch.randn((*shape[:-3], 1, *shape[-2:]), generator=g)
            noise = correlate_frames(noise, shared, frame_correlation)
        out.append(noise)
    return torch.stack(out).to(device)


def window_seeds(seed: int, n: int) -> list[int]:
    """``n`` deterministic, distinct-per-window seeds derived from one sample seed.

    A window's noise then depends only on (sample seed, window index), not on the batch it is generated in.
    """
    g = torch.Generator("cpu").manual_seed(int(seed))
    return [int(s) for s in torch.randint(0, 2**62, (n,), generator=g)]


def check_sampling_args(
    num_steps: int, guidance_scale: float = 1.0, strength: float = 1.0, with_init: bool = False, where: str = ""
) -> None:
    """Refuse sampling settings that cannot work or would silently do something else.

    ``num_steps`` must be a positive integer (0 is not "the default"), ``guidance_scale`` > 0 (1: no guidance;
    0 or less would sample the unconditional model or push away from the prompt), ``strength`` in (0, 1], and
    with an ``init`` at least one denoising step must remain (``int(num_steps * strength) >= 1``).
    ``where`` prefixes the message (e.g. the config key).
    """
    pre = f"{where}: " if where else ""
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, numbers.Real)
        or not num_steps >= 1
        or num_steps == float("inf")
        or num_steps != int(num_steps)
    ):
        raise ValueError(f"{pre}num_steps must be a positive integer, got {num_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not guidance_scale > 0:
        raise ValueError(f"{pre}guidance_scale must be > 0 (1 = no guidance), got {guidance_scale!r}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 < strength <= 1.0:
        raise ValueError(f"{pre}strength must be in (0, 1], got {strength!r}")
    if with_init and int(num_steps * strength) < 1:
        raise ValueError(
            f"{pre}strength {strength} x num_steps {num_steps} leaves no denoising step "
            f"(int(num_steps * strength) = 0); raise num_steps or strength"
        )


def start_index(num_steps: int, strength: float) -> int:
    """Index of the first denoising step for ``strength`` in (0, 1] (diffusers img2img convention)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return num_steps - min(int(num_steps * strength), num_steps)


@torch.no_grad()
def denoise(
    model_fn: ModelFn,
    sampler: SchedulerMixin,
    noise: torch.Tensor,
    text_emb: torch.Tensor,
    text_mask: torch.Tensor,
    null_emb: torch.Tensor | None,
    null_mask: torch.Tensor | None,
    num_steps: int,
    guidance_scale: float = 1.0,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    progress: bool = False,
    last_timestep: int = 0,
) -> torch.Tensor:
    """Run the reverse process and return the clean sample.

    Args:
        model_fn: the conditioned network, called on a batch of 2B (uncond + cond) when guided.
        sampler: a configured diffusers scheduler (``make_sampler``).
        noise: B x ... starting noise (``seeded_noise``).
        text_emb, text_mask: B x L x D conditioning and its mask.
        null_emb, null_mask: 1 x L x D empty-prompt (or negative-prompt) conditioning for guidance.
        guidance_scale: classifier-free guidance weight; 1 (or no null embedding) disables guidance.
        init, strength: start from ``init`` noised to the ``strength`` point of the schedule
            (SDEdit / img2img); ``strength`` 1 with ``init`` None is pure generation.
        last_timestep: > 0 for a model trained on timesteps >= ``last_timestep`` only (truncated diffusion): the
            ``num_steps`` timesteps are spaced evenly from the top of the schedule down to ``last_timestep``, and
            the sample is the model's clean estimate there, so the model is never called outside its range.
    """
    check_sampling_args(num_steps, guidance_scale, strength, with_init=init is not None)
    device = noise.device
    if last_timestep > 0:
        top = sampler.config.num_train_timesteps - 1
        if not last_timestep <= top:
            raise ValueError(f"last_timestep must be in [0, {top}], got {last_timestep}")
        steps = np.unique(np.linspace(top, last_timestep, num_steps).round().astype(np.int64))[::-1]
        sampler.set_timesteps(timesteps=steps.tolist(), device=device)
    else:
        sampler.set_timesteps(num_steps, device=device)
    timesteps = sampler.timesteps
    if init is not None:
        begin = start_index(num_steps, strength) * sampler.order
        timesteps = timesteps[begin:]
        if hasattr(sampler, "set_begin_index"):
            sampler.set_begin_index(begin)
        x = sampler.add_noise(init.to(device), noise, timesteps[:1].repeat(noise.shape[0]))
    else:
        x = noise * sampler.init_noise_sigma
    guided = guidance_scale != 1.0 and null_emb is not None
    if guided:
        b = noise.shape[0]
        emb = torch.cat([null_emb.expand(b, -1, -1).to(text_emb.dtype), text_emb])
        mask = torch.cat([null_mask.expand(b, -1).to(text_mask.dtype), text_mask])
    else:
        emb, mask = text_emb, text_mask
    for t in tqdm(timesteps, disable=not progress, desc="sampling", leave=False):
        x_in = sampler.scale_model_input(x, t)
        if guided:
            x_in = torch.cat([x_in, x_in])
        tt = t.expand(x_in.shape[0]).to(device)
        pred = model_fn(x_in, tt, emb, mask).float()
        if guided:
            uncond, cond = pred.chunk(2)
            pred = guided_prediction(uncond, cond, guidance_scale)
        x = sampler.step(pred, t, x).prev_sample
    return x
