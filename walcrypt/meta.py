"""The metadata database: one LMDB environment per data directory (``DATA/meta``).

It holds the store identity, the KEK parameters and check value, the keyring of
wrapped keys, the segment manifest, the stable key/value store and the
compaction/rotation state.  It is written when segments or keys change, never
once per append: a synced LMDB commit costs two flushes.

Every value except the store identity records carries a 16-byte MAC (HMAC-SHA256
under the metadata key, or keyless BLAKE2b for plaintext stores) over the
database name, the key and the value, so that editing the manifest or the
keyring is detected as :class:`AuthenticationError`.

Concurrency: one writer process (the ``LOCK`` flock guarantees it); within the
process the storage engine serialises writes.  Readers in other processes (verify,
inspect, export on a running store) open the environment read-only but *with* LMDB's
lock file: a read transaction registers in its reader table, so the writer never
reuses a page that transaction may still read (a lock-free reader of a live
environment can see torn pages).  Registering writes the reader slot into
``meta/lock.mdb``, nothing else.  Read transactions are kept short (copy, then
close): an open one holds back the writer's page reuse.  Without ``lock.mdb`` (no
process has opened the environment since it was copied) or on a read-only file
system, a reader opens it without the lock.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, cast

import lmdb

from . import format as fmt
from .errors import (
    WIPE_ADVICE,
    AuthenticationError,
    CorruptionError,
    StorageError,
    UsageError,
)
from .lmdb_errors import DAMAGED_HINT, MAP_SIZE, lmdb_error  # noqa: F401 - re-exported (M.lmdb_error)
from .metarecords import (  # noqa: F401 - the metadata layer's record codecs, used as M.<name>
    CATALOG_SIZE,
    decode_compacted,
    decode_counter,
    decode_ids,
    decode_keyring,
    decode_manifest,
    encode_compacted,
    encode_ids,
    encode_keyring,
    encode_manifest,
    u64,
)
from .metaschema import (  # noqa: F401 - the tables, keys and MACs of meta/, used as M.<name>
    CATALOG_DBS,
    DB_KEYRING,
    DB_SEGMENTS,
    DB_SNAPSHOTS,
    DB_STABLE,
    DB_STATE,
    DB_STORE,
    FIRST_DOMAIN_TAGGED_VERSION,
    K_ALGORITHM,
    K_COMPACTED,
    K_CREATING,
    K_ENCRYPTED,
    K_FORMAT_VERSION,
    K_KEK_CHECK,
    K_KEK_PARAMS,
    K_META_KEY,
    K_META_KEY_ID,
    K_MIGRATION,
    K_NEXT_SEGMENT,
    K_NEXT_SNAPSHOT,
    K_PURGED,
    K_ROTATION,
    K_SNAP_CREATING,
    K_SNAP_PURGED,
    K_STAGING,
    K_STORE_ID,
    MAC_DOMAIN_V3,
    MAC_SIZE,
    keyed_mac,
    keyless_mac,
)
from .metascrub import ScrubMixin, scrub_key
from .vfs import pinned_files, refuse_link

log = logging.getLogger("walcrypt")

_HANDOVER = threading.Lock()     # taking an environment's handles to close them (see Meta._close_env)


LEGACY_COMPACT_NAME = "data.mdb.compact"   # a copy earlier versions wrote (removed at read-write open)
# scrub(): a scratch table (not one of walcrypt's: no catalog, MAC or reader ever sees it), filled
# with zeros until LMDB has reused every free page it may, then emptied; records in it mean that a
# scrub is due (FORMAT.md 9.11).


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Meta(ScrubMixin):
    """Thin, typed access to the LMDB environment."""

    def __init__(self, path: str, *, readonly: bool = False, create: bool = True):
        self.path = path
        # Transactions against _renew: how deep each thread is inside a transaction, and the thread
        # renewing the environment, if any.
        self._gate = threading.Condition()
        self._depth: dict[int, int] = {}
        self._renewer: int | None = None
        self.broken = False
        created = False
        # LMDB opens its files by name and follows links: refuse them before it does.
        for p in (path, *(os.path.join(path, n) for n in ("data.mdb", "lock.mdb", LEGACY_COMPACT_NAME))):
            refuse_link(p)
        if not os.path.isdir(path):
            if readonly or not create:
                raise UsageError(f"{path} does not exist: not a walcrypt data directory")
            os.makedirs(path, mode=0o700, exist_ok=True)
            created = True
        # An lmdb.Environment (untyped) while open, None before and once closed: cast, so that the type
        # checker does not narrow it to None through _open_env, which sets it.
        self.env: Any = cast(Any, None)
        self._fds: list[int] = []           # the pinned files, open as long as the environment (vfs.pinned_files)
        self.locked = not readonly          # registered in LMDB's reader table (see the module doc)
        try:
            fresh = created or not os.path.exists(os.path.join(path, "data.mdb"))
            # LMDB opens its files by name: it is handed links to descriptors of the files checked here
            # (regular, one name only, not followed), so a name swapped in after the check is never used.
            self._open_env(readonly=readonly, create=not readonly)
        except BaseException as exc:
            # Interrupted while the pinned names were cleaned up: the environment is open, and LMDB
            # refuses a second handle on it in this process, so it must not leak.
            self._close_env()
            if isinstance(exc, lmdb.Error):
                raise lmdb_error(exc, path, "opening") from exc
            raise
        # From here any exception (KeyboardInterrupt included) closes the environment: LMDB refuses a
        # second handle on it in this process, so a leaked one would block every later open.
        try:
            if fresh and not readonly:
                # LMDB syncs its files, never the directory entries that name them.
                _fsync_dir(path)
                _fsync_dir(os.path.dirname(os.path.abspath(path)))
            # Tables are created only in a file that never had a commit: an existing file whose store
            # table is missing is refused, never written an empty tree (it may be a file LMDB reads
            # through the wrong meta page, or not walcrypt's at all).
            blank = fresh or self.env.info()["last_txnid"] == 0
            if not readonly and not blank:
                with self.env.begin() as txn:
                    if txn.get(DB_STORE) is None:
                        raise CorruptionError(os.path.join(path, "data.mdb"), None, "the metadata database lacks "
                                              "the walcrypt table store (damaged, or replaced by another LMDB "
                                              "database)", DAMAGED_HINT)
            self.dbs = {}
            missing = []
            for name in (DB_STORE, DB_KEYRING, DB_SEGMENTS, DB_STABLE, DB_STATE, DB_SNAPSHOTS):
                try:
                    self.dbs[name] = self.env.open_db(name, create=not readonly)
                except lmdb.NotFoundError:
                    missing.append(name.decode())
            if missing:
                raise CorruptionError(os.path.join(path, "data.mdb"), None, "the metadata database lacks the "
                                      f"walcrypt table(s) {', '.join(missing)} (damaged, or replaced by another "
                                      "LMDB database)", DAMAGED_HINT)
            if not readonly:
                self._remove_legacy_copy()
        except lmdb.Error as exc:
            self._close_env()
            raise lmdb_error(exc, path, "opening") from exc
        except BaseException:
            self._close_env()
            raise
        self._mac_key: bytes | None = None
        self.mac_version = fmt.META_FORMAT_VERSION

    def _open_env(self, *, readonly: bool, create: bool) -> None:
        """Open the LMDB environment into ``self.env`` through pinned descriptors (FORMAT.md 15: LMDB
        opens its files by name and would follow a name swapped in after the checks), kept open in
        ``self._fds`` until the environment is closed (closing one earlier drops LMDB's record locks
        on lock.mdb: vfs.pinned_files).  A reader pins lock.mdb read-write (never creating it): its
        reader slot is written there."""
        path = self.path
        names: tuple[str, ...] = ("data.mdb", "lock.mdb")
        writable_names = ("lock.mdb",) if readonly else ()
        for attempt in (0, 1):
            try:
                with pinned_files(path, names, writable=not readonly, create=create,
                                  writable_names=writable_names, keep=self._fds) as lmdb_dir:
                    if readonly:
                        self.locked = os.path.lexists(os.path.join(lmdb_dir, "lock.mdb"))
                    self.env = lmdb.open(lmdb_dir, map_size=MAP_SIZE, max_dbs=8, subdir=True,
                                         readonly=readonly, lock=self.locked, sync=True, metasync=True,
                                         mode=0o600, create=not readonly)
                return
            except OSError as exc:
                lock_path = os.path.join(path, "lock.mdb")
                if not readonly or attempt or os.path.basename(str(exc.filename or "")) != "lock.mdb":
                    raise
                if exc.errno == errno.EROFS:
                    names = ("data.mdb",)        # a read-only file system: read without the lock file
                    continue
                if exc.errno in (errno.EACCES, errno.EPERM):
                    raise UsageError(
                        f"no permission to open {lock_path} for writing: a reader registers in LMDB's lock "
                        "file so that a running writer never reuses the pages it reads; run as the user "
                        "that owns the store") from None
                raise

    def close(self) -> None:
        self._close_env()

    def _remove_legacy_copy(self) -> None:
        """An earlier walcrypt compacted data.mdb by writing a copy to ``LEGACY_COMPACT_NAME`` and
        renaming it over data.mdb; a copy an interruption left behind holds old records: removed."""
        stale = os.path.join(self.path, LEGACY_COMPACT_NAME)
        if os.path.lexists(stale):
            try:
                os.unlink(stale)
                _fsync_dir(self.path)
            except OSError as exc:
                log.warning("could not remove %s (%s): it may hold old versions of metadata records", stale, exc)

    def _close_env(self) -> None:
        """The environment first, then the pinned descriptors (closing one of those first would drop
        LMDB's record locks on lock.mdb while the environment still uses it: vfs.pinned_files).
        Each is taken before it is closed, so an interrupted close never closes anything twice, and
        taken under a lock, so two threads closing at once (a host's close racing its own) do not both
        take it: a descriptor closed twice may be one another thread has been given meanwhile."""
        with _HANDOVER:
            env, self.env = self.env, None
        try:
            if env is not None:
                env.close()
        finally:
            with _HANDOVER:
                fds, self._fds = self._fds, []
            for fd in fds:
                os.close(fd)

    # -- MAC ---------------------------------------------------------------
    @property
    def mac_key(self) -> bytes | None:
        """The metadata MAC key in use (None: a plaintext store's keyless MACs)."""
        return self._mac_key

    def set_mac_key(self, key: bytes | None, *, version: int | None = None) -> None:
        """The MAC key (None: keyless) and the metadata format version whose MAC domain applies
        (default: unchanged; a new Meta starts at the current version)."""
        self._mac_key = key
        if version is not None:
            self.mac_version = version

    def mac(self, db: bytes, key: bytes, value: bytes) -> bytes:
        if self._mac_key is None:
            return keyless_mac(db, key, value, version=self.mac_version)
        return keyed_mac(self._mac_key, db, key, value, version=self.mac_version)

    def seal_value(self, db: bytes, key: bytes, value: bytes) -> bytes:
        return value + self.mac(db, key, value)

    def open_value(self, db: bytes, key: bytes, stored: bytes, *, verify: bool = True) -> bytes:
        if len(stored) < MAC_SIZE:
            raise CorruptionError(self.path, None, f"metadata record {db.decode()}/{key.hex()} is truncated")
        value, tag = stored[:-MAC_SIZE], stored[-MAC_SIZE:]
        if verify and not hmac.compare_digest(tag, self.mac(db, key, value)):
            raise AuthenticationError(
                self.path, None, f"metadata record {db.decode()}/{key.hex()} failed its MAC check (edited or damaged)",
                "restore the node from a snapshot export or " + WIPE_ADVICE)
        return value

    # -- transactions --------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator["WriteTxn"]:
        try:
            with self._txn(write=True) as txn:
                yield WriteTxn(self, txn)
                self._seal_catalog(txn)
        except lmdb.Error as exc:
            raise lmdb_error(exc, self.path, "committing to") from exc

    # -- the catalog: which records exist -------------------------------------------------
    # A MAC per value cannot show that a record was deleted (or that a table was emptied): anyone
    # who can write meta/ could drop a manifest record, a snapshot registration or the rotation
    # record without a key.  So every write transaction also seals a digest of the set of keys of
    # every MAC'd table into the compaction-point record (which every open reads and which is
    # itself MAC'd), and opening checks it.  Version 1 stores carry a 24-byte compaction record
    # without a catalog; from version 2 on (whose upgrade sealed the catalog in the upgrading
    # commit) a record without a catalog is refused.
    def catalog_digest(self, txn) -> bytes:
        h = hashlib.sha256(b"walcrypt/v1/catalog")
        for db in CATALOG_DBS:
            with txn.cursor(db=self.dbs[db]) as cur:
                for k in cur.iternext(keys=True, values=False):
                    if db == DB_STATE and k == K_COMPACTED:
                        continue
                    h.update(len(db).to_bytes(4, "little") + db + len(k).to_bytes(4, "little") + bytes(k))
        return h.digest()

    def _seal_catalog(self, txn) -> None:
        raw = txn.get(K_COMPACTED, db=self.dbs[DB_STATE])
        if raw is None:
            return                      # not a store yet (bootstrap writes the record)
        value = self.open_value(DB_STATE, K_COMPACTED, bytes(raw))
        txn.put(K_COMPACTED, self.seal_value(DB_STATE, K_COMPACTED, value[:24] + self.catalog_digest(txn)),
                db=self.dbs[DB_STATE])

    def verify_catalog(self) -> None:
        """AuthenticationError when a MAC'd record was deleted or added behind walcrypt's back."""
        with self.read() as r:
            raw = r.get(DB_STATE, K_COMPACTED)
            if raw is None:
                return                  # no store yet
            if len(raw) == 24 and self.mac_version < 2:     # version 2 sealed it at its upgrade
                return                  # written before the catalog existed
            if len(raw) != 24 + CATALOG_SIZE or not hmac.compare_digest(raw[24:], self.catalog_digest(r.txn)):
                raise AuthenticationError(
                    self.path, None, "the set of metadata records does not match its catalog: a record (a segment "
                    "or snapshot registration, a key, the rotation state, a stable value) was deleted or added "
                    "without the key", "do not trust this directory; restore the node from a snapshot export or "
                    + WIPE_ADVICE)

    @contextmanager
    def read(self) -> Iterator["ReadTxn"]:
        try:
            with self._txn(write=False) as txn:
                yield ReadTxn(self, txn)
        except lmdb.Error as exc:
            raise lmdb_error(exc, self.path, "reading") from exc

    # -- scrubbing: old versions of records overwritten in place -------------------------------
    # LMDB writes copy-on-write: a record overwritten or deleted stays, byte for byte, in pages
    # LMDB keeps on its free list until it happens to reuse them.  A destroyed data key, or every
    # key wrapped under a KEK that was just replaced, would live on in meta/data.mdb.  scrub()
    # makes LMDB itself overwrite every reusable free page, in the same file (FORMAT.md 9.11):
    # readers in other processes share meta/lock.mdb with the writer, so the files are never
    # swapped under them.

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """A transaction of this thread: waits while another thread renews the environment."""
        me = threading.get_ident()
        depth = self._depth.get(me, 0)       # only this thread changes its own count
        try:
            with self._gate:
                while self._renewer is not None and self._renewer != me:
                    self._gate.wait()
                self._depth[me] = depth + 1
            yield
        finally:
            with self._gate:
                if depth:
                    self._depth[me] = depth
                else:
                    self._depth.pop(me, None)
                self._gate.notify_all()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """No transaction of any thread from here to the end of the block (new ones wait)."""
        me = threading.get_ident()
        if self._depth.get(me):
            raise UsageError("the metadata file cannot be scrubbed from inside a metadata transaction")
        try:
            with self._gate:
                while self._renewer is not None:
                    self._gate.wait()
                self._renewer = me
                while any(n for t, n in self._depth.items() if t != me):
                    self._gate.wait()
            yield
        finally:
            with self._gate:
                if self._renewer == me:
                    self._renewer = None
                self._gate.notify_all()

    def _renew(self) -> None:
        """Close the environment and open it again on the same files (data.mdb and lock.mdb stay as
        they are: readers in other processes are not disturbed).  This empties LMDB's pool of page
        buffers: a buffer LMDB reuses for a new page version is not cleared, so the unused middle of
        a page it writes can repeat bytes of whatever page the buffer held before -- a keyring page
        with a key since destroyed, say.  Every buffer after this is new (zeroed).  If the open
        fails, the closed environment stays in place (every transaction fails) and ``broken`` is set."""
        with self._exclusive():
            env = self.env
            env.close()
            fds, self._fds = self._fds, []           # after the environment (_close_env)
            for fd in fds:
                os.close(fd)
            try:
                self._open_env(readonly=False, create=False)
                self.dbs = {name: self.env.open_db(name, create=False) for name in self.dbs}
            except BaseException as exc:
                self._close_env()
                self.env, self.broken = env, True
                if isinstance(exc, (OSError, lmdb.Error)):
                    raise StorageError(f"reopening the metadata database {self.path} failed: {exc}; "
                                       "reopen the store") from None
                raise

    @contextmanager
    def _txn(self, *, write: bool) -> Iterator:
        with self._in_use():
            with self.env.begin(write=write) as txn:
                yield txn


class ReadTxn:
    def __init__(self, meta: Meta, txn):
        self.meta = meta
        self.txn = txn

    def raw(self, db: bytes, key: bytes) -> bytes | None:
        v = self.txn.get(key, db=self.meta.dbs[db])
        return None if v is None else bytes(v)

    def get(self, db: bytes, key: bytes, *, verify: bool = True) -> bytes | None:
        v = self.raw(db, key)
        return None if v is None else self.meta.open_value(db, key, v, verify=verify)

    def items(self, db: bytes, *, verify: bool = True) -> list[tuple[bytes, bytes]]:
        with self.txn.cursor(db=self.meta.dbs[db]) as cur:
            return [(bytes(k), self.meta.open_value(db, bytes(k), bytes(v), verify=verify)) for k, v in cur]

    def raw_items(self, db: bytes) -> list[tuple[bytes, bytes]]:
        with self.txn.cursor(db=self.meta.dbs[db]) as cur:
            return [(bytes(k), bytes(v)) for k, v in cur]

    def store_json(self, key: bytes) -> dict | None:
        v = self.raw(DB_STORE, key)
        if v is None:
            return None
        try:
            return json.loads(v)
        except ValueError:
            raise CorruptionError(self.meta.path, None, f"store record {key.decode()} is not valid JSON") from None


class WriteTxn(ReadTxn):
    def put_raw(self, db: bytes, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.meta.dbs[db])

    def put(self, db: bytes, key: bytes, value: bytes) -> None:
        self.txn.put(key, self.meta.seal_value(db, key, value), db=self.meta.dbs[db])

    def delete(self, db: bytes, key: bytes) -> None:
        self.txn.delete(key, db=self.meta.dbs[db])

    def create_scrub_table(self) -> None:
        """At bootstrap: the scratch table, empty (no scrub is due in a file nothing was replaced in)."""
        self.meta.scratch_table(self.txn, create=True)

    def mark_scrub_pending(self) -> None:
        """In the commit that replaces key material (a key destroyed, every key re-wrapped): a record
        in the scratch table, so that a crash before the scrub that follows is made good by the next
        read-write open (Meta.scrub_pending); the scrub empties the table."""
        self.txn.put(scrub_key(0), b"", db=self.meta.scratch_table(self.txn, create=True))


def upgrade(meta: Meta, from_version: int) -> None:
    """Bring a store written under an older metadata format version to the current one, in one
    LMDB commit: every MAC'd record is verified under its old MAC domain and re-MAC'd under the
    current one, the catalog is sealed and ``store/format_version`` set.  An interruption leaves
    the old version whole (LMDB commits atomically); the MAC domain in memory follows the commit."""
    with meta.read() as r:
        records = {db: r.items(db) for db in CATALOG_DBS}      # verified under the old domain
    meta.set_mac_key(meta._mac_key, version=fmt.META_FORMAT_VERSION)
    try:
        with meta.write() as w:
            for db, items in records.items():
                for k, v in items:
                    w.put(db, k, v)
            w.put_raw(DB_STORE, K_FORMAT_VERSION, bytes([fmt.META_FORMAT_VERSION]))
    except BaseException:
        meta.set_mac_key(meta._mac_key, version=from_version)
        raise


# -- typed records ----------------------------------------------------------------


MacFunction = Callable[[bytes, bytes, bytes], bytes]


