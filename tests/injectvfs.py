"""Exception injection through the VFS seam (a test double built on walcrypt.testing.FaultyVFS).

:class:`InjectVFS` counts every VFS call (every op kind, nested calls such as the opens and
reads inside ``read_file`` included) once it is armed, and raises a chosen exception at the
k-th call, either *before* the call does anything or *after* it returned (the effect is then on
disk but the caller never learns it: what a KeyboardInterrupt or a signal handler's exception
arriving right after a ``pwrite`` returns looks like).  ``on_fire`` runs just before the
exception is raised (the enumeration copies the data files there: a snapshot of what the disk
held at the moment of injection).

It also tracks the file descriptors opened through it, so a test can close what an interrupted
``close()`` left open (an injection *before* a close leaves the descriptor open).
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from walcrypt.vfs import VFS
from walcrypt.testing import FaultyVFS


class InjectedError(Exception):
    """An arbitrary application exception (say, a timeout raised from a signal handler)."""


KINDS = {
    "KeyboardInterrupt": KeyboardInterrupt,
    "MemoryError": MemoryError,
    "InjectedError": InjectedError,
}


class InjectVFS(FaultyVFS):
    def __init__(self, base: VFS | None = None) -> None:
        super().__init__(base)
        self._armed_at: int | None = None
        self._armed_op: str | None = None          # arm_op(): count only this op kind
        self._op_count = 0
        self._when = "before"
        self._exc_type: type[BaseException] = KeyboardInterrupt
        self._counting = False
        self.count = 0                     # VFS calls since arm()/count_calls()
        self.fired: BaseException | None = None
        self.fired_op: str | None = None
        self.fired_thread: str | None = None
        self.on_fire: Callable[[], None] | None = None
        self._global: dict[tuple[str, int], int] = {}
        self.open_fds: set[int] = set()
        self._steps: dict[str, int] = {}
        self.trace: list[str] | None = None        # set to a list to record the points' kinds

    # -- configuration -------------------------------------------------------------------
    def count_calls(self) -> None:
        """Start counting calls without injecting (a dry run measures an operation)."""
        with self.lock:
            self._counting, self._armed_at, self._armed_op, self.count = True, None, None, 0

    def arm(self, k: int, when: str, exc_type: type[BaseException], on_fire=None) -> None:
        """Raise at the k-th VFS call (any kind) from now on."""
        if when not in ("before", "after") or k < 1:
            raise ValueError("arm(k >= 1, 'before' | 'after', exception type)")
        with self.lock:
            self._counting, self._armed_at, self._armed_op, self.count = True, k, None, 0
            self._when, self._exc_type, self.on_fire = when, exc_type, on_fire
            self.fired = None

    def arm_op(self, op: str, n: int, when: str, exc_type: type[BaseException], on_fire=None) -> None:
        """Raise at the n-th call of ``op`` ("fsync" and "fdatasync" count together) from now on."""
        self.arm(1, when, exc_type, on_fire)
        with self.lock:
            self._armed_at, self._armed_op, self._op_count = n, "fdatasync" if op == "fsync" else op, 0

    def disarm(self) -> None:
        with self.lock:
            self._counting, self._armed_at = False, None

    # -- hooks -------------------------------------------------------------------------
    def _check_crash(self, cat: str, n: int, when: str) -> None:
        if not self._counting:
            return
        if when == "before":
            self.count += 1
            if self.trace is not None:
                self.trace.append(cat)
            if self._armed_op is None:
                k = self.count
            elif cat == self._armed_op:
                self._op_count += 1
                k = self._op_count
            else:
                k = None
            self._global[(cat, n)] = k
        else:
            k = self._global.pop((cat, n), None)
        if k is not None and k == self._armed_at and when == self._when and self.fired is None:
            self._armed_at = self._armed_op = None
            exc = self._exc_type(f"injected {when} VFS call #{k} ({cat})")
            self.fired, self.fired_op = exc, cat
            self.fired_thread = threading.current_thread().name
            if self.on_fire is not None:
                self.on_fire()
            raise exc

    def step(self, name: str, when: str) -> None:
        """An injection point that is not a VFS call (a step boundary such as an LMDB commit):
        counted and fired like one.  Call it with "before" and then, once the step is done, "after"."""
        with self.lock:
            if when == "before":
                self._steps[name] = self._steps.get(name, 0) + 1
            self._check_crash(name, -self._steps.get(name, 0), when)

    def _open(self, path: str, flags: int, mode: int) -> int:
        fd = super()._open(path, flags, mode)
        self.open_fds.add(fd)
        return fd

    def _close(self, fd: int) -> None:
        super()._close(fd)
        self.open_fds.discard(fd)

    def close_leftovers(self) -> int:
        """Close descriptors an interrupted close() left open.  -> how many."""
        n = 0
        for fd in list(self.open_fds):
            try:
                os.close(fd)
                n += 1
            except OSError:
                pass
            self.open_fds.discard(fd)
        return n


class SlowSnapshotDisk(VFS):
    """A disk that is slow once, while a KEK rotation works on the snapshot directory: once armed,
    the first ``.tmp-`` file opened (``at="copy"``: a snapshot copy being written) or the first
    listing of the snapshot directory (``at="published"``: the copies are published, the rotation
    goes on to the quarantined copies) holds its caller until ``release`` is set."""

    def __init__(self, at: str = "copy"):
        super().__init__()
        self.at = at
        self.armed = False
        self.writing = threading.Event()
        self.release = threading.Event()

    def _hold(self):
        self.armed = False
        self.writing.set()
        self.release.wait(60)

    def open(self, path, flags, mode=0o600):
        fd = super().open(path, flags, mode)
        if self.armed and self.at == "copy" and os.path.basename(path).startswith(".tmp-"):
            self._hold()
        return fd

    def listdir(self, path):
        names = super().listdir(path)
        if self.armed and self.at == "published" and os.path.basename(path) == "snap-v1-encrypted":
            self._hold()
        return names
