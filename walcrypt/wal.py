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
* Exception safety: any exception -- a failed write or fdatasync, but also
  ``KeyboardInterrupt``, ``MemoryError`` or an exception raised by a signal
  handler -- that escapes between the start of a write unit and its completion,
  or from a seal or a segment cut, fails the WAL: every later write raises
  :class:`StoreFailedError` until the store is reopened and recovered.  The
  in-memory index is never advanced past what was written, and a segment whose
  last unit is in doubt is never written again (not even sealed), so no
  (key, nonce) pair is used twice.  The thread that got the exception sees it
  (an OSError as StoreFailedError); the other requests of the unit get
  StoreFailedError.
* Validation runs in the caller's thread before a request is queued (entry
  indexes and terms, hard-state fields, data types), so nothing one caller
  passes can fail or falsify another caller's save in the same unit; every
  queued request is either written durably or given an error.
* Readers take the state lock briefly to locate records, then read with
  positioned reads; a small cache keeps the last decrypted records.
"""

from __future__ import annotations

import gc
import operator
import struct
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from itertools import repeat
from typing import Protocol, Sequence

from . import format as fmt
from .errors import (
    WIPE_ADVICE,
    CompactedError,
    CorruptionError,
    StoreFailedError,
    UnavailableError,
    UsageError,
    WalcryptError,
)
from .segment import Segment, encode_entries
from .types import Entry, HardState

SYNC_POLICIES = ("always", "batch", "none")
_new_tuple = tuple.__new__      # builds an Entry without NamedTuple's Python-level __new__ (hot read path)
U64_MAX = (1 << 64) - 1
# The index after an entry must fit the u64 base index of the segment that follows it.
MAX_ENTRY_INDEX = U64_MAX - 1
_INT = {int}
_BYTES = {bytes}
_THREE = {3}


def check_u64(value, what: str, lo: int, hi: int) -> int:
    """``value`` as a plain int in [lo, hi] (anything ``operator.index`` accepts), or a UsageError
    naming ``what``."""
    try:
        v = operator.index(value)
    except TypeError:
        raise UsageError(f"{what} must be an integer, not {type(value).__name__}") from None
    if not lo <= v <= hi:
        if v == 0 and lo == 1 and "term" in what:
            raise UsageError(f"{what} is 0; entry terms start at 1 (FORMAT.md, section 13)")
        raise UsageError(f"{what} is {v}; it must be between {lo} and {hi}")
    return v


def _as_bytes(data, what: str) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        raise UsageError(f"{what} must be bytes-like, not str (encode it first)")
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise UsageError(f"{what} must be bytes-like, not {type(data).__name__}") from None


def _checked_entries(entries) -> list[Entry]:
    """The slow path of validation: every entry checked and normalised (plain ints, bytes)."""
    out = []
    for k, e in enumerate(entries):
        try:
            index, term, data = e
        except (TypeError, ValueError):
            raise UsageError(f"entries[{k}] is not an Entry(index, term, data)") from None
        index = check_u64(index, f"entries[{k}].index", 1, MAX_ENTRY_INDEX)
        term = check_u64(term, f"entry {index}: term", 1, U64_MAX)
        out.append(Entry(index, term, _as_bytes(data, f"entry {index}: data")))
    return out


def _hardstate_record(hardstate) -> tuple:
    """(normalised HardState, its HARDSTATE record), validated; raises UsageError naming the field."""
    try:
        payload = fmt.HARDSTATE_STRUCT.pack(*hardstate)
    except (struct.error, TypeError):
        try:
            fields = tuple(hardstate)
        except TypeError:
            fields = ()
        if len(fields) != 3:
            raise UsageError("hard_state must be a HardState(term, vote, commit)") from None
        for name, v in zip(HardState._fields, fields):
            check_u64(v, f"hard_state.{name}", 0, U64_MAX)
        raise UsageError(f"hard_state {hardstate!r} cannot be encoded") from None
    hs = hardstate
    if not (type(hs) is HardState and type(hs[0]) is int and type(hs[1]) is int and type(hs[2]) is int):
        hs = _new_tuple(HardState, fmt.HARDSTATE_STRUCT.unpack(payload))    # plain ints from here on
    return hs, (fmt.FRAME_HARDSTATE, 0, hs[0], 0, payload, None)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    """One save(): validated, its entries and hard state already encoded as record payloads (by
    the calling thread)."""

    __slots__ = ("entries", "first", "records", "hardstate", "hs_record", "extra", "done", "error")

    def __init__(self, entries, first: int, records: list, hardstate, hs_record):
        self.entries = entries
        self.first = first            # first entry index, 0 when there are no entries
        self.records = records
        self.hardstate = hardstate
        self.hs_record = hs_record
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
            for start, term in _clip_runs(seg.runs, lo, hi):
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

    def _truncate_view(self, base: int) -> None:
        """Forget visible entries >= base (a later segment replaced them)."""
        k = bisect_left(self.view_first, base)
        j = bisect_left(self.run_start, base)
        # No call between the deletions: an asynchronous exception (KeyboardInterrupt) cannot
        # leave the paired lists out of step.
        del self.view_first[k:], self.view_seg[k:], self.run_start[j:], self.run_term[j:]
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
                                f"({_describe(self.failed)}); reopen the store to read")

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in [lo, hi); at least one when any is in range, then up to ``max_size`` bytes."""
        if lo > hi:
            raise UsageError(f"entries({lo}, {hi}): lo must not exceed hi")
        with self._state:
            if lo <= self.compacted_index:
                raise CompactedError(f"index {lo} is compacted (first index is {self.compacted_index + 1})")
            if hi > self.last + 1:
                raise UnavailableError(f"entries up to {hi - 1} requested, the last index is {self.last}")
            try:
                pieces = self._locate(lo, hi)
            except (IndexError, TypeError, AttributeError) as exc:
                raise self._read_failure(exc) from exc
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
                    datas = map(p.__getitem__, map(slice, e[a:z], e[a + 1:z + 1]))
                    out.extend(map(_new_tuple, repeat(Entry), zip(range(idx, b), terms[a:z], datas)))
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
                f"an earlier write failed or was interrupted ({_describe(self.failed)}); the store refuses "
                "writes until it is reopened, which runs recovery") from None

    def fail(self, exc: BaseException, seg: Segment | None = None) -> None:
        """Fail the WAL (``exc`` interrupted a write or a multi-step operation): every later write
        raises StoreFailedError until the store is reopened.  ``seg`` and the active segment are
        never written again in this lifetime (their last unit may be in doubt)."""
        if self.failed is None:
            self.failed = exc
        for s in (seg, self.active):
            if s is not None:
                s.writable = False

    def _failure(self, exc: BaseException, seg: Segment | None, what: str) -> BaseException:
        """Fail the WAL for ``exc``; the exception to raise: an OSError becomes StoreFailedError,
        anything else (KeyboardInterrupt, MemoryError, ...) propagates unchanged."""
        self.fail(exc, seg)
        if isinstance(exc, OSError):
            err = StoreFailedError(f"{what} failed: {exc}; reopen the store to recover")
            err.__cause__ = exc
            return err
        return exc

    def append(self, entries: Sequence[Entry], hardstate: HardState | None, extra: list | None = None) -> None:
        """Persist entries, hard state and ``extra`` records (snapshot records) in one write unit."""
        if not entries and hardstate is None and not extra:
            return
        self.check_writable()
        # Validation and encoding happen here, in the caller's thread: a bad request fails alone.
        entries, records = self._prepare(entries)
        hs, hs_record = _hardstate_record(hardstate) if hardstate is not None else (None, None)
        req = _Request(entries, entries[0][0] if entries else 0, records, hs, hs_record)
        if extra:
            req.extra = extra
        if self.sync_policy != "batch":
            with self._write:
                self._lead([req], req)
        else:
            with self._queue_lock:
                self._queue.append(req)
            # Whoever gets the write lock first writes every queued request; the others find
            # their request done when they get the lock.  Bounded: each pass drains the queue.
            try:
                with self._write:
                    if not req.done:
                        self._lead(None, req)
            except BaseException:
                self._withdraw(req)
                raise
        if req.error is not None:
            raise req.error
        if not req.done:
            # Taken from the queue by a leader that was interrupted before it could report on it:
            # whether it was written is unknown.
            exc = StoreFailedError("a save was interrupted in another thread before its outcome was known; "
                                   "reopen the store to recover")
            self.fail(exc)
            raise exc

    def _withdraw(self, req: _Request) -> None:
        """The caller was interrupted while waiting (e.g. KeyboardInterrupt during the lock wait): a
        request nobody took yet is withdrawn; one a leader took is settled by that leader."""
        with self._queue_lock:
            try:
                self._queue.remove(req)
            except ValueError:
                pass

    def _prepare(self, entries) -> tuple:
        """Validate a save's entries and encode them into ENTRIES record payloads.
        -> (entries, normalised where needed, records)

        Runs in the caller's thread, outside the write lock, so that with group commit
        the next batch is prepared while the leader waits on fdatasync, and so that a bad
        request fails in its own thread only."""
        if type(entries) is not list and type(entries) is not tuple:
            if isinstance(entries, (str, bytes, bytearray, memoryview, dict, Entry)):
                raise UsageError(f"entries must be a sequence of Entry, not {type(entries).__name__}")
            try:
                entries = list(entries)        # any iterable, read once (a dict or a set is refused above / below)
            except TypeError:
                raise UsageError(f"entries must be a sequence of Entry, not {type(entries).__name__}") from None
        n = len(entries)
        if not n:
            return entries, []
        if n == 1:                                 # the common Raft case, without the list machinery
            try:
                index, term, data = entries[0]
            except (TypeError, ValueError):
                index = term = data = None
            if not (type(index) is int and type(term) is int and type(data) is bytes
                    and 0 < index <= MAX_ENTRY_INDEX and 0 < term <= U64_MAX):
                entries = _checked_entries(entries)
                index, term, data = entries[0]
            size = len(data)
            if size > self.max_entry_size:
                raise UsageError(f"entry {index} is {size} bytes; the maximum entry size is "
                                 f"{self.max_entry_size} (raise max_entry_size= when opening)")
            return entries, [(fmt.FRAME_ENTRIES, index, term, 1, encode_entries((term,), (size,), (data,)), (term,))]
        try:
            indexes = [e[0] for e in entries]
            terms = [e[1] for e in entries]
            datas = [e[2] for e in entries]
            ok = (set(map(type, indexes)) == _INT and set(map(type, terms)) == _INT
                  and set(map(type, datas)) == _BYTES and set(map(len, entries)) == _THREE)
        except (TypeError, IndexError, KeyError):
            ok = False
        if not ok:
            entries = _checked_entries(entries)
            indexes = [e[0] for e in entries]
            terms = [e[1] for e in entries]
            datas = [e[2] for e in entries]
        first = indexes[0]
        if indexes != list(range(first, first + n)):
            k = next(k for k in range(n) if indexes[k] != first + k)
            raise UsageError(f"entries are not contiguous: index {indexes[k]} at position {k}, expected {first + k}")
        if first < 1:
            check_u64(first, "entries[0].index", 1, MAX_ENTRY_INDEX)              # raises
        if indexes[-1] > MAX_ENTRY_INDEX:
            check_u64(indexes[-1], f"entries[{n - 1}].index", 1, MAX_ENTRY_INDEX)  # raises
        if min(terms) < 1 or max(terms) > U64_MAX:
            k = next(k for k in range(n) if not 1 <= terms[k] <= U64_MAX)
            check_u64(terms[k], f"entry {first + k}: term", 1, U64_MAX)  # raises
        lengths = list(map(len, datas))
        if max(lengths) > self.max_entry_size:
            k = next(k for k in range(n) if lengths[k] > self.max_entry_size)
            raise UsageError(f"entry {first + k} is {lengths[k]} bytes; the maximum entry size is "
                             f"{self.max_entry_size} (raise max_entry_size= when opening)")
        return entries, self._records(first, terms, lengths, datas)

    def encode_stored(self, entries) -> list:
        """ENTRIES records for entries read back from this store (a re-key or a migration rewrites
        them): no validation, they were accepted when they were saved."""
        return self._records(entries[0][0], [e[1] for e in entries], [len(e[2]) for e in entries],
                             [e[2] for e in entries])

    @staticmethod
    def _records(first: int, terms: list, lengths: list, datas: list) -> list:
        """Split entries into ENTRIES records (FORMAT.md 12): a record is closed once its data reaches
        RECORD_TARGET_BYTES or it holds RECORD_MAX_ENTRIES entries, and before an entry that would take
        its sealed payload beyond MAX_RECORD_PAYLOAD (the readers' bound, read at call time); such an
        entry starts the next record, where it fits alone (max_entry_size is capped at open)."""
        n = len(terms)
        records = []
        start = 0
        row = fmt.ENTRIES_ROW_SIZE
        room = fmt.MAX_RECORD_PAYLOAD - fmt.ENTRIES_RECORD_OVERHEAD - row   # data + rows beyond the first
        while start < n:
            stop = start + 1
            size = lengths[start]
            used = size
            limit = min(n, start + fmt.RECORD_MAX_ENTRIES)
            while stop < limit and size < fmt.RECORD_TARGET_BYTES:
                used += lengths[stop] + row
                if used > room:
                    break
                size += lengths[stop]
                stop += 1
            t = terms[start:stop]
            payload = encode_entries(t, lengths[start:stop], datas[start:stop])
            records.append((fmt.FRAME_ENTRIES, first + start, terms[start], stop - start, payload, t))
            start = stop
        return records

    def _lead(self, batch: list[_Request] | None, own: _Request) -> None:
        """Leader (holds the write lock): write ``batch`` (None: everything queued).  Every request
        taken is either written durably or given an error, whatever happens; an exception that
        escapes fails the WAL and reaches the leader's caller, the other requesters get
        StoreFailedError."""
        taken: list[_Request] = [] if batch is None else batch
        try:
            if batch is None:
                with self._queue_lock:
                    taken, self._queue = self._queue, []
            self._run_unit(taken)
        except BaseException as exc:
            self.fail(exc)
            for req in taken:
                if not req.done:
                    if req is not own:
                        err = StoreFailedError(f"the write unit holding this save was interrupted "
                                               f"({_describe(exc)}); reopen the store to recover")
                        err.__cause__ = exc
                        req.error = err
                    req.done = True
            raise

    def _run_unit(self, batch: list[_Request]) -> None:
        """Write the requests as write units; mark each request done (or failed).  A request's own
        problem (a gap, a refused write) is that request's error; anything else escapes."""
        records: list = []
        hs_record = hardstate = None
        members: list[_Request] = []
        for req in batch:
            if req.done:                          # settled by an earlier, interrupted leader
                continue
            try:
                self.check_writable()
                first, recs = req.first, req.records
                if recs and first <= self.compacted_index:
                    # Entries at or below the compaction point are already covered by it.
                    skip = self.compacted_index + 1 - first
                    rest = req.entries[skip:]
                    first, recs = first + skip, (self.encode_stored(rest) if rest else [])
                if recs and first <= self._next_index(records) - 1:
                    # Raft suffix replacement: flush what we have, then write this save into the
                    # new segment that supersedes the suffix, atomically.
                    self._flush(records, hs_record, hardstate, members)
                    records, hs_record, hardstate, members = [], None, None, []
                    self._replace_from(first, recs + req.extra, req.hardstate)
                    req.done = True
                    continue
                elif recs and first != self._next_index(records):
                    raise UsageError(
                        f"entries start at index {first} but the log ends at {self._next_index(records) - 1}; "
                        "a gap is not allowed")
            except WalcryptError as exc:  # this request only
                req.error = exc
                req.done = True
                continue
            records.extend(recs)
            records.extend(req.extra)
            if req.hs_record is not None:
                hs_record, hardstate = req.hs_record, req.hardstate
            members.append(req)
        self._flush(records, hs_record, hardstate, members)

    def _next_index(self, records) -> int:
        for rec in reversed(records):
            if rec[0] == fmt.FRAME_ENTRIES:
                return rec[1] + rec[3]
        return self.last + 1

    def _flush(self, records: list, hs_record, hardstate: HardState | None, members: list[_Request]) -> None:
        if hs_record is not None:
            records.append(hs_record)
        if records:
            try:
                self._write_unit(records)
            except WalcryptError as exc:        # a failed write (the WAL is failed): every member learns it
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
            self.seal_active()
            seg = self._cut(self.last + 1)
        try:
            buf, pending = seg.encode_batch(records)
            seg.write(buf)                      # from here until apply_batch the segment is in doubt
            if self.sync_policy != "none":
                seg.sync()
                self.fsyncs += 1
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
        except BaseException as exc:
            err = self._failure(exc, seg, f"writing {seg.path}")
            if err is exc:
                raise
            raise err from exc

    def _replace_from(self, index: int, records=(), hardstate: HardState | None = None) -> None:
        """Entries >= index are superseded by ``records`` (possibly none): seal the active segment
        and start a new one at ``index`` that carries them.  The new segment's registration is the
        single commit point, so a crash leaves either the old suffix or the new one."""
        if index <= self.compacted_index:
            raise UsageError(f"cannot replace entries from {index}: compacted up to {self.compacted_index}")
        if self.active is not None and self.active.writable:
            self.seal_active()
        seg = self._cut(index, records, hardstate)
        try:
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
        except BaseException as exc:          # the index is half updated: stop writing
            self.fail(exc)
            raise

    def _cut(self, base_index: int, records=(), hardstate: HardState | None = None) -> Segment:
        self.check_writable()
        try:
            seg = self.provider.create_segment(base_index, hardstate or self.hardstate, records)
            with self._state:
                self.segments.append(seg)
                self.active = seg
        except BaseException as exc:
            self.fail(exc)
            if isinstance(exc, OSError):
                raise StoreFailedError(f"creating a segment failed: {exc}; free space and reopen the store") from exc
            raise
        return seg

    def seal_active(self) -> None:
        self.check_writable()                   # never seal after a failure: the last unit may be in doubt
        seg = self.active
        if seg is None or not seg.writable:
            return
        try:
            seg.seal()
            self.fsyncs += 2
            self.provider.segment_sealed(seg)
        except BaseException as exc:
            err = self._failure(exc, seg, f"sealing {seg.path}")
            if err is exc:
                raise
            raise err from exc

    def truncate_from(self, index: int) -> None:
        """Durably discard entries >= index: a new segment based at ``index`` supersedes them."""
        with self._write:
            self.check_writable()
            self._replace_from(index)

    def cut_now(self) -> None:
        """Seal the active segment and start a new one now (a DEK rotation's step 2)."""
        with self._write:
            self.check_writable()
            self.seal_active()
            self._cut(self.last + 1)

    def seal_for_close(self) -> None:
        with self._write:
            if self.failed is None and self.active is not None and self.active.writable:
                self.seal_active()

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
            self.seal_active()                    # raises StoreFailedError on a failed WAL
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
            keep = [(f, s) for f, s in zip(self.view_first, self.view_seg) if id(s) not in ids]
            # one statement: an interruption never leaves the two lists of the view out of step
            self.segments, self.view_first, self.view_seg = (
                [s for s in self.segments if id(s) not in ids], [f for f, _ in keep], [s for _, s in keep])
            self._cache.clear()
        for s in segs:
            s.close()

    def close(self) -> None:
        """Close every segment file, even when closing one of them raises (the first error is
        raised after the others were closed)."""
        first = None
        for seg in self.segments:
            try:
                seg.close()
            except BaseException as exc:        # noqa: BLE001 - re-raised below
                first = first or exc
        if first is not None:
            raise first
