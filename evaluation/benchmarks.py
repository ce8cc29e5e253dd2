"""Zero-shot text-to-video benchmarks: UCF-101 and MSR-VTT adapters.

A benchmark supplies (1) the ordered list of prompts to generate, each with a global index, and
(2) real reference clips for FVD, cut by a :class:`ClipSpec`. Every choice (split, sample count,
template, caption rule, how clips are cut) is a constructor argument and is returned by
:meth:`Benchmark.protocol` so that it ends up in the report.

Layouts read:

* UCF-101 (official): ``<root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` and
  ``<root>/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, testlist0N.txt}``.
* MSR-VTT: ``<root>/<video_dir>/video7010.mp4 ...`` and the annotation json in the
  ``MSRVTT_data.json`` layout: ``{"videos": [{"video_id", "split", ...}],
  "sentences": [{"video_id", "caption", ...}]}``; the test split is ``split == "test"`` (2,990 videos).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from show1_lightning.data.video_io import decode_video, to_float_video

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
        video = resize_cover_crop(video, spec.resolution)
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


def count_frames(path: str | Path) -> int:
    """Number of video frames of a file (demuxed packets of its first video stream, no decoding)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def resize_cover_crop(video: torch.Tensor, resolution: Sequence[int]) -> torch.Tensor:
    """Resize ``C x T x H x W`` (bilinear, antialias) to cover ``resolution`` and centre crop to it."""
    out_h, out_w = int(resolution[0]), int(resolution[1])
    h, w = video.shape[-2:]
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    x = video.transpose(0, 1)  # T x C x H x W
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[..., top : top + out_h, left : left + out_w].clamp(-1, 1)
    return x.transpose(0, 1).contiguous()


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


def camel_to_words(name: str) -> str:
    """``ApplyEyeMakeup`` -> ``apply eye makeup``; ``YoYo`` -> ``yo yo``."""
    parts = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name)
    return " ".join(p.lower() for p in parts) if parts else name.lower()


def proportional_counts(weights: Sequence[int], total: int) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights`` (largest remainder; ties -> lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or w.sum() <= 0:
        raise ValueError("need a non-negative total and positive weights")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:remainder]:
        counts[i] += 1
    return counts


class UCF101Benchmark(Benchmark):
    """UCF-101 zero-shot: class-name prompts drawn with the train split's class distribution.

    Args:
        root: folder holding ``UCF-101/`` and ``ucfTrainTestlist/``.
        num_samples: number of generated samples (Make-A-Video: 10,000; TGANv2: 2,048).
        split: official split number 1, 2 or 3 (``trainlist0N.txt`` / ``testlist0N.txt``).
        template: prompt template; ``{words}`` is the class name in lower-case words, ``{name}`` the
            raw class name.
        class_prompts: optional per-class sentences ``{ClassName: sentence}`` overriding the template.
        sampling: ``"proportional"`` (exact quotas by largest remainder, then a seeded shuffle),
            ``"multinomial"`` (seeded i.i.d. draws) or ``"uniform"`` (equal quotas per class, largest
            remainder, seeded shuffle: TATS's class-conditional sampling gives every class the same
            number of samples, ``scripts/sample_vqgan_transformer_short_videos.py:69-81``).
        real_split: ``"train"``, ``"test"`` or ``"all"``: which videos the FVD reference clips come from.
        real_clips: number of reference clips (None: one per video of ``real_split``).
        clip: how clips are cut (:class:`ClipSpec` or its fields).
        seed: seed of the prompt draw and of the reference clip choice.
        real_sampling: which real clips, one of :data:`REAL_SAMPLINGS`.
    """

    name = "ucf101"

    def __init__(
        self,
        root: str | Path,
        num_samples: int = 10000,
        split: int = 1,
        template: str = "{words}",
        class_prompts: Mapping[str, str] | None = None,
        sampling: str = "proportional",
        real_split: str = "train",
        real_clips: int | None = None,
        clip: ClipSpec | Mapping[str, Any] | None = None,
        seed: int = 0,
        real_sampling: str = "permutation",
    ) -> None:
        super().__init__(clip=clip, real_clips=real_clips, seed=seed, real_sampling=real_sampling)
        self.root = Path(root)
        self.video_root = self.root / "UCF-101"
        self.list_root = self.root / "ucfTrainTestlist"
        for p in (self.video_root, self.list_root):
            if not p.is_dir():
                raise FileNotFoundError(f"UCF-101: expected folder {p} (official layout, see docs/evaluation.md)")
        if split not in (1, 2, 3):
            raise ValueError(f"UCF-101 split must be 1, 2 or 3, got {split}")
        if sampling not in ("proportional", "multinomial", "uniform"):
            raise ValueError(f"sampling must be 'proportional', 'multinomial' or 'uniform', got {sampling!r}")
        if real_split not in ("train", "test", "all"):
            raise ValueError(f"real_split must be 'train', 'test' or 'all', got {real_split!r}")
        if "{words}" not in template and "{name}" not in template:
            raise ValueError(f"template must contain {{words}} or {{name}}: {template!r}")
        self.num_samples = int(num_samples)
        self.split = int(split)
        self.template = template
        self.class_prompts = dict(class_prompts or {})
        self.sampling = sampling
        self.real_split = real_split
        self.classes = self._read_classes()
        unknown = set(self.class_prompts) - set(self.classes)
        if unknown:
            raise ValueError(f"class_prompts names unknown classes: {sorted(unknown)}")
        self.train_list = self._read_list(f"trainlist{self.split:02d}.txt")
        self.test_list = self._read_list(f"testlist{self.split:02d}.txt")
        self._prompts: list[PromptItem] | None = None
        self._reference: list[Path] | None = None

    def _read_classes(self) -> list[str]:
        path = self.list_root / "classInd.txt"
        if not path.is_file():
            raise FileNotFoundError(f"UCF-101: {path} not found")
        entries = []
        for line in path.read_text().splitlines():
            if line.strip():
                idx, name = line.split()
                entries.append((int(idx), name))
        entries.sort()
        if [i for i, _ in entries] != list(range(1, len(entries) + 1)):
            raise ValueError(f"{path}: class indices must be 1..K")
        return [n for _, n in entries]

    def _read_list(self, filename: str) -> list[str]:
        """Relative video paths (``Class/v_Class_gXX_cYY.avi``) of a split list."""
        path = self.list_root / filename
        if not path.is_file():
            raise FileNotFoundError(f"UCF-101: {path} not found")
        out = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if cls not in self.classes:
                raise ValueError(f"{path}: unknown class {cls!r} in line {line!r}")
            out.append(rel)
        return out

    def class_prompt(self, cls: str) -> str:
        """The prompt sentence of one class."""
        if cls in self.class_prompts:
            return self.class_prompts[cls]
        return self.template.format(words=camel_to_words(cls), name=cls)

    def class_counts(self) -> dict[str, int]:
        """Number of train-split videos per class."""
        counts = {c: 0 for c in self.classes}
        for rel in self.train_list:
            counts[rel.split("/")[0]] += 1
        return counts

    def prompts(self) -> list[PromptItem]:
        """``num_samples`` class prompts following the train split's class distribution."""
        if self._prompts is None:
            counts = np.array([self.class_counts()[c] for c in self.classes])
            rng = np.random.default_rng([self.seed, 0])
            if self.sampling in ("proportional", "uniform"):
                weights = counts if self.sampling == "proportional" else np.ones_like(counts)
                labels = np.repeat(np.arange(len(self.classes)), proportional_counts(weights, self.num_samples))
                labels = rng.permutation(labels)
            else:
                labels = rng.choice(len(self.classes), size=self.num_samples, p=counts / counts.sum())
            self._prompts = [
                PromptItem(i, self.class_prompt(self.classes[k]), self.classes[k])
                for i, k in enumerate(labels.tolist())
            ]
        return self._prompts

    def reference_videos(self) -> list[Path]:
        if self._reference is None:
            rels = {"train": self.train_list, "test": self.test_list, "all": self.train_list + self.test_list}[
                self.real_split
            ]
            paths = [self.video_root / r for r in rels]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"UCF-101: {len(missing)} listed videos missing, e.g. {missing[0]}")
            self._reference = paths
        return self._reference

    def _reference_description(self) -> str:
        return f"UCF-101 split {self.split} {self.real_split} list"

    def protocol(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "num_samples": self.num_samples,
            "num_classes": len(self.classes),
            "split": self.split,
            "prompt_distribution": (
                f"class frequencies of trainlist{self.split:02d}.txt ({len(self.train_list)} videos)"
                if self.sampling != "uniform"
                else "every class equally (TATS)"
            ),
            "sampling": self.sampling,
            "template": self.template,
            "class_prompt_overrides": self.class_prompts,
            "seed": self.seed,
            "real": self.real_protocol(),
        }


class MSRVTTBenchmark(Benchmark):
    """MSR-VTT zero-shot: captions of the test split videos.

    Args:
        root: dataset folder.
        annotation: annotation json path, relative to ``root`` (``MSRVTT_data.json`` layout).
        video_dir: folder of ``<video_id>.mp4`` files, relative to ``root``.
        split: annotation split to use (``"test"``: 2,990 videos).
        captions: ``"one"`` (one caption per video, chosen by a seeded rule) or ``"all"``.
        expected_videos: the split's expected video count (2990 for the test split); None skips
            the check.
        real_clips: number of reference clips (None: one per video of the split).
        clip: how clips are cut.
        seed: seed of the caption choice and of the reference clip choice.
        real_sampling: which real clips, one of :data:`REAL_SAMPLINGS`.
    """

    name = "msrvtt"

    def __init__(
        self,
        root: str | Path,
        annotation: str = "MSRVTT_data.json",
        video_dir: str = "videos/all",
        split: str = "test",
        captions: str = "one",
        expected_videos: int | None = 2990,
        real_clips: int | None = None,
        clip: ClipSpec | Mapping[str, Any] | None = None,
        seed: int = 0,
        real_sampling: str = "permutation",
    ) -> None:
        super().__init__(clip=clip, real_clips=real_clips, seed=seed, real_sampling=real_sampling)
        if captions not in ("one", "all"):
            raise ValueError(f"captions must be 'one' or 'all', got {captions!r}")
        self.root = Path(root)
        self.annotation = self.root / annotation
        self.video_dir = self.root / video_dir
        if not self.annotation.is_file():
            raise FileNotFoundError(f"MSR-VTT annotation not found at {self.annotation}")
        if not self.video_dir.is_dir():
            raise FileNotFoundError(f"MSR-VTT video folder not found at {self.video_dir}")
        self.split = split
        self.captions = captions
        data = json.loads(self.annotation.read_text())
        if not isinstance(data, dict) or "videos" not in data or "sentences" not in data:
            raise ValueError(f"{self.annotation}: expected a json object with 'videos' and 'sentences'")
        ids = [v["video_id"] for v in data["videos"] if v.get("split") == split]
        if not ids:
            raise ValueError(f"{self.annotation}: no videos with split {split!r}")
        self.video_ids = sorted(set(ids), key=_natural_key)
        if expected_videos is not None and len(self.video_ids) != int(expected_videos):
            raise ValueError(f"MSR-VTT {split} split has {len(self.video_ids)} videos, expected {expected_videos}")
        self.expected_videos = expected_videos
        wanted = set(self.video_ids)
        self.video_captions: dict[str, list[str]] = {v: [] for v in self.video_ids}
        for s in data["sentences"]:
            if s["video_id"] in wanted:
                self.video_captions[s["video_id"]].append(str(s["caption"]).strip())
        empty = [v for v, c in self.video_captions.items() if not c]
        if empty:
            raise ValueError(f"{self.annotation}: {len(empty)} {split} videos have no caption, e.g. {empty[0]}")
        self._prompts: list[PromptItem] | None = None
        self._reference: list[Path] | None = None

    def chosen_caption(self, video_id: str) -> int:
        """Index of the caption used for ``video_id`` when ``captions == "one"`` (seeded per video)."""
        rng = np.random.default_rng([self.seed, zlib.crc32(video_id.encode())])
        return int(rng.integers(0, len(self.video_captions[video_id])))

    def prompts(self) -> list[PromptItem]:
        """One prompt per test video (``"one"``) or per caption (``"all"``), videos in natural order."""
        if self._prompts is None:
            items: list[PromptItem] = []
            for vid in self.video_ids:
                caps = self.video_captions[vid]
                chosen = [caps[self.chosen_caption(vid)]] if self.captions == "one" else caps
                for c in chosen:
                    items.append(PromptItem(len(items), c, vid))
            self._prompts = items
        return self._prompts

    def reference_videos(self) -> list[Path]:
        if self._reference is None:
            paths = [self.video_dir / f"{v}.mp4" for v in self.video_ids]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"MSR-VTT: {len(missing)} {self.split} videos missing, e.g. {missing[0]}")
            self._reference = paths
        return self._reference

    def _reference_description(self) -> str:
        return f"MSR-VTT {self.split} split videos"

    def protocol(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "split": self.split,
            "num_videos": len(self.video_ids),
            "num_samples": len(self.prompts()),
            "captions": self.captions,
            "caption_rule": (
                "one caption per video: index = numpy default_rng([seed, crc32(video_id)]).integers(n_captions)"
                if self.captions == "one"
                else "every caption of every video"
            ),
            "annotation": self.annotation.name,
            "seed": self.seed,
            "real": self.real_protocol(),
        }


def _natural_key(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))
