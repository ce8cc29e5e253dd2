"""show1-make-shards: your own CSV / JSONL / folder of captioned videos -> shards, with skip accounting; and
shards written by video2dataset (KEY.mp4 + KEY.txt + KEY.json in the tar) load as they are."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from show1_lightning.data import make_shards
from show1_lightning.data.datamodule import VideoDataModule
from show1_lightning.data.shards import VideoShardWriter, read_shard_samples
from show1_lightning.data.toy_data import make_toy_clip, toy_caption
from show1_lightning.data.video_io import encode_mp4

COLORS = ["red", "green", "blue", "yellow"]


def _mp4(i: int, frames: int = 6) -> bytes:
    return encode_mp4(
        make_toy_clip(COLORS[i % 4], "circle", "left", seed=i, num_frames=frames, height=32, width=48), fps=8
    )


def _samples(out: Path) -> list[dict]:
    return [s for tar in sorted(out.glob("*.tar")) for s in read_shard_samples(tar)]


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def test_own_csv_writes_good_rows_and_counts_every_skip(tmp_path, capsys):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    good = {"a.mp4": _mp4(0), "sub/b.mp4": _mp4(1), "c.mp4": _mp4(2)}
    for name, data in good.items():
        (clips / name).write_bytes(data)
    (clips / "corrupt.mp4").write_bytes(b"\x00not a video\x01" * 100)
    table = tmp_path / "mine.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption", "source"])
        w.writerow(["clips/a.mp4", "a red circle", "cam1"])
        w.writerow(["clips/corrupt.mp4", "broken", "cam1"])
        w.writerow(["clips/sub/b.mp4", "a green circle", "cam2"])
        w.writerow(["clips/gone.mp4", "missing file", "cam2"])
        w.writerow(["https://example.com/v.mp4", "a url", "web"])
        w.writerow(["clips/c.mp4", "", "cam3"])  # no caption
        w.writerow([str(clips / "c.mp4"), "a blue circle, absolute path", "cam3"])
        w.writerow(["clips/a.mp4", "long row", "cam1", "surplus"])
    out = tmp_path / "out"
    assert make_shards.main([str(table), "--out", str(out), "--samples-per-shard", "2"]) == 0
    printed = capsys.readouterr().out
    stats = _stats(out)
    assert stats["status"] == "complete" and stats["written"] == 3 and stats["skipped"] == 5
    assert stats["skip_reasons"] == {"undecodable": 1, "missing": 1, "url": 1, "no caption": 1, "bad row": 1}
    assert "skipped 5" in printed and "'undecodable': 1" in printed
    assert {s["key"] for s in stats["skipped_samples"]} >= {"clips/corrupt.mp4", "clips/gone.mp4"}
    samples = _samples(out)
    assert [s["txt"].decode() for s in samples] == ["a red circle", "a green circle", "a blue circle, absolute path"]
    assert [s["mp4"] for s in samples] == [good["a.mp4"], good["sub/b.mp4"], good["c.mp4"]]
    meta = json.loads(samples[1]["json"])
    assert meta["source"] == "cam2" and meta["path"] == "clips/sub/b.mp4" and meta["caption"] == "a green circle"
    assert (meta["width"], meta["height"], meta["fps"]) == (48, 32, 8.0) and meta["duration"] > 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_jsonl_with_columns_root_and_min_duration(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "long.mp4").write_bytes(_mp4(0, frames=16))  # 2 s at 8 fps
    (videos / "short.mp4").write_bytes(_mp4(1, frames=4))  # 0.5 s
    table = tmp_path / "list.jsonl"
    lines = [
        json.dumps({"file_name": "long.mp4", "prompt": "a long clip", "score": 0.9}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"file_name": "short.mp4", "prompt": "a short clip"}),
        json.dumps({"file_name": "long.mp4", "prompt": "stated too short", "duration": "PT0.2S"}),
    ]
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    stats = make_shards.make_shards(table, out, videos=videos, caption_column="prompt", min_duration=1.0)
    assert stats["written"] == 1
    assert stats["skip_reasons"] == {"bad row": 2, "too short": 2}
    (sample,) = _samples(out)
    assert sample["txt"] == b"a long clip" and json.loads(sample["json"])["score"] == 0.9
    with pytest.raises(ValueError, match="no column"):
        make_shards.make_shards(_bad_csv(tmp_path), tmp_path / "o2", video_column="v")


def _bad_csv(tmp_path: Path) -> Path:
    p = tmp_path / "bad.csv"
    p.write_text("clip,caption\na.mp4,x\n")
    return p


def test_folder_with_sidecar_captions_and_with_a_manifest(tmp_path):
    folder = tmp_path / "folder"
    (folder / "day2").mkdir(parents=True)
    (folder / "one.mp4").write_bytes(_mp4(0))
    (folder / "one.txt").write_text("a red circle moving left\n")
    (folder / "day2" / "two.mp4").write_bytes(_mp4(1))
    (folder / "day2" / "two.txt").write_text("a green circle moving left")
    (folder / "broken.mp4").write_bytes(b"garbage" * 50)
    (folder / "broken.txt").write_text("never written")
    (folder / "uncaptioned.mp4").write_bytes(_mp4(2))
    out = tmp_path / "out"
    stats = make_shards.make_shards(folder, out)
    assert stats["written"] == 2 and stats["skip_reasons"] == {"undecodable": 1, "no caption": 1}
    assert [s["txt"].decode() for s in _samples(out)] == ["a green circle moving left", "a red circle moving left"]
    # The same folder with a manifest: the manifest wins over the sidecars.
    (folder / "captions.csv").write_text("video,text\none.mp4,from the manifest\nbroken.mp4,x\n")
    out2 = tmp_path / "out2"
    stats = make_shards.make_shards(folder, out2, samples_per_shard=1)
    assert stats["written"] == 1 and stats["skip_reasons"] == {"undecodable": 1}
    assert [s["txt"] for s in _samples(out2)] == [b"from the manifest"]


def test_folder_resume_continues_to_the_same_shards(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.mp4").write_bytes(_mp4(i))
        (folder / f"{i}.txt").write_text(f"clip {i}")
    reference = tmp_path / "reference"
    make_shards.make_shards(folder, reference, samples_per_shard=2)
    out = tmp_path / "out"
    rows = list(make_shards.folder_rows(folder))
    with pytest.raises(RuntimeError, match="stop"):
        make_shards.write_rows(_then_fail(rows, 3), out, samples_per_shard=2)
    assert _stats(out)["status"] == "aborted"
    make_shards.make_shards(folder, out, samples_per_shard=2, resume=True)
    assert [s["txt"] for s in _samples(out)] == [s["txt"] for s in _samples(reference)]
    assert _stats(out)["status"] == "complete"


def _then_fail(rows: list, n: int):
    yield from rows[:n]
    raise RuntimeError("stop")


def _video2dataset_tar(path: Path, clips: list[tuple[bytes, str]]) -> list[str]:
    """A shard as video2dataset writes it (tarfile, not this project's writer): KEY.mp4, KEY.txt, KEY.json."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, (data, caption) in enumerate(clips):
            key = f"{0:05d}{i:04d}"
            meta = {
                "url": f"https://example.com/{i}.mp4",
                "key": key,
                "status": "success",
                "error_message": None,
                "caption": caption,
                "width": 48,
                "height": 32,
                "original_width": 48,
                "original_height": 32,
            }
            for ext, payload in (("mp4", data), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            keys.append(key)
    # video2dataset's per-shard stats (its fields, not ours); it writes no dataset-level stats.json.
    (path.parent / "00000_stats.json").write_text(json.dumps({"count": len(clips), "successes": len(clips)}))
    return keys


def test_video2dataset_shards_load_as_they_are(tmp_path):
    clips = [(_mp4(i, frames=8), toy_caption(COLORS[i % 4], "circle", "left")) for i in range(4)]
    v2d = tmp_path / "v2d"
    v2d.mkdir()
    keys = _video2dataset_tar(v2d / "00000.tar", clips)
    ours = tmp_path / "ours"
    with VideoShardWriter(ours, samples_per_shard=10) as w:
        for data, caption in clips:
            w.write(data, caption)

    def loader(root: Path):
        dm = VideoDataModule(
            train_shards=str(root / "00000.tar"),
            val_shards=str(root / "00000.tar"),
            num_frames=4,
            target_fps=None,
            height=32,
            width=32,
            batch_size=2,
            epoch_length=1,
            val_batches=2,
            shuffle_buffer=1,
            seed=0,
            num_workers=0,
        )
        return dm.val_dataloader()

    got, ref = list(loader(v2d)), list(loader(ours))
    assert [k for b in got for k in b["key"]] == keys
    assert [c for b in got for c in b["caption"]] == [c for _, c in clips]
    for a, b in zip(got, ref):
        assert a["video"].shape == (2, 3, 4, 32, 32) and int(a["n_skipped"]) == 0
        assert torch.equal(a["video"], b["video"])  # same bytes, same clip: the layout is the same
