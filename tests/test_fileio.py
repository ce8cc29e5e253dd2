"""Atomic writes, file locks and hashing (show1_lightning/fileio.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from show1_lightning import fileio


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    fileio.atomic_write_json(target, {"a": 1})
    fileio.atomic_write_json(target, {"b": 2})
    assert json.loads(target.read_text()) == {"b": 2}
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    fileio.atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        fileio.atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_file_lock_non_blocking_sees_holder(tmp_path: Path) -> None:
    lock = tmp_path / ".lock"
    with fileio.file_lock(lock) as held:
        assert held
        import subprocess
        import sys

        code = (
            "import sys; from show1_lightning.fileio import file_lock\n"
            f"with file_lock({str(lock)!r}, blocking=False) as ok: sys.exit(0 if not ok else 3)"
        )
        assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
    with fileio.file_lock(lock, blocking=False) as held:
        assert held


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 3_000_000)
    assert fileio.sha256_file(p, chunk_size=1 << 16) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
