"""Review of 25ba925..1275fe7: segment pinning, DEK rotation declining (Rotation.rotate_dek returning
False), exclusive swaps of retained snapshots, fail-stop purges, seal_for_close, the refactors, and
the faster save path (prepare_entries / split_records / seal_parts).

Each test is a break found in review; each failed on the reviewed code and passes since its fix: a
re-key asks the key service again only outside its fail-stop guard (writers excluded, so the state
it decides on holds); a save of entries that unpack but cannot be indexed is normalised as before;
an interruption as a read pins a segment leaves no pin behind (the pin and the reader's record of
it change in one statement); the commit that completes a DEK rotation starts the one queued behind
it in the same transaction, its key asked for first (a queued request is never in memory only); a
read that meets segments a re-key rewrote locates the entries again instead of calling them
compacted.  Interleavings are forced with hooks at the point where another thread's call lands (as
tests/test_review_exclusive.py does), with real threads, real files and real LMDB."""

from __future__ import annotations

import os

import pytest
import wctest

import walcrypt
from walcrypt import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    KeyProviderError,
    SnapshotMeta,
    UsageError,
)

CS = ConfState(voters=(1,))
JOIN_S = 20


_run = wctest.in_thread


# ---------------------------------------------------------------------------------------------
# 1. rekey() behind a snapshot commit that completes the rotation in flight, during an outage
# ---------------------------------------------------------------------------------------------

def test_rekey_behind_a_completing_snapshot_commit_during_an_outage_keeps_the_store(tmp_path):
    svc = wctest.FlakyService(name="review")
    d = str(tmp_path / "data")
    s = walcrypt.open(d, kek=wctest.flaky_kms(svc), sync="batch")
    try:
        for i in range(1, 11):
            s.save(HardState(1, 0, i), [Entry(i, 1, b"e%d" % i)])
        s.rotate_dek()                                      # in flight: waits for a snapshot at >= 10
        assert s.needs_snapshot
        rot = s.rotation
        prepare = rot.prepare_key
        fired: list = []

        def prepare_then_a_snapshot_commits_in_another_thread(**kw):
            out = prepare(**kw)
            if out is None and not fired:                 # Store.rekey: a rotation in flight, no key
                del rot.prepare_key
                fired.append(_run(lambda: s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")))
                # The commit completes the rotation only under key_lock, which this thread holds: it
                # waits, and the re-key (writers excluded) finds it being committed and is refused.
                fired[0][0].join(0.5)
                svc.up = False                            # then the key service goes away
            return out
        rot.prepare_key = prepare_then_a_snapshot_commits_in_another_thread
        err = None
        try:
            s.rekey()
        except (KeyProviderError, UsageError) as exc:     # an outage, or the commit, refuses it ...
            err = exc
        assert fired, "the interleaving was not reached"
        t, res = fired[0]
        t.join(JOIN_S)
        assert not t.is_alive() and "error" not in res, res
        assert not s.needs_snapshot
        # ... and changes nothing: the store takes saves
        assert s.wal.failed is None, f"the store failed: {s.wal.failed!r} (rekey raised {err!r})"
        svc.up = True
        s.save(HardState(1, 0, 11), [Entry(11, 1, b"e11")])
    finally:
        svc.up = True
        s.close()


# ---------------------------------------------------------------------------------------------
# 2. prepare_entries: the column fast path reads entries by iteration, append() by indexing
# ---------------------------------------------------------------------------------------------

class _IterEntry:
    """A host's entry type: three fields, iterable (``index, term, data = e`` works), not subscriptable."""

    def __init__(self, index: int, term: int, data: bytes):
        self._v = (index, term, data)

    def __len__(self) -> int:
        return 3

    def __iter__(self):
        return iter(self._v)


@pytest.mark.parametrize("kind", ["iterable", "dict"])
def test_a_multi_entry_save_of_unpackable_entries_is_refused_or_taken_as_before(tmp_path, kind):
    s = wctest.open_store(str(tmp_path / "data"), sync="batch")
    try:
        s.save(HardState(1, 0, 1), [Entry(1, 1, b"e1")])
        mk = _IterEntry if kind == "iterable" else (lambda i, t, d: dict.fromkeys((i, t, d)))
        try:
            s.save(None, [mk(i, 7, b"n%d" % i) for i in range(2, 5)])
        except UsageError:
            pass                                           # refused with a typed error: fine too
        else:
            assert [(e.index, e.term, e.data) for e in s.entries(2, 5)] == [(i, 7, b"n%d" % i) for i in range(2, 5)]
        assert s.wal.failed is None
    finally:
        s.close()


def test_a_one_entry_save_of_an_unpackable_entry_is_refused_or_taken(tmp_path):
    s = wctest.open_store(str(tmp_path / "data"), sync="batch")
    try:
        try:
            s.save(HardState(1, 0, 1), [_IterEntry(1, 1, b"e1")])
        except UsageError:
            return
        assert s.entries(1, 2)[0].data == b"e1"
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# 3. An asynchronous exception right after pin() returned leaves the segment pinned for ever
# ---------------------------------------------------------------------------------------------

def _filled(d: str, n: int = 60, **opts):
    """A store of n one-entry saves in 4 KiB segments: sealed segments of 7 records each."""
    s = wctest.open_store(d, sync="batch", segment_size=4096, **opts)
    for i in range(1, n + 1):
        s.save(HardState(1, 0, i), [Entry(i, 1, b"x%d-" % i + b"x" * 100)])
    return s


def _open_under(root: str) -> list[str]:
    """Paths under ``root`` this process still holds a descriptor on."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            out.append(target)
    return out


@pytest.mark.parametrize("where", ["read_frame", "read_entries_records"])
def test_an_interrupt_as_pin_returns_never_leaks_the_segment_descriptor(tmp_path, where):
    from walcrypt.segment import Segment
    root = str(tmp_path / "data")
    s = _filled(root, n=30)
    closed = False
    try:
        seg = s.wal.segments[0]
        assert seg.sealed and seg.last_index >= 6
        s.wal._cache.clear()
        code = getattr(Segment, where).__code__
        with wctest.InterruptAfter(code, "pin") as inj:
            with pytest.raises(KeyboardInterrupt):
                if where == "read_frame":
                    s.entries(2, 3)                        # one record: read_entries_record -> read_frame
                else:
                    s.entries(1, 6)                        # five records: one window (read_entries_records)
        assert inj.fired
        s.close()
        closed = True
        assert seg.readers == 0, f"the segment stays pinned by {seg.readers} reader(s) that have gone"
        assert _open_under(root) == [], f"descriptors left open after close(): {_open_under(root)}"
    finally:
        if not closed:
            s.close()


# ---------------------------------------------------------------------------------------------
# 4. A rotation queued behind the one a snapshot completes lives in memory only until start_queued
# ---------------------------------------------------------------------------------------------

def test_a_queued_rotation_survives_an_interrupted_start(tmp_path):
    root = str(tmp_path / "data")
    s = wctest.open_store(root, sync="batch")
    closed = False
    try:
        for i in range(1, 11):
            s.save(HardState(1, 0, i), [Entry(i, 1, b"e%d" % i)])
        s.rotate_dek()                                      # in flight: waits for a snapshot at >= 10
        s.rotate_dek()                                      # queued behind it (durable)
        assert s.key_info()["rotation"]["queued"] == 1
        from walcrypt.rotation import Rotation
        with wctest.InterruptAfter(Rotation.prepare_queued.__code__, "_new_key") as inj:
            with pytest.raises(KeyboardInterrupt):
                s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")
        assert inj.fired
        s.close()
        closed = True
    finally:
        if not closed:
            s.close()
    with wctest.open_store(root, sync="batch") as s2:
        rot = s2.key_info()["rotation"]
        deferred = s2.key_info()["deferred"]
        assert rot is not None or deferred is not None, (
            "the rotation queued behind the completed one is gone: none in flight, none queued or put off")


# ---------------------------------------------------------------------------------------------
# 5. A read racing a re-key gets CompactedError for entries that were never compacted
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["entries", "iter_batches"])
def test_a_read_racing_a_rekey_is_answered_not_compacted(tmp_path, api):
    s = _filled(str(tmp_path / "data"), n=40)
    try:
        wal = s.wal
        pieces = wal._pieces
        other: list = []
        lo, hi = 9, 12                                     # in the second segment; compacted: none

        def pieces_then_rekey_in_another_thread(a, b):
            out = pieces(a, b)
            del wal._pieces
            other.append(_run(s.rekey))                    # the host re-keys from another thread
            other[0][0].join(JOIN_S)
            return out
        wal._pieces = pieces_then_rekey_in_another_thread
        wal._cache.clear()
        try:
            if api == "entries":
                got = [(e.index, e.data) for e in s.entries(lo, hi)]
            else:
                got = [(i, d) for b in s.iter_batches(lo, hi) for i, _t, d in b.tuples()]
            err = None
        except CompactedError as exc:
            got, err = None, exc
        t, out = other[0]
        assert not t.is_alive() and "error" not in out, out
        assert s.first_index() <= lo, "the re-key compacted the log (the test's premise is wrong)"
        assert err is None, f"CompactedError for entries {lo}..{hi - 1} still in the log: {err}"
        assert got == [(i, b"x%d-" % i + b"x" * 100) for i in range(lo, hi)]
    finally:
        s.close()
