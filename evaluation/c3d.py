"""C3D (UCF-101 fine-tuned) as used by TGAN / TGANv2 for the video Inception Score.

The network and its preprocessing follow pfnet-research/tgan2 ``C3DVersion1UCF101`` (chainer):

* input: 16 RGB frames in [-1, 1], any spatial size;
* RGB -> BGR, times 128; bilinear resize to 112 x 112 with align_corners=True (chainer's
  ``F.resize_images``); add ``128 - mean[:, :, 8:120, 8:120]`` (``mean2.npz``, BGR, 16 x 128 x 171);
* conv1a, pool(1,2,2), conv2a, pool 2^3, conv3a/b, pool, conv4a/b, pool, conv5a/b, pool
  (all pools ceil mode, chainer's ``cover_all=True``), fc6 (8192 -> 4096), fc7, fc8 (-> 101).

Weights are the chainer npz ``conv3d_deepnetA_ucf.npz`` (keys ``conv1a/W``, ``conv1a/b``, ...,
``fc8/b``; chainer's conv / linear layouts equal torch's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_FRAMES = 16
INPUT_SIZE = 112
NUM_CLASSES = 101

# (name, in_channels, out_channels) of the eight 3x3x3 convolutions, in order.
_CONVS = [
    ("conv1a", 3, 64),
    ("conv2a", 64, 128),
    ("conv3a", 128, 256),
    ("conv3b", 256, 256),
    ("conv4a", 256, 512),
    ("conv4b", 512, 512),
    ("conv5a", 512, 512),
    ("conv5b", 512, 512),
]
_FCS = [("fc6", 512 * 4 * 4, 4096), ("fc7", 4096, 4096), ("fc8", 4096, NUM_CLASSES)]
# A pool follows these layers (pool1 is spatial only).
_POOL_AFTER = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2), "conv5b": (2, 2, 2)}


def c3d_npz_shapes() -> dict[str, tuple[int, ...]]:
    """The keys and array shapes of the chainer ``conv3d_deepnetA_ucf.npz`` weight file."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, cin, cout in _CONVS:
        shapes[f"{name}/W"] = (cout, cin, 3, 3, 3)
        shapes[f"{name}/b"] = (cout,)
    for name, fin, fout in _FCS:
        shapes[f"{name}/W"] = (fout, fin)
        shapes[f"{name}/b"] = (fout,)
    return shapes


class C3D(nn.Module):
    """C3D UCF-101 classifier with TGAN's preprocessing built in.

    ``forward(videos)`` maps float ``B x 3 x 16 x H x W`` in [-1, 1] (RGB) to ``B x 101`` logits.
    ``mean`` is the BGR mean clip ``3 x 16 x H0 x W0`` (H0, W0 >= 120) from ``mean2.npz``.
    """

    def __init__(self, mean: torch.Tensor | np.ndarray | None = None) -> None:
        super().__init__()
        for name, cin, cout in _CONVS:
            self.add_module(name, nn.Conv3d(cin, cout, kernel_size=3, padding=1))
        for name, fin, fout in _FCS:
            self.add_module(name, nn.Linear(fin, fout))
        if mean is None:
            mean = torch.zeros(3, NUM_FRAMES, 128, 171)
        # Stored already cropped and turned into the additive bias TGAN uses: 128 - mean crop.
        self.register_buffer("mean_bias", 128.0 - _crop_mean(torch.as_tensor(np.asarray(mean), dtype=torch.float32)))

    def preprocess(self, videos: torch.Tensor) -> torch.Tensor:
        """RGB [-1, 1] ``B x 3 x 16 x H x W`` -> the C3D input ``B x 3 x 16 x 112 x 112`` (BGR, mean-free)."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"C3D expects B x 3 x T x H x W videos, got shape {tuple(videos.shape)}")
        if videos.shape[2] != NUM_FRAMES:
            raise ValueError(f"C3D expects exactly {NUM_FRAMES} frames, got {videos.shape[2]}")
        b, c, t, h, w = videos.shape
        x = videos.float().flip(1) * 128.0  # RGB -> BGR, [-1, 1] -> [-128, 128]
        x = x.transpose(1, 2).reshape(b * t, c, h, w)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=True)
        x = x.reshape(b, t, c, INPUT_SIZE, INPUT_SIZE).transpose(1, 2)
        return x + self.mean_bias

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """Float ``B x 3 x 16 x H x W`` RGB in [-1, 1] -> ``B x 101`` logits (fc8)."""
        h = self.preprocess(videos)
        for name, _, _ in _CONVS:
            h = F.relu(getattr(self, name)(h))
            if name in _POOL_AFTER:
                k = _POOL_AFTER[name]
                h = F.max_pool3d(h, kernel_size=k, stride=k, ceil_mode=True)
        h = h.flatten(1)
        if h.shape[1] != _FCS[0][1]:
            raise RuntimeError(f"fc6 expects {_FCS[0][1]} features, got {h.shape[1]}")
        # Dropout after pool5 / fc6 / fc7 is inactive at test time.
        h = F.relu(self.fc6(h))
        h = F.relu(self.fc7(h))
        return self.fc8(h)

    @torch.no_grad()
    def probabilities(self, videos: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities ``B x 101`` (float32)."""
        return torch.softmax(self.forward(videos), dim=1)


def _crop_mean(mean: torch.Tensor) -> torch.Tensor:
    """The TGAN crop ``mean[:, :, 8:120, 8:120]`` of a ``3 x 16 x H0 x W0`` mean clip."""
    while mean.ndim > 4 and mean.shape[0] == 1:
        mean = mean[0]
    if (
        mean.ndim != 4
        or mean.shape[0] != 3
        or mean.shape[1] != NUM_FRAMES
        or mean.shape[2] < 120
        or mean.shape[3] < 120
    ):
        raise ValueError(f"C3D mean must be 3 x {NUM_FRAMES} x H x W with H, W >= 120, got {tuple(mean.shape)}")
    return mean[:, :, 8 : 8 + INPUT_SIZE, 8 : 8 + INPUT_SIZE].clone()


def _strip_prefix(keys: list[str]) -> str:
    """The common prefix before ``conv1a/W`` (chainer snapshots nest the model under a path)."""
    hits = [k for k in keys if k == "conv1a/W" or k.endswith("/conv1a/W")]
    if len(hits) != 1:
        raise KeyError(f"cannot find a unique 'conv1a/W' among the npz keys ({len(keys)} keys, e.g. {keys[:5]})")
    return hits[0][: -len("conv1a/W")]


def load_c3d(weights: str | Path, mean: str | Path, device: str | torch.device = "cpu") -> C3D:
    """Build :class:`C3D` from TGAN's ``conv3d_deepnetA_ucf.npz`` and ``mean2.npz`` files.

    Args:
        weights: path of the chainer weight npz (keys ``conv1a/W`` ... ``fc8/b``, optionally under a
            common prefix such as ``predictor/``).
        mean: path of the mean npz (key ``mean``, BGR, ``3 x 16 x 128 x 171``).
        device: where to put the network.

    Returns:
        the network in eval mode, float32.
    """
    weights, mean = Path(weights), Path(mean)
    for p, what in ((weights, "C3D weights (conv3d_deepnetA_ucf.npz)"), (mean, "C3D mean (mean2.npz)")):
        if not p.is_file():
            raise FileNotFoundError(f"{what} not found at {p}; see docs/evaluation.md for where to get it")
    with np.load(mean, allow_pickle=False) as m:
        if "mean" not in m.files:
            raise KeyError(f"{mean} has no 'mean' array (keys: {m.files})")
        mean_arr = m["mean"].astype(np.float32)
    model = C3D(mean_arr)
    state = {}
    with np.load(weights, allow_pickle=False) as npz:
        prefix = _strip_prefix(list(npz.files))
        for key, shape in c3d_npz_shapes().items():
            full = prefix + key
            if full not in npz.files:
                raise KeyError(f"{weights} lacks '{full}'")
            arr = npz[full]
            if tuple(arr.shape) != shape:
                raise ValueError(f"{weights}: '{full}' has shape {arr.shape}, expected {shape}")
            state[key.replace("/W", ".weight").replace("/b", ".bias")] = torch.from_numpy(arr.astype(np.float32))
    state["mean_bias"] = model.mean_bias
    model.load_state_dict(state)
    return model.eval().to(device)
