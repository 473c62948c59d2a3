"""``CrashVFS``: the power-loss model.  It records every write, size change and directory change
since the last sync that covers it (:mod:`walcrypt.testing.crashlog`), and :meth:`CrashVFS.crash`
rewrites the real files into a state a power cut could leave (unsynced writes dropped or torn at
512-byte sectors, unsynced directory entries undone), exactly per the durability contract in
:mod:`walcrypt.vfs`.  :meth:`CrashVFS.arm_crash` raises :class:`SimulatedCrash` at a chosen
operation."""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import tempfile
import weakref

from ..vfs import VFS
from ..vfs_io import pread_all, pwrite_all
from ..vfs_paths import O_CLOEXEC, refuse_link
from .crashlog import HOLD_PREFIX, DirOp, Node, Resize, Write, full_path, release_all, sectors
from .faulty import FaultyVFS, op_category

__all__ = ["CrashVFS", "SimulatedCrash"]


class SimulatedCrash(Exception):
    """Raised by an armed :meth:`CrashVFS.arm_crash`; the test should then call ``crash()``."""


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
        self._nodes: dict[tuple[int, int], Node] = {}
        self._fds: dict[int, tuple[str, Node | None]] = {}
        self._ops: list[DirOp] = []
        self._holding: dict[int, str] = {}
        self._hold_seq = 0
        # If the object is dropped without crash(), what happened so far is permanent.
        self._finalizer = weakref.finalize(self, release_all, self._nodes, self._holding)

    def shutdown(self) -> None:
        """Stop tracking: everything done so far stays as it is on disk (no crash)."""
        with self.lock:
            release_all(self._nodes, self._holding)
            self._fds.clear()
            self._ops.clear()

    # -- crash arming ----------------------------------------------------------------

    def arm_crash(self, op: str, n: int = 1, when: str = "before") -> None:
        """At the ``n``-th future call of ``op`` raise :class:`SimulatedCrash`, before
        performing it or after.  Afterwards every op but close raises SimulatedCrash
        until :meth:`crash` is called."""
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        cat = op_category(op)
        if n < 1:
            raise ValueError("n counts from 1 (the next call)")
        with self.lock:
            self._armed.setdefault(cat, {})[self.calls_seen[cat] + n] = when

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

    def _node_of(self, fd: int) -> Node | None:
        entry = self._fds.get(fd)
        node = entry[1] if entry else None
        return node if node is not None and node.path is not None else None

    def _node_at(self, path: str, st: os.stat_result) -> Node:
        key = (st.st_dev, st.st_ino)
        node = self._nodes.get(key)
        if node is None:
            try:
                helper, writable = os.open(path, os.O_RDWR | O_CLOEXEC), True
            except PermissionError:
                helper, writable = os.open(path, os.O_RDONLY | O_CLOEXEC), False
            node = self._nodes[key] = Node(key, path, helper, writable)
        return node

    def _maybe_drop(self, node: Node) -> None:
        if node.users <= 0 and (not node.undo or node.path is None):
            os.close(node.helper)
            self._nodes.pop(node.key, None)

    def _record_resize(self, node: Node, length: int, grow_only: bool) -> None:
        old_size = os.fstat(node.helper).st_size
        old = pread_all(node.helper, old_size - length, length) if length < old_size else b""
        node.undo.append(Resize(length, old, old_size, grow_only))

    def _open(self, path: str, flags: int, mode: int) -> int:
        p = full_path(path)
        existed = os.path.lexists(p)
        if existed and flags & os.O_TRUNC and stat.S_ISREG(os.lstat(p).st_mode):   # never through a link
            truncated = self._node_at(p, os.lstat(p))
            if os.fstat(truncated.helper).st_size:
                self._record_resize(truncated, 0, grow_only=False)
        fd = self.base.open(p, flags, mode)
        st = os.fstat(fd)
        node = self._node_at(p, st) if stat.S_ISREG(st.st_mode) else None
        if node is not None:
            node.path = p
            node.users += 1
        self._fds[fd] = (p, node)
        if flags & os.O_CREAT and not existed:
            self._ops.append(DirOp("create", p, unsynced={os.path.dirname(p)}))
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
            old = pread_all(node.helper, min(len(view), max(0, old_size - offset)), offset)
            node.undo.append(Write(offset, bytes(view), old, old_size))
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
                    hdir = self._holding[dev] = tempfile.mkdtemp(prefix=HOLD_PREFIX, dir=cand)
                    break
        assert hdir is not None
        try:
            os.rename(path, os.path.join(hdir, name))
        except OSError as exc:  # same st_dev but another mount: hold next to the file
            if exc.errno != errno.EXDEV:
                raise
            hdir = self._holding[dev] = tempfile.mkdtemp(prefix=HOLD_PREFIX, dir=parent)
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
        s, d = full_path(src), full_path(dst)
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
        self._ops.append(DirOp("rename", s, d, held, {os.path.dirname(s), os.path.dirname(d)}))

    def _unlink(self, path: str) -> None:
        p = full_path(path)
        if not os.path.lexists(p) or (os.path.isdir(p) and not os.path.islink(p)):
            self.base.unlink(p)  # raises the natural error
            return
        held = self._hold(p)
        self._ops.append(DirOp("unlink", p, held=held, unsynced={os.path.dirname(p)}))

    def _mkdir(self, path: str, mode: int) -> None:
        p = full_path(path)
        self.base.mkdir(p, mode)
        if self.track_mkdir:
            self._ops.append(DirOp("mkdir", p, unsynced={os.path.dirname(p)}))

    def _makedirs(self, path: str, mode: int) -> None:
        missing, cur = [], full_path(path)
        while not os.path.lexists(cur):
            missing.append(cur)
            cur = os.path.dirname(cur)
        for d in reversed(missing):
            self._mkdir(d, mode)
        if not os.path.isdir(path):
            raise FileExistsError(errno.EEXIST, "exists and is not a directory", path)

    def _listdir(self, path: str) -> list[str]:
        return [n for n in self.base.listdir(path) if not n.startswith(HOLD_PREFIX)]

    def _fsync_dir(self, path: str) -> None:
        self.base.fsync_dir(path)
        self._dir_synced(full_path(path))

    def _dir_synced(self, d: str) -> None:
        for op in self._ops:
            op.unsynced.discard(d)
        # An op is durable once all its parents were synced after it.  Earlier ops on the
        # same names are then durable too, so undoing the rest never needs a lost file.
        forced: set[str] = set()
        durable: list[DirOp] = []
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
        with self.lock:
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
            release_all(self._nodes, self._holding)
            self._armed.clear()
            self._dead = False

    def _revert_data(self, node: Node, torn: bool, rng: random.Random, keep: float) -> None:
        fd = node.helper
        if not node.writable:  # helper is read-only: reopen for writing
            fd = os.open(node.path or "", os.O_WRONLY | O_CLOEXEC)
        try:
            for rec in reversed(node.undo):
                if isinstance(rec, Write):
                    pwrite_all(fd, rec.old, rec.offset)
                    os.ftruncate(fd, rec.old_size)
                else:
                    os.ftruncate(fd, rec.old_size)
                    pwrite_all(fd, rec.old, rec.length)
            if not torn:
                return
            for rec in node.undo:
                if isinstance(rec, Write):
                    for start, end in sectors(rec.offset, len(rec.data)):
                        if rng.random() < keep:
                            pwrite_all(fd, rec.data[start - rec.offset:end - rec.offset], start)
                elif rng.random() < keep:
                    if not rec.grow_only or os.fstat(fd).st_size < rec.length:
                        os.ftruncate(fd, rec.length)
        finally:
            if fd != node.helper:
                os.close(fd)

    @staticmethod
    def _revert_dir(op: DirOp) -> None:
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
