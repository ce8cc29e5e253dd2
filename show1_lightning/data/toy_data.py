"""The bundled toy dataset (coloured shapes moving over grey-ish textures) and its prompt-adherence score.

Each clip shows one saturated shape (circle, square or triangle, in a ``TOY_COLORS`` colour) moving
left, right, up or down over a low-saturation textured background (smooth noise, gradient or
stripes), captioned e.g. ``"a red circle moving left"``. Clips are 128x80 (W x H), 32 frames at
16 fps, written as mp4 through :class:`~show1_lightning.data.shards.VideoShardWriter`.

Because the background is never saturated, the colour a generated video shows can be read back
from its saturated pixels: :func:`color_adherence` is the fraction of videos whose dominant colour
is the colour their prompt names, and :func:`motion_adherence` the fraction whose saturated shape moves
in the direction their prompt names.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from show1_lightning.data.shards import VideoShardWriter
from show1_lightning.data.video_io import encode_mp4
from show1_lightning.fileio import DONE_MARKER, build_once

__all__ = [
    "TOY_COLORS",
    "TOY_SHAPES",
    "TOY_MOTIONS",
    "TOY_WIDTH",
    "TOY_HEIGHT",
    "TOY_FRAMES",
    "TOY_FPS",
    "GENERATOR_VERSION",
    "make_toy_clip",
    "toy_caption",
    "ensure_toy_dataset",
    "parse_toy_prompt",
    "dominant_color",
    "color_adherence",
    "motion_displacement",
    "displacement_direction",
    "motion_direction",
    "motion_adherence",
]

# Bump when the clips change: ensure_toy_dataset regenerates caches made by another version.
GENERATOR_VERSION = 4

# Six saturated colours with hues at least ~45 degrees apart (red 0, yellow ~50, green ~128,
# cyan ~183, blue ~228, magenta ~304).
TOY_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 200, 30),
    "green": (40, 190, 60),
    "cyan": (30, 190, 200),
    "blue": (50, 80, 230),
    "magenta": (210, 50, 200),
}
TOY_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TOY_MOTIONS: tuple[str, ...] = ("left", "right", "up", "down")
TOY_WIDTH, TOY_HEIGHT, TOY_FRAMES, TOY_FPS = 128, 80, 32, 16
# Std of a per-frame global brightness offset (0-255 scale), drawn independently for every frame. 0 since version 4:
# up to version 3 it was 2.0, and that unpredictable flicker was 78% of the linear blend's error on the frames an
# interpolation stage inserts, so no interpolator could show what it learned (docs/toy_loop.md).
TOY_FLICKER = 0.0
# Range of the shape's travel over a clip, as a fraction of the free extent along its motion axis.
TOY_TRAVEL = (0.35, 0.55)
# Range of the shape's radius, as a fraction of the frame's shorter side: large, so that the colour stays visible
# at the keyframe stage's 24x16.
TOY_RADIUS = (0.2, 0.275)

_MOTION_DIR = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_PROMPT_RE = re.compile(
    r"\b(?P<color>"
    + "|".join(TOY_COLORS)
    + r")\s+(?P<shape>"
    + "|".join(TOY_SHAPES)
    + r")\s+moving\s+(?P<motion>"
    + "|".join(TOY_MOTIONS)
    + r")\b",
    re.IGNORECASE,
)

# Pixel classification for the adherence score (HSV on [0, 1] RGB).
_SAT_MIN = 0.45  # background tints stay below ~0.2, shapes are above 0.8
_VAL_MIN = 0.25
_MIN_SATURATED_FRACTION = 0.002  # below this many saturated pixels: no dominant colour


def toy_caption(color: str, shape: str, motion: str) -> str:
    """The caption of a toy clip, e.g. ``"a red circle moving left"``."""
    return f"a {color} {shape} moving {motion}"


def parse_toy_prompt(prompt: str) -> dict[str, str | None]:
    """``{"color", "shape", "motion"}`` named in a toy prompt (None for each part not found)."""
    m = _PROMPT_RE.search(prompt)
    if m:
        return {k: m.group(k).lower() for k in ("color", "shape", "motion")}
    words = re.findall(r"[a-z]+", prompt.lower())
    return {
        "color": next((w for w in words if w in TOY_COLORS), None),
        "shape": next((w for w in words if w in TOY_SHAPES), None),
        "motion": next((w for w in words if w in TOY_MOTIONS), None),
    }


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A low-saturation textured background, float ``H x W x 3`` in [0, 255]."""
    kind = rng.integers(3)
    base = rng.uniform(90, 170)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # smooth noise: a coarse random grid, bilinearly upsampled
        gh, gw = int(rng.integers(3, 7)), int(rng.integers(4, 10))
        grid = rng.normal(0, 18, (gh, gw)).astype(np.float32)
        gy, gx = yy / (h - 1) * (gh - 1), xx / (w - 1) * (gw - 1)
        y0, x0 = np.floor(gy).astype(int).clip(0, gh - 2), np.floor(gx).astype(int).clip(0, gw - 2)
        fy, fx = gy - y0, gx - x0
        lum = (
            grid[y0, x0] * (1 - fy) * (1 - fx)
            + grid[y0 + 1, x0] * fy * (1 - fx)
            + grid[y0, x0 + 1] * (1 - fy) * fx
            + grid[y0 + 1, x0 + 1] * fy * fx
        )
    elif kind == 1:  # linear gradient in a random direction
        ang = rng.uniform(0, 2 * np.pi)
        proj = (xx - w / 2) * np.cos(ang) + (yy - h / 2) * np.sin(ang)
        lum = proj / (0.5 * np.hypot(h, w)) * rng.uniform(20, 45)
    else:  # soft stripes
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(0.25, 0.5) * w  # wide enough to stay a texture (not aliasing) at 1/4 scale
        proj = xx * np.cos(ang) + yy * np.sin(ang)
        lum = np.sin(2 * np.pi * proj / period) * rng.uniform(10, 25)
    tint = rng.uniform(-10, 10, 3)  # a slight colour cast keeps saturation low (< ~0.2)
    return np.clip(base + lum[..., None] + tint, 0, 255)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Soft (1-pixel antialiased) coverage mask in [0, 1] of a shape centred at (cy, cx)."""
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        sd = np.hypot(dx, dy) - r
    elif shape == "square":
        sd = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    elif shape == "triangle":  # upward isosceles: apex at cy - r, base at cy + 0.8 r, half-width r
        slope = 1.8  # height / half-width
        sd = np.maximum(dy - 0.8 * r, (np.abs(dx) - (dy + r) / slope) * slope / np.hypot(slope, 1.0))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {TOY_SHAPES}")
    return np.clip(0.5 - sd, 0.0, 1.0)


def make_toy_clip(
    color: str,
    shape: str,
    motion: str,
    seed: int | tuple[int, ...] = 0,
    num_frames: int = TOY_FRAMES,
    height: int = TOY_HEIGHT,
    width: int = TOY_WIDTH,
) -> np.ndarray:
    """Render one toy clip as uint8 ``T x H x W x 3`` frames (deterministic given the arguments)."""
    if color not in TOY_COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {list(TOY_COLORS)}")
    if motion not in _MOTION_DIR:
        raise ValueError(f"unknown motion {motion!r}; expected one of {TOY_MOTIONS}")
    rng = np.random.default_rng(seed)
    bg = _background(rng, height, width)
    r = rng.uniform(*TOY_RADIUS) * min(height, width)
    ddx, ddy = _MOTION_DIR[motion]
    extent = width if ddx else height
    dist = rng.uniform(*TOY_TRAVEL) * (extent - 2 * r - 4)  # travel along the motion axis
    margin = r + 2
    # Start so that start + travel stays inside the frame.
    if ddx:
        x0 = rng.uniform(margin + dist, width - margin) if ddx < 0 else rng.uniform(margin, width - margin - dist)
        y0 = rng.uniform(margin, height - margin)
    else:
        y0 = rng.uniform(margin + dist, height - margin) if ddy < 0 else rng.uniform(margin, height - margin - dist)
        x0 = rng.uniform(margin, width - margin)
    rgb = np.asarray(TOY_COLORS[color], np.float32) * rng.uniform(0.85, 1.0)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    jitter = rng.normal(0, TOY_FLICKER, num_frames).astype(np.float32)  # global flicker (drawn even at 0: same clips)
    pad = int(np.ceil(r)) + 2
    for t in range(num_frames):
        a = t / max(1, num_frames - 1)
        cx, cy = x0 + ddx * dist * a, y0 + ddy * dist * a
        frame = bg + jitter[t]
        # Only the shape's bounding box needs the mask (the shape always stays inside the frame).
        ya, yb = max(0, int(cy) - pad), min(height, int(cy) + pad + 1)
        xa, xb = max(0, int(cx) - pad), min(width, int(cx) + pad + 1)
        yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
        m = _shape_mask(shape, yy, xx, cy, cx, r)[..., None]
        frame[ya:yb, xa:xb] = frame[ya:yb, xa:xb] * (1 - m) + (rgb + jitter[t]) * m
        frames[t] = np.clip(frame, 0, 255).round().astype(np.uint8)
    return frames


def _clip_spec(index: int) -> tuple[str, str, str]:
    """(colour, shape, motion) of clip ``index``: cycles through all 72 combinations."""
    colors = list(TOY_COLORS)
    return (
        colors[index % len(colors)],
        TOY_SHAPES[(index // len(colors)) % len(TOY_SHAPES)],
        TOY_MOTIONS[(index // (len(colors) * len(TOY_SHAPES))) % len(TOY_MOTIONS)],
    )


def _encode_clips(split_id: int, indices: range) -> list[tuple[bytes, str, dict]]:
    """Render and encode the clips ``indices`` of a split: (mp4 bytes, caption, json columns)."""
    out = []
    for i in indices:
        color, shape, motion = _clip_spec(i)
        frames = make_toy_clip(color, shape, motion, seed=(GENERATOR_VERSION, split_id, i))
        meta = {
            "url": f"toy://{'train' if split_id == 0 else 'val'}/{i}",
            "color": color,
            "shape": shape,
            "motion": motion,
            "fps": TOY_FPS,
            "width": TOY_WIDTH,
            "height": TOY_HEIGHT,
        }
        out.append((encode_mp4(frames, fps=TOY_FPS), toy_caption(color, shape, motion), meta))
    return out


def _write_split(
    out_dir: Path,
    split_id: int,
    num_clips: int,
    samples_per_shard: int,
    start_shard: int,
    pool: concurrent.futures.Executor | None,
) -> None:
    chunks = [range(a, min(a + samples_per_shard, num_clips)) for a in range(0, num_clips, samples_per_shard)]
    if pool is None:
        results = (_encode_clips(split_id, c) for c in chunks)
    else:
        results = pool.map(_encode_clips, [split_id] * len(chunks), chunks)
    with VideoShardWriter(out_dir, samples_per_shard=samples_per_shard, start_shard=start_shard) as writer:
        for clips in results:  # in order, so keys and contents are deterministic
            for mp4, caption, meta in clips:
                writer.write(mp4, caption, meta)


def _shard_paths(split_dir: Path) -> list[str]:
    return sorted(str(p) for p in split_dir.glob("[0-9][0-9][0-9][0-9][0-9].tar"))


def ensure_toy_dataset(
    root: str | Path,
    num_train: int = 512,
    num_val: int = 64,
    samples_per_shard: int = 64,
) -> dict[str, list[str]]:
    """Generate the toy dataset under ``root`` on first use; return its shard paths.

    Layout: ``<root>/train/{00000..}.tar`` and ``<root>/val/{NNNNN}.tar`` (validation shard numbers
    continue after the training ones, so every sample key is unique), each with stats files, plus
    ``<root>/DONE.json`` recording the generator version and sizes. Safe to call from several
    processes at once (DDP ranks): :func:`show1_lightning.fileio.build_once` serialises them, the data is
    built in a temporary folder and moved into place, and the marker is written last.

    Returns:
        ``{"train": [shard paths], "val": [shard paths]}``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    params = {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "samples_per_shard": samples_per_shard,
        "width": TOY_WIDTH,
        "height": TOY_HEIGHT,
        "frames": TOY_FRAMES,
        "fps": TOY_FPS,
    }
    marker = root / DONE_MARKER

    def build() -> dict:
        _build(root, params)
        return params

    build_once(root, lambda done: done == params, build)
    out = {"train": _shard_paths(root / "train"), "val": _shard_paths(root / "val")}
    if not out["train"] or (num_val > 0 and not out["val"]):
        raise RuntimeError(f"toy dataset under {root} is incomplete; delete {marker} to regenerate")
    return out


def _build(root: Path, params: dict) -> None:
    t0 = time.time()
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        n_train_shards = -(-params["num_train"] // params["samples_per_shard"])
        n_proc = min(4, os.cpu_count() or 1, n_train_shards)
        # Rendering + H.264 encoding is CPU bound: spread shards over a few forked processes.
        pool = None
        if n_proc > 1 and "fork" in multiprocessing.get_all_start_methods():
            pool = concurrent.futures.ProcessPoolExecutor(n_proc, mp_context=multiprocessing.get_context("fork"))
        try:
            _write_split(build / "train", 0, params["num_train"], params["samples_per_shard"], 0, pool)
            if params["num_val"] > 0:
                _write_split(build / "val", 1, params["num_val"], params["samples_per_shard"], n_train_shards, pool)
        finally:
            if pool is not None:
                pool.shutdown()
        for split in ("train", "val"):
            target = root / split
            if target.exists():
                shutil.rmtree(target)
            if (build / split).exists():
                os.replace(build / split, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    (root / "build_seconds.txt").write_text(f"{time.time() - t0:.2f}\n")


# ------------------------------------------------------------------------------------------------
# Prompt adherence
# ------------------------------------------------------------------------------------------------


def _rgb_to_hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of ``3 x ...`` RGB in [0, 1]."""
    r, g, b = rgb[0], rgb[1], rgb[2]
    mx, mn = rgb.amax(dim=0), rgb.amin(dim=0)
    delta = mx - mn
    sat = torch.where(mx > 0, delta / mx.clamp_min(1e-8), torch.zeros_like(mx))
    d = delta.clamp_min(1e-8)
    hue = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return hue % 360.0, sat, mx


def _palette_hues() -> tuple[list[str], torch.Tensor]:
    names = list(TOY_COLORS)
    rgb = torch.tensor([TOY_COLORS[n] for n in names], dtype=torch.float32).T / 255.0  # 3 x K
    hue, _, _ = _rgb_to_hsv(rgb)
    return names, hue


def _saturated(rgb: torch.Tensor) -> torch.Tensor:
    """Mask of the saturated, not-too-dark pixels of ``3 x ...`` RGB in [0, 1] (HSV saturation and value)."""
    mx, mn = rgb.amax(dim=0), rgb.amin(dim=0)
    return ((mx - mn) > _SAT_MIN * mx) & (mx > _VAL_MIN)


def dominant_color(video: torch.Tensor) -> str | None:
    """The palette colour of the dominant saturated pixels of a ``C x T x H x W`` video in [-1, 1].

    Each saturated, not-too-dark pixel votes for the palette colour nearest in hue; the colour with
    most votes wins. Returns None when fewer than 0.2% of the pixels are saturated (e.g. pure
    background).
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a 3 x T x H x W video, got shape {tuple(video.shape)}")
    rgb = ((video.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0).reshape(3, -1)
    keep = _saturated(rgb)
    if keep.sum().item() < _MIN_SATURATED_FRACTION * rgb.shape[1]:
        return None
    hue, _, _ = _rgb_to_hsv(rgb[:, keep])  # hue only where it matters: much faster on large videos
    names, pal = _palette_hues()
    diff = (hue[:, None] - pal[None, :]).abs()
    dist = torch.minimum(diff, 360.0 - diff)  # circular hue distance
    votes = torch.bincount(dist.argmin(dim=1), minlength=len(names))
    return names[int(votes.argmax())]


def color_adherence(videos: torch.Tensor, prompts: list[str]) -> float:
    """Fraction of ``B x C x T x H x W`` videos whose dominant colour is the one their prompt names.

    A video with no dominant colour, or a prompt naming no palette colour, counts as a miss.
    """
    if videos.ndim != 5:
        raise ValueError(f"expected B x C x T x H x W videos, got shape {tuple(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("no videos to score")
    hits = 0
    for video, prompt in zip(videos, prompts):
        wanted = parse_toy_prompt(prompt)["color"]
        hits += int(wanted is not None and dominant_color(video) == wanted)
    return hits / len(prompts)


def _saturated_centroid(rgb: torch.Tensor) -> tuple[float, float] | None:
    """(x, y) centroid in pixels of the saturated pixels of ``3 x T x H x W`` RGB in [0, 1], pooled over
    the frames; None when fewer than 0.2% of the pixels are saturated."""
    keep = _saturated(rgb).float()  # T x H x W
    total = keep.sum()
    if total.item() < _MIN_SATURATED_FRACTION * keep.numel():
        return None
    h, w = keep.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    return float((keep * xs).sum() / total), float((keep * ys).sum() / total)


def frame_centroids(videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame centroid of the saturated pixels (the rule of :func:`dominant_color`) of ``B x 3 x T x H x W``
    videos in [-1, 1]: ``(B, T, 2)`` (x, y) as fractions of ``(W - 1, H - 1)`` (0: left / top pixel, 1: right /
    bottom) and a ``(B, T)`` mask of the frames that have a shape (at least 0.2% of their pixels saturated).
    Frames without one get the frame's centre."""
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"expected B x 3 x T x H x W videos, got shape {tuple(videos.shape)}")
    h, w = videos.shape[-2:]
    rgb = (videos.detach().float().clamp(-1, 1) + 1.0) / 2.0
    keep = _saturated(rgb.transpose(0, 1)).float()  # B x T x H x W
    total = keep.sum(dim=(-2, -1))
    valid = total >= _MIN_SATURATED_FRACTION * h * w
    ys = torch.linspace(0.0, 1.0, h, device=keep.device)[:, None]
    xs = torch.linspace(0.0, 1.0, w, device=keep.device)[None, :]
    denom = total.clamp_min(1.0)
    cx = (keep * xs).sum(dim=(-2, -1)) / denom
    cy = (keep * ys).sum(dim=(-2, -1)) / denom
    centre = torch.full_like(cx, 0.5)
    return torch.stack([torch.where(valid, cx, centre), torch.where(valid, cy, centre)], dim=-1), valid


def motion_displacement(video: torch.Tensor) -> tuple[float, float] | None:
    """How far the saturated shape of a ``3 x T x H x W`` video in [-1, 1] moves: ``(dx, dy)`` as fractions of the
    frame's width and height (x to the right, y down), or None.

    The centroid of the saturated pixels (the rule of :func:`dominant_color`) over the first quarter of the frames
    is compared with the one over the last quarter (quarters: robust to a flickering frame). None when the video
    has fewer than two frames or either quarter has no saturated shape.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a 3 x T x H x W video, got shape {tuple(video.shape)}")
    t, h, w = video.shape[1:]
    if t < 2:
        return None
    q = max(1, t // 4)
    rgb = (video.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0
    first, last = _saturated_centroid(rgb[:, :q]), _saturated_centroid(rgb[:, t - q :])
    if first is None or last is None:
        return None
    return (last[0] - first[0]) / w, (last[1] - first[1]) / h


def motion_direction(video: torch.Tensor, min_displacement: float = 0.02) -> str | None:
    """The direction (``left``/``right``/``up``/``down``) the saturated shape of a ``3 x T x H x W`` video in
    [-1, 1] moves, or None.

    From :func:`motion_displacement`: the axis of the larger displacement and its sign give the direction. None
    when there is no displacement to measure, or when it is below ``min_displacement`` of the frame side along
    its axis (a static video does not move in any direction).
    """
    return displacement_direction(motion_displacement(video), min_displacement)


def displacement_direction(moved: tuple[float, float] | None, min_displacement: float = 0.02) -> str | None:
    """The direction of a :func:`motion_displacement` (None stays None; below ``min_displacement``: None)."""
    if moved is None:
        return None
    dx, dy = moved
    if max(abs(dx), abs(dy)) < min_displacement:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def motion_adherence(videos: torch.Tensor, prompts: list[str], min_displacement: float = 0.02) -> float:
    """Fraction of ``B x C x T x H x W`` videos whose saturated shape moves in the direction their prompt names
    (:func:`motion_direction`; chance level 0.25 for a shape moving in a random direction).

    A video with no saturated shape or no clear displacement, or a prompt naming no motion, counts as a miss.
    """
    if videos.ndim != 5:
        raise ValueError(f"expected B x C x T x H x W videos, got shape {tuple(videos.shape)}")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(prompts)} prompts")
    if len(prompts) == 0:
        raise ValueError("no videos to score")
    hits = 0
    for video, prompt in zip(videos, prompts):
        wanted = parse_toy_prompt(prompt)["motion"]
        hits += int(wanted is not None and motion_direction(video, min_displacement) == wanted)
    return hits / len(prompts)
