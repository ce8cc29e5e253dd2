"""Classifier-free guidance: caption dropout in training, guided prediction at sampling."""

from __future__ import annotations

import torch


def drop_captions(
    emb: torch.Tensor,
    mask: torch.Tensor,
    null_emb: torch.Tensor,
    null_mask: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each sample's text embedding by the empty-caption embedding with probability ``p``.

    Args:
        emb, mask: B x L x D text embeddings and their B x L attention mask.
        null_emb, null_mask: the empty caption's 1 x L x D embedding and 1 x L mask.
    Returns:
        (emb, mask, dropped) where ``dropped`` is the B-element boolean vector of replaced samples.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {p}")
    b = emb.shape[0]
    dropped = torch.rand(b, generator=generator, device="cpu") < p
    if not dropped.any():
        return emb, mask, dropped
    d = dropped.to(emb.device)
    emb = torch.where(d[:, None, None], null_emb.to(emb.dtype).expand_as(emb), emb)
    mask = torch.where(d[:, None], null_mask.to(mask.dtype).expand_as(mask), mask)
    return emb, mask, dropped


def guided_prediction(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond); scale 1 gives the conditional prediction."""
    return uncond + scale * (cond - uncond)
