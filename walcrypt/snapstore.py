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
import re
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from . import bounded, crypto
from . import format as fmt
from . import keys as K
from . import meta as M
from .errors import WIPE_ADVICE, AuthenticationError, CorruptionError, StorageError, SymlinkError, UsageError
from .snapshot import (
    DEFAULT_CHUNK_SIZE,
    SNAP_SALT_SIZE,
    MetaRuleError,
    SnapshotFile,
    SnapshotHeader,
    SnapshotWriter,
    check_meta,
    snapshot_file_name,
    snapshot_keys,
)
from .types import ConfState, SnapshotMeta
from .wal import MAX_ENTRY_INDEX, U64_MAX, check_u64

log = logging.getLogger("walcrypt")

_SNAP_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")


@dataclass
class SnapshotInfo:
    snapshot_id: int
    index: int
    term: int
    key_id: bytes
    digest: bytes
    size: int
    path: str


class Snapshot:
    """A readable snapshot: ``meta``, ``size``, ``open()`` (a stream) and ``data`` (all bytes)."""

    def __init__(self, info: SnapshotInfo, file: SnapshotFile):
        self.info = info
        self._file = file
        self.meta: SnapshotMeta = file.meta

    @property
    def size(self) -> int:
        return self.info.size

    def open(self) -> BinaryIO:
        """A binary stream of the decrypted data, authenticated chunk by chunk."""
        import io
        return io.BufferedReader(self._file.stream(), buffer_size=self._file.header.chunk_size)

    @property
    def data(self) -> bytes:
        with self.open() as f:
            return f.read()

    def __repr__(self) -> str:
        return f"<Snapshot index={self.meta.index} term={self.meta.term} size={self.size}>"


def check_snapshot_meta(meta, extra_meta: dict | None = None) -> tuple[SnapshotMeta, dict | None]:
    """Validate a caller's SnapshotMeta (and extra metadata) before anything is written, with the
    rules the reader applies (snapshot.check_meta): -> (metadata, extra metadata) of plain values,
    as they will be sealed.  A UsageError names the offending field."""
    try:
        index, term, conf_state = meta
    except (TypeError, ValueError):
        raise UsageError("meta must be a SnapshotMeta(index, term, conf_state)") from None
    index = check_u64(index, "snapshot index", 1, MAX_ENTRY_INDEX)
    term = check_u64(term, "snapshot term", 1, U64_MAX)
    if isinstance(conf_state, (str, bytes, bytearray, dict)):
        raise UsageError("meta.conf_state must be a ConfState(voters, learners)")
    try:
        voters, learners = conf_state
    except (TypeError, ValueError):
        raise UsageError("meta.conf_state must be a ConfState(voters, learners)") from None
    ids = []
    for name, v in (("voters", voters), ("learners", learners)):
        if isinstance(v, (str, bytes, bytearray, dict)):
            raise UsageError(f"meta.conf_state.{name} must be a sequence of node IDs, not {type(v).__name__}")
        try:
            v = tuple(v)
        except TypeError:
            raise UsageError(f"meta.conf_state.{name} must be a sequence of node IDs, not "
                             f"{type(v).__name__}") from None
        for k, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, (int, str)):
                raise UsageError(f"meta.conf_state.{name}[{k}] is a {type(x).__name__}; node IDs are integers "
                                 "or strings")
        ids.append(tuple(int(x) if isinstance(x, int) else str(x) for x in v))
    meta = SnapshotMeta(index, term, ConfState(*ids))
    try:
        return check_meta(meta, extra_meta)
    except MetaRuleError as exc:
        raise UsageError(f"snapshot metadata refused: {exc} (the reader would refuse the snapshot)") from None


def _blocks(data, size: int):
    """The blocks of a snapshot's data: bytes-like as one block, a binary file read ``size`` at a time."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield data
        return
    read = getattr(data, "read", None)
    if read is None:
        raise UsageError(f"snapshot data must be bytes-like or a binary file, not {type(data).__name__}")
    while True:
        block = read(size)
        if not block:
            return
        yield block


def _registered(tx, snap_id: int) -> None:
    """In the registering transaction: the ID is no longer being written, and never given out again."""
    nxt = tx.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
    nxt = int.from_bytes(nxt, "little") if nxt else 1
    tx.put(M.DB_STATE, M.K_NEXT_SNAPSHOT, max(nxt, snap_id + 1).to_bytes(8, "little"))
    intents = M.decode_ids(tx.get(M.DB_STATE, M.K_SNAP_CREATING), tx.meta.path)
    tx.put(M.DB_STATE, M.K_SNAP_CREATING, M.encode_ids(i for i in intents if i != snap_id))


def encode_info(info: SnapshotInfo) -> bytes:
    return fmt.SNAPSHOT_MANIFEST_STRUCT.pack(1, bytes(7), info.index, info.term, info.key_id, info.digest, info.size)


def decode_info(snap_id: int, raw: bytes, directory: str, path: str) -> SnapshotInfo:
    if len(raw) != fmt.SNAPSHOT_MANIFEST_STRUCT.size:
        raise CorruptionError(path, None, f"snapshot registry record {snap_id} has a bad size")
    version, _r, index, term, key_id, digest, size = fmt.SNAPSHOT_MANIFEST_STRUCT.unpack(raw)
    if version != 1:
        raise CorruptionError(path, None, f"snapshot registry record {snap_id} has unknown version {version}")
    return SnapshotInfo(snap_id, index, term, key_id, digest, size,
                        os.path.join(directory, snapshot_file_name(snap_id, index, term)))


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
                    self.owner._commit(self.meta, info)
        finally:
            self.owner.settle(self)
        st.rotation.ask_for_snapshot()          # a rotation queued behind the one this completed
        return info

    def abort(self) -> None:
        if not self.done:
            self.done = True
            try:
                self.writer.abort()
            finally:
                self.owner.settle(self)


# What a read-write open does with a snapshot file the registry does not list (FORMAT.md 11.8).
DELETE = "delete"                   # a leftover: removed by the latest retention, or a save short of its commit point
REGISTER = "register"               # a save got past its commit point (SNAPSHOT record in the log): rolled forward
REFUSE_OR_KEEP = "refuse-or-keep"   # not named as a leftover: this store's refuses the open, another's is left alone


def orphan_fate(snap_id: int, *, purged: set[int], intents: set[int] | None, next_id: int, in_log) -> str:
    """The fate of the unregistered snapshot file ``snap_id``: DELETE, REGISTER or REFUSE_OR_KEEP.

    ``purged``: IDs the latest retention removed; ``intents``: IDs being written (None: a store written
    before creation intents, where IDs up to ``next_id`` are leftovers); ``in_log()``: whether the log
    holds a SNAPSHOT record for it.  Decides only; the caller acts (or reports)."""
    leftover = snap_id in purged or (snap_id in intents if intents is not None else snap_id <= next_id)
    if not leftover:
        return REFUSE_OR_KEEP
    if snap_id not in purged and in_log():
        return REGISTER
    return DELETE


def unaccounted_snapshot(path: str, snap_id: int, next_id: int) -> CorruptionError:
    """Why a read-write open refuses a snapshot file of this store that the registry lacks."""
    return CorruptionError(
        path, None, f"snapshot {snap_id} of this store is not in the registry (which gives out ID {next_id} "
        "next), and the metadata does not name it as a leftover: its registry record was deleted, or meta/ "
        "is older than the data - restored from an older copy or rolled back",
        "walcrypt deleted nothing. Put back the meta/ that belongs to this data directory; otherwise "
        "restore the node from a snapshot export or " + WIPE_ADVICE)


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
    aead, commitment = Snapshots(st, os.path.dirname(info.path))._keys(h)
    f.unlock(aead, commitment)
    return f


class Snapshots:
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

    # ------------------------------------------------------------------ open
    def load(self) -> None:
        st = self.store
        with st.meta.read() as r:
            rows = r.items(M.DB_SNAPSHOTS)
            # bounded before any save hands out the next ID (it must fit its u64 field)
            M.decode_counter(r.get(M.DB_STATE, M.K_NEXT_SNAPSHOT), st.meta.path, "next snapshot", default=1)
        self.infos = sorted((decode_info(int.from_bytes(k, "big"), v, self.dir, st.meta.path) for k, v in rows),
                            key=lambda i: i.snapshot_id)
        spares: list[tuple[str, int]] = []
        if not st.read_only:
            spares = self._remove_orphans()              # may register a snapshot rolled forward
            self.infos.sort(key=lambda i: i.snapshot_id)
        while self.infos:
            info = self.infos[-1]
            try:
                self.current = self.open_verified(info)
                break
            except SymlinkError:
                raise                        # a link planted in the directory is not a damaged snapshot
            except StorageError as exc:      # bad bytes only: a key or KMS failure must not cost a snapshot
                self._quarantine(info, exc)
                spare = self._adopt_spare(spares, info)
                if spare is not None:
                    self.current = spare
                    break
        if not st.read_only:
            self._remove_leftovers(spares)

    def _adopt_spare(self, spares: list[tuple[str, int]], broken: SnapshotInfo) -> "Snapshot | None":
        """After the registered snapshot ``broken`` failed its checks: a leftover file of this store
        at the same index and term that authenticates in full (the copy an interrupted KEK rotation
        made of it, or a save of the same state that did not commit) is registered in its place.
        Raft's log matching makes two snapshots at one index and term the same state; a file that
        does not authenticate under this store's keys is never adopted."""
        for n, (path, snap_id) in enumerate(spares):
            try:
                f = SnapshotFile(self.store.vfs, path)
                h = f.header
                if (h.store_id, h.snapshot_id, h.index, h.term) != (self.store.store_id, snap_id,
                                                                    broken.index, broken.term):
                    continue
                aead, commitment = self._keys(h)
                f.unlock(aead, commitment)
                size = f.verify()
            except SymlinkError:
                raise
            except StorageError as exc:
                log.warning("leftover snapshot %s cannot stand in for %s (%s)", path, broken.path, exc)
                continue
            del spares[n]
            info = SnapshotInfo(snap_id, h.index, h.term, h.key_id, f.digest, size, path)
            log.warning("registering %s, a leftover copy of the same state, in place of %s", path, broken.path)
            with self.store.meta.write() as tx:
                tx.put(M.DB_SNAPSHOTS, M.u64(snap_id), encode_info(info))
            self.infos.append(info)
            self.infos.sort(key=lambda i: i.snapshot_id)
            return self.open_verified(info)
        return None

    def _remove_leftovers(self, spares: list[tuple[str, int]]) -> None:
        """Delete the leftovers _remove_orphans kept for _adopt_spare, then clear the creation intents
        (in that order: an intent cleared first would make a crash leave an unaccounted file)."""
        st = self.store
        for path, _snap_id in spares:
            st.vfs.unlink(path)
        if spares:
            st.vfs.fsync_dir(self.dir)
        with st.meta.read() as r:
            creating = r.get(M.DB_STATE, M.K_SNAP_CREATING)
        if creating:
            with st.meta.write() as tx:
                tx.put(M.DB_STATE, M.K_SNAP_CREATING, b"")

    def open_verified(self, info: SnapshotInfo) -> Snapshot:
        st = self.store
        if not os.path.lexists(info.path):
            raise CorruptionError(info.path, None, "registered snapshot file is missing")
        f = SnapshotFile(st.vfs, info.path)
        h = f.header
        if h.store_id != st.store_id or h.snapshot_id != info.snapshot_id or f.digest != info.digest:
            raise CorruptionError(info.path, 0, "snapshot file does not match its registry record "
                                                "(replaced, renamed or from another store)")
        aead, commitment = self._keys(h)
        f.unlock(aead, commitment)
        size = f.verify()
        if size != info.size:
            raise CorruptionError(info.path, None, f"snapshot holds {size} bytes, the registry says {info.size}")
        return Snapshot(info, f)

    def _keys(self, h: SnapshotHeader):
        st = self.store
        if h.algorithm == fmt.ALG_NONE:
            if st.encrypted:
                raise CorruptionError(None, None, "plaintext snapshot inside an encrypted store")
            return crypto.suite(fmt.ALG_NONE).new(b""), bytes(fmt.COMMITMENT_SIZE)
        key, commitment = snapshot_keys(st.secret(h.key_id), h)
        return crypto.suite(h.algorithm).new(key), commitment

    def _quarantine(self, info: SnapshotInfo, exc: BaseException) -> None:
        """Rename a failing snapshot to .broken, drop it from the registry, fall back to the older one."""
        st = self.store
        log.warning("snapshot %s failed its checks (%s); using the next older snapshot", info.path, exc)
        if st.read_only:
            raise exc
        if os.path.lexists(info.path):
            st.vfs.rename(info.path, info.path + ".broken")
            st.vfs.fsync_dir(self.dir)
        with st.meta.write() as w:
            w.delete(M.DB_SNAPSHOTS, M.u64(info.snapshot_id))
        self.infos.pop()
        st.repairs.append({"path": info.path, "offset": getattr(exc, "offset", None), "detail": str(exc),
                           "broken_copy": info.path + ".broken", "kind": "snapshot"})

    def _remove_orphans(self) -> list[tuple[str, int]]:
        """Unregistered snapshot files.  Deleted only when they provably hold nothing acknowledged: a
        temporary file, an ID the metadata names as being written (a save whose registration never
        committed) or as removed by the latest retention.  Any other snapshot of this store means a
        registry record was deleted or the metadata is older than the data: open refuses and deletes
        nothing.  (Stores written before creation intents existed: an ID up to next_snapshot is
        deleted, a higher one refused.)

        A file named by a creation intent whose SNAPSHOT record is in the log is not a leftover: that
        record is written (durably) before the registering commit, so the save got past its commit
        point - a crash before the registration, or a ``meta/`` put back from inside that window after
        the save returned.  It is registered now (rolled forward, as the save would have), or, if it
        no longer authenticates, set aside as ``.broken``; never deleted.  (A KEK rotation's copies are
        tied to the log only after the commit that registers them, so an uncommitted one is a
        leftover like any other.)

        Leftover snapshot files named by a creation intent are returned, not deleted: the caller
        deletes them (_remove_leftovers) once it knows that none must stand in for a registered
        snapshot that fails its checks (_adopt_spare)."""
        spares: list[tuple[str, int]] = []
        if not os.path.isdir(self.dir):
            return spares
        st = self.store
        purged, intents, next_id, known = self._orphan_rules()
        removed = False
        for name in sorted(st.vfs.listdir(self.dir)):
            m = _SNAP_NAME.match(name)
            if not name.startswith(".tmp-") and not (m and name not in known):
                continue
            path = os.path.join(self.dir, name)
            if m:
                snap_id = int(m.group(1), 16)
                fate = orphan_fate(snap_id, purged=purged, intents=intents, next_id=next_id,
                                   in_log=lambda snap_id=snap_id: self._log_record(snap_id) is not None)
                if fate == REFUSE_OR_KEEP:
                    self._refuse_newer(path, snap_id, next_id)
                    continue
                if fate == REGISTER:
                    self._roll_forward(path, snap_id, self._log_record(snap_id))
                    continue
                if snap_id not in purged:
                    spares.append((path, snap_id))
                    continue
            st.vfs.unlink(path)
            removed = True
        if removed:
            st.vfs.fsync_dir(self.dir)
        return spares

    def _orphan_rules(self) -> tuple[set[int], set[int] | None, int, set[str]]:
        """What decides the fate of unregistered snapshot files (orphan_fate): the IDs the latest
        retention purged, the IDs being written (None: a store from before creation intents), the
        next snapshot ID, and the names of the registered files."""
        st = self.store
        with st.meta.read() as r:
            nxt = r.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
            creating = r.get(M.DB_STATE, M.K_SNAP_CREATING)
            purged = set(M.decode_ids(r.get(M.DB_STATE, M.K_SNAP_PURGED), st.meta.path))
        next_id = int.from_bytes(nxt, "little") if nxt else 1
        intents = None if creating is None else set(M.decode_ids(creating, st.meta.path))
        return purged, intents, next_id, {os.path.basename(i.path) for i in self.infos}

    def refusal(self) -> CorruptionError | None:
        """The error a read-write open would raise for an unregistered snapshot file of this store, told
        without acting (a read-only open does not look at unregistered files): for a caller that wants
        to refuse before it opens read-write."""
        if not os.path.isdir(self.dir):
            return None
        st = self.store
        purged, intents, next_id, known = self._orphan_rules()
        for name in sorted(st.vfs.listdir(self.dir)):
            m = _SNAP_NAME.match(name)
            if not m or name in known:
                continue
            snap_id = int(m.group(1), 16)
            fate = orphan_fate(snap_id, purged=purged, intents=intents, next_id=next_id,
                               in_log=lambda snap_id=snap_id: self._log_record(snap_id) is not None)
            if fate != REFUSE_OR_KEEP:
                continue
            path = os.path.join(self.dir, name)
            try:
                ours = SnapshotFile(st.vfs, path).header.store_id == st.store_id
            except StorageError:
                ours = False
            if ours:
                return unaccounted_snapshot(path, snap_id, next_id)
        return None

    def _log_record(self, snap_id: int) -> tuple | None:
        """The log's SNAPSHOT record (ID, index, term, digest) for ``snap_id``, if a segment read at
        open holds one.  The record of a save that did not register goes to the segment being
        written then, which the manifest still calls open, so open reads it in full."""
        for seg in self.store.wal.segments:
            for rec in seg.snapshot_records:
                if rec[0] == snap_id:
                    return rec
        # A recovery that sealed that segment and was interrupted before it came here leaves it
        # sealed, and a sealed segment is not read at open: read the sealed ones, newest first (only
        # while an intent-named file is in question, so at most once after such a crash).
        for seg in reversed(self.store.wal.segments):
            if seg.units_scanned:
                continue
            try:
                found = self._scan_snapshot_records(seg)
            except SymlinkError:
                raise
            except StorageError as exc:          # a damaged segment is the log's finding, not this one's
                log.warning("looking for the log record of snapshot %d: %s", snap_id, exc)
                continue
            for rec in found:
                if rec[0] == snap_id:
                    return rec
        return None

    def _scan_snapshot_records(self, seg) -> list[tuple]:
        """The SNAPSHOT records of a segment the open did not scan, read (authenticated) through a
        separate reader so that the log's own Segment object is left as it is."""
        st = self.store
        fd = st.vfs.open(seg.path, os.O_RDONLY)
        try:
            src = bounded.FileSource(st.vfs, fd)
            ident = seg.ident
            rec = {"base_index": ident.base_index, "algorithm": ident.algorithm, "key_id": ident.key_id}
            reader = st.bind_segment(seg.path, seg.seg_id, rec, src.read(0, fmt.SEGMENT_HEADER_SIZE))
            try:
                reader.scan(src)
                return list(reader.snapshot_records)
            finally:
                reader.close()
        finally:
            st.vfs.close(fd)

    def _roll_forward(self, path: str, snap_id: int, record: tuple) -> None:
        st = self.store
        _id, index, term, digest = record
        try:
            f = SnapshotFile(st.vfs, path)
            h = f.header
            if (h.store_id, h.snapshot_id, h.index, h.term, f.digest) != (st.store_id, snap_id, index, term, digest):
                raise CorruptionError(path, 0, "snapshot file differs from the log's record of it")
            aead, commitment = self._keys(h)
            f.unlock(aead, commitment)
            size = f.verify()
        except SymlinkError:
            raise
        except StorageError as exc:            # bad bytes only: a key or KMS failure propagates
            log.warning("snapshot %s is tied to the log but failed its checks (%s); set aside as .broken",
                        path, exc)
            st.vfs.rename(path, path + ".broken")
            st.vfs.fsync_dir(self.dir)
            st.repairs.append({"path": path, "offset": getattr(exc, "offset", None), "detail": str(exc),
                               "broken_copy": path + ".broken", "kind": "snapshot"})
            return
        log.warning("snapshot %s was saved but its registration did not commit; registering it now", path)
        self._register(index, term, SnapshotInfo(snap_id, index, term, h.key_id, digest, size, path))

    def drop_damaged_older(self) -> None:
        """Authenticate every retained snapshot but the current one (open verifies only that one) and
        set aside those that fail: renamed ``.broken``, dropped from the registry, as open does with a
        broken newest snapshot.  Run before an operation that must read them all (a KEK rotation
        copies each), so that bit rot in an older one is a repair, not a failure of the store."""
        st = self.store
        for info in list(self.infos[:-1]):
            try:
                if not os.path.lexists(info.path):
                    raise CorruptionError(info.path, None, "registered snapshot file is missing")
                size = self.open_info(info)._file.verify()      # every chunk, a chunk at a time
                if size != info.size:
                    raise CorruptionError(info.path, None, f"snapshot holds {size} bytes, the registry says "
                                                           f"{info.size}")
            except SymlinkError:
                raise
            except StorageError as exc:          # bad bytes only: a key or KMS failure propagates
                log.warning("retained snapshot %s failed its checks (%s); set aside as .broken", info.path, exc)
                if os.path.lexists(info.path):
                    st.vfs.rename(info.path, info.path + ".broken")
                    st.vfs.fsync_dir(self.dir)
                with st.meta.write() as w:
                    w.delete(M.DB_SNAPSHOTS, M.u64(info.snapshot_id))
                self.infos.remove(info)
                st.repairs.append({"path": info.path, "offset": getattr(exc, "offset", None), "detail": str(exc),
                                   "broken_copy": info.path + ".broken", "kind": "snapshot"})

    def _refuse_newer(self, path: str, snap_id: int, next_id: int) -> None:
        """An unaccounted snapshot file: ours means lost registry records or rolled-back metadata."""
        try:
            ours = SnapshotFile(self.store.vfs, path).header.store_id == self.store.store_id
        except StorageError:
            ours = False
        if not ours:
            log.warning("%s is not a snapshot of this store; left in place - inspect it, then remove it", path)
            return
        raise unaccounted_snapshot(path, snap_id, next_id)

    # ------------------------------------------------------------------ write
    def save(self, meta: SnapshotMeta, data, *, extra_meta: dict | None = None) -> SnapshotInfo:
        pending = self.begin(meta, extra_meta=extra_meta)
        try:
            # The data source is the host's: reading it runs outside the fail-stop guards (an error
            # there aborts this snapshot and leaves the store as it is); writing is guarded.
            for block in _blocks(data, self.chunk_size):
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
            if self.in_progress():
                raise UsageError("a snapshot begun with begin_snapshot() is being written, its keyring bundle and "
                                 f"data key those of now: commit or abort it, then retry {what}")
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
            _registered(tx, info.snapshot_id)
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
            nxt = tx.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
            nxt = int.from_bytes(nxt, "little") if nxt else 1
            snap_id = nxt if snap_id is None else snap_id
            intents = M.decode_ids(tx.get(M.DB_STATE, M.K_SNAP_CREATING), st.meta.path)
            tx.put(M.DB_STATE, M.K_SNAP_CREATING, M.encode_ids(sorted(set(intents) | {snap_id})))
            tx.put(M.DB_STATE, M.K_NEXT_SNAPSHOT, max(nxt, snap_id + 1).to_bytes(8, "little"))
        salt = os.urandom(SNAP_SALT_SIZE) if st.encrypted else bytes(SNAP_SALT_SIZE)
        if bundle is None:
            bundle = st.keyring_bundle({key_id})
        h = SnapshotHeader(st.algorithm, 0, st.store_id, snap_id, meta.index, meta.term, self.chunk_size,
                           len(bundle), key_id, salt, b"")
        aead, commitment = self._keys(h)
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
        aead, commitment = self._keys(f.header)
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
    def register_copies(self, tx, new: list[SnapshotInfo], replaced: list[SnapshotInfo] = ()) -> None:
        """In one metadata transaction: register ``new`` (published copies, oldest first, under IDs above
        every retained one) and drop ``replaced`` from the registry.  The IDs of ``replaced`` become the
        latest purge record, so their files are leftovers if a crash comes before their unlink
        (``_remove_orphans``)."""
        for info in replaced:
            tx.delete(M.DB_SNAPSHOTS, M.u64(info.snapshot_id))
        for info in new:
            tx.put(M.DB_SNAPSHOTS, M.u64(info.snapshot_id), encode_info(info))
            _registered(tx, info.snapshot_id)
        if replaced:
            tx.put(M.DB_STATE, M.K_SNAP_PURGED, M.encode_ids(i.snapshot_id for i in replaced))

    def install_copies(self, new: list[SnapshotInfo], replaced: list[SnapshotInfo] = ()) -> None:
        """After register_copies committed: ``new`` replace ``replaced`` in memory (the last of ``new``
        is the current snapshot), and the files of ``replaced`` are removed."""
        gone = {i.snapshot_id for i in replaced}
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

    def in_progress(self) -> bool:
        """True while a snapshot begun with begin() has not finished its commit or abort."""
        return any(not p.settled for p in list(self.writing))

    def floor(self) -> int | None:
        """Lowest index a retained snapshot may need the log from (None without snapshots)."""
        return self.infos[0].index if self.infos else None

    def key_ids(self) -> set[bytes]:
        return {i.key_id for i in self.infos}
