"""Key rotation: DEK rotation by forced snapshot, full re-key, KEK rotation, key budgets.

DEK rotation state machine (DESIGN.md; state in LMDB ``state/rotation``):

1. ``rotate_dek()`` creates a DEK, wraps it and records it *pending* together
   with the rotation state in one durable LMDB commit, before anything else.
2. The WAL seals its segment and continues in a new segment under the pending
   DEK; the first index written under it is recorded.
3. A snapshot at or above ``first_index - 1`` is needed: the host's
   ``snapshot_source`` is called, or ``needs_snapshot`` tells the host.
4. When such a snapshot is durable (written under the pending DEK), one LMDB
   commit makes pending active and the old DEK retiring; the compaction point
   moves to the snapshot; segments and snapshots under retiring keys are
   purged; a retiring key no longer referenced becomes inactive (and, with
   ``destroy_retired_keys=True``, destroyed: its wrapped blob is erased).

Every step is idempotent and re-run at open, so a crash anywhere resumes.
Rotating while a rotation is in flight queues one more.

Full re-key (a compromised DEK): everything retained is rewritten under a new
DEK into staged segments and a re-encrypted snapshot that become visible in one
LMDB commit; the old DEKs are then purged and destroyed.  A crash before that
commit leaves only unregistered files (removed at open) and the rotation state
asks for the re-key to be redone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from . import keys as K
from . import meta as M
from .errors import (
    WIPE_ADVICE,
    CorruptionError,
    KeyProviderError,
    KeyProviderUnavailableError,
    UsageError,
)
from .rotation_kek import KekRotation
from .stable import key_id_of
from .types import SnapshotMeta

log = logging.getLogger("walcrypt")

# Automatic rotation budgets.  Each segment and snapshot is encrypted under its own
# HKDF subkey with counter nonces, so the per-key AEAD limits (NIST SP 800-38D: at most
# 2^32 invocations per GCM key; draft-irtf-cfrg-aead-limits: about 2^36 16-byte blocks,
# ~1 TiB, per key for a 2^-57 confidentiality advantage) bind a subkey, never the DEK.
# The DEK-wide budgets below reuse those figures as conservative caps on how much data
# one DEK protects, which bounds what a leaked DEK exposes.
DEFAULT_MAX_RECORDS_PER_DEK = 1 << 32
DEFAULT_MAX_BYTES_PER_DEK = 1 << 40
DEFAULT_MAX_DEK_AGE_S: float | None = None


MAX_STATE_BYTES = 4096       # state/rotation is a JSON object of a few hundred bytes


def parse_state(raw: bytes | None, path: str | None) -> dict | None:
    """``state/rotation`` (FORMAT.md 9.6) parsed and checked before anything uses it; None when absent."""
    if not raw:
        return None

    def bad(detail: str) -> CorruptionError:
        return CorruptionError(path, None, f"the DEK rotation record (state/rotation) is malformed: {detail}",
                               "restore the node from a snapshot export or " + WIPE_ADVICE)

    doc = K.load_json_object(raw, MAX_STATE_BYTES, bad)
    if K.hex_bytes(doc.get("pending"), min_len=16, max_len=16) is None:
        raise bad("the pending key ID is not 16 bytes of hex")
    if not K.is_uint(doc.get("first_index")) or doc["first_index"] < 1:
        raise bad("first_index is not an index >= 1")
    for name in ("queued", "requested_ns"):
        if name in doc and not K.is_uint(doc[name]):
            raise bad(f"{name} is not an unsigned 64-bit integer")
    if "rekey" in doc and not isinstance(doc["rekey"], bool):
        raise bad("rekey is not true or false")
    if "reason" in doc and not (isinstance(doc["reason"], str) and len(doc["reason"]) <= 256):
        raise bad("reason is not a short string")
    return doc


DEFER_FIRST_WAIT_S = 1.0        # a DEK rotation put off by a key-service outage: first retry after 1 s,
DEFER_MAX_WAIT_S = 60.0         # doubling up to a minute


class Rotation(KekRotation):
    def __init__(self, store, *, snapshot_source=None, destroy_retired_keys: bool = False,
                 max_records_per_dek: int = DEFAULT_MAX_RECORDS_PER_DEK,
                 max_bytes_per_dek: int = DEFAULT_MAX_BYTES_PER_DEK,
                 max_dek_age_s: float | None = DEFAULT_MAX_DEK_AGE_S):
        self.store = store
        self.snapshot_source = snapshot_source
        self.destroy_retired_keys = destroy_retired_keys
        self.max_records = max_records_per_dek
        self.max_bytes = max_bytes_per_dek
        self.max_age_s = max_dek_age_s
        self.state: dict | None = None
        self.usage: dict[bytes, list[int]] = {}
        self.auto_due = False
        self.snapshot_wanted = False      # steps 1-2 of a rotation done: ask the host's source (step 3)
        # The key of the rotation queued behind the one a snapshot commit is about to complete, or the
        # key service's refusal (prepare_queued; taken by _promote).
        self.next_key: tuple | None = None
        self.next_error: BaseException | None = None
        # Wrapping a new key under the KEK in use and committing it, and a KEK rotation's re-wrap,
        # commit and swap of the KEK in use, exclude each other: a key wrapped under the old KEK must
        # never be committed after the rotation committed (no KEK would open the store).
        self.key_lock = threading.RLock()
        # A DEK rotation the key service could not serve (KeyProviderUnavailableError when wrapping
        # its new key): nothing was changed; retried from save() with backoff, in memory only (a
        # key budget asks again after a restart; an operator's request must be repeated).
        self.deferred: dict | None = None

    def holding_keys(self, body: Callable[[], bool], *, wait: bool, busy: Callable[[], bool]) -> bool:
        """body() holding key_lock; with ``wait`` false and key_lock held by another thread, busy()
        at once instead.  An interruption as the lock is taken never leaves it held: the release is
        decided by the lock itself, not by a variable assigned after acquire() returns (a ``with``
        statement is as safe, and takes the waiting path)."""
        lock = self.key_lock
        owned = lock._is_owned   # type: ignore[attr-defined]  # CPython's RLock, as threading.Condition uses it
        if wait or owned():                         # waits, or re-entered (never waits)
            with lock:
                return body()
        try:
            return body() if lock.acquire(blocking=False) else busy()
        finally:
            # Not held before, so held now only by the acquire above.  The release is the first call
            # here: an interruption lands after a call returns, and one between a check of the owner
            # and the release would leave the lock held.
            try:
                lock.release()
            except RuntimeError:
                pass                                # not acquired: another thread holds it

    # ------------------------------------------------------------------ state
    def load(self) -> None:
        with self.store.meta.read() as r:
            raw = r.get(M.DB_STATE, M.K_ROTATION)
        self.state = parse_state(raw, self.store.meta.path)

    def _put_state(self, tx, state: dict | None) -> None:
        if state is None:
            tx.delete(M.DB_STATE, M.K_ROTATION)
        else:
            tx.put(M.DB_STATE, M.K_ROTATION, json.dumps(state, sort_keys=True).encode())

    @property
    def pending_key_id(self) -> bytes | None:
        return bytes.fromhex(self.state["pending"]) if self.state else None

    @property
    def needs_snapshot(self) -> bool:
        """True while a DEK rotation waits for a snapshot at or above ``snapshot_index_needed``."""
        return bool(self.state and not self.state.get("rekey"))

    @property
    def snapshot_index_needed(self) -> int | None:
        return self.state["first_index"] - 1 if self.state else None

    def describe(self) -> dict:
        st = self.store
        keys = [{"key_id": k.key_id.hex(), "state": k.state_name, "purpose": "dek",
                 "created_ns": k.created_ns, "records": self.usage.get(k.key_id, [0, 0])[0],
                 "bytes": self.usage.get(k.key_id, [0, 0])[1]}
                for k in st.keys.values() if k.purpose == K.PURPOSE_DEK]
        deferred = ({k: v for k, v in self.deferred.items() if k != "next_try"} if self.deferred else None)
        return {"keys": keys, "rotation": dict(self.state) if self.state else None, "deferred": deferred}

    # ------------------------------------------------------------------ DEK rotation
    def check_rotatable(self) -> None:
        """The caller's side of a rotation or re-key: checked before anything changes."""
        st = self.store
        st.check_write()
        if not st.encrypted:
            raise UsageError("a plaintext store has no data keys to rotate")
        st.wal.check_writable()                           # fail-stop applies to queueing too

    def prepare_key(self, *, quick: bool = False):
        """The new DEK of a rotation, wrapped under the KEK in force (the call that may need the key
        service), or None when a rotation is in flight (the request is queued, no key needed).  Changes
        nothing.  The caller holds key_lock until rotate_dek() has committed the key.  ``quick``: one
        attempt, no retries (a deferred rotation retried from save())."""
        if self.state:
            return None
        return self._new_key(quick)

    def _new_key(self, quick: bool):
        st = self.store
        wrapper = st.wrapper
        if quick and hasattr(wrapper, "once"):
            wrapper = wrapper.once()
        return K.new_key_entry(wrapper, st.store_id, algorithm=st.algorithm, purpose=K.PURPOSE_DEK, state=K.PENDING)

    def defer(self, reason: str, exc: BaseException | None, *, queued: int = 0) -> None:
        """Keep a DEK rotation the key service could not serve (unreachable, or refusing), or that a
        save found another key operation busy with the keys for (``exc`` None), with the rotations
        queued behind it, for a later retry (retry_due)."""
        prev = self.deferred or {}
        if exc is None:
            # The other operation ends by itself: no backoff and no try counted towards the key
            # service's backoff; said once, not at every save while it runs.
            tries, wait = prev.get("tries", 0), DEFER_FIRST_WAIT_S
            error = why = "another key operation (a KEK rotation, a re-key or a DEK rotation) was in progress"
            say = log.debug if prev else log.warning
        else:
            tries = prev.get("tries", 0) + 1
            wait = min(DEFER_MAX_WAIT_S, DEFER_FIRST_WAIT_S * 2 ** (tries - 1))
            error = str(exc).split(". Nothing was changed")[0][:300] or type(exc).__name__
            what = "is unreachable" if isinstance(exc, KeyProviderUnavailableError) else "refused it"
            why = f"the key service {what} ({error})"
            say = log.warning
        self.deferred = {"reason": reason, "since_ns": prev.get("since_ns", time.time_ns()),
                         "queued": queued, "tries": tries, "error": error, "next_try": time.monotonic() + wait}
        say("DEK rotation (%s) put off: %s; it is retried on a later save, the next in %.0f s. "
            "Reads and writes go on under the current data key", reason, why, wait)

    def retry_due(self) -> bool:
        return self.deferred is not None and time.monotonic() >= self.deferred["next_try"]

    def rotate_dek(self, *, reason: str = "requested", rekey: bool = False, queued: int = 0,
                   prepared=None) -> bool:
        """Steps 1 and 2 (or queue one more rotation).  The caller holds a fail-stop guard
        (Store.fail_stop); step 3, asking the host's snapshot source, is ask_for_snapshot(),
        called once the guard is left so that the host's exceptions do not fail the store.
        ``prepared``: the new key from prepare_key(), which the caller asked for under key_lock (None
        when a rotation was in flight: this call joins its queue).  The key service is never asked
        here: a caller's guard (FailStop) must not turn its outage into a failed store.

        Returns False, having changed nothing, when no key was prepared and no rotation is in flight
        any more (a snapshot commit completed it after prepare_key looked): the caller prepares a key
        and calls again.  Under key_lock no other rotation starts in between, so the second call goes
        through."""
        # The rotation's state is read and changed exclusive of a snapshot commit that completes a
        # rotation (Rotation._promote) and of write units (Wal.exclusive's lock order: key_lock first).
        with self.key_lock:
            if prepared is None and not self.state:
                return False
            with self.store.wal.exclusive():
                if prepared is None and not self.state:
                    return False
                self._rotate_dek(reason, rekey, queued, prepared)
        return True

    def _rotate_dek(self, reason: str, rekey: bool, queued: int, prepared) -> None:
        st = self.store
        self.check_rotatable()
        if self.state:
            with st.meta.write() as tx:
                # this request, and the rotations queued behind it (a deferred one's, a completed one's)
                self.state["queued"] = self.state.get("queued", 0) + 1 + queued
                self._put_state(tx, self.state)
            log.info("DEK rotation queued behind the one in flight")
            self.deferred = None
            return
        st.wal.check_writable()
        with self.key_lock:
            assert prepared is not None            # rotate_dek: a key is prepared when none is in flight
            entry, secret = prepared
            state = {"pending": entry.key_id.hex(), "first_index": st.wal.last_index() + 1, "queued": queued,
                     "requested_ns": time.time_ns(), "reason": reason, "rekey": rekey}
            with st.meta.write() as tx:                   # step 1: durable before anything else
                tx.put(M.DB_KEYRING, entry.key_id, M.encode_keyring(entry))
                self._put_state(tx, state)
            st.keys[entry.key_id] = entry
            st.key_secrets[entry.key_id] = secret
        self.state = state
        if self.deferred is not None:
            log.info("the DEK rotation put off since the key service was unreachable has started")
        self.deferred = None
        if not rekey:
            st.wal.cut_now()                              # step 2: new segment under the pending DEK
            self.snapshot_wanted = True

    def ask_for_snapshot(self) -> None:
        """Step 3 of a rotation whose steps 1-2 just ran: call the host's snapshot source (if one is
        registered) and save what it returns.  Runs outside any fail-stop guard."""
        if self.snapshot_wanted:
            self._ask_for_snapshot()

    def _ask_for_snapshot(self, *, tolerate_source_errors: bool = False) -> None:
        self.snapshot_wanted = False
        if self.snapshot_source is None or not self.state or self.state.get("rekey"):
            return
        try:
            meta, data = self.snapshot_source(self.store)     # step 3: the host's code
        except Exception as exc:
            if not tolerate_source_errors:
                raise
            # the store stays usable; needs_snapshot tells the host, and the next open asks again
            log.warning("the snapshot source failed while resuming a DEK rotation: %s", exc)
            return
        if not isinstance(meta, SnapshotMeta):
            meta = SnapshotMeta(*meta)
        self.store.save_snapshot(meta, data)

    def completes(self, info) -> bool:
        """Would registering the snapshot ``info`` complete the rotation in flight (step 4)?"""
        if not self.state or self.state.get("rekey"):
            return False
        return info.key_id == self.pending_key_id and info.index >= self.state["first_index"] - 1

    def prepare_queued(self, info) -> None:
        """Before the commit of the snapshot ``info`` (or the open that finds it): when it completes
        the rotation in flight and another is queued behind it, the next rotation's key, asked for
        now - outside the WAL's write lock - so that the commit that completes one rotation starts
        the next in the same transaction (the queued request is never in memory only).  The service
        is asked once; an outage or a refusal is kept, and the queued rotation is put off (retried by
        later saves) instead of failing the commit.  The caller holds key_lock until the commit."""
        self.next_key = self.next_error = None
        if self.completes(info) and self.state and self.state.get("queued"):
            try:
                self.next_key = self._new_key(quick=True)
            except KeyProviderError as exc:
                self.next_error = exc

    def on_snapshot(self, info) -> None:
        """Called after a snapshot is registered (step 4 when it satisfies the rotation)."""
        if self.completes(info):
            self._promote(info.index, info.term)

    def _promote(self, index: int, term: int) -> None:
        st = self.store
        pending = self.pending_key_id
        assert self.state is not None and pending is not None       # on_snapshot: a DEK rotation is pending
        now = time.time_ns()
        queued = self.state.get("queued", 0)
        nxt, self.next_key = (self.next_key, None) if queued else (None, None)
        error, self.next_error = self.next_error, None
        following = None                      # the state of the queued rotation started here
        if nxt is not None:
            following = {"pending": nxt[0].key_id.hex(), "first_index": st.wal.last_index() + 1,
                         "queued": queued - 1, "requested_ns": now, "reason": "queued", "rekey": False}
        changed = []
        with st.meta.write() as tx:
            for k in st.keys.values():
                if k.purpose != K.PURPOSE_DEK:
                    continue
                if k.key_id == pending:
                    k.state, k.state_changed_ns = K.ACTIVE, now
                elif k.state == K.ACTIVE:
                    k.state, k.state_changed_ns = K.RETIRING, now
                else:
                    continue
                changed.append(k)
                tx.put(M.DB_KEYRING, k.key_id, M.encode_keyring(k))
            if index > st.wal.compacted_index:
                tx.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(index, term, st.wal.reset_segment))
            st.reseal_stable(tx, pending)
            if nxt is not None:
                # the rotation queued behind this one, step 1, in the same commit
                tx.put(M.DB_KEYRING, nxt[0].key_id, M.encode_keyring(nxt[0]))
            self._put_state(tx, following)
        if index > st.wal.compacted_index:
            st.wal.compact(index, term)
        if nxt is not None:
            st.keys[nxt[0].key_id] = nxt[0]
            st.key_secrets[nxt[0].key_id] = nxt[1]
        self.state = following
        log.info("DEK rotation complete: key %s active", pending.hex())
        self.finish_retirement()
        if nxt is not None:
            log.info("the DEK rotation queued behind it has started")
            st.wal.cut_now()                              # its step 2: new segment under its pending DEK
            self.snapshot_wanted = True
        elif queued:
            self.defer("queued", error if error is not None else KeyProviderError("no key was prepared"),
                       queued=queued - 1)

    def finish_retirement(self) -> None:
        """Purge what retiring keys protect; retire keys nothing references any more."""
        st = self.store
        retiring = {k.key_id for k in st.keys.values() if k.purpose == K.PURPOSE_DEK and k.state == K.RETIRING}
        if not retiring:
            return
        st.snapshots.apply_retention(drop_keys=retiring)
        st.purge_segments()
        # A snapshot being streamed under a retiring key references it too: destroyed now, its
        # commit would register a snapshot no key opens (it is destroyed at a later retirement).
        referenced = ({s.ident.key_id for s in st.wal.segments} | st.snapshots.key_ids()
                      | st.snapshots.writer_key_ids())
        with st.meta.read() as r:
            referenced |= {key_id_of(blob) for _k, blob in r.items(M.DB_STABLE)}
        now = time.time_ns()
        unreferenced = retiring - referenced
        if self.destroy_retired_keys:
            # Copies of the wrapped keys outside the keyring go first (the keyring still holds them
            # until the commit below): those in quarantined snapshot copies now, LMDB's after it.
            st.redact_quarantined(st.keys[kid].wrapped for kid in unreferenced)
            st.snapshots.remove_abandoned_temporaries()
        destroyed = [st.keys[kid].wrapped for kid in unreferenced] if self.destroy_retired_keys else []
        with st.meta.write() as tx:
            for kid in unreferenced:
                k = st.keys[kid]
                if self.destroy_retired_keys:
                    k.state, k.wrapped = K.DESTROYED, b""
                    st.key_secrets.pop(kid, None)
                else:
                    k.state = K.INACTIVE
                k.state_changed_ns = now
                tx.put(M.DB_KEYRING, kid, M.encode_keyring(k))
            if destroyed:
                tx.mark_scrub_pending()     # made good at the next open if the scrub below never runs
        if self.destroy_retired_keys and unreferenced:
            st.scrub_meta(destroyed)      # the overwritten records stay in LMDB's free pages until then

    def resume(self) -> None:
        """Run at open (read-write): finish whatever a crash interrupted."""
        st = self.store
        if self.state:
            if self.state.get("rekey"):
                log.warning("a full re-key was interrupted; redoing it")
                self.rekey(resume=True)
                return
            cur = st.snapshots.infos[-1] if st.snapshots.infos else None
            if cur is not None:
                with self.key_lock:
                    self.prepare_queued(cur)
                    self.on_snapshot(cur)
            if self.state:
                # A host that registered a source gets asked again.  If the source itself fails, the
                # open goes on; if saving what it returned fails, the open fails (nothing is lost: the
                # rotation is durable and the next open resumes it).
                self._ask_for_snapshot(tolerate_source_errors=True)
        self.finish_retirement()

    # ------------------------------------------------------------------ budgets
    def account(self, key_id: bytes, records: int, nbytes: int) -> None:
        u = self.usage.setdefault(key_id, [0, 0])
        u[0] += records
        u[1] += nbytes
        self.check_budget()

    def check_budget(self) -> None:
        st = self.store
        if not st.encrypted or self.state:
            return
        kid = st.active_key_id()
        records, nbytes = self.usage.get(kid, [0, 0])
        entry = st.keys[kid]
        age_s = (time.time_ns() - entry.state_changed_ns) / 1e9
        if (records >= self.max_records or nbytes >= self.max_bytes
                or (self.max_age_s is not None and age_s >= self.max_age_s)):
            self.auto_due = True

    # ------------------------------------------------------------------ full re-key
    def rekey(self, *, resume: bool = False, prepared=None) -> None:
        """Rewrite every retained record and the newest snapshot under a new DEK, then destroy the old DEKs.
        ``prepared``: the new key from prepare_key(), made by the caller before its fail-stop guard."""
        st = self.store
        if not resume:
            if self.state:
                # A rotation waiting for its snapshot: the full rewrite completes it under its pending key.
                with st.meta.write() as tx:
                    self.state["rekey"] = True
                    self._put_state(tx, self.state)
            else:
                # Store.rekey prepared the key with no rotation in flight, and none can start or
                # complete since (key_lock, snapshot writers excluded): never declined.  The key service
                # is never asked here, inside the caller's fail-stop guard.
                started = self.rotate_dek(reason="rekey", rekey=True, prepared=prepared)
                assert started, "a re-key's new key is prepared before its guard"
        new_id = self.pending_key_id
        assert new_id is not None            # rotate_dek above (or the resumed rotation) left a key pending
        # From the rewrite to the install no save runs: one in between would land in a segment the
        # staged copies (which end where the log ended) then supersede in memory.
        with st.wal.exclusive():
            staged, snap_info = st.rewrite_under(new_id)
            now = time.time_ns()
            with st.meta.write() as tx:
                st.register_staged(tx, staged, snap_info)
                st.reseal_stable(tx, new_id)
                for k in st.keys.values():
                    if k.purpose != K.PURPOSE_DEK:
                        continue
                    if k.key_id == new_id:
                        k.state = K.ACTIVE
                    elif k.state in (K.ACTIVE, K.PENDING, K.RETIRING, K.INACTIVE):
                        k.state = K.RETIRING   # destroyed below once nothing references it
                    else:
                        continue
                    k.state_changed_ns = now
                    tx.put(M.DB_KEYRING, k.key_id, M.encode_keyring(k))
                self._put_state(tx, None)
            self.state = None
            st.install_staged(staged, snap_info)
        destroy = self.destroy_retired_keys
        self.destroy_retired_keys = True                  # a compromised key is always destroyed
        try:
            self.finish_retirement()
        finally:
            self.destroy_retired_keys = destroy
