"""Reading a store while its writer runs: what verify, inspect and export rely on.

The writer process holds ``DATA/LOCK``; readers take no lock and write nothing but their
reader slot in LMDB's lock file.  A running writer changes the store under a reader in four
ways, and a reader tells each of them from damage:

1. **Metadata commits.**  A reader registers in LMDB's reader table (:class:`walcrypt.meta.Meta`
   opens read-only environments with their lock file) and copies every table in one short read
   transaction (:class:`FrozenMeta`): everything it checks comes from one committed state, and
   the writer's page reuse is held back only for the time of the copy.
2. **Files removed after the commit that stopped naming them** (segments purged by compaction,
   snapshots dropped by retention: the record goes first, the file after).  Right after the copy
   the reader opens every file the copy names (:class:`PinnedVFS`); an open descriptor keeps a
   file readable after it is unlinked.  A file already gone by then is judged by a fresh copy
   (:meth:`FrozenMeta.fresh`, its catalog authenticated): if its record is gone too, the writer
   removed it meanwhile - not damage; if the record is still there, the file is missing.
3. **Files created after the copy** (a new segment, a snapshot being written, or published and
   not yet registered): the copy does not name them, so they are not checked, and they are not
   reported as leftovers while a fresh copy names them or their IDs are newer than the copy's.
4. **The segment being appended to.**  Only what was committed when it was read is
   authenticated.  A write unit in progress can be seen half written, so while a writer holds
   the lock the bytes after the last COMMIT frame of the newest segment are not a finding
   (:meth:`walcrypt.segment.Segment.scan` with ``tail_may_be_mid_write``).  Whatever a scan of
   that segment reports as damage is reported only when a second scan, started after the first
   ended, reports the same at the same offset: a unit the writer completed in between is read
   whole the second time, while damage stays where it is (a commit seen after a damaged frame
   was written after that frame's own unit had been written in full).

Whether a writer is running is read from ``/proc/locks`` (an exclusive flock on ``DATA/LOCK``
held by another process); without ``/proc/locks`` a non-blocking shared flock is tried and
released at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
from contextlib import contextmanager
from typing import Iterator

from . import format as fmt
from . import layout
from . import meta as M
from .errors import (
    CorruptionError,
    KeyProviderError,
    LockedError,
    StorageError,
    UsageError,
    WalcryptError,
    WrongKeyError,
)
from .segment_codec import segment_file_name
from .storage import Store
from .vfs import DEFAULT_VFS, VFS

ATTEMPTS = layout.ATTEMPTS     # (re-exported: bounded retries where a running writer can invalidate a read)


# ---------------------------------------------------------------------------
# Is a writer running?
# ---------------------------------------------------------------------------

def writer_pids(root: str) -> list[int] | None:
    """PIDs of other processes holding an exclusive flock on ``root/LOCK`` (from /proc/locks), or
    None when /proc/locks cannot be read.  Takes no lock."""
    pids = layout.flock_holders(root, exclusive_only=True)
    return None if pids is None else [p for p in pids if p != os.getpid()]


def writer_active(root: str) -> bool:
    """True while another process holds the store's ``LOCK`` exclusively (a read-write open)."""
    pids = writer_pids(root)
    if pids is not None:
        return bool(pids)
    path = os.path.join(root, layout.LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# One committed state of the metadata, copied in one short read transaction
# ---------------------------------------------------------------------------

class _Cursor:
    def __init__(self, rows: list[tuple[bytes, bytes]]):
        self.rows = rows

    def __enter__(self) -> "_Cursor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def __iter__(self):
        return iter(self.rows)

    def iternext(self, keys: bool = True, values: bool = True):
        for k, v in self.rows:
            yield (k, v) if keys and values else (k if keys else v)


class _Txn:
    """The part of an LMDB read transaction that meta.ReadTxn and Meta.catalog_digest use."""

    def __init__(self, tables: dict[bytes, dict[bytes, bytes]]):
        self.tables = tables

    def get(self, key: bytes, default=None, db=None):
        return self.tables[db].get(bytes(key), default)

    def cursor(self, db=None) -> _Cursor:
        return _Cursor(sorted(self.tables[db].items()))


class FrozenMeta(M.Meta):
    """Every table of a metadata environment as of one committed transaction, held in memory.

    Reads (``read()``) are served from the copy, so all of them see one state of the store
    whatever the writer commits meanwhile, and no LMDB read transaction stays open while the
    files are read.  The MAC key and version are set on it as on a Meta (Store.keys_only does)."""

    def __init__(self, live: M.Meta):      # super().__init__ opens an environment: not called
        self.live = live
        self.path = live.path
        self.env = None
        self.locked = live.locked
        self.dbs = {name: name for name in live.dbs}
        self.set_mac_key(None, version=live.mac_version)
        self.tables: dict[bytes, dict[bytes, bytes]] = {}
        self.txn_id: int | None = None
        self._copy()

    def _copy(self) -> None:
        try:
            with self.live.env.begin(write=False) as txn:
                tables = {}
                for name, handle in self.live.dbs.items():
                    with txn.cursor(db=handle) as cur:
                        tables[name] = {bytes(k): bytes(v) for k, v in cur}
                txn_id = txn.id()
        except Exception as exc:       # lmdb.Error
            raise StorageError(f"reading the metadata database {self.path} failed: {exc}") from None
        self.tables, self.txn_id = tables, txn_id

    def fresh(self) -> "FrozenMeta":
        """A new copy, as of now, under the same MAC key, its catalog authenticated (so that a record
        found missing in it was deleted by the writer, not behind walcrypt's back)."""
        new = FrozenMeta(self.live)
        new.set_mac_key(self.mac_key, version=self.mac_version)
        new.verify_catalog()
        return new

    def close(self) -> None:
        return None               # the live environment is closed by its owner

    @contextmanager
    def read(self) -> Iterator[M.ReadTxn]:
        yield M.ReadTxn(self, _Txn(self.tables))

    @contextmanager
    def write(self):
        raise UsageError("a frozen copy of the metadata is read-only")
        yield                     # pragma: no cover

    def ids(self, db: bytes) -> set[int]:
        """The IDs (big-endian u64 keys) of a manifest-like table (segments, snapshots)."""
        return {int.from_bytes(k, "big") for k in self.tables.get(db, {})}

    def state_ids(self, key: bytes) -> set[int]:
        """A u64 ID list of the state table (creating, purged, ...), unauthenticated; empty if damaged."""
        raw = self.tables.get(M.DB_STATE, {}).get(key)
        if raw is None or len(raw) < M.MAC_SIZE:
            return set()
        try:
            return set(M.decode_ids(raw[:-M.MAC_SIZE], self.path))
        except StorageError:
            return set()

    def counter(self, key: bytes) -> int | None:
        raw = self.tables.get(M.DB_STATE, {}).get(key)
        if raw is None or len(raw) != 8 + M.MAC_SIZE:
            return None
        return int.from_bytes(raw[:8], "little")


def frozen(meta_path: str) -> tuple[M.Meta, FrozenMeta]:
    """The live read-only environment (registered as a reader) and a copy of it."""
    live = M.Meta(meta_path, readonly=True)
    try:
        return live, FrozenMeta(live)
    except BaseException:
        live.close()
        raise


def txn_id(root: str) -> int | None:
    """The ID of the newest committed metadata transaction of ``root`` (None if unreadable)."""
    try:
        live = M.Meta(os.path.join(root, layout.META_DIR), readonly=True)
    except WalcryptError:
        return None
    try:
        with live.env.begin(write=False) as txn:
            return txn.id()
    except Exception:             # lmdb.Error
        return None
    finally:
        live.close()


# ---------------------------------------------------------------------------
# Files opened once, right after the copy
# ---------------------------------------------------------------------------

def _pin_limit() -> int:
    """How many files a reader pins at most: a quarter of the descriptor limit, 16 to 4096."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 16
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(16, min(soft // 4, 4096))


class PinnedVFS(VFS):
    """The real file system, except that a file :meth:`pin`-ned once is opened again as a duplicate
    of that first descriptor: the file read is the one the metadata copy named, even after the
    writer unlinked it.  Writing through it is refused."""

    def __init__(self, base: VFS | None = None):
        self.base = base or DEFAULT_VFS
        self.fds: dict[str, int] = {}
        self.limit = _pin_limit()

    def pin(self, path: str) -> bool:
        """Open ``path`` now; False when it does not exist.  Any other problem (a link, a FIFO) is
        left for the reader's own open to meet and report.  Beyond ``limit`` pinned files (a share
        of the process's descriptor limit) nothing more is pinned: those files are opened when
        they are read, and one gone by then is judged by a fresh read as well."""
        key = os.path.abspath(path)
        if key in self.fds or len(self.fds) >= self.limit:
            return True
        try:
            self.fds[key] = self.base.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except (OSError, StorageError):
            return True              # not gone: the reader's own open raises what it is
        return True

    def pinned(self, path: str) -> bool:
        return os.path.abspath(path) in self.fds

    def size_of(self, path: str) -> int | None:
        fd = self.fds.get(os.path.abspath(path))
        return None if fd is None else os.fstat(fd).st_size

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        fd = self.fds.get(os.path.abspath(path))
        if fd is None:
            return self.base.open(path, flags, mode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
            raise UsageError(f"{path} is pinned for reading")
        return os.dup(fd)

    def release(self) -> None:
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)


# ---------------------------------------------------------------------------
# The engine's read-only open on a store that may be changing
# ---------------------------------------------------------------------------

class ChangedMeanwhile(WalcryptError):
    """Every attempt to read the store met a change by its running writer; nothing was found wrong."""


def _error_key(exc: BaseException) -> tuple:
    return (type(exc).__name__, getattr(exc, "path", None), getattr(exc, "offset", None), str(exc))


def _is_live_tail(root: str, exc: BaseException) -> bool:
    """A read-only open refusing the torn tail (storage._repair_tail) of the newest segment, which is
    still open, while a writer holds the store: the writer's write unit in progress."""
    if type(exc) is not CorruptionError or not str(getattr(exc, "detail", "")).startswith("torn tail ("):
        return False
    if not writer_active(root):
        return False
    try:
        live, copy = frozen(os.path.join(root, layout.META_DIR))
    except WalcryptError:
        return False
    live.close()
    rows = copy.tables.get(M.DB_SEGMENTS, {})
    if not rows:
        return False
    newest = max(rows)
    try:
        rec = M.decode_manifest(rows[newest][:-M.MAC_SIZE], copy.path)
    except StorageError:
        return False
    d = layout.WAL_ENCRYPTED if rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED else layout.WAL_PLAIN
    path = os.path.join(root, d, segment_file_name(int.from_bytes(newest, "big"), rec["base_index"]))
    return rec["state"] == fmt.SEG_OPEN and os.path.abspath(path) == os.path.abspath(str(exc.path))


def engine_open(root: str, kek, encrypted: bool, *, live: bool | None = None):
    """``Store(root, read_only=True)``, the engine's own read-only open, on a store a writer may be
    changing.  Without a running writer: one attempt, its error raised as it is.  With one: an
    error is raised only when two consecutive attempts fail alike and no metadata transaction
    committed from the start of the first to the end of the second (a segment removed or created,
    a snapshot dropped meanwhile commits one), and it is not the writer's unit in progress at the
    tail of its newest segment.  :class:`ChangedMeanwhile` when no attempt could tell."""
    if live is None:
        live = writer_active(root)
    if not live:
        try:
            return Store(root, kek=kek, encrypted=encrypted, read_only=True)
        except (UsageError, LockedError, KeyProviderError, WrongKeyError):
            raise
        except WalcryptError:
            if not writer_active(root):
                raise             # a stopped store: the error stands
            # a writer started meanwhile (its recovery may have changed what was read): try again below
    prev = None
    for _ in range(ATTEMPTS):
        before = txn_id(root)
        try:
            return Store(root, kek=kek, encrypted=encrypted, read_only=True)
        except (UsageError, LockedError, KeyProviderError, WrongKeyError):
            raise
        except WalcryptError as exc:
            after = txn_id(root)
            key = _error_key(exc)
            if prev is not None and prev[0] == key and prev[1] is not None and prev[1] == after:
                if _is_live_tail(root, exc):
                    where = getattr(exc, "path", root)
                    raise ChangedMeanwhile(f"{where}: the running writer is appending to it") from None
                raise
            prev = (key, before)
    raise ChangedMeanwhile(f"{root} changed during each of {ATTEMPTS} attempts to read it (a running writer)")

