"""Findings of an independent review of the issue-10 hardening, each pinned as a strict xfail.

Every test here reproduces one break with real files and real stores, and asserts the behaviour
the issue and FORMAT.md / GUARANTEES.md promise; it is marked ``xfail(strict=True)`` so the file
passes as committed and starts failing (asking for the mark to be removed) once the break is
fixed.  Nothing here needs a test double beyond one monkeypatch that stands in for an attacker
winning a check-then-open race.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import time

import lmdb
import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta, WalcryptError
from walcrypt import meta as M
from walcrypt.check import check

import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
CS = ConfState(voters=(1, 2, 3))
WAL = "wal-v1-encrypted"
SNAP = "snap-v1-encrypted"


def _ents(lo: int, hi: int, term: int, tag: bytes = b"") -> list[Entry]:
    return [Entry(i, term, tag + b"entry %d term %d" % (i, term)) for i in range(lo, hi)]


def _lmdb_delete(data_dir: str, db: bytes, key: bytes) -> None:
    """What an attacker without the KEK can do to meta/: delete one record (the set of keys of a
    table is not authenticated)."""
    env = lmdb.open(os.path.join(data_dir, "meta"), max_dbs=8)
    try:
        handle = env.open_db(db)
        with env.begin(write=True) as txn:
            assert txn.delete(key, db=handle)
    finally:
        env.close()


def _crash_child(code: str, *args: str) -> None:
    """Run ``code`` in a child process that ends with os._exit (a killed node: no close, no seal)."""
    env = dict(os.environ, PYTHONPATH=wctest.REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], check=True, env=env, timeout=120)


# ---------------------------------------------------------------------------------------------
# Links: symbolic links swapped in while the store is open, hard links, LMDB's own files
# ---------------------------------------------------------------------------------------------

def test_export_reads_through_a_symlink_swapped_in_for_the_snapshot_file(tmp_path):
    data_dir = str(tmp_path / "data")
    secret = tmp_path / "not-walcrypts.txt"             # say /etc/shadow: readable by the (root) process
    secret.write_bytes(b"HOST-SECRET-THE-EXPORT-MUST-NOT-CARRY\n" * 8)
    out = str(tmp_path / "backup.wcx")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 5, 1))
        s.save_snapshot(SnapshotMeta(3, 1, CS), b"state machine at 3")
        path = s.snapshot().info.path
        os.unlink(path)                                # the attacker, while the node runs
        os.symlink(secret, path)
        try:
            s.export_snapshot(out)
        except WalcryptError:
            pass
    assert not (os.path.exists(out) and b"HOST-SECRET" in open(out, "rb").read()), \
        "the export carries the contents of the file the planted link points to"


def test_torn_tail_repair_writes_through_a_hard_link_planted_at_the_broken_copy(tmp_path):
    data_dir = str(tmp_path / "data")
    _crash_child("""
        import os, sys, walcrypt
        from walcrypt import Entry, HardState
        s = walcrypt.open(sys.argv[1], kek=walcrypt.RawKey(bytes.fromhex(sys.argv[2])))
        s.save(HardState(1, 1, 0), [Entry(i, 1, b"x%d" % i) for i in range(1, 11)])
        os._exit(0)
    """, data_dir, wctest.KEK_BYTES.hex())
    seg_dir = os.path.join(data_dir, WAL)
    seg = os.path.join(seg_dir, sorted(os.listdir(seg_dir))[-1])
    with open(seg, "rb") as f:
        end = len(f.read().rstrip(b"\0"))
    with open(seg, "r+b") as f:                        # a torn unit after the last commit
        f.seek((end + 7) // 8 * 8)
        f.write(b"\x5a" * 100)
    victim = tmp_path / "victim.conf"                  # a file outside the data directory
    victim.write_bytes(b"IMPORTANT=1\n" * 100)
    os.chmod(victim, 0o644)
    before = (victim.read_bytes(), stat.S_IMODE(os.stat(victim).st_mode))
    os.link(victim, seg + ".broken")
    try:
        walcrypt.open(data_dir, kek=KEK).close()
    except WalcryptError:
        pass
    assert (victim.read_bytes(), stat.S_IMODE(os.stat(victim).st_mode)) == before, \
        "the repair wrote segment bytes into (and chmodded) the file the hard link names"


def test_snapshot_publish_writes_through_a_hard_link_planted_at_its_temporary_name(tmp_path):
    data_dir = str(tmp_path / "data")
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"IMPORTANT=1\n" * 100)
    before = victim.read_bytes()
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 5, 1))
        os.makedirs(os.path.join(data_dir, SNAP), exist_ok=True)
        os.link(victim, os.path.join(data_dir, SNAP, ".tmp-%016x-%016x-%016x.snap" % (1, 3, 1)))
        try:
            s.save_snapshot(SnapshotMeta(3, 1, CS), b"state at 3")
        except WalcryptError:
            pass
    assert victim.read_bytes() == before, "the snapshot was written into the hard-linked file"


def test_lmdb_lock_file_hard_link_is_written_through(tmp_path):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 0), _ents(1, 3, 1))
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"IMPORTANT=1\n" * 1000)
    before = victim.read_bytes()
    lock = os.path.join(data_dir, "meta", "lock.mdb")
    os.unlink(lock)
    os.link(victim, lock)
    try:
        walcrypt.open(data_dir, kek=KEK).close()
    except WalcryptError:
        pass
    assert victim.read_bytes() == before, "LMDB wrote its lock header into the hard-linked file"


def test_lmdb_lock_file_swapped_for_a_symlink_after_the_check_is_followed(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 0), _ents(1, 3, 1))
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"IMPORTANT=1\n" * 1000)
    before = victim.read_bytes()
    checked = []
    real_refuse_link = M.refuse_link

    def attacker_wins_the_race(path, **kw):
        real_refuse_link(path, **kw)
        if path.endswith("lock.mdb"):
            checked.append(path)
            if len(checked) == 2:          # the read-write Meta (the first is open()'s read-only look)
                os.unlink(path)
                os.symlink(victim, path)

    monkeypatch.setattr(M, "refuse_link", attacker_wins_the_race)
    try:
        walcrypt.open(data_dir, kek=KEK).close()
    except WalcryptError:
        pass
    assert len(checked) >= 2
    assert victim.read_bytes() == before, "the link's target was written by LMDB"


def test_redact_in_place_leaves_the_kek_in_a_hard_linked_copy(tmp_path):
    from walcrypt import backup
    data_dir, out = str(tmp_path / "data"), str(tmp_path / "node1.wcx")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 1), _ents(1, 3, 1))
        s.save_snapshot(SnapshotMeta(2, 1, CS), b"state")
        s.export_snapshot(out, embed_kek=True)
    other = str(tmp_path / "dedup-store-copy.wcx")     # a hard-link based backup store, say
    os.link(out, other)
    try:
        res = backup.redact_export(out)
    except WalcryptError:
        return                                          # refusing is fine
    assert res["redacted"]
    assert wctest.KEK_BYTES not in open(other, "rb").read(), \
        "redaction reported success while the KEK is still in a file naming the same export"


# ---------------------------------------------------------------------------------------------
# Special files: a FIFO where walcrypt expects a regular file
# ---------------------------------------------------------------------------------------------

def _blocked_call(fn, fifo: str, wait: float = 3.0) -> bool:
    """Run fn in a thread; True when it is still blocked after ``wait`` seconds.  The FIFO is then
    opened for writing and closed again (which unblocks a reader) so the thread can end."""
    done = threading.Event()

    def run():
        try:
            fn()
        except BaseException:  # noqa: BLE001 - any outcome but blocking is what we look for
            pass
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    blocked = not done.wait(wait)
    for _ in range(50):
        if done.is_set():
            break
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        time.sleep(0.1)
    t.join(5)
    return blocked


@pytest.mark.parametrize("where", ["registered-segment", "unlisted-segment"])
@pytest.mark.parametrize("entry_point", ["open", "check"])
def test_a_fifo_planted_in_the_segment_directory_blocks_open_and_verify(tmp_path, where, entry_point):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 0), _ents(1, 5, 1))
    seg_dir = os.path.join(data_dir, WAL)
    if where == "registered-segment":
        fifo = os.path.join(seg_dir, sorted(os.listdir(seg_dir))[-1])
        os.unlink(fifo)
    else:
        fifo = os.path.join(seg_dir, "%016x-%016x.wal" % (9, 5))
    os.mkfifo(fifo)
    fn = (lambda: walcrypt.open(data_dir, kek=KEK).close()) if entry_point == "open" \
        else (lambda: check(data_dir, kek=KEK))
    assert not _blocked_call(fn, fifo), f"{entry_point} blocked on a FIFO at {os.path.basename(fifo)}"


# ---------------------------------------------------------------------------------------------
# Open deletes authentic data
# ---------------------------------------------------------------------------------------------

def test_open_deletes_an_unlisted_segment_holding_entries_above_the_compaction_point(tmp_path):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 20), _ents(1, 21, 1, b"acknowledged "))
        s.compact(10)                                    # entries 11..20 stay in the log
    (seg_name,) = os.listdir(os.path.join(data_dir, WAL))
    _lmdb_delete(data_dir, M.DB_SEGMENTS, (1).to_bytes(8, "big"))      # no key needed
    try:
        walcrypt.open(data_dir, kek=KEK).close()
    except WalcryptError:
        pass
    left = os.listdir(os.path.join(data_dir, WAL))
    assert any(n.startswith(seg_name) for n in left), \
        "the segment holding acknowledged entries 11..20 was deleted as a purge leftover"


def test_meta_rollback_deletes_a_replacement_segment_holding_acknowledged_entries(tmp_path):
    data_dir = str(tmp_path / "data")
    _crash_child("""
        import os, shutil, sys, walcrypt
        from walcrypt import Entry, HardState
        d = sys.argv[1]
        s = walcrypt.open(d, kek=walcrypt.RawKey(bytes.fromhex(sys.argv[2])))
        s.save(HardState(1, 1, 3), [Entry(i, 1, b"old %d" % i) for i in range(1, 11)])
        shutil.copytree(os.path.join(d, "meta"), d + ".meta-copy")     # a backup of meta/, say
        s.save(HardState(2, 2, 3), [Entry(i, 2, b"ACKNOWLEDGED-NEW-LEADER %d" % i) for i in range(5, 9)])
        os._exit(0)                                                     # acknowledged, then killed
    """, data_dir, wctest.KEK_BYTES.hex())
    shutil.rmtree(os.path.join(data_dir, "meta"))
    shutil.copytree(data_dir + ".meta-copy", os.path.join(data_dir, "meta"))   # meta/ rolled back alone
    names = sorted(os.listdir(os.path.join(data_dir, WAL)))
    assert len(names) == 2
    replacement = names[-1]                              # segment 2, based at index 5
    try:
        walcrypt.open(data_dir, kek=KEK).close()
    except WalcryptError:
        pass                                             # refusing is fine; deleting is not
    after = os.listdir(os.path.join(data_dir, WAL))
    assert any(n.startswith(replacement) for n in after), \
        "the segment holding acknowledged entries 5..8 (term 2, vote 2) was deleted"


def test_meta_rollback_deletes_an_acknowledged_snapshot(tmp_path):
    data_dir = str(tmp_path / "data")
    copy = str(tmp_path / "meta-copy")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 6, 1))
        shutil.copytree(os.path.join(data_dir, "meta"), copy)        # meta/ copied while the node runs
        s.save_snapshot(SnapshotMeta(100, 3, CS), b"leader state at 100")   # InstallSnapshot, durable
        (snap_name,) = os.listdir(os.path.join(data_dir, SNAP))
    shutil.rmtree(os.path.join(data_dir, "meta"))
    shutil.copytree(copy, os.path.join(data_dir, "meta"))
    try:
        walcrypt.open(data_dir, kek=KEK).close()
    except WalcryptError:
        pass
    left = os.listdir(os.path.join(data_dir, SNAP))
    assert any(n.startswith(snap_name) for n in left), "the acknowledged snapshot file was deleted"


def test_deleted_registry_record_makes_open_delete_the_newest_snapshot(tmp_path):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK, keep_snapshots=2) as s:
        s.save(HardState(1, 1, 30), _ents(1, 31, 1))
        s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")
        s.compact(10)
        s.save_snapshot(SnapshotMeta(25, 1, CS), b"state at 25")
        s.compact(25)
        newest = os.path.basename(s.snapshot().info.path)
    _lmdb_delete(data_dir, M.DB_SNAPSHOTS, (2).to_bytes(8, "big"))     # no key needed
    report = check(data_dir, kek=KEK)
    try:
        with walcrypt.open(data_dir, kek=KEK) as s:
            gap = s.snapshot().meta.index < s.first_index() - 1          # entries 11..25 are gone
    except WalcryptError:
        gap = False
    kept = any(n.startswith(newest) for n in os.listdir(os.path.join(data_dir, SNAP)))
    assert (not report.ok or not gap) and kept, \
        f"verify OK={report.ok}; the open deleted {newest} and serves the snapshot at 10 before a log from 26"


def test_empty_metadata_is_bootstrapped_over_authentic_data(tmp_path):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(5, 3, 10), _ents(1, 11, 5))
        s.save_snapshot(SnapshotMeta(8, 5, CS), b"state at 8")
    before = sorted(os.listdir(os.path.join(data_dir, WAL))) + sorted(os.listdir(os.path.join(data_dir, SNAP)))
    meta = os.path.join(data_dir, "meta")
    shutil.rmtree(meta)
    env = lmdb.open(meta, max_dbs=8)
    for name in (M.DB_STORE, M.DB_KEYRING, M.DB_SEGMENTS, M.DB_STABLE, M.DB_STATE, M.DB_SNAPSHOTS):
        env.open_db(name)
    env.close()
    served = None
    try:
        with walcrypt.open(data_dir, kek=KEK) as s:
            served = (s.last_index(), tuple(s.initial_state()[0]))
    except WalcryptError:
        pass
    after = sorted(os.listdir(os.path.join(data_dir, WAL))) + sorted(os.listdir(os.path.join(data_dir, SNAP)))
    assert served is None, f"a new, empty store was created over the old one (last index, hard state: {served})"
    assert all(any(a.startswith(b) for a in after) for b in before), f"deleted: {sorted(set(before) - set(after))}"


# ---------------------------------------------------------------------------------------------
# Keyless edits of meta/ that are served (or verified) as if the KEK vouched for them
# ---------------------------------------------------------------------------------------------

def test_deleted_manifest_record_splices_a_superseded_suffix_into_the_log(tmp_path):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 4), _ents(1, 11, 1, b"stale "))
        s.save(HardState(2, 2, 8), _ents(5, 9, 2))                 # a new leader replaced 5.. (segment 2)
    with walcrypt.open(data_dir, kek=KEK) as s:                     # a restart: segment 3
        s.save(HardState(2, 2, 12), _ents(9, 13, 2))
        good = s.entries(1, 13)
    _lmdb_delete(data_dir, M.DB_SEGMENTS, (2).to_bytes(8, "big"))  # one LMDB delete, no key
    report = check(data_dir, kek=KEK)
    served = None
    try:
        with walcrypt.open(data_dir, kek=KEK) as s:
            served = s.entries(s.first_index(), s.last_index() + 1)
    except WalcryptError:
        pass
    spliced = served is not None and served != good[:len(served)]
    assert not report.ok or not spliced, \
        f"verify says OK and the store serves entries 5..8 of term 1 between term-2 entries: {served[3:9]}"


def test_deleted_rotation_record_silently_cancels_a_dek_rotation(tmp_path):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 4), _ents(1, 11, 1))
        old = s.active_key_id()
        s.rotate_dek()
        assert s.needs_snapshot
    _lmdb_delete(data_dir, M.DB_STATE, M.K_ROTATION)
    report = check(data_dir, kek=KEK)
    try:
        with walcrypt.open(data_dir, kek=KEK) as s:
            s.save(None, _ents(11, 12, 1))
            s.save_snapshot(SnapshotMeta(11, 1, CS), b"snapshot at 11")
            still_old = s.active_key_id() == old and not s.needs_snapshot
    except WalcryptError:
        still_old = False
    assert not report.ok or not still_old, "the requested DEK rotation vanished without a trace"


def test_old_kek_still_unwraps_the_live_dek_from_the_data_directory_after_rotate_kek(tmp_path):
    data_dir = str(tmp_path / "data")
    old_file = tmp_path / "old.kek"
    old_file.write_bytes(wctest.KEK_BYTES.hex().encode())
    os.chmod(old_file, 0o600)
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 5, 1))
        s.save_snapshot(SnapshotMeta(3, 1, CS), b"state machine at 3")
        s.rotate_kek(walcrypt.RawKey(os.urandom(32)))     # say the old KEK leaked
        snap = s.snapshot().info.path
        live_dek = s.snapshot().info.key_id
        assert live_dek == s.active_key_id()
    with pytest.raises(walcrypt.WrongKeyError):
        walcrypt.open(data_dir, kek=KEK)
    env = dict(os.environ, PYTHONPATH=wctest.REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "walcrypt.cli", "snapshot", "inspect", snap, "--key-file",
                           str(old_file), "--json"], env=env, capture_output=True, timeout=120)
    assert not (proc.returncode == 0 and b'"verified": true' in proc.stdout), \
        "the old KEK authenticates and decrypts the live snapshot (and unwraps the DEK of the live segments)"


def test_destroyed_dek_survives_wrapped_in_the_metadata_file(tmp_path):
    data_dir = str(tmp_path / "data")

    def holders(wrapped):
        found = []
        for dirpath, _dirs, files in os.walk(data_dir):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    if wrapped in f.read():
                        found.append(os.path.relpath(os.path.join(dirpath, name), data_dir))
        return found

    with walcrypt.open(data_dir, kek=KEK, destroy_retired_keys=True) as s:
        s.save(HardState(1, 1, 3), _ents(1, 50, 1))
        s.save_snapshot(SnapshotMeta(30, 1, CS), b"state at 30")
        old = s.active_key_id()
        wrapped = s.keys[old].wrapped
        s.rekey()                                   # a compromised DEK: rewritten and destroyed
        assert s.keys[old].state == 5 and not s.keys[old].wrapped
        # Right after the call, while the store is open (LMDB reuses the freed page only after
        # later commits, so before the fix this found the key every time):
        assert not holders(wrapped), f"the destroyed DEK is still there, wrapped under the KEK, in {holders(wrapped)}"
        s.save(None, _ents(50, 55, 1))
        assert not holders(wrapped)
    assert not holders(wrapped), f"the destroyed DEK is still there, wrapped under the KEK, in {holders(wrapped)}"


# ---------------------------------------------------------------------------------------------
# Validation in the caller's thread: metadata the writer accepts and the reader rejects
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("conf_state,extra_meta", [
    (ConfState(voters=(1.5,)), None),
    (ConfState(voters=(True, 2)), None),
    (CS, {"index": 7}),
    (CS, {"conf_state": []}),
], ids=["float-voter", "bool-voter", "extra-overrides-index", "extra-overrides-conf-state"])
def test_snapshot_metadata_accepted_on_write_bricks_the_store(tmp_path, conf_state, extra_meta):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 21, 1))
        try:
            w = s.begin_snapshot(SnapshotMeta(50, 2, conf_state), extra_meta=extra_meta)   # InstallSnapshot
            w.write(b"leader state at 50")
            w.commit()
        except WalcryptError:
            pass                                 # refusing the caller's metadata is fine
    with walcrypt.open(data_dir, kek=KEK) as s:  # the node must restart, whatever the call did
        assert s.last_index() in (20, 50)


def test_a_save_the_writer_accepts_can_exceed_the_readers_frame_bound(tmp_path, monkeypatch):
    from walcrypt import format as fmt
    # The format's bound is 1 GiB; scaled down to 1 MiB so that the test needs no gigabytes of memory.
    # Writer and reader read the same constant, so the arithmetic is the format's.
    monkeypatch.setattr(fmt, "MAX_RECORD_PAYLOAD", 1 << 20)
    data_dir = str(tmp_path / "data")
    big = fmt.MAX_RECORD_PAYLOAD - 64                # the largest max_entry_size open() accepts
    with walcrypt.open(data_dir, kek=KEK, max_entry_size=big) as s:
        s.save(HardState(1, 1, 0), [Entry(1, 1, b"a"),
                                    Entry(2, 1, b"s" * (fmt.RECORD_TARGET_BYTES - 100)), Entry(3, 1, b"b" * big)])
    with walcrypt.open(data_dir, kek=KEK, max_entry_size=big) as s:
        assert [len(e.data) for e in s.entries(1, 4)] == [1, fmt.RECORD_TARGET_BYTES - 100, big]


@pytest.mark.parametrize("chunk_size", [0, (64 << 20) + 1, 1 << 32], ids=["zero", "above-64MiB", "2^32"])
def test_unvalidated_snapshot_chunk_size(tmp_path, chunk_size):
    data_dir = str(tmp_path / "data")
    try:
        walcrypt.open(data_dir, kek=KEK, snapshot_chunk_size=chunk_size).close()
    except walcrypt.UsageError:
        return                                        # refused up front: fixed
    env = dict(os.environ, PYTHONPATH=wctest.REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = textwrap.dedent("""
        import sys, walcrypt
        from walcrypt import ConfState, Entry, HardState, SnapshotMeta, WalcryptError
        with walcrypt.open(sys.argv[1], kek=walcrypt.RawKey(bytes.fromhex(sys.argv[2])),
                           snapshot_chunk_size=int(sys.argv[3])) as s:
            s.save(HardState(1, 1, 3), [Entry(i, 1, b"e%d" % i) for i in range(1, 21)])
            try:
                s.save_snapshot(SnapshotMeta(50, 2, ConfState((1, 2, 3))), b"leader state at 50")
            except WalcryptError:
                pass
    """)
    try:
        proc = subprocess.run([sys.executable, "-c", code, data_dir, wctest.KEK_BYTES.hex(), str(chunk_size)],
                              env=env, timeout=8, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"save_snapshot with snapshot_chunk_size={chunk_size} never returns")
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()[-300:]
    with walcrypt.open(data_dir, kek=KEK) as s:       # and the node restarts
        assert s.last_index() in (20, 50)


# ---------------------------------------------------------------------------------------------
# Robustness: forged records of a plaintext store
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("record", ["manifest-index-offset", "next-segment"])
def test_forged_plaintext_records_raise_only_walcrypt_errors(tmp_path, record):
    from walcrypt import format as fmt
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, encrypted=False, segment_size=4096) as s:
        s.save(HardState(1, 1, 0), _ents(1, 60, 1, b"x" * 40))
    env = lmdb.open(os.path.join(data_dir, "meta"), max_dbs=8)
    try:
        handles = {name: env.open_db(name) for name in (M.DB_STATE, M.DB_SEGMENTS)}
        with env.begin(write=True) as txn:
            if record == "next-segment":
                db, key = M.DB_STATE, M.K_NEXT_SEGMENT
                value = ((1 << 64) - 1).to_bytes(8, "little")
            else:
                db = M.DB_SEGMENTS
                key = next(k for k, v in txn.cursor(db=handles[db])
                           if fmt.MANIFEST_STRUCT.unpack(bytes(v)[:-16])[1] == fmt.SEG_SEALED)
                key = bytes(key)
                rec = list(fmt.MANIFEST_STRUCT.unpack(bytes(txn.get(key, db=handles[db]))[:-16]))
                rec[7] = (1 << 63) + 8                   # index_offset
                value = fmt.MANIFEST_STRUCT.pack(*rec)
            txn.put(key, value + M.keyless_mac(db, key, value), db=handles[db])
    finally:
        env.close()
    try:
        with walcrypt.open(data_dir, encrypted=False) as s:
            s.save(None, [Entry(s.last_index() + 1, 1, b"next")])
    except WalcryptError:
        pass


# ---------------------------------------------------------------------------------------------
# Smaller findings of the same review, fixed directly
# ---------------------------------------------------------------------------------------------

def test_stored_scrypt_costs_bounded_in_cpu_as_well_as_memory():
    from walcrypt import keys as K
    assert K.check_scrypt_costs(2 ** 18, 8, 16) is not None            # about 14 s of CPU per open
    assert K.check_scrypt_costs(2 ** 15, 8, 1) is None                 # the default


def test_export_into_a_missing_directory_is_a_usage_error(tmp_path):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 4, 1))
        s.save_snapshot(SnapshotMeta(3, 1, CS), b"state")
        with pytest.raises(walcrypt.UsageError, match="does not exist"):
            s.export_snapshot(str(tmp_path / "missing" / "x.wcx"))


def test_a_pending_snapshot_is_refused_after_its_store_closed(tmp_path):
    data_dir = str(tmp_path / "data")
    s = walcrypt.open(data_dir, kek=KEK)
    s.save(HardState(1, 1, 3), _ents(1, 4, 1))
    w = s.begin_snapshot(SnapshotMeta(3, 1, CS))
    w.write(b"part one")
    s.close()
    before = sorted(os.listdir(os.path.join(data_dir, SNAP)))
    with pytest.raises(walcrypt.UsageError, match="closed"):
        w.write(b"part two")
    with pytest.raises(walcrypt.UsageError):
        w.commit()
    assert sorted(os.listdir(os.path.join(data_dir, SNAP))) <= before
    with walcrypt.open(data_dir, kek=KEK) as s2:
        assert s2.snapshot() is None and s2.last_index() == 3


# -- creation intents, purge records and the catalog (metadata format version 2) ------------------

def _copy_meta_once(data_dir: str, copy: str) -> None:
    if not os.path.exists(copy):
        shutil.copytree(os.path.join(data_dir, "meta"), copy)


def test_meta_rolled_back_to_a_creation_intent_deletes_the_acknowledged_segment(tmp_path, monkeypatch):
    from walcrypt import storage as S
    data_dir, copy = str(tmp_path / "data"), str(tmp_path / "meta-copy")
    real = S.Store._segment_file

    def segment_file(self, *a, **k):          # a copy of meta/ (backup, file-system snapshot) taken
        _copy_meta_once(data_dir, copy)       # between the intent commit and the registering commit
        return real(self, *a, **k)

    monkeypatch.setattr(S.Store, "_segment_file", segment_file)
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 11, 1, b"acknowledged "))
    monkeypatch.setattr(S.Store, "_segment_file", real)
    (seg_name,) = os.listdir(os.path.join(data_dir, WAL))
    shutil.rmtree(os.path.join(data_dir, "meta"))
    shutil.copytree(copy, os.path.join(data_dir, "meta"))           # meta/ rolled back alone
    try:
        walcrypt.open(data_dir, kek=KEK).close()
    except WalcryptError:
        pass                                                         # refusing is fine; deleting is not
    assert any(n.startswith(seg_name) for n in os.listdir(os.path.join(data_dir, WAL))), \
        "the segment holding acknowledged entries 1..10 was deleted as a creation leftover"


def test_meta_rolled_back_to_a_snapshot_intent_deletes_the_acknowledged_snapshot(tmp_path, monkeypatch):
    from walcrypt import storage as S
    data_dir, copy = str(tmp_path / "data"), str(tmp_path / "meta-copy")
    real = S.Store.keyring_bundle

    def keyring_bundle(self, *a, **k):        # called by open_writer after the snap_creating commit
        _copy_meta_once(data_dir, copy)
        return real(self, *a, **k)

    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 6, 1))
        monkeypatch.setattr(S.Store, "keyring_bundle", keyring_bundle)
        s.save_snapshot(SnapshotMeta(100, 3, CS), b"leader state at 100")   # InstallSnapshot, durable
        monkeypatch.setattr(S.Store, "keyring_bundle", real)
        (snap_name,) = os.listdir(os.path.join(data_dir, SNAP))
    shutil.rmtree(os.path.join(data_dir, "meta"))
    shutil.copytree(copy, os.path.join(data_dir, "meta"))
    served = None
    try:
        with walcrypt.open(data_dir, kek=KEK) as s:      # the save returned: it is rolled forward
            served = (s.snapshot().meta.index, s.snapshot().data, s.last_index())
    except WalcryptError:
        pass
    assert served in (None, (100, b"leader state at 100", 100))
    assert any(n.startswith(snap_name) for n in os.listdir(os.path.join(data_dir, SNAP))), \
        "the acknowledged snapshot file was deleted as a creation leftover"


@pytest.mark.parametrize("mac_version,claim_version", [(1, None), (1, 1), (2, 2), (3, None)],
                         ids=["v1-record", "v1-record-and-version-byte", "v2-era-record-and-version-byte",
                              "current-domain-24-bytes"])
def test_replayed_version_1_compaction_record_disables_the_catalog(tmp_path, mac_version, claim_version):
    data_dir = str(tmp_path / "data")
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(1, 1, 3), _ents(1, 6, 1))
        # The record as a version 1 store held it (24 bytes, MAC'd under this store's key and the
        # MAC domain of its version): what an attacker finds in an older copy of meta/ of a store
        # that was upgraded.  The last case stands for any 24-byte record the key could make.
        with s.meta.read() as r:
            value = r.get(M.DB_STATE, M.K_COMPACTED)
        old_record = value[:24] + M.keyed_mac(s.meta.mac_key, M.DB_STATE, M.K_COMPACTED, value[:24],
                                              version=mac_version)
    with walcrypt.open(data_dir, kek=KEK) as s:
        s.save(HardState(2, 2, 3), _ents(6, 12, 2, b"acknowledged "))
    # The attacker, without the key: the old record back, the intent record and the newest
    # manifest record deleted (and the version byte put back, if said so).
    env = lmdb.open(os.path.join(data_dir, "meta"), max_dbs=8)
    try:
        state, segments = env.open_db(M.DB_STATE), env.open_db(M.DB_SEGMENTS)
        store = env.open_db(M.DB_STORE)
        with env.begin(write=True) as txn:
            txn.put(M.K_COMPACTED, old_record, db=state)
            txn.delete(M.K_CREATING, db=state)
            newest = max(bytes(k) for k, _ in txn.cursor(db=segments))
            assert txn.delete(newest, db=segments)
            if claim_version is not None:
                txn.put(M.K_FORMAT_VERSION, bytes([claim_version]), db=store)
    finally:
        env.close()
    report = check(data_dir, kek=KEK)
    try:
        with walcrypt.open(data_dir, kek=KEK) as s:
            served = s.last_index()
    except WalcryptError:
        served = None
    assert not report.ok and served in (None, 11), \
        f"verify OK={report.ok}; the store opened serving a log that ends at {served} instead of 11"
