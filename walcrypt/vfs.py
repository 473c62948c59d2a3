"""The one seam through which the storage engine touches the filesystem.

Every file operation of the engine goes through a :class:`VFS` object, so tests can
swap in the doubles of :mod:`walcrypt.testing` (``FaultyVFS``: injected errors, short
writes, a full disk; ``CrashVFS``: a power-loss model).  All paths are ``str``; ``fd``
values are real OS file descriptors.

Durability contract (what the engine may rely on, and all it may rely on):

* Bytes written with :meth:`VFS.pwrite`, and size changes made by
  :meth:`VFS.ftruncate` / :meth:`VFS.preallocate` (or ``O_TRUNC``), are durable only
  after a successful :meth:`VFS.fdatasync` or :meth:`VFS.fsync` of that file (any
  fd of the same file).  Until then a power loss may drop them, or, for writes,
  keep any subset of their 512-byte sectors (a torn write).
* A directory entry -- a file created with ``O_CREAT``, a :meth:`VFS.rename`, an
  :meth:`VFS.unlink`, a :meth:`VFS.mkdir` -- is durable only after a successful
  :meth:`VFS.fsync_dir` of its parent directory (both parents for a rename across
  directories).  Syncing a file does not make its name durable.
* A failed fsync guarantees nothing; the caller must treat the data as lost.
* Do not open files with ``O_APPEND``: Linux ignores pwrite offsets on such fds.

``walcrypt.testing.CrashVFS`` enforces exactly this contract and nothing more: its ``crash()``
rewrites the real files into a state a power loss could leave.  Only I/O that goes
through the VFS is tracked (LMDB does its own I/O and is out of scope).

The path rules the VFS applies (no link followed below a data directory, only regular files of
walcrypt's own opened) are :mod:`walcrypt.vfs_paths`; the system calls under it (whole-buffer
pwrite/pread, fallocate(2)) are :mod:`walcrypt.vfs_io`.  The names other modules use from them are
importable from here too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import tempfile
from typing import Iterator

from .errors import SymlinkError, UnsafeFileError
from .vfs_io import LIBC_FALLOCATE as _LIBC_FALLOCATE  # noqa: F401 - tests ask it here whether libc has one
from .vfs_io import NO_FALLOCATE, Buffer, pread_all, pwrite_all
from .vfs_io import fallocate as _fallocate
from .vfs_paths import (
    O_CLOEXEC,
    O_DIRECTORY,
    O_NOFOLLOW,
    O_NONBLOCK,
    confine,
    confined_root,
    open_dir_at,
    open_regular,
    own_file,
    refuse_link,
    refuse_special,
    release,
    set_blocking,
    with_path,
)
from .vfs_paths import located as _located

# ``_located`` and ``_fallocate`` are looked up in this module by the code below, so that a test
# can replace them here (to watch every path the VFS resolves, or to play a file system without
# fallocate).

__all__ = ["VFS", "DEFAULT_VFS", "SECTOR_SIZE",
           "confine", "release", "confined_root", "refuse_link", "open_private", "own_file", "open_regular",
           "create_replacing", "pinned_files"]

SECTOR_SIZE = 512
_COPY_CHUNK = 1 << 20
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC


def open_private(path: str, flags: int = os.O_WRONLY, *, replace_stale: bool = False,
                 detail: str | None = None) -> int:
    """Create a new file (mode 0600) without following a link: ``O_CREAT|O_EXCL|O_NOFOLLOW``.

    A symbolic link at ``path`` is a :class:`SymlinkError` (its target is not touched).  A
    regular file already there is a FileExistsError, or, with ``replace_stale``, unlinked first
    (a temporary file of walcrypt's own left by a crash)."""
    want = flags | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC
    with _located(path) as (dfd, name, full, _):
        for attempt in (1, 2):
            try:
                fd = os.open(name, want, 0o600, dir_fd=dfd)
                break
            except FileExistsError as exc:
                refuse_link(full, dir_fd=dfd, name=name, detail=detail)
                refuse_special(full, dir_fd=dfd, name=name)
                if not replace_stale or attempt == 2:
                    raise with_path(exc, full) from None
                os.unlink(name, dir_fd=dfd)
            except OSError as exc:
                refuse_link(full, dir_fd=dfd, name=name, detail=detail)
                raise with_path(exc, full) from None
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


# fdatasync(2) where the platform has it (not macOS), else fsync.
_fdatasync = getattr(os, "fdatasync", None) or os.fsync


class VFS:
    """The real filesystem (os module). All paths are str.

    Never follows a symbolic link below a confined data directory (see :func:`confine`), nor
    one at a file opened for writing or at a rename destination anywhere: such a link is a
    :class:`~walcrypt.errors.SymlinkError` and its target is left alone."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """Open a regular file.  The open itself never blocks (``O_NONBLOCK``, cleared again once the
        fd is known to be a regular file); a FIFO, device, socket or directory is an
        :class:`~walcrypt.errors.UnsafeFileError`, and so is, when opened for writing, a file that
        another name shares (a hard link): ``O_TRUNC`` is applied only after that check."""
        writing = bool(flags & _WRITE_FLAGS)
        with _located(path) as (dfd, name, full, confined):
            nofollow = confined or writing
            want = (flags & ~os.O_TRUNC) | O_CLOEXEC | O_NONBLOCK | (O_NOFOLLOW if nofollow else 0)
            try:
                fd = os.open(name, want, mode, dir_fd=dfd)
            except OSError as exc:
                if nofollow:
                    refuse_link(full, dir_fd=dfd, name=name)
                refuse_special(full, dir_fd=dfd, name=name)
                raise with_path(exc, full) from None
        try:
            st = own_file(fd, full, exclusive=writing)
            if flags & os.O_TRUNC and st.st_size:
                os.ftruncate(fd, 0)
            if not flags & O_NONBLOCK:
                set_blocking(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> int:
        """Write all of ``data`` at ``offset`` (looping over partial writes); return its length."""
        return pwrite_all(fd, data, offset)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        """Read up to ``n`` bytes at ``offset``; fewer only at end of file."""
        return pread_all(fd, n, offset)

    def fdatasync(self, fd: int) -> None:
        _fdatasync(fd)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def _open_dir(self, path: str) -> int:
        with _located(path) as (dfd, name, full, confined):
            if confined:
                return open_dir_at(name, dfd, full)
            return os.open(full, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)

    def fsync_dir(self, path: str) -> None:
        """Make the entries (creates, renames, unlinks) of directory ``path`` durable."""
        fd = self._open_dir(path)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def preallocate(self, fd: int, length: int) -> None:
        """Reserve ``length`` bytes with fallocate(2) (never shrinks).  Where the file system has
        no fallocate, the size is set with ftruncate (never shrinking) and no block is written."""
        if length <= 0:
            return
        err = _fallocate(fd, length)
        if err == 0:
            return
        if err not in NO_FALLOCATE:
            raise OSError(err, f"fallocate: {os.strerror(err)}")
        if os.fstat(fd).st_size < length:
            os.ftruncate(fd, length)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fstat_size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` by ``src``; a symbolic link at ``dst`` is refused, not replaced."""
        with _located(src) as (sfd, sname, sfull, _), _located(dst) as (dfd, dname, dfull, _):
            refuse_link(dfull, dir_fd=dfd, name=dname)
            try:
                os.replace(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            except OSError as exc:
                exc.filename, exc.filename2 = sfull, dfull
                raise

    def unlink(self, path: str) -> None:
        """Remove a name (a link is removed itself, never its target)."""
        with _located(path) as (dfd, name, full, _):
            try:
                os.unlink(name, dir_fd=dfd)
            except OSError as exc:
                raise with_path(exc, full) from None

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        with _located(path) as (dfd, name, full, _):
            try:
                os.mkdir(name, mode, dir_fd=dfd)
            except OSError as exc:
                refuse_link(full, dir_fd=dfd, name=name)
                raise with_path(exc, full) from None

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        full = os.path.abspath(os.fspath(path))
        root = confined_root(full)
        if root is None:
            refuse_link(full)
            os.makedirs(full, mode, exist_ok=True)
            return
        fd = os.open(root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        try:
            cur = root
            for comp in full[len(root.rstrip(os.sep)) + 1:].split(os.sep):
                cur = os.path.join(cur, comp)
                try:
                    os.mkdir(comp, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise with_path(exc, cur) from None
                nfd = open_dir_at(comp, fd, cur)
                os.close(fd)
                fd = nfd
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        if confined_root(path) is None:
            return os.listdir(path)
        fd = self._open_dir(path)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        """Whether the name exists (below a confined directory: a link counts, unfollowed)."""
        with _located(path) as (dfd, name, full, confined):
            if not confined:
                return os.path.exists(full)
            try:
                os.stat(name, dir_fd=dfd, follow_symlinks=False)
                return True
            except FileNotFoundError:
                return False

    def size(self, path: str) -> int:
        with _located(path) as (dfd, name, full, confined):
            if confined:
                refuse_link(full, dir_fd=dfd, name=name)
            try:
                return os.stat(name, dir_fd=dfd).st_size
            except OSError as exc:
                raise with_path(exc, full) from None

    def rmtree(self, path: str) -> bool:
        """Remove the directory tree at ``path``; False if there is no directory there.

        A symbolic link at ``path`` is a SymlinkError; links inside the tree are removed, never
        followed."""
        with _located(path) as (dfd, name, full, _):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if stat.S_ISLNK(st.st_mode):
                raise SymlinkError(full)
            if not stat.S_ISDIR(st.st_mode):
                return False
            if dfd is not None and sys.version_info >= (3, 11):
                shutil.rmtree(name, dir_fd=dfd)
            else:
                shutil.rmtree(full)        # refuses a link at the top; fd-based below it
            return True

    def read_file(self, path: str) -> bytes:
        fd = self.open(path, os.O_RDONLY)
        try:
            parts, offset = [], 0
            while chunk := self.pread(fd, _COPY_CHUNK, offset):
                parts.append(chunk)
                offset += len(chunk)
            return b"".join(parts)
        finally:
            self.close(fd)

    def copy_file(self, src: str, dst: str) -> None:
        """Copy ``src`` to ``dst`` (mode 0600), then fsync ``dst`` and its directory.

        ``dst`` is created anew (``O_EXCL``), never through a link (a SymlinkError): a file already
        there loses its name first, so a hard link planted at ``dst`` is never written through."""
        sfd = self.open(src, os.O_RDONLY)
        try:
            dfd = create_replacing(self, dst, os.O_WRONLY)
            try:
                os.fchmod(dfd, 0o600)
                offset = 0
                while chunk := self.pread(sfd, _COPY_CHUNK, offset):
                    self.pwrite(dfd, chunk, offset)
                    offset += len(chunk)
                self.fsync(dfd)
            finally:
                self.close(dfd)
        finally:
            self.close(sfd)
        self.fsync_dir(os.path.dirname(os.path.abspath(dst)))


DEFAULT_VFS = VFS()


def create_replacing(vfs: VFS, path: str, flags: int = os.O_WRONLY, mode: int = 0o600) -> int:
    """Create ``path`` anew through ``vfs`` (``O_CREAT|O_EXCL``, never following a link).

    A regular file already there - a stale one of walcrypt's own left by a crash, or a name someone
    planted, a hard link included - is unlinked first (only the name goes; what it names is never
    opened).  A symbolic link there is a SymlinkError, anything else an UnsafeFileError."""
    want = flags | os.O_CREAT | os.O_EXCL
    try:
        return vfs.open(path, want, mode)
    except FileExistsError:
        vfs.unlink(path)
    return vfs.open(path, want, mode)


@contextlib.contextmanager
def pinned_files(directory: str, names: tuple[str, ...], *, writable: bool, create: bool,
                 writable_names: tuple[str, ...] = (), keep: list | None = None) -> Iterator[str]:
    """A directory to hand a library that opens ``directory``'s files ``names`` by name (LMDB).

    Each file is opened here first, without following a link and without blocking, and must be a
    regular file no other name shares (else SymlinkError / UnsafeFileError); it is created (never
    through a link) when ``create``; a file that is missing and not created is left missing.
    Files are opened read-write when ``writable``, and those in ``writable_names`` always (a
    read-only LMDB environment still writes its reader slot into ``lock.mdb``).

    ``keep``: when the block exits normally, the descriptors are appended to this list instead of
    being closed, and the caller closes them after the library closed its own.  LMDB needs that:
    closing *any* descriptor of a file drops every POSIX record lock the process holds on it, and
    LMDB tells whether other processes use ``lock.mdb`` by such locks - a process that lost them is
    taken for gone, and the next one to open the environment re-initialises the lock file under it
    (its reader table and its transaction counter: pages still being read get reused, and the
    writer's transaction IDs start over).
    On Linux the directory yielded is a private temporary one whose entries are links to
    ``/proc/self/fd/N`` of the descriptors opened here: the library reopens exactly the files that
    were checked, whatever is swapped into ``directory`` meanwhile.  Without ``/proc`` the
    directory itself is yielded (a name swapped between this check and the library's own open is
    then followed: FORMAT.md's threat model)."""
    fds: dict[str, int] = {}
    private: str | None = None
    try:
        for name in names:
            flags = (os.O_RDWR if writable or name in writable_names else os.O_RDONLY) | (os.O_CREAT if create else 0)
            try:
                fds[name] = DEFAULT_VFS.open(os.path.join(directory, name), flags | O_NOFOLLOW, 0o600)
            except FileNotFoundError:
                continue
            except UnsafeFileError:
                raise
            except OSError:
                refuse_link(os.path.join(directory, name))
                raise
            own_file(fds[name], os.path.join(directory, name), exclusive=True)     # read-only too: no shared file
        if sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd"):
            private = tempfile.mkdtemp(prefix=".walcrypt-pin-")
            for name, fd in fds.items():
                os.symlink(f"/proc/self/fd/{fd}", os.path.join(private, name))
            yield private
        else:
            yield directory
        if keep is not None:
            keep.extend(fds.values())       # one step: from here on the caller closes them
    finally:
        # Closed here unless handed over: an interruption (KeyboardInterrupt) between the hand-over and
        # the end of the block must not close descriptors the caller will close again (a double close
        # may close a descriptor number another thread has been given meanwhile).
        handed = set(keep) if keep is not None else set()
        for fd in fds.values():
            if fd not in handed:
                os.close(fd)
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
