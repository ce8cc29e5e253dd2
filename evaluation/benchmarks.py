"""Zero-shot text-to-video benchmarks: the shared machinery and the registry of adapters.

A benchmark supplies (1) the ordered list of prompts to generate, each with a global index, and
(2) real reference clips for FVD, cut by a :class:`ClipSpec`. Every choice (split, sample count,
template, caption rule, how clips are cut) is a constructor argument and is returned by
:meth:`Benchmark.protocol` so that it ends up in the report.

Adapters (one module each, registered in :data:`BENCHMARKS`): UCF-101 (:mod:`evaluation.ucf101_benchmark`),
MSR-VTT (:mod:`evaluation.msrvtt_benchmark`), the toy world (:mod:`evaluation.toy_benchmark`). A new benchmark
subclasses :class:`Benchmark` in its own module, like ``msrvtt_benchmark.py``, and adds a line here and a
``conf/benchmark/*.yaml``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from show1_lightning.data.video_io import decode_video, to_float_video
from show1_lightning.video_ops import resize_cover_crop

START_RULES = ("random", "first", "center")
# How a clip with a ``resolution`` is resized:
#   cover_antialias: bilinear with antialias to cover [H, W], centre crop, floats kept (ours);
#   tats_short_side: TATS / VideoGPT (tats/data.py:95-136): short side to R (long side ceil), torch
#                    bilinear align_corners=False without antialias, centre crop (floor), then uint8 by
#                    truncation as TATS's FVD script does (``.byte()``); needs a square [R, R].
CLIP_RESIZES = ("cover_antialias", "tats_short_side")
# Which real clips are taken for FVD:
#   permutation:  ours: a seeded permutation of the reference videos, cycled; one clip per video
#                 (every video once, in order, when real_clips is null); start by ``clip.start``;
#   all_windows:  TATS: real_clips clips drawn without replacement from every window of ``span``
#                 consecutive frames (stride 1) of every reference video (torchvision VideoClips,
#                 shuffled loader, first 2048 clips);
#   first_sorted: StyleGAN-V: the first real_clips reference videos in sorted path order among
#                 those with at least ``span`` frames (shorter ones discarded), one clip each at a
#                 seeded random offset.
REAL_SAMPLINGS = ("permutation", "all_windows", "first_sorted")


@dataclass(frozen=True)
class PromptItem:
    """One sample to generate: its global index, the prompt, and what it came from."""

    index: int
    prompt: str
    source: str  # UCF-101 class name or MSR-VTT video id


@dataclass
class ClipSpec:
    """How a real (or generated) clip is cut from a video.

    Args:
        frames: number of frames in the clip.
        stride: take every ``stride``-th source frame.
        start: ``"random"`` (seeded per clip index), ``"first"`` or ``"center"``.
        resolution: ``[H, W]``: resize so the frame covers it, then centre crop; None keeps the
            source resolution.
        seed: seed of the random starts.
        resize: how ``resolution`` is reached, one of :data:`CLIP_RESIZES`.
    """

    frames: int = 16
    stride: int = 1
    start: str = "random"
    resolution: Sequence[int] | None = None
    seed: int = 0
    resize: str = "cover_antialias"

    def __post_init__(self) -> None:
        if self.frames < 1 or self.stride < 1:
            raise ValueError(f"clip frames and stride must be >= 1, got {self.frames}, {self.stride}")
        if self.start not in START_RULES:
            raise ValueError(f"clip start must be one of {START_RULES}, got {self.start!r}")
        if self.resolution is not None:
            self.resolution = [int(v) for v in self.resolution]
            if len(self.resolution) != 2:
                raise ValueError(f"clip resolution must be [H, W], got {self.resolution}")
        if self.resize not in CLIP_RESIZES:
            raise ValueError(f"clip resize must be one of {CLIP_RESIZES}, got {self.resize!r}")
        if (
            self.resize == "tats_short_side"
            and self.resolution is not None
            and self.resolution[0] != self.resolution[1]
        ):
            raise ValueError(f"tats_short_side crops a square: resolution must be [R, R], got {self.resolution}")

    def describe(self) -> dict[str, Any]:
        """Plain dict for reports."""
        d = asdict(self)
        if self.resize == "cover_antialias":
            del d["resize"]  # the original description: keeps the tf_fvd cache keys
            d["resize_method"] = "bilinear, antialias, cover + centre crop" if self.resolution else "none"
        else:
            d["resize_method"] = (
                (
                    "TATS: short side to R (long side ceil), bilinear align_corners=False, no antialias, "
                    "centre crop, uint8 by truncation"
                )
                if self.resolution
                else "none"
            )
        d["short_videos"] = "last frame repeated"
        return d


def cut_clip(frames: np.ndarray, spec: ClipSpec, clip_index: int, start: int | None = None) -> torch.Tensor:
    """Cut a clip from uint8 ``T x H x W x 3`` frames -> float ``3 x frames x H' x W'`` in [-1, 1].

    Videos shorter than ``frames * stride`` start at 0 and repeat their last frame. ``start``
    overrides ``spec.start`` (a window chosen by the caller).
    """
    t = frames.shape[0]
    span = (spec.frames - 1) * spec.stride + 1
    slack = max(t - span, 0)
    if start is not None:
        start = min(int(start), slack)
    elif spec.start == "first" or slack == 0:
        start = 0
    elif spec.start == "center":
        start = slack // 2
    else:
        start = int(np.random.default_rng([spec.seed, clip_index]).integers(0, slack + 1))
    idx = np.minimum(start + np.arange(spec.frames) * spec.stride, t - 1)
    if spec.resolution is not None and spec.resize == "tats_short_side":
        return to_float_video(resize_short_side_crop_tats(np.ascontiguousarray(frames[idx]), int(spec.resolution[0])))
    video = to_float_video(np.ascontiguousarray(frames[idx]))
    if spec.resolution is not None:
        video = resize_cover_crop(video, (int(spec.resolution[0]), int(spec.resolution[1])))
    return video


def resize_short_side_crop_tats(frames: np.ndarray, resolution: int) -> np.ndarray:
    """TATS's real-video preprocessing of uint8 ``T x H x W x 3`` frames -> uint8 ``T x R x R x 3``.

    As ``tats/data.py`` ``preprocess`` (lines 95-136) followed by the FVD script's
    ``((video + 0.5) * 255).byte()`` (``scripts/sample_vqgan_transformer_short_videos.py:113``), in
    float32: ``x / 255``; short side to ``R``, long side ``ceil(L * R / S)``; torch bilinear,
    ``align_corners=False``, no antialias; centre crop at ``(L' - R) // 2``; ``- 0.5``; then
    ``(x + 0.5) * 255`` truncated to uint8 (the truncation lowers values by 0.5 level on average).
    """
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - resolution) // 2, (w - resolution) // 2
    x = x[:, :, top : top + resolution, left : left + resolution] - 0.5
    return ((x + 0.5) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def existing_videos(paths: Sequence[Path], what: str) -> list[Path]:
    """``paths`` when every one is a file, else ``FileNotFoundError`` counting the missing ones (``what``: the
    dataset and list, for the message)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} videos missing, e.g. {missing[0]}")
    return list(paths)


def count_frames(path: str | Path) -> int:
    """Number of video frames of a file (demuxed packets of its first video stream, no decoding)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


class Benchmark(ABC):
    """A benchmark: prompts by global index, and real reference clips for FVD."""

    name: str = "benchmark"

    def __init__(
        self,
        clip: ClipSpec | Mapping[str, Any] | None = None,
        real_clips: int | None = None,
        seed: int = 0,
        real_sampling: str = "permutation",
    ):
        self.clip = clip if isinstance(clip, ClipSpec) else ClipSpec(**dict(clip or {}))
        self.real_clips = None if real_clips is None else int(real_clips)
        self.seed = int(seed)
        if real_sampling not in REAL_SAMPLINGS:
            raise ValueError(f"real_sampling must be one of {REAL_SAMPLINGS}, got {real_sampling!r}")
        if real_sampling == "all_windows" and self.real_clips is None:
            raise ValueError("real_sampling=all_windows needs a number of real_clips (TATS: 2048)")
        self.real_sampling = real_sampling
        self._real_order: np.ndarray | None = None
        self._frame_counts: dict[Path, int] = {}
        self._windows: list[tuple[Path, int]] | None = None
        self._long_sorted: list[Path] | None = None

    @abstractmethod
    def prompts(self) -> list[PromptItem]:
        """All samples to generate, ordered by global index 0..N-1."""

    @abstractmethod
    def reference_videos(self) -> list[Path]:
        """Real videos the FVD reference clips are cut from (fixed order)."""

    @abstractmethod
    def protocol(self) -> dict[str, Any]:
        """Every protocol choice of this benchmark, for the report."""

    def num_real_clips(self) -> int:
        """Number of real reference clips (``real_clips``, or one per reference video)."""
        if self.real_sampling == "first_sorted":
            return len(self._first_sorted_videos())
        return len(self.reference_videos()) if self.real_clips is None else self.real_clips

    def _span(self) -> int:
        return (self.clip.frames - 1) * self.clip.stride + 1

    def _frames_of(self, path: Path) -> int:
        if path not in self._frame_counts:
            self._frame_counts[path] = count_frames(path)
        return self._frame_counts[path]

    def _first_sorted_videos(self) -> list[Path]:
        """StyleGAN-V: the first ``real_clips`` videos (sorted paths) with at least ``span`` frames."""
        if self._long_sorted is None:
            wanted = self.real_clips if self.real_clips is not None else math.inf
            out: list[Path] = []
            for path in sorted(self.reference_videos(), key=str):
                if len(out) >= wanted:
                    break
                if self._frames_of(path) >= self._span():
                    out.append(path)
            if not out:
                raise RuntimeError(f"{self.name}: no reference video has {self._span()} frames")
            self._long_sorted = out
        return self._long_sorted

    def _tats_windows(self) -> list[tuple[Path, int]]:
        """TATS: ``real_clips`` (video, start) windows drawn without replacement from all windows."""
        if self._windows is None:
            videos = self.reference_videos()
            per_video = np.array([max(self._frames_of(p) - self._span() + 1, 0) for p in videos], dtype=np.int64)
            total = int(per_video.sum())
            if total < int(self.real_clips):  # type: ignore[arg-type]
                raise RuntimeError(
                    f"{self.name}: {self.real_clips} real clips asked, only {total} windows of "
                    f"{self._span()} frames exist"
                )
            chosen = np.random.default_rng([self.seed, 2]).choice(total, size=int(self.real_clips), replace=False)  # type: ignore[arg-type]
            ends = np.cumsum(per_video)
            video_idx = np.searchsorted(ends, chosen, side="right")
            starts = chosen - (ends[video_idx] - per_video[video_idx])
            self._windows = [(videos[int(v)], int(s)) for v, s in zip(video_idx, starts)]
        return self._windows

    def _real_video_for(self, clip_index: int) -> Path:
        videos = self.reference_videos()
        if not videos:
            raise RuntimeError(f"{self.name}: no reference videos found")
        if self._real_order is None:
            # Fixed order when taking every video once; otherwise a seeded permutation, cycled.
            n = len(videos)
            self._real_order = (
                np.arange(n) if self.real_clips is None else np.random.default_rng([self.seed, 1]).permutation(n)
            )
        return videos[int(self._real_order[clip_index % len(videos)])]

    def real_clip(self, clip_index: int) -> torch.Tensor:
        """Real reference clip ``clip_index``: float ``3 x T x H x W`` in [-1, 1]."""
        if not 0 <= clip_index < self.num_real_clips():
            raise IndexError(f"real clip {clip_index} out of range (0..{self.num_real_clips() - 1})")
        span = self._span()
        if self.real_sampling == "all_windows":
            path, start = self._tats_windows()[clip_index]
            return cut_clip(decode_video(path, max_frames=start + span).frames, self.clip, clip_index, start=start)
        if self.real_sampling == "first_sorted":
            path = self._first_sorted_videos()[clip_index]
        else:
            path = self._real_video_for(clip_index)
        # Decoding everything is needed only for random / centre starts.
        max_frames = span if self.clip.start == "first" else None
        return cut_clip(decode_video(path, max_frames=max_frames).frames, self.clip, clip_index)

    def real_protocol(self) -> dict[str, Any]:
        """The choices that define the real reference statistics (the FVD cache key)."""
        return {
            "benchmark": self.name,
            "reference": self._reference_description(),
            "num_reference_videos": len(self.reference_videos()),
            "real_clips": self.num_real_clips(),
            "clip_selection": self._selection_description(),
            "clip": self.clip.describe(),
            "seed": self.seed,
            **({"real_sampling": self.real_sampling} if self.real_sampling != "permutation" else {}),
        }

    def _selection_description(self) -> str:
        if self.real_sampling == "all_windows":
            return (
                f"{self.real_clips} windows of {self._span()} consecutive frames drawn without replacement (seeded) "
                "from every stride-1 window of every reference video (TATS)"
            )
        if self.real_sampling == "first_sorted":
            return (
                f"the first {self.real_clips} reference videos in sorted path order with >= {self._span()} frames, "
                "one clip each at a seeded random offset (StyleGAN-V)"
            )
        return "every video once, in order" if self.real_clips is None else "seeded permutation of videos, cycled"

    @abstractmethod
    def _reference_description(self) -> str:
        """Which split the reference videos are."""


# Benchmark name (``conf/benchmark/<name>.yaml``) -> adapter class, imported on demand.
BENCHMARKS = {
    "ucf101": "evaluation.ucf101_benchmark.UCF101Benchmark",
    "msrvtt": "evaluation.msrvtt_benchmark.MSRVTTBenchmark",
    "toy": "evaluation.toy_benchmark.ToyBenchmark",
}


def benchmark_class(name: str) -> type[Benchmark]:
    """The adapter class registered as ``name`` in :data:`BENCHMARKS`."""
    import importlib

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; registered: {sorted(BENCHMARKS)}")
    module, _, cls = BENCHMARKS[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)
