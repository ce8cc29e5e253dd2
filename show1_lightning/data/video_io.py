"""Video decoding and encoding with PyAV, and the uint8 <-> [-1, 1] tensor conversions.

Inside the framework videos are float tensors ``C x T x H x W`` (or ``B x C x T x H x W``) in
[-1, 1]; uint8 ``T x H x W x C`` arrays exist only at the edges (decode, mp4 writing).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch


class VideoDecodeError(RuntimeError):
    """Raised when a video cannot be decoded (corrupt, truncated, empty or no video stream).

    ``reason`` names the kind of failure for skip accounting: "decode" (default), "truncated",
    "resolution_change", "too_large", "too_small".
    """

    def __init__(self, message: str, reason: str = "decode") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class DecodedVideo:
    """Frames of a decoded video, uint8 ``T x H x W x 3`` (RGB), and its frame rate.

    ``complete`` is False when decoding stopped at damage after some frames (``error`` says what); those
    frames are kept unless ``decode_video(strict=True)`` was asked.
    """

    frames: np.ndarray
    fps: float
    complete: bool = True
    error: str | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def decode_video(source: bytes | str | Path, max_frames: int | None = None, strict: bool = False) -> DecodedVideo:
    """Decode a video from bytes or a file path into RGB uint8 frames.

    Args:
        source: the encoded video (mp4, avi, ... anything FFmpeg reads) as bytes, or a path.
        max_frames: stop after this many frames (None: decode all).
        strict: raise (reason "truncated") when decoding fails after some frames instead of returning
            them with ``complete=False``.

    Raises:
        VideoDecodeError: on any decoding failure, or when no frame could be decoded; reason
            "resolution_change" when the frame size changes inside the stream.
    """
    stream_src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    frames: list[np.ndarray] = []
    error: str | None = None
    fps = 0.0
    try:
        with av.open(stream_src, mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            for frame in container.decode(stream):
                if frames and (frame.height, frame.width) != frames[0].shape[:2]:
                    raise VideoDecodeError(
                        f"resolution change mid-stream: frame {len(frames)} is {frame.width}x{frame.height}, "
                        f"frame 0 was {frames[0].shape[1]}x{frames[0].shape[0]}",
                        reason="resolution_change",
                    )
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoDecodeError:
        raise
    except Exception as exc:  # PyAV raises many error types (InvalidDataError, EOFError, ...)
        if not frames:
            raise VideoDecodeError(f"{type(exc).__name__}: {exc}") from exc
        # A truncated file: the frames decoded before the damage, flagged.
        error = f"truncated or corrupt after {len(frames)} frames: {type(exc).__name__}: {exc}"
        if strict:
            raise VideoDecodeError(error, reason="truncated") from exc
    if not frames:
        raise VideoDecodeError("no frames decoded")
    if fps <= 0:
        fps = 25.0
    return DecodedVideo(frames=np.stack(frames), fps=fps, complete=error is None, error=error)


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> bytes:
    """Encode uint8 ``T x H x W x 3`` RGB frames as an H.264 mp4 in memory.

    Odd widths/heights are padded by one pixel (yuv420p needs even sizes).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 T x H x W x 3 frames, got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    ph, pw = h + (h % 2), w + (w % 2)
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = pw, ph
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Write uint8 ``T x H x W x 3`` frames to an mp4 file (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_mp4(frames, fps))
    tmp.replace(path)
    return path


def to_float_video(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``T x H x W x C`` -> float32 ``C x T x H x W`` in [-1, 1]."""
    x = torch.as_tensor(frames)
    return x.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """float ``C x T x H x W`` in [-1, 1] -> uint8 ``T x H x W x C`` (clamped, rounded)."""
    if video.ndim != 4:
        raise ValueError(f"expected C x T x H x W, got shape {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()
