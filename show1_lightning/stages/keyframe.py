"""Stage 1: keyframes. Plain text-to-video in pixel space (paper: 8 frames at 64x40)."""

from __future__ import annotations

from typing import Any

import torch

from show1_lightning.diffusion.module import DiffusionStage


class KeyframeStage(DiffusionStage):
    """Text -> low-resolution keyframes. The training target is the clip itself; no extra conditioning.

    Args:
        num_frames, height, width: the sample size (paper: 8 frames, 40 x 64).
        **kwargs: the shared diffusion settings (see ``DiffusionStage``).
    """

    def __init__(self, num_frames: int = 8, height: int = 40, width: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_frames, self.height, self.width = num_frames, height, width

    takes_upstream = False

    def sample_shape(self) -> tuple[int, int, int, int]:
        return (self.sample_channels, self.num_frames, self.height, self.width)

    def _run(self, upstream: torch.Tensor | None, prompts: list[str], seeds: list[int], **kwargs: Any) -> torch.Tensor:
        return self.generate(prompts, seeds, **kwargs)
