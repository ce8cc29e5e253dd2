"""Tar shards in the video2dataset layout: writing them, and reading clips out of their samples.

Layout (what video2dataset writes for WebVid): ``{shard:05d}.tar`` files holding, per sample,
``KEY.mp4`` (the video bytes), ``KEY.txt`` (the caption) and ``KEY.json`` (url, caption, key, status
and the saved source columns), with ``KEY = f"{shard:05d}{index:04d}"``. Each shard gets a
``{shard:05d}_stats.json`` and the dataset a ``stats.json`` listing what was written and what was
skipped (with the reason) and its ``status``: "in_progress" while a job writes (or after it was killed),
"aborted" after an exception, "complete" only when every input was consumed.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
import webdataset as wds
from omegaconf import OmegaConf

from show1_lightning.data.frame_sampling import FrameSelection, sample_frame_indices
from show1_lightning.data.video_io import VideoDecodeError
from show1_lightning.fileio import atomic_write_json
from show1_lightning.video_ops import resize_cover_crop

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


_SHARD_NAME = re.compile(r"^(\d{5})\.tar$")


class VideoShardWriter:
    """Write captioned videos into ``{shard:05d}.tar`` shards of ``samples_per_shard`` samples.

    Shards are written under a temporary name and renamed when complete, so a killed job never leaves
    a half-written tar that looks finished. Call :meth:`skip` for inputs that could not be used; they
    are listed with their reason in the stats files. Use as a context manager, or call :meth:`close`.

    ``stats.json`` says "in_progress" from the start, "aborted" when the ``with`` block ends in an
    exception (the open shard is discarded, not finished) and "complete" only after :meth:`close`. A
    folder that already holds shards or a ``stats.json`` is refused unless ``resume=True``: then the
    finished shards (a ``.tar`` with its ``_stats.json``, contiguous from ``start_shard``) are kept,
    anything after them is removed, and :attr:`resume_position` is the caller's input position stored
    with the last finished shard (set :attr:`position` before each write/skip, e.g. rows consumed).

    Example::

        with VideoShardWriter("out/", samples_per_shard=64) as w:
            w.write(mp4_bytes, "a red circle moving left", {"url": "..."})
            w.skip("video123", "missing file")
    """

    def __init__(
        self, out_dir: str | Path, samples_per_shard: int = 1000, start_shard: int = 0, resume: bool = False
    ) -> None:
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
        self.position = 0  # the caller's input position (e.g. CSV rows consumed), saved with each shard
        self.resume_position = 0
        self._closed = False
        self._t0 = time.time()
        existing = sorted(
            p.name for p in self.out_dir.iterdir() if _SHARD_NAME.match(p.name) or p.name == "stats.json"
        )
        if resume:
            self._resume(start_shard)
        elif existing:
            raise FileExistsError(
                f"{self.out_dir} already holds a dataset "
                f"({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
                "resume it (resume=True, --resume) or write to an empty folder"
            )
        self._write_dataset_stats("in_progress")

    def _resume(self, start_shard: int) -> None:
        """Keep the finished shards from ``start_shard`` on, drop everything after the first gap."""
        stats_path = self.out_dir / "stats.json"
        if stats_path.exists():
            try:
                old = json.loads(stats_path.read_text())
            except ValueError:
                old = {}
            if old.get("status") == "complete":
                raise FileExistsError(
                    f"{self.out_dir} holds a complete dataset (stats.json status 'complete'); nothing to resume"
                )
        shard = start_shard
        while True:
            tar, st = self.out_dir / f"{shard:05d}.tar", self.out_dir / f"{shard:05d}_stats.json"
            try:
                info = json.loads(st.read_text()) if tar.exists() else None
            except (OSError, ValueError):
                info = None
            if not info or "input_end" not in info:
                break
            self.shards.append(tar.name)
            self.written += int(info["successes"])
            self.skipped.extend(info.get("failures", []))
            self.resume_position = int(info["input_end"])
            shard += 1
        self.shard = shard
        self.position = self.resume_position
        for p in self.out_dir.iterdir():  # partial shards and anything after the last finished one
            m = re.match(r"^(\d{5})(\.tar|\.tar\.tmp|_stats\.json)$", p.name)
            if (m and int(m.group(1)) >= shard) or p.name.endswith(".tmp"):
                p.unlink()

    def _write_dataset_stats(self, status: str, error: str | None = None) -> dict[str, Any]:
        stats = {"status": status, **self.stats()}
        if error is not None:
            stats["error"] = error
        atomic_write_json(self.out_dir / "stats.json", stats)
        return stats

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> VideoShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(f"{exc_type.__name__}: {exc}")

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
        stats = {
            "shard": f"{self.shard:05d}",
            "count": self._shard_written + len(self._shard_skipped),
            "successes": self._shard_written,
            "failed": len(self._shard_skipped),
            "failures": self._shard_skipped,
            "input_end": self.position,
            "start_time": self._shard_start,
            "end_time": time.time(),
        }
        # Stats first, then the rename: a shard counts as finished (also for resume) only with both.
        atomic_write_json(self.out_dir / f"{self.shard:05d}_stats.json", stats)
        os.replace(self._tmp_path, final)
        self.shards.append(final.name)
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
        """Finish the open shard and write ``stats.json`` (status "complete"); returns the stats. Idempotent."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            elif self._shard_skipped:
                # Skips after the last full shard: keep them in the dataset stats only.
                self._shard_skipped = []
            self._write_dataset_stats("complete")
            self._closed = True
        return self.stats()

    def abort(self, error: str) -> dict[str, Any]:
        """Stop without finishing the open shard (its temporary file is removed) and mark ``stats.json``
        "aborted" with ``error``; a later ``resume=True`` writer continues after the last finished shard."""
        if not self._closed:
            if self._tar is not None:
                try:
                    self._tar.close()
                finally:
                    self._tar = None
                    if self._tmp_path is not None and self._tmp_path.exists():
                        self._tmp_path.unlink()
            self._write_dataset_stats("aborted", error)
            self._closed = True
        return self.stats()


def _reason_class(reason: str) -> str:
    """The reason's category: the text before the first ':' (details follow it)."""
    return reason.split(":", 1)[0].strip()


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def expand_shard_spec(spec: str | Path | Iterable) -> list[str]:
    """Shard paths from a brace pattern (``dir/{00000..00007}.tar``), a glob, one path or a list of them.

    A list may be any sequence, including the OmegaConf ``ListConfig`` that Hydra makes of
    ``data.train_shards=[/d/00000.tar,/d/00001.tar]`` on the command line.
    """
    import glob as _glob

    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        if isinstance(spec, (Mapping, bytes)) or not isinstance(spec, Iterable):
            raise TypeError(
                f"a shard spec is a path, brace pattern, glob or a list of them, not {type(spec).__name__}: {spec!r}"
            )
        out: list[str] = []
        for s in spec:
            out.extend(expand_shard_spec(s))
        return out
    if "{" in spec:
        return list(wds.shardlists.expand_urls(spec))
    if any(c in spec for c in "*?["):
        found = sorted(_glob.glob(spec))
        if not found:
            raise FileNotFoundError(f"no shard matches the glob {spec!r}")
        return found
    return [spec]


def sample_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw webdataset sample (``txt``, else ``json['caption']``, else '').

    Raises:
        UnicodeDecodeError: the ``txt`` member is not valid UTF-8 (the datamodule skips and counts it).
    """
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


def read_shard_samples(path: str | Path) -> list[dict[str, Any]]:
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


def _check_size(width: int, height: int, max_pixels: int | None, min_side: int) -> None:
    if min_side and min(width, height) < min_side:
        raise VideoDecodeError(f"too small: {width}x{height} < min_side {min_side}", reason="too_small")
    if max_pixels and width * height > max_pixels:
        raise VideoDecodeError(
            f"too large: {width}x{height} = {width * height} pixels > max_source_pixels {max_pixels}",
            reason="too_large",
        )


def _stated_duration(container: Any, stream: Any) -> float | None:
    """Seconds the container header claims for the stream (None when it says nothing)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _count_frames(container: Any, stream: Any, fps: float, max_frames: int | None) -> int:
    """Frames of a stream whose container states no frame count: its packets, demuxed without decoding
    (no frame memory). A count well below what the stated duration implies is a truncated file."""
    n = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                n += 1
                if max_frames and n > max_frames:
                    raise VideoDecodeError(
                        f"too long: more than max_source_frames {max_frames} frames", reason="too_large"
                    )
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(
            f"truncated or corrupt container after {n} packets: {type(exc).__name__}: {exc}", reason="truncated"
        ) from exc
    duration = _stated_duration(container, stream)
    if duration and fps > 0:
        expected = duration * fps
        if n + max(2.0, 0.05 * expected) < expected:
            raise VideoDecodeError(
                f"truncated: the container states {duration:.2f}s (~{expected:.0f} frames at {fps:g} fps) "
                f"but holds {n} frames",
                reason="truncated",
            )
    return n


def _open_video(data: bytes) -> tuple[Any, Any, float]:
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # PyAV raises InvalidDataError, ValueError, ... on garbage
        raise VideoDecodeError(f"{type(exc).__name__}: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return container, stream, float(rate) if rate else 25.0


def decode_sampled_clip(
    data: bytes,
    num_frames: int,
    target_fps: float | None,
    rng: random.Random | None = None,
    start: int | None = None,
    fixed_stride: int = 1,
    *,
    max_pixels: int | None = None,
    max_frames: int | None = None,
    min_side: int = 0,
) -> DecodedClip:
    """Decode only the frames a training clip needs from encoded video bytes.

    The frame size is checked against ``min_side`` / ``max_pixels`` and the frame count against
    ``max_frames`` before any frame is decoded, so decode memory is bounded by
    ``num_frames x max_pixels x 3`` bytes whatever the file. The frame count is read from the container;
    when the container does not state it, the packets are counted without decoding (and a count well
    below the stated duration is reported as truncation). Frames are decoded up to the last selected one
    and only the selected ones are converted to RGB.

    Raises:
        VideoDecodeError: corrupt or truncated video, a frame size change inside the stream, or a video
            outside the size limits; ``reason`` says which ("decode", "truncated", "resolution_change",
            "too_large", "too_small").
        ClipTooShortError: the video is too short for ``num_frames`` at the fps-derived stride.
    """
    container, stream, fps = _open_video(data)
    try:
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width and height:
            _check_size(width, height, max_pixels, min_side)
        total = int(stream.frames or 0)
        counted = total <= 0
        if counted:
            total = _count_frames(container, stream, fps, max_frames)
            container.close()
            container, stream, fps = _open_video(data)
        elif max_frames and total > max_frames:
            raise VideoDecodeError(f"too long: {total} frames > max_source_frames {max_frames}", reason="too_large")
        sel: FrameSelection = sample_frame_indices(total, num_frames, fps, target_fps, rng, start, fixed_stride)
        wanted = set(sel.indices)
        frames: list[np.ndarray] = []
        size: tuple[int, int] | None = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                if size is None:
                    size = (frame.width, frame.height)
                    _check_size(frame.width, frame.height, max_pixels, min_side)
                elif (frame.width, frame.height) != size:
                    raise VideoDecodeError(
                        f"resolution change mid-stream: frame {i} is {frame.width}x{frame.height}, "
                        f"frame 0 was {size[0]}x{size[1]}",
                        reason="resolution_change",
                    )
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if i >= sel.last_index:
                    break
        except VideoDecodeError:
            raise
        except Exception as exc:  # damage in the middle of the stream
            raise VideoDecodeError(
                f"truncated or corrupt after {len(frames)} frames: {type(exc).__name__}: {exc}", reason="truncated"
            ) from exc
        if len(frames) < num_frames:
            source = "counted" if counted else "stated"
            raise VideoDecodeError(
                f"truncated: the container {source} {total} frames, decoded only {len(frames)} of the "
                f"{num_frames} selected ones",
                reason="truncated",
            )
        return DecodedClip(np.stack(frames), sel.stride, fps, sel.indices)
    finally:
        container.close()


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize float ``C x T x H x W`` to cover ``height x width`` and centre-crop: the one rule of
    :func:`show1_lightning.video_ops.resize_cover_crop` (training and evaluation preprocess alike)."""
    return resize_cover_crop(video, (height, width))
