"""The ordered segments: append with group commit, suffix replacement, prefix compaction, reads.

Concurrency and durability contract:

* ``append`` may be called from many threads.  Requests queue up; whichever
  caller holds the write lock is the *leader*: it takes every queued request
  (policy ``batch``) or only its own (``always``/``none``), encodes them into
  one write unit ending in a single COMMIT frame, writes it with one pwrite and
  makes it durable with one fdatasync, then wakes the requesters.  A unit is
  the only thing that can be torn by a crash; the next unit is written only
  after the previous one's fdatasync returned (recovery relies on this).
* ``append`` returns only once its unit is durable (except policy ``none``).
* A failed write or fdatasync fails the WAL: every later write raises
  :class:`StoreFailedError` until the store is reopened and recovered; the
  in-memory index is never advanced past what was written.
* Readers take the state lock briefly to locate records, then read with
  positioned reads; a small cache keeps the last decrypted records.
"""

from __future__ import annotations

import gc
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from itertools import repeat
from typing import Protocol, Sequence

from . import format as fmt
from .errors import CompactedError, CorruptionError, StoreFailedError, UnavailableError, UsageError
from .segment import Segment, encode_entries
from .types import Entry, HardState

SYNC_POLICIES = ("always", "batch", "none")
_new_tuple = tuple.__new__      # builds an Entry without NamedTuple's Python-level __new__ (hot read path)


class SegmentProvider(Protocol):
    """What the engine supplies to the WAL: segment creation and manifest bookkeeping."""

    def create_segment(self, base_index: int, hardstate: HardState, records=()) -> Segment: ...
    def segment_sealed(self, seg: Segment) -> None: ...
    def remove_segments(self, segs: list[Segment]) -> None: ...
    def sync_meta_failed(self, exc: BaseException) -> None: ...


def _clip_runs(runs, lo: int, hi: int) -> list:
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


class _Request:
    """One save(): its entries already encoded as record payloads (by the calling thread)."""

    __slots__ = ("entries", "first", "records", "hardstate", "extra", "done", "error")

    def __init__(self, entries, first: int, records: list, hardstate):
        self.entries = entries
        self.first = first            # first entry index, 0 when there are no entries
        self.records = records
        self.hardstate = hardstate
        self.extra: list = []
        self.done = False
        self.error: BaseException | None = None


class Wal:
    def __init__(self, provider: SegmentProvider, *, sync: str = "batch", segment_size: int = 64 << 20,
                 max_entry_size: int = fmt.MAX_ENTRY_SIZE_DEFAULT):
        if sync not in SYNC_POLICIES:
            raise UsageError(f"sync must be one of {', '.join(SYNC_POLICIES)}, not {sync!r}")
        self.provider = provider
        self.sync_policy = sync
        self.segment_size = segment_size
        self.max_entry_size = max_entry_size
        self.segments: list[Segment] = []        # every live segment, in ID order
        # The visible log: contiguous pieces (first, seg) in index order.
        self.view_first: list[int] = []
        self.view_seg: list[Segment] = []
        self.run_start = array("Q")
        self.run_term = array("Q")
        self.compacted_index = 0
        self.compacted_term = 0
        self.reset_segment = 0                   # segments below this ID predate a log reset (see load)
        self.last = 0
        self.hardstate = HardState()
        self.active: Segment | None = None
        self.failed: BaseException | None = None
        self.fsyncs = 0
        self._state = threading.Lock()           # guards the index (short critical sections)
        self._write = threading.RLock()          # one leader writes at a time (re-entrant for re-key)
        self._queue: list[_Request] = []
        self._queue_lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ loading
    def load(self, segments: list[Segment], compacted_index: int, compacted_term: int,
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
        older snapshot could be rebuilt from a log with a hole)."""
        self.segments = list(segments)
        self.compacted_index = compacted_index
        self.compacted_term = compacted_term
        self.reset_segment = reset_segment
        self._cache.clear()
        pieces = []                      # (first, last, segment) contributed, newest first
        limit = None                     # entries above this were superseded by a newer segment
        hs = None
        for seg in reversed(self.segments):
            if hs is None and seg.hardstate is not None:
                hs = seg.hardstate
            if seg.seg_id >= reset_segment:      # an older one predates the reset: nothing of it is in the log
                top = seg.last_index if limit is None else min(seg.last_index, limit)
                if top >= seg.base_index:
                    pieces.append((seg.base_index, top, seg))
            limit = seg.base_index - 1 if limit is None else min(limit, seg.base_index - 1)
        # The log is one contiguous run of pieces reaching the compaction point or beyond.
        keep = []
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
                        "restore the node from a snapshot, or wipe it and let Raft re-replicate")
                break                    # a hole at or below the compaction point: older pieces are unreachable
            keep.append((lo, hi, seg))
        if keep and keep[-1][0] > compacted_index + 1:
            lo, _hi, seg = keep[-1]
            raise CorruptionError(
                seg.path, None, f"segment {seg.seg_id} starts at index {lo} but the log before it ends at "
                f"{compacted_index}: entries {compacted_index + 1}..{lo - 1} are missing (a segment or its manifest "
                "record was deleted, or a segment was cut short)",
                "restore the node from a snapshot, or wipe it and let Raft re-replicate")
        keep.reverse()
        self.view_first = [lo for lo, _hi, _seg in keep]
        self.view_seg = [seg for _lo, _hi, seg in keep]
        self.run_start, self.run_term = array("Q"), array("Q")
        for lo, hi, seg in keep:
            self._add_runs(_clip_runs(seg.runs, lo, hi))
        self.last = max(keep[-1][1] if keep else 0, compacted_index)
        self.hardstate = hs or HardState()

    def _truncate_view(self, base: int) -> None:
        """Forget visible entries >= base (a later segment replaced them)."""
        while self.view_first and self.view_first[-1] >= base:
            self.view_first.pop()
            self.view_seg.pop()
        while self.run_start and self.run_start[-1] >= base:
            self.run_start.pop()
            self.run_term.pop()
        if self.last >= base:
            self.last = base - 1

    def _add_runs(self, runs) -> None:
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
            return self.run_term[bisect_right(self.run_start, index) - 1]

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi); at least one when any is in range, then up to ``max_size`` bytes."""
        if lo > hi:
            raise UsageError(f"entries({lo}, {hi}): lo must not exceed hi")
        with self._state:
            if lo <= self.compacted_index:
                raise CompactedError(f"index {lo} is compacted (first index is {self.compacted_index + 1})")
            if hi > self.last + 1:
                raise UnavailableError(f"entries up to {hi - 1} requested, the last index is {self.last}")
            pieces = self._locate(lo, hi)
        if hi - lo > 2048 and gc.isenabled():
            # Building many small tuples triggers collections that find nothing to free (a
            # third of a bulk read's time); pause the collector for this call only.
            gc.disable()
            try:
                return self._read_pieces(lo, pieces, max_size)
            finally:
                gc.enable()
        return self._read_pieces(lo, pieces, max_size)

    def _read_pieces(self, lo: int, pieces, max_size: int | None) -> list[Entry]:
        out: list[Entry] = []
        size = 0
        for seg, r, piece_hi in pieces:
            idx = lo if not out else out[-1].index + 1
            while idx < piece_hi:
                rec = self._record(seg, r)
                first, terms = rec.first, rec.terms
                b = min(piece_hi, first + len(terms))
                if max_size is None:            # bulk path: C-level iteration, no Python frame per entry
                    p, e = rec.payload, rec.ends
                    a, z = idx - first, b - first
                    out.extend(map(_new_tuple, repeat(Entry),
                                   zip(range(idx, b), terms[a:z], map(p.__getitem__, map(slice, e[a:z], e[a + 1:z + 1])))))
                else:
                    for k in range(idx - first, b - first):
                        size += rec.size(k)
                        if out and size > max_size:
                            return out
                        out.append(Entry(first + k, terms[k], rec.data(k)))
                idx = b
                r += 1
        return out

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

    def _record(self, seg: Segment, r: int):
        key = (seg.seg_id, r)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        rec = seg.read_entries_record(r)
        self._cache[key] = rec
        if len(self._cache) > 8:
            self._cache.popitem(last=False)
        return rec

    # ------------------------------------------------------------------ writing
    def check_writable(self) -> None:
        if self.failed is not None:
            raise StoreFailedError(
                f"an earlier write or fsync failed ({self.failed}); the store refuses writes until it is "
                "reopened, which runs recovery") from None

    def append(self, entries: Sequence[Entry], hardstate: HardState | None, extra: list | None = None) -> None:
        """Persist entries, hard state and ``extra`` records (snapshot records) in one write unit."""
        if not entries and hardstate is None and not extra:
            return
        self.check_writable()
        req = _Request(entries, entries[0][0] if entries else 0, self._prepare(entries), hardstate)
        if extra:
            req.extra = extra
        if self.sync_policy != "batch":
            with self._write:
                self._run_unit([req])
            if req.error is not None:
                raise req.error
            return
        with self._queue_lock:
            self._queue.append(req)
        # Whoever gets the write lock first writes every queued request; the others find
        # their request done when they get the lock.  Bounded: each pass drains the queue.
        with self._write:
            if not req.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._run_unit(batch)
        if req.error is not None:
            raise req.error

    def _prepare(self, entries) -> list:
        """Validate a save's entries and encode them into ENTRIES record payloads.

        Runs in the caller's thread, outside the write lock, so that with group commit
        the next batch is prepared while the leader waits on fdatasync."""
        n = len(entries)
        if not n:
            return []
        if n == 1:                                 # the common Raft case, without the list machinery
            index, term, data = entries[0]
            size = len(data)
            if size > self.max_entry_size:
                raise UsageError(f"entry {index} is {size} bytes; the maximum entry size is "
                                 f"{self.max_entry_size} (raise max_entry_size= when opening)")
            if term < 0:
                raise UsageError(f"entry {index} has term {term}; terms are never negative")
            return [(fmt.FRAME_ENTRIES, index, term, 1, encode_entries((term,), (size,), (data,)), (term,))]
        first = entries[0][0]
        indexes = [e[0] for e in entries]
        if indexes != list(range(first, first + n)):
            k = next(k for k in range(n) if indexes[k] != first + k)
            raise UsageError(f"entries are not contiguous: index {indexes[k]} at position {k}, expected {first + k}")
        terms = [e[1] for e in entries]
        datas = [e[2] for e in entries]
        lengths = list(map(len, datas))
        if max(lengths) > self.max_entry_size:
            k = next(k for k in range(n) if lengths[k] > self.max_entry_size)
            raise UsageError(f"entry {first + k} is {lengths[k]} bytes; the maximum entry size is "
                             f"{self.max_entry_size} (raise max_entry_size= when opening)")
        if min(terms) < 0:
            k = next(k for k in range(n) if terms[k] < 0)
            raise UsageError(f"entry {first + k} has term {terms[k]}; terms are never negative")
        records = []
        start = 0
        while start < n:
            stop = start + 1
            size = lengths[start]
            limit = min(n, start + fmt.RECORD_MAX_ENTRIES)
            while stop < limit and size < fmt.RECORD_TARGET_BYTES:
                size += lengths[stop]
                stop += 1
            t = terms[start:stop]
            payload = encode_entries(t, lengths[start:stop], datas[start:stop])
            records.append((fmt.FRAME_ENTRIES, first + start, terms[start], stop - start, payload, t))
            start = stop
        return records

    def _run_unit(self, batch: list[_Request]) -> None:
        """Leader: write the requests as write units; mark each request done."""
        records: list = []
        hardstate = None
        members: list[_Request] = []
        for req in batch:
            try:
                self.check_writable()
                first, recs = req.first, req.records
                if recs and first <= self.compacted_index:
                    # Entries at or below the compaction point are already covered by it.
                    skip = self.compacted_index + 1 - first
                    first, recs = first + skip, self._prepare(req.entries[skip:])
                if recs and first <= self._next_index(records) - 1:
                    # Raft suffix replacement: flush what we have, then write this save into the
                    # new segment that supersedes the suffix, atomically.
                    self._flush(records, hardstate, members)
                    records, hardstate, members = [], None, []
                    hs = HardState(*req.hardstate) if req.hardstate is not None else None
                    self._replace_from(first, recs + req.extra, hs)
                    req.done = True
                    continue
                elif recs and first != self._next_index(records):
                    raise UsageError(
                        f"entries start at index {first} but the log ends at {self._next_index(records) - 1}; "
                        "a gap is not allowed")
                records.extend(recs)
                records.extend(req.extra)
                if req.hardstate is not None:
                    hardstate = HardState(*req.hardstate)
                members.append(req)
            except BaseException as exc:  # this request only
                req.error = exc
                req.done = True
        self._flush(records, hardstate, members)

    def _next_index(self, records) -> int:
        for rec in reversed(records):
            if rec[0] == fmt.FRAME_ENTRIES:
                return rec[1] + rec[3]
        return self.last + 1

    def _flush(self, records: list, hardstate: HardState | None, members: list[_Request]) -> None:
        if hardstate is not None:
            records.append((fmt.FRAME_HARDSTATE, 0, hardstate.term, 0, fmt.HARDSTATE_STRUCT.pack(*hardstate), None))
        if not records:
            for req in members:
                req.done = True
            return
        try:
            self._write_unit(records)
        except BaseException as exc:
            for req in members:
                req.error = exc
                req.done = True
            return
        if hardstate is not None:
            self.hardstate = hardstate
        for req in members:
            req.done = True

    def _write_unit(self, records: list) -> None:
        seg = self.active
        estimate = sum(len(r[4]) + fmt.FRAME_HEADER_SIZE + 24 for r in records) + 128
        if seg is None or not seg.writable:
            seg = self._cut(self.last + 1)
        elif seg.write_offset + estimate > self.segment_size and seg.records_written > 2:
            self._seal_active()
            seg = self._cut(self.last + 1)
        buf, pending = seg.encode_batch(records)
        try:
            seg.write(buf)
            if self.sync_policy != "none":
                seg.sync()
                self.fsyncs += 1
        except OSError as exc:
            self.failed = exc
            raise StoreFailedError(f"writing {seg.path} failed: {exc}; reopen the store to recover") from exc
        with self._state:
            before = seg.last_index
            new_runs = seg.apply_batch(buf, pending)
            if seg.last_index > before:
                if not self.view_seg or self.view_seg[-1] is not seg:
                    self.view_first.append(before + 1)
                    self.view_seg.append(seg)
                if new_runs:
                    self._add_runs(new_runs)
                self.last = seg.last_index

    def _replace_from(self, index: int, records=(), hardstate: HardState | None = None) -> None:
        """Entries >= index are superseded by ``records`` (possibly none): seal the active segment
        and start a new one at ``index`` that carries them.  The new segment's registration is the
        single commit point, so a crash leaves either the old suffix or the new one."""
        if index <= self.compacted_index:
            raise UsageError(f"cannot replace entries from {index}: compacted up to {self.compacted_index}")
        if self.active is not None and self.active.writable:
            self._seal_active()
        seg = self._cut(index, records, hardstate)
        with self._state:
            self._truncate_view(index)
            self._cache.clear()
            if seg.last_index >= index:
                self.view_first.append(index)
                self.view_seg.append(seg)
                self._add_runs(seg.runs)
                self.last = seg.last_index
        if hardstate is not None:
            self.hardstate = hardstate

    def _cut(self, base_index: int, records=(), hardstate: HardState | None = None) -> Segment:
        try:
            seg = self.provider.create_segment(base_index, hardstate or self.hardstate, records)
        except OSError as exc:
            self.failed = exc
            raise StoreFailedError(f"creating a segment failed: {exc}; free space and reopen the store") from exc
        with self._state:
            self.segments.append(seg)
            self.active = seg
        return seg

    def _seal_active(self) -> None:
        seg = self.active
        if seg is None or not seg.writable:
            return
        try:
            seg.seal()
            self.fsyncs += 2
            self.provider.segment_sealed(seg)
        except OSError as exc:
            self.failed = exc
            raise StoreFailedError(f"sealing {seg.path} failed: {exc}; reopen the store to recover") from exc

    def truncate_from(self, index: int) -> None:
        """Durably discard entries >= index: a new segment based at ``index`` supersedes them."""
        with self._write:
            self.check_writable()
            self._replace_from(index)

    def cut_now(self) -> None:
        """Seal the active segment and start a new one now (a DEK rotation's step 2)."""
        with self._write:
            self.check_writable()
            self._seal_active()
            self._cut(self.last + 1)

    def seal_for_close(self) -> None:
        with self._write:
            if self.failed is None and self.active is not None and self.active.writable:
                self._seal_active()

    # ------------------------------------------------------------------ compaction
    def compact(self, index: int, term: int | None = None) -> None:
        """Discard entries <= index (logically; the engine removes segments below its purge floor)."""
        with self._write, self._state:
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
        with self._write:
            self._seal_active()
            with self._state:
                self._truncate_view(0)
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
            self.segments = [s for s in self.segments if id(s) not in ids]
            keep = [(f, s) for f, s in zip(self.view_first, self.view_seg) if id(s) not in ids]
            self.view_first = [f for f, _ in keep]
            self.view_seg = [s for _, s in keep]
            self._cache.clear()
        for s in segs:
            s.close()

    def close(self) -> None:
        for seg in self.segments:
            seg.close()
