"""Recovery at open, a mixin of :class:`walcrypt.storage.Store`: the manifest, every segment opened
and scanned (the torn-tail rule, FORMAT.md 11.4-11.5), damage below the newest snapshot set aside
(walcrypt.salvage), unsealed segments repaired and sealed (11.9), the log assembled, and the rules
for segment files the manifest does not list (11.6): deleted only when they provably never held
an acknowledged write, refused when they prove the metadata older than the data."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from . import format as fmt
from . import layout, salvage
from . import meta as M
from .bounded import FileSource
from .errors import (
    WIPE_ADVICE,
    AuthenticationError,
    CorruptionError,
    KeyNotFoundError,
    StorageError,
    SymlinkError,
    UnsafeFileError,
)
from .segment import Segment
from .segment_codec import SegmentIdentity, decode_header, segment_file_name

if TYPE_CHECKING:
    from . import crypto
    from .rotation import Rotation
    from .snapstore import Snapshots
    from .vfs import VFS
    from .wal import Wal

log = logging.getLogger("walcrypt")



class RecoveryMixin:
    """Opening and recovering the segments of a Store (see the module docstring)."""

    # Host contract: provided by Store (storage.py) and its other mixins.
    path: str
    vfs: VFS
    read_only: bool
    meta: M.Meta
    meta_version: int
    store_id: bytes
    wal_dir: str
    wal: Wal
    snapshots: Snapshots
    rotation: Rotation
    repairs: list[dict]
    next_segment: int
    _drop_segments: frozenset

    if TYPE_CHECKING:
        def _cipher(self, ident: SegmentIdentity) -> tuple[crypto.FrameCipher, bytes]: ...
        def _manifest_record(self, seg: Segment) -> dict: ...

    # ------------------------------------------------------------------ recovery
    def recover_at_open(self) -> None:
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
        opened: list[tuple[dict, Segment, tuple | None]] = []
        damaged: dict[int, StorageError] = {}
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
            head = (self.vfs.pread(fd, fmt.SEGMENT_HEADER_SIZE, 0) if src is None
                    else src.read(0, fmt.SEGMENT_HEADER_SIZE))
            seg = self.bind_segment(path, seg_id, rec, head)
            if sealed:
                seg.load_sealed(rec["index_offset"], rec["end_offset"])
                return seg, None
            assert src is not None              # an unsealed segment is read through src
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
            if name.endswith(".broken") and (m := layout.SEGMENT_NAME.match(name[:-len(".broken")])):
                seg_id = int(m.group(1), 16)
                if seg_id in self._purged and seg_id not in known:   # its segment was purged (remove_segments)
                    self.vfs.unlink(os.path.join(self.wal_dir, name))
                    changed = True
                continue
            m = layout.SEGMENT_NAME.match(name)
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
            m = layout.SEGMENT_NAME.match(name)
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
