"""MSR-VTT zero-shot text-to-video benchmark: one caption per test video, test-split real clips.

Layout read: ``<root>/<video_dir>/video7010.mp4 ...`` and the annotation json in the ``MSRVTT_data.json``
layout: ``{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id", "caption", ...}]}``; the test
split is ``split == "test"`` (2,990 videos). Shared machinery: :mod:`evaluation.benchmarks`.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.benchmarks import Benchmark, ClipSpec, PromptItem, existing_videos


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
            self._reference = existing_videos(paths, f"MSR-VTT {self.split} split")
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
