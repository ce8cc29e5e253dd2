"""Temporal convolutions (a ``Conv3d`` whose kernel spans frames only, ``k x 1 x 1``) run as 2D convolutions.

Every video UNet here (diffusers' ``TemporalConvLayer`` in the Show-1 and stock 3D blocks) mixes frames with
``Conv3d(kernel=(3, 1, 1), padding=(1, 0, 0))``. On a CPU PyTorch sends such a convolution to its im2col
fallback (``slow_conv3d``) whenever its own heuristic prefers it over oneDNN (one thread, small batch, a 1 x 1
spatial kernel), and that fallback took a fifth of the toy cascade's time. The same sums, seen as a ``Conv2d``
with kernel ``(k, 1)`` over ``(frames, height * width)``, go through oneDNN (or cuDNN) on every device: the
weights, state_dict keys and results (to float rounding) are those of the ``Conv3d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FrameConv3d", "is_frame_conv", "use_frame_convs", "use_plain_convs"]


class FrameConv3d(nn.Conv3d):
    """A ``Conv3d`` with a ``k x 1 x 1`` kernel (zero padding, stride and dilation along frames only), computed
    as a ``Conv2d`` over ``B x C x T x (H * W)``. Built by :func:`use_frame_convs` from an existing ``Conv3d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        b, _, t, h, w = x.shape
        y = F.conv2d(
            x.reshape(b, x.shape[1], t, h * w),
            self.weight.squeeze(-1),
            self.bias,
            stride=(self.stride[0], 1),
            padding=(self.padding[0], 0),
            dilation=(self.dilation[0], 1),
            groups=self.groups,
        )
        return y.reshape(b, y.shape[1], y.shape[2], h, w)


def is_frame_conv(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain ``Conv3d`` that mixes frames only (what :class:`FrameConv3d` computes)."""
    return (
        type(conv) is nn.Conv3d
        and conv.kernel_size[1:] == (1, 1)
        and conv.stride[1:] == (1, 1)
        and conv.dilation[1:] == (1, 1)
        and not isinstance(conv.padding, str)
        and tuple(conv.padding[1:]) == (0, 0)
        and conv.padding_mode == "zeros"
    )


def use_frame_convs(module: nn.Module) -> int:
    """Turn every frames-only ``Conv3d`` in ``module`` into a :class:`FrameConv3d`, in place (same parameters,
    hooks and state_dict keys). Returns how many were turned; idempotent."""
    n = 0
    for m in module.modules():
        if is_frame_conv(m):
            m.__class__ = FrameConv3d
            n += 1
    return n


def use_plain_convs(module: nn.Module) -> int:
    """Undo :func:`use_frame_convs` (every :class:`FrameConv3d` back to ``Conv3d``), e.g. for a before/after
    benchmark. Returns how many were turned back."""
    n = 0
    for m in module.modules():
        if type(m) is FrameConv3d:
            m.__class__ = nn.Conv3d
            n += 1
    return n
