"""Turn captioned videos into tar shards in the video2dataset layout (``show1-make-shards``).

Inputs (``--format auto`` picks one from the input):

- ``webvid``: the WebVid CSV (``videoid,name,page_idx,page_dir,duration,contentUrl``) plus ``--videos``, the
  root of the downloads (``<videos>/<page_dir>/<videoid>.mp4``);
- ``csv`` / ``jsonl``: your own rows of (video path, caption [, any other columns]). The video column is the
  first of ``video, video_path, path, file, filename, file_name`` present (or ``--video-column``), the caption
  the first of ``caption, text, prompt, name, description`` (or ``--caption-column``). Relative paths are
  resolved against ``--videos`` (default: the folder of the list file); absolute paths are taken as they are.
  URLs are not downloaded: download first (e.g. with video2dataset, whose shards load as they are);
- ``folder``: a folder of videos (``.mp4 .webm .mkv .mov .avi .m4v``, searched recursively, in sorted order),
  each captioned by a sidecar ``<name>.txt``; or a folder holding ``captions.csv`` / ``captions.jsonl`` /
  ``metadata.csv`` / ``metadata.jsonl`` (read as above, paths relative to the folder).

Every video is opened and its first frames decoded. Malformed rows, paths that leave ``--videos`` (WebVid only),
URLs, missing captions, missing, unreadable, undecodable and too-short videos are skipped, counted per reason and
listed in ``<out>/stats.json`` (``skipped``, ``skip_reasons``, ``skipped_samples``); they never abort the job.
``stats.json`` says ``in_progress`` while the job runs, ``aborted`` after an exception, ``complete`` at the end;
``--resume`` continues an unfinished job after its last finished shard (see ``VideoShardWriter``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import av

from show1_lightning.data.shards import VideoShardWriter
from show1_lightning.data.video_io import VideoDecodeError, decode_video

__all__ = [
    "REQUIRED_COLUMNS",
    "VIDEO_COLUMNS",
    "CAPTION_COLUMNS",
    "VIDEO_EXTENSIONS",
    "MANIFEST_NAMES",
    "Row",
    "Skip",
    "parse_iso_duration",
    "probe_video",
    "video_path",
    "webvid_rows",
    "table_rows",
    "folder_rows",
    "write_rows",
    "convert_webvid",
    "make_shards",
    "main",
]

_ISO_DURATION = re.compile(r"^P(?:(?P<d>\d+)D)?T?(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?$")
#: The WebVid CSV columns the converter needs.
REQUIRED_COLUMNS = ("videoid", "name", "page_dir", "duration", "contentUrl")
#: Column names tried, in order, for the video path and the caption of your own CSV / JSONL rows.
VIDEO_COLUMNS = ("video", "video_path", "path", "file", "filename", "file_name")
CAPTION_COLUMNS = ("caption", "text", "prompt", "name", "description")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
#: A folder holding one of these is read as a list of rows (paths relative to the folder), not by sidecars.
MANIFEST_NAMES = ("captions.csv", "captions.jsonl", "metadata.csv", "metadata.jsonl")
FORMATS = ("auto", "webvid", "csv", "jsonl", "folder")

ProbeFn = Callable[[bytes, int], tuple[int, int, float]]


@dataclass
class Row:
    """One usable input row: where the video is, its caption, the columns kept in ``KEY.json``.

    ``duration`` (seconds) is checked against ``min_duration`` before the file is read when the input states
    it; otherwise the container header's duration is used after probing."""

    source_id: str
    path: Path
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    duration: float | None = None


@dataclass
class Skip:
    """An input row that cannot be used; ``reason`` is ``"<class>: <details>"`` (the class is what is counted)."""

    source_id: str
    reason: str


def parse_iso_duration(text: str) -> float:
    """Seconds of an ISO-8601 duration such as ``PT00H00M17S``; raises ValueError when malformed."""
    m = _ISO_DURATION.match(text.strip())
    if not m or not any(m.groupdict().values()):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    g = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    return g["d"] * 86400 + g["h"] * 3600 + g["m"] * 60 + g["s"]


def _parse_duration(value: Any) -> float:
    """Seconds from a number, a numeric string or an ISO-8601 duration; raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        return parse_iso_duration(text)


def probe_video(data: bytes, probe_frames: int) -> tuple[int, int, float]:
    """Decode the first frames to check the video is usable; returns (width, height, fps)."""
    decoded = decode_video(data, max_frames=probe_frames)
    _, h, w, _ = decoded.frames.shape
    return w, h, decoded.fps


def _header_duration(path: Path) -> float | None:
    """Seconds the container header states (None when it states nothing or cannot be read)."""
    try:
        with av.open(str(path), mode="r") as container:
            stream = container.streams.video[0] if container.streams.video else None
            if stream is not None and stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            return container.duration / av.time_base if container.duration else None
    except Exception:  # the probe already decoded it; a header without a duration is not an error
        return None


# ------------------------------------------------------------------------------------------------
# Readers: each yields one Row or Skip per input row, in a stable order (resume counts rows)
# ------------------------------------------------------------------------------------------------


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


def webvid_rows(csv_path: Path, videos: Path) -> Iterator[Row | Skip]:
    """Rows of a WebVid CSV; paths are confined to ``videos`` (the CSV is third-party input)."""
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks the WebVid columns {missing} (has {reader.fieldnames})")
        n_columns = len(reader.fieldnames or [])
        for row_index, row in enumerate(reader):
            where = f"row{row_index + 2}"  # the CSV line of a one-line row (line 1 is the header)
            if None in row:  # csv puts the surplus cells of a long row under the key None
                yield Skip(where, f"bad row: {n_columns + len(row[None])} cells, the header has {n_columns}")
                continue
            short = [c for c in REQUIRED_COLUMNS if row.get(c) is None]
            if short:
                yield Skip(where, f"bad row: missing {short} (the header has {n_columns} cells)")
                continue
            vid = row["videoid"].strip()
            if not vid:
                yield Skip(where, "bad row: empty videoid")
                continue
            try:
                path = video_path(videos, row["page_dir"], vid)
            except ValueError as exc:
                yield Skip(vid, f"bad path: {exc}")
                continue
            try:
                duration = parse_iso_duration(row["duration"])
            except ValueError as exc:
                yield Skip(vid, f"bad duration: {exc}")
                continue
            meta = {
                "url": row["contentUrl"],
                "videoid": vid,
                "name": row["name"],
                "page_idx": row.get("page_idx"),
                "page_dir": row["page_dir"],
                "duration": duration,
            }
            yield Row(vid, path, row["name"], meta, duration)


def _pick(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    cols = list(columns)
    if wanted is not None:
        return wanted if wanted in cols else None
    lower = {c.lower(): c for c in cols}
    return next((lower[c] for c in candidates if c in lower), None)


def _table_row(
    record: dict[str, Any], where: str, root: Path, video_column: str | None, caption_column: str | None
) -> Row | Skip:
    """A Row from one CSV / JSONL record, or the Skip saying why not."""
    vcol = _pick(record, video_column, VIDEO_COLUMNS, "video")
    ccol = _pick(record, caption_column, CAPTION_COLUMNS, "caption")
    if vcol is None:
        return Skip(where, f"bad row: no video column (tried {video_column or list(VIDEO_COLUMNS)})")
    value = record.get(vcol)
    if value is None or not str(value).strip():
        return Skip(where, f"bad row: empty {vcol!r}")
    text = str(value).strip()
    if "\x00" in text:
        return Skip(where, f"bad path: NUL in {text!r}")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        return Skip(text, "url: not downloaded (download the videos first, e.g. with video2dataset)")
    caption = record.get(ccol) if ccol is not None else None
    if caption is None or not str(caption).strip():
        return Skip(text, f"no caption: empty or missing {ccol or caption_column or list(CAPTION_COLUMNS)}")
    path = Path(text)
    if not path.is_absolute():
        path = root / path
    duration = None
    if record.get("duration") not in (None, ""):
        try:
            duration = _parse_duration(record["duration"])
        except ValueError as exc:
            return Skip(text, f"bad duration: {exc}")
    meta = {k: v for k, v in record.items() if k not in (vcol, ccol)}
    meta.update({"url": None, "path": text})
    return Row(text, path, str(caption).strip(), meta, duration)


def table_rows(
    path: Path,
    fmt: str,
    root: Path | None = None,
    video_column: str | None = None,
    caption_column: str | None = None,
) -> Iterator[Row | Skip]:
    """Rows of your own CSV (``fmt="csv"``, with a header) or JSONL (one JSON object per line).

    Relative video paths resolve against ``root`` (default: the list file's folder)."""
    root = path.parent if root is None else root
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if video_column is not None and video_column not in header:
                raise ValueError(f"{path}: no column {video_column!r} (has {header})")
            if video_column is None and _pick(header, None, VIDEO_COLUMNS, "video") is None:
                raise ValueError(f"{path}: none of the video columns {list(VIDEO_COLUMNS)} (has {header})")
            for i, rec in enumerate(reader):
                where = f"row{i + 2}"
                if None in rec:
                    yield Skip(where, f"bad row: {len(header) + len(rec[None])} cells, the header has {len(header)}")
                    continue
                yield _table_row(rec, where, root, video_column, caption_column)
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                where = f"line{i + 1}"
                if not line.strip():
                    yield Skip(where, "bad row: empty line")
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    yield Skip(where, f"bad row: invalid JSON ({exc})")
                    continue
                if not isinstance(rec, dict):
                    yield Skip(where, f"bad row: a JSON {type(rec).__name__}, not an object")
                    continue
                yield _table_row(rec, where, root, video_column, caption_column)
    else:
        raise ValueError(f"table format must be 'csv' or 'jsonl', got {fmt!r}")


def folder_rows(
    folder: Path, video_column: str | None = None, caption_column: str | None = None
) -> Iterator[Row | Skip]:
    """Rows of a folder: its ``captions.csv``/``.jsonl`` (or ``metadata.*``) when present, else every video file
    (recursively, sorted) with the caption in the sidecar ``<name>.txt`` next to it."""
    for name in MANIFEST_NAMES:
        manifest = folder / name
        if manifest.is_file():
            yield from table_rows(manifest, manifest.suffix.lstrip("."), folder, video_column, caption_column)
            return
    videos = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    for video in videos:
        rel = video.relative_to(folder).as_posix()
        sidecar = video.with_suffix(".txt")
        try:
            caption = sidecar.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            yield Skip(rel, f"no caption: {sidecar.name} not found")
            continue
        except (OSError, UnicodeDecodeError) as exc:
            yield Skip(rel, f"no caption: {sidecar.name} unreadable ({type(exc).__name__})")
            continue
        if not caption:
            yield Skip(rel, f"no caption: {sidecar.name} is empty")
            continue
        yield Row(rel, video, caption, {"url": None, "path": rel})


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def write_rows(
    rows: Iterable[Row | Skip],
    out: Path,
    samples_per_shard: int = 1000,
    min_duration: float = 0.0,
    max_samples: int | None = None,
    probe_frames: int = 2,
    resume: bool = False,
    probe: ProbeFn | None = None,
) -> dict:
    """Write the usable rows as shards, skip and count the rest; returns the stats (``<out>/stats.json``).

    The input position saved with each shard is the number of rows consumed, so ``resume=True`` continues
    after the last finished shard provided the rows come in the same order."""
    probe = probe or probe_video
    with VideoShardWriter(out, samples_per_shard, resume=resume) as writer:
        done = writer.resume_position  # rows already in finished shards
        if done:
            print(f"resuming after row {done}: {writer.written} samples in {len(writer.shards)} finished shards")
        for row_index, row in enumerate(rows):
            if row_index < done:
                continue
            if max_samples is not None and writer.written >= max_samples:
                break
            writer.position = row_index + 1
            if isinstance(row, Skip):
                writer.skip(row.source_id, row.reason)
                continue
            if row.duration is not None and row.duration < min_duration:
                writer.skip(row.source_id, f"too short: {row.duration:.1f}s < {min_duration}s")
                continue
            try:
                data = row.path.read_bytes()
            except OSError as exc:
                writer.skip(row.source_id, f"missing: {row.path} ({type(exc).__name__})")
                continue
            try:
                width, height, fps = probe(data, probe_frames)
            except VideoDecodeError as exc:
                writer.skip(row.source_id, f"undecodable: {exc}")
                continue
            meta = dict(row.meta)
            if row.duration is None:
                duration = _header_duration(row.path)
                if duration is not None:
                    if duration < min_duration:
                        writer.skip(row.source_id, f"too short: {duration:.1f}s < {min_duration}s")
                        continue
                    meta["duration"] = duration
            meta.update({"width": width, "height": height, "fps": fps})
            writer.write(data, row.caption, meta)
    return writer.stats()


def convert_webvid(
    csv_path: Path,
    videos: Path,
    out: Path,
    samples_per_shard: int = 1000,
    min_duration: float = 0.0,
    max_samples: int | None = None,
    probe_frames: int = 2,
    resume: bool = False,
    probe: ProbeFn | None = None,
) -> dict:
    """The WebVid CSV + downloaded videos as shards; returns the stats (also ``<out>/stats.json``)."""
    if not csv_path.exists():
        raise FileNotFoundError(f"CSV not found: {csv_path}")
    return write_rows(
        webvid_rows(csv_path, videos), out, samples_per_shard, min_duration, max_samples, probe_frames, resume, probe
    )


def detect_format(source: Path) -> str:
    """``folder`` for a directory; ``jsonl`` for ``.jsonl``/``.json``; for a CSV, ``webvid`` when it has the
    WebVid columns, else ``csv``."""
    if source.is_dir():
        return "folder"
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv", ".txt") or source.is_file():
        with open(source, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        return "webvid" if all(c in header for c in REQUIRED_COLUMNS) else "csv"
    raise FileNotFoundError(f"input not found: {source}")


def make_shards(
    source: Path,
    out: Path,
    fmt: str = "auto",
    videos: Path | None = None,
    video_column: str | None = None,
    caption_column: str | None = None,
    samples_per_shard: int = 1000,
    min_duration: float = 0.0,
    max_samples: int | None = None,
    probe_frames: int = 2,
    resume: bool = False,
) -> dict:
    """Shards from a WebVid CSV, your own CSV / JSONL, or a folder (see the module docstring); returns the stats."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "webvid":
        if videos is None:
            raise ValueError("a WebVid CSV needs --videos (the root of the downloads)")
        return convert_webvid(
            source, videos, out, samples_per_shard, min_duration, max_samples, probe_frames, resume=resume
        )
    if fmt == "folder":
        if not source.is_dir():
            raise NotADirectoryError(f"--format folder needs a folder, got {source}")
        rows: Iterable[Row | Skip] = folder_rows(source, video_column, caption_column)
    else:
        rows = table_rows(source, fmt, videos, video_column, caption_column)
    return write_rows(rows, out, samples_per_shard, min_duration, max_samples, probe_frames, resume)


def summary(stats: dict, out: Path) -> str:
    """The one-line report printed at the end of a conversion."""
    return (
        f"wrote {stats['written']} samples in {len(stats['shards'])} shards to {out}; "
        f"skipped {stats['skipped']} {stats['skip_reasons']}"
    )


def main(argv: list[str] | None = None) -> int:
    """``show1-make-shards INPUT --out OUT [--format ...]``."""
    ap = argparse.ArgumentParser(
        prog="show1-make-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("input", type=Path, help="a WebVid CSV, your own CSV / JSONL of (video, caption), or a folder")
    ap.add_argument("--out", type=Path, required=True, help="output folder for {00000..}.tar shards")
    ap.add_argument("--format", choices=FORMATS, default="auto", help="input kind (auto: from the input)")
    ap.add_argument(
        "--videos",
        type=Path,
        default=None,
        help="root of the videos: WebVid <root>/<page_dir>/<videoid>.mp4 (required); CSV/JSONL relative paths "
        "(default: the list file's folder)",
    )
    ap.add_argument("--video-column", default=None, help=f"CSV/JSONL video path column (default: {VIDEO_COLUMNS})")
    ap.add_argument("--caption-column", default=None, help=f"CSV/JSONL caption column (default: {CAPTION_COLUMNS})")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--min-duration", type=float, default=0.0, help="skip clips shorter than this (seconds)")
    ap.add_argument("--max-samples", type=int, default=None, help="stop after writing this many samples")
    ap.add_argument("--probe-frames", type=int, default=2, help="frames decoded to check each video")
    ap.add_argument(
        "--resume", action="store_true", help="continue an unfinished job in --out after its last finished shard"
    )
    args = ap.parse_args(argv)
    stats = make_shards(
        args.input,
        args.out,
        args.format,
        args.videos,
        args.video_column,
        args.caption_column,
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
