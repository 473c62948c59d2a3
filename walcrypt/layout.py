"""Versioned directories of a data directory, and the process lock.

```
DATA/
  LOCK                  flock: one writer process at a time
  meta/                 LMDB environment
  wal-v1-encrypted/     encrypted segments      (preferred)
  snap-v1-encrypted/    encrypted snapshots
  wal-v1/  snap-v1/     legacy plaintext format (algorithm NONE)
```
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from dataclasses import dataclass

from . import vfs as _vfs
from .errors import WIPE_ADVICE, CorruptionError, LockedError, SymlinkError, UsageError

LOCK_NAME = "LOCK"
# Bounded retries everywhere a running writer (retention, compaction, a rotation) can invalidate a
# read that takes no lock: an export, verify, inspect, a read of a running store.
ATTEMPTS = 5
META_DIR = "meta"
WAL_ENCRYPTED = "wal-v1-encrypted"
SNAP_ENCRYPTED = "snap-v1-encrypted"
WAL_PLAIN = "wal-v1"
SNAP_PLAIN = "snap-v1"

# A segment file's name: <segment ID>-<base index>.wal, each 16 hex digits (FORMAT.md 3.1).
SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")


@dataclass(frozen=True)
class DirPair:
    wal: str
    snap: str
    encrypted: bool


ENCRYPTED_PAIR = DirPair(WAL_ENCRYPTED, SNAP_ENCRYPTED, True)
PLAIN_PAIR = DirPair(WAL_PLAIN, SNAP_PLAIN, False)
PAIRS_BY_PREFERENCE = (ENCRYPTED_PAIR, PLAIN_PAIR)


def pair_for(encrypted: bool) -> DirPair:
    return ENCRYPTED_PAIR if encrypted else PLAIN_PAIR


def has_data(root: str, pair: DirPair) -> bool:
    for d in (pair.wal, pair.snap):
        p = os.path.join(root, d)
        if os.path.isdir(p) and any(not n.startswith(".") for n in os.listdir(p)):
            return True
    return False


def pairs_with_data(root: str) -> list[DirPair]:
    return [p for p in PAIRS_BY_PREFERENCE if has_data(root, p)]


def data_files(root: str) -> int:
    """How many segment or snapshot files (regular files named ``*.wal`` / ``*.snap``, links not followed
    and not counted) the data directories of ``root`` hold: evidence of a store's data, for telling a
    data directory that lost its metadata from one holding no data."""
    n = 0
    for pair in PAIRS_BY_PREFERENCE:
        for d in (pair.wal, pair.snap):
            p = os.path.join(root, d)
            if os.path.islink(p) or not os.path.isdir(p):
                continue
            for e in os.scandir(p):
                if e.name.endswith((".wal", ".snap")) and e.is_file(follow_symlinks=False):
                    n += 1
    return n


def looks_like_store(root: str) -> bool:
    return os.path.isdir(os.path.join(root, META_DIR))


def refuse_links(root: str) -> None:
    """SymlinkError for a symbolic link directly inside the data directory ``root``: every entry
    there (LOCK, meta/, the segment and snapshot directories, migration staging, adapter files) is
    walcrypt's own, and none is ever a link.  (Deeper paths are resolved without following links
    while the directory is held: see walcrypt.vfs.confine.)"""
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return
    for e in sorted(entries, key=lambda e: e.name):
        if e.is_symlink():
            raise SymlinkError(e.path)


class ReadOnlyHold:
    """What a read-only store holds instead of a DirLock: no lock, but its paths are resolved
    without following links while it is open (see walcrypt.vfs.confine)."""

    fd = None

    def __init__(self, root: str, *, holder: list | None = None):
        self.root = _vfs.confine(root)
        self._held = True
        if holder is not None:
            holder.append(self)

    def release(self) -> None:
        if self._held:
            self._held = False
            _vfs.release(self.root)


_HELD: set[str] = set()      # data directories this process holds open (realpaths)


def check_not_held(root: str) -> None:
    """LockedError when this process already has ``root`` open (checked before touching LMDB,
    which refuses a second environment handle in one process)."""
    if os.path.realpath(root) in _HELD:
        raise LockedError(f"{root} is already open in this process; close the other Store first")


class DirLock:
    """An exclusive flock on DATA/LOCK, held for the life of an open store.

    flock locks belong to the open file description, so a second open of the same
    directory - from another process or this one - gets :class:`LockedError`.
    """

    def __init__(self, root: str, *, shared: bool = False, holder: list | None = None):
        """``holder``: the lock appends itself to this list as soon as it is held, so a caller
        interrupted (KeyboardInterrupt) before it could store the new lock can still release it."""
        check_not_held(root)
        self.real = os.path.realpath(root)
        self.root = os.path.abspath(root)
        self.path = os.path.join(root, LOCK_NAME)
        self.fd = None
        added = confined = False
        flags = (os.O_RDWR | os.O_CREAT if not shared else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC \
            | getattr(os, "O_NONBLOCK", 0)         # a FIFO planted here never blocks the open
        try:
            try:
                self.fd = os.open(self.path, flags, 0o600)
            except FileNotFoundError:
                raise UsageError(f"{root} is not a walcrypt data directory (no {LOCK_NAME} file)") from None
            except PermissionError:
                raise UsageError(f"no permission to open {self.path}") from None
            except OSError:
                _vfs.refuse_link(self.path)
                raise
            # Only a regular file of its own: never a FIFO or device, and (for the writer, which may
            # create it) never a file another name shares, so no outside file is locked.
            _vfs.own_file(self.fd, self.path, exclusive=not shared)
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockedError(
                        f"{root} is in use by another process or another open store (lock {self.path}); "
                        "stop it first, or open read-only") from None
                raise
            added = True
            _HELD.add(self.real)
            _vfs.confine(self.root)        # from now on no path below root is resolved through a link
            confined = True
            if holder is not None:
                holder.append(self)
        except BaseException:
            fd, self.fd = self.fd, None          # whatever interrupted us: the lock is not kept
            if confined:
                _vfs.release(self.root)
            if fd is not None:
                os.close(fd)
            if added:
                _HELD.discard(self.real)
            raise

    def release(self) -> None:
        """Idempotent.  The descriptor is taken before it is closed, so an interrupted release never
        closes it twice (a reused descriptor number would be someone else's file)."""
        if self.real in _HELD:
            _vfs.release(self.root)
        fd, self.fd = self.fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        _HELD.discard(self.real)


def flock_holders(root: str, *, exclusive_only: bool = False) -> list[int] | None:
    """PIDs holding a flock on ``root/LOCK`` (``exclusive_only``: a write lock, i.e. a read-write
    open) according to /proc/locks; no lock is taken.  [] when nobody holds it, None when it cannot
    be told (no /proc/locks)."""
    lock = os.path.join(root, LOCK_NAME)
    try:
        ino = os.stat(lock).st_ino
    except OSError:
        return []
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    pids = set()
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (a "->" marks a blocked waiter)
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK" or (exclusive_only and parts[3] != "WRITE"):
            continue
        try:
            if int(parts[5].rsplit(":", 1)[1]) == ino:
                pids.add(int(parts[4]))
        except (ValueError, IndexError):
            continue
    return sorted(pids)


def metadata_lost(meta_path: str, what: str, here: str = "segments or snapshots") -> CorruptionError:
    """The error for data without the metadata that describes it (``what``: how the metadata is lost;
    ``here``: what data the directory holds)."""
    return CorruptionError(
        meta_path, None, f"{what}, but the data directory holds {here}: meta/ was lost or "
        "replaced, and walcrypt will not create a new store over existing data (it holds the manifest and the "
        "wrapped data keys)", "walcrypt changed nothing. Put back this directory's own meta/ (from the same node, "
        "not an older copy); otherwise rebuild it from the snapshot and segment files with the KEK ('walcrypt "
        "recover DIR --key-file K'), restore the node from a snapshot export, or " + WIPE_ADVICE)
