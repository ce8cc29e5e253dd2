"""A text-to-layout planner and the layout channel it feeds the keyframe UNet (LVD-style grounding).

Show-1's keyframe UNet hears the caption only through per-frame cross-attention and a pooled embedding; on the
toy world it learns colour and shape from it but not the direction of the motion (docs/toy_loop.md). LVD (Lian
et al., "LLM-grounded Video Diffusion Models", ICLR 2024) reports the same failure for this model family at scale
and plans the layout separately: text -> per-frame boxes, then the video is generated to follow them. Here the
planner is learned: a small MLP maps the pooled caption embedding to the object's per-frame centre (a mean
trajectory plus the spread of where it starts), trained on the centres measured in the training clips; the UNet
gets the layout as one extra input channel (a Gaussian blob per frame at that centre), in training from the clip
itself, in sampling from the planner.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def render_layout(centres: torch.Tensor, valid: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """The layout channel: ``B x 1 x T x H x W`` in [-1, 1], per frame a Gaussian blob (1 at its peak, -1 far
    away) at ``centres`` (``B x T x 2``, (x, y) as fractions of ``(W - 1, H - 1)``); frames where ``valid``
    (``B x T``) is False are all -1 (no object). ``sigma`` is the blob's standard deviation as a fraction of
    the frame's height."""
    if centres.ndim != 3 or centres.shape[-1] != 2:
        raise ValueError(f"centres must be B x T x 2, got shape {tuple(centres.shape)}")
    dev, dtype = centres.device, centres.dtype
    ys = torch.arange(height, device=dev, dtype=dtype)[:, None]
    xs = torch.arange(width, device=dev, dtype=dtype)[None, :]
    cx = centres[..., 0, None, None] * (width - 1)
    cy = centres[..., 1, None, None] * (height - 1)
    s = sigma * height
    blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * s * s))  # B x T x H x W
    blob = blob * valid[..., None, None].to(dtype)
    return (2 * blob - 1).unsqueeze(1)


def pooled_text(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the caption's token states: ``B x L x D`` and ``B x L`` -> ``B x D``."""
    m = mask.to(emb.dtype)[..., None]
    return (emb * m).sum(1) / m.sum(1).clamp_min(1.0)


class LayoutPlanner(ModelMixin, ConfigMixin):
    """Caption -> the object's centre in each of ``num_frames`` frames.

    Predicts a mean trajectory (``T x 2``, fractions of the frame) and the standard deviation of a whole-clip
    offset (where along its path the object starts varies from clip to clip); :meth:`sample` adds one such
    offset per seed, so different seeds start the object in different places and every one moves the
    caption's way. A diffusers model (``save_pretrained`` / ``from_pretrained``): the Show-1 pipeline keeps it as
    its ``keyframe_layout_planner`` component.
    """

    @register_to_config
    def __init__(self, text_dim: int, num_frames: int, hidden: int = 128, margin: float = 0.1) -> None:
        super().__init__()
        self.num_frames, self.margin = num_frames, float(margin)
        self.net = nn.Sequential(
            nn.Linear(text_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2 * num_frames + 2),
        )

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean B x T x 2, log_std B x 2)`` for the captions' token states and masks."""
        out = self.net(pooled_text(emb, mask).float())
        mean = torch.sigmoid(out[:, : 2 * self.num_frames]).reshape(-1, self.num_frames, 2)
        return mean, out[:, 2 * self.num_frames :].clamp(-6.0, 2.0)

    def loss(self, emb: torch.Tensor, mask: torch.Tensor, centres: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Squared error of the mean trajectory plus that of the predicted variance of each clip's mean offset
        from it (against the offset squared), over the frames that have an object (``centres``, ``valid`` from
        the clips). Both terms are squared errors, so the loss stays >= 0 beside the diffusion loss (a Gaussian
        log-likelihood would turn it negative)."""
        mean, log_std = self(emb, mask)
        w = valid.to(mean.dtype)[..., None]  # B x T x 1
        n = w.sum(1).clamp_min(1.0)  # B x 1
        err = (centres.float() - mean) * w
        mse = (err**2).sum() / (2 * n.sum()).clamp_min(1.0)
        offset = err.detach().sum(1) / n  # B x 2: the clip's whole-trajectory shift from the mean
        has = (valid.sum(1) > 0).to(mean.dtype)[:, None]
        var_err = (torch.exp(2 * log_std) - offset**2) ** 2 * has
        return mse + var_err.sum() / (2 * has.sum()).clamp_min(1.0)

    @torch.no_grad()
    def sample(self, emb: torch.Tensor, mask: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """One planned trajectory per caption (``B x T x 2``), its start offset drawn from ``seeds[i]``."""
        mean, log_std = self(emb, mask)
        z = torch.stack([torch.randn(2, generator=torch.Generator("cpu").manual_seed(int(s) + 7919)) for s in seeds])
        offset = z.to(mean.device) * log_std.exp()
        # Shift the whole trajectory, but not past the margins (clamping frames would flatten the motion).
        lo, hi = self.margin - mean.amin(1), (1.0 - self.margin) - mean.amax(1)
        offset = torch.maximum(torch.minimum(offset, hi), lo)
        return (mean + offset[:, None, :]).clamp(self.margin, 1.0 - self.margin)
