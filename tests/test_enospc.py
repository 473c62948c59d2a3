"""Disk full and failing disks.

ENOSPC is injected (walcrypt.testing.FaultyVFS) at preallocation, write, fsync and rename, under each
write path: saves (segment creation, write units), snapshot publish, DEK rotation (a new segment
under the pending key, then a snapshot), sealing on close.  Then the same on a real, small file
system when this machine lets a test mount one (a 2 MiB tmpfs; a loop-mounted 4 MiB ext4 image).

Each case must:

* raise a clear typed error: StoreFailedError (a write or fsync failed) or StorageError (the
  metadata database is full) -- never a bare OSError;
* lose nothing acknowledged (and invent nothing: at most the save in flight appears, whole);
* fail stop: every later write raises StoreFailedError until the store is reopened;
* work again once space is freed and the store is reopened.

tests/test_faults.py covers EIO at each call and ENOSPC budgets during saves; this file adds the
other write paths, ENOSPC at each call kind, recovery on a disk that is still full, and real file
systems.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta, StorageError, StoreFailedError
from walcrypt.testing import FaultyVFS

import snaptest as T
import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
SEG = 8192
OPTS = dict(segment_size=SEG, snapshot_chunk_size=1024, sync="always")
CS = ConfState(voters=(1, 2, 3))
TYPED = (StoreFailedError, StorageError)


def _entries(lo: int, hi: int, size: int = 100) -> list[Entry]:
    return [Entry(i, 1, wctest.entry_data(i, size)) for i in range(lo, hi)]


def _source(store):
    idx = store.last_index()
    return SnapshotMeta(idx, store.term(idx), CS), T.snap_data(idx, 5000)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("enospc") / "template")
    with walcrypt.open(d, kek=KEK, **OPTS) as s:
        for a in range(1, 101, 10):
            s.save(hard_state=HardState(1, 1, a + 9), entries=_entries(a, a + 10))
        s.save_snapshot(SnapshotMeta(50, 1, CS), T.snap_data(50, 5000))
    return d


def _assert_typed(exc: BaseException, what: str) -> None:
    assert isinstance(exc, TYPED), f"{what}: {type(exc).__name__} escaped instead of a typed error: {exc!r}"
    if isinstance(exc, StoreFailedError):
        cause = exc.__cause__
        assert cause is None or isinstance(cause, OSError) or isinstance(cause, StorageError), repr(cause)


def _assert_fail_stop(s, nxt: int) -> None:
    """Every later write is refused with StoreFailedError.  (rotate_dek while a rotation is in flight
    is checked on its own: test_rotate_dek_is_refused_on_a_failed_store_with_a_rotation_in_flight.)"""
    calls = [lambda: s.save(entries=_entries(nxt, nxt + 1)),
             lambda: s.save(hard_state=HardState(7, 7, 7)),
             lambda: s.save_snapshot(SnapshotMeta(max(50, s.last_index()), 1, CS), b"x")]
    if not s.needs_snapshot:
        calls.append(lambda: s.rotate_dek())
    for call in calls:
        with pytest.raises(StoreFailedError):
            call()


def _verify_after_space_freed(d: str, acked: list[Entry], attempted: list[Entry], acked_snap: int,
                              attempted_snap: int | None) -> None:
    with walcrypt.open(d, kek=KEK, snapshot_source=_source, **OPTS) as s:
        first, last = s.first_index(), s.last_index()
        got = s.entries(first, last + 1) if last >= first else []
        want = [e for e in acked if e.index >= first]
        assert got[:len(want)] == want, "an acknowledged entry was lost or changed"
        extra = got[len(want):]
        assert extra in ([], [e for e in attempted if e.index >= first]), f"invented entries {extra[:2]}"
        snap = s.snapshot()
        assert snap is not None and snap.meta.index in {acked_snap, attempted_snap}, snap
        assert snap.data == T.snap_data(snap.meta.index, 5000)
        assert first - 1 <= snap.meta.index
        nxt = last + 1
        s.save(hard_state=HardState(2, 1, nxt), entries=[Entry(nxt, 2, b"after-the-disk-was-freed")])
    with walcrypt.open(d, kek=KEK, **OPTS) as s:
        assert s.entries(nxt, nxt + 1) == [Entry(nxt, 2, b"after-the-disk-was-freed")]


# ---------------------------------------------------------------------------------------------
# Injected ENOSPC
# ---------------------------------------------------------------------------------------------

def _op_saves(s, state):
    nxt = s.last_index() + 1
    for _ in range(60):                                   # bounded
        batch = _entries(nxt, nxt + 10)
        state["attempted"] = batch
        s.save(hard_state=HardState(1, 1, nxt + 9), entries=batch)
        state["acked"] += batch
        state["attempted"] = []
        nxt += 10


def _op_snapshot(s, state):
    idx = s.last_index()
    state["attempted_snap"] = idx
    s.save_snapshot(SnapshotMeta(idx, 1, CS), T.snap_data(idx, 5000))
    state["acked_snap"] = idx


def _op_rotate(s, state):
    state["attempted_snap"] = s.last_index()
    s.rotate_dek()                                        # a segment under the pending key, then a snapshot
    state["acked_snap"] = s.last_index()


OPERATIONS = {"save": _op_saves, "save_snapshot": _op_snapshot, "rotate_dek": _op_rotate}
FAULTS = {
    "preallocate": lambda v, n: v.fail_nth("preallocate", n, errno.ENOSPC),
    "pwrite": lambda v, n: v.fail_nth("pwrite", n, errno.ENOSPC),
    "fsync": lambda v, n: v.fail_nth("fdatasync", n, errno.ENOSPC),
    "rename": lambda v, n: v.fail_nth("rename", n, errno.ENOSPC),
    "partial-write": lambda v, n: v.enospc_after([0, 700, 5000, 9000][min(n, 4) - 1]),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_injected_enospc(template, tmp_path, operation, fault):
    hit = 0
    for n in range(1, 5):
        d = str(tmp_path / f"n{n}")
        shutil.copytree(template, d)
        vfs = FaultyVFS()
        s = walcrypt.open(d, kek=KEK, vfs=vfs, snapshot_source=_source, **OPTS)
        acked = s.entries(1, s.last_index() + 1)
        state = {"acked": list(acked), "attempted": [], "acked_snap": 50, "attempted_snap": None}
        FAULTS[fault](vfs, n)
        try:
            OPERATIONS[operation](s, state)
        except BaseException as exc:  # noqa: BLE001 - classified right below
            _assert_typed(exc, f"{operation} with {fault} #{n}")
            hit += 1
            _assert_fail_stop(s, s.last_index() + 1)
        finally:
            s.close()                                     # never raises, even on a failed store
        vfs.clear_faults()                                # space is freed
        _verify_after_space_freed(d, state["acked"], state["attempted"], state["acked_snap"],
                                  state["attempted_snap"])
        shutil.rmtree(d)
    if (operation, fault) not in {("save_snapshot", "preallocate"), ("save", "rename")}:
        assert hit, f"{fault} never hit during {operation}"


def test_rotate_dek_is_refused_on_a_failed_store_with_a_rotation_in_flight(template, tmp_path):
    d = str(tmp_path / "d")
    shutil.copytree(template, d)
    vfs = FaultyVFS()
    with walcrypt.open(d, kek=KEK, vfs=vfs, **OPTS) as s:
        vfs.fail_nth("preallocate", 1, errno.ENOSPC)      # the rotation's new segment cannot be created
        with pytest.raises(StoreFailedError):
            s.rotate_dek()
        assert s.needs_snapshot
        with pytest.raises(StoreFailedError):
            s.rotate_dek()


@pytest.mark.parametrize("fault", ["pwrite", "fsync"])
def test_enospc_while_sealing_on_close(template, tmp_path, fault):
    d = str(tmp_path / "d")
    shutil.copytree(template, d)
    vfs = FaultyVFS()
    s = walcrypt.open(d, kek=KEK, vfs=vfs, **OPTS)
    s.save(hard_state=HardState(1, 1, 105), entries=_entries(101, 106))
    FAULTS[fault](vfs, 1)
    s.close()                                             # logs a warning; the segment stays unsealed
    _verify_after_space_freed(d, _entries(1, 106), [], 50, None)


def test_recovery_on_a_disk_that_is_still_full(template, tmp_path):
    """The segment creation that ran out of space, then a reopen while the disk is still full: recovery
    needs no space (sealing the recovered segment is best effort), every acknowledged entry is readable,
    and once space is freed the store works (raft-engine #344).  The same with a torn tail to repair
    is test_open_with_a_torn_tail_on_a_full_disk_raises_a_typed_error."""
    d = str(tmp_path / "d")
    shutil.copytree(template, d)
    vfs = FaultyVFS()
    s = walcrypt.open(d, kek=KEK, vfs=vfs, **OPTS)
    s.save(entries=_entries(101, 111))
    for k in range(111, 400, 10):                          # fill the segment; the next one cannot be made
        vfs.fail_nth("preallocate", 1, errno.ENOSPC)
        try:
            s.save(entries=_entries(k, k + 10))
        except StoreFailedError:
            break
        vfs.clear_faults()
    else:
        pytest.fail("no new segment was needed")
    s.close()
    full = FaultyVFS()
    full.enospc_after(0)
    with walcrypt.open(d, kek=KEK, vfs=full, **OPTS) as s2:
        assert s2.entries(1, k) == _entries(1, k)
        with pytest.raises(StoreFailedError):
            s2.save(entries=_entries(k, k + 1))
    _verify_after_space_freed(d, _entries(1, k), [], 50, None)


def test_open_with_a_torn_tail_on_a_full_disk_raises_a_typed_error(template, tmp_path):
    d = str(tmp_path / "d")
    shutil.copytree(template, d)
    vfs = FaultyVFS()
    s = walcrypt.open(d, kek=KEK, vfs=vfs, **OPTS)
    s.save(entries=_entries(101, 111))
    vfs.enospc_after(150)
    with pytest.raises(StoreFailedError):
        s.save(entries=_entries(111, 121))
    s.close()
    full = FaultyVFS()
    full.enospc_after(0)
    try:
        walcrypt.open(d, kek=KEK, vfs=full, **OPTS).close()
    except TYPED:
        pass


# ---------------------------------------------------------------------------------------------
# A real, small file system
# ---------------------------------------------------------------------------------------------

def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


@pytest.fixture(params=["tmpfs-2m", "ext4-loop-4m"])
def small_fs(request, tmp_path):
    """Mount a small file system at a fresh directory (root only); skip with the reason otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = str(tmp_path / "mnt")
    os.mkdir(mnt)
    if request.param == "tmpfs-2m":
        res = _run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", mnt)
    else:
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("mkfs.ext4 is not installed")
        img = str(tmp_path / "ext4.img")
        with open(img, "wb") as f:
            f.truncate(4 << 20)
        res = _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", img)
        if res.returncode == 0:
            res = _run("mount", "-o", "loop", img, mnt)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a {request.param} file system here: {res.stderr.strip() or res.stdout.strip()}")
    try:
        yield mnt
    finally:
        _run("umount", mnt)


def test_real_disk_full(small_fs):
    d = os.path.join(small_fs, "data")
    filler = os.path.join(small_fs, "filler")
    with open(filler, "wb") as f:                         # room to free later
        f.write(os.urandom(512 << 10))
        os.fsync(f.fileno())
    acked: list[Entry] = []
    attempted: list[Entry] = []
    failure = None
    s = walcrypt.open(d, kek=KEK, segment_size=64 << 10, sync="always")
    try:
        nxt = 1
        for _ in range(10_000):                           # bounded: the disk fills long before
            batch = _entries(nxt, nxt + 8, 1024)
            attempted = batch
            try:
                s.save(hard_state=HardState(1, 1, nxt + 7), entries=batch)
            except BaseException as exc:  # noqa: BLE001 - classified below
                failure = exc
                break
            acked += batch
            attempted = []
            nxt += 8
        assert failure is not None, "the file system never filled up"
        _assert_typed(failure, "save on a full file system")
        assert len(acked) > 50
        with pytest.raises(StoreFailedError):
            s.save(entries=_entries(nxt, nxt + 1))
    finally:
        s.close()
    # still full: the open recovers what is there, or says why it cannot, in a typed error
    try:
        with walcrypt.open(d, kek=KEK, segment_size=64 << 10) as s:
            got = s.entries(1, len(acked) + 1)
            assert got == acked
    except TYPED:
        pass
    os.unlink(filler)                                     # space is freed
    with walcrypt.open(d, kek=KEK, segment_size=64 << 10) as s:
        last = s.last_index()
        got = s.entries(1, last + 1)
        assert got[:len(acked)] == acked and got[len(acked):] in ([], attempted)
        s.save(hard_state=HardState(2, 1, last + 1), entries=[Entry(last + 1, 2, b"after-the-disk-was-freed")])
    with walcrypt.open(d, kek=KEK, segment_size=64 << 10) as s:
        assert s.entries(last + 1, last + 2) == [Entry(last + 1, 2, b"after-the-disk-was-freed")]


def test_real_disk_full_during_snapshot(small_fs):
    d = os.path.join(small_fs, "data")
    s = walcrypt.open(d, kek=KEK, segment_size=16 << 10, snapshot_chunk_size=64 << 10, sync="always")
    acked = _entries(1, 51, 200)
    try:
        s.save(hard_state=HardState(1, 1, 50), entries=acked)
        big = tempfile.SpooledTemporaryFile()
        for k in range(64):                               # 8 MiB: more than the file system holds
            big.write(os.urandom(128 << 10))
        big.seek(0)
        with pytest.raises(TYPED) as info:
            s.save_snapshot(SnapshotMeta(50, 1, CS), big)
        _assert_typed(info.value, "save_snapshot on a full file system")
        with pytest.raises(StoreFailedError):
            s.save(entries=_entries(51, 52))
    finally:
        s.close()
    with walcrypt.open(d, kek=KEK, segment_size=16 << 10) as s:   # the partial snapshot file is gone
        assert s.snapshot() is None
        assert s.entries(1, 51) == acked
        assert not [n for n in os.listdir(os.path.join(d, "snap-v1-encrypted")) if n.startswith(".tmp-")]
        s.save_snapshot(SnapshotMeta(50, 1, CS), b"small enough")
    with walcrypt.open(d, kek=KEK, segment_size=16 << 10) as s:
        assert s.snapshot().data == b"small enough"
