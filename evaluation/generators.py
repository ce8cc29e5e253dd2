"""The generator interface evaluation scores, and a generator serving a folder of finished videos.

Anything with ``name``, ``fps`` and ``generate(prompts, seeds)`` can be evaluated; the concrete
generator (a folder, a trained stage, the cascade) is built from config by ``hydra.utils.instantiate``
so that ``evaluation/`` never imports the training stages.

Folder layout (also what :mod:`evaluation.runner` writes, so an evaluation's output folder can be
scored again): ``<root>/000123.mp4`` for global sample index 123, and ``<root>/manifest.jsonl``
with one ``{"index", "prompt", "seed"}`` object per line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from show1_lightning.data.video_io import decode_video, to_float_video

MANIFEST_NAME = "manifest.jsonl"


@runtime_checkable
class VideoGenerator(Protocol):
    """Text-to-video generator as seen by evaluation.

    Attributes:
        name: short identifier written into reports.
        fps: frame rate of the generated videos (used when writing mp4 files).
    """

    name: str
    fps: float

    def generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Videos for ``prompts``, sample ``i`` seeded with ``seeds[i]``: float ``B x 3 x T x H x W`` in [-1, 1]."""
        ...


def video_filename(index: int) -> str:
    """File name of global sample ``index`` (``000123.mp4``)."""
    return f"{index:06d}.mp4"


def write_manifest(root: str | Path, entries: Iterable[dict[str, Any]]) -> Path:
    """Write ``manifest.jsonl`` (one ``{"index", "prompt", "seed"}`` per line) atomically."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for e in entries:
            f.write(json.dumps({"index": int(e["index"]), "prompt": e["prompt"], "seed": int(e["seed"])}) + "\n")
    tmp.replace(path)
    return path


def read_manifest(root: str | Path) -> list[dict[str, Any]]:
    """Read ``manifest.jsonl`` entries."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {root}: a video folder needs its prompts manifest")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FolderGenerator:
    """Serves already generated videos from a folder (``000123.mp4`` + ``manifest.jsonl``).

    A request ``(prompt, seed)`` is looked up by its seed in the manifest; the manifest's prompt
    must equal the requested one, so scoring a folder against the wrong benchmark or seed rule fails
    loudly instead of giving wrong numbers.

    Args:
        root: the folder.
        name: name in reports (default: ``folder:<root name>``).
        fps: frame rate to report (default: read from the first video served).
        num_frames: if set, videos are cut to their first ``num_frames`` frames (error if shorter).
    """

    def __init__(
        self, root: str | Path, name: str | None = None, fps: float | None = None, num_frames: int | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {self.root} does not exist")
        self.name = name or f"folder:{self.root.name}"
        self._fps = fps
        self.num_frames = num_frames
        self._by_seed: dict[int, dict[str, Any]] = {}
        for e in read_manifest(self.root):
            seed = int(e["seed"])
            if seed in self._by_seed:
                raise ValueError(f"{self.root / MANIFEST_NAME}: seed {seed} appears twice")
            self._by_seed[seed] = e

    @property
    def fps(self) -> float:
        """Frame rate (from the constructor, or read from the first video of the manifest)."""
        if self._fps is None:
            first = min(int(e["index"]) for e in self._by_seed.values()) if self._by_seed else None
            path = self.root / video_filename(first) if first is not None else None
            if path is None or not path.is_file():
                raise FileNotFoundError(f"FolderGenerator: cannot read the frame rate, {path} missing (set fps)")
            self._fps = decode_video(path, max_frames=1).fps
        return float(self._fps)

    def describe(self) -> dict[str, Any]:
        """Report entry."""
        return {"name": self.name, "type": "folder", "root": str(self.root.resolve()), "num_frames": self.num_frames}

    def load(self, index: int) -> torch.Tensor:
        """Video of global index ``index``: float ``3 x T x H x W`` in [-1, 1]."""
        path = self.root / video_filename(index)
        if not path.is_file():
            raise FileNotFoundError(f"FolderGenerator: video for sample {index} missing: {path}")
        decoded = decode_video(path)
        if self._fps is None:
            self._fps = decoded.fps
        frames = decoded.frames
        if self.num_frames is not None:
            if frames.shape[0] < self.num_frames:
                raise ValueError(f"{path} has {frames.shape[0]} frames, fewer than num_frames={self.num_frames}")
            frames = frames[: self.num_frames]
        return to_float_video(frames)

    def _entry(self, prompt: str, seed: int) -> dict[str, Any]:
        """The manifest entry of ``(prompt, seed)``; refuses a seed made for another prompt."""
        entry = self._by_seed.get(int(seed))
        if entry is None:
            raise KeyError(f"FolderGenerator: no video with seed {seed} in {self.root / MANIFEST_NAME}")
        if entry["prompt"] != prompt:
            raise ValueError(
                f"FolderGenerator: sample {entry['index']} (seed {seed}) was made for prompt "
                f"{entry['prompt']!r}, but {prompt!r} was requested"
            )
        return entry

    def source_file(self, prompt: str, seed: int) -> Path | None:
        """The stored file of ``(prompt, seed)`` when it can be copied as it is (no ``num_frames`` cut), else None:
        the evaluation copies it instead of decoding and encoding it again (a second lossy encode)."""
        if self.num_frames is not None:
            return None
        path = self.root / video_filename(int(self._entry(prompt, seed)["index"]))
        return path if path.is_file() else None

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """The stored videos of ``(prompt, seed)`` pairs, stacked ``B x 3 x T x H x W``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        videos = [self.load(int(self._entry(prompt, seed)["index"])) for prompt, seed in zip(prompts, seeds)]
        shapes = {tuple(v.shape) for v in videos}
        if len(shapes) > 1:
            raise ValueError(f"FolderGenerator: videos of different shapes in one batch: {sorted(shapes)}")
        return torch.stack(videos)
