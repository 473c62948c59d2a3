"""The engine: open/bootstrap a data directory, recover it, and serve the Storage API.

Order of operations on open (nothing is modified before the KEK is proven):
lock -> metadata -> KEK check value -> unwrap keys -> verify manifest MACs ->
open segments (sealed: read their index; open: scan and repair a torn tail,
keeping a ``.broken`` copy) -> remove orphan segment files that never made it
into the manifest.  Writing always continues in a fresh segment.

:class:`Store` composes the parts: the keyring (:mod:`walcrypt.store_keys`), recovery at open
(:mod:`walcrypt.store_recovery`), segment files and staged rewrites (:mod:`walcrypt.store_files`),
the log (:mod:`walcrypt.wal`), the snapshots (:mod:`walcrypt.snapstore`) and key rotation
(:mod:`walcrypt.rotation`); this module holds the Storage API (the fail-stop guard is :mod:`walcrypt.failstop`).
"""

from __future__ import annotations

import logging
import os
from itertools import chain
from typing import Callable, Iterator, Protocol, Sequence

from . import exports, layout, stable
from . import format as fmt
from . import keys as K
from . import meta as M
from .errors import (
    CompactedError,
    KeyProviderError,
    KeyProviderUnavailableError,
    StorageError,
    UsageError,
    WalcryptError,
    os_error_advice,
)
from .failstop import FailStop
from .migrate import cleanup_interrupted
from .rotation import DEFAULT_MAX_BYTES_PER_DEK, DEFAULT_MAX_RECORDS_PER_DEK, Rotation
from .snapinfo import Snapshot
from .snapstore import PendingSnapshot, Snapshots
from .store_files import SegmentFilesMixin
from .store_keys import KeyringMixin
from .store_options import check_bool, check_options, stable_key
from .store_recovery import RecoveryMixin
from .types import ConfState, Entry, EntryBatch, HardState, SnapshotMeta
from .values import MAX_ENTRY_INDEX, U64_MAX, as_bytes, check_u64
from .vfs import DEFAULT_VFS, VFS
from .wal import Wal

log = logging.getLogger("walcrypt")

class BinaryReader(Protocol):
    """What save_snapshot streams data from: an object whose read(n) returns bytes (a file opened 'rb',
    an io.BytesIO, a socket's makefile('rb'), a snapshot's own stream)."""

    def read(self, size: int = ..., /) -> bytes | None: ...


# snapshot_source(store) -> (meta, data): the host's newest state, asked for when a DEK rotation
# needs a snapshot (data: bytes or a binary file object, as save_snapshot takes).
SnapshotSource = Callable[["Store"], "tuple[SnapshotMeta, bytes | BinaryReader]"]



class Store(KeyringMixin, RecoveryMixin, SegmentFilesMixin):
    """An open walcrypt data directory.  Use :func:`walcrypt.open`.

    Thread safety: ``save`` may be called from several threads (group commit);
    reads may run concurrently with writes.  One process opens a directory at a time.
    """

    def __init__(self, path: str, *, kek: K.KeyEncryptionKey | None = None, encrypted: bool = True,
                 sync: str = "batch", segment_size: int = 64 << 20, algorithm: str = "aes-256-gcm",
                 max_entry_size: int = fmt.MAX_ENTRY_SIZE_DEFAULT, read_only: bool = False,
                 keep_snapshots: int = 2, snapshot_chunk_size: int = 1 << 20,
                 snapshot_source: SnapshotSource | None = None,
                 destroy_retired_keys: bool = False, max_records_per_dek: int = DEFAULT_MAX_RECORDS_PER_DEK,
                 max_bytes_per_dek: int = DEFAULT_MAX_BYTES_PER_DEK, max_dek_age_s: float | None = None,
                 vfs: VFS | None = None, _dirlock: layout.DirLock | None = None, _holder: list | None = None,
                 _drop_segments: frozenset = frozenset()) -> None:
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
        check_options(kek=kek, encrypted=encrypted, sync=sync, segment_size=segment_size, algorithm=algorithm,
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
        self.prepare_root()
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
                self.recover_at_open()
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
                self.refresh_snapshot_bundles()
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

    # ------------------------------------------------------------------ Storage API
    @classmethod
    def keys_only(cls, path: str, kek: K.KeyEncryptionKey | None, encrypted: bool, meta: M.Meta) -> "Store":
        """A read-only Store over ``meta`` (a Meta the caller opened and keeps closing) that has unwrapped
        its keys and opened nothing else: no lock, no recovery, no segment, no snapshot.

        For the tools that must go on where open() stops at the first problem (verify's walk, export
        from a running store, recover's check of a surviving meta/): they read files through it with
        the store's keys.  Raises WrongKeyError / KeyProviderError for key problems."""
        st = cls.__new__(cls)
        st.path, st.vfs, st.read_only, st.encrypted, st.closed = path, DEFAULT_VFS, True, encrypted, True
        st.repairs, st._kek, st._lock, st.meta = [], kek, None, meta
        st.open_keys(kek, "aes-256-gcm")
        return st

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
        if self.closed or self.read_only:
            self.check_write()                  # raises
        self.wal.append(entries, hard_state)
        rot = self.rotation
        due = rot.auto_due
        rot.auto_due = False
        try:
            if rot.deferred is not None:
                # A DEK rotation the key service could not serve (a budget reached since adds
                # nothing): one attempt, no waiting, when its backoff says so.
                if rot.retry_due():
                    self._rotate_dek(rot.deferred["reason"], from_save=True)
            elif due:
                self._rotate_dek("key budget reached", from_save=True)
        except UsageError:
            # Closed by another thread after the entries were written: the save stands (it is
            # durable); after the next open the budget is checked again when a segment is started.
            if not self.closed:
                raise

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        self.check_open()
        lo = check_u64(lo, "lo", 0, U64_MAX)
        hi = check_u64(hi, "hi", 0, U64_MAX)
        if max_size is not None:
            max_size = check_u64(max_size, "max_size", 0, U64_MAX)
        return self.wal.entries(lo, hi, max_size)

    def iter_batches(self, lo: int, hi: int) -> Iterator[EntryBatch]:
        """The entries [lo, hi) for a host replaying its log: those ``entries(lo, hi)`` returns, checked
        the same way, handed out as they are read, one :class:`EntryBatch` per stored record (no
        object per entry).  A record is authenticated before its batch is handed out: a damaged one
        raises before any entry after it is delivered.  Segments are read sequentially, a window of
        many records per read, each record decrypted once; memory stays bounded.  The range is
        checked now (CompactedError, UnavailableError) and read as the log was then: do not compact
        it while iterating."""
        self.check_open()
        lo = check_u64(lo, "lo", 0, U64_MAX)
        hi = check_u64(hi, "hi", 0, U64_MAX)
        return self.wal.batches(lo, hi, self.check_open)

    def iter_entries(self, lo: int, hi: int) -> Iterator[tuple[int, int, bytes]]:
        """``(index, term, data)`` for the entries [lo, hi), read as :meth:`iter_batches` reads them,
        built in C: plain tuples, no list."""
        return chain.from_iterable(map(EntryBatch.tuples, self.iter_batches(lo, hi)))

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
        index = check_u64(index, "index", 0, U64_MAX)
        wal = self.wal
        # Exclusive from the checks to the purge: a save (a truncation), a snapshot's log reset or
        # another purge in between would make the term, the compaction record or the segments to
        # remove stale.
        with wal.exclusive():
            wal.check_writable()
            if index <= wal.compacted_index:
                raise CompactedError(f"already compacted up to {wal.compacted_index}")
            term = wal.term(index)              # UnavailableError beyond the last index
            with FailStop(self, "compacting the log"):
                wal.compact(index, term)
                with self.meta.write() as w:
                    w.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(index, term, wal.reset_segment))
                self.purge_segments()

    def purge_segments(self) -> None:
        """Remove the segments below both the compaction point and the oldest retained snapshot.
        Exclusive: two purges (a compaction and a snapshot's retention) never remove the same segment."""
        with self.wal.exclusive(), FailStop(self, "purging segments"):
            floor = self.wal.compacted_index
            snap_floor = self.snapshots.floor()
            if snap_floor is not None:
                floor = min(floor, snap_floor)
            self.remove_segments(self.wal.removable(floor))

    # ------------------------------------------------------------------ snapshots
    def save_snapshot(self, meta: SnapshotMeta, data: bytes | BinaryReader) -> None:
        """Persist a snapshot (bytes or a binary file object, streamed in chunks).

        Durable on return.  When the snapshot is ahead of the log or disagrees with it
        (a snapshot received from the leader), the log is reset to start after it."""
        self.check_write()
        self.snapshots.save(meta, data)        # fail-stop guards inside: see Snapshots.save

    def snapshot(self) -> Snapshot | None:
        """The newest snapshot (``.meta``, ``.open()``, ``.data``), or None."""
        self.check_open()
        return self.snapshots.current

    def begin_snapshot(self, meta: SnapshotMeta, *, extra_meta: dict | None = None) -> PendingSnapshot:
        """Stream a snapshot in: ``w = store.begin_snapshot(meta); w.write(b); w.commit()`` (or
        ``w.abort()``).  ``commit()`` is durable on return, like save_snapshot."""
        self.check_write()
        return self.snapshots.begin(meta, extra_meta=extra_meta)

    def reset_log(self, index: int, term: int) -> None:
        """Durably discard the whole log and continue after (index, term), as a snapshot ahead of
        the log does (hashicorp hosts: DeleteRange over everything, then StoreLogs further on)."""
        self.check_write()
        wal = self.wal
        index = check_u64(index, "index", 0, MAX_ENTRY_INDEX)
        term = check_u64(term, "term", 0, U64_MAX)
        with wal.exclusive():                   # see compact: the record and the reset in one step
            wal.check_writable()
            if index < wal.compacted_index:
                raise UsageError(f"cannot reset the log to {index}: it is compacted up to {wal.compacted_index}")
            with FailStop(self, "resetting the log"):
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
        with wal.exclusive():                   # the checks hold until the truncation is done
            if index > wal.last_index():
                return
            if index <= wal.compacted_index:
                raise UsageError(f"cannot truncate from {index}: entries up to {wal.compacted_index} are compacted")
            wal.check_writable()
            with FailStop(self, "truncating the log"):
                wal.truncate_from(index)

    # ------------------------------------------------------------------ stable store
    def stable_set(self, key: bytes, value: bytes) -> None:
        """Durably store ``value`` under ``key`` (sealed under the DEK; one synced LMDB commit)."""
        self.check_write()
        self.wal.check_writable()
        key, value = stable_key(key), as_bytes(value, "a stable-store value")
        if len(value) > fmt.MAX_STABLE_VALUE:
            raise UsageError(f"a stable-store value is at most {fmt.MAX_STABLE_VALUE} bytes, not {len(value)}")
        with self.meta.write() as w:
            w.put(M.DB_STABLE, key, stable.seal(self, key, value))

    def stable_get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        self.check_open()
        key = stable_key(key)
        with self.meta.read() as r:
            blob = r.get(M.DB_STABLE, key)
        return None if blob is None else stable.open_value(self, key, blob)

    def reseal_stable(self, tx: M.WriteTxn, key_id: bytes) -> None:
        """Re-seal every stable value under ``key_id`` inside the transaction ``tx`` (DEK rotation)."""
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

        def under_key_lock() -> bool:
            # Twice at most: Rotation.rotate_dek declines when the rotation in flight (no key
            # prepared, the request would queue behind it) completed while it waited for the write
            # lock; key_lock keeps any other from starting, so the second pass has its key.
            for _attempt in range(2):
                try:
                    # The new key is wrapped first, outside the fail-stop guard: an unreachable key
                    # service changes nothing, and the rotation is retried later (Rotation.defer).
                    prepared = self.rotation.prepare_key(quick=from_save)
                except KeyProviderError as exc:
                    if not from_save and not isinstance(exc, KeyProviderUnavailableError):
                        raise
                    self.rotation.defer(reason, exc, queued=queued)
                    return False
                with FailStop(self, "rotating the data key"):
                    if self.rotation.rotate_dek(reason=reason, prepared=prepared, queued=queued):   # steps 1, 2
                        break
            return True

        def busy() -> bool:
            # A save never waits for another key operation (a KEK rotation copying the snapshots, a
            # re-key, a DEK rotation waiting on its key service): it puts its rotation off.
            self.rotation.defer(reason, None, queued=queued)
            return False

        if not self.rotation.holding_keys(under_key_lock, wait=not from_save, busy=busy):
            return
        self.rotation.ask_for_snapshot()                   # step 3: the host's source, outside the guard

    def fail_stop(self, what: str) -> FailStop:
        """A guard for the steps of a mutating operation (see FailStop)."""
        return FailStop(self, what)

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
                if prepared is None and not self.rotation.state:
                    # The rotation in flight when the key was asked for (so none was made) was
                    # completed by a snapshot commit since; with writers excluded and key_lock held
                    # none starts or completes now.  Asked outside the guard: an outage changes nothing.
                    prepared = self.rotation.prepare_key()
                with FailStop(self, "re-keying"):
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
        check_bool(embed_kek, "embed_kek")
        return exports.export_snapshot(self, out_path, embed_kek=embed_kek)

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
        self.wal.refuse_inside_unit("close()")      # before anything changed: the unit finishes first
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

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        mode = "encrypted" if self.encrypted else "plaintext"
        return f"<walcrypt.Store {self.path} {mode} {state}>"
