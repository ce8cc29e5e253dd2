"""Tests for the inference-efficiency estimator (bench/efficiency_lib.py) and its report (bench/efficiency.py)."""

from __future__ import annotations

import pytest
import torch
from efficiency_lib import (  # bench/ is on the test path (pyproject.toml)
    LiveBytesTracker,
    measure_forward,
    paper_schedule,
    paper_stages,
    predict_peak,
    real_peak,
    reduced_unet_config,
)
from torch import nn

torch.set_num_threads(1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_tracker_peak_equals_hand_computed_mlp(device):
    # batch 16, fp32. Linear1 out 16x8x4 = 512 B; ReLU out 512 B while Linear1's is still referenced -> 1024 B.
    # Then Linear1's out is freed; Linear2 out 16x2x4 = 128 B next to ReLU's 512 B -> 640 B. Peak = 1024 B.
    # (weight.t() is a view: not an allocation; the input and weights exist before and are not counted.)
    model = _mlp().to(device)
    x = torch.randn(16, 4, device=device)
    stats = measure_forward(model, (x,))
    assert stats.peak_activation_bytes == 1024
    assert stats.input_bytes == 16 * 4 * 4
    assert stats.weight_bytes == (4 * 8 + 8 + 8 * 2 + 2) * 4


def test_tracker_sees_frees_and_ignores_views_and_inplace():
    x = torch.empty(1000, device="meta")  # 4000 B, pre-existing
    tracker = LiveBytesTracker()
    with tracker:
        a = x * 2  # +4000
        b = a.view(10, 100)  # view: +0
        a.mul_(3)  # in-place: +0
        del a
        c = b + 1  # +4000 -> 8000 (b keeps a's storage alive)
        del b, c
        d = x[:10] * 1  # both freed before this op: 40 B live
    assert tracker.peak == 8000
    assert tracker.current == 40
    del d


def test_tracker_fails_on_wrong_expectation():
    # The tracker must notice a temporary that a naive "output bytes" count would not: y*y allocates while y lives.
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        return (y * y).sum()

    x = torch.empty(256, device="meta")
    tracker = LiveBytesTracker()
    with tracker:
        f(x)
    assert tracker.peak == 2 * 256 * 4 + 4  # y and y*y together, then the 4-byte sum while y*y still lives
    assert tracker.peak != 256 * 4


def test_conv_flops_equal_formula():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False).to("meta")
    x = torch.empty(2, 3, 16, 16, device="meta")
    stats = measure_forward(conv, (x,))
    assert stats.flops == 2 * 2 * 8 * 16 * 16 * 3 * 3 * 3
    assert stats.peak_activation_bytes == 2 * 8 * 16 * 16 * 4


def test_attention_policies_flops_equal_and_materialised_holds_scores():
    class Attn(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    b, h, n, d = 2, 4, 256, 16
    q = torch.empty(b, h, n, d, device="meta", dtype=torch.bfloat16)
    eff = measure_forward(Attn(), (q,), policy="efficient")
    mat = measure_forward(Attn(), (q,), policy="materialised")
    mat32 = measure_forward(Attn(), (q,), policy="materialised_fp32")
    assert eff.flops == mat.flops == 4 * b * h * n * n * d
    scores = b * h * n * n * 2  # one bf16 score matrix
    assert eff.peak_activation_bytes < scores
    assert mat.peak_activation_bytes >= 2 * scores  # scores and probabilities coexist at the softmax
    assert mat32.peak_activation_bytes >= 4 * scores  # the same in float32


def test_reduced_sr1_meta_prediction_matches_real_cpu_run():
    # Tiny sr1-layout UNet (widths /32) on a small video: meta prediction vs the same forward on real CPU tensors
    # (in this process; bench/efficiency.py does it in a fresh process with RSS). The meta run must see the same
    # allocations as the real one; the peak RSS growth must cover the prediction (plus at most some MiB of kernel
    # workspace / allocator slack at this tiny size).
    cfg = reduced_unet_config("show-1-sr1", 32)
    spec = dict(batch=1, channels=6, frames=2, height=64, width=96, text=[8, 4096], noise_level=True)
    pred = predict_peak(cfg, spec).peak_activation_bytes
    real = real_peak(cfg, spec)
    assert pred > 1_000_000
    assert real["tracked"] == pytest.approx(pred, rel=0.01)
    # (The RSS growth check lives in bench/efficiency.py, in a fresh process: inside a test session the
    # allocator reuses memory freed by earlier tests, so RSS growth here depends on test order.)


def test_quick_bench_prints_both_cascades(capsys):
    import efficiency  # bench/efficiency.py, run in-process: its main() is the script

    efficiency.main(["--quick"])
    out = capsys.readouterr().out
    for needle in (
        "hybrid",
        "all_pixel",
        "latent SR2 (show-1-sr2)",
        "pixel SR2 (sr1 config)",
        "TOTAL",
        "ratio",
        "4.80",
        "mem eff",
    ):
        assert needle in out, needle


def test_paper_schedule_is_read_from_the_paper_experiments():
    """Frames and step counts come from conf/ (the released sampling there), and follow a change to it."""
    s = paper_schedule()
    assert (s.keyframes, s.frames, s.interp_windows, s.sr_windows) == (8, 29, 7, 4)
    assert (s.keyframe_steps, s.interp_steps, s.sr1_steps, s.sr2_executed) == (75, 75, 125, 40)
    changed = (("keyframe", "stage.num_frames=4"), ("pixel_sr", "stage.sampling.num_steps=10"))
    s2 = paper_schedule(changed)
    assert (s2.frames, s2.interp_windows, s2.sr1_steps) == (13, 3, 10)
    forwards = {spec.name: spec.forwards for spec in paper_stages(8, changed)["hybrid"]}
    assert forwards["interpolation"] == 75 * 3 and forwards["pixel SR1 (show-1-sr1)"] == 10 * s2.sr_windows
    assert forwards["VAE encode"] == 13
