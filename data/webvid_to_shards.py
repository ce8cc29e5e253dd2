"""Convert a WebVid CSV plus a folder of downloaded videos into tar shards (video2dataset layout).

    python data/webvid_to_shards.py --csv results_2M_train.csv --videos /data/webvid/videos \
        --out /data/webvid/shards --samples-per-shard 1000

The CSV has the columns ``videoid,name,page_idx,page_dir,duration,contentUrl`` (``name`` is the
caption, ``duration`` ISO-8601 like ``PT00H00M17S``); each video is expected at
``<videos>/<page_dir>/<videoid>.mp4``. Missing, unreadable, undecodable or too-short videos are
skipped and listed with their reason in ``stats.json``; they never abort the job.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from show1_lightning.data.shards import VideoShardWriter  # noqa: E402
from show1_lightning.data.video_io import VideoDecodeError, decode_video  # noqa: E402

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


def convert(
    csv_path: Path,
    videos: Path,
    out: Path,
    samples_per_shard: int = 1000,
    min_duration: float = 0.0,
    max_samples: int | None = None,
    probe_frames: int = 2,
) -> dict:
    """Write the shards; returns the dataset stats (also in ``<out>/stats.json``)."""
    if not csv_path.exists():
        raise FileNotFoundError(f"CSV not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as fh, VideoShardWriter(out, samples_per_shard) as writer:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks the WebVid columns {missing} (has {reader.fieldnames})")
        for row in reader:
            if max_samples is not None and writer.written >= max_samples:
                break
            vid = (row.get("videoid") or "").strip()
            if not vid:
                writer.skip(f"row{reader.line_num}", "bad row: empty videoid")
                continue
            try:
                duration = parse_iso_duration(row["duration"])
            except ValueError as exc:
                writer.skip(vid, f"bad duration: {exc}")
                continue
            if duration < min_duration:
                writer.skip(vid, f"too short: {duration:.1f}s < {min_duration}s")
                continue
            path = videos / row["page_dir"] / f"{vid}.mp4"
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
    ap.add_argument("--csv", type=Path, required=True, help="WebVid CSV (videoid,name,page_idx,page_dir,duration,contentUrl)")
    ap.add_argument("--videos", type=Path, required=True, help="root of the downloads: <root>/<page_dir>/<videoid>.mp4")
    ap.add_argument("--out", type=Path, required=True, help="output folder for {00000..}.tar shards")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--min-duration", type=float, default=0.0, help="skip clips shorter than this (seconds, from the CSV)")
    ap.add_argument("--max-samples", type=int, default=None, help="stop after writing this many samples")
    ap.add_argument("--probe-frames", type=int, default=2, help="frames decoded to check each video")
    args = ap.parse_args(argv)
    stats = convert(args.csv, args.videos, args.out, args.samples_per_shard, args.min_duration,
                    args.max_samples, args.probe_frames)
    print(f"wrote {stats['written']} samples in {len(stats['shards'])} shards to {args.out}; "
          f"skipped {stats['skipped']} {stats['skip_reasons']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
