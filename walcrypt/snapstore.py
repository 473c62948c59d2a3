"""The snapshot side of a store: publish, registry, retention, fallback, reads.

Order of operations when saving a snapshot (etcd #10219 is the lesson):

1. the snapshot file is written to a temporary name, fsynced, renamed and its
   directory fsynced;
2. a SNAPSHOT record (ID, index, term, file digest) is written to the WAL in a
   durable write unit;
3. one LMDB transaction registers the snapshot and, when the snapshot is ahead
   of the log or disagrees with it, moves the compaction point to it (a log
   reset: older entries are discarded);
4. retention and purging: snapshots beyond ``keep`` and the segments no longer
   needed by any retained snapshot are removed.

A crash before 3 leaves an unregistered file, removed at the next open (the
call never returned).  The LMDB registry is authoritative.  At open the newest
registered snapshot is authenticated end to end; one that fails is renamed
``.broken``, a warning is logged, and the next older one is used.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from contextlib import contextmanager, nullcontext
from typing import Sequence

from . import format as fmt
from . import keys as K
from . import meta as M
from .errors import AuthenticationError, CorruptionError, UsageError
from .snapinfo import (
    Snapshot,
    SnapshotInfo,
    check_snapshot_meta,
    data_blocks,
    encode_info,
    forget_creation_intent,
)
from .snaprecovery import SnapshotRecoveryMixin
from .snapshot import (
    DEFAULT_CHUNK_SIZE,
    SNAP_SALT_SIZE,
    SnapshotFile,
    SnapshotHeader,
    SnapshotWriter,
)
from .types import SnapshotMeta

log = logging.getLogger("walcrypt")


class PendingSnapshot:
    """A snapshot being streamed in: ``write()`` data, then ``commit()`` (durable on return) or ``abort()``.

    Any exception inside ``write()`` or ``commit()`` fails the store (Store.fail_stop) and ends this
    snapshot: a writer whose state is in doubt is never used again."""

    def __init__(self, owner: "Snapshots", meta: SnapshotMeta, writer: SnapshotWriter):
        self.owner, self.meta, self.writer = owner, meta, writer
        self.done = False          # commit() or abort() was called: no further use
        self.settled = False       # ... and has finished: its file is registered, or gone

    def _check_usable(self) -> None:
        if self.done:
            raise UsageError("this snapshot was already committed or aborted")
        if self.owner.store.closed:
            # The store released its lock and its files: writing on would race the next owner.
            self.abort()
            raise UsageError("the store this snapshot belongs to was closed; the snapshot was aborted")

    def write(self, data) -> int:
        self._check_usable()
        if not isinstance(data, bytes):
            try:
                data = memoryview(data).tobytes()
            except TypeError:
                raise UsageError(f"snapshot data must be bytes-like, not {type(data).__name__}") from None
        try:
            with self.owner.store.fail_stop("writing a snapshot"):
                self.writer.write(data)
        except BaseException:
            self.abort()
            raise
        return len(data)

    def commit(self) -> SnapshotInfo:
        self._check_usable()
        self.done = True
        st = self.owner.store
        w = self.writer
        try:
            # Commits are serialised, and each is checked against what committed since it began: a
            # newer snapshot (an InstallSnapshot on another thread) or the destruction of its DEK.
            with self.owner._commit_lock:
                problem = self.owner.outdated(self.meta, w.header.key_id)
                if problem:
                    w.abort()
                    raise UsageError(problem)
                with st.fail_stop("saving a snapshot"):
                    try:
                        path = w.publish()
                    except BaseException:
                        w.abort()
                        raise
                    info = SnapshotInfo(w.header.snapshot_id, self.meta.index, self.meta.term, w.header.key_id,
                                        w.digest, w.data_bytes, path)
                    # Its record, the log reset it implies, retention and the rotation it completes
                    # (and the one queued behind, whose key is asked for first, outside the write
                    # lock) see one state of the log: no save, compaction or purge runs in between.
                    # key_lock only for a commit that completes the rotation in flight (nothing else
                    # completes or starts one meanwhile: rotate_dek and rekey take key_lock too).
                    with st.rotation.key_lock if st.rotation.completes(info) else nullcontext():
                        st.rotation.prepare_queued(info)
                        with st.wal.exclusive():
                            self.owner._commit(self.meta, info)
        finally:
            self.owner.settle(self)
        st.rotation.ask_for_snapshot()          # a rotation started behind the one this completed
        return info

    def abort(self) -> None:
        if not self.done:
            self.done = True
            try:
                self.writer.abort()
            finally:
                self.owner.settle(self)


def bind_to_registry(st, vfs, info: SnapshotInfo) -> SnapshotFile:
    """The file of the registered snapshot ``info``, read through ``vfs``: its header checked against
    the registry record (store, ID, digest, key ID) and unlocked with the key the record names.
    Nothing past the header is read; the caller authenticates the chunks."""
    f = SnapshotFile(vfs, info.path)
    h = f.header
    if h.store_id != st.store_id or h.snapshot_id != info.snapshot_id or f.digest != info.digest:
        raise CorruptionError(info.path, 0, "snapshot file does not match its registry record "
                                            "(replaced, renamed or from another store)")
    if h.key_id != info.key_id:
        raise AuthenticationError(info.path, 0, "snapshot header key ID differs from its registry record")
    aead, commitment = Snapshots(st, os.path.dirname(info.path)).snapshot_aead(h)
    f.unlock(aead, commitment)
    return f


class Snapshots(SnapshotRecoveryMixin):
    """Snapshot registry of one open store.  Writes are serialised by the caller (Store)."""

    def __init__(self, store, directory: str, *, keep: int = 2, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if keep < 1:
            raise UsageError("snapshot retention (keep_snapshots) must be at least 1")
        self.store = store
        self.dir = directory
        self.keep = keep
        self.chunk_size = chunk_size
        self.infos: list[SnapshotInfo] = []      # registered, oldest first
        self.current: Snapshot | None = None
        self.writing: weakref.WeakSet = weakref.WeakSet()    # PendingSnapshots handed out by begin()
        # A KEK rotation and snapshot writers exclude each other (writers_excluded): a writer takes
        # the keyring bundle under the KEK in force when it begins, and that bundle must not be
        # registered after the rotation re-wrapped the keyring.  Guards `writing` and `_rotating_by`.
        self._gate = threading.Condition()
        self._rotating_by: int | None = None     # thread ID of the KEK rotation or re-key in progress
        self._commit_lock = threading.Lock()     # one PendingSnapshot.commit at a time
        self._exclusive_what = ""

    # ------------------------------------------------------------------ write
    def save(self, meta: SnapshotMeta, data, *, extra_meta: dict | None = None) -> SnapshotInfo:
        pending = self.begin(meta, extra_meta=extra_meta)
        try:
            # The data source is the host's: reading it runs outside the fail-stop guards (an error
            # there aborts this snapshot and leaves the store as it is); writing is guarded.
            for block in data_blocks(data, self.chunk_size):
                pending.write(block)
        except BaseException:
            pending.abort()
            raise
        return pending.commit()

    def begin(self, meta: SnapshotMeta, *, extra_meta: dict | None = None) -> "PendingSnapshot":
        """Start a streamed snapshot: write() its data, then commit() (or abort())."""
        st = self.store
        meta, extra_meta = check_snapshot_meta(meta, extra_meta)
        if self.infos and meta.index < self.infos[-1].index:
            raise UsageError(f"snapshot at index {meta.index} is older than the newest snapshot at "
                             f"{self.infos[-1].index} (etcd's ErrSnapOutOfDate)")
        with self._gate:
            if self._rotating_by == threading.get_ident():
                raise UsageError(f"begin_snapshot() called from inside {self._exclusive_what}")
            # Waits while a KEK rotation or re-key runs: they copy files and commit (a KEK rotation
            # makes its KMS calls before it starts, Rotation.rotate_kek).
            self._gate.wait_for(lambda: self._rotating_by is None)
            st.wal.check_writable()
            with st.fail_stop("starting a snapshot"):
                writer = self.open_writer(meta, st.write_key_id(), extra_meta=extra_meta)
            pending = PendingSnapshot(self, meta, writer)
            self.writing.add(pending)
        return pending

    def outdated(self, meta: SnapshotMeta, key_id: bytes) -> str | None:
        """Why a snapshot begun earlier may no longer commit, or None."""
        if self.infos and meta.index < self.infos[-1].index:
            return (f"snapshot at index {meta.index} is older than the snapshot at {self.infos[-1].index} committed "
                    "since it began (etcd's ErrSnapOutOfDate); it was aborted")
        entry = self.store.keys.get(key_id) if self.store.encrypted else None
        if self.store.encrypted and (entry is None or entry.state == K.DESTROYED):
            return (f"the data key {key_id.hex()} this snapshot was written under was destroyed since it began "
                    "(a re-key); it was aborted - take the snapshot again")
        return None

    def writer_key_ids(self) -> set[bytes]:
        """The DEKs of the snapshots being written (begin() to the end of commit or abort)."""
        with self._gate:
            return {p.writer.header.key_id for p in list(self.writing) if not p.settled}

    def settle(self, pending: "PendingSnapshot") -> None:
        """A writer from begin() has finished (committed, aborted or failed)."""
        with self._gate:
            pending.settled = True
            self._gate.notify_all()

    @contextmanager
    def writers_excluded(self, what: str):
        """For an operation that re-wraps or re-keys the snapshots (a KEK rotation, a full re-key):
        refuses while a snapshot from begin() is being written or committed, or while another such
        operation runs, and makes begin() wait until the block is left.  ``what`` names the operation
        in the refusals."""
        with self._gate:
            if self._rotating_by is not None:
                raise UsageError(f"{self._exclusive_what} is in progress on this store: wait for it to finish, "
                                 f"then retry {what}")
            self.refuse_if_writing(what)
            self._rotating_by = threading.get_ident()
            self._exclusive_what = what
        try:
            yield
        finally:
            with self._gate:
                self._rotating_by = None
                self._gate.notify_all()

    def _commit(self, meta: SnapshotMeta, info: SnapshotInfo) -> SnapshotInfo:
        st = self.store
        # 2. tie it to the log
        record = (fmt.FRAME_SNAPSHOT, meta.index, meta.term, 0,
                  fmt.SNAPSHOT_RECORD_STRUCT.pack(info.snapshot_id, meta.index, meta.term, info.digest), None)
        st.wal.append((), None, extra=[record])     # the commit point (see _remove_orphans)
        # 3. register it
        self._register(meta.index, meta.term, info)
        # 4. retention, and a DEK rotation waiting for this snapshot
        self.apply_retention()
        st.rotation.on_snapshot(info)
        if st.encrypted and any(k.state == K.RETIRING for k in list(st.keys.values())):
            st.rotation.finish_retirement()   # a retiring key this snapshot may have freed (or a stream held)
        return info

    def _register(self, index: int, term: int, info: SnapshotInfo) -> None:
        """Register a published snapshot tied to the log; reset the log when the snapshot is ahead of
        it or disagrees with it (one commit: the snapshot and the reset it implies)."""
        st = self.store
        wal = st.wal
        reset = index > wal.last_index() or (index > wal.compacted_index and wal.term(index) != term)
        reset_segment = st.next_segment
        with st.meta.write() as tx:
            tx.put(M.DB_SNAPSHOTS, M.u64(info.snapshot_id), encode_info(info))
            forget_creation_intent(tx, info.snapshot_id)
            if reset:
                tx.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(index, term, reset_segment))
        if reset:
            wal.reset_to(index, term, reset_segment)
        self.install(info)

    def open_info(self, info: SnapshotInfo) -> Snapshot:
        """A retained snapshot (not only the newest), its file bound to its registry record (store,
        ID, digest, key: bind_to_registry) and authenticated as it is read.  The binding is what stops
        another authentic snapshot of this store, an older one put back at this name, from being read
        (or copied, or re-registered) as this one."""
        return Snapshot(info, bind_to_registry(self.store, self.store.vfs, info))

    def open_writer(self, meta: SnapshotMeta, key_id: bytes, *, extra_meta: dict | None = None,
                    snap_id: int | None = None, bundle: bytes | None = None) -> SnapshotWriter:
        """A writer for a snapshot file under ``key_id`` (published by the caller, not registered);
        ``bundle``: its keyring bundle, when not the current one (a KEK rotation being staged)."""
        st = self.store
        st.ensure_dir(self.dir)
        # The ID is taken, and recorded as being written, before the file exists (see _remove_orphans).
        with st.meta.write() as tx:
            raw = tx.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
            nxt = int.from_bytes(raw, "little") if raw else 1
            snap_id = nxt if snap_id is None else snap_id
            intents = M.decode_ids(tx.get(M.DB_STATE, M.K_SNAP_CREATING), st.meta.path)
            tx.put(M.DB_STATE, M.K_SNAP_CREATING, M.encode_ids(sorted(set(intents) | {snap_id})))
            tx.put(M.DB_STATE, M.K_NEXT_SNAPSHOT, max(nxt, snap_id + 1).to_bytes(8, "little"))
        salt = os.urandom(SNAP_SALT_SIZE) if st.encrypted else bytes(SNAP_SALT_SIZE)
        if bundle is None:
            bundle = st.keyring_bundle({key_id})
        h = SnapshotHeader(st.algorithm, 0, st.store_id, snap_id, meta.index, meta.term, self.chunk_size,
                           len(bundle), key_id, salt, b"")
        aead, commitment = self.snapshot_aead(h)
        h.commitment = commitment
        return SnapshotWriter(st.vfs, self.dir, h, aead, bundle, meta, extra_meta)

    def write_file(self, meta: SnapshotMeta, data, key_id: bytes, *, extra_meta: dict | None = None,
                   snap_id: int | None = None, bundle: bytes | None = None) -> SnapshotInfo:
        """Write and publish a snapshot file under ``key_id`` (not registered)."""
        w = self.open_writer(meta, key_id, extra_meta=extra_meta, snap_id=snap_id, bundle=bundle)
        try:
            w.write_from(data)
            path = w.publish()
        except BaseException:
            w.abort()
            raise
        return SnapshotInfo(w.header.snapshot_id, meta.index, meta.term, key_id, w.digest, w.data_bytes, path)

    def install(self, info: SnapshotInfo) -> None:
        """Make a registered snapshot the current one."""
        f = SnapshotFile(self.store.vfs, info.path)
        aead, commitment = self.snapshot_aead(f.header)
        f.unlock(aead, commitment)
        self.infos.append(info)
        self.current = Snapshot(info, f)

    def apply_retention(self, *, drop_keys: set[bytes] | None = None) -> None:
        """Keep the newest ``keep`` snapshots (and none under ``drop_keys`` but the newest)."""
        st = self.store
        keep = self.infos[-self.keep:]
        if drop_keys:
            keep = [i for i in keep if i.key_id not in drop_keys or i is self.infos[-1]]
        gone = [i for i in self.infos if i not in keep]
        if gone:
            with st.meta.write() as w:
                for i in gone:
                    w.delete(M.DB_SNAPSHOTS, M.u64(i.snapshot_id))
                w.put(M.DB_STATE, M.K_SNAP_PURGED, M.encode_ids(i.snapshot_id for i in gone))
            for i in gone:
                try:
                    st.vfs.unlink(i.path)
                except FileNotFoundError:
                    pass
            st.vfs.fsync_dir(self.dir)
            self.infos = keep
        st.purge_segments()

    # ------------------------------------------------------------------ copies (re-key, KEK rotation)
    def register_copies(self, tx, new: list[SnapshotInfo], replaced: Sequence[SnapshotInfo] = ()) -> None:
        """In one metadata transaction: register ``new`` (published copies, oldest first, under IDs above
        every retained one) and drop ``replaced`` from the registry.  The IDs of ``replaced`` become the
        latest purge record, so their files are leftovers if a crash comes before their unlink
        (``_remove_orphans``)."""
        for info in replaced:
            tx.delete(M.DB_SNAPSHOTS, M.u64(info.snapshot_id))
        for info in new:
            tx.put(M.DB_SNAPSHOTS, M.u64(info.snapshot_id), encode_info(info))
            forget_creation_intent(tx, info.snapshot_id)
        if replaced:
            tx.put(M.DB_STATE, M.K_SNAP_PURGED, M.encode_ids(i.snapshot_id for i in replaced))

    def install_copies(self, new: list[SnapshotInfo], replaced: Sequence[SnapshotInfo] = ()) -> None:
        """After register_copies committed: ``new`` replace ``replaced`` in memory (the last of ``new``
        is the current snapshot), and the files of ``replaced`` are removed."""
        gone = {i.snapshot_id for i in replaced}
        # Exclusive: a purge meanwhile would see the retained snapshots half swapped (none, for a
        # moment) and take the compaction point alone as its floor.
        with self.store.wal.exclusive():
            self.infos = [i for i in self.infos if i.snapshot_id not in gone]
            for info in new:
                self.install(info)
        for info in replaced:
            try:
                self.store.vfs.unlink(info.path)
            except FileNotFoundError:
                pass
        if replaced:
            self.store.vfs.fsync_dir(self.dir)

    def remove_abandoned_temporaries(self) -> None:
        """Unlink the ``.tmp-`` files of snapshots no live writer owns (a begin_snapshot() whose handle
        the host dropped without abort()): they carry a keyring bundle, which must not outlive a KEK
        rotation or a key's destruction.  Run before such a commit."""
        st = self.store
        if not os.path.isdir(self.dir):
            return
        live = {os.path.basename(p.writer.tmp) for p in list(self.writing) if not p.settled}
        removed = False
        for name in st.vfs.listdir(self.dir):
            if name.startswith(".tmp-") and name not in live:
                try:
                    st.vfs.unlink(os.path.join(self.dir, name))
                    removed = True
                except FileNotFoundError:
                    pass
        if removed:
            st.vfs.fsync_dir(self.dir)

    def refuse_if_writing(self, what: str) -> None:
        """UsageError while a snapshot from begin() is being written or committed: its keyring bundle
        and data key are those of now, which ``what`` (a KEK rotation, a re-key) would change."""
        if self.in_progress():
            raise UsageError("a snapshot begun with begin_snapshot() is being written, its keyring bundle and "
                             f"data key those of now: commit or abort it, then retry {what}")

    def in_progress(self) -> bool:
        """True while a snapshot begun with begin() has not finished its commit or abort."""
        return any(not p.settled for p in list(self.writing))

    def floor(self) -> int | None:
        """Lowest index a retained snapshot may need the log from (None without snapshots)."""
        return self.infos[0].index if self.infos else None

    def key_ids(self) -> set[bytes]:
        return {i.key_id for i in self.infos}
