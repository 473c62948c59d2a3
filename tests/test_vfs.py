"""Tests of the filesystem seam: the real VFS, fault injection and the crash model."""

from __future__ import annotations

import errno
import os
import random
import stat
import sys

import pytest
from hypothesis import given, settings, strategies as st

from walcrypt import vfs as vfs_mod
from walcrypt.vfs import DEFAULT_VFS, SECTOR_SIZE, VFS
from walcrypt.testing import CrashVFS, FaultyVFS, SimulatedCrash

RW_CREATE = os.O_RDWR | os.O_CREAT


def write_file(vfs: VFS, path, data: bytes, *, sync: bool = True, sync_dir: bool = True) -> None:
    fd = vfs.open(str(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        vfs.pwrite(fd, data, 0)
        if sync:
            vfs.fsync(fd)
    finally:
        vfs.close(fd)
    if sync_dir:
        vfs.fsync_dir(os.path.dirname(str(path)))


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the real VFS --------------------------------------------------------------------------


def test_real_vfs_basic_io(tmp_path):
    vfs = DEFAULT_VFS
    p = str(tmp_path / "a")
    fd = vfs.open(p, RW_CREATE)
    try:
        assert vfs.pwrite(fd, b"hello", 0) == 5
        assert vfs.pwrite(fd, bytearray(b"XY"), 1) == 2
        assert vfs.pwrite(fd, memoryview(b"--world")[2:], 5) == 5
        assert vfs.pread(fd, 10, 0) == b"hXYloworld"
        assert vfs.pread(fd, 100, 7) == b"rld"  # short at EOF
        assert vfs.pread(fd, 4, 50) == b""
        vfs.fdatasync(fd)
        vfs.fsync(fd)
        assert vfs.fstat_size(fd) == 10
        vfs.preallocate(fd, 4096)
        assert vfs.fstat_size(fd) == 4096
        vfs.preallocate(fd, 100)  # never shrinks
        assert vfs.fstat_size(fd) == 4096
        vfs.ftruncate(fd, 3)
        assert vfs.fstat_size(fd) == 3
    finally:
        vfs.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    vfs.fsync_dir(str(tmp_path))
    assert vfs.exists(p) and vfs.size(p) == 3 and vfs.read_file(p) == b"hXY"
    vfs.rename(p, p + ".new")
    assert vfs.listdir(str(tmp_path)) == ["a.new"]
    vfs.unlink(p + ".new")
    assert not vfs.exists(p + ".new")
    vfs.mkdir(str(tmp_path / "d"))
    vfs.makedirs(str(tmp_path / "d" / "e" / "f"))
    vfs.makedirs(str(tmp_path / "d" / "e" / "f"))  # exist_ok
    assert os.path.isdir(tmp_path / "d" / "e" / "f")
    with pytest.raises(FileExistsError):
        vfs.mkdir(str(tmp_path / "d"))


def test_copy_file(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst.broken")
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with open(src, "wb") as f:
        f.write(payload)
    with open(dst, "wb") as f:
        f.write(b"x" * (5 * 1024 * 1024))
    os.chmod(dst, 0o644)
    DEFAULT_VFS.copy_file(src, dst)
    assert read(dst) == payload
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o600


def test_pwrite_loops_over_partial_writes(tmp_path, monkeypatch):
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, bytes(data)[:3], off))
    p = str(tmp_path / "a")
    fd = DEFAULT_VFS.open(p, RW_CREATE)
    try:
        assert DEFAULT_VFS.pwrite(fd, b"0123456789", 2) == 10
    finally:
        DEFAULT_VFS.close(fd)
    assert read(p) == b"\0\0" + b"0123456789"


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL])
def test_preallocate_falls_back_to_ftruncate(tmp_path, monkeypatch, code):
    """Without fallocate the size is set with ftruncate: no block is written (glibc's
    posix_fallocate would write a byte into every block), and the file never shrinks."""
    monkeypatch.setattr(vfs_mod, "_fallocate", lambda fd, length: code)
    monkeypatch.setattr(os, "posix_fallocate", _no_posix_fallocate, raising=False)
    writes = []
    real_pwrite, real_write = os.pwrite, os.write
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: writes.append(off) or real_pwrite(fd, data, off))
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(None) or real_write(fd, data))
    fd = DEFAULT_VFS.open(str(tmp_path / "a"), RW_CREATE)
    try:
        DEFAULT_VFS.preallocate(fd, 8192)
        assert DEFAULT_VFS.fstat_size(fd) == 8192
        DEFAULT_VFS.preallocate(fd, 10)
        assert DEFAULT_VFS.fstat_size(fd) == 8192
    finally:
        DEFAULT_VFS.close(fd)
    assert writes == []


def _no_posix_fallocate(fd, off, length):
    raise AssertionError("posix_fallocate emulates fallocate with a write per block; use fallocate(2)")


def test_preallocate_other_errors_propagate(tmp_path, monkeypatch):
    monkeypatch.setattr(vfs_mod, "_fallocate", lambda fd, length: errno.ENOSPC)
    fd = DEFAULT_VFS.open(str(tmp_path / "a"), RW_CREATE)
    try:
        with pytest.raises(OSError) as ei:
            DEFAULT_VFS.preallocate(fd, 8192)
        assert ei.value.errno == errno.ENOSPC
        assert DEFAULT_VFS.fstat_size(fd) == 0
    finally:
        DEFAULT_VFS.close(fd)


def _fallocate_supported(directory) -> bool:
    probe = os.path.join(directory, "probe")
    fd = os.open(probe, RW_CREATE, 0o600)
    try:
        return vfs_mod._fallocate(fd, 4096) == 0
    finally:
        os.close(fd)
        os.unlink(probe)


def test_preallocate_uses_the_fallocate_system_call(tmp_path, monkeypatch):
    """The space is really allocated (st_blocks), not only the size set, and never through
    glibc's posix_fallocate."""
    if vfs_mod._LIBC_FALLOCATE is None:
        pytest.skip("no fallocate in this C library")
    if not _fallocate_supported(str(tmp_path)):
        pytest.skip("the file system of the temporary directory has no fallocate")
    monkeypatch.setattr(os, "posix_fallocate", _no_posix_fallocate, raising=False)
    length = 4 << 20
    fd = DEFAULT_VFS.open(str(tmp_path / "seg"), RW_CREATE)
    try:
        DEFAULT_VFS.pwrite(fd, b"head", 0)
        DEFAULT_VFS.preallocate(fd, length)
        st = os.fstat(fd)
        assert st.st_size == length
        assert st.st_blocks * 512 >= length, "preallocate only set the size"
        assert DEFAULT_VFS.pread(fd, 4, 0) == b"head"
        DEFAULT_VFS.preallocate(fd, 4096)                  # never shrinks
        assert DEFAULT_VFS.fstat_size(fd) == length
    finally:
        DEFAULT_VFS.close(fd)


def test_fallocate_binding_takes_64_bit_offsets(tmp_path):
    """off_t is 64 bits: a length of 2**62 + 4096 reaches the kernel whole and is refused (EFBIG or
    ENOSPC); a binding that cut it to 32 bits would allocate 4096 bytes and succeed."""
    if vfs_mod._LIBC_FALLOCATE is None:
        pytest.skip("no fallocate in this C library")
    import ctypes
    assert list(vfs_mod._LIBC_FALLOCATE.argtypes) == [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(str(tmp_path / "big"), RW_CREATE, 0o600)
    try:
        err = vfs_mod._fallocate(fd, (1 << 62) + 4096)
        assert err != 0 and os.fstat(fd).st_size == 0
    finally:
        os.close(fd)


# -- FaultyVFS -----------------------------------------------------------------------------


class Env:
    """One fd on tmp/f plus a few files, for exercising every op once per call."""

    def __init__(self, vfs: VFS, tmp_path):
        self.vfs, self.dir = vfs, str(tmp_path)
        self.path = str(tmp_path / "f")
        self.fd = vfs.open(self.path, RW_CREATE)
        vfs.pwrite(self.fd, b"base", 0)
        self.seq = 0

    def fresh(self, name: str) -> str:
        self.seq += 1
        p = os.path.join(self.dir, f"{name}{self.seq}")
        with open(p, "wb") as f:
            f.write(b"x")
        return p


OPS = {
    "pwrite": lambda e: e.vfs.pwrite(e.fd, b"data", 0),
    "fdatasync": lambda e: e.vfs.fdatasync(e.fd),
    "fsync": lambda e: e.vfs.fsync(e.fd),
    "fsync_dir": lambda e: e.vfs.fsync_dir(e.dir),
    "rename": lambda e: e.vfs.rename(e.fresh("r"), os.path.join(e.dir, f"renamed{e.seq}")),
    "unlink": lambda e: e.vfs.unlink(e.fresh("u")),
    "preallocate": lambda e: e.vfs.preallocate(e.fd, 4096 * (e.seq + 1)),
    "ftruncate": lambda e: e.vfs.ftruncate(e.fd, 2),
    "open": lambda e: e.vfs.close(e.vfs.open(e.path, os.O_RDONLY)),
}


@pytest.mark.parametrize("cls", [FaultyVFS, CrashVFS])
@pytest.mark.parametrize("op", sorted(OPS))
def test_fail_nth(tmp_path, op, cls):
    vfs = cls()
    env = Env(vfs, tmp_path)
    try:
        vfs.fail_nth(op, 2, errno.EROFS)
        OPS[op](env)  # first call succeeds
        with pytest.raises(OSError) as ei:
            OPS[op](env)
        assert ei.value.errno == errno.EROFS
        OPS[op](env)  # the fault fires once
        assert vfs.calls[op] >= 3
    finally:
        vfs.close(env.fd)
        if isinstance(vfs, CrashVFS):
            vfs.shutdown()


def test_failed_op_has_no_effect(tmp_path):
    vfs = FaultyVFS()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_file(vfs, a, b"A")
    vfs.fail_nth("rename")
    with pytest.raises(OSError) as ei:
        vfs.rename(a, b)
    assert ei.value.errno == errno.EIO
    assert os.path.exists(a) and not os.path.exists(b)
    vfs.fail_nth("unlink")
    with pytest.raises(OSError):
        vfs.unlink(a)
    assert os.path.exists(a)
    vfs.fail_nth("open")
    with pytest.raises(OSError):
        vfs.open(b, RW_CREATE)
    assert not os.path.exists(b)


def test_fsync_and_fdatasync_share_a_count(tmp_path):
    vfs = FaultyVFS()
    env = Env(vfs, tmp_path)
    vfs.fail_nth("fdatasync", 2)
    vfs.fsync(env.fd)
    with pytest.raises(OSError):
        vfs.fsync(env.fd)
    vfs.fail_nth("fsync", 1)
    with pytest.raises(OSError):
        vfs.fdatasync(env.fd)
    vfs.close(env.fd)
    assert vfs.calls["fsync"] == 2 and vfs.calls["fdatasync"] == 1


def test_fail_nth_rejects_unknown_op():
    with pytest.raises(ValueError):
        FaultyVFS().fail_nth("frobnicate")


def test_short_write_leaves_only_a_prefix(tmp_path):
    vfs = FaultyVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"o" * 100)
    fd = vfs.open(p, os.O_RDWR)
    vfs.short_write_next(7)
    with pytest.raises(OSError) as ei:
        vfs.pwrite(fd, b"n" * 50, 10)
    assert ei.value.errno == errno.EIO
    assert read(p) == b"o" * 10 + b"n" * 7 + b"o" * 83
    assert vfs.pwrite(fd, b"N" * 5, 0) == 5  # only the next write is short
    vfs.close(fd)
    assert read(p)[:5] == b"NNNNN"


def test_enospc_after(tmp_path):
    vfs = FaultyVFS()
    p = str(tmp_path / "a")
    fd = vfs.open(p, RW_CREATE)
    vfs.enospc_after(10)
    vfs.pwrite(fd, b"a" * 6, 0)
    with pytest.raises(OSError) as ei:
        vfs.pwrite(fd, b"b" * 6, 6)
    assert ei.value.errno == errno.ENOSPC
    assert read(p) == b"a" * 6 + b"b" * 4
    with pytest.raises(OSError) as ei:
        vfs.pwrite(fd, b"c", 10)
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as ei:
        vfs.preallocate(fd, 4096)
    assert ei.value.errno == errno.ENOSPC and vfs.fstat_size(fd) == 10
    vfs.clear_faults()
    vfs.pwrite(fd, b"c", 10)
    vfs.preallocate(fd, 4096)
    assert vfs.fstat_size(fd) == 4096
    vfs.close(fd)


def test_enospc_budget_counts_preallocate_growth(tmp_path):
    vfs = FaultyVFS()
    fd = vfs.open(str(tmp_path / "a"), RW_CREATE)
    vfs.enospc_after(1000)
    vfs.preallocate(fd, 600)
    vfs.preallocate(fd, 600)  # no growth, no cost
    vfs.pwrite(fd, b"x" * 400, 0)
    with pytest.raises(OSError):
        vfs.pwrite(fd, b"y", 0)
    vfs.close(fd)


def test_calls_counter(tmp_path):
    vfs = FaultyVFS()
    write_file(vfs, tmp_path / "a", b"abc")
    assert vfs.read_file(str(tmp_path / "a")) == b"abc"
    assert vfs.calls["open"] == 2 and vfs.calls["pwrite"] == 1 and vfs.calls["fsync"] == 1
    assert vfs.calls["fsync_dir"] == 1 and vfs.calls["read_file"] == 1 and vfs.calls["close"] == 2


# -- CrashVFS: file data -------------------------------------------------------------------


def test_unsynced_write_dropped(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"old" * 10)
    fd = vfs.open(p, os.O_RDWR)
    vfs.pwrite(fd, b"NEW", 3)
    vfs.pwrite(fd, b"tail-extension", 30)
    vfs.crash()
    assert read(p) == b"old" * 10


def test_synced_write_kept(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"old" * 10)
    fd = vfs.open(p, os.O_RDWR)
    vfs.pwrite(fd, b"NEW", 3)
    vfs.fdatasync(fd)
    vfs.pwrite(fd, b"lost", 0)
    vfs.close(fd)
    vfs.crash()
    assert read(p) == b"oldNEW" + b"old" * 8


def test_sync_through_another_fd_of_the_same_file(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"")
    w = vfs.open(p, os.O_WRONLY)
    r = vfs.open(p, os.O_RDONLY)
    vfs.pwrite(w, b"durable", 0)
    vfs.close(w)
    vfs.fsync(r)
    vfs.crash()
    assert read(p) == b"durable"


def test_unsynced_truncate_preallocate_and_o_trunc_undone(tmp_path):
    vfs = CrashVFS()
    p, q, r = (str(tmp_path / n) for n in "pqr")
    for path in (p, q, r):
        write_file(vfs, path, b"0123456789")
    fd = vfs.open(p, os.O_RDWR)
    vfs.ftruncate(fd, 4)
    vfs.pwrite(fd, b"zz", 8)
    fd = vfs.open(q, os.O_RDWR)
    vfs.preallocate(fd, 1 << 16)
    assert os.path.getsize(q) == 1 << 16
    vfs.open(r, os.O_WRONLY | os.O_TRUNC)
    assert os.path.getsize(r) == 0
    vfs.crash()
    for path in (p, q, r):
        assert read(path) == b"0123456789"


def test_crash_closes_fds_and_vfs_is_reusable(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"one")
    fd = vfs.open(p, os.O_RDWR)
    vfs.crash()
    with pytest.raises(OSError):
        os.fstat(fd)
    write_file(vfs, p, b"two", sync=False)
    vfs.crash()
    assert read(p) == b"one"
    write_file(vfs, p, b"three")
    vfs.crash()
    assert read(p) == b"three"


def test_torn_write_keeps_a_sector_subset(tmp_path):
    nsec = 8
    old = bytes(range(256)) * (nsec * SECTOR_SIZE // 256)
    new = bytes(255 - b for b in old)
    mixed = 0
    for seed in range(20):
        vfs = CrashVFS()
        p = str(tmp_path / f"t{seed}")
        write_file(vfs, p, old)
        fd = vfs.open(p, os.O_RDWR)
        vfs.pwrite(fd, new, 0)
        vfs.crash(torn=True, rng=random.Random(seed))
        got = read(p)
        assert len(got) == len(old)
        kept = 0
        for i in range(nsec):
            sl = slice(i * SECTOR_SIZE, (i + 1) * SECTOR_SIZE)
            assert got[sl] in (old[sl], new[sl])
            kept += got[sl] == new[sl]
        mixed += 0 < kept < nsec
    assert mixed > 0


def test_torn_unaligned_extending_write(tmp_path):
    """Sectors are file-offset aligned; unkept sectors past the old end read as zeros."""
    old = b"o" * 700
    new = b"n" * 2000
    seen_sizes = set()
    for seed in range(30):
        vfs = CrashVFS()
        p = str(tmp_path / f"t{seed}")
        write_file(vfs, p, old)
        fd = vfs.open(p, os.O_RDWR)
        vfs.pwrite(fd, new, 300)
        vfs.crash(torn=True, rng=random.Random(seed))
        got = read(p)
        seen_sizes.add(len(got))
        assert len(got) in (700, 1024, 1536, 2048, 2300)
        for start, end in [(0, 300), (300, 512), (512, 700), (700, 1024), (1024, 1536),
                           (1536, 2048), (2048, 2300)]:
            piece = got[start:end]
            if not piece:
                continue
            allowed = {new[start - 300:end - 300],
                       old[start:end] if start < 700 else b"\0" * (end - start)}
            if start < 300:
                allowed = {old[start:end]}
            assert piece in allowed, (seed, start)
    assert len(seen_sizes) > 1


def test_torn_false_never_keeps_anything(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"a" * 4096)
    fd = vfs.open(p, os.O_RDWR)
    vfs.pwrite(fd, b"b" * 4096, 0)
    vfs.crash(torn=False, rng=random.Random(1))
    assert read(p) == b"a" * 4096


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "sync", "trunc"]),
                          st.integers(0, 3000), st.binary(min_size=1, max_size=1500)),
                max_size=12))
def test_crash_restores_last_synced_state(tmp_path_factory, steps):
    p = str(tmp_path_factory.mktemp("h") / "f")
    vfs = CrashVFS()
    write_file(vfs, p, b"initial")
    durable = b"initial"
    fd = vfs.open(p, os.O_RDWR)
    for kind, offset, data in steps:
        if kind == "write":
            vfs.pwrite(fd, data, offset)
        elif kind == "trunc":
            vfs.ftruncate(fd, offset)
        else:
            vfs.fdatasync(fd)
            durable = read(p)
    vfs.crash()
    assert read(p) == durable


# -- CrashVFS: directory entries -----------------------------------------------------------


def test_created_file_without_dir_fsync_vanishes(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "new")
    write_file(vfs, p, b"data", sync=True, sync_dir=False)
    vfs.crash()
    assert not os.path.exists(p)


def test_created_file_with_dir_fsync_survives(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "new")
    write_file(vfs, p, b"data", sync=True, sync_dir=True)
    vfs.crash()
    assert read(p) == b"data"


def test_created_file_dir_synced_but_data_not(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "new")
    write_file(vfs, p, b"data", sync=False, sync_dir=True)
    vfs.crash()
    assert read(p) == b""


def test_rename_without_dir_fsync_reverted(tmp_path):
    vfs = CrashVFS()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_file(vfs, a, b"A")
    write_file(vfs, b, b"B")
    vfs.rename(a, b)
    assert read(b) == b"A" and not os.path.exists(a)
    vfs.crash()
    assert read(a) == b"A" and read(b) == b"B"
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_rename_with_dir_fsync_kept(tmp_path):
    vfs = CrashVFS()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_file(vfs, a, b"A")
    write_file(vfs, b, b"B")
    vfs.rename(a, b)
    vfs.fsync_dir(str(tmp_path))
    vfs.crash()
    assert read(b) == b"A" and not os.path.exists(a)
    assert os.listdir(tmp_path) == ["b"]


def test_rename_across_directories_needs_both_parents(tmp_path):
    vfs = CrashVFS()
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    write_file(vfs, d1 / "x", b"X")
    vfs.rename(str(d1 / "x"), str(d2 / "x"))
    vfs.fsync_dir(str(d2))
    vfs.crash()
    assert read(d1 / "x") == b"X" and not (d2 / "x").exists()
    vfs.rename(str(d1 / "x"), str(d2 / "x"))
    vfs.fsync_dir(str(d2))
    vfs.fsync_dir(str(d1))
    vfs.crash()
    assert read(d2 / "x") == b"X" and not (d1 / "x").exists()


def test_unlink_without_dir_fsync_restored(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"durable")
    fd = vfs.open(p, os.O_RDWR)
    vfs.unlink(p)
    assert not os.path.exists(p) and vfs.listdir(str(tmp_path)) == []
    vfs.pwrite(fd, b"ghost", 0)  # writes to the unlinked file, never synced
    vfs.crash()
    assert read(p) == b"durable"


def test_unlink_with_dir_fsync_is_permanent(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"durable")
    vfs.unlink(p)
    vfs.fsync_dir(str(tmp_path))
    vfs.crash()
    assert not os.path.exists(p)
    assert os.listdir(tmp_path) == []


def test_shutdown_makes_everything_permanent_and_cleans_up(tmp_path):
    hold = tmp_path / "hold"
    hold.mkdir()
    d = tmp_path / "d"
    d.mkdir()
    vfs = CrashVFS(holding_root=str(hold))
    write_file(vfs, d / "a", b"A")
    fd = vfs.open(str(d / "b"), RW_CREATE)
    vfs.unlink(str(d / "a"))
    assert len(os.listdir(hold)) == 1  # a holding directory on the same filesystem
    vfs.shutdown()
    assert os.listdir(hold) == [] and os.listdir(d) == ["b"]
    vfs.close(fd)
    vfs.crash()  # nothing left to undo
    assert os.listdir(d) == ["b"]


def test_unlink_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        CrashVFS().unlink(str(tmp_path / "nope"))


def test_create_then_unlink_then_dir_fsync(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "tmp")
    write_file(vfs, p, b"t", sync_dir=False)
    vfs.unlink(p)
    vfs.fsync_dir(str(tmp_path))
    vfs.crash()
    assert os.listdir(tmp_path) == []


def test_mkdir_needs_parent_fsync(tmp_path):
    vfs = CrashVFS()
    d = str(tmp_path / "a" / "b")
    vfs.makedirs(d)
    write_file(vfs, os.path.join(d, "f"), b"x")  # syncs d, not its parents
    vfs.crash()
    assert not os.path.exists(tmp_path / "a")
    vfs.makedirs(d)
    vfs.fsync_dir(str(tmp_path / "a"))
    vfs.fsync_dir(str(tmp_path))
    write_file(vfs, os.path.join(d, "f"), b"x")
    vfs.crash()
    assert read(os.path.join(d, "f")) == b"x"


def test_mkdir_tracking_can_be_disabled(tmp_path):
    vfs = CrashVFS(track_mkdir=False)
    vfs.mkdir(str(tmp_path / "d"))
    vfs.crash()
    assert os.path.isdir(tmp_path / "d")


def test_copy_file_is_durable(tmp_path):
    vfs = CrashVFS()
    src, dst = str(tmp_path / "seg"), str(tmp_path / "seg.broken")
    write_file(vfs, src, b"segment bytes")
    vfs.copy_file(src, dst)
    vfs.crash()
    assert read(dst) == b"segment bytes"


def atomic_replace_steps(vfs: VFS, d: str, new: bytes):
    """The write-tmp, fsync, rename, fsync_dir sequence, one step per yield."""
    tmp, final = os.path.join(d, "file.tmp"), os.path.join(d, "file")
    fd = vfs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    yield
    vfs.pwrite(fd, new, 0)
    yield
    vfs.fsync(fd)
    yield
    vfs.close(fd)
    yield
    vfs.rename(tmp, final)
    yield
    vfs.fsync_dir(d)
    yield


@pytest.mark.parametrize("torn", [False, True])
def test_atomic_replace_crash_at_every_step(tmp_path, torn):
    old, new = b"O" * 1500, b"N" * 1300
    nsteps = 6
    for crash_after in range(nsteps + 1):
        d = tmp_path / f"run{crash_after}"
        d.mkdir()
        vfs = CrashVFS()
        write_file(vfs, d / "file", old)
        steps = atomic_replace_steps(vfs, str(d), new)
        for _ in range(crash_after):
            next(steps)
        vfs.crash(torn=torn, rng=random.Random(crash_after))
        assert read(d / "file") == (new if crash_after == nsteps else old)
        assert os.listdir(d) == ["file"]


def test_create_write_fsync_fsync_dir_crash_at_every_step(tmp_path):
    for crash_after in range(5):
        d = str(tmp_path / f"run{crash_after}")
        os.mkdir(d)
        vfs = CrashVFS()
        p = os.path.join(d, "f")
        steps = [
            lambda: vfs.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL),
            lambda: vfs.pwrite(fd, b"payload", 0),
            lambda: vfs.fsync(fd),
            lambda: vfs.fsync_dir(d),
        ]
        fd = -1
        for i, step in enumerate(steps[:crash_after]):
            result = step()
            fd = result if i == 0 else fd
        vfs.crash()
        if crash_after < 4:
            assert os.listdir(d) == []
        else:
            assert read(p) == b"payload"


def test_durable_unlink_makes_the_rename_before_it_durable(tmp_path):
    vfs = CrashVFS()
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    write_file(vfs, d1 / "x", b"X")
    write_file(vfs, d2 / "x", b"old X")
    vfs.rename(str(d1 / "x"), str(d2 / "x"))  # overwrites d2/x
    vfs.unlink(str(d2 / "x"))
    vfs.fsync_dir(str(d2))
    vfs.crash()
    assert os.listdir(d1) == [] and os.listdir(d2) == []


def test_arm_crash_before(tmp_path):
    vfs = CrashVFS()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_file(vfs, a, b"A")
    vfs.arm_crash("rename", 1, when="before")
    with pytest.raises(SimulatedCrash):
        vfs.rename(a, b)
    assert os.path.exists(a) and not os.path.exists(b)  # not performed
    assert vfs.crashed
    with pytest.raises(SimulatedCrash):  # the machine is down until crash()
        vfs.fsync_dir(str(tmp_path))
    vfs.crash()
    assert not vfs.crashed
    assert read(a) == b"A" and not os.path.exists(b)


def test_arm_crash_after(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"old")
    fd = vfs.open(p, os.O_RDWR)
    vfs.pwrite(fd, b"new", 0)
    vfs.arm_crash("fdatasync", 1, when="after")  # fires on fsync too
    with pytest.raises(SimulatedCrash):
        vfs.fsync(fd)
    vfs.crash()
    assert read(p) == b"new"


def test_arm_crash_nth_and_before_sync(tmp_path):
    vfs = CrashVFS()
    p = str(tmp_path / "a")
    write_file(vfs, p, b"")
    fd = vfs.open(p, os.O_RDWR)
    vfs.arm_crash("fsync", 2, when="before")
    vfs.pwrite(fd, b"one", 0)
    vfs.fdatasync(fd)
    vfs.pwrite(fd, b"two", 3)
    with pytest.raises(SimulatedCrash):
        vfs.fdatasync(fd)
    vfs.crash()
    assert read(p) == b"one"


def test_arm_crash_is_not_a_walcrypt_error():
    from walcrypt.errors import WalcryptError

    assert issubclass(SimulatedCrash, Exception)
    assert not issubclass(SimulatedCrash, WalcryptError)
    with pytest.raises(ValueError):
        CrashVFS().arm_crash("pwrite", 1, when="during")


# -- symbolic links ------------------------------------------------------------------------


def _sentinel(tmp_path):
    target = tmp_path / "outside" / "target"
    target.parent.mkdir()
    target.write_bytes(b"target bytes")
    os.chmod(target, 0o644)
    return target


def _intact(target) -> None:
    assert target.read_bytes() == b"target bytes" and stat.S_IMODE(os.stat(target).st_mode) == 0o644


@pytest.mark.parametrize("cls", [VFS, FaultyVFS, CrashVFS])
def test_writes_never_follow_a_link(tmp_path, cls):
    from walcrypt.errors import SymlinkError
    vfs = cls() if cls is VFS else cls(DEFAULT_VFS)
    target = _sentinel(tmp_path)
    link = str(tmp_path / "link")
    os.symlink(target, link)
    for flags in (os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_CREAT, os.O_RDWR | os.O_CREAT | os.O_EXCL):
        with pytest.raises(SymlinkError, match="is a symbolic link"):
            vfs.open(link, flags)
    src = str(tmp_path / "src")
    write_file(DEFAULT_VFS, src, b"new")
    with pytest.raises(SymlinkError):
        vfs.copy_file(src, link)
    with pytest.raises(SymlinkError):
        vfs.rename(src, link)
    assert os.path.islink(link) and os.path.exists(src)
    vfs.unlink(link)                                  # removes the link itself
    assert not os.path.lexists(link)
    _intact(target)
    if cls is CrashVFS:
        vfs.crash()
        _intact(target)


def test_confined_paths_never_follow_any_component(tmp_path):
    """Below a confined data directory no component is followed (reads included); the directory
    itself may be a link."""
    from walcrypt.errors import SymlinkError
    target = _sentinel(tmp_path)
    real = tmp_path / "real-data"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "f").write_bytes(b"mine")
    root = tmp_path / "data"
    os.symlink(real, root)                            # the operator's own link: fine
    (real / "linkdir").symlink_to(target.parent, target_is_directory=True)
    (real / "sub" / "linkfile").symlink_to(target)
    vfs_mod.confine(str(root))
    try:
        assert DEFAULT_VFS.read_file(str(root / "sub" / "f")) == b"mine"
        for p in (root / "linkdir" / "target", root / "sub" / "linkfile"):
            with pytest.raises(SymlinkError):
                DEFAULT_VFS.read_file(str(p))
        for op in (lambda: DEFAULT_VFS.listdir(str(root / "linkdir")),
                   lambda: DEFAULT_VFS.fsync_dir(str(root / "linkdir")),
                   lambda: DEFAULT_VFS.makedirs(str(root / "linkdir" / "x")),
                   lambda: DEFAULT_VFS.mkdir(str(root / "linkdir" / "x")),
                   lambda: DEFAULT_VFS.unlink(str(root / "linkdir" / "target")),
                   lambda: DEFAULT_VFS.rmtree(str(root / "linkdir")),
                   lambda: DEFAULT_VFS.size(str(root / "sub" / "linkfile")),
                   lambda: DEFAULT_VFS.rename(str(root / "sub" / "f"), str(root / "linkdir" / "y"))):
            with pytest.raises(SymlinkError):
                op()
        DEFAULT_VFS.makedirs(str(root / "a" / "b"))
        assert (real / "a" / "b").is_dir()
        assert DEFAULT_VFS.rmtree(str(root / "a")) and not (real / "a").exists()
        assert not DEFAULT_VFS.rmtree(str(root / "missing"))
    finally:
        vfs_mod.release(str(root))
    assert vfs_mod.confined_root(str(root / "sub" / "f")) is None
    _intact(target)
    assert sorted(os.listdir(target.parent)) == ["target"]


def test_pinned_files_interrupted_after_the_hand_over_closes_nothing_twice(tmp_path):
    """An interruption (KeyboardInterrupt) arriving at any line of pinned_files after the descriptors
    were handed to ``keep`` must leave them open for the caller to close: a double close could close
    a descriptor number another thread was given meanwhile (found by the exception-injection test at
    the line after the hand-over)."""
    code = vfs_mod.pinned_files.__wrapped__.__code__
    hand_over = next(n for n, line in enumerate(open(code.co_filename).read().splitlines(), 1)
                     if "keep.extend(fds.values())" in line and n > code.co_firstlineno)
    later_lines = []

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None
        if event == "line" and frame.f_lineno > hand_over and not later_lines:
            later_lines.append(frame.f_lineno)
            raise KeyboardInterrupt("injected after the hand-over")
        return trace

    keep: list[int] = []
    sys.settrace(trace)
    try:
        with pytest.raises(KeyboardInterrupt):
            with vfs_mod.pinned_files(str(tmp_path), ("data.mdb",), writable=True, create=True, keep=keep):
                pass
    finally:
        sys.settrace(None)
    assert later_lines, "the injection point was never reached"
    assert len(keep) == 1
    os.fstat(keep[0])                     # still open: handed over, not closed by pinned_files
    os.close(keep[0])
