"""Changes of the log's state that take several steps (compaction, a snapshot's commit and the log reset
it implies, purges, truncation, DEK rotation, close) racing saves and each other in real threads.

The first tests force one interleaving each: a hook at the point where the other thread's call
used to land starts that call in a real thread and gives it time to get through.  Before the fix
it did, and the store failed or no longer opened; now it waits for the first operation to finish.
The last test generates: threads drive saves (with Raft truncations), compactions, snapshots
(behind, at and ahead of the log), DEK rotations, purges and reads at random, and afterwards the
store must not have failed, must reopen to what it held in memory, and must not have sealed two
payloads under one (key, nonce).
"""

from __future__ import annotations

import random
import threading

import noncescan
import pytest
import wctest

import walcrypt
from walcrypt import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    SnapshotMeta,
    UnavailableError,
    UsageError,
)
from walcrypt.check import check

# How long a forced interleaving lets the other thread run before the first one goes on: long
# enough for it to finish when nothing holds it back (it writes a few KiB and syncs).
LET_IT_RUN_S = 1.0
JOIN_S = 60


_in_thread = wctest.in_thread


def _finish(t: threading.Thread, out: dict):
    t.join(JOIN_S)
    assert not t.is_alive(), "the other thread never finished (a deadlock?)"
    if "error" in out:
        raise out["error"]
    return out["ok"]


def _saved(d: str, n: int):
    """A store in 4 KiB segments holding n one-entry saves of 100 bytes (term 1)."""
    s = wctest.open_store(d, sync="batch", segment_size=4096)
    for i in range(1, n + 1):
        s.save(HardState(1, 0, i), [Entry(i, 1, b"x" * 100)])
    return s


def test_compact_racing_a_snapshot_ahead_of_the_log_leaves_an_openable_store(tmp_path):
    d = str(tmp_path / "data")
    s = _saved(d, 40)
    wal = s.wal
    compact = wal.compact
    other: list = []

    def compact_then_other_thread(index, term=None):
        compact(index, term)
        del wal.compact
        # another thread: a snapshot received from the leader, ahead of the log (a log reset)
        other.append(_in_thread(lambda: s.save_snapshot(SnapshotMeta(50, 2, ConfState(voters=(1,))),
                                                        b"snapshot at 50")))
        other[0][0].join(LET_IT_RUN_S)
    wal.compact = compact_then_other_thread
    s.compact(20)
    _finish(*other[0])
    s.save(HardState(2, 0, 51), [Entry(51, 2, b"acknowledged after the snapshot")])
    s.close()
    with wctest.open_store(d, sync="batch", segment_size=4096) as s2:
        assert s2.first_index() == 51
        assert s2.entries(51, 52) == [Entry(51, 2, b"acknowledged after the snapshot")]
        assert s2.snapshot().meta.index == 50


def test_compact_racing_a_truncation_does_not_fail_the_store(tmp_path):
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch", segment_size=4096)
    s.save(HardState(1, 0, 0), [Entry(i, 1, b"x") for i in range(1, 11)])
    wal = s.wal
    term = wal.term
    other: list = []

    def term_then_other_thread(index):
        t = term(index)
        del wal.term
        # another thread: a new leader's entry at 5 truncates 6..10
        other.append(_in_thread(lambda: s.save(HardState(2, 0, 0), [Entry(5, 2, b"a new leader's entry")])))
        other[0][0].join(LET_IT_RUN_S)
        return t
    wal.term = term_then_other_thread
    try:
        s.compact(8)
    except (UnavailableError, CompactedError):
        pass                                   # the truncation came first: compacting beyond it is refused
    _finish(*other[0])
    # Whichever came first, the store goes on (compaction first: the truncation's entry at 5 lies
    # below the compaction point and is covered by it).
    nxt = s.last_index() + 1
    s.save(HardState(2, 0, 0), [Entry(nxt, 2, b"the next entry")])
    before = wctest.read_everything(s)
    s.close()
    assert wctest.open_and_read_all(d, sync="batch", segment_size=4096) == before


def test_two_concurrent_purges_do_not_fail_the_store(tmp_path):
    d = str(tmp_path / "data")
    s = _saved(d, 60)
    wal = s.wal
    removable = wal.removable
    other: list = []

    def removable_then_other_thread(floor):
        segs = removable(floor)
        del wal.removable
        if segs:
            # another thread's purge (a snapshot's retention) on the same floor
            other.append(_in_thread(s.purge_segments))
            other[0][0].join(LET_IT_RUN_S)
        return segs
    wal.removable = removable_then_other_thread
    s.compact(40)
    assert other, "the compaction had nothing to purge: the test lost its point"
    _finish(*other[0])
    s.save(HardState(1, 0, 61), [Entry(61, 1, b"next")])
    before = wctest.read_everything(s)
    s.close()
    assert wctest.open_and_read_all(d, sync="batch", segment_size=4096) == before


@pytest.mark.parametrize("sync", ["batch", "always"])
def test_saves_racing_close_get_a_clean_answer(tmp_path, sync):
    """Saves in flight when another thread closes the store: each either returned (and is in the
    reopened log) or was refused with UsageError ("closed"); nothing else, and no descriptor of the
    closed store is used or opened again."""
    d = str(tmp_path / "data")
    for rnd in range(6):
        _close_under_saves(d, sync, rnd)


def _close_under_saves(d: str, sync: str, rnd: int) -> None:
    s = wctest.open_store(d, sync=sync, segment_size=8192)
    start = s.last_index() + 1
    nxt = [start]
    lock = threading.Lock()
    acked: dict[int, bytes] = {}
    errors: list = []

    def writer():
        for _ in range(200):
            with lock:
                i = nxt[0]
                nxt[0] += 1
            data = f"{rnd}:{i}".encode() * 20
            try:
                s.save(HardState(1, 0, i), [Entry(i, 1, data)])
            except UsageError as exc:
                if "gap" in str(exc):
                    continue                # its predecessor was refused (closed)
                assert "closed" in str(exc), exc
                return
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            acked[i] = data

    def reader():
        for _ in range(400):
            try:
                last = s.last_index()
                if last >= start:
                    s.entries(max(start, last - 5), last + 1)
            except UsageError as exc:
                assert "closed" in str(exc) or "released" in str(exc), exc
                return
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=writer) for _ in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    while len(acked) < 10 * (rnd + 1) and any(t.is_alive() for t in threads):
        threads[0].join(0.001)
    s.close()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive()
    assert not errors, errors
    with wctest.open_store(d, sync=sync, segment_size=8192) as s2:
        for i, data in acked.items():
            assert s2.entries(i, i + 1) == [Entry(i, 1, data)]


def test_dek_rotations_racing_snapshot_commits(tmp_path):
    """rotate_dek() in two threads while a third commits the snapshots that complete rotations and a
    fourth saves: every rotation queues, starts or completes; none fails the store."""
    d = str(tmp_path / "data")

    def source(store):
        last = store.last_index()
        return SnapshotMeta(last, store.term(last), ConfState(voters=(1,))), b"state at %d" % last
    s = wctest.open_store(d, sync="batch", segment_size=8192, snapshot_source=source)
    s.save(HardState(1, 0, 1), [Entry(1, 1, b"first")])
    nxt = [2]
    lock = threading.Lock()
    errors: list = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    def saver():
        for _ in range(150):
            with lock:
                i = nxt[0]
                nxt[0] += 1
                s.save(HardState(1, 0, i), [Entry(i, 1, b"e%d" % i)])

    def rotator():
        for _ in range(8):
            try:
                s.rotate_dek()
            except UsageError as exc:
                # Step 3 (the source's snapshot) lost to a newer snapshot committed meanwhile: it is
                # refused as out of date; the rotation stays in flight and that newer one serves it.
                assert "older than the snapshot" in str(exc), exc

    def snapshotter():
        for _ in range(20):
            with lock:
                last = s.last_index()
                meta = SnapshotMeta(last, s.term(last), ConfState(voters=(1,)))
            try:
                s.save_snapshot(meta, b"state at %d" % last)
            except UsageError as exc:
                assert "newer" in str(exc) or "older" in str(exc) or "snapshot" in str(exc), exc

    threads = [threading.Thread(target=guarded(f)) for f in (saver, rotator, rotator, snapshotter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S * 2)
        assert not t.is_alive()
    assert not errors, errors
    s.wal.check_writable()
    before = wctest.read_everything(s)
    s.close()
    assert wctest.open_and_read_all(d, sync="batch", segment_size=8192, snapshot_source=source) == before
    assert not noncescan.scan(d).reuses(), "a (key, nonce) pair sealed two payloads"


# ---------------------------------------------------------------------------------------------
# Generated: many operations at random, in threads
# ---------------------------------------------------------------------------------------------

# What a racing operation may be told: its request no longer fits the log another thread changed.
_REFUSALS = (CompactedError, UnavailableError, UsageError)


class Host:
    """A Raft-like host driving one store from several threads.  Indexes are handed out under the
    host's lock as a leader hands them out; a save may still be refused when another thread's
    compaction, truncation or snapshot changed the log meanwhile (the refusals above)."""

    def __init__(self, store, seed: int):
        self.s = store
        self.lock = threading.Lock()
        self.term = 1
        self.errors: list = []
        self.seed = seed

    def run(self, name: str, rounds: int) -> None:
        r = random.Random(f"{self.seed}:{name}")
        op = getattr(self, name)
        try:
            for _ in range(rounds):
                try:
                    op(r)
                except _REFUSALS as exc:
                    if isinstance(exc, UsageError) and "closed" in str(exc):
                        raise
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.errors.append((name, exc))

    def save(self, r: random.Random) -> None:
        s = self.s
        with self.lock:
            last = s.last_index()
            if r.random() < 0.1 and last > s.first_index():
                # a new leader's entries replace a suffix
                self.term += 1
                i = r.randrange(s.first_index(), last + 1)
            else:
                i = last + 1
            term = self.term
        n = r.choice([1, 1, 1, 3, 10])
        s.save(HardState(term, 0, 0), [Entry(i + k, term, b"%d:%d:" % (i + k, term) + bytes(r.randrange(300)))
                                       for k in range(n)])

    def compact(self, r: random.Random) -> None:
        s = self.s
        first, last = s.first_index(), s.last_index()
        if last > first:
            s.compact(r.randrange(first, last))

    def snapshot(self, r: random.Random) -> None:
        s = self.s
        with self.lock:
            first, last = s.first_index(), s.last_index()
            if r.random() < 0.2 or last < max(first, 1):
                # received from the leader, ahead of the log: the log is reset
                self.term += 1
                meta = SnapshotMeta(last + r.randrange(1, 20), self.term, ConfState(voters=(1,)))
            else:
                i = r.randrange(max(first, 1), last + 1)
                meta = SnapshotMeta(i, s.term(i), ConfState(voters=(1,)))
        if r.random() < 0.5:
            s.save_snapshot(meta, b"snap %d" % meta.index)
        else:
            w = s.begin_snapshot(meta)
            w.write(b"streamed snap ")
            w.write(b"%d" % meta.index)
            w.commit()

    def rotate(self, r: random.Random) -> None:
        self.s.rotate_dek()

    def read(self, r: random.Random) -> None:
        s = self.s
        first, last = s.first_index(), s.last_index()
        if last < first:
            return
        lo = r.randrange(first, last + 1)
        hi = min(last + 1, lo + r.randrange(1, 300))
        for e in s.entries(lo, hi):
            assert e.data.startswith(b"%d:%d:" % (e.index, e.term)), e
        if r.random() < 0.3:
            for idx, term, data in s.iter_entries(lo, hi):
                assert data.startswith(b"%d:%d:" % (idx, term))

    def purge(self, r: random.Random) -> None:
        self.s.purge_segments()


@pytest.mark.parametrize("seed", range(12))
def test_generated_concurrent_operations(tmp_path, seed):
    d = str(tmp_path / "data")

    def source(store):
        last = store.last_index()
        return SnapshotMeta(last, store.term(last) if last else 0, ConfState(voters=(1,))), b"rotation snap"
    s = wctest.open_store(d, sync="batch", segment_size=16384, snapshot_source=source, keep_snapshots=2)
    host = Host(s, seed)
    plan = [("save", 60), ("save", 60), ("compact", 15), ("snapshot", 10), ("rotate", 4), ("read", 60),
            ("purge", 10)]
    threads = [threading.Thread(target=host.run, args=p) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S * 3)
        assert not t.is_alive(), "an operation never finished (a deadlock?)"
    assert not host.errors, host.errors
    s.wal.check_writable()                      # nothing failed the store
    before = wctest.read_everything(s)
    snap = s.snapshot()
    snap_meta = snap.meta if snap is not None else None
    s.close()
    with wctest.open_store(d, sync="batch", segment_size=16384, snapshot_source=source) as s2:
        assert wctest.read_everything(s2) == before
        snap2 = s2.snapshot()
        assert (snap2.meta if snap2 is not None else None) == snap_meta
    assert not noncescan.scan(d).reuses(), "a (key, nonce) pair sealed two payloads"
    report = check(d, kek=walcrypt.RawKey(wctest.KEK_BYTES))
    assert report.ok, report.findings
