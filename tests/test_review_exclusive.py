"""Review of Wal.exclusive(), close()/release() and group-commit record coalescing (336271c..25ba925).

Each test is a break found in review; each failed on the reviewed code and passes since its fix:
a read meeting a segment compaction removed (or the store closed) under it is CompactedError (or
"the store is closed"), never a misuse error or a read through a closed descriptor (segments are
pinned while read); a DEK rotation that finds the rotation it meant to queue behind completed
never asks the key service under the write lock (it declines, and its caller asks first); an
operation that changes the log, or close(), called from a thread in the middle of a write unit (a
signal handler) is refused.  Interleavings are forced with hooks at the point
where another thread's call lands (as tests/test_concurrent_state_changes.py does), with real
threads, real files and real LMDB.
"""

from __future__ import annotations

import threading

import pytest
import wctest

import walcrypt
from walcrypt import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    SnapshotMeta,
    UsageError,
)
from walcrypt.vfs import VFS

CS = ConfState(voters=(1,))
JOIN_S = 20


_run = wctest.in_thread


def _filled(d: str, n: int = 60, **opts):
    """A store of n one-entry saves in 4 KiB segments: sealed segments of 7 records each."""
    s = wctest.open_store(d, sync="batch", segment_size=4096, **opts)
    for i in range(1, n + 1):
        s.save(HardState(1, 0, i), [Entry(i, 1, b"x%d-" % i + b"x" * 100)])
    return s


# ---------------------------------------------------------------------------------------------
# 1. A read that meets a segment released by a concurrent compaction gets UsageError
# ---------------------------------------------------------------------------------------------

def test_compacting_while_iterating_ends_the_iteration_with_compacted_error(tmp_path):
    s = _filled(str(tmp_path / "data"))
    try:
        a, b, c = s.wal.segments[:3]
        assert a.sealed and b.sealed and c.sealed
        # from the first segment into the first two records of the second (read one by one)
        it = s.iter_batches(a.base_index, b.base_index + 2)
        first = next(it)
        assert first.first == a.base_index
        s.compact(c.base_index + 1)                    # purges a and b while the host iterates
        assert b not in s.wal.segments
        with pytest.raises(CompactedError):
            for _batch in it:
                pass
    finally:
        s.close()


def test_entries_racing_a_compaction_in_another_thread_is_compacted_error(tmp_path):
    s = _filled(str(tmp_path / "data"))
    try:
        a, b, c = s.wal.segments[:3]
        wal = s.wal
        pieces = wal._pieces
        other: list = []

        def pieces_then_compaction_in_another_thread(lo, hi):
            out = pieces(lo, hi)
            del wal._pieces
            # another thread: the host compacts after applying a snapshot
            other.append(_run(lambda: s.compact(c.base_index + 1)))
            other[0][0].join(JOIN_S)
            return out
        wal._pieces = pieces_then_compaction_in_another_thread
        with pytest.raises(CompactedError):
            s.entries(b.base_index, b.last_index + 1)          # 7 records: read in one window
        t, out = other[0]
        assert not t.is_alive() and "error" not in out, out
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# 2. rotate_dek() behind a snapshot commit that completes the rotation in flight
# ---------------------------------------------------------------------------------------------

class _FlakyService(wctest.FlakyService):
    """The suite's in-process key service, counting the calls made while the WAL's write lock is held."""

    def __init__(self):
        super().__init__(name="review")
        self.calls_while_write_locked = 0
        self.wal = None

    def _gate(self):
        if self.wal is not None and self.wal.write_lock._is_owned():
            self.calls_while_write_locked += 1
        super()._gate()


def test_rotate_dek_behind_a_completing_snapshot_commit_never_fails_the_store(tmp_path):
    svc = _FlakyService()
    d = str(tmp_path / "data")
    s = walcrypt.open(d, kek=wctest.flaky_kms(svc), sync="batch")
    try:
        svc.wal = s.wal
        for i in range(1, 11):
            s.save(HardState(1, 0, i), [Entry(i, 1, b"e%d" % i)])
        s.rotate_dek()                                      # in flight: waits for a snapshot at >= 10
        assert s.needs_snapshot
        s.save(HardState(1, 0, 11), [Entry(11, 1, b"e11")])

        rot = s.rotation
        on_snapshot = rot.on_snapshot
        inside, go = threading.Event(), threading.Event()

        def held_on_snapshot(info):                        # the commit is inside Wal.exclusive() here
            inside.set()
            go.wait(JOIN_S)
            return on_snapshot(info)
        rot.on_snapshot = held_on_snapshot
        tc, commit_out = _run(lambda: s.save_snapshot(SnapshotMeta(11, 1, CS), b"state at 11"))
        assert inside.wait(JOIN_S), commit_out

        svc.up = False                                      # the key service goes away
        # The rotator now waits for the commit (which holds key_lock while it completes the
        # rotation): it decides on the state the commit leaves, never on the one before it.
        tr, rot_out = _run(s.rotate_dek)
        tr.join(0.5)
        assert tr.is_alive() and not rot_out, rot_out
        go.set()
        tc.join(JOIN_S)
        tr.join(JOIN_S)
        assert not tc.is_alive() and not tr.is_alive(), "a deadlock"
        assert "error" not in commit_out, commit_out
        # An outage puts a requested rotation off (or it was queued): the call does not fail, and
        # the store goes on taking saves.
        assert s.wal.failed is None, f"the store failed: {s.wal.failed!r} (rotate_dek raised {rot_out!r})"
        s.save(HardState(1, 0, 12), [Entry(12, 1, b"e12")])
        assert "error" not in rot_out, repr(rot_out.get("error"))
        assert svc.calls_while_write_locked == 0, "the key service was asked while the write lock was held"
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# 3. close() / purge release a segment whose descriptor a reader is about to use
# ---------------------------------------------------------------------------------------------

class _SlowReadVFS(VFS):
    """The next pread of ``reader`` waits until ``gate`` is set (a reader descheduled between taking a
    segment's descriptor and reading through it)."""

    def __init__(self):
        super().__init__()
        self.reader: threading.Thread | None = None
        self.entered = threading.Event()
        self.gate = threading.Event()

    def pread(self, fd, n, offset):
        if self.reader is threading.current_thread():
            self.reader = None
            self.entered.set()
            self.gate.wait(JOIN_S)
        return super().pread(fd, n, offset)


@pytest.mark.parametrize("other", ["close", "compact"])
def test_a_read_racing_close_or_purge_gets_a_typed_answer(tmp_path, other):
    vfs = _SlowReadVFS()
    s = _filled(str(tmp_path / "data"), n=30, vfs=vfs)
    try:
        s.wal._cache.clear()
        seg = s.wal.segments[0]
        t = threading.Thread(target=lambda: None)
        out: dict = {}

        def read():
            try:
                out["ok"] = s.entries(2, 3)                # one record of a sealed segment
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                out["error"] = exc
        t = threading.Thread(target=read, daemon=True)
        vfs.reader = t
        t.start()
        assert vfs.entered.wait(JOIN_S)
        if other == "close":
            s.close()
        else:
            s.compact(20)                                   # purges the segment being read
            assert seg not in s.wal.segments
        vfs.gate.set()
        t.join(JOIN_S)
        assert not t.is_alive()
        if "error" in out:
            assert isinstance(out["error"], (UsageError, CompactedError)), repr(out["error"])
        else:
            assert [e.index for e in out["ok"]] == [2]
    finally:
        vfs.gate.set()
        s.close()


# ---------------------------------------------------------------------------------------------
# 4. exclusive() lets in the thread that is in the middle of a write unit
# ---------------------------------------------------------------------------------------------

class _HookVFS(VFS):
    """Runs ``hook`` once, right after the next pwrite returned: what a signal handler (or a
    file-system hook) of the writing thread does between the write of a unit and its sync."""

    hook = None

    def pwrite(self, fd, data, offset):
        n = super().pwrite(fd, data, offset)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return n


def test_a_truncation_from_inside_a_write_unit_is_refused_or_kept_consistent(tmp_path):
    d = str(tmp_path / "data")
    vfs = _HookVFS()
    s = wctest.open_store(d, sync="batch", vfs=vfs)
    try:
        for i in range(1, 11):
            s.save(HardState(1, 0, i), [Entry(i, 1, b"e%d" % i)])
        seen: list = []

        def handler():
            try:
                s.truncate(5)
                seen.append("truncated")
            except UsageError as exc:                  # refused, as append refuses a save from here
                seen.append(exc)
        vfs.hook = handler
        s.save(HardState(1, 0, 11), [Entry(11, 1, b"e11")])
        assert seen
        if s.wal.failed is None:
            before = wctest.read_everything(s)
            s.close()
            assert wctest.open_and_read_all(d, sync="batch") == before, (
                "the store reopened to another log than the one it served")
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# 5. What the review suspected but did not pin down, made tests
# ---------------------------------------------------------------------------------------------

def test_close_from_a_signal_handler_in_the_middle_of_a_unit_is_refused(tmp_path):
    d = str(tmp_path / "data")
    vfs = _HookVFS()
    s = wctest.open_store(d, sync="batch", vfs=vfs)
    try:
        s.save(HardState(1, 0, 1), [Entry(1, 1, b"one")])
        seen: list = []

        def handler():
            try:
                s.close()
                seen.append("closed")
            except UsageError as exc:
                seen.append(exc)
        vfs.hook = handler
        s.save(HardState(1, 0, 2), [Entry(2, 1, b"two")])      # acknowledged: must survive
        assert len(seen) == 1 and isinstance(seen[0], UsageError), seen
    finally:
        s.close()
    assert wctest.open_and_read_all(d, sync="batch")[0] == [Entry(1, 1, b"one"), Entry(2, 1, b"two")]


def test_no_save_starts_a_segment_after_the_close_seal(tmp_path):
    """Between sealing on close and releasing the files, a save that was queued gets "closed"; it
    does not start a segment that close() then leaves unsealed."""
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch")
    s.save(HardState(1, 0, 1), [Entry(1, 1, b"one")])
    s.wal.seal_for_close()
    with pytest.raises(UsageError, match="closed"):
        s.wal.append([Entry(2, 1, b"two")], None)
    s.close()
    with wctest.open_store(d, read_only=True) as ro:
        assert all(seg.sealed for seg in ro.wal.segments)
        assert ro.last_index() == 1


def test_a_rotation_queued_behind_a_completed_one_starts_in_the_same_commit(tmp_path):
    """Two rotations queued behind the one in flight: the snapshot commit that completes it starts
    the next (its key asked for before the write lock is taken) in the same transaction, so the
    queue is durable at every moment: a reopen right after finds the next one in flight, one queued."""
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch")
    try:
        for i in range(1, 6):
            s.save(HardState(1, 0, i), [Entry(i, 1, b"e%d" % i)])
        s.rotate_dek()
        s.rotate_dek()
        s.rotate_dek()
        assert s.rotation.state["queued"] == 2
        first = s.rotation.pending_key_id
        s.save_snapshot(SnapshotMeta(5, 1, CS), b"state at 5")
        assert s.rotation.state is not None and s.rotation.state["queued"] == 1
        assert s.rotation.pending_key_id not in (None, first)
        assert s.key_info()["rotation"]["queued"] == 1
        s.save(HardState(1, 0, 6), [Entry(6, 1, b"e6")])    # written under the next pending key
    finally:
        s.close()
    with wctest.open_store(d, sync="batch") as s2:
        assert s2.key_info()["rotation"]["queued"] == 1
        assert s2.entries(6, 7) == [Entry(6, 1, b"e6")]


class _InterruptingUnlinkVFS(VFS):
    armed = False

    def unlink(self, path):
        if self.armed and path.endswith(".wal"):
            self.armed = False
            raise KeyboardInterrupt
        return super().unlink(path)


def test_a_purge_interrupted_before_its_unlinks_fails_the_store_and_reopens(tmp_path):
    d = str(tmp_path / "data")
    vfs = _InterruptingUnlinkVFS()
    s = _filled(d, vfs=vfs)
    try:
        purge = s.purge_segments
        s.purge_segments = lambda: None                     # compaction without its purge ...
        s.compact(40)
        del s.purge_segments
        vfs.armed = True
        with pytest.raises(KeyboardInterrupt):
            purge()                                         # ... then the purge, interrupted
        with pytest.raises(walcrypt.StoreFailedError):
            s.save(HardState(1, 0, 61), [Entry(61, 1, b"next")])
    finally:
        s.close()
    entries, _hs = wctest.open_and_read_all(d, sync="batch", segment_size=4096)
    assert [e.index for e in entries] == list(range(41, 61))


def test_a_save_that_triggers_a_rotation_while_another_thread_closes_still_returns(tmp_path):
    """A save whose entries were written is acknowledged even when the DEK rotation its key budget
    starts finds the store closed by another thread meanwhile (the entries are durable)."""
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch", segment_size=4096, max_records_per_dek=3)
    s.save(HardState(1, 0, 1), [Entry(1, 1, b"one")])
    real = s._rotate_dek

    def close_first(reason, **kw):
        s.close()                                   # another thread's close lands here
        return real(reason, **kw)
    s._rotate_dek = close_first
    for i in range(2, 40):                          # a budget counts sealed segments' records
        s.save(HardState(1, 0, i), [Entry(i, 1, b"e%d" % i + bytes(1000))])
        if s.closed:
            break
    assert s.closed, "the key budget never started a rotation: the test lost its point"
    entries, _hs = wctest.open_and_read_all(d, sync="batch", segment_size=4096)
    assert entries[-1].index == i
