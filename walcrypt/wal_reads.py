"""The read side of the log, a mixin of walcrypt.wal.Wal: the in-memory index assembled at open
(newest segment first; a log reset excludes older segments), and the queries - first and last
index, the term at an index, entries in a range, read from the segments' files without taking
the write lock."""

from __future__ import annotations

import gc
from array import array
from bisect import bisect_left, bisect_right
from itertools import repeat
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from .errors import (
    WIPE_ADVICE,
    CompactedError,
    CorruptionError,
    StorageError,
    StoreFailedError,
    UnavailableError,
    UsageError,
)
from .segment import Segment, SegmentReleased
from .types import Entry, EntryBatch, HardState
from .values import describe_error, new_tuple

if TYPE_CHECKING:
    import threading
    from collections import OrderedDict


# A read spanning more records than this reads them in sequential windows rather than one by one
# through the record cache.
_BULK_RECORDS = 3


# A read that meets segments released under it by a rewrite (a full re-key, a migration: the entries
# are still in the log, in new segments) locates them again, at most this many times.
REREADS = 3


def _not_in_order(seg: Segment, idx: int, first: int, n: int) -> CorruptionError:
    return CorruptionError(seg.path, None, f"segment {seg.seg_id}: its records do not follow each other "
                           f"(index {idx} expected in a record at {first} x{n})")


def clip_runs(runs, lo: int, hi: int) -> list:
    """The (first index, term) runs of a segment restricted to the entries lo..hi."""
    out = []
    for start, term in runs:
        if start > hi:
            break
        if start <= lo:
            out = [(lo, term)]
        else:
            out.append((start, term))
    return out

class LogReads:
    """Loading and reading the log (see the module docstring)."""

    # Host contract: provided by Wal (wal.py), which creates them; load() replaces the index ones.
    segments: list[Segment]
    view_first: list[int]
    view_seg: list[Segment]
    run_start: array[int]
    run_term: array[int]
    compacted_index: int
    compacted_term: int
    reset_segment: int
    last: int
    hardstate: HardState
    failed: BaseException | None
    closed: bool
    replacements: int          # suffix replacements and log resets so far (truncate_view)
    _state: threading.Lock
    _cache: OrderedDict

    # ------------------------------------------------------------------ loading
    def load(self, segments: Sequence[Segment], compacted_index: int, compacted_term: int,
             reset_segment: int = 0) -> None:
        """Install segments recovered by the engine (ID order) and the compaction point.

        Which entries of a segment are still part of the log follows from the segments written
        after it, never from its neighbours alone: every newer segment based at ``b`` superseded
        the entries >= ``b`` of all older ones (Raft suffix replacement, truncation, a re-key's
        copies; an empty segment supersedes as well), and ``reset_segment`` > 0 means a snapshot
        or ``reset_log`` reset the log: segments older than ``reset_segment`` hold no entry of the
        log any more.  Not even below the reset point: they may hold a stale suffix the cluster
        replaced, and serving it to a snapshot fallback would diverge from the cluster (the snapshot
        that reset the log covers everything up to it).  Segments are therefore read newest first,
        each contributing the part of its range below everything newer.  Superseded entries may
        lie anywhere - a stale suffix left by several process lifetimes spans several segments,
        with gaps between them that no longer matter - so only the assembled log is checked for
        continuity: a hole above the compaction point is missing data (an error); a hole at or
        below it only disconnects the older pieces, which are dropped (they are compacted, and no
        older snapshot could be rebuilt from a log with a hole).

        The new index is built aside and installed in one step under the state lock: readers
        never see it half built, and an interruption (a re-key installs its segments this way)
        leaves the old one whole."""
        pieces = []                      # (first, last, segment) contributed, newest first
        limit = None                     # entries above this were superseded by a newer segment
        hs = None
        for seg in reversed(segments):
            if hs is None and seg.hardstate is not None:
                hs = seg.hardstate
            if seg.seg_id >= reset_segment:      # an older one predates the reset: nothing of it is in the log
                top = seg.last_index if limit is None else min(seg.last_index, limit)
                if top >= seg.base_index:
                    pieces.append((seg.base_index, top, seg))
            limit = seg.base_index - 1 if limit is None else min(limit, seg.base_index - 1)
        # The log is one contiguous run of pieces reaching the compaction point or beyond.
        keep: list[tuple[int, int, Segment]] = []
        for lo, hi, seg in pieces:
            below = keep[-1][0] - 1 if keep else max(hi, compacted_index)
            if hi < below:
                if below > compacted_index:
                    raise CorruptionError(
                        keep[-1][2].path if keep else seg.path, None,
                        f"segment {keep[-1][2].seg_id if keep else seg.seg_id} holds entries from index "
                        f"{below + 1} but the log before it ends at {max(hi, compacted_index)}: entries "
                        f"{max(hi, compacted_index) + 1}..{below} are missing (a segment or its manifest record "
                        "was deleted, or a segment was cut short)",
                        "restore the node from a snapshot, or " + WIPE_ADVICE)
                break                    # a hole at or below the compaction point: older pieces are unreachable
            keep.append((lo, hi, seg))
        if keep and keep[-1][0] > compacted_index + 1:
            lo, _hi, seg = keep[-1]
            raise CorruptionError(
                seg.path, None, f"segment {seg.seg_id} starts at index {lo} but the log before it ends at "
                f"{compacted_index}: entries {compacted_index + 1}..{lo - 1} are missing (a segment or its manifest "
                "record was deleted, or a segment was cut short)",
                "restore the node from a snapshot, or " + WIPE_ADVICE)
        keep.reverse()
        run_start, run_term = array("Q"), array("Q")
        for lo, hi, seg in keep:
            for start, term in clip_runs(seg.runs, lo, hi):
                if not run_term or run_term[-1] != term:
                    run_start.append(start)
                    run_term.append(term)
        view_first = [lo for lo, _hi, _seg in keep]
        view_seg = [seg for _lo, _hi, seg in keep]
        last = max(keep[-1][1] if keep else 0, compacted_index)
        with self._state:
            (self.segments, self.compacted_index, self.compacted_term, self.reset_segment, self.view_first,
             self.view_seg, self.run_start, self.run_term, self.last, self.hardstate) = (
                list(segments), compacted_index, compacted_term, reset_segment, view_first, view_seg,
                run_start, run_term, last, hs or HardState())
            self._cache.clear()

    def truncate_view(self, base: int) -> None:
        """Forget visible entries >= base (a later segment replaced them)."""
        self.replacements += 1              # first: a reader that sees it unchanged saw no replacement
        k = bisect_left(self.view_first, base)
        j = bisect_left(self.run_start, base)
        # No call between the deletions: an asynchronous exception (KeyboardInterrupt) cannot
        # leave the paired lists out of step.
        del self.view_first[k:], self.view_seg[k:], self.run_start[j:], self.run_term[j:]
        if self.last >= base:
            self.last = base - 1

    def add_runs(self, runs) -> None:
        """Extend the term runs with (first index, term) runs that follow the current log."""
        for start, term in runs:
            if not self.run_term or self.run_term[-1] != term:
                self.run_start.append(start)
                self.run_term.append(term)

    # ------------------------------------------------------------------ queries
    def first_index(self) -> int:
        return self.compacted_index + 1

    def last_index(self) -> int:
        return self.last

    def term(self, index: int) -> int:
        with self._state:
            if index == self.compacted_index:
                return self.compacted_term
            if index < self.compacted_index:
                raise CompactedError(f"index {index} is compacted (first index is {self.compacted_index + 1})")
            if index > self.last:
                raise UnavailableError(f"index {index} is beyond the last index {self.last}")
            try:
                return self.run_term[bisect_right(self.run_start, index) - 1]
            except IndexError as exc:
                raise self._read_failure(exc) from exc

    def _read_failure(self, exc: Exception) -> Exception:
        """A read tripped over the in-memory index: after an interrupted write (the WAL is failed)
        it may be half updated, which reopening repairs; otherwise it is a bug, raised as is."""
        if self.failed is None:
            return exc
        return StoreFailedError(f"the in-memory index is incomplete after an interrupted write "
                                f"({describe_error(self.failed)}); reopen the store to read")

    def _pieces(self, lo: int, hi: int) -> list[tuple[Segment, int, int]]:
        """Where the entries [lo, hi) lie (see _locate), or the error for a range the log does not hold."""
        if lo > hi:
            raise UsageError(f"entries({lo}, {hi}): lo must not exceed hi")
        with self._state:
            if lo <= self.compacted_index:
                raise CompactedError(f"index {lo} is compacted (first index is {self.compacted_index + 1})")
            if hi > self.last + 1:
                raise UnavailableError(f"entries up to {hi - 1} requested, the last index is {self.last}")
            try:
                return self._locate(lo, hi)
            except (IndexError, TypeError, AttributeError) as exc:
                raise self._read_failure(exc) from exc

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi); at least one when any is in range, then up to ``max_size`` bytes."""
        for attempt in range(REREADS + 1):
            pieces = self._pieces(lo, hi)
            try:
                if hi - lo > 2048 and gc.isenabled():
                    # Building many small tuples triggers collections that find nothing to free (a
                    # third of a bulk read's time); pause the collector for this call only.
                    gc.disable()
                    try:
                        return self._read_pieces(lo, pieces, max_size)
                    finally:
                        gc.enable()
                return self._read_pieces(lo, pieces, max_size)
            except (IndexError, TypeError, AttributeError) as exc:
                raise self._read_failure(exc) from exc
            except SegmentReleased as exc:
                self._reread_or_raise(exc, lo, attempt)
        raise AssertionError("unreachable: the last attempt raises")   # pragma: no cover

    def _reread_or_raise(self, exc: SegmentReleased, idx: int, attempt: int) -> None:
        """A read met a segment released under it (see Segment.pin).  Returns when the entries from
        ``idx`` are still in the log - a full re-key or a migration rewrote them into new segments -
        and the read should locate them again; raises UsageError when the store was closed, and
        CompactedError when compaction removed them (or they kept moving for REREADS attempts, or
        the caller cannot go on: ``attempt`` REREADS)."""
        if self.closed:
            raise UsageError("the store is closed") from exc
        if idx <= self.compacted_index or attempt >= REREADS:
            raise CompactedError(f"entries from {idx} were compacted while they were being read") from exc

    def batches(self, lo: int, hi: int, before_read: Callable[[], None] | None = None) -> Iterator[EntryBatch]:
        """The entries [lo, hi) as they are read, one EntryBatch per record (see _batches).  The range
        is checked and located now; reading starts with the first ``next()``."""
        seen = self.replacements            # before locating: a replacement meanwhile is never missed
        return self._checked(lo, hi, self._pieces(lo, hi), before_read, seen)

    def _checked(self, lo: int, hi: int, pieces, before_read, seen: int) -> Iterator[EntryBatch]:
        idx = lo
        for attempt in range(REREADS + 1):
            try:
                for batch in self._batches(idx, pieces, before_read, own_fd=True):
                    yield batch
                    idx = batch.first + len(batch.terms)
                return
            except (IndexError, TypeError, AttributeError) as exc:
                raise self._read_failure(exc) from exc
            except SegmentReleased as exc:
                # Entries before idx were handed out already: going on is right only if the log
                # they came from is still the log (a re-key rewrote it), not if a truncation or a
                # snapshot's reset replaced part of it (the rest would come from another log).
                self._reread_or_raise(exc, idx, REREADS if self.replacements != seen else attempt)
                pieces = self._pieces(idx, hi)

    def _read_pieces(self, lo: int, pieces, max_size: int | None) -> list[Entry]:
        out: list[Entry] = []
        if max_size is None:            # C-level iteration, no Python frame per entry
            idx = lo
            for seg, r, piece_hi in pieces:
                last = seg.locate(piece_hi - 1)
                if last - r >= _BULK_RECORDS:
                    for batch in self._clipped(seg, seg.read_entries_records(r, last), idx, piece_hi, False):
                        out.extend(map(new_tuple, repeat(Entry), batch.tuples()))
                    idx = piece_hi
                    continue
                while idx < piece_hi:   # a few records: through the record cache, sliced in place
                    rec = self._record(seg, r)
                    first, terms, p, e = rec.first, rec.terms, rec.payload, rec.offsets
                    if not first <= idx < first + len(terms):
                        raise _not_in_order(seg, idx, first, len(terms))
                    b = min(piece_hi, first + len(terms))
                    a, z = idx - first, b - first
                    datas = map(p.__getitem__, map(slice, e[a:z], e[a + 1:z + 1]))
                    out.extend(map(new_tuple, repeat(Entry), zip(range(idx, b), terms[a:z], datas)))
                    idx = b
                    r += 1
            return out
        size = 0
        for seg, r, piece_hi in pieces:
            idx = lo if not out else out[-1].index + 1
            while idx < piece_hi:
                rec = self._record(seg, r)
                first, terms = rec.first, rec.terms
                b = min(piece_hi, first + len(terms))
                for k in range(idx - first, b - first):
                    size += rec.size(k)
                    if out and size > max_size:
                        return out
                    out.append(Entry(first + k, terms[k], rec.data(k)))
                idx = b
                r += 1
        return out

    def _batches(self, lo: int, pieces, before_read: Callable[[], None] | None = None,
                 own_fd: bool = False) -> Iterator[EntryBatch]:
        """The entries of ``pieces`` from ``lo`` on, one EntryBatch per record, each authenticated before
        it is handed out: a few records through the record cache, more in sequential windows
        (Segment.read_entries_records; ``own_fd`` for a reader that outlives the call).  Nothing
        handed out is shared with the cache."""
        idx = lo
        for seg, r, piece_hi in pieces:
            last = seg.locate(piece_hi - 1)
            if last - r >= _BULK_RECORDS:
                yield from self._clipped(
                    seg, seg.read_entries_records(r, last, before_read=before_read, own_fd=own_fd), idx, piece_hi,
                    False)
            else:
                if before_read is not None:
                    before_read()
                yield from self._clipped(seg, map(self._record, repeat(seg), range(r, last + 1)), idx, piece_hi,
                                         True)
            idx = piece_hi

    def _clipped(self, seg: Segment, records: Iterable[EntryBatch], idx: int, hi: int,
                 cached: bool) -> Iterator[EntryBatch]:
        """The records of ``seg`` that hold the entries [idx, hi), clipped to them (copied when they
        come from the cache).  A segment removed under the read raises SegmentReleased (the caller
        decides: compacted, closed, or rewritten and to be located again)."""
        try:
            for rec in records:
                first, n = rec.first, len(rec.terms)
                if not first <= idx < first + n:
                    raise _not_in_order(seg, idx, first, n)
                b = min(hi, first + n)
                if idx == first and b == first + n and not cached:
                    yield rec
                else:
                    a, z = idx - first, b - first
                    yield EntryBatch(idx, rec.terms[a:z], rec.offsets[a:z + 1], rec.payload)
                idx = b
        except SegmentReleased:
            raise
        except StorageError as exc:
            if not self.closed and any(s is seg for s in self.segments):
                raise
            # Its file was closed and removed under a long read (with a descriptor of the reader's
            # own: compaction or a rewrite purged it), or the store closed.
            raise SegmentReleased(seg.path) from exc

    def _locate(self, lo: int, hi: int):
        """[(segment, first record number, stop index)] covering [lo, hi).  Caller holds _state."""
        pieces = []
        v = bisect_right(self.view_first, lo) - 1
        idx = lo
        while idx < hi:
            seg = self.view_seg[v]
            stop = self.view_first[v + 1] if v + 1 < len(self.view_first) else self.last + 1
            stop = min(stop, hi)
            pieces.append((seg, seg.locate(idx), stop))
            idx = stop
            v += 1
        return pieces

    def _record(self, seg: Segment, r: int) -> EntryBatch:
        key = (seg.seg_id, r)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        rec = seg.read_entries_record(r)
        self._cache[key] = rec
        if len(self._cache) > 8:
            self._cache.popitem(last=False)
        return rec
