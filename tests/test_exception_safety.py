"""Exception safety of writes and validation in the caller's thread (DESIGN.md, "Trust principles";
FORMAT.md sections 5, 6, 7.3 and 13).

* An exception that is not an OSError -- KeyboardInterrupt from Ctrl-C, an application timeout
  raised from a signal handler, MemoryError -- arriving after a write unit's pwrite must fail the
  store like a failed write does: the next save() or close() must not seal new frames with the
  sequence number (so the nonce) the interrupted unit already used at the same offset.
* Entries and hard state are validated in the caller's thread, before the request is queued for
  group commit: an out-of-range HardState of one caller cannot fail the unit of another caller,
  let alone make another caller's save() return without its entries written; entry terms are >= 1.

The (key, nonce) checks use tests/noncescan.py (no key needed); the injection uses
tests/injectvfs.py.
"""

from __future__ import annotations

import enum
import os
import shutil
import threading
import time

import pytest

import walcrypt
from walcrypt import Entry, HardState, StoreFailedError, UsageError

import noncescan
import wctest
from injectvfs import InjectedError, InjectVFS

SEG = 64 * 1024


def _copy_data_files(src: str, dst_root: str) -> None:
    """A copy of every segment and snapshot file as it is now (what the disk held at that moment)."""
    dst = os.path.join(dst_root, f"copy-{len(os.listdir(dst_root)) if os.path.isdir(dst_root) else 0}")
    for dirpath, _dirs, files in os.walk(src):
        for name in files:
            if name.endswith((".wal", ".snap", ".broken", ".unlisted")) or name.startswith(".tmp-"):
                rel = os.path.relpath(os.path.join(dirpath, name), src)
                os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                shutil.copyfile(os.path.join(dirpath, name), os.path.join(dst, rel))


# ---------------------------------------------------------------------------------------------
# Finding: nonce reuse after an interrupted save
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, MemoryError, InjectedError])
@pytest.mark.parametrize("then", ["save-again", "close"])
def test_interrupt_after_the_units_pwrite_fails_the_store_and_reuses_no_nonce(tmp_path, exc_type, then):
    data_dir, copies = str(tmp_path / "data"), str(tmp_path / "copies")
    os.makedirs(copies)
    vfs = InjectVFS()
    s = wctest.open_store(data_dir, segment_size=SEG, sync="always", vfs=vfs)
    s.save(hard_state=HardState(1, 1, 1), entries=[Entry(1, 1, b"acknowledged")])
    vfs.arm_op("pwrite", 1, "after", exc_type, on_fire=lambda: _copy_data_files(data_dir, copies))
    with pytest.raises(exc_type):
        s.save(hard_state=HardState(1, 1, 2), entries=[Entry(2, 1, b"the interrupted entry")])
    assert vfs.fired is not None
    if then == "save-again":
        # What an application does next: retry, then carry on.  The store is failed until reopened.
        with pytest.raises(StoreFailedError):
            s.save(hard_state=HardState(1, 1, 2), entries=[Entry(2, 1, b"the retried entry, other bytes")])
        with pytest.raises(StoreFailedError):
            s.save(hard_state=HardState(2, 1, 2))
        assert s.entries(1, 2) == [Entry(1, 1, b"acknowledged")]      # reads keep working
    s.close()                              # must not seal the segment whose last unit is in doubt
    found = noncescan.scan(data_dir, copies)
    assert not found.reuses(), "a (key, nonce) pair sealed two different payloads:\n" + found.describe()
    assert found.sealed > 4

    # Reopening runs recovery (the interrupted unit reached the disk whole: it may be there) and
    # writing continues in a fresh segment; still no nonce is used twice.
    with wctest.open_store(data_dir, segment_size=SEG, sync="always") as s2:
        got = s2.entries(1, s2.last_index() + 1)
        assert got[0] == Entry(1, 1, b"acknowledged")
        assert got[1:] in ([], [Entry(2, 1, b"the interrupted entry")])
        nxt = s2.last_index() + 1
        s2.save(hard_state=HardState(3, 1, nxt), entries=[Entry(nxt, 3, b"after the reopen")])
    with wctest.open_store(data_dir, segment_size=SEG, sync="always") as s3:
        assert s3.entries(nxt, nxt + 1) == [Entry(nxt, 3, b"after the reopen")]
    found = noncescan.scan(data_dir, copies)
    assert not found.reuses(), found.describe()


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, InjectedError])
def test_interrupt_after_the_index_frame_of_a_seal_reuses_no_nonce(tmp_path, exc_type):
    """A rollover seals the active segment (INDEX frame) before cutting the next one; interrupted
    right after that pwrite, the segment must not take another frame under the INDEX frame's seq."""
    data_dir, copies = str(tmp_path / "data"), str(tmp_path / "copies")
    os.makedirs(copies)
    vfs = InjectVFS()
    s = wctest.open_store(data_dir, segment_size=4096, sync="always", vfs=vfs)
    nxt = 1
    while len(wctest.segment_files(data_dir)) < 2:          # bounded: a 4 KiB segment fills quickly
        s.save(entries=[Entry(nxt, 1, b"x" * 200)])
        nxt += 1
    before = len(wctest.segment_files(data_dir))
    with pytest.raises(exc_type):
        for _ in range(40):                                  # the next rollover's seal is interrupted
            vfs.arm_op("ftruncate", 1, "before", exc_type, on_fire=lambda: _copy_data_files(data_dir, copies))
            s.save(entries=[Entry(nxt, 1, b"y" * 200)])
            nxt += 1
            vfs.disarm()
    assert len(wctest.segment_files(data_dir)) == before
    with pytest.raises(StoreFailedError):
        s.save(entries=[Entry(nxt, 1, b"z" * 200)])
    s.close()
    found = noncescan.scan(data_dir, copies)
    assert not found.reuses(), found.describe()
    with wctest.open_store(data_dir, segment_size=4096, sync="always") as s2:
        assert s2.last_index() >= nxt - 1
        s2.save(entries=[Entry(s2.last_index() + 1, 2, b"after the reopen")])
    assert not noncescan.scan(data_dir, copies).reuses()


def test_interrupted_close_releases_everything(data_dir):
    """close() interrupted while closing segment files still releases the metadata and the lock:
    the store can be opened again in the same process."""
    vfs = InjectVFS()
    s = wctest.open_store(data_dir, segment_size=SEG, vfs=vfs)
    s.save(entries=wctest.make_entries(1, 20))
    vfs.arm_op("close", 1, "before", KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        s.close()
    vfs.close_leftovers()
    with wctest.open_store(data_dir, segment_size=SEG) as s2:
        assert s2.last_index() == 19


# ---------------------------------------------------------------------------------------------
# Finding: a false acknowledgement under group commit
# ---------------------------------------------------------------------------------------------

def _one_unit(s, calls: dict) -> dict:
    """Run ``calls`` (name -> callable) in threads whose saves land in one group-commit unit: the
    write lock is held until every request is queued (or its caller already returned)."""
    results: dict = {}

    def run(name, fn):
        try:
            fn()
            results[name] = "ok"
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[name] = exc

    wal = s.wal
    threads = [threading.Thread(target=run, args=item, name=item[0]) for item in calls.items()]
    with wal.write_lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:                   # bounded
            with wal._queue_lock:
                queued = len(wal._queue)
            if queued + len(results) >= len(calls):
                break
            time.sleep(0.001)
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a saving thread hung"
    return results


@pytest.mark.parametrize("bad", [
    HardState(2 ** 64, 1, 1), HardState(1, -1, 1), HardState(1, 1, 1.5), HardState(1, "x", 1),
], ids=["term-2^64", "vote-negative", "commit-float", "vote-str"])
def test_bad_hard_state_in_a_group_commit_unit_cannot_falsify_another_save(data_dir, bad):
    s = wctest.open_store(data_dir, segment_size=SEG, sync="batch")
    s.save(entries=wctest.make_entries(1, 5))
    mine = wctest.make_entries(5, 9)
    results = _one_unit(s, {
        "valid": lambda: s.save(hard_state=HardState(1, 1, 8), entries=mine),
        "bad": lambda: s.save(hard_state=bad),
    })
    valid = results["valid"]
    assert valid == "ok" or isinstance(valid, walcrypt.WalcryptError), \
        f"a valid save saw a non-walcrypt exception: {valid!r}"
    s.close()
    with wctest.open_store(data_dir, segment_size=SEG) as s2:
        if valid == "ok":
            assert s2.last_index() == 8 and s2.entries(5, 9) == mine, \
                "save() returned but its entries were not written (a false acknowledgement)"
            assert s2.initial_state()[0] == HardState(1, 1, 8)
    assert isinstance(results["bad"], UsageError), results
    assert "hard_state" in str(results["bad"])


@pytest.mark.parametrize("bad", [
    [Entry(5, 0, b"term zero")], [Entry(5, 1, "text")], [Entry(5, 2 ** 64, b"x")], [Entry(5, 1.0, b"x")],
    [Entry(5, 1, b"a"), Entry(6, 0, b"b")], [Entry(5, 1, b"a"), Entry(6, 1, 17)],
], ids=["term-0", "data-str", "term-2^64", "term-float", "second-term-0", "second-data-int"])
def test_bad_entries_in_a_group_commit_unit_fail_alone(data_dir, bad):
    s = wctest.open_store(data_dir, segment_size=SEG, sync="batch")
    s.save(entries=wctest.make_entries(1, 5))
    results = _one_unit(s, {
        "valid": lambda: s.save(hard_state=HardState(1, 1, 4)),
        "bad": lambda: s.save(entries=bad),
    })
    assert isinstance(results["bad"], UsageError), results
    assert results["valid"] == "ok", results
    assert s.last_index() == 4
    s.save(entries=wctest.make_entries(5, 7))                 # the store is not failed
    s.close()
    with wctest.open_store(data_dir, segment_size=SEG) as s2:
        assert s2.last_index() == 6 and s2.initial_state()[0] == HardState(1, 1, 4)


# ---------------------------------------------------------------------------------------------
# Validation (FORMAT.md section 13): UsageError naming the field, before anything is queued
# ---------------------------------------------------------------------------------------------

def test_term_zero_entry_is_refused(open_store):
    s = open_store()
    with pytest.raises(UsageError, match="term is 0"):
        s.save(entries=[Entry(1, 0, b"x")])
    with pytest.raises(UsageError, match="entry 2: term is 0"):
        s.save(entries=[Entry(1, 1, b"x"), Entry(2, 0, b"y")])
    assert s.last_index() == 0
    s.save(entries=[Entry(1, 1, b"x")])
    assert s.entries(1, 2) == [Entry(1, 1, b"x")]


U64 = 2 ** 64 - 1


@pytest.mark.parametrize("hs,field", [
    (HardState(-1, 0, 0), "term"), (HardState(0, U64 + 1, 0), "vote"), (HardState(0, 0, -5), "commit"),
    (HardState(1.0, 0, 0), "term"), (HardState(0, None, 0), "vote"), (HardState(0, 0, b"1"), "commit"),
    ((1, 2), "HardState"), (object(), "HardState"),
])
def test_hard_state_is_validated(open_store, hs, field):
    s = open_store()
    with pytest.raises(UsageError, match=field):
        s.save(hard_state=hs)
    s.save(hard_state=HardState(U64, U64, U64))               # the whole u64 range is accepted
    assert s.initial_state()[0] == HardState(U64, U64, U64)


@pytest.mark.parametrize("entries,needle", [
    ([Entry(0, 1, b"x")], "index is 0"), ([Entry(-3, 1, b"x")], "index"), ([Entry(1.0, 1, b"x")], "index"),
    ([Entry(1, -1, b"x")], "term"), ([Entry(1, U64 + 1, b"x")], "term"), ([Entry(1, 1, None)], "data"),
    ([Entry(1, 1, "str")], "data"), ([(1, 1)], "entries[0]"), ([Entry(1, 1, b"x"), (2, 1)], "entries[1]"),
    ([Entry(1, 1, b"x"), Entry(2, "1", b"y")], "term"), ([Entry(U64, 1, b"x")], "index"),
    (7, "sequence"),
])
def test_entries_are_validated(open_store, entries, needle):
    s = open_store()
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        s.save(entries=entries)
    assert s.last_index() == 0


class Term(enum.IntEnum):
    ONE = 1


def test_integer_like_and_bytes_like_values_are_normalised(open_store, data_dir):
    s = open_store()
    s.save(hard_state=HardState(Term.ONE, True, 0),
           entries=[Entry(1, Term.ONE, bytearray(b"ab")), Entry(2, 1, memoryview(b"cd"))])
    s.save(entries=[Entry(3, Term.ONE, memoryview(b"ef"))])
    got = s.entries(1, 4)
    assert got == [Entry(1, 1, b"ab"), Entry(2, 1, b"cd"), Entry(3, 1, b"ef")]
    assert all(type(e.term) is int and type(e.data) is bytes for e in got)
    hs = s.initial_state()[0]
    assert hs == HardState(1, 1, 0) and all(type(x) is int for x in hs)
    s.close()
    with open_store() as s2:
        assert s2.entries(1, 4) == got


def test_snapshot_meta_is_validated(open_store):
    s = open_store()
    s.save(entries=wctest.make_entries(1, 5))
    for meta in (walcrypt.SnapshotMeta(2 ** 64, 1), walcrypt.SnapshotMeta(3, 0), walcrypt.SnapshotMeta(3, 1.5),
                 (3,), walcrypt.SnapshotMeta(3, 1, "voters")):
        with pytest.raises(UsageError):
            s.save_snapshot(meta, b"data")
    with pytest.raises(UsageError):
        s.begin_snapshot(walcrypt.SnapshotMeta(3, 1), extra_meta={"x": object()})
    s.save_snapshot(walcrypt.SnapshotMeta(3, 1), b"data")     # the store was not failed by any of it
    assert s.snapshot().data == b"data"


# ---------------------------------------------------------------------------------------------
# The pysyncobj adapter: pysyncobj's first entry has term 0
# ---------------------------------------------------------------------------------------------

def test_pysyncobj_term_zero_noop_is_kept_with_an_offset(tmp_path):
    ps = pytest.importorskip("walcrypt.adapters.pysyncobj")
    path = str(tmp_path / "node")
    kek = walcrypt.RawKey(wctest.KEK_BYTES)

    def journal():
        conf = ps.walcrypt_conf(path, kek=kek, store_options={"segment_size": SEG})
        return conf.walcrypt.open_journal()

    j = journal()
    j.add(b"\x01", 1, 0)                  # SyncObj adds this no-op to an empty journal at start
    j.add(b"cmd", 2, 1)
    j.flush()
    j._destroy()
    j = journal()
    assert [tuple(e) for e in j] == [(b"\x01", 1, 0), (b"cmd", 2, 1)]
    store = j._store
    assert [e.term for e in store.entries(1, 3)] == [1, 2]    # stored as term + 1
    j._destroy()


def test_pysyncobj_store_written_before_the_offset_keeps_its_terms(tmp_path):
    ps = pytest.importorskip("walcrypt.adapters.pysyncobj")
    path = str(tmp_path / "node")
    kek = walcrypt.RawKey(wctest.KEK_BYTES)
    with walcrypt.open(path, kek=kek, segment_size=SEG) as s:
        s.save(entries=[Entry(1, 1, b"\x01"), Entry(2, 3, b"cmd")])
    j = ps.walcrypt_conf(path, kek=kek, store_options={"segment_size": SEG}).walcrypt.open_journal()
    assert [tuple(e) for e in j] == [(b"\x01", 1, 1), (b"cmd", 2, 3)]
    j.add(b"more", 3, 3)
    j.flush()
    assert j._store.entries(3, 4) == [Entry(3, 3, b"more")]
    j._destroy()


# ---------------------------------------------------------------------------------------------
# Found by the injection enumeration (tests/test_exception_injection.py)
# ---------------------------------------------------------------------------------------------

def _InterruptOnce(fn):
    """``fn`` whose first call raises KeyboardInterrupt before doing anything (usable as a method)."""
    fired = []

    def wrapper(*args, **kw):
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt("injected")
        return fn(*args, **kw)
    return wrapper


def test_close_interrupted_before_the_lock_is_released_can_be_finished(data_dir, monkeypatch):
    from walcrypt import layout
    s = wctest.open_store(data_dir, segment_size=SEG)
    s.save(entries=wctest.make_entries(1, 5))
    monkeypatch.setattr(layout.DirLock, "release", _InterruptOnce(layout.DirLock.release))
    with pytest.raises(KeyboardInterrupt):
        s.close()
    s.close()                                                  # finishes releasing
    with wctest.open_store(data_dir, segment_size=SEG) as s2:
        assert s2.last_index() == 4


def test_open_interrupted_while_closing_its_migration_source_releases_the_lock(data_dir, monkeypatch):
    from walcrypt import layout
    with wctest.open_store(data_dir, encrypted=False, segment_size=SEG) as s:
        s.save(entries=wctest.make_entries(1, 5))
    monkeypatch.setattr(layout.DirLock, "release", _InterruptOnce(layout.DirLock.release))
    with pytest.raises(KeyboardInterrupt):
        wctest.open_store(data_dir, segment_size=SEG, migrate=True)   # migrates, then closes the source
    with wctest.open_store(data_dir, segment_size=SEG, migrate=True) as s2:   # not "already open here"
        assert s2.encrypted and s2.last_index() == 4


def test_lock_taken_by_an_interrupted_open_is_not_kept(data_dir, monkeypatch):
    from walcrypt import layout
    with wctest.open_store(data_dir, segment_size=SEG) as s:
        s.save(entries=wctest.make_entries(1, 3))

    class Held(set):
        fired = False

        def add(self, item):
            super().add(item)
            if not Held.fired:
                Held.fired = True
                raise KeyboardInterrupt("injected right after the flock")
    monkeypatch.setattr(layout, "_HELD", Held())
    with pytest.raises(KeyboardInterrupt):
        wctest.open_store(data_dir, segment_size=SEG)
    with wctest.open_store(data_dir, segment_size=SEG) as s2:
        assert s2.last_index() == 2


def test_interrupted_close_of_a_snapshot_file_is_not_closed_twice(data_dir):
    """KeyboardInterrupt right after the snapshot writer closed its file: the abort that follows must
    not close the descriptor again (by then it may be another file's)."""
    vfs = InjectVFS()
    s = wctest.open_store(data_dir, segment_size=SEG, vfs=vfs)
    s.save(entries=wctest.make_entries(1, 5))
    vfs.arm_op("close", 1, "after", KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):                    # not StoreFailedError(EBADF)
        s.save_snapshot(walcrypt.SnapshotMeta(4, 1), b"snapshot data")
    with pytest.raises(StoreFailedError):
        s.save(entries=wctest.make_entries(5, 6))
    s.close()
    with wctest.open_store(data_dir, segment_size=SEG) as s2:
        assert s2.last_index() == 4 and s2.snapshot() is None
