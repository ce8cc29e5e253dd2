"""Video tensor helpers shared by the stages, the data pipeline and the toy loop.

Videos are ``B x C x T x H x W`` tensors. Frame-wise 2D operations fold the frames into the batch axis
(``fold_frames``), apply the operation and unfold again (``unfold_frames``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE_MODES = ("bicubic", "bilinear", "area", "nearest")


def fold_frames(video: torch.Tensor) -> torch.Tensor:
    """B x C x T x H x W -> (B T) x C x H x W (frames of a video consecutive)."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def unfold_frames(frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """(B T) x C x H x W -> B x C x T x H x W (the inverse of :func:`fold_frames`)."""
    return frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)


def resize_frames(
    video: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", align_corners: bool = False
) -> torch.Tensor:
    """Resize every frame of a B x C x T x H x W video to ``size`` (H, W), computed in float32.

    One rule everywhere (training data, stages, evaluation of the toy world): bilinear/bicubic resizing is
    antialiased when it shrinks an axis (a low-pass filter, as PIL does) and plain interpolation when it
    enlarges; ``align_corners`` applies only to enlarging (IF / Show-1 upsample their SR condition with True).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    b, c, t, h, w = video.shape
    if (h, w) == tuple(size):
        return video
    frames = fold_frames(video).float()
    kwargs: dict = {}
    if mode in ("bilinear", "bicubic"):
        shrink = size[0] < h or size[1] < w
        kwargs = {"antialias": True, "align_corners": False} if shrink else {"align_corners": align_corners}
    out = F.interpolate(frames, size=tuple(size), mode=mode, **kwargs)
    return unfold_frames(out, b, t).to(video.dtype)


def resize_cover_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize every frame to cover ``size`` (H, W) at its aspect ratio, then centre-crop to it; clamp to [-1, 1].

    The one preprocessing rule of training clips (:mod:`show1_lightning.data.shards`) and evaluation clips
    (:mod:`evaluation.benchmarks`, ``cover_antialias``): bilinear, antialiased when shrinking, as
    :func:`resize_frames`. ``video``: float ``C x T x H x W`` or ``B x C x T x H x W`` in [-1, 1].
    """
    if video.ndim not in (4, 5):
        raise ValueError(f"expected C x T x H x W or B x C x T x H x W, got {tuple(video.shape)}")
    out_h, out_w = int(size[0]), int(size[1])
    h, w = video.shape[-2:]
    if (h, w) == (out_h, out_w):
        return video
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    x = resize_frames(video if video.ndim == 5 else video[None], (new_h, new_w), mode="bilinear")
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[..., top : top + out_h, left : left + out_w].clamp(-1.0, 1.0).contiguous()
    return x if video.ndim == 5 else x[0]


def random_crops(
    videos: tuple[torch.Tensor, ...] | list[torch.Tensor], size: tuple[int, int], align: int = 1
) -> list[torch.Tensor]:
    """The same random (h, w) crop of every clip in each of ``videos`` (B x C x T x H x W tensors of equal batch and
    frame size), one offset per clip, offsets multiples of ``align`` (an SR stage's scale, so that its low-res
    copy of the crop is a crop of its low-res copy). Drawn from the global RNG (seeded by Lightning's seed_everything)."""
    h, w = size
    full_h, full_w = videos[0].shape[-2:]
    if any(v.shape[0] != videos[0].shape[0] or v.shape[-2:] != (full_h, full_w) for v in videos):
        raise ValueError("random_crops: the videos must share their batch size and frame size")
    if not (0 < h <= full_h and 0 < w <= full_w):
        raise ValueError(f"crop {h}x{w} does not fit in frames of {full_h}x{full_w}")
    ys = torch.randint(0, (full_h - h) // align + 1, (videos[0].shape[0],)).tolist()
    xs = torch.randint(0, (full_w - w) // align + 1, (videos[0].shape[0],)).tolist()
    return [
        torch.stack([c[..., y * align : y * align + h, x * align : x * align + w] for c, y, x in zip(v, ys, xs)])
        for v in videos
    ]
