"""Convert a WebVid CSV plus a folder of downloaded videos into tar shards (video2dataset layout).

    python data/webvid_to_shards.py --csv results_2M_train.csv --videos /data/webvid/videos \
        --out /data/webvid/shards --samples-per-shard 1000

A thin wrapper kept for existing commands: the converter lives in ``show1_lightning.data.make_shards``
(``show1-make-shards``, which also reads your own CSV / JSONL / folder of captioned videos).

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
from pathlib import Path

from show1_lightning.data.make_shards import (  # noqa: F401  (re-exported for existing callers)
    REQUIRED_COLUMNS,
    convert_webvid,
    parse_iso_duration,
    probe_video,
    summary,
    video_path,
)


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
    # This module's probe_video is looked up at call time, so replacing it here (tests) takes effect.
    return convert_webvid(
        csv_path,
        videos,
        out,
        samples_per_shard,
        min_duration,
        max_samples,
        probe_frames,
        resume=resume,
        probe=lambda data, frames: probe_video(data, frames),
    )


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
    print(summary(stats, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
