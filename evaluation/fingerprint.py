"""Which generator made an evaluation folder's videos: a fingerprint written into the folder, and a lock.

An evaluation resumes by skipping the videos already on disk, so the folder must never hold videos of two
generators: a second model evaluated into the same ``output_dir`` would otherwise find the first model's
videos and report them as its own. Rank 0 therefore

1. takes an exclusive lock on ``<output_dir>/.lock`` for the whole run (a second job on the same folder is
   refused at once, naming the holder), and
2. compares the generator's fingerprint with ``<output_dir>/generator.json``: the same fingerprint resumes;
   another one, with videos on disk, is refused with the keys that differ. With no videos yet, the file is
   (re)written.

The fingerprint is a SHA-256 over the resolved generator config (without ``name`` and ``device``, which do not
change a video) and the evaluation ``precision`` (autocast around the generator), where every string naming an
existing file is replaced by the SHA-256 of its bytes and every existing folder by the hash of its files: the
same weights under another path give the same fingerprint, changed weights under the same path do not.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from show1_lightning.fileio import atomic_write_json, file_lock, sha256_file

FINGERPRINT_NAME = "generator.json"
LOCK_NAME = ".lock"
LOCK_OWNER_NAME = ".lock.owner.json"
# Top-level generator keys that do not change the videos (strict_sizes: a cascade either runs the same or refuses).
IGNORED_KEYS = ("name", "device", "strict_sizes")


class GeneratorMismatchError(ValueError):
    """The output folder holds videos of another generator."""


class OutputDirBusyError(RuntimeError):
    """Another evaluation holds the output folder's lock."""


def hash_path(path: str | Path, _cache: dict[str, str] | None = None) -> str:
    """SHA-256 of a file's bytes, or of a folder: every non-hidden file below it, by relative path, sorted."""
    path = Path(path)
    key = str(path.resolve())
    if _cache is not None and key in _cache:
        return _cache[key]
    if path.is_file():
        digest = sha256_file(path)
    else:
        h = hashlib.sha256()
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = sub.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):  # locks, temp files, caches
                continue
            h.update(f"{rel.as_posix()}\0{sha256_file(sub)}\n".encode())
        digest = h.hexdigest()
    if _cache is not None:
        _cache[key] = digest
    return digest


def _is_path(x: str) -> bool:
    return 0 < len(x) < 4096 and "\n" not in x and os.path.exists(x)


def _normalise(node: Any, weights: dict[str, str], skip: tuple[Path, ...]) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _normalise(v, weights, skip) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_normalise(v, weights, skip) for v in node]
    if isinstance(node, str) and _is_path(node):
        resolved = Path(node).resolve()
        if resolved in skip:  # the output's own video folder (scoring in place): its content changes as we go
            return {"path": "<output videos>"}
        digest = hash_path(resolved)
        weights[str(resolved)] = digest
        return {"sha256": digest}
    return node


def generator_fingerprint(
    generator_cfg: Mapping[str, Any], precision: str, video_dir: str | Path | None = None
) -> dict[str, Any]:
    """The fingerprint of a (resolved, plain) generator config: ``{"fingerprint", "content", "weights"}``.

    ``content`` is what is hashed (the config with file paths replaced by their hashes, and the precision);
    ``weights`` maps every file or folder named in the config to its SHA-256.
    """
    cfg = {k: v for k, v in dict(generator_cfg).items() if k not in IGNORED_KEYS}
    weights: dict[str, str] = {}
    skip = (Path(video_dir).resolve(),) if video_dir is not None else ()
    content = {"generator": _normalise(cfg, weights, skip), "precision": str(precision)}
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return {"fingerprint": hashlib.sha256(blob).hexdigest(), "content": content, "weights": weights}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and not ("sha256" in node and len(node) == 1):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list):
        out = {}
        for i, v in enumerate(node):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 8) -> list[str]:
    """Human-readable ``key: old -> new`` lines for two fingerprint contents."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):

            def show(v: Any) -> str:
                if isinstance(v, Mapping) and "sha256" in v:
                    return f"file sha256 {v['sha256'][:12]}"
                return repr(v)

            lines.append(f"{key}: {show(a.get(key, '<absent>'))} -> {show(b.get(key, '<absent>'))}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _video_count(video_dir: Path) -> int:
    return sum(1 for p in video_dir.glob("*.mp4") if not p.name.startswith(".")) if video_dir.is_dir() else 0


def check_or_write_fingerprint(out_dir: str | Path, fingerprint: Mapping[str, Any], in_place: bool = False) -> str:
    """Refuse a folder whose videos another generator made; else record ``fingerprint`` in it.

    Returns "new", "same" or "in place". ``in_place``: the generator serves the output's own video folder
    (re-scoring finished videos without re-encoding); it can only read what is there, so it cannot mix
    models, and the folder's record (if any) is kept.
    """
    out_dir = Path(out_dir)
    path = out_dir / FINGERPRINT_NAME
    video_dir = out_dir / "videos"
    n_videos = _video_count(video_dir)
    if in_place:
        return "in place"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise GeneratorMismatchError(
                f"{path} is unreadable ({e}); cannot tell which generator made the {n_videos} videos in {video_dir}"
            ) from e
        if old.get("fingerprint") == fingerprint["fingerprint"]:
            return "same"
        if n_videos:
            diff = describe_difference(old.get("content", {}), fingerprint["content"])
            raise GeneratorMismatchError(
                f"{out_dir} holds {n_videos} videos of another generator (fingerprint "
                f"{str(old.get('fingerprint'))[:16]} in {FINGERPRINT_NAME}, this run "
                f"{fingerprint['fingerprint'][:16]}); scoring them as this generator's would mix two models. "
                "What differs:\n  "
                + "\n  ".join(diff or ["(content equal, fingerprint rule changed)"])
                + "\nEvaluate into another folder (run_name=... or output_dir=...), "
                f"or delete {video_dir} to start over."
            )
    elif n_videos:
        raise GeneratorMismatchError(
            f"{video_dir} holds {n_videos} videos but {out_dir} has no {FINGERPRINT_NAME}: nothing says which "
            "generator made them, so they cannot be resumed or scored as this generator's. Evaluate into another "
            f"folder (run_name=... or output_dir=...), move the videos away, or score them as they are with "
            f"generator=folder generator.root={video_dir} output_dir={out_dir}."
        )
    record = {
        **fingerprint,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
    }
    atomic_write_json(path, record)
    return "new"


@contextlib.contextmanager
def claim_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``<out_dir>/.lock`` for the block; raise :class:`OutputDirBusyError` at once if another job holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK_NAME
    owner_path = out_dir / LOCK_OWNER_NAME
    with file_lock(lock, blocking=False) as held:
        if not held:
            try:
                owner = json.loads(owner_path.read_text())
                who = f" (held by pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')})"
            except (OSError, ValueError):
                who = ""
            raise OutputDirBusyError(
                f"another evaluation is writing {out_dir}{who}: two jobs on one output folder would interleave "
                "their videos and reports. Wait for it, or use another run_name / output_dir."
            )
        atomic_write_json(
            owner_path,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        yield out_dir
