"""KEK rotation (a mixin of walcrypt.rotation.Rotation): every key re-wrapped under the new KEK, every
retained snapshot copied with its keyring bundle under it, in one commit; then the old wrapped keys
are scrubbed from meta/'s free pages, so that no file of the data directory holds a key wrapped
under the old KEK (FORMAT.md 8.3, GUARANTEES.md)."""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import TYPE_CHECKING

from . import keys as K
from . import meta as M
from .errors import CorruptionError, KeyNotFoundError, UsageError

if TYPE_CHECKING:
    from .storage import Store


class KekRotation:
    """See the module docstring."""

    # Host contract: provided by Rotation (rotation.py).
    store: Store
    destroy_retired_keys: bool
    key_lock: threading.RLock
    if TYPE_CHECKING:
        def finish_retirement(self) -> None: ...

    def _meta_secret(self, wrapped: bytes, context: bytes) -> bytes:
        secret = getattr(self.store, "meta_secret", None)
        return secret.material if secret is not None else self.store.wrapper.unwrap(wrapped, context)

    def _rewrapped(self, new_wrapper, blob: bytes, context: bytes, secret) -> bytes:
        """``blob`` (wrapped under the KEK in force) wrapped under ``new_wrapper``: re-wrapped by the key
        service itself when both are the same service's key (Vault Transit's rewrap to the newest
        version: no plaintext key leaves it), otherwise ``secret()`` - the key unwrapped at open, so
        that the old KEK's service is not needed - wrapped anew."""
        can = getattr(new_wrapper, "can_rewrap", None)
        if can is not None and can(self.store.wrapper):
            return new_wrapper.rewrap(blob, context)
        return new_wrapper.wrap(secret(), context)

    def _stage_rewrap(self, new_wrapper, rewrapped: dict, old_blobs: list) -> None:
        """Wrap under ``new_wrapper`` every live key not yet in ``rewrapped`` (adding its old blob to
        ``old_blobs``: what must be gone from the data directory afterwards)."""
        st = self.store
        for k in list(st.keys.values()):
            if k.state == K.DESTROYED or k.key_id in rewrapped:
                continue
            ctx = K.wrap_context(st.store_id, k.key_id, k.purpose)
            rewrapped[k.key_id] = self._rewrapped(new_wrapper, k.wrapped, ctx, lambda k=k: st.secret(k.key_id))
            old_blobs.append(k.wrapped)

    def rotate_kek(self, new_kek: K.KeyEncryptionKey) -> None:
        """Re-wrap every key with ``new_kek``; afterwards no file of the data directory holds a key
        wrapped under the old KEK.

        1. Every retained snapshot is copied (same data and DEK, a new ID, salt and subkey) with its
           keyring bundle wrapped under the new KEK; the copies are published, not registered.
           Wrapped keys inside quarantined ``.broken`` copies are overwritten.
        2. One LMDB commit: the new KEK parameters and check value, every key and the metadata key
           re-wrapped, the copies registered and the old snapshots dropped from the registry (named
           by the purge record).  This is the commit point: before it the old KEK is in force and the
           copies are leftovers of a creation intent; after it only the new KEK opens the store.
        3. The copies are tied to the log by SNAPSHOT records, the old snapshot files are removed, and
           the free pages of meta/data.mdb that still hold the records wrapped under the old KEK are
           overwritten (Meta.scrub), then the file is checked for every old wrapped key (retried
           while a reader in another process pins them).
        A crash after 2 leaves what 3 removes to the next open (purge record, scrub at open)."""
        st = self.store
        st.check_write()
        if not st.encrypted:
            raise UsageError("a plaintext store has no KEK")
        st.wal.check_writable()
        st.snapshots.refuse_if_writing("the KEK rotation")     # told before the KMS is asked for anything
        # Everything that needs a key service (the new KEK's, or the old one's for a re-wrap) is done
        # before snapshot writers are held back and before anything changes: a slow or unreachable
        # service never stalls a snapshot, and its failure leaves the store as it was.
        params = new_kek.new_params()
        wrapper = new_kek.wrapper(params)
        with st.meta.read() as r:
            meta_id = r.raw(M.DB_STORE, M.K_META_KEY_ID)
            old_meta_wrapped = r.raw(M.DB_STORE, M.K_META_KEY)
        if meta_id is None or old_meta_wrapped is None:     # open read both: meta/ was changed under us
            raise CorruptionError(st.meta.path, None, "the metadata key record is missing",
                                  "reopen the store; if this persists, run 'walcrypt verify'")
        meta_ctx = K.wrap_context(st.store_id, meta_id, K.PURPOSE_META)
        meta_wrapped = self._rewrapped(wrapper, old_meta_wrapped, meta_ctx, lambda: self._meta_secret(old_meta_wrapped,
                                                                                                     meta_ctx))
        rewrapped: dict[bytes, bytes] = {}
        old_blobs = [old_meta_wrapped]
        self._stage_rewrap(wrapper, rewrapped, old_blobs)
        cv = wrapper.check_value()
        staged = {"params": params, "check": cv, "meta_wrapped": meta_wrapped, "wrapped": rewrapped}
        # From here to the swap no key is created (key_lock: every key is wrapped under the new KEK
        # before the copies begin), and no snapshot writer runs (Snapshots.writers_excluded:
        # begin_snapshot() waits): one begun meanwhile would take the keyring bundle under the old
        # KEK and, registered after the commit, leave every key wrapped under it in the data
        # directory.  key_lock is taken first: a DEK rotation waiting on its key service holds it,
        # and snapshot writers must not wait on that.
        with self.key_lock:
            self._stage_rewrap(wrapper, rewrapped, old_blobs)       # keys created since: none, usually
            with st.snapshots.writers_excluded("the KEK rotation"):
                # Any interruption from here on fails the store: between the commit and the swap of the
                # in-memory wrapper, keys would be wrapped under one KEK in memory and another on disk (a
                # new DEK wrapped by the old KEK would be lost at the next open); before the commit,
                # published copies and a half-written unit of SNAPSHOT records are for the next open.
                with st.fail_stop("rotating the key-encryption key"):
                    st.snapshots.drop_damaged_older()    # each is copied below: bit rot there is set aside first
                    retained = list(st.snapshots.infos)
                    copies = st.copy_snapshots(retained, kek=staged)                    # 1
                    st.redact_quarantined(old_blobs)
                    st.snapshots.remove_abandoned_temporaries()
                    with st.meta.write() as tx:                                         # 2
                        tx.put_raw(M.DB_STORE, M.K_KEK_PARAMS, json.dumps(params).encode())
                        if cv is None:
                            tx.delete(M.DB_STORE, M.K_KEK_CHECK)
                        else:
                            tx.put_raw(M.DB_STORE, M.K_KEK_CHECK, cv)
                        tx.put_raw(M.DB_STORE, M.K_META_KEY, meta_wrapped)
                        for kid, raw in tx.items(M.DB_KEYRING):
                            entry = M.decode_keyring(kid, raw, st.meta.path)
                            if entry.state == K.DESTROYED or not entry.wrapped:
                                continue
                            if kid not in rewrapped:        # key_lock is held: never; and never committed unwrapped
                                raise KeyNotFoundError(f"key {kid.hex()} of the keyring was not re-wrapped")
                            tx.put(M.DB_KEYRING, kid,
                                   M.encode_keyring(dataclasses.replace(entry, wrapped=rewrapped[kid])))
                        st.snapshots.register_copies(tx, copies, retained)
                        tx.mark_scrub_pending()
                    for kid, blob in rewrapped.items():
                        if kid in st.keys and st.keys[kid].state != K.DESTROYED:
                            st.keys[kid].wrapped = blob
                    st.wrapper = wrapper
                    st.kek_params = params
                    st.tie_to_log(copies)        # after the commit: a record before it would roll the copies forward
                    st.snapshots.install_copies(copies, retained)                       # 3
        with st.fail_stop("rotating the key-encryption key"):
            st.scrub_meta(old_blobs)
