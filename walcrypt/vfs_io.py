"""The system calls under the file-system seam (:mod:`walcrypt.vfs`): whole-buffer ``pwrite`` and
``pread`` loops, and fallocate(2) itself.

Nothing here makes anything durable; that is the VFS's contract (``fdatasync``/``fsync`` of the
file, ``fsync_dir`` of its directory)."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Callable, Union

__all__ = ["Buffer", "pwrite_all", "pread_all", "LIBC_FALLOCATE", "NO_FALLOCATE", "fallocate"]

Buffer = Union[bytes, bytearray, memoryview]

#: The errors of fallocate that mean "this file system has no fallocate" (not "no space").
NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


def pwrite_all(fd: int, data: Buffer, offset: int) -> int:
    """Write all of ``data`` at ``offset``, looping over partial writes; return its length."""
    if type(data) is bytes:                 # the common case: one pwrite writes it all
        n = os.pwrite(fd, data, offset)
        if n == len(data):
            return n
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite made no progress at offset {offset}")
        return n + pwrite_all(fd, memoryview(data)[n:], offset + n)
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite made no progress at offset {offset + done}")
        done += n
    return len(view)


def pread_all(fd: int, n: int, offset: int) -> bytes:
    """Read ``n`` bytes at ``offset``, looping over partial reads; fewer only at end of file."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------
# fallocate(2)

def _load_fallocate() -> Callable[..., int] | None:
    """The C library's fallocate (64-bit offsets), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name in ("fallocate64", "fallocate"):
        fn = getattr(libc, name, None)
        if fn is None or (name == "fallocate" and ctypes.sizeof(ctypes.c_long) < 8):
            continue                       # plain fallocate takes a 32-bit off_t on 32-bit glibc
        fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        fn.restype = ctypes.c_int
        return fn
    return None


LIBC_FALLOCATE = _load_fallocate()


def fallocate(fd: int, length: int) -> int:
    """``fallocate(fd, 0, 0, length)``: 0 on success, else the errno (ENOSYS without the call).

    The system call itself, never glibc's ``posix_fallocate``: on a file system without
    fallocate that one writes a byte into every block of the range (through FUSE, one request
    per 4 KiB block: seconds per segment)."""
    if LIBC_FALLOCATE is None:
        return errno.ENOSYS
    while True:
        if LIBC_FALLOCATE(fd, 0, 0, length) == 0:
            return 0
        err = ctypes.get_errno()
        if err != errno.EINTR:
            return err
