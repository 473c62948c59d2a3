"""A power-loss filesystem for tests: a FUSE pass-through that keeps everything not yet fsynced in
memory and drops it on command (the idea of LazyFS, the tool etcd's robustness suite uses for
power cuts), written in Python on mfusepy (libfuse3).

    python tests/powerloss/lazyfs.py BACKING MOUNTPOINT --control SOCKET [--no-fallocate]

mounts BACKING at MOUNTPOINT (in the foreground; stop it with ``fusermount3 -u MOUNTPOINT``) and
answers JSON lines on the Unix socket SOCKET (see :class:`LazyFSClient` and ``tests/powerloss/harness.py``).
With ``--no-fallocate`` it answers fallocate with EOPNOTSUPP, as file systems without it do (the
``writes`` counter then shows whether a client emulates it by writing every block).

Model (the durability contract of ``walcrypt/vfs.py``, applied to every process that uses the
mount, LMDB included):

* **File data.**  Writes, truncates and fallocate size changes go to an in-memory overlay of the
  file (4 KiB pages plus a size and a truncation floor: a page-cache emulation) that readers -
  read(), and mmap through the kernel's page cache - see.  ``fsync``/``fdatasync`` of the file
  (any handle) writes its overlay to the backing file.  A write through a handle opened with
  ``O_SYNC``/``O_DSYNC`` (LMDB's meta page) is applied at once.
* **Directory entries.**  create, mkdir, unlink, rmdir and rename are applied to the backing
  directory at once (a removed or replaced entry is moved to a hidden trash directory instead of
  being deleted) and logged; an entry operation becomes durable once every directory it touched
  (both parents for a rename) has been fsynced (``fsyncdir``) after it.  Syncing a file does not
  make its name durable.
* **A power cut** (``crash``): every logged entry operation that is not durable is undone, newest
  first (a created file or directory is removed with everything below it; an unlinked, removed or
  replaced entry comes back), and every file overlay is dropped.  ``crash torn SEED`` first keeps
  a random subset of the unsynced 512-byte sectors of each file (a torn write), then does the same.
* **A power cut at a chosen moment** (``arm N``, or ``arm N torn SEED``): the N-th durability
  point from now (an fsync or fdatasync of a file, an fsyncdir, or an O_SYNC/O_DSYNC write; the
  kernel follows each O_DSYNC write with an fsync, which counts too) does not happen; instead the
  filesystem cuts the power just before it and *freezes*: that call and every later mutating call
  fails with EIO (reads still work) until ``thaw``.  Stepping N over 1, 2, 3, ... crashes a
  multi-step operation at every one of its durability points.
* ``sync`` makes everything durable (like sync(1)); unmounting does the same (a clean shutdown).

Control commands (one line each; every answer is one JSON line with the counters and ``ok``):
``ping``, ``stats``, ``crash``, ``crash torn SEED``, ``sync``, ``arm N [torn SEED]``, ``disarm``,
``thaw``, ``reset-stats``.

What is not modelled: metadata other than size and names (mode, owner, times are passed through at
once), hard links, symlinks, xattrs, rename flags other than RENAME_NOREPLACE.

Kernel caches: the mount uses entry/attr/negative timeouts of 0, no kernel_cache and no
writeback cache, so readers ask this process for names, sizes and data; the kernel drops a file's
page cache when the file is opened again, so a process that opens a file after a power cut sees the
durable contents.  ``direct_io`` is not used because it rules out the shared mmap LMDB needs.
A process that keeps a file open or mapped across a power cut can still see its old page cache:
cut the power after the writers died (the tests SIGKILL the child and reap it first; a child's
requests that reached this process are answered before the kernel lets it die).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import random
import shutil
import socket
import stat
import sys
import threading
import traceback

PAGE = 4096
SECTOR = 512
TRASH = ".lazyfs-trash"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FUSE_CAP_WRITEBACK_CACHE = 1 << 16


# ----------------------------------------------------------------------------------------- the model

class Inode:
    """Volatile state of one backing file (keyed by (st_dev, st_ino), so it follows renames)."""

    __slots__ = ("key", "fd", "refs", "size", "floor", "pages", "name")

    def __init__(self, key, fd: int, name: str = ""):
        self.key = key
        self.name = name             # the mount path it was last opened under (for reports)
        self.fd = fd                 # O_RDWR (or O_RDONLY) descriptor of the backing file
        self.refs = 0                # open FUSE handles
        self.size = os.fstat(fd).st_size   # the size readers see
        self.floor = self.size       # backing bytes at or past floor read as zeros (a truncate happened)
        self.pages: dict[int, bytearray] = {}   # page number -> PAGE bytes, the volatile contents

    def durable_size(self) -> int:
        return os.fstat(self.fd).st_size

    @property
    def dirty(self) -> bool:
        durable = self.durable_size()
        return bool(self.pages) or self.size != durable or self.floor < durable

    def _base(self, pno: int) -> bytearray:
        """The contents page ``pno`` had before any unsynced change (zeros past the floor)."""
        off = pno * PAGE
        if off >= self.floor:
            return bytearray(PAGE)
        raw = os.pread(self.fd, PAGE, off)
        if off + len(raw) > self.floor:
            raw = raw[:self.floor - off]
        return bytearray(raw.ljust(PAGE, b"\0"))

    def read(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        if not self.pages and end <= self.floor:
            return os.pread(self.fd, end - offset, offset).ljust(end - offset, b"\0")
        out = bytearray()
        pos = offset
        while pos < end:                                   # bounded: pos grows by at least 1 each pass
            pno = pos // PAGE
            page = self.pages.get(pno)
            if page is None:
                # a run of clean pages: one pread, bounded by the floor
                stop = pos
                while stop < end and (stop // PAGE) not in self.pages:
                    stop = min(end, (stop // PAGE + 1) * PAGE)
                clean_end = min(stop, max(pos, self.floor))
                if clean_end > pos:
                    raw = os.pread(self.fd, clean_end - pos, pos)
                    out += raw.ljust(clean_end - pos, b"\0")
                out += bytes(stop - max(pos, clean_end))
                pos = stop
            else:
                stop = min(end, (pno + 1) * PAGE)
                out += page[pos - pno * PAGE:stop - pno * PAGE]
                pos = stop
        return bytes(out)

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        pos, end = offset, offset + len(data)
        while pos < end:
            pno = pos // PAGE
            lo = pos - pno * PAGE
            hi = min(PAGE, end - pno * PAGE)
            page = self.pages.get(pno)
            if page is None:
                page = bytearray(PAGE) if (lo == 0 and hi == PAGE) else self._base(pno)
                self.pages[pno] = page
            page[lo:hi] = view[pos - offset:pos - offset + hi - lo]
            pos = pno * PAGE + hi
        self.size = max(self.size, end)

    def truncate(self, length: int) -> None:
        if length < self.size:
            self.floor = min(self.floor, length)
            last = length // PAGE
            for pno in [p for p in self.pages if p > last or (p == last and length % PAGE == 0)]:
                del self.pages[pno]
            page = self.pages.get(last)
            if page is not None:
                page[length - last * PAGE:] = bytes(PAGE - (length - last * PAGE))
        self.size = length

    def sync(self) -> int:
        """Make the overlay durable (fsync).  Returns the number of bytes written to the backing file."""
        n = 0
        if self.floor < self.durable_size():
            os.ftruncate(self.fd, self.floor)
        for pno in sorted(self.pages):
            off = pno * PAGE
            if off >= self.size:
                continue
            chunk = self.pages[pno][:min(PAGE, self.size - off)]
            os.pwrite(self.fd, chunk, off)
            n += len(chunk)
        if self.durable_size() != self.size:
            os.ftruncate(self.fd, self.size)
        self.pages.clear()
        self.floor = self.size
        return n

    def tear(self, rng: random.Random) -> int:
        """Power cut keeping a random subset of the unsynced sectors (and maybe the truncation)."""
        kept = 0
        durable = self.durable_size()
        if self.floor < durable and rng.random() < 0.5:
            os.ftruncate(self.fd, self.floor)
            durable = self.floor
        for pno in sorted(self.pages):
            page = self.pages[pno]
            for s in range(0, PAGE, SECTOR):
                off = pno * PAGE + s
                if off >= self.size or rng.random() >= 0.5:
                    continue
                chunk = page[s:min(s + SECTOR, self.size - off)]
                os.pwrite(self.fd, chunk, off)
                kept += len(chunk)
        return kept

    def drop(self) -> int:
        """Power cut: forget every unsynced change.  Returns the number of dirty bytes dropped."""
        dropped = len(self.pages) * PAGE + abs(self.size - self.durable_size())
        self.pages.clear()
        self.size = self.floor = self.durable_size()
        return dropped


class NsOp:
    """One directory-entry operation, durable once every directory in ``pending`` was fsynced."""

    __slots__ = ("kind", "src", "dst", "trash", "replaced", "pending", "is_dir")

    def __init__(self, kind, src, dst=None, trash=None, replaced=None, is_dir=False):
        self.kind = kind            # create | mkdir | unlink | rmdir | rename
        self.src = src              # (dir key, name)
        self.dst = dst              # (dir key, name) for rename
        self.trash = trash          # trash name of the removed entry (unlink, rmdir)
        self.replaced = replaced    # trash name of the entry a rename replaced
        self.is_dir = is_dir
        self.pending = {src[0]} | ({dst[0]} if dst else set())


def _errno(e: int):
    return OSError(e, os.strerror(e))


def op(mutating: bool = False):
    """Wrap a FUSE operation: serialise, refuse mutations while frozen, count internal errors."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *args):
            with self._mutex:
                if mutating and self.frozen:
                    self.stats["refused_frozen"] += 1
                    raise _errno(errno.EIO)
                try:
                    return fn(self, *args)
                except OSError:
                    raise
                except Exception:                    # a bug in this file: report it, fail the call
                    self.stats["internal_errors"] += 1
                    sys.stderr.write(f"lazyfs: internal error in {fn.__name__}{args!r}:\n{traceback.format_exc()}")
                    sys.stderr.flush()
                    raise _errno(errno.EIO) from None
        return wrapper
    return deco


class LazyFS:
    """The operations (mfusepy ``Operations`` protocol with raw_fi=True)."""

    use_ns = True

    def __init__(self, backing: str, *, fallocate: bool = True):
        self.backing = os.path.realpath(backing)
        self.fallocate_supported = fallocate
        self.trash_dir = os.path.join(self.backing, TRASH)
        if os.path.isdir(self.trash_dir):
            shutil.rmtree(self.trash_dir)
        os.mkdir(self.trash_dir, 0o700)
        self._mutex = threading.RLock()
        self.inodes: dict[tuple, Inode] = {}
        self.handles: dict[int, tuple[Inode, int]] = {}
        self.next_fh = 1
        self.next_trash = 0
        self.ops: list[NsOp] = []
        self.dirs: dict[tuple, tuple] = {}
        st = os.lstat(self.backing)
        self.root_key = (st.st_dev, st.st_ino)
        self.frozen = False
        self.armed: int | None = None
        self.armed_seed: int | None = None      # an armed power cut that tears (crash torn SEED)
        self.mounted = False
        self.stats = {k: 0 for k in (
            "writes", "write_bytes", "fsyncs", "fdatasyncs", "fsyncdirs", "sync_writes", "sync_points",
            "synced_bytes", "ns_ops", "ns_ops_durable", "crashes", "refused_frozen", "internal_errors",
            "anomalies", "fallocates")}
        self.last_crash: dict = {}

    # ------------------------------------------------------------------ paths and keys
    def real(self, path: str) -> str:
        if path is None:
            raise _errno(errno.ESTALE)
        rel = path.lstrip("/")
        if rel == TRASH or rel.startswith(TRASH + "/"):
            raise _errno(errno.ENOENT)
        return os.path.join(self.backing, rel)

    @staticmethod
    def _key(st) -> tuple:
        return (st.st_dev, st.st_ino)

    def _dir_key(self, path: str) -> tuple:
        """Key of the directory ``path`` (mount-relative), registering it and its ancestors."""
        parent = self.root_key
        cur = self.backing
        for name in [p for p in path.split("/") if p]:
            cur = os.path.join(cur, name)
            k = self._key(os.lstat(cur))
            self.dirs[k] = (parent, name)
            parent = k
        return parent

    def _entry(self, path: str) -> tuple:
        """(parent directory key, name) of a mount-relative path."""
        parent, name = os.path.split(path.rstrip("/"))
        return (self._dir_key(parent), name)

    def _dir_path(self, key) -> str | None:
        names = []
        for _ in range(4096):                              # bounded by the depth of the tree
            if key == self.root_key:
                return os.path.join(self.backing, *reversed(names))
            if key not in self.dirs:
                return None
            key, name = self.dirs[key][0], self.dirs[key][1]
            names.append(name)
        return None

    def _entry_path(self, entry) -> str | None:
        d = self._dir_path(entry[0])
        return None if d is None else os.path.join(d, entry[1])

    def _to_trash(self, real_path: str) -> str:
        """Move an entry to the trash (keeping its inode alive); returns its trash name."""
        name = f"t{self.next_trash}"
        self.next_trash += 1
        st = os.lstat(real_path)
        os.rename(real_path, os.path.join(self.trash_dir, name))
        if stat.S_ISDIR(st.st_mode):
            self._moved_dir(self._key(st), self._trash_key(), name)
        return name

    def _trash_key(self) -> tuple:
        k = self._key(os.lstat(self.trash_dir))
        self.dirs[k] = (self.root_key, TRASH)
        return k

    def _moved_dir(self, key, parent_key, name) -> None:
        self.dirs[key] = (parent_key, name)

    def _log(self, nsop: NsOp) -> None:
        self.ops.append(nsop)
        self.stats["ns_ops"] += 1

    # ------------------------------------------------------------------ inodes and handles
    def _inode_for(self, real_path: str) -> Inode:
        st = os.lstat(real_path)
        key = self._key(st)
        ino = self.inodes.get(key)
        if ino is None:
            try:
                fd = os.open(real_path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                fd = os.open(real_path, os.O_RDONLY | os.O_CLOEXEC)
            ino = Inode(key, fd)
            self.inodes[key] = ino
        ino.name = "/" + os.path.relpath(real_path, self.backing)
        return ino

    def _new_handle(self, ino: Inode, flags: int) -> int:
        fh = self.next_fh
        self.next_fh += 1
        ino.refs += 1
        self.handles[fh] = (ino, flags)
        return fh

    def _handle(self, fi) -> tuple[Inode, int]:
        h = self.handles.get(fi.fh if fi is not None else 0)
        if h is None:
            raise _errno(errno.EBADF)
        return h

    def _maybe_forget(self, ino: Inode) -> None:
        if ino.refs == 0 and not ino.dirty:
            os.close(ino.fd)
            del self.inodes[ino.key]

    def _sync_point(self) -> None:
        """A durability point: counts towards an armed power cut, which happens just before it."""
        self.stats["sync_points"] += 1
        if self.armed is not None:
            self.armed -= 1
            if self.armed <= 0:
                self.armed = None
                self._crash(self.armed_seed)
                self.frozen = True
                raise _errno(errno.EIO)

    # ------------------------------------------------------------------ FUSE: lifecycle
    def init_with_config(self, conn, config) -> None:
        if config is not None:
            config.entry_timeout = 0.0
            config.negative_timeout = 0.0
            config.attr_timeout = 0.0
            config.hard_remove = 1           # unlink of an open file is an unlink, not a rename to .fuse_hidden
            config.kernel_cache = 0
            config.auto_cache = 0
            config.direct_io = 0
        if conn is not None:
            conn.want &= ~FUSE_CAP_WRITEBACK_CACHE
        self.mounted = True

    def destroy(self, path) -> None:
        """Unmount: a clean shutdown makes everything durable."""
        with self._mutex:
            self.frozen = False
            self._sync_all()
            shutil.rmtree(self.trash_dir, ignore_errors=True)
            for ino in list(self.inodes.values()):
                os.close(ino.fd)
            self.inodes.clear()
            self.handles.clear()
            self.mounted = False

    # ------------------------------------------------------------------ FUSE: attributes
    @op()
    def getattr(self, path, fi=None):
        if fi is not None and fi.fh in self.handles:
            ino = self.handles[fi.fh][0]
            st = os.fstat(ino.fd)
        else:
            st = os.lstat(self.real(path))
            ino = self.inodes.get(self._key(st))
        d = {k: getattr(st, k) for k in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")}
        d["st_atime"], d["st_mtime"], d["st_ctime"] = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        if ino is not None and stat.S_ISREG(st.st_mode):
            d["st_size"] = ino.size
            d["st_blocks"] = (ino.size + 511) // 512
        return d

    @op()
    def statfs(self, path):
        sv = os.statvfs(self.backing)
        return {k: getattr(sv, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                                            "f_ffree", "f_favail", "f_flag", "f_namemax")}

    @op(mutating=True)
    def chmod(self, path, mode):
        os.chmod(self.real(path), mode)
        return 0

    @op(mutating=True)
    def chown(self, path, uid, gid):
        os.chown(self.real(path), uid, gid)
        return 0

    @op(mutating=True)
    def utimens(self, path, times=None):
        os.utime(self.real(path), ns=times) if times else os.utime(self.real(path))
        return 0

    # ------------------------------------------------------------------ FUSE: directories
    @op()
    def opendir(self, path):
        if not os.path.isdir(self.real(path)):
            raise _errno(errno.ENOTDIR)
        return 0

    @op()
    def readdir(self, path, fh):
        names = os.listdir(self.real(path))
        if path.strip("/") == "":
            names = [n for n in names if n != TRASH]
        return [".", ".."] + names

    @op()
    def releasedir(self, path, fh):
        return 0

    @op(mutating=True)
    def fsyncdir(self, path, datasync, fh):
        self.stats["fsyncdirs"] += 1
        self._sync_point()
        key = self._key(os.lstat(self.real(path)))
        keep = []
        for nsop in self.ops:
            nsop.pending.discard(key)
            if nsop.pending:
                keep.append(nsop)
            else:
                self.stats["ns_ops_durable"] += 1
        self.ops = keep
        return 0

    @op(mutating=True)
    def mkdir(self, path, mode):
        real = self.real(path)
        entry = self._entry(path)
        os.mkdir(real, mode & 0o7777)
        self._log(NsOp("mkdir", entry, is_dir=True))
        return 0

    @op(mutating=True)
    def rmdir(self, path):
        real = self.real(path)
        if not os.path.isdir(real) or os.path.islink(real):
            raise _errno(errno.ENOTDIR)
        if os.listdir(real):
            raise _errno(errno.ENOTEMPTY)
        entry = self._entry(path)
        self._log(NsOp("rmdir", entry, trash=self._to_trash(real), is_dir=True))
        return 0

    # ------------------------------------------------------------------ FUSE: names
    @op(mutating=True)
    def create(self, path, mode, fi):
        real = self.real(path)
        entry = self._entry(path)
        fd = os.open(real, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, mode & 0o7777)
        os.close(fd)
        self._log(NsOp("create", entry))
        ino = self._inode_for(real)
        if fi.flags & os.O_TRUNC:
            ino.truncate(0)
        fi.fh = self._new_handle(ino, fi.flags)
        return 0

    @op(mutating=True)
    def unlink(self, path):
        real = self.real(path)
        if os.path.isdir(real) and not os.path.islink(real):
            raise _errno(errno.EISDIR)
        entry = self._entry(path)
        self._log(NsOp("unlink", entry, trash=self._to_trash(real)))
        return 0

    @op(mutating=True)
    def rename(self, old, new, flags=0):
        src_real, dst_real = self.real(old), self.real(new)
        if flags & RENAME_EXCHANGE:
            raise _errno(errno.EINVAL)
        sst = os.lstat(src_real)
        src, dst = self._entry(old), self._entry(new)
        replaced = None
        try:
            dstat = os.lstat(dst_real)
        except FileNotFoundError:
            dstat = None
        if dstat is not None:
            if flags & RENAME_NOREPLACE:
                raise _errno(errno.EEXIST)
            if self._key(dstat) == self._key(sst):
                return 0
            if stat.S_ISDIR(sst.st_mode) != stat.S_ISDIR(dstat.st_mode):
                raise _errno(errno.EISDIR if stat.S_ISDIR(dstat.st_mode) else errno.ENOTDIR)
            if stat.S_ISDIR(dstat.st_mode) and os.listdir(dst_real):
                raise _errno(errno.ENOTEMPTY)
            replaced = self._to_trash(dst_real)
        try:
            os.rename(src_real, dst_real)
        except OSError:
            if replaced is not None:
                os.rename(os.path.join(self.trash_dir, replaced), dst_real)
            raise
        if stat.S_ISDIR(sst.st_mode):
            self._moved_dir(self._key(sst), dst[0], dst[1])
        self._log(NsOp("rename", src, dst=dst, replaced=replaced, is_dir=stat.S_ISDIR(sst.st_mode)))
        return 0

    def link(self, target, source):
        raise _errno(errno.EPERM)

    def symlink(self, target, source):
        raise _errno(errno.EPERM)

    # ------------------------------------------------------------------ FUSE: files
    @op()
    def open(self, path, fi):
        real = self.real(path)
        if fi.flags & os.O_TRUNC and self.frozen:
            raise _errno(errno.EIO)
        ino = self._inode_for(real)
        if fi.flags & os.O_TRUNC and (fi.flags & os.O_ACCMODE) != os.O_RDONLY:
            ino.truncate(0)
        fi.fh = self._new_handle(ino, fi.flags)
        return 0

    @op()
    def read(self, path, size, offset, fi):
        ino, _flags = self._handle(fi)
        return ino.read(size, offset)

    @op(mutating=True)
    def write(self, path, data, offset, fi):
        ino, flags = self._handle(fi)
        if flags & (os.O_SYNC | os.O_DSYNC):
            self.stats["sync_writes"] += 1
            self._sync_point()
        ino.write(data, offset)
        self.stats["writes"] += 1
        self.stats["write_bytes"] += len(data)
        if flags & (os.O_SYNC | os.O_DSYNC):
            self.stats["synced_bytes"] += ino.sync()
        return len(data)

    @op(mutating=True)
    def truncate(self, path, length, fi=None):
        if fi is not None and fi.fh in self.handles:
            ino = self.handles[fi.fh][0]
            ino.truncate(length)
            return 0
        ino = self._inode_for(self.real(path))
        ino.truncate(length)
        self._maybe_forget(ino)
        return 0

    @op(mutating=True)
    def fallocate(self, path, mode, offset, size, fi):
        self.stats["fallocates"] += 1
        if mode != 0 or not self.fallocate_supported:
            raise _errno(errno.EOPNOTSUPP)
        ino, _flags = self._handle(fi)
        if offset + size > ino.size:
            ino.truncate(offset + size)
        return 0

    @op(mutating=True)
    def fsync(self, path, datasync, fi):
        ino, _flags = self._handle(fi)
        self.stats["fdatasyncs" if datasync else "fsyncs"] += 1
        self._sync_point()
        self.stats["synced_bytes"] += ino.sync()
        return 0

    @op()
    def flush(self, path, fi):
        return 0

    @op()
    def release(self, path, fi):
        h = self.handles.pop(fi.fh, None)
        if h is not None:
            h[0].refs -= 1
            self._maybe_forget(h[0])
        return 0

    # ------------------------------------------------------------------ power cuts
    def _undo(self, nsop: NsOp) -> None:
        trash = self.trash_dir
        if nsop.kind in ("create", "mkdir"):
            p = self._entry_path(nsop.src)
            if p is None or not os.path.lexists(p):
                self.stats["anomalies"] += 1
                return
            self._to_trash(p)                            # with everything below it
        elif nsop.kind in ("unlink", "rmdir"):
            p = self._entry_path(nsop.src)
            if p is None or os.path.lexists(p):
                self.stats["anomalies"] += 1
                return
            os.rename(os.path.join(trash, nsop.trash), p)
            if nsop.is_dir:
                self._moved_dir(self._key(os.lstat(p)), nsop.src[0], nsop.src[1])
        elif nsop.kind == "rename":
            s, d = self._entry_path(nsop.src), self._entry_path(nsop.dst)
            if s is None or d is None or not os.path.lexists(d) or os.path.lexists(s):
                self.stats["anomalies"] += 1
                return
            os.rename(d, s)
            if nsop.is_dir:
                self._moved_dir(self._key(os.lstat(s)), nsop.src[0], nsop.src[1])
            if nsop.replaced is not None:
                os.rename(os.path.join(trash, nsop.replaced), d)
                st = os.lstat(d)
                if stat.S_ISDIR(st.st_mode):
                    self._moved_dir(self._key(st), nsop.dst[0], nsop.dst[1])

    def _purge_trash(self) -> None:
        for name in os.listdir(self.trash_dir):
            p = os.path.join(self.trash_dir, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        self.dirs.clear()

    def _crash(self, seed: int | None) -> dict:
        rng = random.Random(seed) if seed is not None else None
        undone = 0
        for nsop in reversed(self.ops):
            self._undo(nsop)
            undone += 1
        self.ops = []
        kept = dropped = files = 0
        torn: dict[str, int] = {}
        for ino in list(self.inodes.values()):
            if ino.dirty:
                files += 1
                if rng is not None:
                    k = ino.tear(rng)
                    kept += k
                    if k:
                        torn[ino.name] = k
                dropped += ino.drop()
            self._maybe_forget(ino)
        self._purge_trash()
        self.stats["crashes"] += 1
        self.last_crash = {"undone_ns_ops": undone, "dirty_files": files, "dropped_bytes": dropped,
                           "torn_kept_bytes": kept, "torn": seed is not None, "torn_files": torn}
        return self.last_crash

    def _sync_all(self) -> None:
        for ino in list(self.inodes.values()):
            if ino.dirty:
                self.stats["synced_bytes"] += ino.sync()
            self._maybe_forget(ino)
        self.stats["ns_ops_durable"] += len(self.ops)
        self.ops = []
        self._purge_trash()

    def snapshot_stats(self) -> dict:
        dirty = [i for i in self.inodes.values() if i.dirty]
        return dict(self.stats, dirty_files=len(dirty), dirty_pages=sum(len(i.pages) for i in dirty),
                    pending_ns_ops=len(self.ops), open_handles=len(self.handles), frozen=self.frozen,
                    armed=self.armed, mounted=self.mounted, last_crash=self.last_crash)

    # ------------------------------------------------------------------ control channel
    def control(self, line: str) -> dict:
        words = line.split()
        cmd = words[0] if words else ""
        with self._mutex:
            if cmd == "ping" or cmd == "stats":
                pass
            elif cmd == "crash":
                seed = int(words[2]) if len(words) >= 3 and words[1] == "torn" else None
                self._crash(seed)
            elif cmd == "sync":
                self._sync_all()
            elif cmd == "arm":                          # arm N [torn SEED]
                if int(words[1]) < 1:
                    raise ValueError("arm N needs N >= 1")
                self.armed = int(words[1])
                self.armed_seed = int(words[3]) if len(words) >= 4 and words[2] == "torn" else None
            elif cmd == "disarm":
                self.armed = None
            elif cmd == "thaw":
                self.frozen = False
                self.armed = None
            elif cmd == "reset-stats":
                for k in self.stats:
                    self.stats[k] = 0
            else:
                raise ValueError(f"unknown command {line!r}")
            return dict(self.snapshot_stats(), ok=True, cmd=cmd)


def serve_control(fs: LazyFS, sock_path: str) -> threading.Thread:
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)

    def client(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for raw in f:                               # bounded by the client's requests
                try:
                    reply = fs.control(raw.decode().strip())
                except Exception as exc:                 # a bad request: say so, keep serving
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                f.write((json.dumps(reply) + "\n").encode())
                f.flush()

    def accept_loop() -> None:
        while True:                                      # ends with the process
            conn, _ = srv.accept()
            threading.Thread(target=client, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    return t


class LazyFSClient:
    """Talks to a running lazyfs over its control socket."""

    def __init__(self, sock_path: str, timeout: float = 60.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(sock_path)
        self.f = self.sock.makefile("rwb")

    def call(self, line: str) -> dict:
        self.f.write((line + "\n").encode())
        self.f.flush()
        raw = self.f.readline()
        if not raw:
            raise ConnectionError("lazyfs closed the control connection")
        reply = json.loads(raw)
        if not reply.get("ok"):
            raise RuntimeError(f"lazyfs refused {line!r}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        try:
            self.f.close()
        finally:
            self.sock.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--control", required=True, help="Unix socket path for crash/stats/sync/arm/thaw commands")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--no-fallocate", action="store_true",
                   help="answer fallocate with EOPNOTSUPP, like a file system without it")
    args = p.parse_args(argv)

    import mfusepy

    class _FUSE(mfusepy.FUSE):
        # mfusepy drops the rename flags of libfuse3; pass them on (RENAME_NOREPLACE/EXCHANGE)
        def rename_fuse_3(self, old, new, flags):
            return self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags)

    fs = LazyFS(args.backing, fallocate=not args.no_fallocate)
    serve_control(fs, args.control)
    _FUSE(fs, args.mountpoint, raw_fi=True, foreground=True, nothreads=False, debug=args.debug,
          fsname="lazyfs", subtype="lazyfs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
