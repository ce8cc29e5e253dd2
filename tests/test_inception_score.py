"""Inception Score metric and the TGAN C3D network / npz loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_rel

from evaluation.c3d import C3D, c3d_npz_shapes, load_c3d
from evaluation.inception_score import InceptionScore, inception_score_from_probs


def _is_by_hand(p: np.ndarray) -> float:
    """exp(mean_x sum_y p(y|x) log(p(y|x) / p(y))), written out with loops."""
    marginal = [sum(p[i][k] for i in range(len(p))) / len(p) for k in range(len(p[0]))]
    kls = []
    for row in p:
        kls.append(sum(q * math.log(q / m) for q, m in zip(row, marginal) if q > 0))
    return math.exp(sum(kls) / len(kls))


def _random_probs(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 3, dim=1)


def test_is_equals_formula_by_hand():
    p = _random_probs(12, 5, 0)
    metric = InceptionScore(eps=0.0)
    metric.update(p[:5])
    metric.update(p[5:])
    mean, std = metric.compute()
    assert mean.dtype == torch.float64
    assert float(mean) == pytest.approx(_is_by_hand(p.numpy()), rel=1e-12)
    assert float(std) == 0.0


def test_is_extremes():
    one_hot = torch.eye(4, dtype=torch.float64).repeat(3, 1)  # confident and uniformly spread: IS = K
    assert float(inception_score_from_probs(one_hot, eps=0.0)[0]) == pytest.approx(4.0, rel=1e-12)
    same = torch.full((6, 4), 0.25, dtype=torch.float64)  # no information: IS = 1
    assert float(inception_score_from_probs(same, eps=0.0)[0]) == pytest.approx(1.0, rel=1e-12)


def test_splits_and_repeats_follow_global_index_order():
    p = _random_probs(24, 6, 1)
    by_hand = [_is_by_hand(p[i * 4 : (i + 1) * 4].numpy()) for i in range(6)]  # 2 repeats x 3 splits
    metric = InceptionScore(num_splits=3, repeats=2, eps=0.0)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for chunk in perm.split(5):  # updates arrive out of order; indices restore the order
        metric.update(p[chunk], indices=chunk)
    mean, std = metric.compute()
    assert float(mean) == pytest.approx(np.mean(by_hand), rel=1e-12)
    assert float(std) == pytest.approx(np.std(by_hand), rel=1e-12)


def test_is_input_errors():
    metric = InceptionScore()
    with pytest.raises(ValueError, match="summing to 1"):
        metric.update(torch.rand(3, 4) + 1)
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()
    metric.update(torch.full((2, 4), 0.25), indices=torch.tensor([0, 1]))
    metric.update(torch.full((2, 4), 0.25), indices=torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="duplicate"):
        metric.compute()
    with pytest.raises(ValueError, match="cannot fill"):
        inception_score_from_probs(torch.full((3, 4), 0.25), num_splits=2, repeats=2)


def _write_fake_tgan_files(tmp_path, seed=0, prefix=""):
    """npz files with the layout of conv3d_deepnetA_ucf.npz / mean2.npz (random values)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in c3d_npz_shapes().items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        arrays[prefix + key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
    weights = tmp_path / "conv3d_deepnetA_ucf.npz"
    np.savez(weights, **arrays)
    mean = tmp_path / "mean2.npz"
    np.savez(mean, mean=rng.uniform(80, 120, size=(3, 16, 128, 171)).astype(np.float32))
    return weights, mean, arrays


def test_c3d_npz_layout():
    shapes = c3d_npz_shapes()
    assert shapes["conv1a/W"] == (64, 3, 3, 3, 3) and shapes["conv5b/W"] == (512, 512, 3, 3, 3)
    assert shapes["fc6/W"] == (4096, 8192) and shapes["fc8/W"] == (101, 4096) and len(shapes) == 22


@pytest.fixture(scope="module")
def tgan_files(tmp_path_factory):
    # Keys under a common prefix, as in a chainer snapshot: the loader must find it.
    return _write_fake_tgan_files(tmp_path_factory.mktemp("c3d"), prefix="predictor/")


def test_c3d_loads_tgan_layout_and_runs(tgan_files):
    weights, mean_path, arrays = tgan_files
    arrays = {k[len("predictor/") :]: v for k, v in arrays.items()}
    model = load_c3d(weights, mean_path)
    assert torch.equal(model.conv3b.weight, torch.from_numpy(arrays["conv3b/W"]))
    assert torch.equal(model.fc8.bias, torch.from_numpy(arrays["fc8/b"]))
    mean = np.load(mean_path)["mean"]
    assert torch.allclose(model.mean_bias, torch.from_numpy(128.0 - mean[:, :, 8:120, 8:120]))

    # Preprocessing: constant colour (r, g, b) in [-1, 1] -> BGR * 128 + 128 - mean crop (resize is exact on constants).
    rgb = torch.tensor([0.5, -0.25, 1.0])
    video = rgb.view(1, 3, 1, 1, 1).expand(1, 3, 16, 30, 40)
    pre = model.preprocess(video)
    expected = rgb.flip(0).view(3, 1, 1, 1) * 128 + model.mean_bias
    # Values of order 100 from one multiply-add each: 1e-4 is ~1e-6 of the scale (float32 rounding).
    assert pre.shape == (1, 3, 16, 112, 112) and torch.allclose(pre[0], expected, rtol=0, atol=1e-4)

    # Resize is chainer's bilinear with align_corners=True: corners map to corners, the centre lerps.
    ramp = torch.linspace(-1, 1, 57).view(1, 1, 1, 1, 57).expand(1, 3, 16, 2, 57)
    pre = model.preprocess(ramp) - model.mean_bias
    assert torch.allclose(pre[0, :, :, :, 0], torch.tensor(-128.0)) and torch.allclose(
        pre[0, :, :, :, -1], torch.tensor(128.0)
    )
    assert torch.allclose(pre[0, 0, 0, 0], torch.linspace(-128, 128, 112), rtol=0, atol=1e-3)  # ~1e-5 of 128

    x = torch.rand(1, 3, 16, 64, 64) * 2 - 1
    logits = model(x)
    assert logits.shape == (1, 101) and torch.isfinite(logits).all()
    probs = torch.softmax(logits, 1)
    # The same network written out step by step (pool1 spatial, the rest 2^3, ceil mode).
    h = model.preprocess(x)
    for name, k in [
        ("conv1a", (1, 2, 2)),
        ("conv2a", 2),
        ("conv3a", None),
        ("conv3b", 2),
        ("conv4a", None),
        ("conv4b", 2),
        ("conv5a", None),
        ("conv5b", 2),
    ]:
        h = F.relu(
            F.conv3d(h, torch.from_numpy(arrays[f"{name}/W"]), torch.from_numpy(arrays[f"{name}/b"]), padding=1)
        )
        if k is not None:
            h = F.max_pool3d(h, k, k, ceil_mode=True)
    assert h.shape[1:] == (512, 1, 4, 4)
    h = h.flatten(1)
    for name in ("fc6", "fc7", "fc8"):
        h = F.linear(h, torch.from_numpy(arrays[f"{name}/W"]), torch.from_numpy(arrays[f"{name}/b"]))
        h = F.relu(h) if name != "fc8" else h
    # Same layers, other code path (fused/blocked differently): equal up to reordered float32 sums.
    assert_close_rel(logits, h)

    # Through the metric: probabilities of the classifier (two clips: x and its mirror).
    metric = InceptionScore(classifier=model, batch_size=1)
    x2 = torch.cat([x, x.flip(-1)])
    metric.update(x2)
    mean_is, _ = metric.compute()
    probs2 = torch.cat([probs, torch.softmax(model(x.flip(-1)), 1)])
    assert float(mean_is) == pytest.approx(float(inception_score_from_probs(probs2.double())[0]), rel=1e-6)


def test_c3d_loader_errors(tmp_path, tgan_files):
    _, mean_path, _ = tgan_files
    with pytest.raises(FileNotFoundError, match="conv3d_deepnetA_ucf"):
        load_c3d(tmp_path / "missing.npz", mean_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"conv1a/W": np.zeros((64, 3, 3, 3, 3), np.float32)})
    with pytest.raises(KeyError, match="conv1a/b"):
        load_c3d(bad, mean_path)
    np.savez(bad, **{"conv1a/W": np.zeros((64, 3, 3, 3, 3), np.float32), "conv1a/b": np.zeros(10, np.float32)})
    with pytest.raises(ValueError, match="shape"):
        load_c3d(bad, mean_path)
    np.savez(bad, **{"a/conv1a/W": np.zeros(1), "b/conv1a/W": np.zeros(1)})
    with pytest.raises(KeyError, match="unique"):
        load_c3d(bad, mean_path)
    np.savez(tmp_path / "badmean.npz", mean=np.zeros((3, 8, 128, 171), np.float32))
    with pytest.raises(ValueError, match="mean"):
        load_c3d(bad, tmp_path / "badmean.npz")
    with pytest.raises(ValueError, match="16 frames"):
        C3D()(torch.zeros(1, 3, 8, 112, 112))
