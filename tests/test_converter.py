"""data/webvid_to_shards.py: rows validated, paths confined to --videos, a crash never leaves a
finished-looking dataset, and --resume continues to the same result as an uninterrupted job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import webvid_to_shards  # data/ is on the test path (pyproject.toml)

from show1_lightning.data.shards import VideoShardWriter, read_shard_samples
from show1_lightning.data.toy_data import make_toy_clip
from show1_lightning.data.video_io import encode_mp4

HEADER = ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"]


def _mp4(i: int) -> bytes:
    return encode_mp4(make_toy_clip(["red", "green", "blue"][i % 3], "circle", "left", seed=i, num_frames=4), fps=8)


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


def _keys_and_ids(out: Path) -> list[tuple[str, str]]:
    res = []
    for tar in sorted(out.glob("*.tar")):
        for s in read_shard_samples(tar):
            res.append((s["__key__"], json.loads(s["json"])["videoid"]))
    return res


def test_short_rows_and_paths_outside_videos_are_skipped(tmp_path):
    videos = tmp_path / "videos"
    (videos / "001").mkdir(parents=True)
    for vid in ("1", "2", "3"):
        (videos / "001" / f"{vid}.mp4").write_bytes(_mp4(int(vid)))
    # A video outside --videos that a crafted row would reach.
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "9.mp4").write_bytes(_mp4(9))
    rows = [
        ["1", "ok one", "1", "001", "PT00H00M10S", "u1"],
        ["2", "short row", "1"],  # before: None.strip() aborted everything
        ["9", "dotdot", "1", "../secret", "PT00H00M10S", "u9"],
        ["9", "absolute", "1", str(tmp_path / "secret"), "PT00H00M10S", "u9"],
        ["sub/9", "id with a path", "1", "001", "PT00H00M10S", "u9"],
        ["3", "long row", "1", "001", "PT00H00M10S", "u3", "surplus"],
        ["3", "ok three", "1", "001", "PT00H00M10S", "u3"],
    ]
    csv_path = _write_csv(tmp_path / "w.csv", rows)
    out = tmp_path / "out"
    assert webvid_to_shards.main(["--csv", str(csv_path), "--videos", str(videos), "--out", str(out)]) == 0
    stats = _stats(out)
    assert stats["status"] == "complete"
    assert stats["written"] == 2 and [v for _, v in _keys_and_ids(out)] == ["1", "3"]
    assert stats["skip_reasons"] == {"bad row": 2, "bad path": 3}
    reasons = {s["reason"] for s in stats["skipped_samples"]}
    assert any("'..' in page_dir" in r for r in reasons) and any("absolute page_dir" in r for r in reasons)
    assert any("path separator in videoid" in r for r in reasons)


def test_an_existing_dataset_is_not_overwritten_without_resume(tmp_path):
    with VideoShardWriter(tmp_path, samples_per_shard=2) as w:
        w.write(_mp4(0), "x")
    with pytest.raises(FileExistsError, match="resume"):
        VideoShardWriter(tmp_path, samples_per_shard=2)


def _convert_rows(tmp_path: Path, n: int) -> tuple[Path, Path]:
    videos = tmp_path / "videos"
    (videos / "p").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if i % 4 != 3:  # every 4th video is missing: skips in the middle of shards
            (videos / "p" / f"{i}.mp4").write_bytes(_mp4(i))
        rows.append([str(i), f"caption {i}", "1", "p", "PT00H00M05S", f"u{i}"])
    return _write_csv(tmp_path / "w.csv", rows), videos


def test_a_crash_leaves_an_aborted_dataset_and_resume_finishes_it(tmp_path, monkeypatch):
    csv_path, videos = _convert_rows(tmp_path, 14)
    reference = tmp_path / "reference"
    webvid_to_shards.convert(csv_path, videos, reference, samples_per_shard=3)
    assert _stats(reference)["status"] == "complete"

    out = tmp_path / "out"
    real = webvid_to_shards.probe_video
    calls = {"n": 0}

    def crashing_probe(data, frames):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("disk on fire")
        return real(data, frames)

    monkeypatch.setattr(webvid_to_shards, "probe_video", crashing_probe)
    with pytest.raises(RuntimeError, match="disk on fire"):
        webvid_to_shards.convert(csv_path, videos, out, samples_per_shard=3)
    stats = _stats(out)
    # Before the fix: stats.json written as if complete, the open shard renamed into place.
    assert stats["status"] == "aborted" and "disk on fire" in stats["error"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]  # the finished shards only
    assert not list(out.glob("*.tmp"))
    with pytest.raises(FileExistsError, match="resume"):
        webvid_to_shards.convert(csv_path, videos, out, samples_per_shard=3)

    monkeypatch.setattr(webvid_to_shards, "probe_video", real)
    assert (
        webvid_to_shards.main(
            [
                "--csv",
                str(csv_path),
                "--videos",
                str(videos),
                "--out",
                str(out),
                "--samples-per-shard",
                "3",
                "--resume",
            ]
        )
        == 0
    )
    done, ref = _stats(out), _stats(reference)
    assert done["status"] == "complete"
    assert _keys_and_ids(out) == _keys_and_ids(reference)
    for k in ("written", "skipped", "skip_reasons", "shards"):
        assert done[k] == ref[k], k
    with pytest.raises(FileExistsError, match="complete"):
        webvid_to_shards.convert(csv_path, videos, out, samples_per_shard=3, resume=True)


def test_a_killed_job_is_in_progress_and_resumes(tmp_path):
    """kill -9: no exception handler runs. The writer is left open mid-shard (a .tmp tar) and stats.json still
    says "in_progress"; --resume drops the partial shard and continues after the last finished one."""
    csv_path, videos = _convert_rows(tmp_path, 10)
    reference = tmp_path / "reference"
    webvid_to_shards.convert(csv_path, videos, reference, samples_per_shard=3)

    out = tmp_path / "out"
    w = VideoShardWriter(out, samples_per_shard=3)  # a job that gets as far as 4 samples, then dies
    rows = list(csv.DictReader(open(csv_path)))
    written = 0
    for i, row in enumerate(rows):
        w.position = i + 1
        path = videos / "p" / f"{row['videoid']}.mp4"
        if not path.exists():
            w.skip(row["videoid"], "missing: gone")
            continue
        w.write(path.read_bytes(), row["name"], {"videoid": row["videoid"]})
        written += 1
        if written == 4:
            break
    assert _stats(out)["status"] == "in_progress" and list(out.glob("*.tar.tmp"))
    stats = webvid_to_shards.convert(csv_path, videos, out, samples_per_shard=3, resume=True)
    assert _stats(out)["status"] == "complete" and not list(out.glob("*.tmp"))
    assert [v for _, v in _keys_and_ids(out)] == [v for _, v in _keys_and_ids(reference)]
    assert stats["written"] == _stats(reference)["written"]
