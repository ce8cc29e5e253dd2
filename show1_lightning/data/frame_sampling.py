"""fps-aware frame sampling: which frame indices of a source clip make a training clip.

The stride between sampled frames follows the source frame rate so that every training clip covers
the same stretch of time whatever the source fps: ``stride = max(1, round(source_fps / target_fps))``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


class ClipTooShortError(ValueError):
    """The source clip has fewer frames than ``num_frames`` sampled at the required stride need."""


@dataclass(frozen=True)
class FrameSelection:
    """Indices of the frames to keep (ascending, evenly spaced by ``stride``)."""

    indices: list[int]
    stride: int

    @property
    def last_index(self) -> int:
        return self.indices[-1]


def compute_stride(source_fps: float, target_fps: float | None, fixed_stride: int = 1) -> int:
    """Frame stride that turns ``source_fps`` into (about) ``target_fps``.

    Args:
        source_fps: frame rate of the source video (> 0).
        target_fps: wanted frame rate of the sampled clip; None: use ``fixed_stride``.
        fixed_stride: the stride used when ``target_fps`` is None.
    """
    if target_fps is None:
        if fixed_stride < 1:
            raise ValueError(f"fixed_stride must be >= 1, got {fixed_stride}")
        return int(fixed_stride)
    if target_fps <= 0:
        raise ValueError(f"target_fps must be > 0 or None, got {target_fps}")
    if source_fps <= 0:
        raise ValueError(f"source_fps must be > 0, got {source_fps}")
    return max(1, int(round(source_fps / target_fps)))


def sample_frame_indices(
    total_frames: int,
    num_frames: int,
    source_fps: float,
    target_fps: float | None,
    rng: random.Random | None = None,
    start: int | None = None,
    fixed_stride: int = 1,
) -> FrameSelection:
    """Pick ``num_frames`` evenly strided frame indices from a clip of ``total_frames`` frames.

    The start is drawn uniformly from all starts that fit (``rng``), or given (``start``, e.g. 0 for
    validation), or 0 when neither is given.

    Raises:
        ClipTooShortError: when ``(num_frames - 1) * stride + 1 > total_frames`` (or the given start
            leaves too few frames).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    stride = compute_stride(source_fps, target_fps, fixed_stride)
    span = (num_frames - 1) * stride + 1  # frames covered from the first to the last sampled one
    if total_frames < span:
        raise ClipTooShortError(
            f"clip has {total_frames} frames, need {span} ({num_frames} frames at stride {stride}, "
            f"source {source_fps:.3g} fps -> target {target_fps} fps)"
        )
    max_start = total_frames - span
    if start is None:
        start = rng.randint(0, max_start) if rng is not None else 0
    elif not 0 <= start <= max_start:
        raise ClipTooShortError(
            f"start {start} leaves too few frames (max start {max_start} for {total_frames} frames)"
        )
    return FrameSelection(indices=[start + i * stride for i in range(num_frames)], stride=stride)
