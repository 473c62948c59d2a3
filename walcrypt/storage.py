"""The engine: open/bootstrap a data directory, recover it, and serve the Storage API.

Order of operations on open (nothing is modified before the KEK is proven):
lock -> metadata -> KEK check value -> unwrap keys -> verify manifest MACs ->
open segments (sealed: read their index; open: scan and repair a torn tail,
keeping a ``.broken`` copy) -> remove orphan segment files that never made it
into the manifest.  Writing always continues in a fresh segment.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Sequence

from . import crypto, layout
from . import format as fmt
from . import keys as K
from . import meta as M
from .bounded import FileSource
from .errors import (
    WIPE_ADVICE,
    AuthenticationError,
    CompactedError,
    CorruptionError,
    KeyNotFoundError,
    KeyProviderError,
    KeyProviderUnavailableError,
    StorageError,
    StoreFailedError,
    SymlinkError,
    UnsafeFileError,
    UnsupportedFormatError,
    UsageError,
    WalcryptError,
    WrongKeyError,
    os_error_advice,
)
from .rotation import DEFAULT_MAX_BYTES_PER_DEK, DEFAULT_MAX_RECORDS_PER_DEK, Rotation
from .segment import Segment, SegmentIdentity, decode_header, segment_file_name
from .snapstore import Snapshot, Snapshots
from .types import ConfState, Entry, HardState, SnapshotMeta
from .vfs import DEFAULT_VFS, VFS
from .wal import MAX_ENTRY_INDEX, SYNC_POLICIES, U64_MAX, Wal, _as_bytes, check_u64

log = logging.getLogger("walcrypt")

_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")
STAGING_BLOCK = 1 << 16      # segment IDs reserved at a time for a staged rewrite (re-key)


class _FailStop:
    """Fail-stop for the steps of a mutating operation (a segment cut or seal, a snapshot publish,
    compaction, rotation, re-key, KEK rotation): any exception that escapes -- an OSError (failed
    write, fsync, rename, unlink, full disk), but also KeyboardInterrupt, MemoryError or an
    exception raised from a signal handler -- leaves the store failed: it refuses writes with
    StoreFailedError until it is reopened, which runs recovery.  An OSError surfaces as
    StoreFailedError; anything else propagates unchanged.  Validation of the caller's arguments
    happens before a guard is entered, and the host's own code (a snapshot source, the stream a
    snapshot is read from) runs outside guards: its exceptions leave the store as it is."""

    __slots__ = ("store", "what")

    def __init__(self, store: "Store", what: str):
        self.store, self.what = store, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        self.store.wal.fail(exc)
        if issubclass(exc_type, OSError):
            raise StoreFailedError(f"{self.what} failed: {exc}; the store refuses writes until it is reopened "
                                   "(reopening runs recovery; free space first if the disk is full)") from exc
        return False


MAX_STABLE_KEY = 400               # LMDB's key limit, with room for the table's own prefix
MAX_SEGMENT_SIZE = 1 << 40          # segment_size: frames and offsets stay far inside their u64 fields


def _stable_key(key) -> bytes:
    key = _as_bytes(key, "a stable-store key")
    if not 1 <= len(key) <= MAX_STABLE_KEY:
        raise UsageError(f"a stable-store key is 1 to {MAX_STABLE_KEY} bytes, not {len(key)}")
    return key


def _check_bool(value, what: str) -> None:
    if type(value) is not bool:
        raise UsageError(f"{what} must be True or False, not {value!r}")


def _check_options(*, kek, encrypted, sync, segment_size, algorithm, max_entry_size, read_only, keep_snapshots,
                   snapshot_chunk_size, snapshot_source, destroy_retired_keys, max_records_per_dek,
                   max_bytes_per_dek, max_dek_age_s) -> None:
    """Every option of open(), checked before anything is touched, against what the readers accept
    (FORMAT.md 13): a UsageError naming the option."""
    for name, value in (("encrypted", encrypted), ("read_only", read_only),
                        ("destroy_retired_keys", destroy_retired_keys)):
        _check_bool(value, name)
    if kek is not None and not isinstance(kek, K.KeyEncryptionKey):
        raise UsageError(f"kek must be a key-encryption key (RawKey, KeyFile, Passphrase, EnvKey, Kms), not "
                         f"{type(kek).__name__}")
    if not isinstance(sync, str) or sync not in SYNC_POLICIES:
        raise UsageError(f"sync must be one of {', '.join(SYNC_POLICIES)}, not {sync!r}")
    if not isinstance(algorithm, str):
        raise UsageError(f"algorithm must be a cipher suite name, not {type(algorithm).__name__}")
    if encrypted:
        if crypto.suite_by_name(algorithm).alg_id == fmt.ALG_NONE:   # (UsageError for an unknown suite)
            raise UsageError(f"algorithm {algorithm!r} is the plaintext format: an encrypted store needs a cipher "
                             "suite (aes-256-gcm, chacha20-poly1305, aes-256-gcm-siv); for a plaintext store pass "
                             "encrypted=False")
    check_u64(segment_size, "segment_size", 4096, MAX_SEGMENT_SIZE)
    # The limit leaves room for the rest of the record the entry may share (FORMAT.md 13), and a record
    # is never built beyond the readers' bound (Wal._records): a larger entry could be acknowledged in a
    # record every reader refuses.
    check_u64(max_entry_size, "max_entry_size", 1, min(fmt.MAX_ENTRY_SIZE_LIMIT, fmt.max_entry_size_bound()))
    check_u64(keep_snapshots, "keep_snapshots", 1, U64_MAX)
    check_u64(snapshot_chunk_size, "snapshot_chunk_size", 1, fmt.MAX_SNAPSHOT_CHUNK)
    check_u64(max_records_per_dek, "max_records_per_dek", 1, U64_MAX)
    check_u64(max_bytes_per_dek, "max_bytes_per_dek", 1, U64_MAX)
    if max_dek_age_s is not None:
        if isinstance(max_dek_age_s, bool) or not isinstance(max_dek_age_s, (int, float)) \
                or not 0 < max_dek_age_s < float("inf"):
            raise UsageError(f"max_dek_age_s must be a positive number of seconds or None, not {max_dek_age_s!r}")
    if snapshot_source is not None and not callable(snapshot_source):
        raise UsageError(f"snapshot_source must be callable or None, not {type(snapshot_source).__name__}")


class Store:
    """An open walcrypt data directory.  Use :func:`walcrypt.open`.

    Thread safety: ``save`` may be called from several threads (group commit);
    reads may run concurrently with writes.  One process opens a directory at a time.
    """

    def __init__(self, path: str, *, kek: K.KeyEncryptionKey | None = None, encrypted: bool = True,
                 sync: str = "batch", segment_size: int = 64 << 20, algorithm: str = "aes-256-gcm",
                 max_entry_size: int = fmt.MAX_ENTRY_SIZE_DEFAULT, read_only: bool = False,
                 keep_snapshots: int = 2, snapshot_chunk_size: int = 1 << 20, snapshot_source=None,
                 destroy_retired_keys: bool = False, max_records_per_dek: int = DEFAULT_MAX_RECORDS_PER_DEK,
                 max_bytes_per_dek: int = DEFAULT_MAX_BYTES_PER_DEK, max_dek_age_s: float | None = None,
                 vfs: VFS | None = None, _dirlock: layout.DirLock | None = None, _holder: list | None = None,
                 _drop_segments: frozenset = frozenset()):
        """``_drop_segments``: segment IDs 'walcrypt repair' found damaged (check.py): the open treats
        them as it treats damage it finds itself (see walcrypt.salvage)."""
        self.path = os.path.abspath(os.fspath(path))
        self._drop_segments = frozenset(_drop_segments)
        self.vfs = vfs or DEFAULT_VFS
        self.read_only = read_only
        self.encrypted = encrypted
        self.closed = True
        self._released = True                # set to False once there is something to release
        self.repairs: list[dict] = []
        _check_options(kek=kek, encrypted=encrypted, sync=sync, segment_size=segment_size, algorithm=algorithm,
                       max_entry_size=max_entry_size, read_only=read_only, keep_snapshots=keep_snapshots,
                       snapshot_chunk_size=snapshot_chunk_size, snapshot_source=snapshot_source,
                       destroy_retired_keys=destroy_retired_keys, max_records_per_dek=max_records_per_dek,
                       max_bytes_per_dek=max_bytes_per_dek, max_dek_age_s=max_dek_age_s)
        if encrypted and kek is None:
            raise KeyProviderError(
                "this store is encrypted and no key-encryption key was given; pass kek=KeyFile(...), "
                "RawKey(...), Passphrase(...) or EnvKey(...) (or encrypted=False for a plaintext store)")
        if not encrypted and kek is not None:
            raise UsageError("a KEK was given for a plaintext store; drop kek= or open with encrypted=True")
        self._kek = kek
        self._prepare_root()
        held: list = [_dirlock] if _dirlock else []      # the lock, even if we are interrupted storing it
        self._lock = None
        try:
            if not held:
                if read_only:
                    layout.ReadOnlyHold(self.path, holder=held)
                else:
                    layout.DirLock(self.path, holder=held)
            self._lock = held[0]
            self.meta = M.Meta(os.path.join(self.path, layout.META_DIR), readonly=read_only)
            try:
                self.open_keys(kek, algorithm)
                if not read_only:
                    from .migrate import cleanup_interrupted
                    cleanup_interrupted(self)
                self.pair = layout.pair_for(self.encrypted)
                self.wal_dir = os.path.join(self.path, self.pair.wal)
                if not read_only:
                    self.ensure_dir(self.wal_dir)
                self.wal = Wal(self, sync=sync, segment_size=segment_size, max_entry_size=max_entry_size)
                self.snapshots = Snapshots(self, os.path.join(self.path, self.pair.snap), keep=keep_snapshots,
                                           chunk_size=snapshot_chunk_size)
                self.rotation = Rotation(self, snapshot_source=snapshot_source,
                                         destroy_retired_keys=destroy_retired_keys,
                                         max_records_per_dek=max_records_per_dek,
                                         max_bytes_per_dek=max_bytes_per_dek, max_dek_age_s=max_dek_age_s)
                self._recover()
            except BaseException:
                self.meta.close()
                raise
        except BaseException as exc:
            for lock in held:
                lock.release()
            if isinstance(exc, OSError):
                raise StorageError(f"opening {self.path} failed: {exc} ({os_error_advice(exc)})") from exc
            raise
        self.closed = False
        self._released = False
        if not read_only:
            try:
                self.rotation.resume()        # finish a rotation a crash interrupted (may call snapshot_source)
                self._refresh_snapshot_bundles()
                if self.encrypted and self.meta.scrub_pending():
                    self.scrub_meta()        # no key outlives its record (scrub_meta), a crash notwithstanding
            except BaseException as exc:
                self.close()
                if isinstance(exc, OSError):
                    raise StorageError(f"finishing an interrupted DEK rotation in {self.path} failed: {exc}; "
                                       "free space if the disk is full and open again (nothing was lost)") from exc
                raise
        if _holder is not None:
            _holder.append(self)              # walcrypt.open closes it if interrupted before returning it

    # ------------------------------------------------------------------ bootstrap
    def _prepare_root(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"{self.path} exists and is not a directory")
        layout.refuse_links(self.path)
        if os.path.isdir(self.path) and not layout.looks_like_store(self.path) and layout.data_files(self.path):
            raise metadata_lost(os.path.join(self.path, layout.META_DIR), "the metadata directory is missing")
        if self.read_only:
            if not layout.looks_like_store(self.path):
                raise UsageError(f"{self.path} is not a walcrypt data directory (no meta/)")
            return
        if not os.path.isdir(self.path):
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self.vfs.fsync_dir(os.path.dirname(self.path))
        elif os.listdir(self.path) and not layout.looks_like_store(self.path):
            raise UsageError(f"{self.path} is not empty and is not a walcrypt data directory; "
                             "choose an empty or new directory")

    def open_keys(self, kek: K.KeyEncryptionKey | None, algorithm: str) -> None:
        with self.meta.read() as r:
            store_id = r.raw(M.DB_STORE, M.K_STORE_ID)
            stored_enc = r.raw(M.DB_STORE, M.K_ENCRYPTED)
        if store_id is None:
            if self.read_only:
                raise UsageError(f"{self.path} is not an initialised walcrypt store")
            if layout.pairs_with_data(self.path):
                raise metadata_lost(self.meta.path, "the metadata holds no store record")
            self._bootstrap(kek, algorithm)
            return
        if len(store_id) != fmt.STORE_ID_SIZE or stored_enc not in (b"\x00", b"\x01"):
            raise CorruptionError(self.meta.path, None, "store identity record is damaged")
        with self.meta.read() as r:
            version = r.raw(M.DB_STORE, M.K_FORMAT_VERSION)
        if version is None or len(version) != 1 or version[0] not in fmt.META_FORMAT_VERSIONS_READ:
            raise UnsupportedFormatError(
                f"{self.path} uses metadata format version {version[0] if version else '?'}; this walcrypt reads "
                f"versions {', '.join(map(str, fmt.META_FORMAT_VERSIONS_READ))} - upgrade walcrypt")
        self.meta_version = version[0]
        self.store_id = store_id
        if (stored_enc == b"\x01") != self.encrypted:
            have = "encrypted" if stored_enc == b"\x01" else "plaintext"
            raise UsageError(f"{self.path} is a {have} store; open it with "
                             + ("kek=..." if have == "encrypted" else "encrypted=False"))
        with self.meta.read() as r:
            alg = r.raw(M.DB_STORE, M.K_ALGORITHM)
            raw_params = r.raw(M.DB_STORE, M.K_KEK_PARAMS)
            check = r.raw(M.DB_STORE, M.K_KEK_CHECK)
            wrapped_meta = r.raw(M.DB_STORE, M.K_META_KEY)
            meta_key_id = r.raw(M.DB_STORE, M.K_META_KEY_ID)
        stored_alg = alg[0] if alg and len(alg) == 1 else None
        params = K.parse_kek_params(raw_params, self.meta.path) if self.encrypted else None
        self.kek_params = params
        self.keys: dict[bytes, K.KeyEntry] = {}
        self._secrets: dict[bytes, K.SecretKey] = {}
        if not self.encrypted:
            if stored_alg != fmt.ALG_NONE:
                raise CorruptionError(self.meta.path, None, "the store record of a plaintext store names a cipher",
                                      "the metadata was edited or damaged; do not trust this directory")
            self.algorithm = fmt.ALG_NONE
            self.meta.set_mac_key(None, version=self.meta_version)
            self.meta.verify_catalog()
            self.load_keyring()
            return
        self.wrapper = kek.wrapper(params)
        cv = self.wrapper.check_value()
        if check and cv is not None and not crypto.constant_time_equal(cv, check):
            raise WrongKeyError(f"the key-encryption key given ({kek.describe()}) is not the one {self.path} "
                                "was created or last re-keyed with")
        if not wrapped_meta or not meta_key_id or len(meta_key_id) != fmt.KEY_ID_SIZE:
            raise CorruptionError(self.meta.path, None, "the wrapped metadata key is missing")
        meta_key = self.wrapper.unwrap(wrapped_meta, K.wrap_context(store_id, meta_key_id, K.PURPOSE_META))
        if len(meta_key) != K.KEY_SIZE:
            raise AuthenticationError(self.meta.path, None, "the metadata key unwrapped to a wrong size")
        self.meta_secret = K.SecretKey(meta_key)
        self.meta.set_mac_key(meta_key, version=self.meta_version)
        self.meta.verify_catalog()
        self.load_keyring()
        self.algorithm = self._authenticated_algorithm(stored_alg)
        if getattr(self.wrapper, "remote", False):
            # A key service is asked at open only: every key is unwrapped now, so that reads and
            # writes never wait on it (an outage later leaves the open store fully usable).
            for kid, entry in self.keys.items():
                if entry.state != K.DESTROYED:
                    self._secret(kid)

    def _authenticated_algorithm(self, stored_alg: int | None) -> int:
        """The cipher suite of an encrypted store, taken from its active data key.

        The ``store/algorithm`` record is not MAC'd (it predates the metadata key), so it is
        never trusted as read: the keyring records are MAC'd under the metadata key that only
        the KEK unwraps, and the active DEK's record names its suite.  A store record that
        disagrees, or a data key whose suite is NONE, is an edit of the metadata."""
        kid = self.active_key_id()
        alg = self.keys[kid].algorithm
        if alg == fmt.ALG_NONE or any(k.algorithm == fmt.ALG_NONE for k in self.keys.values()
                                      if k.purpose == K.PURPOSE_DEK):
            raise AuthenticationError(self.meta.path, None, "a data key of this encrypted store names the "
                                      "plaintext algorithm NONE", "the metadata was tampered with; restore the "
                                      "node from a snapshot export or " + WIPE_ADVICE)
        fmt.check_algorithm(alg, path=self.meta.path)
        if stored_alg != alg:
            raise AuthenticationError(self.meta.path, None,
                                      f"the store record names algorithm {stored_alg}, the authenticated keyring "
                                      f"says {alg} (edited metadata: an attempt to weaken or turn off encryption)",
                                      "do not trust this directory; restore the node from a snapshot export or "
                                      + WIPE_ADVICE)
        return alg

    def _bootstrap(self, kek: K.KeyEncryptionKey | None, algorithm: str) -> None:
        self.store_id = os.urandom(fmt.STORE_ID_SIZE)
        self.meta_version = fmt.META_FORMAT_VERSION
        self.keys, self._secrets = {}, {}
        with self.meta.write() as w:
            w.put_raw(M.DB_STORE, M.K_STORE_ID, self.store_id)
            w.put_raw(M.DB_STORE, M.K_FORMAT_VERSION, bytes([fmt.META_FORMAT_VERSION]))
            w.put_raw(M.DB_STORE, M.K_ENCRYPTED, b"\x01" if self.encrypted else b"\x00")
            if self.encrypted:
                self.algorithm = crypto.suite_by_name(algorithm).alg_id
                self.kek_params = kek.new_params()
                self.wrapper = kek.wrapper(self.kek_params)
                w.put_raw(M.DB_STORE, M.K_KEK_PARAMS, json.dumps(self.kek_params).encode())
                cv = self.wrapper.check_value()
                if cv is not None:
                    w.put_raw(M.DB_STORE, M.K_KEK_CHECK, cv)
                meta_entry, meta_secret = K.new_key_entry(self.wrapper, self.store_id, algorithm=0,
                                                          purpose=K.PURPOSE_META, state=K.ACTIVE)
                w.put_raw(M.DB_STORE, M.K_META_KEY_ID, meta_entry.key_id)
                w.put_raw(M.DB_STORE, M.K_META_KEY, meta_entry.wrapped)
                self.meta.set_mac_key(meta_secret.material, version=fmt.META_FORMAT_VERSION)
                self.meta_secret = meta_secret
                dek, secret = K.new_key_entry(self.wrapper, self.store_id, algorithm=self.algorithm,
                                              purpose=K.PURPOSE_DEK, state=K.ACTIVE)
                w.put(M.DB_KEYRING, dek.key_id, M.encode_keyring(dek))
                self.keys[dek.key_id] = dek
                self._secrets[dek.key_id] = secret
                w.create_scrub_table()       # empty: nothing to scrub yet (FORMAT.md 9.11)
            else:
                self.algorithm = fmt.ALG_NONE
                self.kek_params = None
                self.meta.set_mac_key(None, version=fmt.META_FORMAT_VERSION)
            w.put_raw(M.DB_STORE, M.K_ALGORITHM, bytes([self.algorithm]))
            w.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(0, 0))
            w.put(M.DB_STATE, M.K_NEXT_SEGMENT, (1).to_bytes(8, "little"))
            w.put(M.DB_STATE, M.K_CREATING, b"")
            w.put(M.DB_STATE, M.K_SNAP_CREATING, b"")

    def load_keyring(self) -> None:
        with self.meta.read() as r:
            for key_id, value in r.items(M.DB_KEYRING):
                self.keys[key_id] = M.decode_keyring(key_id, value, self.meta.path)

    def active_key_id(self) -> bytes:
        if not self.encrypted:
            return crypto.ZERO_KEY_ID
        active = [k for k in self.keys.values() if k.state == K.ACTIVE and k.purpose == K.PURPOSE_DEK]
        if len(active) != 1:
            raise CorruptionError(self.meta.path, None, f"the keyring has {len(active)} active data keys, expected 1")
        return active[0].key_id

    def write_key_id(self) -> bytes:
        """The key new segments and snapshots are written under (pending during a rotation)."""
        pending = self.rotation.pending_key_id if self.encrypted else None
        return pending or self.active_key_id()

    def keyring_bundle(self, key_ids: set[bytes] | None = None, *, kek: dict | None = None) -> bytes:
        """The wrapped keys (never a KEK) that travel with a snapshot: only ``key_ids`` (the
        snapshot's own DEK), so a key destroyed later does not live on inside older files.
        ``kek``: the bundle as a KEK rotation being staged will make it (``params``, ``check``,
        ``meta_wrapped`` and ``wrapped`` by key ID, all under the new KEK)."""
        if not self.encrypted:
            return b""
        with self.meta.read() as r:
            meta_key_id = r.raw(M.DB_STORE, M.K_META_KEY_ID)
            meta_wrapped = r.raw(M.DB_STORE, M.K_META_KEY)
            check = r.raw(M.DB_STORE, M.K_KEK_CHECK)
        params, wrapped = self.kek_params, {k.key_id: k.wrapped for k in self.keys.values()}
        if kek is not None:
            params, check, meta_wrapped, wrapped = kek["params"], kek["check"], kek["meta_wrapped"], kek["wrapped"]
        doc = {"version": 1, "store_id": self.store_id.hex(), "algorithm": self.algorithm,
               "kek_params": params, "kek_check": check.hex() if check else None,
               "meta_key": {"id": meta_key_id.hex(), "wrapped": meta_wrapped.hex()},
               "keys": [{"id": k.key_id.hex(), "state": k.state, "algorithm": k.algorithm, "purpose": k.purpose,
                         "created_ns": k.created_ns, "state_changed_ns": k.state_changed_ns,
                         "wrapped": wrapped[k.key_id].hex()}
                        for k in list(self.keys.values())     # a copy: a rotation may add a key meanwhile
                        if k.state != K.DESTROYED and (key_ids is None or k.key_id in key_ids)]}
        return json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def _wraps(doc: dict) -> tuple:
        """What in a keyring bundle depends on the KEK: its parameters and check value and every
        wrapped key (states and times change without the bundle becoming stale)."""
        return (doc.get("kek_params"), doc.get("kek_check"), (doc.get("meta_key") or {}).get("wrapped"),
                sorted((k.get("id"), k.get("wrapped")) for k in doc.get("keys", ())))

    def bundle_is_current(self, info) -> bool:
        """Whether the keyring bundle inside a retained snapshot file holds the keys exactly as they
        are wrapped now (False: wrapped under an earlier KEK, or listing other keys)."""
        from .snapshot import SnapshotFile
        doc = SnapshotFile(self.vfs, info.path).bundle_doc()
        return self._wraps(doc) == self._wraps(json.loads(self.keyring_bundle({info.key_id})))

    # ------------------------------------------------------------------ key material at rest
    def scrub_meta(self, secrets=()) -> bool:
        """Overwrite the free pages of meta/data.mdb, after a key was destroyed or the KEK replaced:
        the records LMDB's copy-on-write left behind held the destroyed key, or every key wrapped
        under the old KEK (Meta.scrub, FORMAT.md 9.11).  ``secrets`` (the wrapped keys that must be
        gone) are then looked for in the file, and the scrub repeated a few times while a reader
        pins them.  Best effort: the caller's commit stands whatever happens here, so a failure
        (a full disk, a secret a reader keeps pinned) is logged and left to the next scrub, and
        False returned; only an environment that could not be reopened (Meta.broken) raises.  The
        commit marked the scrub pending (WriteTxn.mark_scrub_pending) until a scrub completes, so a
        crash before it, or a failure in it, is made good by the next read-write open."""
        if not self.encrypted or self.read_only:
            return True
        try:
            return self.meta.scrub(secrets, vfs=self.vfs)
        except (OSError, StorageError) as exc:
            if self.meta.broken:
                raise            # the environment could not be reopened: no transaction works any more
            log.warning("could not scrub the metadata database %s (%s); old versions of its records stay in "
                        "its free pages until the next scrub", self.meta.path, exc)
            return False

    def redact_quarantined(self, blobs) -> None:
        """Overwrite with ``0`` digits every copy of the wrapped keys ``blobs`` (the hex of a keyring
        bundle) inside the ``.broken`` copies of quarantined snapshots: they keep their bundle, and a key
        being destroyed, or wrapped under a KEK being replaced, must not live on there.  The rest of
        each copy is left for inspection.  A copy walcrypt may not write (a link, a file another name
        shares) is left alone, with a warning."""
        from .snapshot import MAX_KEYRING_BUNDLE
        pats = {b.hex().encode() for b in blobs if b}
        d = self.snapshots.dir
        if not pats or not os.path.isdir(d):
            return
        for name in sorted(self.vfs.listdir(d)):
            if not name.endswith(".snap.broken"):
                continue
            path = os.path.join(d, name)
            try:
                fd = self.vfs.open(path, os.O_RDWR)
            except (UnsafeFileError, SymlinkError) as exc:
                log.warning("%s may hold wrapped keys and cannot be redacted (%s); remove it", path, exc)
                continue
            try:
                head = self.vfs.pread(fd, 128 + MAX_KEYRING_BUNDLE, 0)      # the bundle starts at 128
                hits = [(m.start(), len(p)) for p in pats for m in re.finditer(re.escape(p), head)]
                for off, n in hits:
                    self.vfs.pwrite(fd, b"0" * n, off)
                if hits:
                    self.vfs.fsync(fd)
            finally:
                self.vfs.close(fd)

    def _refresh_snapshot_bundles(self) -> None:
        """At a read-write open: the retained snapshot files from the first one whose keyring bundle
        is not what the keyring holds now (keys wrapped under an earlier KEK: a KEK rotation made by
        a walcrypt that left the snapshot files alone) are replaced by copies with the current
        bundle, in one commit, as rotate_kek does.  A snapshot that cannot be read is left to the
        fallback rules, with a warning."""
        if not self.encrypted:
            return
        infos = list(self.snapshots.infos)
        first = None
        for n, info in enumerate(infos):
            try:
                if not self.bundle_is_current(info):
                    first = n
                    break
            except (OSError, StorageError) as exc:       # a missing or unreadable older file: the
                log.warning("cannot read the keyring bundle of %s (%s)", info.path, exc)   # fallback's
        if first is None:
            return
        replace = infos[first:]
        try:
            copies = self.copy_snapshots(replace)
        except (OSError, StorageError, KeyNotFoundError) as exc:
            log.warning("snapshot files hold keys wrapped under an earlier KEK and could not be rewritten (%s); "
                        "save a new snapshot, or rotate the KEK again", exc)
            return
        log.warning("snapshot files held keys wrapped under an earlier KEK; rewrote %d of them", len(copies))
        with self.fail_stop("rewriting snapshot keyring bundles"):
            with self.meta.write() as tx:
                self.snapshots.register_copies(tx, copies, replace)
                tx.mark_scrub_pending()     # the records an earlier KEK wrapped may be in free pages
            self.tie_to_log(copies)          # after the commit: see Rotation.rotate_kek
            self.snapshots.install_copies(copies, replace)

    def ensure_dir(self, path: str) -> None:
        """Create a directory durably: the new entry is fsynced in its parent."""
        if not os.path.isdir(path):
            self.vfs.makedirs(path)
            self.vfs.fsync_dir(os.path.dirname(path))

    def kek_material(self) -> bytes:
        """The effective KEK bytes, only for an explicitly requested embedded-KEK export."""
        return self._kek.material(self.kek_params)

    def secret(self, key_id: bytes) -> bytes:
        return self._secret(key_id)

    def _secret(self, key_id: bytes) -> bytes:
        s = self._secrets.get(key_id)
        if s is None:
            entry = self.keys.get(key_id)
            if entry is None:
                raise KeyNotFoundError(f"data key {key_id.hex()} is not in the keyring of {self.path}")
            s = K.unwrap_entry(self.wrapper, self.store_id, entry)
            self._secrets[key_id] = s
        return s.material

    def _cipher(self, ident: SegmentIdentity) -> tuple[crypto.FrameCipher, bytes]:
        """Frame cipher and expected commitment for a segment."""
        if ident.algorithm == fmt.ALG_NONE:
            if self.encrypted:
                raise AuthenticationError(None, None,
                                          f"segment {ident.segment_id} is plaintext inside an encrypted store")
            return crypto.FrameCipher(fmt.ALG_NONE, crypto.suite(fmt.ALG_NONE).new(b""), ident.key_id,
                                      self.store_id, ident.segment_id), bytes(fmt.COMMITMENT_SIZE)
        key, commitment = crypto.segment_keys(self._secret(ident.key_id), ident.salt, self.store_id,
                                              ident.segment_id, ident.algorithm)
        return crypto.FrameCipher(ident.algorithm, crypto.suite(ident.algorithm).new(key), ident.key_id,
                                  self.store_id, ident.segment_id), commitment

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        with self.meta.read() as r:
            manifest = [(int.from_bytes(k, "big"), M.decode_manifest(v, self.meta.path))
                        for k, v in r.items(M.DB_SEGMENTS)]
            compacted = r.get(M.DB_STATE, M.K_COMPACTED)
            self.load_orphan_rules(r)
        c_index, c_term, reset_seg = M.decode_compacted(compacted, self.meta.path)
        self._refuse_if_older_than_data({seg_id for seg_id, _ in manifest})
        # Every segment is opened (nothing is modified yet) before anything is decided: damage that
        # lies wholly below the newest valid snapshot is set aside (walcrypt.salvage); any other
        # damage raises the first error, as it always did, before a torn tail is cut or a segment
        # sealed.
        opened, damaged = [], {}
        for seg_id, rec in sorted(manifest, key=lambda x: x[0]):
            if seg_id in self._drop_segments:
                damaged[seg_id] = CorruptionError(self.segment_path(seg_id, rec), None,
                                                  f"segment {seg_id} failed verification")
                continue
            try:
                opened.append((rec, *self._open_segment(seg_id, rec)))
            except (SymlinkError, UnsafeFileError):
                raise                      # a planted link or special file is not damage to set aside
            except StorageError as exc:
                damaged[seg_id] = exc
        try:
            if damaged:
                from . import salvage
                c_index, c_term = salvage.settle(self, manifest, damaged, c_index, c_term, reset_seg)
            segments = []
            for rec, seg, scanned in opened:
                if scanned is not None:
                    self._finish_unsealed(seg, *scanned)
                segments.append(seg)
                if rec["state"] == fmt.SEG_SEALED:
                    u = self.rotation.usage.setdefault(rec["key_id"], [0, 0])
                    u[0] += rec["records"]
                    u[1] += rec["bytes"]
            self.wal.load(segments, c_index, c_term, reset_seg)
        except BaseException:
            for _rec, seg, _scanned in opened:         # the open fails: no descriptor outlives it
                seg.close()
            raise
        if not self.read_only:
            self._remove_orphans({s.seg_id for s in segments})
            if self.meta_version < fmt.META_FORMAT_VERSION:
                M.upgrade(self.meta, self.meta_version)   # intents follow the first writes
                self.meta_version = fmt.META_FORMAT_VERSION
        self.snapshots.load()
        self._after_snapshot_fallback()
        self.rotation.load()

    def _after_snapshot_fallback(self) -> None:
        """If the newest snapshot was quarantined, the compaction point may lie beyond the snapshot now
        in use: move it back when the log still holds the entries after that snapshot."""
        cur = self.snapshots.current
        wal = self.wal
        if not any(r.get("kind") == "snapshot" for r in self.repairs):
            return
        if cur is None:
            # Every snapshot failed: only a log that still starts at index 1 can rebuild the state.
            if wal.compacted_index == 0:
                return
            physical_first = wal.view_first[0] if wal.view_first else wal.last + 1
            if physical_first > 1:
                raise CorruptionError(self.snapshots.dir, None,
                                      "the only snapshot failed its checks and the log was compacted after it: "
                                      f"the state up to index {wal.compacted_index} cannot be rebuilt",
                                      "restore it from an export ('walcrypt snapshot restore') or "
                                      + WIPE_ADVICE)
            with self.meta.write() as w:
                w.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(0, 0, wal.reset_segment))
            wal.compacted_index, wal.compacted_term = 0, 0
            return
        if cur.meta.index >= wal.compacted_index:
            return
        idx = cur.meta.index
        physical_first = wal.view_first[0] if wal.view_first else wal.last + 1
        if physical_first > idx + 1:
            raise CorruptionError(cur.info.path, None,
                                  f"the newest snapshot was broken and the log no longer reaches back to the "
                                  f"older snapshot at index {idx}",
                                  WIPE_ADVICE[0].upper() + WIPE_ADVICE[1:])
        with self.meta.write() as w:
            w.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(idx, cur.meta.term, wal.reset_segment))
        wal.compacted_index, wal.compacted_term = idx, cur.meta.term

    def bind_segment(self, path: str, seg_id: int, rec: dict, head: bytes) -> Segment:
        """A Segment for the file at ``path`` whose first bytes are ``head``, its identity checked
        against its manifest record ``rec`` and its key commitment before any frame is read."""
        found = decode_header(head, path)
        expected = SegmentIdentity(self.store_id, seg_id, rec["base_index"], rec["algorithm"], rec["key_id"],
                                   found.salt, found.commitment)
        if found.key_id != rec["key_id"]:
            raise AuthenticationError(path, 48, "segment header key ID differs from the manifest")
        cipher, commitment = self._cipher(expected)
        seg = Segment(self.vfs, path, expected, cipher)
        seg.check_identity(found, commitment)
        return seg

    def segment_path(self, seg_id: int, rec: dict) -> str:
        """Where the segment a manifest record describes lives."""
        directory = os.path.join(self.path, layout.WAL_ENCRYPTED if rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED
                                 else layout.WAL_PLAIN)
        return os.path.join(directory, segment_file_name(seg_id, rec["base_index"]))

    def _open_segment(self, seg_id: int, rec: dict) -> tuple[Segment, tuple | None]:
        """Open and check one manifest segment without modifying anything: (segment, None) for a
        sealed one, (segment, (committed end, torn tail or None, size)) for one an earlier lifetime
        left open, which _finish_unsealed then repairs and seals."""
        path = self.segment_path(seg_id, rec)
        if not os.path.lexists(path):
            raise CorruptionError(path, None, f"segment {seg_id} listed in the manifest is missing",
                                  "a segment file was deleted or renamed; restore the node from a snapshot "
                                  "or " + WIPE_ADVICE)
        sealed = rec["state"] == fmt.SEG_SEALED
        seg = None
        fd = self.vfs.open(path, os.O_RDONLY)
        try:
            # An open segment is scanned through positioned reads a window at a time, never read
            # whole: its size (preallocated, or extended by anyone) bounds nothing in memory.
            src = None if sealed else FileSource(self.vfs, fd)
            head = self.vfs.pread(fd, fmt.SEGMENT_HEADER_SIZE, 0) if sealed else src.read(0, fmt.SEGMENT_HEADER_SIZE)
            seg = self.bind_segment(path, seg_id, rec, head)
            if sealed:
                seg.load_sealed(rec["index_offset"], rec["end_offset"])
                return seg, None
            committed_end, torn = seg.scan(src)
            return seg, (committed_end, torn, src.size)
        except BaseException:
            if seg is not None:
                seg.close()
            raise
        finally:
            self.vfs.close(fd)

    def _finish_unsealed(self, seg: Segment, committed_end: int, torn: tuple | None, size: int) -> None:
        if torn is not None:
            self._repair_tail(seg, committed_end, torn, size)
        if not self.read_only:
            self._seal_recovered(seg)

    def _seal_recovered(self, seg: Segment) -> None:
        """Seal a segment an earlier lifetime left open, so later opens read its index instead of
        scanning it.  Best effort: on a full disk it stays open and is scanned again next time."""
        try:
            fd = self.vfs.open(seg.path, os.O_RDWR)
            seg.fd = fd
            if seg.sealed:                        # crashed between writing its index and the manifest
                self.vfs.ftruncate(fd, seg.end_offset)
                self.vfs.fsync(fd)
            else:
                seg.seal(recovered=True)
            seg.close()
            with self.meta.write() as w:
                w.put(M.DB_SEGMENTS, M.u64(seg.seg_id), M.encode_manifest(self._manifest_record(seg)))
        except (OSError, StorageError) as exc:
            seg.close()
            log.warning("could not seal recovered segment %s (%s); it will be scanned again at the next open",
                        seg.path, exc)
        except BaseException:
            seg.close()
            raise

    def _repair_tail(self, seg: Segment, committed_end: int, torn: tuple[int, str], size: int) -> None:
        offset, detail = torn
        if self.read_only:
            raise CorruptionError(seg.path, offset, f"torn tail ({detail})",
                                  "open the store read-write (or run 'walcrypt repair') to truncate it")
        broken = seg.path + ".broken"
        self.vfs.copy_file(seg.path, broken)
        fd = self.vfs.open(seg.path, os.O_RDWR)
        try:
            self.vfs.ftruncate(fd, committed_end)
            self.vfs.fsync(fd)
        finally:
            self.vfs.close(fd)
        log.warning("%s: torn tail at offset %d (%s); truncated to %d, copy kept in %s",
                    seg.path, offset, detail, committed_end, broken)
        self.repairs.append({"path": seg.path, "offset": offset, "detail": detail,
                             "truncated_to": committed_end, "broken_copy": broken})

    def load_orphan_rules(self, r) -> None:
        """Read (in the metadata read ``r``, the one the manifest is read in) what decides the fate of
        segment files the manifest does not list (FORMAT.md 11.6): the latest purge, a staging
        reservation, the creation intents and the next segment ID."""
        nxt = r.get(M.DB_STATE, M.K_NEXT_SEGMENT)
        purged = M.decode_ids(r.get(M.DB_STATE, M.K_PURGED), self.meta.path)
        staging = M.decode_ids(r.get(M.DB_STATE, M.K_STAGING), self.meta.path)
        creating = r.get(M.DB_STATE, M.K_CREATING)
        if len(staging) not in (0, 2):
            raise CorruptionError(self.meta.path, None, "store state records are missing or damaged")
        self._purged = set(purged)
        self._staging = range(staging[0], staging[1]) if staging else range(0)
        # None: a store written before creation intents existed (older, weaker rules apply)
        self._creating = None if creating is None else set(M.decode_ids(creating, self.meta.path))
        self.next_segment = M.decode_counter(nxt, self.meta.path, "next segment")

    def orphan_fate(self, path: str, seg_id: int, base: int) -> tuple[str, str, str | None]:
        """What a read-write open does with the segment file ``path`` that the manifest does not list, told
        without doing it (for verify): ``(fate, why, hint)`` with fate ``"delete"`` for the leftover of a
        purge, an interrupted re-key or an interrupted creation; ``"unlisted"`` for a file it keeps aside as
        ``.unlisted``; ``"refuse"`` when the file proves that the metadata lacks records: every open refuses
        and deletes nothing.  Reads only; needs :meth:`load_orphan_rules`."""
        try:
            leftover = self._orphan_is_leftover(path, seg_id, base)
        except CorruptionError as exc:
            return "refuse", exc.detail, exc.hint
        if leftover:
            if seg_id in self._purged:
                return "delete", "the latest purge removed it from the manifest", None
            if seg_id in self._staging:
                return "delete", "it was reserved by an interrupted re-key", None
            if self._creating and seg_id in self._creating:
                return "delete", ("a creation intent names it: a crash while it was being created, before it "
                                  "was registered (it holds no more than its creation unit)"), None
            return "delete", "a crash before it was registered (it holds no more than its creation unit)", None
        try:
            ours = decode_header(self._read_head(path), path).store_id == self.store_id
        except StorageError:
            ours = False
        return "unlisted", ("it is not a segment of this store" if not ours else
                            "walcrypt cannot tell that it never held acknowledged writes (a store written before "
                            "creation intents existed)"), "inspect it, then remove it"

    def _remove_orphans(self, known: set[int]) -> None:
        """Segment files the manifest does not list.  One is deleted only when it provably never held
        an acknowledged write (FORMAT.md 11.6): its ID is named by the latest purge record, a staging
        reservation (an interrupted re-key) or a creation intent (a crash between creating a segment
        and registering it, which is what acknowledges its content).  Any other file of this store
        proves that a manifest record was deleted or that meta/ is older than the data: open refuses,
        naming both, and deletes nothing.  A file that is not this store's is kept, renamed
        ``.unlisted``.  (Stores written before creation intents existed follow older rules, see
        ``_legacy_orphan``.)"""
        if not os.path.isdir(self.wal_dir):
            return
        changed = False
        for name in sorted(self.vfs.listdir(self.wal_dir)):
            if name.endswith(".broken") and (m := _SEGMENT_NAME.match(name[:-len(".broken")])):
                seg_id = int(m.group(1), 16)
                if seg_id in self._purged and seg_id not in known:   # its segment was purged (remove_segments)
                    self.vfs.unlink(os.path.join(self.wal_dir, name))
                    changed = True
                continue
            m = _SEGMENT_NAME.match(name)
            if not m or int(m.group(1), 16) in known:
                continue
            path = os.path.join(self.wal_dir, name)
            if self._orphan_is_leftover(path, int(m.group(1), 16), int(m.group(2), 16)):
                self.vfs.unlink(path)
            else:
                self.vfs.rename(path, path + ".unlisted")
                log.warning("%s is not in the manifest and is not a segment of this store; kept as %s.unlisted - "
                            "inspect it, then remove it", path, name)
            changed = True
        if changed:
            self.vfs.fsync_dir(self.wal_dir)
        if self._staging or self._creating:
            with self.meta.write() as tx:
                tx.delete(M.DB_STATE, M.K_STAGING)
                tx.put(M.DB_STATE, M.K_CREATING, b"")
            self._staging, self._creating = range(0), set()

    def _orphan_is_leftover(self, path: str, seg_id: int, base: int) -> bool:
        """True: delete (never acknowledged); False: not this store's, keep as .unlisted; raises when
        the file proves that the metadata lacks records it should have."""
        if seg_id in self._purged or seg_id in self._staging:
            return True
        if self._creating and seg_id in self._creating:
            # Being created at the crash - unless meta/ was put back from inside that window and the
            # segment went on to be registered and written: it must hold no more than its creation unit.
            return self._never_registered(path, seg_id, base, intended=True)
        if self._creating is None:
            return self._legacy_orphan(path, seg_id, base)
        try:
            found = decode_header(self._read_head(path), path)
        except StorageError:
            return False
        if found.store_id != self.store_id:
            return False
        raise CorruptionError(
            path, None, f"segment {seg_id} of this store is not in the manifest, and the metadata does not name "
            f"it as a leftover (it expects segment {self.next_segment} next): its manifest record was deleted, or "
            "meta/ is older than the data - restored from an older copy or rolled back",
            "walcrypt deleted nothing. Put back the meta/ that belongs to this data directory; otherwise "
            "restore the node from a snapshot export or " + WIPE_ADVICE)

    def _legacy_orphan(self, path: str, seg_id: int, base: int) -> bool:
        """Orphans of a store written before creation intents: at or above next_segment, only a file
        holding at most its creation unit is deleted (_never_registered); below it, nothing is."""
        if seg_id >= self.next_segment:
            return self._never_registered(path, seg_id, base)
        return False

    def _refuse_if_older_than_data(self, known: set[int]) -> None:
        """Before anything is opened: a segment file of this store the metadata cannot account for
        proves that meta/ is older than the data (or lost records); refuse before any other finding."""
        if not os.path.isdir(self.wal_dir):
            return
        for name in sorted(self.vfs.listdir(self.wal_dir)):
            m = _SEGMENT_NAME.match(name)
            if not m or int(m.group(1), 16) in known:
                continue
            seg_id, base = int(m.group(1), 16), int(m.group(2), 16)
            if self._creating is not None or seg_id >= self.next_segment:
                self._orphan_is_leftover(os.path.join(self.wal_dir, name), seg_id, base)

    def _read_head(self, path: str) -> bytes:
        fd = self.vfs.open(path, os.O_RDONLY)
        try:
            return self.vfs.pread(fd, fmt.SEGMENT_HEADER_SIZE, 0)
        finally:
            self.vfs.close(fd)

    def _never_registered(self, path: str, seg_id: int, base: int, *, intended: bool = False) -> bool:
        """For an unlisted segment at or above next_segment (or named by a creation intent): True when it
        is the leftover of a crash before its registration - at most its creation unit, no index; raises
        when it proves that the metadata is older than the data."""
        try:
            found = decode_header(self._read_head(path), path)
        except StorageError:
            found = None
        if found is None or found.store_id != self.store_id or found.segment_id != seg_id \
                or found.base_index != base:
            if intended or seg_id == self.next_segment:
                return True                  # a creation torn by the crash: its header never became durable
            return False                     # not ours: kept aside as .unlisted, never deleted
        evidence = None
        if seg_id > self.next_segment and not intended:
            evidence = "it was created after the segment the metadata expects next"
        else:
            try:
                ident = SegmentIdentity(self.store_id, seg_id, base, found.algorithm, found.key_id, found.salt,
                                        found.commitment)
                cipher, commitment = self._cipher(ident)
                seg = Segment(self.vfs, path, ident, cipher)
                seg.check_identity(found, commitment)
                seg.scan(self.vfs.read_file(path))
            except KeyNotFoundError:
                evidence = "it is written under a data key the metadata does not know"
            except StorageError:
                return True                  # its creation unit was torn: nothing in it was acknowledged
            else:
                if seg.sealed or seg.units_scanned > 1:
                    evidence = "it holds writes made after its registration"
        if evidence is None:
            return True
        raise CorruptionError(
            path, None, f"segment {seg_id} is not in the manifest, but {evidence}: the metadata (meta/, which "
            f"expects segment {self.next_segment} next) is older than the data - it was restored from an older "
            "copy or rolled back",
            "walcrypt deleted nothing. Put back the meta/ that belongs to this data directory; otherwise "
            "restore the node from a snapshot export or " + WIPE_ADVICE)

    # ------------------------------------------------------------------ SegmentProvider
    def _segment_file(self, seg_id: int, base_index: int, key_id: bytes, hardstate: HardState,
                      size: int | None = None, records=()) -> Segment:
        """Create a complete, durable segment file (not registered in the manifest)."""
        salt = os.urandom(fmt.SALT_SIZE) if self.encrypted else bytes(fmt.SALT_SIZE)
        ident = SegmentIdentity(self.store_id, seg_id, base_index, self.algorithm, key_id, salt, b"")
        cipher, commitment = self._cipher(ident)
        ident.commitment = commitment
        return Segment.create(self.vfs, self.wal_dir, ident, cipher, size or self.wal.segment_size, hardstate,
                              records)

    def _manifest_record(self, seg: Segment) -> dict:
        rec = {"state": fmt.SEG_SEALED if seg.sealed else fmt.SEG_OPEN, "algorithm": seg.ident.algorithm,
               "dir_code": fmt.DIR_CODE_ENCRYPTED if self.encrypted else fmt.DIR_CODE_PLAIN,
               "base_index": seg.base_index, "key_id": seg.ident.key_id}
        if seg.sealed:
            rec.update(index_offset=seg.index_offset, end_offset=seg.end_offset, last_index=seg.last_index,
                       records=seg.records_written, bytes=seg.bytes_written)
        return rec

    def create_segment(self, base_index: int, hardstate: HardState, records=()) -> Segment:
        """A new segment, durable and registered; registration is the commit point of ``records``."""
        seg_id = self.next_segment
        # The ID is taken, and recorded as being created, before the file exists: a file the
        # metadata does not list is then either this one (never acknowledged: registration below
        # is what acknowledges its content) or proof that meta/ is older than the data.
        try:
            with self.meta.write() as w:
                w.put(M.DB_STATE, M.K_NEXT_SEGMENT, (seg_id + 1).to_bytes(8, "little"))
                w.put(M.DB_STATE, M.K_CREATING, M.encode_ids([seg_id]))
        except StorageError as exc:
            raise OSError(f"recording segment {seg_id} failed: {exc}") from exc
        self.next_segment = seg_id + 1
        seg = self._segment_file(seg_id, base_index, self.write_key_id(), hardstate, records=records)
        try:
            with self.meta.write() as w:
                w.put(M.DB_SEGMENTS, M.u64(seg_id), M.encode_manifest(self._manifest_record(seg)))
                w.put(M.DB_STATE, M.K_CREATING, b"")
        except StorageError as exc:
            seg.close()
            raise OSError(f"registering segment {seg_id} failed: {exc}") from exc
        if self.encrypted:
            self.rotation.check_budget()
        return seg

    def segment_sealed(self, seg: Segment) -> None:
        with self.meta.write() as w:
            w.put(M.DB_SEGMENTS, M.u64(seg.seg_id), M.encode_manifest(self._manifest_record(seg)))
        if self.encrypted:
            self.rotation.account(seg.ident.key_id, seg.records_written, seg.bytes_written)

    # ------------------------------------------------------------------ staged rewrites (re-key, migration)
    def rewrite_under(self, key_id: bytes):
        """Rewrite every retained entry, the hard state and the newest snapshot under ``key_id``.

        Writers are blocked meanwhile.  The new segments and snapshot are durable but not
        registered: ``register_staged`` makes them visible in one LMDB commit, and a crash
        before it leaves orphans that the next open removes.  -> (segments, snapshot info)"""
        wal = self.wal
        with wal._write:
            wal.check_writable()
            wal.seal_active()
            next_id = [self.next_segment]
            self._reserve_staging(next_id[0])

            def new_segment(base: int) -> Segment:
                if next_id[0] >= self.next_segment:
                    self._reserve_staging(self.staging_first)
                seg = self._segment_file(next_id[0], base, key_id, wal.hardstate)
                next_id[0] += 1
                return seg

            staged = self.copy_log(new_segment)
            cur = self.snapshots.current
            snap_info = self.copy_snapshots([cur.info], key_id=key_id)[0] if cur is not None else None
        return staged, snap_info

    def copy_snapshots(self, infos: list, *, key_id: bytes | None = None, kek: dict | None = None) -> list:
        """Copies of the retained snapshots ``infos`` (oldest first): the same index, term, metadata and
        data, each under ``key_id`` (default: its own DEK), with a fresh ID, salt and subkey, and a
        keyring bundle as it is now (or as the staged KEK rotation ``kek`` will make it: see
        keyring_bundle).  Published, not registered (register_copies; a crash before that leaves
        files named by creation intents, removed at the next open).  Each is read through its own
        authentication, a chunk at a time.  -> their SnapshotInfos, in the same order."""
        copies: list = []
        try:
            for info in infos:
                cur = self.snapshots.current
                snap = cur if cur is not None and cur.info is info else self.snapshots.open_info(info)
                extra = {k: v for k, v in snap._file.extra.items() if k not in ("index", "term", "conf_state")}
                kid = key_id or info.key_id
                bundle = self.keyring_bundle({kid}, kek=kek) if kek is not None else None
                with snap.open() as stream:
                    copies.append(self.snapshots.write_file(snap.meta, stream, kid, extra_meta=extra or None,
                                                            bundle=bundle))
        except BaseException:
            for c in copies:                 # never registered: gone now rather than at the next open
                try:
                    self.vfs.unlink(c.path)
                except OSError:
                    pass
            raise
        return copies

    def tie_to_log(self, infos: list) -> None:
        """One durable write unit of SNAPSHOT records (FORMAT.md 10.6) for snapshot files.  For copies
        (a KEK rotation's) only after the commit that registers them: a record in the log is the
        commit point of a save, and an open rolls a snapshot with one forward (11.6)."""
        if infos:
            self.wal.append((), None, extra=[
                (fmt.FRAME_SNAPSHOT, i.index, i.term, 0,
                 fmt.SNAPSHOT_RECORD_STRUCT.pack(i.snapshot_id, i.index, i.term, i.digest), None) for i in infos])

    def _reserve_staging(self, first: int) -> None:
        """Reserve segment IDs [first, next_segment + STAGING_BLOCK) for staged segments, durably, before
        any is written: at open, unregistered files in that range are known to hold nothing acknowledged,
        and no ID in it is ever used for anything else (so an older copy of the record names no live data)."""
        end = self.next_segment + STAGING_BLOCK
        with self.meta.write() as tx:
            tx.put(M.DB_STATE, M.K_STAGING, M.encode_ids((first, end)))
            tx.put(M.DB_STATE, M.K_NEXT_SEGMENT, end.to_bytes(8, "little"))
        self.staging_first, self.next_segment = first, end

    def copy_log(self, new_segment, progress=None) -> list[Segment]:
        """Write every retained entry (and the hard state) into fresh segments made by
        ``new_segment(base_index)``, rolling over at the segment size; each is synced and sealed.
        Used by the full re-key and by migration.  The caller blocks writers."""
        wal = self.wal
        lo, hi = wal.compacted_index + 1, wal.last_index()
        segments = [new_segment(lo)]
        seg = segments[0]
        idx = lo
        while idx <= hi:
            batch = wal.entries(idx, min(hi + 1, idx + fmt.RECORD_MAX_ENTRIES), max_size=fmt.RECORD_TARGET_BYTES * 8)
            records = wal.encode_stored(batch)
            if seg.write_offset + sum(len(r[4]) + 128 for r in records) > wal.segment_size and seg.seq > 2:
                self._seal_staged(seg)
                seg = new_segment(idx)
                segments.append(seg)
            buf, pending = seg.encode_batch(records)
            seg.write(buf)
            seg.apply_batch(buf, pending)
            idx = batch[-1].index + 1
            if progress:
                progress(idx - lo, hi - lo + 1)
        self._seal_staged(seg)
        return segments

    def _seal_staged(self, seg: Segment) -> None:
        seg.sync()
        seg.seal()
        seg.close()

    def next_snapshot_id(self) -> int:
        with self.meta.read() as r:
            nxt = r.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
        return M.decode_counter(nxt, self.meta.path, "next snapshot", default=1)

    def register_staged(self, tx, staged: list[Segment], snap_info) -> None:
        for seg in staged:
            tx.put(M.DB_SEGMENTS, M.u64(seg.seg_id), M.encode_manifest(self._manifest_record(seg)))
        nxt = max(self.next_segment, staged[-1].seg_id + 1)
        tx.put(M.DB_STATE, M.K_NEXT_SEGMENT, nxt.to_bytes(8, "little"))
        tx.delete(M.DB_STATE, M.K_STAGING)
        if snap_info is not None:
            self.snapshots.register_copies(tx, [snap_info])

    def install_staged(self, staged: list[Segment], snap_info) -> None:
        """After register_staged committed: the staged segments supersede the older ones."""
        wal = self.wal
        self.next_segment = max(self.next_segment, staged[-1].seg_id + 1)
        with wal._write:
            wal.load(wal.segments + staged, wal.compacted_index, wal.compacted_term, wal.reset_segment)
            wal.active = None
        if snap_info is not None:
            self.snapshots.install_copies([snap_info])
        for seg in staged:
            if self.encrypted:
                self.rotation.account(seg.ident.key_id, seg.records_written, seg.bytes_written)

    def remove_segments(self, segs: list[Segment]) -> None:
        if not segs:
            return
        with self.meta.write() as w:
            for seg in segs:
                w.delete(M.DB_SEGMENTS, M.u64(seg.seg_id))
            # Files that outlive this commit (a crash before the unlinks) are known leftovers at the
            # next open; IDs are never reused, so an older copy of this record never names live data.
            w.put(M.DB_STATE, M.K_PURGED, M.encode_ids(seg.seg_id for seg in segs))
        self.wal.forget(segs)
        for seg in segs:
            self.vfs.unlink(seg.path)
            # The copy a torn-tail repair kept holds the same entries (and an unacknowledged tail)
            # under the same DEK: it goes with its segment, or it would outlive its key's retirement.
            if os.path.lexists(seg.path + ".broken"):
                self.vfs.unlink(seg.path + ".broken")
        self.vfs.fsync_dir(self.wal_dir)

    # ------------------------------------------------------------------ Storage API
    def check_open(self) -> None:
        if self.closed:
            raise UsageError("the store is closed")

    def check_write(self) -> None:
        self.check_open()
        if self.read_only:
            raise UsageError("the store was opened read-only")

    def initial_state(self) -> tuple[HardState, ConfState]:
        self.check_open()
        cur = self.snapshots.current
        return self.wal.hardstate, (cur.meta.conf_state if cur is not None else ConfState())

    def save(self, hard_state: HardState | None = None, entries: Sequence[Entry] = ()) -> None:
        """Persist entries (replacing any conflicting suffix) and the hard state atomically.

        Durable on return unless the store was opened with sync="none".
        """
        self.check_write()
        self.wal.append(entries, hard_state)
        rot = self.rotation
        due = rot.auto_due
        rot.auto_due = False
        if rot.deferred is not None:
            # A DEK rotation the key service could not serve (a budget reached since adds nothing):
            # one attempt, no waiting, when its backoff says so.
            if rot.retry_due():
                self._rotate_dek(rot.deferred["reason"], from_save=True)
        elif due:
            self._rotate_dek("key budget reached", from_save=True)

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        self.check_open()
        lo = check_u64(lo, "lo", 0, U64_MAX)
        hi = check_u64(hi, "hi", 0, U64_MAX)
        if max_size is not None:
            max_size = check_u64(max_size, "max_size", 0, U64_MAX)
        return self.wal.entries(lo, hi, max_size)

    def term(self, index: int) -> int:
        self.check_open()
        return self.wal.term(check_u64(index, "index", 0, U64_MAX))

    def first_index(self) -> int:
        self.check_open()
        return self.wal.first_index()

    def last_index(self) -> int:
        self.check_open()
        return self.wal.last_index()

    def compact(self, index: int) -> None:
        """Discard entries up to and including ``index``.

        Whole segments below both the compaction point and the oldest retained snapshot
        are deleted (the log after a retained snapshot is kept so a broken newer
        snapshot can fall back to it)."""
        self.check_write()
        self.wal.check_writable()
        index = check_u64(index, "index", 0, U64_MAX)
        wal = self.wal
        if index <= wal.compacted_index:
            raise CompactedError(f"already compacted up to {wal.compacted_index}")
        term = wal.term(index)                  # UnavailableError beyond the last index
        with _FailStop(self, "compacting the log"):
            wal.compact(index, term)
            with self.meta.write() as w:
                w.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(index, wal.compacted_term, wal.reset_segment))
            self.purge_segments()

    def purge_segments(self) -> None:
        floor = self.wal.compacted_index
        snap_floor = self.snapshots.floor()
        if snap_floor is not None:
            floor = min(floor, snap_floor)
        self.remove_segments(self.wal.removable(floor))

    # ------------------------------------------------------------------ snapshots
    def save_snapshot(self, meta: SnapshotMeta, data) -> None:
        """Persist a snapshot (bytes or a binary file object, streamed in chunks).

        Durable on return.  When the snapshot is ahead of the log or disagrees with it
        (a snapshot received from the leader), the log is reset to start after it."""
        self.check_write()
        self.snapshots.save(meta, data)        # fail-stop guards inside: see Snapshots.save

    def snapshot(self) -> Snapshot | None:
        """The newest snapshot (``.meta``, ``.open()``, ``.data``), or None."""
        self.check_open()
        return self.snapshots.current

    def begin_snapshot(self, meta: SnapshotMeta, *, extra_meta: dict | None = None):
        """Stream a snapshot in: ``w = store.begin_snapshot(meta); w.write(b); w.commit()`` (or
        ``w.abort()``).  ``commit()`` is durable on return, like save_snapshot."""
        self.check_write()
        return self.snapshots.begin(meta, extra_meta=extra_meta)

    def reset_log(self, index: int, term: int) -> None:
        """Durably discard the whole log and continue after (index, term), as a snapshot ahead of
        the log does (hashicorp hosts: DeleteRange over everything, then StoreLogs further on)."""
        self.check_write()
        wal = self.wal
        wal.check_writable()
        index = check_u64(index, "index", 0, MAX_ENTRY_INDEX)
        term = check_u64(term, "term", 0, U64_MAX)
        if index < wal.compacted_index:
            raise UsageError(f"cannot reset the log to {index}: it is compacted up to {wal.compacted_index}")
        with _FailStop(self, "resetting the log"):
            reset_segment = self.next_segment
            with self.meta.write() as tx:
                tx.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(index, term, reset_segment))
            wal.reset_to(index, term, reset_segment)
            self.purge_segments()

    def truncate(self, index: int) -> None:
        """Durably discard every entry >= ``index`` (hashicorp's DeleteRange of a suffix).

        Writing continues at ``index`` in a new segment; nothing before ``index`` changes."""
        self.check_write()
        wal = self.wal
        index = check_u64(index, "index", 0, U64_MAX)
        if index > wal.last_index():
            return
        if index <= wal.compacted_index:
            raise UsageError(f"cannot truncate from {index}: entries up to {wal.compacted_index} are compacted")
        wal.check_writable()
        with _FailStop(self, "truncating the log"):
            wal.truncate_from(index)

    # ------------------------------------------------------------------ stable store
    def stable_set(self, key: bytes, value: bytes) -> None:
        """Durably store ``value`` under ``key`` (sealed under the DEK; one synced LMDB commit)."""
        self.check_write()
        self.wal.check_writable()
        key, value = _stable_key(key), _as_bytes(value, "a stable-store value")
        if len(value) > fmt.MAX_STABLE_VALUE:
            raise UsageError(f"a stable-store value is at most {fmt.MAX_STABLE_VALUE} bytes, not {len(value)}")
        from . import stable
        with self.meta.write() as w:
            w.put(M.DB_STABLE, key, stable.seal(self, key, value))

    def stable_get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        self.check_open()
        key = _stable_key(key)
        from . import stable
        with self.meta.read() as r:
            blob = r.get(M.DB_STABLE, key)
        return None if blob is None else stable.open_value(self, key, blob)

    def reseal_stable(self, tx, key_id: bytes) -> None:
        """Re-seal every stable value under ``key_id`` inside the transaction ``tx`` (DEK rotation)."""
        from . import stable
        for k, blob in tx.items(M.DB_STABLE):
            if stable.key_id_of(blob) != key_id:
                tx.put(M.DB_STABLE, k, stable.seal(self, k, stable.open_value(self, k, blob), key_id))

    # ------------------------------------------------------------------ keys
    def rotate_dek(self) -> None:
        """Start a DEK rotation by forced snapshot (queued if one is in flight).  See rotation.py."""
        self._rotate_dek("requested")

    def _rotate_dek(self, reason: str, *, from_save: bool = False) -> None:
        """Start a DEK rotation.  ``from_save``: started by save() (a key budget, or a rotation put
        off earlier), whose entries are already durable: the key service is asked once, without
        waiting, and whatever it answers puts the rotation off (Rotation.defer) instead of reaching
        the caller - an outage or a refusal never turns a successful save into an error."""
        self.rotation.check_rotatable()
        queued = (self.rotation.deferred or {}).get("queued", 0)
        with self.rotation.key_lock:
            try:
                # The new key is wrapped first, outside the fail-stop guard: a key service that cannot
                # be reached changes nothing, and the rotation is retried later (Rotation.defer).
                prepared = self.rotation.prepare_key(quick=from_save)
            except KeyProviderUnavailableError as exc:
                self.rotation.defer(reason, exc, queued=queued)
                return
            except KeyProviderError as exc:
                if not from_save:
                    raise
                self.rotation.defer(reason, exc, queued=queued)
                return
            with _FailStop(self, "rotating the data key"):
                self.rotation.rotate_dek(reason=reason, prepared=prepared, queued=queued)   # steps 1 and 2
        self.rotation.ask_for_snapshot()                   # step 3: the host's source, outside the guard

    def fail_stop(self, what: str) -> _FailStop:
        """A guard for the steps of a mutating operation (see _FailStop)."""
        return _FailStop(self, what)

    def rekey(self) -> None:
        """Full re-key: rewrite all retained data under a new DEK and destroy the old ones."""
        self.rotation.check_rotatable()
        # Excluded from snapshot writers and a KEK rotation: it destroys the DEKs a streamed snapshot
        # or a rotation's copies would be under, and writes a snapshot copy of its own.
        # key_lock first, then the new key from the key service (an outage: nothing changed), and
        # only then snapshot writers held back: a slow service never stalls a snapshot.
        with self.rotation.key_lock:
            prepared = self.rotation.prepare_key()
            with self.snapshots.writers_excluded("the full re-key"):
                with _FailStop(self, "re-keying"):
                    self.rotation.rekey(prepared=prepared)

    def rotate_kek(self, new_kek: K.KeyEncryptionKey) -> None:
        """Re-wrap every key under ``new_kek``; the old KEK no longer opens the store, and no file of the
        data directory holds a key wrapped under it (retained snapshot files are replaced by copies
        whose keyring bundle is wrapped under the new KEK; the metadata file is compacted).  See
        Rotation.rotate_kek and FORMAT.md 8.4."""
        if not isinstance(new_kek, K.KeyEncryptionKey):
            raise UsageError(f"new_kek must be a key-encryption key (RawKey, KeyFile, Passphrase, EnvKey, Kms), "
                             f"not {type(new_kek).__name__}")
        self.rotation.rotate_kek(new_kek)

    def export_snapshot(self, out_path: str, *, embed_kek: bool = False) -> dict:
        """Write the newest snapshot and its wrapped keys to one file (see walcrypt.backup)."""
        try:
            out_path = os.fspath(out_path)
        except TypeError:
            raise UsageError(f"out_path must be a path, not {type(out_path).__name__}") from None
        if isinstance(out_path, bytes):
            out_path = os.fsdecode(out_path)
        if not out_path or "\0" in out_path:
            raise UsageError("out_path must be a non-empty path without NUL characters")
        _check_bool(embed_kek, "embed_kek")
        from .backup import export_snapshot
        return export_snapshot(self, out_path, embed_kek=embed_kek)

    @property
    def needs_snapshot(self) -> bool:
        """True while a DEK rotation waits for the host to save a snapshot at or above
        ``snapshot_index_needed``."""
        return self.encrypted and self.rotation.needs_snapshot

    @property
    def snapshot_index_needed(self) -> int | None:
        return self.rotation.snapshot_index_needed if self.encrypted else None

    def key_info(self) -> dict:
        """Key IDs, states and usage (never key material)."""
        self.check_open()
        return self.rotation.describe()

    @property
    def fsync_count(self) -> int:
        return self.wal.fsyncs

    def close(self) -> None:
        """Seal the active segment and release every resource.  Every resource is released even when
        a step raises (KeyboardInterrupt included); a close() interrupted in the middle can be
        called again to finish releasing (it does not seal again)."""
        if self._released:
            return
        sealing = not self.closed
        self.closed = True
        try:
            if sealing and not self.read_only:
                try:
                    self.wal.seal_for_close()
                except WalcryptError as exc:
                    log.warning("sealing on close failed: %s", exc)
        finally:
            try:
                self.wal.close()
            finally:
                try:
                    self.meta.close()
                finally:
                    if self._lock:
                        self._lock.release()
        self._released = True

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        mode = "encrypted" if self.encrypted else "plaintext"
        return f"<walcrypt.Store {self.path} {mode} {state}>"


def metadata_lost(meta_path: str, what: str, here: str = "segments or snapshots") -> CorruptionError:
    """The error for data without the metadata that describes it (``what``: how the metadata is lost;
    ``here``: what data the directory holds)."""
    return CorruptionError(
        meta_path, None, f"{what}, but the data directory holds {here}: meta/ was lost or "
        "replaced, and walcrypt will not create a new store over existing data (it holds the manifest and the "
        "wrapped data keys)", "walcrypt changed nothing. Put back this directory's own meta/ (from the same node, "
        "not an older copy); otherwise rebuild it from the snapshot and segment files with the KEK ('walcrypt "
        "recover DIR --key-file K'), restore the node from a snapshot export, or " + WIPE_ADVICE)


def _close_fully(closable) -> None:
    """Close a store (or metadata environment) the caller never sees: if close() itself is
    interrupted (KeyboardInterrupt), it is called again to release what is left (the directory
    lock, the LMDB environment), then the interruption propagates."""
    try:
        closable.close()
    except BaseException:
        closable.close()
        raise


def stored_mode(path) -> bool | None:
    """True/False for an existing encrypted/plaintext store, None when there is none yet."""
    meta_dir = os.path.join(os.fspath(path), layout.META_DIR)
    if not os.path.isdir(meta_dir):
        return None
    m = M.Meta(meta_dir, readonly=True)
    try:
        with m.read() as r:
            v = r.raw(M.DB_STORE, M.K_ENCRYPTED)
    finally:
        try:
            m.close()
        except BaseException:                # interrupted: close again (LMDB allows one handle per process)
            m.close()
            raise
    return None if v is None else v == b"\x01"


def open(path, *, kek: K.KeyEncryptionKey | None = None, encrypted: bool = True, migrate: bool = False,
         decrypt_existing: bool = False, migration_progress=None, **options) -> Store:
    """Open (creating if needed) a walcrypt data directory.  Encrypted unless ``encrypted=False``.

    Migration between the modes is always an explicit act, never a side effect of the
    arguments: a plaintext store opened with ``encrypted=True`` and a KEK is migrated to
    encrypted only with ``migrate=True`` (otherwise it is a UsageError: anyone who can write
    the directory could have planted that plaintext store), and an encrypted store opened
    with ``encrypted=False`` is decrypted only with ``migrate=True`` (or its older spelling
    ``decrypt_existing=True``) and its KEK.  ``migration_progress(stage, done, total)``
    reports progress."""
    built: list[Store] = []                  # every store this call built, returned or not
    try:
        return _open(os.fspath(path), kek, encrypted, migrate or decrypt_existing, migration_progress, options, built)
    except BaseException as exc:
        # Interrupted (KeyboardInterrupt) after a store was built but before it reached the caller:
        # nobody else can close it, so its lock and files are released here.
        for st in built:
            _close_fully(st)
        if isinstance(exc, OSError):         # a file error anywhere in open or migration: typed, with a hint
            raise StorageError(f"opening {path} failed: {exc} ({os_error_advice(exc)}; an interrupted migration "
                               "is redone)") from exc
        raise


def _open(path: str, kek, encrypted: bool, migrate: bool, migration_progress, options: dict,
          built: list) -> Store:
    if options.get("read_only") or not layout.looks_like_store(path):
        return Store(path, kek=kek, encrypted=encrypted, _holder=built, **options)
    held: list = []                      # the lock, even if we are interrupted storing it
    try:
        lock = layout.DirLock(path, holder=held)     # before reading anything: no writer can be active
        have = stored_mode(path)
        if have is None or have == encrypted:
            if not encrypted and migrate:
                kek = None                   # already plaintext (a finished migration): nothing to decrypt
            return Store(path, kek=kek, encrypted=encrypted, _dirlock=lock, _holder=built, **options)
        if not encrypted and not migrate:
            raise UsageError(f"{path} is encrypted; opening it as plaintext would decrypt every record on disk. "
                             "Pass migrate=True (and its kek=) to migrate it, or open it with its kek=")
        if encrypted and kek is None:
            raise KeyProviderError(f"{path} is a plaintext store: open it with encrypted=False, or pass kek=... "
                                   "and migrate=True to encrypt it")
        if encrypted and not migrate:
            raise UsageError(
                f"{path} holds a plaintext store, but a KEK was given for an encrypted one. walcrypt never adopts "
                "plaintext data implicitly: if this node's store was encrypted, its metadata was replaced and "
                "must not be trusted (restore it from a backup, or " + WIPE_ADVICE + "); to encrypt a plaintext "
                "store on purpose, open it with migrate=True (or run 'walcrypt migrate DIR --to encrypted')")
        from .migrate import migrate as run_migration
        src = Store(path, kek=kek if have else None, encrypted=have, _dirlock=lock, _holder=built, **options)
        try:
            run_migration(src, to_encrypted=encrypted, kek=kek, algorithm=options.get("algorithm", "aes-256-gcm"),
                          progress=migration_progress)
        except BaseException as exc:
            src.wal.fail(exc)                # nothing more is written; the next open redoes the migration
            raise
        finally:
            _close_fully(src)
        return Store(path, kek=kek if encrypted else None, encrypted=encrypted, _holder=built, **options)
    except BaseException:
        for held_lock in held:           # our lock, unless a store we built and lost is holding it
            held_lock.release()          # idempotent: a store it was handed to may have released it
        raise
