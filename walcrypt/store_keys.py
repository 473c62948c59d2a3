"""The key half of a Store: bootstrap of a new data directory, the KEK check and the keyring at open,
the data keys in memory, keyring bundles for snapshot files, and the key material at rest (the
metadata file's free pages, quarantined snapshot copies).  A mixin of :class:`walcrypt.storage.Store`:
it uses the Store's attributes (``meta``, ``vfs``, ``keys``, ``wrapper``, ``snapshots``, ...)."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import TYPE_CHECKING

from . import crypto, layout
from . import format as fmt
from . import keys as K
from . import meta as M
from .errors import (
    WIPE_ADVICE,
    AuthenticationError,
    CorruptionError,
    KeyNotFoundError,
    StorageError,
    SymlinkError,
    UnsafeFileError,
    UnsupportedFormatError,
    UsageError,
    WrongKeyError,
)
from .segment_codec import SegmentIdentity
from .snapshot import MAX_KEYRING_BUNDLE, SnapshotFile

if TYPE_CHECKING:
    from .failstop import FailStop
    from .rotation import Rotation
    from .snapstore import Snapshots
    from .vfs import VFS

log = logging.getLogger("walcrypt")



class KeyringMixin:
    """Keys and the keyring of a Store (see the module docstring)."""

    # Host contract: provided by Store (storage.py) and its other mixins.
    path: str
    vfs: VFS
    read_only: bool
    encrypted: bool
    meta: M.Meta
    snapshots: Snapshots
    rotation: Rotation
    _kek: K.KeyEncryptionKey | None

    if TYPE_CHECKING:
        def fail_stop(self, what: str) -> FailStop: ...
        def copy_snapshots(self, infos: list, *, key_id: bytes | None = None, kek: dict | None = None) -> list: ...
        def tie_to_log(self, infos: list) -> None: ...

    # ------------------------------------------------------------------ bootstrap
    def prepare_root(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"{self.path} exists and is not a directory")
        layout.refuse_links(self.path)
        if os.path.isdir(self.path) and not layout.looks_like_store(self.path) and layout.data_files(self.path):
            raise layout.metadata_lost(os.path.join(self.path, layout.META_DIR), "the metadata directory is missing")
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
                raise layout.metadata_lost(self.meta.path, "the metadata holds no store record")
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
        self.key_secrets: dict[bytes, K.SecretKey] = {}
        if not self.encrypted:
            if stored_alg != fmt.ALG_NONE:
                raise CorruptionError(self.meta.path, None, "the store record of a plaintext store names a cipher",
                                      "the metadata was edited or damaged; do not trust this directory")
            self.algorithm = fmt.ALG_NONE
            self.meta.set_mac_key(None, version=self.meta_version)
            self.meta.verify_catalog()
            self.load_keyring()
            return
        assert kek is not None          # an encrypted store is never opened without its KEK (Store, check)
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
        self.keys, self.key_secrets = {}, {}
        with self.meta.write() as w:
            w.put_raw(M.DB_STORE, M.K_STORE_ID, self.store_id)
            w.put_raw(M.DB_STORE, M.K_FORMAT_VERSION, bytes([fmt.META_FORMAT_VERSION]))
            w.put_raw(M.DB_STORE, M.K_ENCRYPTED, b"\x01" if self.encrypted else b"\x00")
            if self.encrypted:
                assert kek is not None  # Store refuses an encrypted store without a KEK
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
                self.key_secrets[dek.key_id] = secret
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
        assert meta_key_id is not None and meta_wrapped is not None     # open_keys refused a store without them
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

    def refresh_snapshot_bundles(self) -> None:
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
        assert self._kek is not None     # callers refuse a plaintext store; an encrypted one has its KEK
        return self._kek.material(self.kek_params)

    def secret(self, key_id: bytes) -> bytes:
        return self._secret(key_id)

    def _secret(self, key_id: bytes) -> bytes:
        s = self.key_secrets.get(key_id)
        if s is None:
            entry = self.keys.get(key_id)
            if entry is None:
                raise KeyNotFoundError(f"data key {key_id.hex()} is not in the keyring of {self.path}")
            s = K.unwrap_entry(self.wrapper, self.store_id, entry)
            self.key_secrets[key_id] = s
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
