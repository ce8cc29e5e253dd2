"""Tar shards in the video2dataset layout: writing them, and reading clips out of their samples.

Layout (what video2dataset writes for WebVid): ``{shard:05d}.tar`` files holding, per sample,
``KEY.mp4`` (the video bytes), ``KEY.txt`` (the caption) and ``KEY.json`` (url, caption, key, status
and the saved source columns), with ``KEY = f"{shard:05d}{index:04d}"``. Each shard gets a
``{shard:05d}_stats.json`` and the dataset a ``stats.json`` listing what was written and what was
skipped (with the reason).
"""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Union

import av
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from show1_lightning.data.frame_sampling import ClipTooShortError, FrameSelection, sample_frame_indices
from show1_lightning.data.video_io import VideoDecodeError, decode_video

__all__ = [
    "VideoShardWriter",
    "shard_key",
    "DecodedClip",
    "decode_sampled_clip",
    "resize_center_crop",
    "sample_caption",
    "sample_metadata",
    "read_shard_samples",
    "expand_shard_spec",
]


def shard_key(shard: int, index: int) -> str:
    """The video2dataset sample key: 5-digit shard number + 4-digit index inside the shard."""
    if not (0 <= shard < 100_000 and 0 <= index < 10_000):
        raise ValueError(f"shard {shard} / index {index} out of range for a 5+4 digit key")
    return f"{shard:05d}{index:04d}"


class VideoShardWriter:
    """Write captioned videos into ``{shard:05d}.tar`` shards of ``samples_per_shard`` samples.

    Shards are written under a temporary name and renamed when complete, so a killed job never leaves
    a half-written tar that looks finished. Call :meth:`skip` for inputs that could not be used; they
    are listed with their reason in the stats files. Use as a context manager, or call :meth:`close`.

    Example::

        with VideoShardWriter("out/", samples_per_shard=64) as w:
            w.write(mp4_bytes, "a red circle moving left", {"url": "..."})
            w.skip("video123", "missing file")
    """

    def __init__(self, out_dir: Union[str, Path], samples_per_shard: int = 1000, start_shard: int = 0) -> None:
        if samples_per_shard < 1 or samples_per_shard > 10_000:
            raise ValueError(f"samples_per_shard must be in [1, 10000], got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shard = start_shard
        self.index = 0
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._shard_written = 0
        self._shard_skipped: list[dict[str, str]] = []
        self._shard_start = 0.0
        self.written = 0
        self.skipped: list[dict[str, str]] = []
        self.shards: list[str] = []
        self._closed = False
        self._t0 = time.time()

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "VideoShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        self._tmp_path = self.out_dir / f"{self.shard:05d}.tar.tmp"
        self._tar = wds.TarWriter(str(self._tmp_path))
        self._shard_written = 0
        self._shard_start = time.time()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.out_dir / f"{self.shard:05d}.tar"
        os.replace(self._tmp_path, final)
        self.shards.append(final.name)
        stats = {
            "shard": f"{self.shard:05d}",
            "count": self._shard_written + len(self._shard_skipped),
            "successes": self._shard_written,
            "failed": len(self._shard_skipped),
            "failures": self._shard_skipped,
            "start_time": self._shard_start,
            "end_time": time.time(),
        }
        _write_json(self.out_dir / f"{self.shard:05d}_stats.json", stats)
        self._tar = None
        self._shard_skipped = []
        self.shard += 1
        self.index = 0

    def write(self, video: bytes, caption: str, meta: dict[str, Any] | None = None) -> str:
        """Add one sample; returns its key. ``meta`` holds extra columns saved in ``KEY.json``."""
        if self._closed:
            raise RuntimeError("writer is closed")
        if not isinstance(video, (bytes, bytearray)) or len(video) == 0:
            raise ValueError("video must be non-empty bytes")
        if self._tar is None:
            self._open_shard()
        key = shard_key(self.shard, self.index)
        record = dict(meta or {})
        record.update({"key": key, "caption": caption, "status": "success"})
        record.setdefault("url", None)
        self._tar.write(
            {"__key__": key, "mp4": bytes(video), "txt": caption, "json": json.dumps(record).encode("utf-8")}
        )
        self.index += 1
        self._shard_written += 1
        self.written += 1
        if self.index >= self.samples_per_shard:
            self._finish_shard()
        return key

    def skip(self, source_id: str, reason: str) -> None:
        """Record an input that was not written (missing file, undecodable, too short, ...)."""
        entry = {"key": str(source_id), "reason": str(reason)}
        self.skipped.append(entry)
        self._shard_skipped.append(entry)

    def stats(self) -> dict[str, Any]:
        """Dataset-level counts: written, skipped (total, per reason, and each skipped input)."""
        return {
            "written": self.written,
            "skipped": len(self.skipped),
            "skip_reasons": dict(Counter(_reason_class(s["reason"]) for s in self.skipped)),
            "skipped_samples": self.skipped,
            "samples_per_shard": self.samples_per_shard,
            "shards": self.shards,
            "seconds": round(time.time() - self._t0, 3),
        }

    def close(self) -> dict[str, Any]:
        """Finish the open shard and write ``stats.json``; returns the stats. Idempotent."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            elif self._shard_skipped:
                # Skips after the last full shard: keep them in the dataset stats only.
                self._shard_skipped = []
            _write_json(self.out_dir / "stats.json", self.stats())
            self._closed = True
        return self.stats()


def _reason_class(reason: str) -> str:
    """The reason's category: the text before the first ':' (details follow it)."""
    return reason.split(":", 1)[0].strip()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def expand_shard_spec(spec: Union[str, Path, list, tuple]) -> list[str]:
    """Shard paths from a brace pattern (``dir/{00000..00007}.tar``), a glob, one path or a list."""
    import glob as _glob

    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(expand_shard_spec(s))
        return out
    spec = str(spec)
    if "{" in spec:
        return list(wds.shardlists.expand_urls(spec))
    if any(c in spec for c in "*?["):
        found = sorted(_glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no shard matches the glob {spec!r}")
        return found
    return [spec]


def sample_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw webdataset sample (``txt``, else ``json['caption']``, else '')."""
    txt = sample.get("txt")
    if txt is not None:
        return txt.decode("utf-8") if isinstance(txt, (bytes, bytearray)) else str(txt)
    meta = sample_metadata(sample)
    return str(meta.get("caption") or "")


def sample_metadata(sample: dict[str, Any]) -> dict[str, Any]:
    """The parsed ``json`` member of a raw sample ({} when absent or unreadable)."""
    raw = sample.get("json")
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}


def read_shard_samples(path: Union[str, Path]) -> list[dict[str, Any]]:
    """All raw samples (dicts of bytes, with ``__key__``) of one tar shard, in file order."""
    pipe = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    return list(pipe)


class DecodedClip:
    """A sampled clip: uint8 frames ``T x H x W x 3``, the stride used and the source fps."""

    __slots__ = ("frames", "stride", "source_fps", "indices")

    def __init__(self, frames: np.ndarray, stride: int, source_fps: float, indices: list[int]) -> None:
        self.frames = frames
        self.stride = stride
        self.source_fps = source_fps
        self.indices = indices


def decode_sampled_clip(
    data: bytes,
    num_frames: int,
    target_fps: float | None,
    rng: random.Random | None = None,
    start: int | None = None,
    fixed_stride: int = 1,
) -> DecodedClip:
    """Decode only the frames a training clip needs from encoded video bytes.

    The frame count is read from the container; frames are decoded up to the last selected one and
    only the selected ones are converted to RGB. When the container does not state its frame count,
    the whole video is decoded first.

    Raises:
        VideoDecodeError: corrupt or truncated video (fewer decodable frames than the container says).
        ClipTooShortError: the video is too short for ``num_frames`` at the fps-derived stride.
    """
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # PyAV raises InvalidDataError, ValueError, ... on garbage
        raise VideoDecodeError(f"{type(exc).__name__}: {exc}") from exc
    try:
        if not container.streams.video:
            raise VideoDecodeError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 25.0
        total = int(stream.frames or 0)
        if total <= 0:
            container.close()
            full = decode_video(data)
            sel = sample_frame_indices(full.num_frames, num_frames, full.fps, target_fps, rng, start, fixed_stride)
            return DecodedClip(full.frames[sel.indices], sel.stride, full.fps, sel.indices)
        sel: FrameSelection = sample_frame_indices(total, num_frames, fps, target_fps, rng, start, fixed_stride)
        wanted = set(sel.indices)
        frames: list[np.ndarray] = []
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if i >= sel.last_index:
                    break
        except Exception as exc:  # damage in the middle of the stream
            raise VideoDecodeError(f"truncated or corrupt after {len(frames)} frames: {type(exc).__name__}: {exc}") from exc
        if len(frames) < num_frames:
            raise VideoDecodeError(
                f"truncated: container states {total} frames, decoded only up to {len(frames)} of the selected ones"
            )
        return DecodedClip(np.stack(frames), sel.stride, fps, sel.indices)
    finally:
        container.close()


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (antialiased bilinear) so the clip covers ``height x width``, then centre-crop.

    Args:
        video: float ``C x T x H x W`` (any range; [-1, 1] inside the framework).
    Returns:
        float ``C x T x height x width``, clamped to the input's range when it is [-1, 1].
    """
    c, t, h, w = video.shape
    if (h, w) == (height, width):
        return video
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = video.permute(1, 0, 2, 3)  # T x C x H x W: frames as the batch
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=(nh < h or nw < w))
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.permute(1, 0, 2, 3).clamp(-1.0, 1.0).contiguous()


# Re-exported so that callers catching sample errors need one import.
SampleError = (VideoDecodeError, ClipTooShortError)
