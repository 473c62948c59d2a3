"""Test doubles for the file-system seam (:mod:`walcrypt.vfs`), for walcrypt's own tests and for a
host project that wants to fault-test its integration the way etcd users use its failpoints.

* :class:`FaultyVFS` wraps a VFS and injects faults: an ``OSError`` (EIO, ENOSPC, ...) at the k-th
  call of an operation, short writes, a full disk, or any exception from a callback.
* :class:`CrashVFS` models power loss: it records every write, size change and directory change
  since the last sync that covers it, and :meth:`CrashVFS.crash` rewrites the real files into a
  state a power cut could leave (unsynced writes dropped or torn at 512-byte sectors, unsynced
  directory entries undone), exactly per the durability contract in :mod:`walcrypt.vfs`.
  :meth:`CrashVFS.arm_crash` raises :class:`SimulatedCrash` at a chosen operation.

Use: ``walcrypt.open(path, kek=..., vfs=CrashVFS())``; see tests/test_powerloss.py and
tests/test_faults.py for patterns.  Nothing in the engine imports this module.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import shutil
import stat
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .vfs import _O_CLOEXEC, DEFAULT_VFS, SECTOR_SIZE, VFS, _pread_all, _pwrite_all, refuse_link

__all__ = ["FaultyVFS", "CrashVFS", "SimulatedCrash"]

Buffer = Union[bytes, bytearray, memoryview]


class SimulatedCrash(Exception):
    """Raised by an armed :meth:`CrashVFS.arm_crash`; the test should then call ``crash()``."""


_OPS = frozenset({
    "open", "close", "pwrite", "pread", "fdatasync", "fsync", "fsync_dir", "preallocate",
    "ftruncate", "fstat_size", "rename", "unlink", "mkdir", "makedirs", "listdir",
    "exists", "size", "read_file", "copy_file",
})


def _category(op: str) -> str:
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
        self._lock = threading.RLock()
        self._seen: collections.Counter[str] = collections.Counter()
        self._fail: dict[str, dict[int, int]] = {}
        self._short_next: int | None = None
        self._enospc_budget: int | None = None

    # -- fault configuration -------------------------------------------------------

    def fail_nth(self, op: str, n: int = 1, err: int = errno.EIO) -> None:
        """Make the ``n``-th future call of ``op`` raise ``OSError(err)``."""
        cat = _category(op)
        if n < 1:
            raise ValueError("n counts from 1 (the next call)")
        with self._lock:
            self._fail.setdefault(cat, {})[self._seen[cat] + n] = err

    def short_write_next(self, nbytes: int) -> None:
        """The next pwrite writes only its first ``nbytes`` bytes, then raises EIO."""
        with self._lock:
            self._short_next = max(0, nbytes)

    def enospc_after(self, nbytes: int) -> None:
        """Allow ``nbytes`` more bytes of pwrite/preallocate growth, then raise ENOSPC.

        The write that crosses the limit writes what fits first.  Every written byte
        counts (overwrites too): it is a budget, not a free-space model.
        """
        with self._lock:
            self._enospc_budget = max(0, nbytes)

    def clear_faults(self) -> None:
        with self._lock:
            self._fail.clear()
            self._short_next = None
            self._enospc_budget = None

    # -- plumbing ------------------------------------------------------------------

    def _run(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            n = self._before(op)
            try:
                return fn(*args)
            finally:
                self._check_crash(_category(op), n, "after")

    def _before(self, op: str) -> int:
        self.calls[op] += 1
        cat = _category(op)
        self._seen[cat] += 1
        n = self._seen[cat]
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


# ---------------------------------------------------------------------------------------
# The crash model.

_HOLD_PREFIX = ".crashvfs-holding-"


@dataclass(eq=False)
class _Write:
    offset: int
    data: bytes
    old: bytes  # previous bytes of [offset, min(offset+len(data), old_size))
    old_size: int


@dataclass(eq=False)
class _Resize:
    length: int
    old: bytes  # bytes cut off by a shrink: previous [length, old_size)
    old_size: int
    grow_only: bool  # preallocate: size becomes max(size, length)


@dataclass(eq=False)
class _Node:
    """One tracked regular file (an inode), wherever its name currently is."""
    key: tuple[int, int]
    path: str | None  # current location (a holding path once unlinked; None once gone)
    helper: int  # our own fd on the inode, for reading old bytes and undoing
    writable: bool = True
    users: int = 0
    undo: list[Union[_Write, _Resize]] = field(default_factory=list)


@dataclass(eq=False)
class _DirOp:
    kind: str  # "create" | "mkdir" | "rename" | "unlink"
    path: str  # the name created/removed; for rename the source
    dst: str | None = None
    held: str | None = None  # where the unlinked file / overwritten destination waits
    unsynced: set[str] = field(default_factory=set)  # parents still to fsync_dir

    def names(self) -> set[str]:
        return {self.path} if self.dst is None else {self.path, self.dst}


def _abs(path: str) -> str:
    return os.path.abspath(os.fspath(path))


def _release(nodes: dict[tuple[int, int], _Node], holding: dict[int, str]) -> None:
    """Close the helper fds and remove the holding directories (contents are gone for good)."""
    for node in nodes.values():
        os.close(node.helper)
    nodes.clear()
    for hdir in holding.values():
        shutil.rmtree(hdir, ignore_errors=True)
    holding.clear()


def _sectors(offset: int, length: int) -> list[tuple[int, int]]:
    """The pieces of [offset, offset+length) split on SECTOR_SIZE boundaries."""
    pieces, pos, end = [], offset, offset + length
    while pos < end:
        nxt = min(end, (pos // SECTOR_SIZE + 1) * SECTOR_SIZE)
        pieces.append((pos, nxt))
        pos = nxt
    return pieces


class CrashVFS(FaultyVFS):
    """A FaultyVFS that tracks durability and can :meth:`crash`.

    Unsynced data is recorded in an undo log per file; unlinked files and overwritten
    rename destinations wait in a hidden holding directory (same filesystem, normally
    under the system temp dir) until an fsync_dir makes the removal durable.
    ``track_mkdir`` (default on) also treats new directories as entries needing an
    fsync_dir of their parent; an undone mkdir removes the directory tree.
    """

    def __init__(self, base: VFS | None = None, *, track_mkdir: bool = True,
                 holding_root: str | None = None) -> None:
        super().__init__(base)
        self.track_mkdir = track_mkdir
        self._holding_root = holding_root
        self._armed: dict[str, dict[int, str]] = {}
        self._dead = False
        self._nodes: dict[tuple[int, int], _Node] = {}
        self._fds: dict[int, tuple[str, _Node | None]] = {}
        self._ops: list[_DirOp] = []
        self._holding: dict[int, str] = {}
        self._hold_seq = 0
        # If the object is dropped without crash(), what happened so far is permanent.
        self._finalizer = weakref.finalize(self, _release, self._nodes, self._holding)

    def shutdown(self) -> None:
        """Stop tracking: everything done so far stays as it is on disk (no crash)."""
        with self._lock:
            _release(self._nodes, self._holding)
            self._fds.clear()
            self._ops.clear()

    # -- crash arming ----------------------------------------------------------------

    def arm_crash(self, op: str, n: int = 1, when: str = "before") -> None:
        """At the ``n``-th future call of ``op`` raise :class:`SimulatedCrash`, before
        performing it or after.  Afterwards every op but close raises SimulatedCrash
        until :meth:`crash` is called."""
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        cat = _category(op)
        if n < 1:
            raise ValueError("n counts from 1 (the next call)")
        with self._lock:
            self._armed.setdefault(cat, {})[self._seen[cat] + n] = when

    @property
    def crashed(self) -> bool:
        """True once a SimulatedCrash fired, until crash() is called."""
        return self._dead

    def _before(self, op: str) -> int:
        if self._dead and op != "close":
            raise SimulatedCrash(f"{op} called after the simulated crash; call crash() first")
        return super()._before(op)

    def _check_crash(self, cat: str, n: int, when: str) -> None:
        if self._armed.get(cat, {}).get(n) == when:
            del self._armed[cat][n]
            self._dead = True
            raise SimulatedCrash(f"simulated power loss {when} {cat} call #{n}")

    # -- file data tracking ------------------------------------------------------------

    def _node_of(self, fd: int) -> _Node | None:
        entry = self._fds.get(fd)
        node = entry[1] if entry else None
        return node if node is not None and node.path is not None else None

    def _node_at(self, path: str, st: os.stat_result) -> _Node:
        key = (st.st_dev, st.st_ino)
        node = self._nodes.get(key)
        if node is None:
            try:
                helper, writable = os.open(path, os.O_RDWR | _O_CLOEXEC), True
            except PermissionError:
                helper, writable = os.open(path, os.O_RDONLY | _O_CLOEXEC), False
            node = self._nodes[key] = _Node(key, path, helper, writable)
        return node

    def _maybe_drop(self, node: _Node) -> None:
        if node.users <= 0 and (not node.undo or node.path is None):
            os.close(node.helper)
            self._nodes.pop(node.key, None)

    def _record_resize(self, node: _Node, length: int, grow_only: bool) -> None:
        old_size = os.fstat(node.helper).st_size
        old = _pread_all(node.helper, old_size - length, length) if length < old_size else b""
        node.undo.append(_Resize(length, old, old_size, grow_only))

    def _open(self, path: str, flags: int, mode: int) -> int:
        p = _abs(path)
        existed = os.path.lexists(p)
        if existed and flags & os.O_TRUNC and stat.S_ISREG(os.lstat(p).st_mode):   # never through a link
            node = self._node_at(p, os.lstat(p))
            if os.fstat(node.helper).st_size:
                self._record_resize(node, 0, grow_only=False)
        fd = self.base.open(p, flags, mode)
        st = os.fstat(fd)
        node = self._node_at(p, st) if stat.S_ISREG(st.st_mode) else None
        if node is not None:
            node.path = p
            node.users += 1
        self._fds[fd] = (p, node)
        if flags & os.O_CREAT and not existed:
            self._ops.append(_DirOp("create", p, unsynced={os.path.dirname(p)}))
        return fd

    def _close(self, fd: int) -> None:
        entry = self._fds.pop(fd, None)
        self.base.close(fd)
        if entry and entry[1] is not None:
            entry[1].users -= 1
            self._maybe_drop(entry[1])

    def _write(self, fd: int, view: memoryview, offset: int) -> None:
        node = self._node_of(fd)
        if node is not None:
            old_size = os.fstat(node.helper).st_size
            old = _pread_all(node.helper, min(len(view), max(0, old_size - offset)), offset)
            node.undo.append(_Write(offset, bytes(view), old, old_size))
        self.base.pwrite(fd, view, offset)

    def _ftruncate(self, fd: int, length: int) -> None:
        node = self._node_of(fd)
        if node is not None:
            self._record_resize(node, length, grow_only=False)
        self.base.ftruncate(fd, length)

    def _preallocate(self, fd: int, length: int) -> None:
        node = self._node_of(fd)
        if node is not None and os.fstat(node.helper).st_size < length:
            self._record_resize(node, length, grow_only=True)
        self.base.preallocate(fd, length)

    def _synced(self, fd: int) -> None:
        entry = self._fds.get(fd)
        if entry and entry[1] is not None:
            entry[1].undo.clear()
        elif entry and os.path.isdir(entry[0]):  # fsync of a directory fd
            self._dir_synced(entry[0])

    def _fdatasync(self, fd: int) -> None:
        self.base.fdatasync(fd)
        self._synced(fd)

    def _fsync(self, fd: int) -> None:
        self.base.fsync(fd)
        self._synced(fd)

    # -- directory entry tracking ----------------------------------------------------

    def _hold(self, path: str) -> str:
        """Move ``path`` into a holding directory on the same filesystem; return where."""
        self._hold_seq += 1
        name = f"{self._hold_seq}-{os.path.basename(path)}"
        parent = os.path.dirname(path)
        dev = os.stat(parent).st_dev
        hdir = self._holding.get(dev)
        if hdir is None:
            for cand in (self._holding_root, tempfile.gettempdir(), parent):
                if cand and os.path.isdir(cand) and os.stat(cand).st_dev == dev:
                    hdir = self._holding[dev] = tempfile.mkdtemp(prefix=_HOLD_PREFIX, dir=cand)
                    break
        assert hdir is not None
        try:
            os.rename(path, os.path.join(hdir, name))
        except OSError as exc:  # same st_dev but another mount: hold next to the file
            if exc.errno != errno.EXDEV:
                raise
            hdir = self._holding[dev] = tempfile.mkdtemp(prefix=_HOLD_PREFIX, dir=parent)
            os.rename(path, os.path.join(hdir, name))
        held = os.path.join(hdir, name)
        self._moved(path, held)
        return held

    def _moved(self, src: str, dst: str | None) -> None:
        for node in self._nodes.values():
            if node.path == src:
                node.path = dst
            elif dst is not None and node.path and node.path.startswith(src + os.sep):
                node.path = dst + node.path[len(src):]

    def _rename(self, src: str, dst: str) -> None:
        s, d = _abs(src), _abs(dst)
        refuse_link(d)                    # as VFS.rename: a link at the destination is not replaced
        if s == d or not os.path.lexists(s):
            self.base.rename(s, d)  # no-op, or the natural error
            return
        held = self._hold(d) if os.path.lexists(d) and not os.path.isdir(d) else None
        try:
            self.base.rename(s, d)
        except BaseException:
            if held:
                os.rename(held, d)
                self._moved(held, d)
            raise
        self._moved(s, d)
        self._ops.append(_DirOp("rename", s, d, held, {os.path.dirname(s), os.path.dirname(d)}))

    def _unlink(self, path: str) -> None:
        p = _abs(path)
        if not os.path.lexists(p) or (os.path.isdir(p) and not os.path.islink(p)):
            self.base.unlink(p)  # raises the natural error
            return
        held = self._hold(p)
        self._ops.append(_DirOp("unlink", p, held=held, unsynced={os.path.dirname(p)}))

    def _mkdir(self, path: str, mode: int) -> None:
        p = _abs(path)
        self.base.mkdir(p, mode)
        if self.track_mkdir:
            self._ops.append(_DirOp("mkdir", p, unsynced={os.path.dirname(p)}))

    def _makedirs(self, path: str, mode: int) -> None:
        missing, cur = [], _abs(path)
        while not os.path.lexists(cur):
            missing.append(cur)
            cur = os.path.dirname(cur)
        for d in reversed(missing):
            self._mkdir(d, mode)
        if not os.path.isdir(path):
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", path)

    def _listdir(self, path: str) -> list[str]:
        return [n for n in self.base.listdir(path) if not n.startswith(_HOLD_PREFIX)]

    def _fsync_dir(self, path: str) -> None:
        self.base.fsync_dir(path)
        self._dir_synced(_abs(path))

    def _dir_synced(self, d: str) -> None:
        for op in self._ops:
            op.unsynced.discard(d)
        # An op is durable once all its parents were synced after it.  Earlier ops on the
        # same names are then durable too, so undoing the rest never needs a lost file.
        forced: set[str] = set()
        durable: list[_DirOp] = []
        for op in reversed(self._ops):
            if not op.unsynced or op.names() & forced:
                forced |= op.names()
                durable.append(op)
        for op in reversed(durable):
            if op.held is not None:  # the removal is now permanent
                os.unlink(op.held)
                for node in list(self._nodes.values()):
                    if node.path == op.held:
                        node.path = None
                        self._maybe_drop(node)
        done = set(map(id, durable))
        self._ops = [op for op in self._ops if id(op) not in done]

    # -- the crash -------------------------------------------------------------------

    def crash(self, torn: bool = False, rng: random.Random | None = None,
              keep_probability: float = 0.5) -> None:
        """Put the files on disk into a state a power loss could leave, then start afresh.

        Every fd opened through this VFS is closed.  Unsynced writes/resizes are undone
        (old bytes and old size restored); with ``torn=True`` each 512-byte sector of each
        unsynced write (and each unsynced resize) is then independently re-applied with
        ``keep_probability``, in the original order.  Non-durable directory operations are
        reverted newest first.  Armed crashes are disarmed; injected faults stay.
        """
        with self._lock:
            rng = rng if rng is not None else random.Random()
            for fd in self._fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
            for node in self._nodes.values():
                if node.path is not None and node.undo:
                    self._revert_data(node, torn, rng, keep_probability)
            for op in reversed(self._ops):
                self._revert_dir(op)
            self._ops.clear()
            _release(self._nodes, self._holding)
            self._armed.clear()
            self._dead = False

    def _revert_data(self, node: _Node, torn: bool, rng: random.Random, keep: float) -> None:
        fd = node.helper
        if not node.writable:  # helper is read-only: reopen for writing
            fd = os.open(node.path or "", os.O_WRONLY | _O_CLOEXEC)
        try:
            for rec in reversed(node.undo):
                if isinstance(rec, _Write):
                    _pwrite_all(fd, rec.old, rec.offset)
                    os.ftruncate(fd, rec.old_size)
                else:
                    os.ftruncate(fd, rec.old_size)
                    _pwrite_all(fd, rec.old, rec.length)
            if not torn:
                return
            for rec in node.undo:
                if isinstance(rec, _Write):
                    for start, end in _sectors(rec.offset, len(rec.data)):
                        if rng.random() < keep:
                            _pwrite_all(fd, rec.data[start - rec.offset:end - rec.offset], start)
                elif rng.random() < keep:
                    if not rec.grow_only or os.fstat(fd).st_size < rec.length:
                        os.ftruncate(fd, rec.length)
        finally:
            if fd != node.helper:
                os.close(fd)

    @staticmethod
    def _revert_dir(op: _DirOp) -> None:
        if op.kind == "create":
            if os.path.lexists(op.path) and not os.path.isdir(op.path):
                os.unlink(op.path)
        elif op.kind == "mkdir":
            shutil.rmtree(op.path, ignore_errors=True)
        elif op.kind == "rename":
            assert op.dst is not None
            if os.path.lexists(op.dst):
                os.replace(op.dst, op.path)
            if op.held is not None:
                os.replace(op.held, op.dst)
        elif op.kind == "unlink":
            assert op.held is not None
            os.replace(op.held, op.path)
