"""Segment preallocation on a file system without fallocate (audit finding 9).

glibc's ``posix_fallocate`` does not fail where the file system has no fallocate: it emulates it
by writing a byte into every block of the range, one write request per 4 KiB block through FUSE
(about 7 s per 64 MiB segment on the audited machine, at every open).  walcrypt calls the
fallocate system call and, where the file system lacks it, only sets the size.

These tests mount tests/powerloss/lazyfs.py with ``--no-fallocate`` (it answers fallocate with
EOPNOTSUPP, as such file systems do) and count the write requests the file system receives while
a segment is created.  The space check on a file system that has fallocate is in test_vfs.py
(``test_preallocate_uses_the_fallocate_system_call``).

Skipped without FUSE (reason given); with WALCRYPT_REQUIRE_FUSE=1 they fail instead.
"""

from __future__ import annotations

import os
import sys

import pytest

import walcrypt
from walcrypt import Entry, HardState
from walcrypt.vfs import DEFAULT_VFS

import wctest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "powerloss"))

from harness import FuseUnavailable, LazyFSMount, fuse_unavailable_reason  # noqa: E402

SEGMENT = 64 << 20                 # the default segment size
BLOCK = 4096


def _unavailable(reason: str):
    if os.environ.get("WALCRYPT_REQUIRE_FUSE") == "1":
        pytest.fail(f"WALCRYPT_REQUIRE_FUSE=1 but FUSE is unavailable: {reason}")
    pytest.skip(f"needs FUSE: {reason}")


@pytest.fixture(scope="module")
def nofalloc(tmp_path_factory):
    """A lazyfs mount whose fallocate answers EOPNOTSUPP."""
    reason = fuse_unavailable_reason()
    if reason:
        _unavailable(reason)
    root = tmp_path_factory.mktemp("nofalloc")
    try:
        m = LazyFSMount.start(str(root / "backing"), str(root / "mnt"), fallocate=False)
    except FuseUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield m
    finally:
        m.stop()


def test_the_mount_has_no_fallocate(nofalloc):
    import ctypes
    import errno
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "fallocate64", None)
    if fn is None:
        pytest.skip("no fallocate64 in this C library")
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fd = os.open(os.path.join(nofalloc.mountpoint, "probe"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert fn(fd, 0, 0, BLOCK) == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_preallocate_writes_no_block(nofalloc):
    fd = DEFAULT_VFS.open(os.path.join(nofalloc.mountpoint, "one"), os.O_RDWR | os.O_CREAT)
    try:
        nofalloc.call("reset-stats")
        DEFAULT_VFS.preallocate(fd, SEGMENT)
        st = nofalloc.stats()
        assert os.fstat(fd).st_size == SEGMENT
        assert st["writes"] == 0 and st["write_bytes"] == 0, \
            f"preallocating {SEGMENT} bytes sent {st['writes']} writes ({st['write_bytes']} bytes) to the file system"
        DEFAULT_VFS.preallocate(fd, BLOCK)          # never shrinks
        assert os.fstat(fd).st_size == SEGMENT
    finally:
        DEFAULT_VFS.close(fd)


def test_a_new_segment_costs_a_few_writes_not_one_per_block(nofalloc):
    """Reopening starts a fresh (preallocated) segment: the file system sees the segment header,
    the batch and LMDB's commit - a handful of writes - not one per 4 KiB block of the segment."""
    data = os.path.join(nofalloc.mountpoint, "store")
    kek = walcrypt.RawKey(wctest.KEK_BYTES)
    with walcrypt.open(data, kek=kek, sync="always") as s:
        s.save(hard_state=HardState(1, 1, 1), entries=[Entry(1, 1, b"first")])
    nofalloc.call("reset-stats")
    with walcrypt.open(data, kek=kek, sync="always") as s:
        s.save(entries=[Entry(2, 1, b"second")])
        st = nofalloc.stats()
        wal = os.path.join(data, "wal-v1-encrypted")
        newest = max(os.listdir(wal))
        assert os.path.getsize(os.path.join(wal, newest)) == SEGMENT
    per_block = SEGMENT // BLOCK
    assert st["writes"] < 64, (f"opening and one save sent {st['writes']} write requests ({st['write_bytes']} bytes); "
                               f"preallocation by writing every block would be {per_block}")
    assert st["write_bytes"] < 1 << 20
