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
tests/test_faults.py for patterns.  Nothing in the engine imports this package.

Its modules: :mod:`walcrypt.testing.faulty` (``FaultyVFS``), :mod:`walcrypt.testing.crash`
(``CrashVFS``, ``SimulatedCrash``) and :mod:`walcrypt.testing.crashlog` (what the crash model
records of each file and directory entry until a sync makes it durable).
"""

from __future__ import annotations

from .crash import CrashVFS, SimulatedCrash
from .faulty import FaultyVFS

__all__ = ["FaultyVFS", "CrashVFS", "SimulatedCrash"]
