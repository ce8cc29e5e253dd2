"""Stage 1: keyframes. Plain text-to-video in pixel space (paper: 8 frames at 64x40)."""

from __future__ import annotations

from typing import Any

import torch

from show1_lightning.diffusion.module import DiffusionStage, StageCondition


class KeyframeStage(DiffusionStage):
    """Text -> low-resolution keyframes. The training target is the clip itself; no extra conditioning as
    released.

    Args:
        num_frames, height, width: the sample size (paper: 8 frames, 40 x 64).
        layout: None (as released), or ``{text_dim, sigma, hidden}``: LVD-style layout grounding (ours, for the
            toy world; ``show1_lightning.models.layout_planner``). A learned planner maps the caption to the
            object's centre per frame and the UNet gets that layout as one more input channel (``model.in_channels``
            = 4): in training the centres measured in the clip (the toy world's saturated-pixel rule,
            ``toy_data.frame_centroids``), in sampling the planner's. The planner trains beside the UNet on the
            same clips (its loss added to the diffusion loss).
        **kwargs: the shared diffusion settings (see ``DiffusionStage``).
    """

    def __init__(
        self, num_frames: int = 8, height: int = 40, width: int = 64, layout: dict | None = None, **kwargs
    ) -> None:
        layout = dict(layout or {})
        if layout:
            unknown = set(layout) - {"text_dim", "sigma", "hidden"}
            if unknown or "text_dim" not in layout:
                raise ValueError(f"stage.layout takes text_dim (required), sigma and hidden; got {sorted(layout)}")
            if (kwargs.get("lora") or {}).get("rank"):
                raise ValueError(
                    "stage.lora with stage.layout: LoRA adapts and exports the UNet only, the layout planner's "
                    "weights would not be loaded from lora.init_from (set stage.layout=null model.in_channels=3)"
                )
            self.condition_channels = 1  # before the base class checks model.in_channels
        super().__init__(**kwargs)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.layout_sigma = float(layout.get("sigma", 0.15))
        self.planner = None
        if layout:
            from show1_lightning.models.layout_planner import LayoutPlanner

            self.planner = LayoutPlanner(int(layout["text_dim"]), num_frames, hidden=int(layout.get("hidden", 128)))

    takes_upstream = False

    def sample_shape(self) -> tuple[int, int, int, int]:
        return (self.sample_channels, self.num_frames, self.height, self.width)

    def _layout(self, centres: torch.Tensor, valid: torch.Tensor, height: int, width: int) -> StageCondition:
        from show1_lightning.models.layout_planner import render_layout

        return StageCondition(concat=render_layout(centres, valid, height, width, self.layout_sigma))

    def training_inputs(self, batch: dict) -> tuple[torch.Tensor, StageCondition]:
        video = batch["video"]
        if self.planner is None:
            return video, StageCondition()
        from show1_lightning.data.toy_data import frame_centroids

        centres, valid = frame_centroids(video)
        return video, self._layout(centres, valid, *video.shape[-2:])

    def auxiliary_loss(self, x0: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The layout planner's loss on the clips' measured centres (None without a planner)."""
        if self.planner is None:
            return None
        from show1_lightning.data.toy_data import frame_centroids

        centres, valid = frame_centroids(x0)
        return self.planner.loss(emb, mask, centres, valid)

    def _run(self, upstream: torch.Tensor | None, prompts: list[str], seeds: list[int], **kwargs: Any) -> torch.Tensor:
        return self.generate(prompts, seeds, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompts: Any,
        seeds: Any,
        cond: StageCondition | None = None,
        shape: Any = None,
        text: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``DiffusionStage.generate``; with a layout planner and no ``cond`` given, the planner's layout for
        these captions and seeds is the condition (every caller of ``generate`` gets the grounded stage)."""
        if self.planner is not None and cond is None:
            text = text if text is not None else self.encode_text(prompts)
            shape = tuple(shape or self.sample_shape())
            planned = self.planner.sample(*text, seeds)
            if planned.shape[1] != shape[1]:
                raise ValueError(f"the layout planner plans {planned.shape[1]} frames, asked for {shape[1]}")
            ones = torch.ones(planned.shape[:2], dtype=torch.bool, device=planned.device)
            cond = self._layout(planned, ones, *shape[-2:])
        return super().generate(prompts, seeds, cond=cond, shape=shape, text=text, **kwargs)
