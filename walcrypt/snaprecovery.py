"""The snapshot store at open, a mixin of :class:`walcrypt.snapstore.Snapshots`: the registry read,
unregistered files sorted into leftovers, saves rolled forward past their commit point and files
that refuse the open (FORMAT.md 11.8), the newest snapshot verified end to end with fallback to an
older one, a leftover copy standing in for a broken registered snapshot, and damaged older
snapshots set aside before an operation reads them all."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from . import bounded, crypto
from . import format as fmt
from . import meta as M
from .errors import CorruptionError, StorageError, SymlinkError
from .snapinfo import (
    REFUSE_OR_KEEP,
    REGISTER,
    SNAP_NAME,
    Snapshot,
    SnapshotInfo,
    decode_info,
    encode_info,
    orphan_fate,
    unaccounted_snapshot,
)
from .snapshot import (
    SnapshotFile,
    SnapshotHeader,
    snapshot_keys,
)

if TYPE_CHECKING:
    from .storage import Store

log = logging.getLogger("walcrypt")


class SnapshotRecoveryMixin:
    """Opening the snapshot store (see the module docstring)."""

    # Host contract: provided by Snapshots (snapstore.py).
    store: Store
    dir: str
    infos: list[SnapshotInfo]
    current: Snapshot | None

    if TYPE_CHECKING:
        def open_info(self, info: SnapshotInfo) -> Snapshot: ...
        def _register(self, index: int, term: int, info: SnapshotInfo) -> None: ...

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
                aead, commitment = self.snapshot_aead(h)
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
        aead, commitment = self.snapshot_aead(h)
        f.unlock(aead, commitment)
        size = f.verify()
        if size != info.size:
            raise CorruptionError(info.path, None, f"snapshot holds {size} bytes, the registry says {info.size}")
        return Snapshot(info, f)

    def snapshot_aead(self, h: SnapshotHeader):
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
            m = SNAP_NAME.match(name)
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
                    record = self._log_record(snap_id)
                    assert record is not None           # REGISTER: orphan_fate found the record in the log
                    self._roll_forward(path, snap_id, record)
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
            m = SNAP_NAME.match(name)
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
            aead, commitment = self.snapshot_aead(h)
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
                size = self.open_info(info).file.verify()      # every chunk, a chunk at a time
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
