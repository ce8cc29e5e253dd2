"""A stage against its non-learned baseline on ground-truth clips: the PSNR check every stage must pass.

The clip is turned into the input the stage gets in the cascade (``stage.make_upstream``: the keyframes of a
window, the low-res copy), the stage runs on it, and its output, the baseline's (linear blend, bicubic) and any
reference outputs (``stage.reference_outputs``) are scored against the clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from show1_lightning.diffusion.module import DiffusionStage
from show1_lightning.video_ops import resize_frames


def video_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over videos of the per-video PSNR (dB) of B x C x T x H x W videos in [-1, 1]."""
    if pred.shape != target.shape:
        raise ValueError(f"PSNR of videos of different shapes: {tuple(pred.shape)} vs {tuple(target.shape)}")
    per_video = peak_signal_noise_ratio(
        pred.float().clamp(-1, 1), target.float(), data_range=(-1.0, 1.0), dim=(1, 2, 3, 4), reduction="none"
    )
    return float(per_video.mean())


@dataclass
class StageComparison:
    """Videos (name -> B x 3 x T x H x W in [-1, 1]: input, output, baseline, references, ground_truth) and
    their PSNR against the ground truth (``output``, ``baseline``, one per reference)."""

    videos: dict[str, torch.Tensor] = field(default_factory=dict)
    psnr: dict[str, float] = field(default_factory=dict)

    def side_by_side(self) -> torch.Tensor:
        """input (nearest-resized to the output size) | output | ground truth, along the width."""
        out = self.videos["output"]
        t, size = out.shape[2], tuple(out.shape[-2:])
        inp = self.videos["input"]
        if inp.shape[2] != t:  # keyframes: each shown until the next one
            idx = torch.linspace(0, inp.shape[2] - 1, t).floor().long()
            inp = inp[:, :, idx]
        inp = resize_frames(inp, size, mode="nearest")
        return torch.cat([inp.to(out), out, self.videos["ground_truth"].to(out)], dim=-1)


@torch.no_grad()
def run_in_calls(
    stage: DiffusionStage,
    upstream: torch.Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int | None = None,
    **sampling: Any,
) -> torch.Tensor:
    """``stage.run`` on every clip of ``upstream``, at most ``batch_size`` clips per call (None: all at once)."""
    step = batch_size or upstream.shape[0]
    return torch.cat(
        [
            stage.run(upstream[i : i + step], list(prompts[i : i + step]), list(seeds[i : i + step]), **sampling)
            for i in range(0, upstream.shape[0], step)
        ]
    )


@torch.no_grad()
def compare_to_baseline(
    stage: DiffusionStage,
    target: torch.Tensor,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int | None = None,
    **sampling: Any,
) -> StageComparison:
    """Run ``stage`` on the input made from ``target`` (B x 3 x T x H x W in [-1, 1]) and score it, its baseline and
    its reference outputs against ``target`` (PSNR, dB).

    ``batch_size``: clips per stage call (None: all at once). Each clip's noise comes from its own seed, so the output
    does not depend on it; on a CPU small calls are faster (bench/bench_stage_batch.py: the toy SR stages 1.15-1.55x at 2
    clips a call against 8).
    """
    if not stage.takes_upstream:
        raise ValueError(f"{type(stage).__name__} takes no upstream video: it has no baseline to compare with")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None: all clips at once), got {batch_size}")
    target = target.float().to(stage.device)
    upstream = stage.make_upstream(target)
    output = run_in_calls(stage, upstream, prompts, seeds, batch_size, **sampling).float()
    videos = {"input": upstream, "output": output, "baseline": stage.baseline(upstream).float()}
    videos.update({k: v.float() for k, v in stage.reference_outputs(upstream, target).items()})
    videos["ground_truth"] = target
    result = StageComparison(videos={k: v.cpu() for k, v in videos.items()})
    for name, video in result.videos.items():
        if name not in ("input", "ground_truth"):
            result.psnr[name] = video_psnr(video, result.videos["ground_truth"])
    return result
