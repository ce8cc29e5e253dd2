"""Frames-only Conv3d (the UNets' temporal convolutions) run as Conv2d: same results, no CPU conv3d fallback."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet3DConditionModel
from test_compile import tiny_paper_unet
from torch import nn
from torch.profiler import ProfilerActivity, profile

from show1_lightning.models.frame_conv import FrameConv3d, is_frame_conv, use_frame_convs, use_plain_convs
from show1_lightning.stages.keyframe import KeyframeStage


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": (3, 1, 1), "padding": (1, 0, 0)},  # diffusers' TemporalConvLayer
        {"kernel_size": (3, 1, 1), "padding": (2, 0, 0), "dilation": (2, 1, 1), "stride": (2, 1, 1)},
        {"kernel_size": (1, 1, 1), "groups": 2, "bias": False},
    ],
)
def test_frame_conv_equals_conv3d_forward_and_backward(kw: dict) -> None:
    torch.manual_seed(0)
    ref = nn.Conv3d(4, 6, **kw)
    conv = nn.Conv3d(4, 6, **kw)
    conv.load_state_dict(ref.state_dict())
    assert use_frame_convs(conv) == 1 and type(conv) is FrameConv3d and use_frame_convs(conv) == 0
    assert list(conv.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 4, 7, 5, 3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), conv(xb)
    assert ya.shape == yb.shape
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    assert use_plain_convs(conv) == 1 and type(conv) is nn.Conv3d and is_frame_conv(conv)


def test_only_frames_only_convs_are_turned() -> None:
    assert not is_frame_conv(nn.Conv3d(2, 2, 3, padding=1))  # a spatial kernel
    assert not is_frame_conv(nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate"))
    assert not is_frame_conv(nn.Conv3d(2, 2, (3, 1, 1), padding="same"))
    assert not is_frame_conv(nn.Conv2d(2, 2, 1))
    assert is_frame_conv(nn.Conv3d(2, 2, (3, 1, 1), padding=(1, 0, 0)))


def _ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("kind", ["show-1-base", "stock"])
def test_stage_unets_never_take_the_cpu_conv3d_fallback(kind: str) -> None:
    """At one thread PyTorch sends a 3 x 1 x 1 Conv3d to ``slow_conv3d`` (what took a fifth of the toy cascade);
    a stage's UNet (the Show-1 blocks and diffusers' stock UNet3DConditionModel) must not reach it, in training
    (forward and backward) as in sampling, and must give the unconverted UNet's output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        if kind == "stock":
            unet = UNet3DConditionModel(
                block_out_channels=(16, 32),
                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
                layers_per_block=1,
                attention_head_dim=8,
                norm_num_groups=8,
                cross_attention_dim=16,
                in_channels=3,
                out_channels=3,
            )
            text = torch.randn(1, 5, 16)
        else:
            unet = tiny_paper_unet("show-1-base")
            text = torch.randn(1, 5, 16)
        x = torch.randn(1, unet.config.in_channels, 8, 16, 16)
        t = torch.tensor([500])
        convs = [m for m in unet.modules() if is_frame_conv(m)]
        assert convs, "the UNet has temporal convolutions"
        with torch.no_grad():
            before = unet(x, t, encoder_hidden_states=text).sample
        assert "aten::slow_conv3d_forward" in _ops(lambda: unet(x, t, encoder_hidden_states=text))  # the check bites
        stage = KeyframeStage(unet=unet, noise_scheduler=DDPMScheduler(), optimizer=torch.optim.AdamW, ema=None)
        assert all(type(m) is FrameConv3d for m in convs)
        with torch.no_grad():
            after = stage.unet(x, t, encoder_hidden_states=text).sample
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
        ops = _ops(lambda: stage.unet(x, t, encoder_hidden_states=text).sample.square().mean().backward())
        assert not {o for o in ops if "slow_conv3d" in o}, sorted(o for o in ops if "conv" in o)
    finally:
        torch.set_num_threads(threads)
