"""Convert a WebVid CSV plus a folder of downloaded videos into tar shards (video2dataset layout).

    python data/webvid_to_shards.py --csv results_2M_train.csv --videos /data/webvid/videos \
        --out /data/webvid/shards --samples-per-shard 1000

The CSV has the columns ``videoid,name,page_idx,page_dir,duration,contentUrl`` (``name`` is the
caption, ``duration`` ISO-8601 like ``PT00H00M17S``); each video is expected at
``<videos>/<page_dir>/<videoid>.mp4``. Malformed rows (missing columns, an empty videoid, a
``page_dir`` or ``videoid`` that would leave ``--videos``: absolute, ``..``, path separators in the id),
missing, unreadable, undecodable or too-short videos are skipped and listed with their reason in
``stats.json``; they never abort the job.

``stats.json`` says ``"status": "in_progress"`` while the job runs (and after a kill), ``"aborted"`` (with
the error) when it stops on an exception, ``"complete"`` only when every row was read. ``--resume`` continues
an unfinished job in the same ``--out``: the finished shards are kept, the rest is written again from the
CSV row after the last finished shard. Without it, an ``--out`` that already holds shards is refused.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from show1_lightning.data.shards import VideoShardWriter
from show1_lightning.data.video_io import VideoDecodeError, decode_video

_ISO_DURATION = re.compile(r"^P(?:(?P<d>\d+)D)?T?(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?$")
REQUIRED_COLUMNS = ("videoid", "name", "page_dir", "duration", "contentUrl")


def parse_iso_duration(text: str) -> float:
    """Seconds of an ISO-8601 duration such as ``PT00H00M17S``; raises ValueError when malformed."""
    m = _ISO_DURATION.match(text.strip())
    if not m or not any(m.groupdict().values()):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    g = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    return g["d"] * 86400 + g["h"] * 3600 + g["m"] * 60 + g["s"]


def probe_video(data: bytes, probe_frames: int) -> tuple[int, int, float]:
    """Decode the first frames to check the video is usable; returns (width, height, fps)."""
    decoded = decode_video(data, max_frames=probe_frames)
    _, h, w, _ = decoded.frames.shape
    return w, h, decoded.fps


def _safe_part(text: str, what: str, allow_subdirs: bool) -> str:
    """A path piece from the CSV that stays inside ``--videos``; raises ValueError otherwise."""
    if not text or "\x00" in text:
        raise ValueError(f"empty or NUL in {what} {text!r}")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise ValueError(f"absolute {what} {text!r}")
    parts = re.split(r"[\\/]", text)
    if ".." in parts:
        raise ValueError(f"'..' in {what} {text!r}")
    if not allow_subdirs and len(parts) > 1:
        raise ValueError(f"path separator in {what} {text!r}")
    return text


def video_path(videos: Path, page_dir: str, videoid: str) -> Path:
    """``<videos>/<page_dir>/<videoid>.mp4``, refusing any row that would point outside ``videos``."""
    page_dir = page_dir.strip()
    rel = Path(f"{_safe_part(videoid, 'videoid', False)}.mp4")
    if page_dir:  # empty: the videos sit in --videos itself
        rel = Path(_safe_part(page_dir, "page_dir", True)) / rel
    path = videos / rel
    root = os.path.normpath(os.path.abspath(videos))
    if os.path.commonpath([root, os.path.normpath(os.path.abspath(path))]) != root:
        raise ValueError(f"{rel} leaves --videos")
    return path


def convert(
    csv_path: Path,
    videos: Path,
    out: Path,
    samples_per_shard: int = 1000,
    min_duration: float = 0.0,
    max_samples: int | None = None,
    probe_frames: int = 2,
    resume: bool = False,
) -> dict:
    """Write the shards; returns the dataset stats (also in ``<out>/stats.json``, status "complete")."""
    if not csv_path.exists():
        raise FileNotFoundError(f"CSV not found: {csv_path}")
    with (
        open(csv_path, newline="", encoding="utf-8") as fh,
        VideoShardWriter(out, samples_per_shard, resume=resume) as writer,
    ):
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks the WebVid columns {missing} (has {reader.fieldnames})")
        n_columns = len(reader.fieldnames or [])
        done = writer.resume_position  # data rows already in finished shards
        if done:
            print(f"resuming after row {done}: {writer.written} samples in {len(writer.shards)} finished shards")
        for row_index, row in enumerate(reader):
            if row_index < done:
                continue
            if max_samples is not None and writer.written >= max_samples:
                break
            writer.position = row_index + 1
            where = f"row{row_index + 2}"  # the CSV line of a one-line row (line 1 is the header)
            if None in row:  # csv puts the surplus cells of a long row under the key None
                writer.skip(where, f"bad row: {n_columns + len(row[None])} cells, the header has {n_columns}")
                continue
            short = [c for c in REQUIRED_COLUMNS if row.get(c) is None]
            if short:
                writer.skip(where, f"bad row: missing {short} (the header has {n_columns} cells)")
                continue
            vid = row["videoid"].strip()
            if not vid:
                writer.skip(where, "bad row: empty videoid")
                continue
            try:
                path = video_path(videos, row["page_dir"], vid)
            except ValueError as exc:
                writer.skip(vid, f"bad path: {exc}")
                continue
            try:
                duration = parse_iso_duration(row["duration"])
            except ValueError as exc:
                writer.skip(vid, f"bad duration: {exc}")
                continue
            if duration < min_duration:
                writer.skip(vid, f"too short: {duration:.1f}s < {min_duration}s")
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                writer.skip(vid, f"missing: {path} ({type(exc).__name__})")
                continue
            try:
                width, height, fps = probe_video(data, probe_frames)
            except VideoDecodeError as exc:
                writer.skip(vid, f"undecodable: {exc}")
                continue
            meta = {
                "url": row["contentUrl"],
                "videoid": vid,
                "name": row["name"],
                "page_idx": row.get("page_idx"),
                "page_dir": row["page_dir"],
                "duration": duration,
                "width": width,
                "height": height,
                "fps": fps,
            }
            writer.write(data, row["name"], meta)
    return writer.stats()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--csv", type=Path, required=True, help="WebVid CSV (videoid,name,page_idx,page_dir,duration,contentUrl)"
    )
    ap.add_argument(
        "--videos", type=Path, required=True, help="root of the downloads: <root>/<page_dir>/<videoid>.mp4"
    )
    ap.add_argument("--out", type=Path, required=True, help="output folder for {00000..}.tar shards")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument(
        "--min-duration", type=float, default=0.0, help="skip clips shorter than this (seconds, from the CSV)"
    )
    ap.add_argument("--max-samples", type=int, default=None, help="stop after writing this many samples")
    ap.add_argument("--probe-frames", type=int, default=2, help="frames decoded to check each video")
    ap.add_argument(
        "--resume", action="store_true", help="continue an unfinished job in --out after its last finished shard"
    )
    args = ap.parse_args(argv)
    stats = convert(
        args.csv,
        args.videos,
        args.out,
        args.samples_per_shard,
        args.min_duration,
        args.max_samples,
        args.probe_frames,
        resume=args.resume,
    )
    print(
        f"wrote {stats['written']} samples in {len(stats['shards'])} shards to {args.out}; "
        f"skipped {stats['skipped']} {stats['skip_reasons']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
