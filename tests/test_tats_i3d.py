"""The TATS / VideoGPT I3D variant: batch-norm eps, state-dict names of ``i3d_pretrained_400.pt``, the
TATS Frechet-distance arithmetic, and (slow) parity with TATS's own code run in a separate venv
(``scripts/tats_parity.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tats_parity  # scripts/ is on the test path (pyproject.toml)
import torch
from torch import nn

from evaluation.fvd import DISTANCES, FVD, frechet_distance, frechet_distance_by
from evaluation.i3d import (
    VARIANT_BN_EPS,
    InceptionI3d,
    Unit3D,
    converted_state_dict,
    from_tats_state_dict,
    load_i3d,
    to_tats_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("i3d_cache")  # the pickle is converted once for this module


def _random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in InceptionI3d().state_dict().items()}


def test_variant_sets_batch_norm_eps_everywhere() -> None:
    for variant, eps in (("tf", 1e-3), ("tats", 1e-5)):
        units = [m for m in InceptionI3d(variant=variant).modules() if isinstance(m, Unit3D)]
        assert len(units) == 3 + 9 * 6 and {u.bn_eps for u in units} == {eps}
    assert VARIANT_BN_EPS == {"tf": 1e-3, "tats": 1e-5}
    with pytest.raises(ValueError, match="unknown I3D variant"):
        InceptionI3d(variant="pytorch")


@pytest.mark.parametrize("stride", [1, 2])
def test_tats_unit_equals_torch_conv_and_batchnorm3d_eps_1e5(stride: int) -> None:
    # Independent reference: nn.Conv3d + nn.BatchNorm3d(eps=1e-5, scale 1) in eval mode, as TATS's Unit3D.
    torch.manual_seed(0)
    unit = Unit3D(4, 6, 3, stride, bn_eps=1e-5)
    with torch.no_grad():
        unit.conv.weight.normal_()
        unit.bn_beta.normal_()
        unit.bn_mean.normal_()
        unit.bn_var.uniform_(1e-4, 1e-2)  # small variances: eps 1e-3 vs 1e-5 matters here
    bn = nn.BatchNorm3d(6, eps=1e-5).eval()
    bn.load_state_dict(
        {
            "weight": torch.ones(6),
            "bias": unit.bn_beta.detach(),
            "running_mean": unit.bn_mean,
            "running_var": unit.bn_var,
            "num_batches_tracked": torch.tensor(0),
        }
    )
    conv = nn.Conv3d(4, 6, 3, stride, bias=False)
    conv.weight.data.copy_(unit.conv.weight)
    x = torch.randn(2, 4, 5, 9, 9)
    from evaluation.i3d import tf_same_padding

    ref = torch.relu(bn(conv(nn.functional.pad(x, tf_same_padding(x.shape[-3:], (3, 3, 3), (stride,) * 3)))))
    with torch.no_grad():
        ours = unit(x)
        unit.fold_batch_norm()
        folded = unit(x)
    # float32 convolutions of 108 terms; values O(10): 1e-5 of the largest value is rounding only.
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-5 * scale
    assert (folded - ref).abs().max() <= 1e-5 * scale
    # ... and eps does matter: the TF eps (1e-3) gives a visibly different output on these variances.
    unit_tf = Unit3D(4, 6, 3, stride, bn_eps=1e-3)
    unit_tf.load_state_dict(
        dict(
            zip(
                ("conv.weight", "bn_beta", "bn_mean", "bn_var"),
                (conv.weight, bn.bias, bn.running_mean, bn.running_var),
            )
        )
    )
    with torch.no_grad():
        assert (unit_tf(x) - ref).abs().max() > 0.01 * scale


def test_tats_state_dict_names_round_trip() -> None:
    ours = _random_state()
    tats = to_tats_state_dict(ours)
    # 57 Unit3D (conv3d.weight + bn.{weight,bias,running_mean,running_var}) + the logits conv (weight, bias).
    assert len(tats) == 57 * 5 + 2
    for key in (
        "Conv3d_1a_7x7.conv3d.weight",
        "Conv3d_2c_3x3.bn.running_var",
        "Mixed_5b.b2b.conv3d.weight",
        "Mixed_3b.b0.bn.bias",
        "Mixed_5c.b3b.bn.running_mean",
        "logits.conv3d.weight",
        "logits.conv3d.bias",
    ):
        assert key in tats, key
    assert all(bool((v == 1).all()) for k, v in tats.items() if k.endswith("bn.weight"))
    back = from_tats_state_dict({**tats, "Mixed_4b.b0.bn.num_batches_tracked": torch.tensor(0)})
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)  # pure renaming: exact


def test_from_tats_state_dict_rejects_what_it_cannot_represent() -> None:
    tats = to_tats_state_dict(_random_state())
    scaled = dict(tats)
    scaled["Mixed_4c.b1b.bn.weight"] = torch.full_like(tats["Mixed_4c.b1b.bn.weight"], 0.5)
    with pytest.raises(ValueError, match="not all ones"):
        from_tats_state_dict(scaled)
    with pytest.raises(ValueError, match="missing 'logits.conv3d.bias'"):
        from_tats_state_dict({k: v for k, v in tats.items() if k != "logits.conv3d.bias"})
    with pytest.raises(ValueError, match="unexpected"):
        from_tats_state_dict({**tats, "fc.weight": torch.zeros(1)})


def test_load_i3d_reads_a_tats_pt_file(tmp_path: Path, cache_dir: Path) -> None:
    state, sha = converted_state_dict(cache_dir=cache_dir)
    pt = tmp_path / "i3d_pretrained_400.pt"
    torch.save(to_tats_state_dict(state), pt)
    from_pt = load_i3d(pt, variant="tats", fuse=False)
    from_pickle = load_i3d(cache_dir=cache_dir, variant="tats", fuse=False)
    assert from_pt.variant == from_pickle.variant == "tats"
    assert from_pt.weights_id != sha and from_pickle.weights_id == sha  # the id is the file's sha256
    a, b = from_pt.state_dict(), from_pickle.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tats_and_tf_variants_differ_slightly_on_real_weights(cache_dir: Path) -> None:
    torch.manual_seed(0)
    clip = torch.rand(1, 3, 9, 224, 224) * 2 - 1
    with torch.inference_mode():
        tats = load_i3d(cache_dir=cache_dir, variant="tats")(clip)
        tf = load_i3d(cache_dir=cache_dir, variant="tf")(clip)
    assert tats.shape == (1, 400)
    rel = float((tats - tf).norm() / tf.norm())
    # Measured 1.4e-3 to 1.8e-3 on 16-frame clips (scripts/tats_parity.py): a real but small difference,
    # far above the 4e-6 float32 rounding between our fused network and TATS's.
    assert 1e-4 < rel < 2e-2, rel


def test_tfgan_svd_float32_distance_is_the_frechet_distance_up_to_float32() -> None:
    real, fake = tats_parity.synthetic_features(n=600, d=40, seed=3)
    r, f = real.astype(np.float64), fake.astype(np.float64)
    mr, sr, mf, sf = r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False)
    exact = frechet_distance(mf, sf, mr, sr)
    # The distance subtracts 2 tr sqrt(Sf Sr) from tr Sf + tr Sr, so its rounding error scales with those traces,
    # not with the (smaller) result. A float32 SVD of 40 x 40 matrices with eigenvalue ratio ~4e3 resolves the
    # singular values to ~eps32 * 4e3 = 5e-4 of the largest; LAPACK blocks differently on AVX-512 and AVX2
    # (measured: 5.5e-5 and 2.7e-4 of the FVD, i.e. 3e-5 and 1.7e-4 of the traces). A wrong formula is off by O(1).
    scale = np.trace(sf) + np.trace(sr)
    for method in DISTANCES:
        value = frechet_distance_by(method, mf, sf, mr, sr)
        assert abs(value - exact) <= 1e-3 * scale, method
    with pytest.raises(ValueError, match="unknown Frechet"):
        frechet_distance_by("sqrtm", mf, sf, mr, sr)
    fvd = FVD(feature_extractor=nn.Identity(), num_features=40, distance="tfgan_svd_float32")
    fvd.add_features(torch.from_numpy(real), real=True)
    fvd.add_features(torch.from_numpy(fake), real=False)
    assert fvd.protocol()["distance"] == "tfgan_svd_float32"
    assert abs(float(fvd.compute()) - exact) <= 1e-3 * scale  # as above
    with pytest.raises(ValueError, match="distance must be one of"):
        FVD(feature_extractor=nn.Identity(), distance="svd")


@pytest.mark.slow
def test_parity_with_tats_code_in_its_own_venv() -> None:
    why = tats_parity.reference_ready()
    if why:
        pytest.skip(f"TATS reference environment missing: {why}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tats_parity.py"), "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout
