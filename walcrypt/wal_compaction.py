"""Compaction of the log: its point moved forward, the log reset under a snapshot ahead of it, and
the segments no longer needed found and forgotten (a mixin of :class:`walcrypt.wal.Wal`).

Concurrency contract: each step takes the WAL's write lock and then its index lock; the engine
runs a compaction's steps, and the purge after them, inside ``Wal.exclusive`` (see storage.py)."""

from __future__ import annotations

import threading
from bisect import bisect_right
from typing import TYPE_CHECKING

from .errors import CompactedError, UnavailableError
from .segment import Segment
from .wal_reads import LogReads


class LogCompaction(LogReads):
    # Host contract: provided by Wal (wal.py).
    write_lock: threading.RLock
    active: Segment | None

    if TYPE_CHECKING:
        def seal_active(self) -> None: ...

    def compact(self, index: int, term: int | None = None) -> None:
        """Discard entries <= index (logically; the engine removes segments below its purge floor)."""
        with self.write_lock, self._state:
            if index <= self.compacted_index:
                raise CompactedError(f"already compacted up to {self.compacted_index}")
            if index > self.last:
                raise UnavailableError(f"cannot compact up to {index}: the last index is {self.last}")
            if term is None:
                term = self.run_term[bisect_right(self.run_start, index) - 1]
            self.compacted_index, self.compacted_term = index, term

    def reset_to(self, index: int, term: int, reset_segment: int) -> None:
        """A snapshot at (index, term) replaces the log: every entry is discarded and the next
        entry is index + 1, written into a new segment.  ``reset_segment`` is the ID that segment
        will get (recorded with the compaction point): older segments are no part of the log any
        more, not even below ``index`` (see load), and are purged."""
        with self.write_lock:
            self.seal_active()                    # raises StoreFailedError on a failed WAL
            with self._state:
                self.truncate_view(0)
                self.compacted_index, self.compacted_term = index, term
                self.reset_segment = reset_segment
                self.last = index
                self.active = None                 # the next entry starts a new segment at index + 1
                self._cache.clear()

    def removable(self, floor: int) -> list[Segment]:
        """Sealed segments holding no visible entry above ``floor`` (never the newest or the active one)."""
        needed = {id(self.active)} if self.active is not None else set()
        n = len(self.view_first)
        for v in range(n):
            end = self.view_first[v + 1] - 1 if v + 1 < n else self.last
            if end > floor:
                needed.add(id(self.view_seg[v]))
        newest = self.segments[-1] if self.segments else None
        return [seg for seg in self.segments
                if seg.sealed and seg is not newest and id(seg) not in needed]

    def forget(self, segs: list[Segment]) -> None:
        ids = {id(s) for s in segs}
        with self._state:
            keep = [(f, s) for f, s in zip(self.view_first, self.view_seg) if id(s) not in ids]
            # one statement: an interruption never leaves the two lists of the view out of step
            self.segments, self.view_first, self.view_seg = (
                [s for s in self.segments if id(s) not in ids], [f for f, _ in keep], [s for _, s in keep])
            self._cache.clear()
        for s in segs:
            s.release()
