"""``FaultyVFS``: a VFS that injects faults - an ``OSError`` (EIO, ENOSPC, ...) at the k-th call of
an operation, short writes, a full disk - and counts every call by operation.  The base class of
:class:`walcrypt.testing.CrashVFS`."""

from __future__ import annotations

import collections
import errno
import os
import threading
from typing import Any, Callable

from ..vfs import DEFAULT_VFS, VFS
from ..vfs_io import Buffer

__all__ = ["FaultyVFS", "op_category"]


_OPS = frozenset({
    "open", "close", "pwrite", "pread", "fdatasync", "fsync", "fsync_dir", "preallocate",
    "ftruncate", "fstat_size", "rename", "unlink", "mkdir", "makedirs", "listdir",
    "exists", "size", "read_file", "copy_file",
})


def op_category(op: str) -> str:
    """Fault/crash counting category: fsync and fdatasync are counted together."""
    if op not in _OPS:
        raise ValueError(f"unknown VFS op {op!r}; expected one of {sorted(_OPS)}")
    return "fdatasync" if op == "fsync" else op


class FaultyVFS(VFS):
    """Wraps a base VFS and injects faults.  ``calls`` counts every op by name.

    Counting for :meth:`fail_nth` starts at the call: ``n=1`` is the next call of
    ``op``.  ``"fdatasync"`` and ``"fsync"`` share one count.  An injected failure
    raises before the operation does anything.
    """

    def __init__(self, base: VFS | None = None) -> None:
        self.base: VFS = base if base is not None else DEFAULT_VFS
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.RLock()
        self.calls_seen: collections.Counter[str] = collections.Counter()
        self._fail: dict[str, dict[int, int]] = {}
        self._short_next: int | None = None
        self._enospc_budget: int | None = None

    # -- fault configuration -------------------------------------------------------

    def fail_nth(self, op: str, n: int = 1, err: int = errno.EIO) -> None:
        """Make the ``n``-th future call of ``op`` raise ``OSError(err)``."""
        cat = op_category(op)
        if n < 1:
            raise ValueError("n counts from 1 (the next call)")
        with self.lock:
            self._fail.setdefault(cat, {})[self.calls_seen[cat] + n] = err

    def short_write_next(self, nbytes: int) -> None:
        """The next pwrite writes only its first ``nbytes`` bytes, then raises EIO."""
        with self.lock:
            self._short_next = max(0, nbytes)

    def enospc_after(self, nbytes: int) -> None:
        """Allow ``nbytes`` more bytes of pwrite/preallocate growth, then raise ENOSPC.

        The write that crosses the limit writes what fits first.  Every written byte
        counts (overwrites too): it is a budget, not a free-space model.
        """
        with self.lock:
            self._enospc_budget = max(0, nbytes)

    def clear_faults(self) -> None:
        with self.lock:
            self._fail.clear()
            self._short_next = None
            self._enospc_budget = None

    # -- plumbing ------------------------------------------------------------------

    def _run(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        with self.lock:
            n = self._before(op)
            try:
                return fn(*args)
            finally:
                self._check_crash(op_category(op), n, "after")

    def _before(self, op: str) -> int:
        self.calls[op] += 1
        cat = op_category(op)
        self.calls_seen[cat] += 1
        n = self.calls_seen[cat]
        self._check_crash(cat, n, "before")
        err = self._fail.get(cat, {}).pop(n, None)
        if err is not None:
            raise OSError(err, f"{os.strerror(err)} (injected fault: {op} call #{n})")
        return n

    def _check_crash(self, cat: str, n: int, when: str) -> None:
        """Hook for CrashVFS.arm_crash."""

    def _faulty_pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        view = memoryview(data).cast("B")
        limit, err = len(view), 0
        if self._short_next is not None:
            limit, err = min(limit, self._short_next), errno.EIO
            self._short_next = None
        if self._enospc_budget is not None:
            if limit > self._enospc_budget:
                limit, err = self._enospc_budget, errno.ENOSPC
            self._enospc_budget -= limit
        if limit:
            self._write(fd, view[:limit], offset)
        if err:
            raise OSError(err, f"{os.strerror(err)} (injected: wrote {limit} of {len(view)} bytes"
                               f" at offset {offset})")
        return len(view)

    def _faulty_preallocate(self, fd: int, length: int) -> None:
        if self._enospc_budget is not None:
            growth = max(0, length - self.base.fstat_size(fd))
            if growth > self._enospc_budget:
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: preallocate)")
            self._enospc_budget -= growth
        self._preallocate(fd, length)

    # Primitive hooks; CrashVFS overrides these to track durability.
    def _open(self, path: str, flags: int, mode: int) -> int: return self.base.open(path, flags, mode)
    def _close(self, fd: int) -> None: self.base.close(fd)
    def _write(self, fd: int, view: memoryview, offset: int) -> None: self.base.pwrite(fd, view, offset)
    def _fdatasync(self, fd: int) -> None: self.base.fdatasync(fd)
    def _fsync(self, fd: int) -> None: self.base.fsync(fd)
    def _fsync_dir(self, path: str) -> None: self.base.fsync_dir(path)
    def _preallocate(self, fd: int, length: int) -> None: self.base.preallocate(fd, length)
    def _ftruncate(self, fd: int, length: int) -> None: self.base.ftruncate(fd, length)
    def _rename(self, src: str, dst: str) -> None: self.base.rename(src, dst)
    def _unlink(self, path: str) -> None: self.base.unlink(path)
    def _mkdir(self, path: str, mode: int) -> None: self.base.mkdir(path, mode)
    def _makedirs(self, path: str, mode: int) -> None: self.base.makedirs(path, mode)
    def _listdir(self, path: str) -> list[str]: return self.base.listdir(path)

    # -- the VFS interface -----------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return self._run("open", self._open, path, flags, mode)

    def close(self, fd: int) -> None:
        self._run("close", self._close, fd)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        return self._run("pwrite", self._faulty_pwrite, fd, data, offset)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return self._run("pread", self.base.pread, fd, n, offset)

    def fdatasync(self, fd: int) -> None:
        self._run("fdatasync", self._fdatasync, fd)

    def fsync(self, fd: int) -> None:
        self._run("fsync", self._fsync, fd)

    def fsync_dir(self, path: str) -> None:
        self._run("fsync_dir", self._fsync_dir, path)

    def preallocate(self, fd: int, length: int) -> None:
        self._run("preallocate", self._faulty_preallocate, fd, length)

    def ftruncate(self, fd: int, length: int) -> None:
        self._run("ftruncate", self._ftruncate, fd, length)

    def fstat_size(self, fd: int) -> int:
        return self._run("fstat_size", self.base.fstat_size, fd)

    def rename(self, src: str, dst: str) -> None:
        self._run("rename", self._rename, src, dst)

    def unlink(self, path: str) -> None:
        self._run("unlink", self._unlink, path)

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        self._run("mkdir", self._mkdir, path, mode)

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        self._run("makedirs", self._makedirs, path, mode)

    def listdir(self, path: str) -> list[str]:
        return self._run("listdir", self._listdir, path)

    def exists(self, path: str) -> bool:
        return self._run("exists", self.base.exists, path)

    def size(self, path: str) -> int:
        return self._run("size", self.base.size, path)

    def read_file(self, path: str) -> bytes:
        return self._run("read_file", super().read_file, path)

    def copy_file(self, src: str, dst: str) -> None:
        self._run("copy_file", super().copy_file, src, dst)
