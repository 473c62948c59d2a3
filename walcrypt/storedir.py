"""A data directory as the tools see it before any key is given: is it a walcrypt store (and if
not, what is there), its metadata opened read-only, its store record, whether it is encrypted,
who holds its lock, and the shared lock a reader takes (walcrypt.inspection, verify, dump,
recover and the CLI use these)."""

from __future__ import annotations

import errno
import fcntl
import os

from . import format as fmt
from . import layout
from . import meta as M
from .errors import (
    CorruptionError,
    LockedError,
    UsageError,
)
from .vfs import own_file, refuse_link

# ---------------------------------------------------------------------------
# Preconditions and the process lock
# ---------------------------------------------------------------------------

# Names walcrypt creates directly inside a data directory.  A directory holding none of them is not a data
# directory; one holding some of them but lacking its metadata is a damaged one.
WALCRYPT_NAMES = (layout.LOCK_NAME, layout.META_DIR, layout.WAL_ENCRYPTED, layout.SNAP_ENCRYPTED, layout.WAL_PLAIN,
                  layout.SNAP_PLAIN, ".migrate-wal", ".migrate-snap")

NEW_STORE_HINT = ("if it is a new store whose creation was interrupted, nothing was stored in it yet: remove the "
                  "directory and run 'walcrypt init' again (or let the node create it); if it held data, its files "
                  "were deleted: restore the node from a backup export or wipe it and let Raft re-replicate it")


def _what_is_here(path: str) -> str:
    """The walcrypt files present in a data directory, for messages ("8 segment files in wal-v1-encrypted/")."""
    parts = []
    for d, what in ((layout.WAL_ENCRYPTED, "segment"), (layout.SNAP_ENCRYPTED, "snapshot"),
                    (layout.WAL_PLAIN, "segment"), (layout.SNAP_PLAIN, "snapshot")):
        p = os.path.join(path, d)
        if os.path.isdir(p) and not os.path.islink(p):
            n = sum(1 for x in os.listdir(p) if not x.startswith("."))
            parts.append(f"{n} {what} file{'s' if n != 1 else ''} in {d}/")
    if not parts:
        parts = [n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in WALCRYPT_NAMES
                 if os.path.lexists(os.path.join(path, n))]
    return ", ".join(parts)


def require_store(directory: str) -> str:
    """The absolute path of an existing store directory.

    A UsageError for what the operator named wrongly (no such directory, not a directory, no permission,
    a directory holding no walcrypt files at all); a CorruptionError for a walcrypt data directory whose
    metadata is missing (no meta/, no meta/data.mdb): that is damage, not a wrong argument."""
    path = os.path.abspath(os.fspath(directory))
    if not os.path.exists(path):
        raise UsageError(f"{directory} does not exist; give the data directory of a walcrypt store")
    if not os.path.isdir(path):
        raise UsageError(f"{directory} is not a directory; give the data directory of a walcrypt store")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"no permission to read {directory}; run as the user that owns the store")
    layout.refuse_links(path)
    names = os.listdir(path)
    if not any(n in WALCRYPT_NAMES for n in names):
        below = [n for n in names if n.endswith((".wal", ".snap"))]
        raise UsageError(f"{directory} is not a walcrypt data directory (it holds none of meta/, "
                         f"{layout.WAL_ENCRYPTED}/, {layout.SNAP_ENCRYPTED}/, {layout.WAL_PLAIN}/, {layout.SNAP_PLAIN}/"
                         ", LOCK)" + ("; it holds segment or snapshot files: give the data directory above it"
                                      if below else ""))
    meta = os.path.join(path, layout.META_DIR)
    if not os.path.isdir(meta):
        what = "a file stands where its metadata directory meta/ belongs" if os.path.lexists(meta) else \
            "its metadata directory meta/ is missing"
        if layout.data_files(path):
            raise layout.metadata_lost(meta, f"{directory} is a damaged walcrypt data directory: {what}",
                                _what_is_here(path))
        raise CorruptionError(meta, None, f"{directory} is a walcrypt data directory ({_what_is_here(path)}) but "
                              f"{what} and it holds no data", NEW_STORE_HINT)
    for n in sorted(os.listdir(meta)):
        refuse_link(os.path.join(meta, n))
    if not os.access(meta, os.R_OK | os.X_OK) or not all(
            os.access(os.path.join(meta, n), os.R_OK) for n in os.listdir(meta)):
        raise UsageError(f"no permission to read {meta}; run as the user that owns the store")
    if not os.path.isfile(os.path.join(meta, "data.mdb")):
        what = "its metadata database meta/data.mdb is missing"
        if layout.data_files(path):
            raise layout.metadata_lost(os.path.join(meta, "data.mdb"),
                                f"{directory} is a damaged walcrypt data directory: {what}", _what_is_here(path))
        raise CorruptionError(os.path.join(meta, "data.mdb"), None, f"{directory} is a walcrypt data directory "
                              f"but {what} and it holds no data", NEW_STORE_HINT)
    return path


def open_meta(root: str, directory: str) -> M.Meta:
    """The metadata database, read-only and without its lock file.  LMDB's errors arrive translated
    (meta.lmdb_error): a damaged database is a CorruptionError saying what to do."""
    return M.Meta(os.path.join(root, layout.META_DIR), readonly=True)


def store_record(r, root: str, directory: str) -> tuple[bytes, bool]:
    """(store ID, encrypted) from the store record, read without a key (it is not MAC'd).  A missing or
    damaged record is damage: beside existing data, meta/ was lost or replaced; without any, the
    store's creation never committed."""
    store_id = r.raw(M.DB_STORE, M.K_STORE_ID)
    enc = r.raw(M.DB_STORE, M.K_ENCRYPTED)
    meta_path = os.path.join(root, layout.META_DIR)
    if store_id is None and enc is None:
        if layout.pairs_with_data(root):
            raise layout.metadata_lost(meta_path, f"the metadata of {directory} holds no store record")
        raise CorruptionError(meta_path, None, f"the metadata of {directory} holds no store record and there is "
                              "no data: the store's creation did not commit", NEW_STORE_HINT)
    if store_id is None or len(store_id) != fmt.STORE_ID_SIZE or enc not in (b"\x00", b"\x01"):
        raise CorruptionError(meta_path, None, f"the store identity record of {directory} is damaged (store ID "
                              "or mode)", M.DAMAGED_HINT)
    return store_id, enc == b"\x01"


def read_mode(root: str, directory: str) -> bool:
    """True for an encrypted store, False for a plaintext one (CorruptionError when the record is missing)."""
    meta = open_meta(root, directory)
    try:
        with meta.read() as r:
            return store_record(r, root, directory)[1]
    finally:
        meta.close()


def lock_holders(root: str) -> list[int] | None:
    """PIDs holding a flock on ``root/LOCK`` according to /proc/locks (no lock is taken).

    [] when nobody holds it, None when it cannot be told (no /proc/locks)."""
    return layout.flock_holders(root)


def locked_message(root: str, pids: list[int] | None) -> str:
    who = f"process {', '.join(map(str, pids))}" if pids else "another process"
    return (f"{root} is in use by {who} (it holds {os.path.join(root, layout.LOCK_NAME)}); stop it first "
            "('walcrypt inspect' works on a running store)")


class SharedLock:
    """A shared flock on DATA/LOCK for read-only commands: refuses a store a writer holds, and keeps a
    writer from opening it meanwhile.  Writes nothing (and does not create LOCK when it is absent)."""

    def __init__(self, root: str, display: str | None = None):
        self.root = root
        self.display = display or root
        self.fd: int | None = None

    def __enter__(self) -> "SharedLock":
        path = os.path.join(self.root, layout.LOCK_NAME)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return self
        except PermissionError:
            raise UsageError(f"no permission to read {path}; run as the user that owns the store") from None
        except OSError:
            refuse_link(path)
            raise
        try:
            own_file(self.fd, path, exclusive=False)       # never a FIFO or device
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(locked_message(self.display, lock_holders(self.root))) from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)       # closing the descriptor releases the flock
            self.fd = None
