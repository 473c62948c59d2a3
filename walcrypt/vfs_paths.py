"""Paths below a data directory resolved without following links, and files refused unless they
are regular files of walcrypt's own: the path half of the file-system seam (:mod:`walcrypt.vfs`).

Symbolic links.  Below a data directory this process holds (:func:`confine`), every path is
resolved one component at a time with O_NOFOLLOW from a descriptor of the data directory
(:func:`located`), so no component - file or directory - is ever followed, and a directory swapped
for a link while a path is in use cannot redirect it.  The data directory itself may be a link
(the operator's choice).  Outside confined directories, files opened for writing and rename
destinations are still never followed (:class:`walcrypt.vfs.VFS`).

Other names that are not walcrypt's own file: a FIFO, device, socket or directory where a file
should be is an :class:`~walcrypt.errors.UnsafeFileError` and is never blocked on; so is a file
another name shares (a hard link) where walcrypt writes, truncates or chmods (:func:`own_file`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from typing import Iterator

from .errors import SymlinkError, UnsafeFileError

try:
    import fcntl
except ImportError:                        # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["O_CLOEXEC", "O_NOFOLLOW", "O_DIRECTORY", "O_NONBLOCK",
           "confine", "release", "confined_root", "located", "open_dir_at", "refuse_link", "refuse_special",
           "own_file", "open_regular", "set_blocking", "with_path"]

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


# ---------------------------------------------------------------------------------------
# Confined data directories.

_CONFINED: dict[str, int] = {}
_CONFINED_LOCK = threading.Lock()


def confine(root: str) -> str:
    """Resolve every path below ``root`` without following links until :func:`release`."""
    r = os.path.abspath(os.fspath(root))
    with _CONFINED_LOCK:
        _CONFINED[r] = _CONFINED.get(r, 0) + 1
    return r


def release(root: str) -> None:
    r = os.path.abspath(os.fspath(root))
    with _CONFINED_LOCK:
        n = _CONFINED.get(r, 0) - 1
        if n > 0:
            _CONFINED[r] = n
        else:
            _CONFINED.pop(r, None)


def confined_root(path: str) -> str | None:
    """The confined directory ``path`` lies strictly below (the innermost one), or None."""
    p = os.path.abspath(os.fspath(path))
    best = None
    with _CONFINED_LOCK:
        for r in _CONFINED:
            if p.startswith(r.rstrip(os.sep) + os.sep) and (best is None or len(r) > len(best)):
                best = r
    return best


# ---------------------------------------------------------------------------------------
# Links and names that are not regular files.

def _is_link(name: str, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def refuse_link(path: str, *, dir_fd: int | None = None, name: str | None = None,
                detail: str | None = None) -> None:
    """Raise :class:`SymlinkError` when ``path`` (or ``name`` relative to ``dir_fd``) is a symbolic link."""
    if _is_link(name if name is not None else path, dir_fd):
        raise SymlinkError(path, detail)


_KIND_NAMES = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


def _not_regular(path: str, mode: int) -> UnsafeFileError:
    kind = _KIND_NAMES.get(stat.S_IFMT(mode), "not a regular file")
    return UnsafeFileError(path, "not-regular",
                           f"{path} is {kind}, not a regular file; walcrypt opens only regular files of its "
                           "own there (and never blocks on a FIFO or device): remove it")


def _hard_linked(path: str, nlink: int) -> UnsafeFileError:
    return UnsafeFileError(path, "hard-link",
                           f"{path} has {nlink} hard links (another name shares this file); walcrypt never "
                           "writes, truncates or chmods a file it does not hold alone: remove this name")


def own_file(fd: int, path: str, *, exclusive: bool) -> os.stat_result:
    """``fstat`` of an opened ``fd``: refuse anything but a regular file, and, when ``exclusive``, a
    file that another name shares (a hard link) - an :class:`UnsafeFileError`."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    if exclusive and st.st_nlink != 1:
        raise _hard_linked(path, st.st_nlink)
    return st


def refuse_special(full: str, *, dir_fd: int | None = None, name: str | None = None) -> None:
    """After a failed open: an entry that is neither a regular file nor a link is an UnsafeFileError
    (a FIFO without a writer, a socket: ENXIO; a directory where a file should be: EISDIR/EEXIST)."""
    try:
        st = os.stat(name if name is not None else full, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise _not_regular(full, st.st_mode)


def open_regular(path: str, *, exclusive: bool = False) -> int:
    """Open an operator's file (an export) for reading: links are followed (the operator's path), but
    the open never blocks and anything but a regular file - or, when ``exclusive``, a file another
    name shares - is an :class:`UnsafeFileError`."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NONBLOCK | O_CLOEXEC)
    except OSError:
        refuse_special(os.path.abspath(path))
        raise
    try:
        own_file(fd, path, exclusive=exclusive)
        set_blocking(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_blocking(fd: int) -> None:
    """Clear O_NONBLOCK again (it was only there so a FIFO or device could not block the open)."""
    if fcntl is not None and O_NONBLOCK:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        if fl & O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~O_NONBLOCK)


def with_path(exc: OSError, path: str) -> OSError:
    """``exc`` naming the full ``path`` (not the last component it was opened by)."""
    exc.filename = path
    return exc


# ---------------------------------------------------------------------------------------
# Resolution below a confined directory.

def open_dir_at(name: str, dir_fd: int | None, full: str) -> int:
    """A directory component, never followed."""
    try:
        return os.open(name, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        refuse_link(full, dir_fd=dir_fd, name=name)
        raise with_path(exc, full) from None


@contextlib.contextmanager
def located(path: str) -> Iterator[tuple[int | None, str, str, bool]]:
    """``(dir_fd, name, full path, confined)`` of ``path``.

    Below a confined root, ``dir_fd`` is the parent directory, reached component by component
    without following links, and ``name`` its last component; elsewhere ``(None, path, path, False)``."""
    full = os.path.abspath(os.fspath(path))
    root = confined_root(full)
    if root is None:
        yield None, full, full, False
        return
    parts = full[len(root.rstrip(os.sep)) + 1:].split(os.sep)
    fd = os.open(root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        cur = root
        for comp in parts[:-1]:
            cur = os.path.join(cur, comp)
            prev, fd = fd, open_dir_at(comp, fd, cur)
            os.close(prev)       # after the swap: an interruption here leaks one fd, never closes one twice
        yield fd, parts[-1], full, True
    finally:
        os.close(fd)
