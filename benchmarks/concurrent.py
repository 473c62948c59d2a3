"""Concurrent writers: T threads, each saving single 1 KiB entries, every save durable on return.

``concurrent/threads=16/entry=1k/v=walcrypt-encrypted`` -- T threads (1, 4, 16) share one store and
each makes ``concurrent_entries / T`` single-entry saves; the figure is entries per second from the
moment every thread is released until the last save returned, and the latency of each save (from
the call until it returned, durable), pooled over the threads and the repetitions.  The variants of
one thread count run interleaved in one group:

* ``walcrypt-encrypted`` -- one store opened with ``sync="batch"`` (group commit: the saves that
  queue while a unit is being written and synced are written together, with one fdatasync).
* ``raw-prealloc`` -- the disk's floor with the same threads: the records of
  :class:`benchmarks.baselines.RawPreallocBaseline` (same bytes, same preallocated file) behind a
  minimal group-commit writer (:class:`RawGroupWriters`) -- each thread queues its record, one
  leader at a time writes everything queued with one ``pwrite`` and one ``fdatasync``, and wakes
  the threads it wrote for.  Its group sizes come from the same thread count: "the same batching"
  as walcrypt's, without its costs.
* ``lmdb`` / ``sqlite`` -- the encrypted baselines with the same threads: one write transaction
  per save (LMDB with ``sync=True``; SQLite in WAL mode with ``synchronous=FULL``).  Both admit
  one writer at a time, so the threads take turns: a lock in front of the store (waiting threads
  release the GIL) serialises the saves, and SQLite shares one connection among the threads (its
  best case: several connections would wait for its write lock in its busy handler, sleeping).

How the threads get their Raft indexes.  A Raft log is contiguous: entry k+1 is saved after entry
k, and walcrypt's ``save()`` refuses a save whose first index is not the next one (a gap).  The
index therefore comes from a sequencer in the host -- a lock and a counter, as a Raft leader's
proposal path hands out the next index -- and the thread then calls ``save()`` with its one entry.
``save()`` queues requests in arrival order and its group-commit leader writes them in that
order, so the sequencer's order reaches the log as long as each thread reaches the queue before
the thread that took the next index.  A thread can be preempted between taking its index and
queueing its request, and then its successor's save arrives first and is refused as a gap
(walcrypt refuses that request alone and writes nothing for it); the successor resubmits the same
entry.  Every entry is written exactly once, in index order, and each repetition checks that the
log ends at the last index handed out.  The resubmissions are counted (``gap_retries`` in the
case's extra facts): they are walcrypt's cost of taking single-entry saves from many threads
without an API that assigns the index when the request is queued.  The raw writer, LMDB and
SQLite assign the index inside their own critical section (the raw writer's queue lock, the
LMDB/SQLite write turn), so they never see a gap.

The mean group size (entries per fdatasync) of walcrypt (from ``Store.fsync_count``) and of the
raw writer is recorded in each case's extra facts (of the last repetition).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, List, Optional

from .baselines import LmdbBaseline, RawPreallocBaseline, SqliteBaseline
from .common import (
    CONCURRENT_THREADS,
    CONCURRENT_VARIANTS,
    WALCRYPT_KEK,
    Selector,
    Sizing,
    concurrent_case,
    payload_pool,
)
from .harness import Case, Sample

ENTRY = 1024
TERM = 1
JOIN_TIMEOUT = 600.0  # seconds; a thread still saving after this is reported as hung
MAX_GAP_RETRIES = 1000  # per save: far beyond what preemption can cause (see the module docstring)
#: how the saves of concurrent threads reach the disk, per variant (the cases' "commit" parameter)
COMMIT = {"walcrypt-encrypted": "group (sync=batch)", "raw-prealloc": "group"}


class WalcryptWriters:
    """One walcrypt store, ``sync="batch"``, fed by many threads through a host-side sequencer."""

    def __init__(self, encrypted: bool = True):
        self.encrypted = encrypted

    def open(self, d: str) -> None:
        import walcrypt

        kwargs: Dict[str, object] = {"encrypted": self.encrypted, "sync": "batch"}
        if self.encrypted:
            kwargs["kek"] = walcrypt.RawKey(WALCRYPT_KEK)
        self.store = walcrypt.open(os.path.join(d, "wal"), **kwargs)
        self._entry = walcrypt.Entry
        self._usage_error = walcrypt.UsageError
        self._seq = threading.Lock()
        self._next = self.store.last_index() + 1
        self.retries = 0
        self._fsyncs0 = self.store.fsync_count

    def append_one(self, data: bytes) -> None:
        with self._seq:                      # the sequencer: the next index, in order
            entry = self._entry(self._next, TERM, data)
            self._next += 1
        save = self.store.save
        for _ in range(MAX_GAP_RETRIES):
            try:
                save(entries=[entry])
                return
            except self._usage_error as exc:
                # Refused alone, nothing written: the predecessor's request was not queued yet.
                if "gap" not in str(exc):
                    raise
                with self._seq:
                    self.retries += 1
        raise AssertionError(f"entry {entry.index} refused as a gap {MAX_GAP_RETRIES} times")

    def last(self) -> int:
        return self.store.last_index()

    def extra(self, n: int) -> Dict[str, object]:
        syncs = self.store.fsync_count - self._fsyncs0
        return {"syncs": syncs, "mean_group": n / syncs if syncs else None, "gap_retries": self.retries}

    def close(self) -> None:
        self.store.close()


class RawGroupWriters:
    """The preallocated raw file behind a minimal group-commit writer (the disk's floor).

    One lock and one condition.  A thread assigns its index and queues its record under the lock
    (so the queue is in index order), then waits until its index is durable.  While no write is
    under way, a waiting thread whose record is not durable becomes the leader: it takes the whole
    queue, writes it -- outside the lock, so that others queue meanwhile -- with one pwrite and one
    fdatasync, marks it durable and wakes every waiter.  A thread whose record was written returns
    as soon as it is woken; it never waits for a later group.  A failed write fails the writer:
    every waiting and later save raises.
    """

    def open(self, d: str) -> None:
        self.file = RawPreallocBaseline(sync=True)
        self.file.open(d)
        self._cv = threading.Condition(threading.Lock())
        self._queue: List[tuple] = []
        self._next = 1
        self._durable = 0
        self._writing = False
        self.syncs = 0
        self._failed: Optional[BaseException] = None

    def append_one(self, data: bytes) -> None:
        cv = self._cv
        with cv:
            index = self._next
            self._next = index + 1
            self._queue.append((index, TERM, data))
            while self._durable < index:
                if self._failed is not None:
                    raise RuntimeError(f"an earlier group write failed: {self._failed!r}")
                if self._writing:
                    cv.wait()
                    continue
                self._writing = True
                batch, self._queue = self._queue, []
                cv.release()
                try:
                    self.file.append_batch(batch)      # one pwrite + one fdatasync
                except BaseException as exc:
                    self._failed = exc
                    raise
                finally:
                    cv.acquire()
                    self._writing = False
                    if self._failed is None:
                        self._durable = batch[-1][0]
                        self.syncs += 1
                    cv.notify_all()

    def last(self) -> int:
        return self._durable

    def extra(self, n: int) -> Dict[str, object]:
        return {"syncs": self.syncs, "mean_group": n / self.syncs if self.syncs else None}

    def close(self) -> None:
        self.file.close()


class _SharedSqlite(SqliteBaseline):
    check_same_thread = False


class TurnWriters:
    """LMDB or SQLite: the threads take turns (one write transaction per save, synced at commit);
    the index is assigned in the turn, so the log is in index order."""

    def __init__(self, variant: str):
        self.store = LmdbBaseline(sync=True) if variant == "lmdb" else _SharedSqlite(sync=True)

    def open(self, d: str) -> None:
        self.store.open(d)
        self._turn = threading.Lock()
        self._next = 1

    def append_one(self, data: bytes) -> None:
        with self._turn:
            index = self._next
            self.store.append_batch([(index, TERM, data)])
            self._next = index + 1

    def last(self) -> int:
        return self._next - 1

    def extra(self, n: int) -> Dict[str, object]:
        return {"syncs": n, "mean_group": 1.0}       # one commit per save

    def close(self) -> None:
        self.store.close()


def make_writers(variant: str):
    if variant.startswith("walcrypt-"):
        return WalcryptWriters(encrypted=variant == "walcrypt-encrypted")
    if variant == "raw-prealloc":
        return RawGroupWriters()
    return TurnWriters(variant)


def _concurrent_once(variant: str, threads: int, n: int) -> Callable[[str], Sample]:
    per = n // threads
    total = per * threads
    pool = payload_pool(ENTRY)

    def run(d: str) -> Sample:
        log = make_writers(variant)
        log.open(d)
        try:
            lats: List[List[float]] = [[] for _ in range(threads)]
            errors: List[BaseException] = []
            start = threading.Barrier(threads + 1)

            def work(t: int) -> None:
                out = lats[t]
                append = log.append_one
                clock = time.perf_counter
                try:
                    start.wait()
                    for k in range(per):
                        data = pool[(t * per + k) % len(pool)]
                        t0 = clock()
                        append(data)
                        out.append(clock() - t0)
                except BaseException as exc:  # noqa: BLE001 - reported after the join
                    errors.append(exc)

            workers = [threading.Thread(target=work, args=(t,), daemon=True, name=f"writer-{t}")
                       for t in range(threads)]
            for w in workers:
                w.start()
            start.wait()
            t0 = time.perf_counter()
            for w in workers:
                w.join(JOIN_TIMEOUT)
            dt = time.perf_counter() - t0
            if any(w.is_alive() for w in workers):
                raise AssertionError(f"a writer thread still saving after {JOIN_TIMEOUT:.0f} s")
            if errors:
                raise errors[0]
            if log.last() != total:
                raise AssertionError(f"{variant}: the log ends at {log.last()}, {total} entries were saved")
            extra = log.extra(total)
        finally:
            log.close()
        extra["threads"] = threads
        return Sample(dt, total, total * ENTRY, latencies=[x for xs in lats for x in xs], extra=extra)

    return run


def build_groups(sz: Sizing, wc_reason: Optional[str], select: Selector) -> List[List[Case]]:
    groups: List[List[Case]] = []
    n = sz.concurrent_entries
    for threads in CONCURRENT_THREADS:
        group: List[Case] = []
        for v in CONCURRENT_VARIANTS:
            name = concurrent_case(threads, v)
            if not select(name, "concurrent", v):
                continue
            reason = "walcrypt unavailable" if wc_reason and v.startswith("walcrypt") else None
            c = Case(name, "concurrent", v, "ops/s",
                     params={"threads": threads, "entry": ENTRY, "entries": n // threads * threads,
                             "commit": COMMIT.get(v, "per-save")},
                     skip_reason=reason)
            if not reason:
                c.run_once = _concurrent_once(v, threads, n)
            group.append(c)
        if group:
            groups.append(group)
    return groups
