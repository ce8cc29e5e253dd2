"""File helpers shared by training, data tooling and evaluation: atomic writes, file locks, hashing, build-once caches.

A kill at any moment must leave either the old file or the new one, never half of one: every report, marker,
metadata or export file is written to a temporary sibling and moved into place with ``os.replace`` (atomic on
POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Yields True when the lock is held; with ``blocking=False`` yields False at once if another process holds it.
    The lock is released when the block ends or the process dies (the kernel drops it with the descriptor).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(src: str | Path, dst: str | Path) -> Path:
    """Move the finished folder ``src`` to ``dst`` (same filesystem), replacing an existing ``dst``.

    A new ``dst`` appears with one ``rename``; an existing one is swapped with ``src`` atomically where the
    kernel and filesystem allow (``renameat2(RENAME_EXCHANGE)``), else moved aside first (a kill between the two
    renames leaves the old folder as a hidden ``.<name>.old-*`` sibling, never a half-written ``dst``). The old
    content is then deleted.
    """
    import shutil
    import uuid

    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.rename(src, dst)
        return dst
    if _rename_exchange(src, dst):
        shutil.rmtree(src)  # now the old content
        return dst
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old)
    return dst


def temp_sibling_dir(dst: str | Path) -> Path:
    """A new hidden folder beside ``dst`` (same filesystem) to build ``dst``'s content in, for :func:`replace_dir`."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the finished folder gets the usual permissions
    return tmp


DONE_MARKER = "DONE.json"


def build_once(root: str | Path, is_current: Callable[[Any], bool], build: Callable[[], Any]) -> Any:
    """A folder built once and reused: ``<root>/DONE.json`` says what was built; build again when it is stale.

    ``is_current(marker)`` judges the parsed content of ``DONE.json`` (e.g. "the recipe's parameters match");
    when it is missing, unreadable or not current, ``build()`` fills ``root`` (it may replace the folder, e.g.
    with :func:`replace_dir`) and returns the marker content, which is written last, atomically. A stale marker
    is deleted before building, so a build killed half-way is never taken as done. Several processes (DDP ranks)
    may call this at once: an exclusive lock on the sibling file ``.<root name>.lock`` serialises them, and the
    ones that waited find the marker.

    Returns:
        The marker content (found or just written).
    """
    root = Path(root)
    marker = root / DONE_MARKER

    def current() -> tuple[bool, Any]:
        try:
            content = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False, None
        return bool(is_current(content)), content

    ok, content = current()
    if ok:
        return content
    with file_lock(root.parent / f".{root.name}.lock"):  # other processes wait here, then find the marker
        ok, content = current()
        if ok:
            return content
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()  # stale: invalidated before the data is touched
        content = build()
        atomic_write_json(marker, content)
    return content
