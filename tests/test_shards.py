"""Shard writing/reading, frame sampling math, clip decoding and the WebVid CSV converter."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webvid_to_shards  # data/ is on the test path (pyproject.toml)

from show1_lightning.data.datamodule import VideoDataModule
from show1_lightning.data.frame_sampling import ClipTooShortError, compute_stride, sample_frame_indices
from show1_lightning.data.shards import (
    VideoShardWriter,
    decode_sampled_clip,
    expand_shard_spec,
    read_shard_samples,
    resize_center_crop,
    shard_key,
)
from show1_lightning.data.toy_data import make_toy_clip
from show1_lightning.data.video_io import VideoDecodeError, decode_video, encode_mp4, to_float_video


def _clip(i: int, frames: int = 16, fps: float = 16) -> tuple[np.ndarray, bytes]:
    colors = ["red", "green", "blue", "yellow"]
    f = make_toy_clip(colors[i % 4], "circle", "left", seed=i, num_frames=frames)
    return f, encode_mp4(f, fps)


# -- frame sampling -------------------------------------------------------------------------------


def test_stride_follows_fps() -> None:
    assert compute_stride(16, 4) == 4
    assert compute_stride(30, 8) == 4  # 3.75 rounds to 4
    assert compute_stride(25, 8) == 3
    assert compute_stride(24, 30) == 1  # never below 1
    assert compute_stride(29.97, None, fixed_stride=2) == 2
    with pytest.raises(ValueError):
        compute_stride(25, 0)


def test_sample_indices_fit_and_are_strided() -> None:
    rng = random.Random(0)
    starts = set()
    for _ in range(200):
        sel = sample_frame_indices(32, 8, 16, 4, rng)
        assert sel.stride == 4 and len(sel.indices) == 8
        assert np.all(np.diff(sel.indices) == 4)
        assert 0 <= sel.indices[0] and sel.indices[-1] <= 31
        starts.add(sel.indices[0])
    assert starts == {0, 1, 2, 3}  # (8 - 1) * 4 + 1 = 29 frames of 32: starts 0..3, all reachable
    assert sample_frame_indices(32, 8, 16, 4, start=3).indices[0] == 3
    assert sample_frame_indices(32, 8, 16, 4).indices[0] == 0  # no rng, no start: from the beginning
    # deterministic given the rng seed
    a = [sample_frame_indices(100, 4, 30, 10, random.Random(5)).indices for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_too_short_clip_raises() -> None:
    assert sample_frame_indices(29, 8, 16, 4).indices[-1] == 28  # exactly fits
    with pytest.raises(ClipTooShortError):
        sample_frame_indices(28, 8, 16, 4)
    with pytest.raises(ClipTooShortError):
        sample_frame_indices(32, 8, 16, 4, start=4)


# -- writer ---------------------------------------------------------------------------------------


def test_writer_layout_keys_and_stats(tmp_path: Path) -> None:
    assert shard_key(3, 12) == "000030012"
    with VideoShardWriter(tmp_path, samples_per_shard=2) as w:
        keys = []
        for i in range(5):
            if i == 2:
                w.skip("vid-missing", "missing: /nowhere.mp4")
            keys.append(w.write(_clip(i, frames=4)[1], f"caption {i}", {"url": f"http://x/{i}", "extra": i}))
    assert keys == ["000000000", "000000001", "000010000", "000010001", "000020000"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["written"] == 5 and stats["skipped"] == 1
    assert stats["skip_reasons"] == {"missing": 1}
    assert stats["skipped_samples"][0]["key"] == "vid-missing"
    s1 = json.loads((tmp_path / "00001_stats.json").read_text())
    assert s1["successes"] == 2 and s1["failed"] == 1  # the skip happened while shard 1 was open
    samples = read_shard_samples(tmp_path / "00001.tar")
    assert [s["__key__"] for s in samples] == ["000010000", "000010001"]
    meta = json.loads(samples[0]["json"])
    assert meta == {"url": "http://x/2", "extra": 2, "key": "000010000", "caption": "caption 2", "status": "success"}
    assert samples[0]["txt"].decode() == "caption 2"
    assert decode_video(samples[0]["mp4"]).num_frames == 4


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        VideoShardWriter(tmp_path, samples_per_shard=0)
    w = VideoShardWriter(tmp_path, samples_per_shard=2)
    with pytest.raises(ValueError):
        w.write(b"", "empty")
    w.close()
    with pytest.raises(RuntimeError):
        w.write(b"x", "closed")


def test_expand_shard_spec(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    brace = expand_shard_spec(f"{tmp_path}/{{00000..00002}}.tar")
    assert brace == [f"{tmp_path}/{i:05d}.tar" for i in range(3)]
    assert expand_shard_spec(str(tmp_path / "*.tar")) == brace
    assert expand_shard_spec([brace[0], str(tmp_path / "0000[12].tar")]) == brace
    with pytest.raises(FileNotFoundError):
        expand_shard_spec(str(tmp_path / "nope*.tar"))


# -- decoding -------------------------------------------------------------------------------------


def test_decode_sampled_clip_matches_full_decode() -> None:
    frames, mp4 = _clip(1, frames=20)
    full = decode_video(mp4).frames
    clip = decode_sampled_clip(mp4, 5, target_fps=4, rng=random.Random(1))
    assert clip.stride == 4 and clip.source_fps == pytest.approx(16)
    assert np.array_equal(clip.frames, full[clip.indices])
    clip0 = decode_sampled_clip(mp4, 3, target_fps=None, start=0, fixed_stride=2)
    assert clip0.indices == [0, 2, 4] and np.array_equal(clip0.frames, full[[0, 2, 4]])
    with pytest.raises(ClipTooShortError):
        decode_sampled_clip(mp4, 6, target_fps=4)


def test_decode_sampled_clip_rejects_garbage_and_truncation() -> None:
    _, mp4 = _clip(2, frames=32)
    with pytest.raises(VideoDecodeError):
        decode_sampled_clip(b"\x00garbage" * 100, 4, None)
    with pytest.raises((VideoDecodeError, ClipTooShortError)):
        decode_sampled_clip(mp4[: len(mp4) // 3], 30, None, start=0)


def test_resize_center_crop() -> None:
    x = torch.linspace(-1, 1, 100).view(1, 1, 1, 100).expand(3, 2, 50, 100).contiguous()
    y = resize_center_crop(x, 20, 20)
    assert y.shape == (3, 2, 20, 20)
    # 50x100 -> 20x40 (cover), centre 20 columns: the middle of the horizontal ramp
    assert y[0, 0, 0].mean().abs() < 0.05 and y[0, 0, 0, 0] < 0 < y[0, 0, 0, -1]
    const = torch.full((3, 1, 30, 30), 0.25)
    # Filter weights sum to 1 up to float32 rounding: a constant 0.25 stays within ~1e-7 (1e-5 is generous).
    assert torch.allclose(resize_center_crop(const, 64, 40), torch.full((3, 1, 64, 40), 0.25), rtol=0, atol=1e-5)


# -- round trip -----------------------------------------------------------------------------------


def test_round_trip_through_datamodule(tmp_path: Path) -> None:
    originals = {}
    with VideoShardWriter(tmp_path, samples_per_shard=3) as w:
        for i in range(6):
            frames, mp4 = _clip(i, frames=8)
            key = w.write(mp4, f"clip number {i}", {"url": None})
            originals[key] = (decode_video(mp4).frames, f"clip number {i}", frames)
    dm = VideoDataModule(
        train_shards=f"{tmp_path}/{{00000..00001}}.tar",
        val_shards=str(tmp_path / "*.tar"),
        num_frames=8,
        target_fps=None,
        height=80,
        width=128,
        batch_size=2,
        val_batches=3,
    )
    seen = []
    for batch in dm.val_dataloader():
        for video, caption, key in zip(batch["video"], batch["caption"], batch["key"]):
            decoded, cap, raw = originals[key]
            assert caption == cap
            # same frames as decoding the stored bytes (no resize at the native size) ...
            # Both are uint8 / 127.5 - 1 of the same decoded bytes: [-1, 1], one float op apart at most.
            assert torch.allclose(video, to_float_video(decoded), rtol=0, atol=1e-6)
            # ... and close to what was encoded (H.264 at crf 18 is lossy)
            assert (video - to_float_video(raw)).abs().mean() < 0.03
            seen.append(key)
        assert batch["stride"].tolist() == [1, 1] and int(batch["n_skipped"]) == 0
    assert seen == sorted(originals)  # validation order is the shard order


# -- WebVid CSV -> shards -------------------------------------------------------------------------


def test_parse_iso_duration() -> None:
    assert webvid_to_shards.parse_iso_duration("PT00H00M17S") == 17
    assert webvid_to_shards.parse_iso_duration("PT01H02M03S") == 3723
    assert webvid_to_shards.parse_iso_duration("PT12.5S") == 12.5
    with pytest.raises(ValueError):
        webvid_to_shards.parse_iso_duration("17 seconds")


def test_webvid_conversion_skips_bad_rows(tmp_path: Path) -> None:
    videos = tmp_path / "videos"
    (videos / "001").mkdir(parents=True)
    (videos / "001" / "11.mp4").write_bytes(_clip(0, frames=8)[1])
    (videos / "001" / "12.mp4").write_bytes(_clip(1, frames=8)[1])
    (videos / "001" / "13.mp4").write_bytes(b"not a video at all" * 50)
    (videos / "001" / "16.mp4").write_bytes(_clip(2, frames=8)[1])
    rows = [
        ("11", "a red circle", "PT00H00M17S"),
        ("12", "a green circle, with a comma", "PT00H00M09S"),
        ("13", "corrupt", "PT00H00M05S"),
        ("14", "missing file", "PT00H00M05S"),
        ("15", "bad duration", "17s"),
        ("16", "a blue circle", "PT00H00M11S"),
    ]
    csv_path = tmp_path / "webvid.csv"
    with open(csv_path, "w", newline="") as fh:
        import csv

        wr = csv.writer(fh)
        wr.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        for vid, name, dur in rows:
            wr.writerow([vid, name, 1, "001", dur, f"https://example.com/{vid}.mp4"])
    out = tmp_path / "shards"
    assert (
        webvid_to_shards.main(
            ["--csv", str(csv_path), "--videos", str(videos), "--out", str(out), "--samples-per-shard", "2"]
        )
        == 0
    )
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written"] == 3 and stats["skipped"] == 3
    assert stats["skip_reasons"] == {"undecodable": 1, "missing": 1, "bad duration": 1}
    assert {s["key"] for s in stats["skipped_samples"]} == {"13", "14", "15"}
    samples = read_shard_samples(out / "00000.tar") + read_shard_samples(out / "00001.tar")
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["videoid"] for m in metas] == ["11", "12", "16"]
    assert metas[1]["caption"] == "a green circle, with a comma" and metas[1]["duration"] == 9
    assert metas[0]["url"] == "https://example.com/11.mp4" and metas[0]["status"] == "success"
    assert (metas[0]["width"], metas[0]["height"]) == (128, 80)
    with pytest.raises(ValueError, match="lacks the WebVid columns"):
        bad = tmp_path / "bad.csv"
        bad.write_text("id,caption\n1,x\n")
        webvid_to_shards.convert(bad, videos, tmp_path / "o2")
