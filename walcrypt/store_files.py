"""Segment files of a Store, a mixin of :class:`walcrypt.storage.Store`: creating and registering
segments for the WAL (the SegmentProvider side of walcrypt.wal), staged rewrites (a re-key, a
migration: segments and snapshot copies written beside the live ones and registered in one
commit), and removing purged segments."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from . import format as fmt
from . import meta as M
from .errors import (
    StorageError,
)
from .segment import Segment
from .segment_codec import SegmentIdentity
from .types import HardState

if TYPE_CHECKING:
    from . import crypto
    from .rotation import Rotation
    from .snapstore import Snapshots
    from .vfs import VFS
    from .wal import Wal

log = logging.getLogger("walcrypt")

STAGING_BLOCK = 1 << 16      # segment IDs reserved at a time for a staged rewrite (re-key)


class SegmentFilesMixin:
    """Segment files of a Store (see the module docstring)."""

    # Host contract: provided by Store (storage.py) and its other mixins.
    vfs: VFS
    encrypted: bool
    meta: M.Meta
    store_id: bytes
    algorithm: int
    wal_dir: str
    wal: Wal
    snapshots: Snapshots
    rotation: Rotation
    next_segment: int

    if TYPE_CHECKING:
        def _cipher(self, ident: SegmentIdentity) -> tuple[crypto.FrameCipher, bytes]: ...
        def write_key_id(self) -> bytes: ...
        def keyring_bundle(self, key_ids: set[bytes] | None = None, *, kek: dict | None = None) -> bytes: ...

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
        with wal.write_lock:
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
                extra = {k: v for k, v in snap.file.extra.items() if k not in ("index", "term", "conf_state")}
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
        with wal.write_lock:
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
