"""The bundled toy dataset: generation, caching (also under concurrent callers) and colour adherence."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from show1_lightning.data import toy_data
from show1_lightning.data.shards import read_shard_samples
from show1_lightning.data.toy_data import (
    TOY_COLORS,
    color_adherence,
    dominant_color,
    ensure_toy_dataset,
    make_toy_clip,
    parse_toy_prompt,
)
from show1_lightning.data.video_io import decode_video, to_float_video


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("toy")
    return root, ensure_toy_dataset(root, num_train=36, num_val=12, samples_per_shard=12)


def _decoded(shards: list[str]) -> tuple[torch.Tensor, list[str]]:
    videos, captions = [], []
    for shard in shards:
        for s in read_shard_samples(shard):
            videos.append(to_float_video(decode_video(s["mp4"]).frames[::4]))  # 8 frames keep it quick
            captions.append(s["txt"].decode())
    return torch.stack(videos), captions


def test_default_dataset_layout_and_cache(toy_data_dir: Path) -> None:
    # (Generation speed is measured by bench/, not asserted here: tests carry no wall-clock limits.)
    # The session's toy dataset at the default sizes (shared with the training tests: generated once).
    tmp_path = toy_data_dir / "toy"
    shards = ensure_toy_dataset(tmp_path)
    assert [Path(p).name for p in shards["train"]] == [f"{i:05d}.tar" for i in range(8)]
    assert [Path(p).name for p in shards["val"]] == ["00008.tar"]
    assert all(Path(p).parent == tmp_path / "train" for p in shards["train"])
    train_stats = json.loads((tmp_path / "train" / "stats.json").read_text())
    val_stats = json.loads((tmp_path / "val" / "stats.json").read_text())
    assert train_stats["written"] == 512 and val_stats["written"] == 64
    samples = read_shard_samples(shards["val"][0])
    assert len(samples) == 64 and samples[0]["__key__"] == "000080000"
    video = decode_video(samples[0]["mp4"])
    assert video.frames.shape == (32, 80, 128, 3) and video.fps == pytest.approx(16)
    meta = json.loads(samples[0]["json"])
    assert samples[0]["txt"].decode() == f"a {meta['color']} {meta['shape']} moving {meta['motion']}"
    # cached: the second call returns the same shards without rewriting them
    # (inode + mtime: a rewrite goes through a new temp file and os.replace, i.e. a new inode, whatever the
    # filesystem's timestamp resolution)
    stamps = [(Path(p).stat().st_ino, Path(p).stat().st_mtime_ns) for p in shards["train"]]
    assert ensure_toy_dataset(tmp_path) == shards
    assert [(Path(p).stat().st_ino, Path(p).stat().st_mtime_ns) for p in shards["train"]] == stamps


def test_cache_invalidated_by_generator_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_toy_dataset(tmp_path, num_train=4, num_val=2, samples_per_shard=2)
    # A stamp no write can leave (2001): "rebuilt or not" then does not depend on the timestamp resolution.
    old = 1_000_000_000 * 10**9
    os.utime(first["train"][0], ns=(old, old))
    mtime = Path(first["train"][0]).stat().st_mtime_ns
    ensure_toy_dataset(tmp_path, num_train=4, num_val=2, samples_per_shard=2)
    assert Path(first["train"][0]).stat().st_mtime_ns == mtime  # not rebuilt
    monkeypatch.setattr(toy_data, "GENERATOR_VERSION", toy_data.GENERATOR_VERSION + 1)
    again = ensure_toy_dataset(tmp_path, num_train=4, num_val=2, samples_per_shard=2)
    assert again == first
    assert json.loads((tmp_path / "DONE.json").read_text())["version"] == toy_data.GENERATOR_VERSION
    assert Path(first["train"][0]).stat().st_mtime_ns != mtime  # rebuilt for the new version
    # fewer clips than before: stale shards of the old build are gone
    fewer = ensure_toy_dataset(tmp_path, num_train=2, num_val=2, samples_per_shard=2)
    assert len(fewer["train"]) == 1


def _worker(root: str, queue: multiprocessing.Queue) -> None:
    queue.put(ensure_toy_dataset(root, num_train=24, num_val=8, samples_per_shard=8))


def test_concurrent_callers_share_one_build(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == results[2]
    assert len(results[0]["train"]) == 3 and len(results[0]["val"]) == 1
    assert not list(tmp_path.glob(".build-*"))  # temporary build folders cleaned up
    assert sum(len(read_shard_samples(p)) for p in results[0]["train"]) == 24


def test_clips_deterministic_and_varied() -> None:
    a = make_toy_clip("red", "triangle", "up", seed=7)
    b = make_toy_clip("red", "triangle", "up", seed=7)
    c = make_toy_clip("red", "triangle", "up", seed=8)
    assert a.shape == (32, 80, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError):
        make_toy_clip("purple", "circle", "left")


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_motion_direction(motion: str) -> None:
    clip = make_toy_clip("blue", "square", motion, seed=3)
    rgb = clip.astype(int)
    blue = rgb[..., 2] - rgb[..., 0] > 100  # T x H x W shape mask
    ys, xs = np.nonzero(blue[0])
    ye, xe = np.nonzero(blue[-1])
    dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
    expected = {"left": (dx < -10), "right": (dx > 10), "up": (dy < -5), "down": (dy > 5)}
    assert expected[motion], (dx, dy)
    assert blue.sum(axis=(1, 2)).min() > 100  # the shape stays in frame


def test_parse_toy_prompt() -> None:
    assert parse_toy_prompt("a red circle moving left") == {"color": "red", "shape": "circle", "motion": "left"}
    assert parse_toy_prompt("A Cyan Triangle moving UP, fast") == {
        "color": "cyan",
        "shape": "triangle",
        "motion": "up",
    }
    assert parse_toy_prompt("something green") == {"color": "green", "shape": None, "motion": None}
    assert parse_toy_prompt("a dog") == {"color": None, "shape": None, "motion": None}


def test_adherence_on_real_and_permuted_prompts(small_toy: tuple[Path, dict]) -> None:
    _, shards = small_toy
    videos, captions = _decoded(shards["val"])  # 12 decoded mp4 clips, two of each colour
    assert color_adherence(videos, captions) == 1.0
    colors = list(TOY_COLORS)
    shifted = [
        c.replace(parse_toy_prompt(c)["color"], colors[(colors.index(parse_toy_prompt(c)["color"]) + 1) % 6])
        for c in captions
    ]
    assert color_adherence(videos, shifted) == 0.0
    rolled = captions[1:] + captions[:1]  # neighbours have different colours (colours cycle)
    assert color_adherence(videos, rolled) < 0.2
    assert color_adherence(videos[:2], ["a dog", captions[1]]) == 0.5  # no colour named: a miss


def test_dominant_color_none_on_background_and_all_colors() -> None:
    rng = np.random.default_rng(0)
    bg = toy_data._background(rng, 80, 128)
    frames = np.repeat(bg[None].round().astype(np.uint8), 4, axis=0)
    assert dominant_color(to_float_video(frames)) is None
    assert dominant_color(torch.zeros(3, 2, 8, 8)) is None  # mid grey
    assert dominant_color(-torch.ones(3, 2, 8, 8)) is None  # black
    for name in TOY_COLORS:
        for shape in ("circle", "triangle"):
            assert dominant_color(to_float_video(make_toy_clip(name, shape, "down", seed=11))) == name
    with pytest.raises(ValueError):
        dominant_color(torch.zeros(2, 3, 8, 8, 3))
    with pytest.raises(ValueError):
        color_adherence(torch.zeros(2, 3, 1, 8, 8), ["a red circle moving left"])
