"""Frame resizing for video metrics, including TF1's legacy ``resize_bilinear`` used by the original FVD.

TF1 ``tf.image.resize_bilinear(align_corners=False)`` (``half_pixel_centers=False``, the default then)
maps output pixel ``d`` to source coordinate ``s = d * in / out`` (no half-pixel shift, no antialias):
the top/left edge is sampled exactly and the image is shifted by up to one source pixel relative to
torch's half-pixel ``bilinear``. On a 128 -> 224 resize that moves I3D logits by about 10 percent,
so FVD numbers are only comparable with the legacy mapping (see ``docs/fvd.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RESIZE_METHODS = ("tf1_bilinear", "bilinear", "antialias")


def _tf1_source_index(in_size: int, out_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Lower/upper source indices and lerp weights of TF1's legacy mapping, computed in float32 as TF does."""
    scale = np.float32(in_size) / np.float32(out_size)  # TF: in / (float) out, float32
    src = torch.arange(out_size, dtype=torch.float32, device=device) * torch.tensor(scale, device=device)
    floor = torch.floor(src)
    lower = floor.long().clamp(0, in_size - 1)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    return lower, upper, src - floor


def tf1_resize_bilinear(frames: Tensor, size: Sequence[int]) -> Tensor:
    """TF1 legacy ``resize_bilinear`` over the last two dims of a float tensor of any rank >= 2."""
    out_h, out_w = int(size[0]), int(size[1])
    in_h, in_w = frames.shape[-2:]
    x = frames if frames.dtype in (torch.float32, torch.float64) else frames.float()
    y0, y1, ly = _tf1_source_index(in_h, out_h, x.device)
    x0, x1, lx = _tf1_source_index(in_w, out_w, x.device)
    ly, lx = ly.to(x.dtype).unsqueeze(-1), lx.to(x.dtype)
    top, bottom = x.index_select(-2, y0), x.index_select(-2, y1)
    # Same evaluation order as TF's kernel: lerp along x on both rows, then along y.
    tl, tr = top.index_select(-1, x0), top.index_select(-1, x1)
    bl, br = bottom.index_select(-1, x0), bottom.index_select(-1, x1)
    top = tl + (tr - tl) * lx
    bottom = bl + (br - bl) * lx
    return top + (bottom - top) * ly


def resize_video(video: Tensor, size: Sequence[int] = (224, 224), method: str = "tf1_bilinear") -> Tensor:
    """Resize every frame of a float ``(B, C, T, H, W)`` video to ``size = (height, width)``.

    Methods: ``"tf1_bilinear"`` (TF1 legacy mapping ``src = dst * in / out``, the original FVD's),
    ``"bilinear"`` (torch, half-pixel centres, no antialias) and ``"antialias"`` (torch bilinear with
    antialiasing when shrinking). Values are not clamped or quantised.
    """
    if method not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; choose one of {RESIZE_METHODS}")
    if not isinstance(video, Tensor) or video.ndim != 5:
        raise ValueError(f"expected a (B, C, T, H, W) tensor, got {getattr(video, 'shape', type(video))}")
    if not video.is_floating_point():
        raise ValueError(f"expected a float video, got dtype {video.dtype}")
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {size}")
    size = (int(size[0]), int(size[1]))
    if tuple(video.shape[-2:]) == size:
        return video
    if method == "tf1_bilinear":
        return tf1_resize_bilinear(video, size)
    b, c, t, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if frames.dtype not in (torch.float32, torch.float64):
        frames = frames.float()  # interpolate on half precision is not supported on every device
    out = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=method == "antialias")
    return out.reshape(b, t, c, *size).permute(0, 2, 1, 3, 4).to(video.dtype)
