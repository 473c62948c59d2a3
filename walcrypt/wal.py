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

import threading
from array import array
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Protocol, Sequence

from . import format as fmt
from .errors import (
    StoreFailedError,
    UsageError,
    WalcryptError,
)
from .segment import Segment
from .types import Entry, HardState
from .values import (
    describe_error,
    hardstate_record,
)
from .wal_compaction import LogCompaction
from .wal_requests import Request, coalesce_records, encode_stored, prepare_entries

SYNC_POLICIES = ("always", "batch", "none")
# A waiting requester leads itself after this long without news (only after an interrupted leader
# failed to name the next one; see append).
LEADER_WAIT_S = 1.0
class SegmentProvider(Protocol):
    """What the engine supplies to the WAL: segment creation and manifest bookkeeping."""

    def create_segment(self, base_index: int, hardstate: HardState, records=()) -> Segment: ...
    def segment_sealed(self, seg: Segment) -> None: ...
    def remove_segments(self, segs: list[Segment]) -> None: ...


class Wal(LogCompaction):
    def __init__(self, provider: SegmentProvider | None, *, sync: str = "batch", segment_size: int = 64 << 20,
                 max_entry_size: int = fmt.MAX_ENTRY_SIZE_DEFAULT):
        if sync not in SYNC_POLICIES:
            raise UsageError(f"sync must be one of {', '.join(SYNC_POLICIES)}, not {sync!r}")
        self.provider = provider                 # None: a WAL that only loads and reads (recover's plan)
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
        self.write_lock = threading.RLock()          # one leader writes at a time (re-entrant for re-key)
        self._queue: list[Request] = []
        self._queue_lock = threading.Lock()      # guards _queue and _leader
        self._leader: Request | None = None      # the request whose thread leads (group commit)
        self._unit_thread: int | None = None     # the thread writing a unit (inside _lead), if any
        self._exclusive_thread: int | None = None  # the thread inside exclusive(), if any
        self.closed = False                      # set under the write lock by close()
        self.replacements = 0                    # see LogReads.truncate_view
        self._cache: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ writing
    def check_writable(self) -> None:
        if self.closed:
            raise UsageError("the store is closed")
        if self.failed is not None:
            raise StoreFailedError(
                f"an earlier write failed or was interrupted ({describe_error(self.failed)}); the store refuses "
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
        me = threading.get_ident()
        if self._unit_thread == me:
            # This thread is in the middle of writing a unit (a signal handler, or a VFS hook, calling
            # save()): the write lock would let it in, and its frames would take sequence numbers -
            # nonces - the unit under way has already used.
            self.refuse_inside_unit("save()")
        if self.failed is not None or self.closed:
            self.check_writable()               # raises
        # Validation and encoding happen here, in the caller's thread: a bad request fails alone.
        entries, records = prepare_entries(entries, self.max_entry_size)
        hs, hs_record = hardstate_record(hardstate) if hardstate is not None else (None, None)
        req = Request(entries, entries[0][0] if entries else 0, records, hs, hs_record)
        if extra:
            req.extra = extra
        if self.sync_policy != "batch" or self._exclusive_thread == me:
            # (A save from inside exclusive() is written by its own thread: it holds the write lock
            # that a leader would wait for.)
            with self.write_lock:
                self._lead([req], req)
        else:
            # Group commit.  A request that finds no leader leads: it writes every queued request as
            # one unit.  The others sleep on their own event until a leader settled their request
            # (they return at once, without waiting for the next unit) or named them the next
            # leader.  The timeout only matters when a leader was interrupted before it named one (or
            # a unit takes longer than that): the sleeper then takes over as the leader, so the
            # hand-over chain goes on; two leaders at once are safe, the write lock serialises them.
            # Queued inside the try: a requester interrupted right after queuing withdraws its request,
            # so no leader names a thread that has gone.
            try:
                with self._queue_lock:
                    if self._leader is None:
                        self._leader = req
                    else:
                        req.event = threading.Event()
                    self._queue.append(req)
                if req.event is not None and not req.event.wait(LEADER_WAIT_S):
                    with self._queue_lock:
                        self._leader = req
                if not req.done:
                    with self.write_lock:
                        if not req.done:
                            self._lead(None, req)
            except BaseException:
                self._withdraw(req)
                raise
            finally:
                self._hand_over(req)
        if req.error is not None:
            raise req.error
        if not req.done:
            # Taken from the queue by a leader that was interrupted before it could report on it:
            # whether it was written is unknown.
            exc = StoreFailedError("a save was interrupted in another thread before its outcome was known; "
                                   "reopen the store to recover")
            self.fail(exc)
            raise exc

    def refuse_inside_unit(self, what: str) -> None:
        """Raise UsageError when the calling thread is in the middle of writing a unit (a signal
        handler or a file-system hook of that thread calling the store): the re-entrant write lock
        would let it in between the unit's write and its bookkeeping."""
        if self._unit_thread == threading.get_ident():
            raise UsageError(f"{what} was called while this thread was writing to the store (from a signal "
                             "handler or a file-system hook); nothing was done - call it from outside, "
                             "after the interrupted save returns")

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the write lock across a change of the log's state that takes several steps and reads
        the state it changes (a compaction: the term at its index, the WAL's compaction point, its
        metadata record, the purge; a snapshot's commit: its record, the reset it implies,
        retention): no write unit, truncation, compaction or purge of another thread runs in between.
        Re-entrant.  A save from inside it is written at once by its own thread.

        Lock order: a snapshot commit's lock, then the rotation's key lock, then this one; code
        holding it never waits for the key lock (or a key service)."""
        self.refuse_inside_unit("an operation that changes the log")
        with self.write_lock:
            if self.closed:
                raise UsageError("the store is closed")
            outer = self._exclusive_thread
            self._exclusive_thread = threading.get_ident()
            try:
                yield
            finally:
                self._exclusive_thread = outer

    def _hand_over(self, req: Request) -> None:
        """``req``'s thread is leaving append: if it was the leader, the oldest queued request's
        thread becomes the leader (woken), else nobody is."""
        with self._queue_lock:
            if self._leader is not req:
                return
            nxt = self._queue[0] if self._queue else None
            self._leader = nxt
        if nxt is not None and nxt.event is not None:
            nxt.event.set()

    def _withdraw(self, req: Request) -> None:
        """The caller was interrupted while waiting (e.g. KeyboardInterrupt during the lock wait): a
        request nobody took yet is withdrawn; one a leader took is settled by that leader."""
        with self._queue_lock:
            try:
                self._queue.remove(req)
            except ValueError:
                pass

    def encode_stored(self, entries: Sequence[Entry]) -> list:
        """ENTRIES records for entries read back from this store (a re-key or a migration rewrites
        them): no validation, they were accepted when they were saved."""
        return encode_stored(entries)

    def _lead(self, batch: list[Request] | None, own: Request) -> None:
        """Leader (holds the write lock): write ``batch`` (None: everything queued).  Every request
        taken is either written durably or given an error, whatever happens; an exception that
        escapes fails the WAL and reaches the leader's caller, the other requesters get
        StoreFailedError."""
        taken: list[Request] = [] if batch is None else batch
        try:
            self._unit_thread = threading.get_ident()
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
                                               f"({describe_error(exc)}); reopen the store to recover")
                        err.__cause__ = exc
                        req.finish(err)
                    else:
                        req.finish()
            raise
        finally:
            self._unit_thread = None

    def _run_unit(self, batch: list[Request]) -> None:
        """Write the requests as write units; mark each request done (or failed).  A request's own
        problem (a gap, a refused write) is that request's error; anything else escapes."""
        records: list = []
        hs_record = hardstate = None
        members: list[Request] = []
        for req in batch:
            if req.done:                          # settled by an earlier, interrupted leader
                continue
            try:
                if self.failed is not None or self.closed:
                    self.check_writable()       # raises
                first, recs = req.first, req.records
                if recs and first <= self.compacted_index:
                    # Entries at or below the compaction point are already covered by it.
                    skip = self.compacted_index + 1 - first
                    rest = req.entries[skip:]
                    first, recs = first + skip, (self.encode_stored(rest) if rest else [])
                nxt = self._next_index(records) if recs else 0
                if recs and first < nxt:
                    # Raft suffix replacement: flush what we have, then write this save into the
                    # new segment that supersedes the suffix, atomically.
                    self._flush(records, hs_record, hardstate, members)
                    records, hs_record, hardstate, members = [], None, None, []
                    self._replace_from(first, recs + req.extra, req.hardstate)
                    req.finish()
                    continue
                elif recs and first != nxt:
                    raise UsageError(
                        f"entries start at index {first} but the log ends at {nxt - 1}; "
                        "a gap is not allowed")
            except WalcryptError as exc:  # this request only
                req.finish(exc)
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

    def _flush(self, records: list, hs_record, hardstate: HardState | None, members: list[Request]) -> None:
        if len(members) > 1:
            records = coalesce_records(records)     # one-entry saves of many writers: one record
        if hs_record is not None:
            records.append(hs_record)
        if records:
            try:
                self._write_unit(records)
            except WalcryptError as exc:        # a failed write (the WAL is failed): every member learns it
                for req in members:
                    req.finish(exc)
                return
            if hardstate is not None:
                self.hardstate = hardstate
        for req in members:
            req.finish()

    def _write_unit(self, records: list) -> None:
        seg = self.active
        estimate = sum([len(r[4]) for r in records]) + len(records) * (fmt.FRAME_HEADER_SIZE + 24) + 128
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
                        self.add_runs(new_runs)
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
                self.truncate_view(index)
                self._cache.clear()
                if seg.last_index >= index:
                    self.view_first.append(index)
                    self.view_seg.append(seg)
                    self.add_runs(seg.runs)
                    self.last = seg.last_index
            if hardstate is not None:
                self.hardstate = hardstate
        except BaseException as exc:          # the index is half updated: stop writing
            self.fail(exc)
            raise

    def _cut(self, base_index: int, records=(), hardstate: HardState | None = None) -> Segment:
        self.check_writable()
        try:
            assert self.provider is not None    # a WAL that writes has its provider
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
            assert self.provider is not None    # a WAL that writes has its provider
            self.provider.segment_sealed(seg)
        except BaseException as exc:
            err = self._failure(exc, seg, f"sealing {seg.path}")
            if err is exc:
                raise
            raise err from exc

    def truncate_from(self, index: int) -> None:
        """Durably discard entries >= index: a new segment based at ``index`` supersedes them."""
        with self.write_lock:
            self.check_writable()
            self._replace_from(index)

    def cut_now(self) -> None:
        """Seal the active segment and start a new one now (a DEK rotation's step 2)."""
        with self.write_lock:
            self.check_writable()
            self.seal_active()
            self._cut(self.last + 1)

    def seal_for_close(self) -> None:
        """Seal the active segment, and refuse every write after it (in one hold of the write lock: a
        queued save cannot start a new segment between this seal and close())."""
        with self.write_lock:
            try:
                if self.failed is None and not self.closed and self.active is not None and self.active.writable:
                    self.seal_active()
            finally:
                self.closed = True

    def close(self) -> None:
        """Close every segment file, even when closing one of them raises (the first error is
        raised after the others were closed).  Taken under the write lock: a write unit in progress
        finishes first, and a save or compaction that comes later is refused (closed)."""
        with self.write_lock:
            self.closed = True
            first = None
            for seg in self.segments:
                try:
                    seg.release()
                except BaseException as exc:        # noqa: BLE001 - re-raised below
                    first = first or exc
            if first is not None:
                raise first
