"""Evaluation ranks that fail together: one rank raising stops every rank at its next sync point.

Without this, a rank that raises (a corrupt video, a full disk, a bad config value only one rank reaches)
leaves the others blocked in the next collective until the NCCL timeout (minutes to hours, the GPUs idle).
The evaluation runner splits its work into *phases* of rank-local work separated by *sync points*; every
collective operation comes right after a sync point, where all ranks are known to be alive and in step.

- A rank whose phase raises writes a failure record (rank, phase, error) into the process group's key-value
  store at once and re-raises; every other rank raises :class:`PeerFailedError` naming it as soon as it
  reaches (or is waiting at) a sync point.
- A sync point is a store-based barrier that polls: while waiting it checks the failure record and the other
  ranks' heartbeats (a daemon thread per rank bumps a counter every ``heartbeat_s``); a rank whose heartbeat
  stops for ``peer_timeout_s`` (killed, segfault, node lost) fails the wait with :class:`PeerLostError`.
  Long phases (generating thousands of videos) are not timed out as long as every rank is alive.
- ``sync_timeout_s`` (optional) bounds any single wait, for ranks that are alive but stuck.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

_SESSIONS = itertools.count()  # every rank creates its guards in the same order: same namespace everywhere


class PeerFailedError(RuntimeError):
    """Another rank raised; the message names it, the phase and its error."""


class PeerLostError(RuntimeError):
    """Another rank stopped answering (no heartbeat for ``peer_timeout_s``) or a wait timed out."""


class RankGuard:
    """Sync points and failure propagation over a ``torch.distributed`` store (see the module docstring).

    Args:
        store: the process group's store (``TCPStore``/``PrefixStore``; ``None``: a single process, no-op).
        rank, world_size: this process and the job size.
        peer_timeout_s: a rank without heartbeat for this long is declared lost.
        sync_timeout_s: most seconds one sync point may wait (None: no limit while every rank is alive).
        heartbeat_s: heartbeat period.
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        peer_timeout_s: float = 300.0,
        sync_timeout_s: float | None = None,
        heartbeat_s: float = 2.0,
    ) -> None:
        self.store, self.rank, self.world_size = store, int(rank), int(world_size)
        self.peer_timeout_s = float(peer_timeout_s)
        self.sync_timeout_s = None if sync_timeout_s is None else float(sync_timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.ns = f"show1_eval/{restart}/{next(_SESSIONS)}"
        self._count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = store is not None and self.world_size > 1
        if self.active:
            self._beat_store = store.clone() if hasattr(store, "clone") else store
            self._thread = threading.Thread(target=self._heartbeat, name="show1-eval-heartbeat", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ keys
    def _key(self, *parts: Any) -> str:
        return "/".join([self.ns, *map(str, parts)])

    def _heartbeat(self) -> None:
        key = self._key("hb", self.rank)
        while not self._stop.is_set():
            try:
                self._beat_store.add(key, 1)
            except Exception:  # store gone (rank 0 exited): the waits will notice
                return
            self._stop.wait(self.heartbeat_s)

    def close(self) -> None:
        """Stop the heartbeat thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 1.0)

    # ------------------------------------------------------------------ failure
    def failure(self) -> dict[str, Any] | None:
        """The failure record written by a rank that raised, if any."""
        key = self._key("failed")
        if not self.store.check([key]):
            return None
        return json.loads(self.store.get(key).decode())

    def fail(self, phase: str, exc: BaseException, linger_s: float = 5.0) -> None:
        """Record this rank's failure (the first record wins) and give the others a moment to read it.

        The lingering matters when rank 0 hosts the store: its exit would otherwise take the record along.
        """
        if not self.active:
            return
        record = json.dumps({"rank": self.rank, "phase": phase, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        try:
            self.store.compare_set(self._key("failed"), "", record)
            deadline = time.monotonic() + linger_s
            acks = [self._key("ack", r) for r in range(self.world_size) if r != self.rank]
            while time.monotonic() < deadline and not self.store.check(acks):
                time.sleep(0.05)
        except Exception as e:  # best effort: the store may already be gone
            log.warning("rank %d: could not record its failure for the other ranks: %s", self.rank, e)

    def _raise_peer_failure(self, rec: dict[str, Any], phase: str, linger_s: float = 5.0) -> None:
        with contextlib.suppress(Exception):
            self.store.set(self._key("ack", self.rank), "1")
            if self.rank == 0:  # the store's host stays until the other ranks have read the record too
                self._wait_for(
                    [self._key("ack", r) for r in range(self.world_size) if r not in (self.rank, int(rec["rank"]))],
                    linger_s,
                )
        raise PeerFailedError(
            f"rank {self.rank}: stopping at '{phase}' because rank {rec['rank']} failed during "
            f"'{rec['phase']}': {rec['error']}"
        )

    # ------------------------------------------------------------------ sync
    def sync(self, phase: str) -> None:
        """Wait until every rank has finished ``phase``; raise if a rank failed or was lost."""
        if not self.active:
            return
        n = self._count
        self._count += 1
        self.store.set(self._key("sync", n, self.rank), "1")
        arrived_keys = [self._key("sync", n, r) for r in range(self.world_size)]
        hb_keys = {r: self._key("hb", r) for r in range(self.world_size) if r != self.rank}
        last_beat: dict[int, tuple[bytes, float]] = {}
        start = time.monotonic()
        poll, next_beat_check = 0.01, start
        while True:
            rec = self.failure()
            if rec is not None:
                self._raise_peer_failure(rec, phase)
            if self.store.check(arrived_keys):
                self._leave(n)
                return
            now = time.monotonic()
            if now >= next_beat_check:  # heartbeats of the ranks not here yet
                next_beat_check = now + 1.0
                missing = [r for r in hb_keys if not self.store.check([self._key("sync", n, r)])]
                for r in missing:
                    value = self.store.get(hb_keys[r]) if self.store.check([hb_keys[r]]) else b""
                    seen = last_beat.get(r)
                    if seen is None or seen[0] != value:
                        last_beat[r] = (value, now)
                    elif now - seen[1] > self.peer_timeout_s:
                        raise PeerLostError(
                            f"rank {self.rank}: rank {r} sent no heartbeat for {now - seen[1]:.0f} s while the others "
                            f"waited at '{phase}' (peer_timeout_s={self.peer_timeout_s:g}): it died or hangs"
                        )
                if self.sync_timeout_s is not None and now - start > self.sync_timeout_s:
                    raise PeerLostError(
                        f"rank {self.rank}: waited {now - start:.0f} s at '{phase}' for ranks {missing} "
                        f"(sync_timeout_s={self.sync_timeout_s:g})"
                    )
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)

    def _wait_for(self, keys: list[str], seconds: float) -> bool:
        deadline, poll = time.monotonic() + seconds, 0.005
        while time.monotonic() < deadline:
            if self.store.check(keys):
                return True
            time.sleep(poll)
            poll = min(poll * 1.5, 0.2)
        return False

    def _leave(self, n: int) -> None:
        """Rank 0 hosts the store (env:// rendezvous): it waits until every rank has seen the sync complete, so
        that a last sync followed by rank 0's exit cannot pull the store from under a rank still polling."""
        self.store.set(self._key("left", n, self.rank), "1")
        if self.rank == 0:
            left = [self._key("left", n, r) for r in range(self.world_size)]
            if not self._wait_for(left, max(30.0, 10 * self.heartbeat_s)):
                log.warning("rank 0: not every rank confirmed sync point %d within the wait; going on", n)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run rank-local work; on an exception tell the other ranks and re-raise, else sync at the end."""
        try:
            yield
        except (PeerFailedError, PeerLostError):
            raise
        except BaseException as e:
            self.fail(name, e)
            raise
        self.sync(name)
