"""Frechet Video Distance with the original FVD recipe (I3D Kinetics-400 logits, TF1 resize, 16 frames).

Statistics are kept as float64 running sums (sum x, sum x x^T, count) reduced with ``sum``, so the
result is exact under any sharding of the samples over processes (see ``docs/fvd.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

from evaluation.resize import RESIZE_METHODS, resize_video

ArrayLike = np.ndarray | Tensor
COVARIANCES = ("unbiased", "biased")
# How Tr((S1 S2)^1/2) is computed (see frechet_distance_by):
#   eigh_float64:      ours (float64, symmetric eigen-decompositions) - the default, most accurate;
#   tfgan_svd_float32: tf-gan's formula as ported to torch by TATS (tats/fvd/fvd.py:44-100): float32,
#                      square roots by SVD, singular values below 1e-10 left unrooted;
#   scipy_sqrtm:       StyleGAN-V (src/metrics/frechet_video_distance.py:54-56): scipy.linalg.sqrtm
#                      of S_gen S_real in float64, real part of the trace.
DISTANCES = ("eigh_float64", "tfgan_svd_float32", "scipy_sqrtm")
STATS_FORMAT = "show1_lightning.fvd_real_stats.v1"


def _f64(x: ArrayLike) -> Tensor:
    return (x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))).to("cpu", torch.float64)


def _clamp_noise(eigvals: Tensor) -> Tensor:
    """Zero the eigenvalues that are rounding noise: negative ones, and those below
    ``D * eps * max`` (the rank tolerance of numpy's ``matrix_rank``). Their square roots would add
    about ``sqrt(eps) * sqrt(max)`` each, e.g. for rank-deficient covariances of few clips in 400-d."""
    tol = eigvals.shape[-1] * torch.finfo(eigvals.dtype).eps * eigvals.abs().max()
    return torch.where(eigvals > tol, eigvals, torch.zeros_like(eigvals))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians, in float64.

    The trace of ``(S1 S2)^(1/2)`` is computed stably as the sum of square roots of the eigenvalues
    of the symmetric PSD matrix ``A S2 A`` with ``A = S1^(1/2)`` (eigh, eigenvalues clamped at 0,
    rounding-noise eigenvalues below ``D * eps * max`` zeroed); no complex ``sqrtm`` is needed. Accepts numpy arrays or torch tensors.
    """
    m1, m2, s1, s2 = _f64(mu1), _f64(mu2), _f64(sigma1), _f64(sigma2)
    d = m1.shape[-1] if m1.ndim == 1 else -1
    if m1.ndim != 1 or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"expected mu (D,) and sigma (D, D); got mu1 {tuple(m1.shape)}, sigma1 {tuple(s1.shape)}, "
            f"mu2 {tuple(m2.shape)}, sigma2 {tuple(s2.shape)}"
        )
    for name, t in (("mu1", m1), ("mu2", m2), ("sigma1", s1), ("sigma2", s2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = torch.linalg.eigh(s1)
    a = (v * _clamp_noise(w).sqrt()) @ v.T
    m = a @ s2 @ a
    tr_covmean = _clamp_noise(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def _svd_sqrt_float32(mat: Tensor, eps: float = 1e-10) -> Tensor:
    """tf-gan's ``_symmetric_matrix_square_root``: ``U diag(s') V^T`` with ``s' = sqrt(s)`` where ``s >= eps``."""
    u, s, vh = torch.linalg.svd(mat)
    s = torch.where(s < eps, s, s.sqrt())
    return (u * s) @ vh


def frechet_distance_by(method: str, mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance computed the way ``method`` (one of :data:`DISTANCES`) computes it.

    ``eigh_float64`` is :func:`frechet_distance`. ``tfgan_svd_float32`` casts the moments to float32
    and takes ``Tr(S1 + S2) - 2 Tr(sqrt(A S2 A))`` with ``A = sqrt(S1)``, square roots by SVD (tf-gan /
    TATS; ``S1`` is the first argument: TATS passes the generated set first). ``scipy_sqrtm`` takes
    the real part of ``Tr(S1 + S2 - 2 sqrtm(S1 S2))`` in float64 (StyleGAN-V: generated first).
    """
    if method == "eigh_float64":
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    if method == "tfgan_svd_float32":
        m1, m2, s1, s2 = (_f64(t).float() for t in (mu1, mu2, sigma1, sigma2))
        a = _svd_sqrt_float32(s1)
        tr_covmean = torch.trace(_svd_sqrt_float32(a @ (s2 @ a)))
        return float(torch.trace(s1 + s2) - 2.0 * tr_covmean + ((m1 - m2) ** 2).sum())
    if method == "scipy_sqrtm":
        import scipy.linalg

        m1, m2, s1, s2 = (_f64(t).numpy() for t in (mu1, mu2, sigma1, sigma2))
        covmean, _ = scipy.linalg.sqrtm(s1 @ s2, disp=False)
        return float(np.real(np.square(m1 - m2).sum() + np.trace(s1 + s2 - 2 * covmean)))
    raise ValueError(f"unknown Frechet distance method {method!r}; choose one of {DISTANCES}")


def quantize_to_uint8_levels(videos: Tensor) -> Tensor:
    """Float [-1, 1] -> float32 in 0..255 on integer levels (the reference feeds uint8 videos)."""
    return ((videos.float().clamp(-1, 1) + 1) * 127.5).round()


def preprocess_for_fvd(
    videos: Tensor, clip_length: int = 16, resize: str = "tf1_bilinear", size: tuple[int, int] = (224, 224)
) -> Tensor:
    """The reference FVD preprocessing: first ``clip_length`` frames, uint8 levels, resize, scale to [-1, 1].

    Args:
        videos: float ``(B, C, T, H, W)`` in [-1, 1] (C = 3).
        clip_length: frames per clip; the first ``clip_length`` frames are used.
        resize: one of :data:`evaluation.resize.RESIZE_METHODS` (``tf1_bilinear`` = reference).

    Returns:
        float32 ``(B, 3, clip_length, 224, 224)`` in [-1, 1].
    """
    if not isinstance(videos, Tensor) or videos.ndim != 5:
        raise ValueError(f"expected videos (B, C, T, H, W), got {getattr(videos, 'shape', type(videos))}")
    if videos.shape[1] != 3:
        raise ValueError(f"FVD needs RGB videos (C = 3), got C = {videos.shape[1]}")
    if not videos.is_floating_point():
        raise ValueError(f"expected float videos in [-1, 1], got dtype {videos.dtype}")
    if resize not in RESIZE_METHODS:
        raise ValueError(f"unknown resize {resize!r}; choose one of {RESIZE_METHODS}")
    if videos.shape[2] < clip_length:
        raise ValueError(f"FVD clips need {clip_length} frames, the videos have only {videos.shape[2]}")
    x = quantize_to_uint8_levels(videos[:, :, :clip_length])
    x = resize_video(x, size, resize)  # in 0..255 space, as the reference (resize of uint8 -> float)
    return x * (2.0 / 255.0) - 1.0


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Full float32 inside the block: TF32 off for cuBLAS and cuDNN, matmul precision "highest".

    The previous settings are restored after the block.
    """
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def protocol_hash(protocol: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable protocol description."""
    blob = json.dumps(dict(protocol), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def real_stats_cache_path(cache_dir: str | Path, dataset: str, protocol: Mapping[str, Any]) -> Path:
    """Where the real-video statistics of ``dataset`` under ``protocol`` are cached.

    ``protocol`` should hold everything the statistics depend on (clip length, resize, frames,
    stride, resolution, number of clips, split, weights id, ...); any change gives a new file.
    """
    if not dataset:
        raise ValueError("dataset name must be non-empty")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_") or "dataset"
    return Path(cache_dir) / "fvd_real_stats" / f"{slug}-{protocol_hash(protocol)}.safetensors"


class FVD(Metric):
    """Frechet Video Distance as a torchmetrics ``Metric`` (distributed-exact running float64 sums).

    Args:
        feature_extractor: maps float32 ``(B, 3, clip_length, 224, 224)`` in [-1, 1] to ``(B, D)``;
            default: :func:`evaluation.i3d.load_i3d` (loaded on first use).
        clip_length: frames per clip (the first ``clip_length`` frames of each video).
        resize: frame resize method, ``tf1_bilinear`` as in the reference.
        covariance: ``"unbiased"`` (N - 1, TF reference) or ``"biased"`` (N, StyleGAN-V).
        distance: how the distance is computed from the moments, one of :data:`DISTANCES`
            (``eigh_float64``: ours, the default; the others reproduce TATS / StyleGAN-V rounding).
        feature_batch_size: clips per feature-network call (bounds memory).
        num_features: D, the feature size (400 for I3D logits).
        reset_real_features: if False, :meth:`reset` keeps the real statistics.
        num_generated: use only generated samples with global index < ``num_generated x repeats``
            (TATS / StyleGAN-V: 2048); None: every generated sample. Needs ``indices`` in :meth:`update`.
        repeats: tgan2-style confidence: generated samples ``r x num_generated ...`` (consecutive
            global indices) form set ``r``; :meth:`compute` returns the mean FVD over the sets and
            :meth:`compute_repeats` each set's FVD against the same real statistics.

    The feature network is not a registered submodule (it stays out of ``state_dict``); it is
    moved to the metric's device (``fvd.to(device)``) on each :meth:`update`.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        clip_length: int = 16,
        resize: str = "tf1_bilinear",
        covariance: str = "unbiased",
        feature_batch_size: int = 8,
        num_features: int = 400,
        reset_real_features: bool = True,
        distance: str = "eigh_float64",
        num_generated: int | None = None,
        repeats: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        if repeats < 1 or (num_generated is not None and num_generated < 2):
            raise ValueError(f"repeats must be >= 1 and num_generated >= 2, got {repeats}, {num_generated}")
        if repeats > 1 and num_generated is None:
            raise ValueError("FVD repeats > 1 needs num_generated (the size of each generated set)")
        self.num_generated = None if num_generated is None else int(num_generated)
        self.repeats = int(repeats)
        if resize not in RESIZE_METHODS:
            raise ValueError(f"unknown resize {resize!r}; choose one of {RESIZE_METHODS}")
        if clip_length < 1 or feature_batch_size < 1 or num_features < 1:
            raise ValueError("clip_length, feature_batch_size and num_features must be positive")
        self.clip_length, self.resize, self.covariance = clip_length, resize, covariance
        self.feature_batch_size, self.num_features = feature_batch_size, num_features
        self.reset_real_features = reset_real_features
        # Not registered as a submodule: keeps the network out of the metric's state_dict/checkpoints.
        self._extractor: list[nn.Module] = [feature_extractor] if feature_extractor is not None else []
        d = num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        if self.repeats > 1:
            r = self.repeats
            self.add_state("rep_sum", torch.zeros(r, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("rep_outer", torch.zeros(r, d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("rep_count", torch.zeros(r, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def feature_extractor(self) -> nn.Module:
        """The feature network (the real I3D unless one was given), loaded on first use."""
        if not self._extractor:
            from evaluation.i3d import load_i3d

            self._extractor.append(load_i3d())
        return self._extractor[0]

    def protocol(self) -> dict[str, Any]:
        """The choices that define this FVD, for reports and for :func:`real_stats_cache_path`."""
        net = self.feature_extractor
        out = {
            "metric": "fvd",
            "clip_length": self.clip_length,
            "resize": self.resize,
            "resolution": 224,
            "covariance": self.covariance,
            "num_features": self.num_features,
            "feature_extractor": type(net).__name__,
            "weights_id": getattr(net, "weights_id", ""),
        }
        # Only when they differ from the original recipe, so tf_fvd caches and reports keep their keys.
        if getattr(net, "variant", "tf") != "tf":
            out["network_variant"] = net.variant
        if self.distance != "eigh_float64":
            out["distance"] = self.distance
        return out

    def generated_protocol(self) -> dict[str, Any]:
        """How many generated samples are used and how they are grouped (not part of the real-stats key)."""
        return {
            "num_generated": self.num_generated if self.num_generated is not None else "all",
            "repeats": self.repeats,
            "sets": "consecutive global indices r*num_generated .. (r+1)*num_generated-1"
            if self.repeats > 1
            else "one",
        }

    @torch.no_grad()
    def features(self, videos: Tensor) -> Tensor:
        """float64 ``(B, D)`` features of float ``(B, C, T, H, W)`` videos in [-1, 1] (float32 network)."""
        net = self.feature_extractor
        device = self.device  # the network follows the metric (e.g. after Lightning moves it)
        if any(t.device != device for t in (*net.parameters(), *net.buffers())):
            net.to(device)
        out = []
        with exact_float32(), torch.autocast(device_type=device.type, enabled=False):
            for chunk in videos.split(self.feature_batch_size):
                clip = preprocess_for_fvd(chunk.to(device), self.clip_length, self.resize)
                feats = net(clip)
                if feats.ndim != 2 or feats.shape != (chunk.shape[0], self.num_features):
                    raise ValueError(
                        f"feature extractor returned {tuple(feats.shape)}, "
                        f"expected ({chunk.shape[0]}, {self.num_features})"
                    )
                out.append(feats.to(self.real_sum.device, torch.float64))
        return torch.cat(out)

    def update(self, videos: Tensor, real: bool, indices: Tensor | None = None) -> None:  # type: ignore[override]
        """Add a batch of videos (float ``(B, C, T, H, W)`` in [-1, 1]) to the real or fake statistics.

        ``indices`` (global sample indices, ``B``) are needed for generated videos when
        ``num_generated`` is set: samples past ``num_generated x repeats`` are skipped (no network call).
        """
        if not isinstance(real, bool):
            raise TypeError("update(videos, real): real must be True or False")
        if real or self.num_generated is None:
            self._accumulate(self.features(videos), real)
            return
        if indices is None:
            raise ValueError("FVD with num_generated needs the generated samples' global indices")
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() != videos.shape[0]:
            raise ValueError(f"{idx.numel()} indices for {videos.shape[0]} videos")
        keep = idx < self.num_generated * self.repeats
        if not bool(keep.any()):
            return
        feats = self.features(videos[keep.to(videos.device)])
        self._accumulate(feats, real=False)
        if self.repeats > 1:
            sets = (idx[keep] // self.num_generated).to(feats.device)
            self.rep_sum = self.rep_sum.index_add(0, sets, feats)
            self.rep_outer = self.rep_outer.index_add(0, sets, feats[:, :, None] * feats[:, None, :])
            self.rep_count = self.rep_count.index_add(0, sets, torch.ones_like(sets, dtype=torch.float64))

    def add_features(self, feats: Tensor, real: bool) -> None:
        """Add precomputed ``(N, D)`` features (e.g. from :meth:`features`), skipping the network."""
        feats = _f64(feats).to(self.real_sum.device)
        if feats.ndim != 2 or feats.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) features, got {tuple(feats.shape)}")
        self._accumulate(feats, real)
        # What torchmetrics' update wrapper does: invalidate the cached compute() result.
        self._computed = None
        self._update_count += 1

    def _accumulate(self, feats: Tensor, real: bool) -> None:
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + feats.T @ feats)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + feats.shape[0])

    def _gaussian(self, s: Tensor, outer: Tensor, n: Tensor, side: str) -> tuple[Tensor, Tensor]:
        count = float(n)
        ddof = 1 if self.covariance == "unbiased" else 0
        if count - ddof < 1:
            raise RuntimeError(
                f"FVD needs at least {ddof + 1} {side} clips for a {self.covariance} covariance, got {count:g}"
            )
        mu = s / count
        cov = (outer - count * torch.outer(mu, mu)) / (count - ddof)
        return mu, cov

    def _distance(self, mu1: Tensor, s1: Tensor, mu2: Tensor, s2: Tensor) -> float:
        if self.distance == "eigh_float64":
            return frechet_distance(mu1, s1, mu2, s2)
        # TATS and StyleGAN-V pass the generated statistics first (the order changes the rounding only).
        return frechet_distance_by(self.distance, mu2, s2, mu1, s1)

    def compute(self) -> Tensor:
        """FVD between the real and fake statistics, a float64 scalar tensor (with ``repeats > 1``:
        the mean over the generated sets, see :meth:`compute_repeats`)."""
        if self.repeats > 1:
            # compute() runs on the states summed over processes; keep the per-set values it saw.
            self.repeat_values = self.compute_repeats()
            return self.repeat_values.mean()
        mu1, s1 = self._gaussian(self.real_sum, self.real_outer, self.real_count, "real")
        mu2, s2 = self._gaussian(self.fake_sum, self.fake_outer, self.fake_count, "fake")
        return torch.tensor(self._distance(mu1, s1, mu2, s2), dtype=torch.float64)

    def compute_repeats(self) -> Tensor:
        """The FVD of each generated set against the real statistics (float64, ``repeats``), from this
        process's states: call :meth:`compute` (which syncs processes) and read ``repeat_values`` in a
        distributed run."""
        mu1, s1 = self._gaussian(self.real_sum, self.real_outer, self.real_count, "real")
        if self.repeats == 1:
            return self.compute().reshape(1)
        out = []
        for r in range(self.repeats):
            mu2, s2 = self._gaussian(self.rep_sum[r], self.rep_outer[r], self.rep_count[r], f"generated set {r}")
            out.append(self._distance(mu1, s1, mu2, s2))
        return torch.tensor(out, dtype=torch.float64)

    def reset(self) -> None:
        """Reset the statistics (the real ones too unless ``reset_real_features=False``)."""
        keep = None
        if not self.reset_real_features:
            keep = (self.real_sum.clone(), self.real_outer.clone(), self.real_count.clone())
        super().reset()
        if keep is not None:
            self.real_sum, self.real_outer, self.real_count = keep

    # ------------------------------------------------------------------ real statistics cache

    def real_stats(self) -> dict[str, Tensor]:
        """The real statistics ``dict(sum, outer, count)`` (float64), summed over all processes."""
        states = {"sum": self.real_sum, "outer": self.real_outer, "count": self.real_count}
        if dist.is_available() and dist.is_initialized():
            group = self.process_group if self.process_group is not None else dist.group.WORLD
            states = {k: v.clone() for k, v in states.items()}
            for v in states.values():
                dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)
        return {k: v.detach().clone().cpu() for k, v in states.items()}

    def save_real_stats(self, path: str | Path, protocol: Mapping[str, Any] | None = None) -> Path:
        """Write the (all-process) real statistics to safetensors with the protocol as metadata.

        Every process must call it in a distributed run (it all-reduces); only rank 0 writes.
        """
        from safetensors.torch import save_file

        stats = self.real_stats()
        path = Path(path)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return path
        meta = {
            "format": STATS_FORMAT,
            "protocol": json.dumps(dict(protocol or {}), sort_keys=True, default=str),
            "count": str(int(stats["count"])),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    def load_real_stats(self, path: str | Path, protocol: Mapping[str, Any] | None = None) -> None:
        """Replace the real statistics by those saved in ``path`` (checking ``protocol`` if given).

        In a distributed run every process calls it; rank 0 holds the statistics and the others
        zeros, so the ``sum`` reduction in :meth:`compute` counts them once.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no FVD real statistics at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stats = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != STATS_FORMAT or set(stats) != {"sum", "outer", "count"}:
            raise ValueError(f"{path} is not an FVD real-statistics file")
        if protocol is not None:
            saved = json.loads(meta.get("protocol", "{}"))
            wanted = json.loads(json.dumps(dict(protocol), sort_keys=True, default=str))
            if saved != wanted:
                raise ValueError(f"{path} was computed with protocol {saved}, not {wanted}")
        d = self.num_features
        if stats["sum"].shape != (d,) or stats["outer"].shape != (d, d):
            raise ValueError(f"{path} holds {tuple(stats['sum'].shape)} features, expected ({d},)")
        device = self.real_sum.device
        rank = dist.get_rank(self.process_group) if dist.is_available() and dist.is_initialized() else 0
        scale = 1.0 if rank == 0 else 0.0
        self.real_sum = stats["sum"].to(device, torch.float64) * scale
        self.real_outer = stats["outer"].to(device, torch.float64) * scale
        self.real_count = stats["count"].to(device, torch.float64).reshape(()) * scale
