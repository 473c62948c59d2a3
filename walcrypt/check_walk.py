"""The verification walk (the second pass of walcrypt.check): it reads the metadata once, opens
every file it names right away, and goes on past each problem, recording findings; see
walcrypt.check for the whole story."""

from __future__ import annotations

import os

from . import format as fmt
from . import layout, online, stable
from . import meta as M
from .check_leftovers import LeftoverChecks
from .check_segments import SegmentChecks
from .errors import (
    AuthenticationError,
    CorruptionError,
    KeyProviderError,
    StorageError,
    WalcryptError,
)
from .findings import (
    KEY,
    LEFTOVER,
    LOG,
    METADATA,
    SNAPSHOT,
    CheckReport,
    Finding,
    Progress,
    Removed,
    file_size,
    finding_from,
)
from .segment_codec import segment_file_name
from .snapinfo import decode_info
from .storage import Store
from .wal import Wal


class Walk(SegmentChecks, LeftoverChecks):
    def __init__(self, path: str, kek, encrypted: bool, report: CheckReport, progress: Progress | None,
                 *, live: bool = False):
        self.path = path
        self.kek = kek
        self.encrypted = encrypted
        self.report = report
        self.progress = progress
        self.done = 0
        self.total = 0
        self.live = live                 # a writer held the store when the check began (or since)
        self.unsettled: set[str] = set()   # paths the writer was changing: what notes are about
        self.newest: int | None = None     # the newest segment of the metadata copy
        self.vfs = online.PinnedVFS()
        self._migration_recorded = False

    def error(self, exc: BaseException, kind: str, index: int | None = None) -> Finding:
        if isinstance(exc, KeyProviderError):     # a KMS outage says nothing about the data
            raise exc
        f = finding_from(exc, kind, index)
        self.report.findings.append(f)
        return f

    def warn(self, path: str | None, detail: str, hint: str | None = None, kind: str = LEFTOVER) -> None:
        self.report.findings.append(Finding("warning", path, None, detail, kind=kind, hint=hint))

    def note(self, path: str | None, detail: str, kind: str, offset: int | None = None) -> None:
        """Not a finding: what was not checked because the running writer was changing it."""
        self.report.findings.append(Finding("note", path, offset, detail, kind=kind))
        if path is not None:
            self.unsettled.add(path)

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(min(self.done, self.total), self.total)

    def value(self, db: bytes, key: bytes, what: str) -> bytes | None:
        with self.meta.read() as r:
            raw = r.raw(db, key)
        if raw is None:
            return None
        try:
            return self.meta.open_value(db, key, raw)
        except StorageError as exc:
            self.error(exc, METADATA)
            return None

    def is_live(self) -> bool:
        """Whether a writer holds the store now (or held it earlier in this check)."""
        if not self.live and online.writer_active(self.path):
            self.live = True
        return self.live

    def fresh(self) -> "online.FrozenMeta | None":
        """A new copy of the metadata, catalog authenticated (None when it cannot be read or trusted)."""
        try:
            return self.meta.fresh()
        except StorageError:
            return None

    def removed_meanwhile(self, db: bytes, ident: int) -> bool:
        """A file named by the copy is gone: True when its record is gone from a fresh copy too."""
        fresh = self.fresh()
        return fresh is not None and ident not in fresh.ids(db)

    def fsize(self, path: str) -> int:
        pinned = self.vfs.size_of(path)
        return file_size(path) if pinned is None else pinned

    def run(self) -> None:
        hold = layout.ReadOnlyHold(self.path)      # nothing below the data directory is read through a link
        try:
            self._run()
        finally:
            hold.release()

    def _run(self) -> None:
        try:
            live_meta, self.meta = online.frozen(os.path.join(self.path, layout.META_DIR))
        except StorageError as exc:
            self.error(exc, METADATA)
            return
        try:
            try:
                self.st = Store.keys_only(self.path, self.kek, self.encrypted, self.meta)
            except StorageError as exc:
                self.error(exc, METADATA)
                return
            self.st.vfs = self.vfs
            self._pin_all()
            self._walk()
        finally:
            self.vfs.release()
            live_meta.close()

    def _named_paths(self) -> list[str]:
        """The files the metadata copy names (decoded without checks: only to open them early)."""
        paths = []
        for k, raw in self.meta.tables.get(M.DB_SEGMENTS, {}).items():
            try:
                rec = M.decode_manifest(raw[:-M.MAC_SIZE], self.meta.path)
            except StorageError:
                continue
            d = layout.WAL_ENCRYPTED if rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED else layout.WAL_PLAIN
            paths.append(os.path.join(self.path, d, segment_file_name(int.from_bytes(k, "big"), rec["base_index"])))
        snap_dir = os.path.join(self.path, layout.pair_for(self.encrypted).snap)
        for k, raw in self.meta.tables.get(M.DB_SNAPSHOTS, {}).items():
            try:
                paths.append(decode_info(int.from_bytes(k, "big"), raw[:-M.MAC_SIZE], snap_dir, self.meta.path).path)
            except StorageError:
                continue
        return paths

    def _pin_all(self) -> None:
        """Open every file the metadata copy names, right after the copy.  One that is already gone
        (the writer removed it after the copy) makes a fresh copy and a new round: bounded, and the
        last round's gone files are judged one by one where they are checked."""
        for attempt in range(online.ATTEMPTS):
            gone = [p for p in self._named_paths() if not self.vfs.pin(p)]
            if not gone or attempt == online.ATTEMPTS - 1:
                return
            fresh = self.fresh()
            if fresh is None:
                return                  # the copy in hand stands; its findings follow
            old_meta, old_keys = self.st.meta, self.st.keys
            self.st.meta, self.st.keys = fresh, {}
            try:
                self.st.load_keyring()
            except StorageError:
                self.st.meta, self.st.keys = old_meta, old_keys
                return
            self.vfs.release()
            self.meta = fresh

    def _walk(self) -> None:
        st, rep = self.st, self.report
        if st.encrypted:
            try:
                st.active_key_id()
            except StorageError as exc:
                self.error(exc, KEY)
        compacted = self.value(M.DB_STATE, M.K_COMPACTED, "compaction point")
        nxt = self.value(M.DB_STATE, M.K_NEXT_SEGMENT, "next segment")
        try:
            c_index, c_term, reset = M.decode_compacted(compacted, self.meta.path)
        except StorageError as exc:
            self.error(exc, METADATA)
            c_index, c_term, reset = 0, 0, 0
        next_segment = int.from_bytes(nxt, "little") if nxt and len(nxt) == 8 else None
        if next_segment is None:
            self.error(CorruptionError(self.meta.path, None, "the next segment counter is missing or damaged"),
                       METADATA)
        with self.meta.read() as r:
            state_keys = [k for k, _ in r.raw_items(M.DB_STATE)]
        for key in state_keys:          # every state record is authenticated, those read here or not
            if key not in (M.K_COMPACTED, M.K_NEXT_SEGMENT, M.K_MIGRATION):
                self.value(M.DB_STATE, key, key.decode(errors="replace"))
        migration = self.value(M.DB_STATE, M.K_MIGRATION, "migration")
        self._migration_recorded = migration is not None
        if migration is not None:
            self.warn(self.meta.path, "a migration between encrypted and plaintext was interrupted",
                      "the next read-write open undoes it; run 'walcrypt migrate' again", kind=METADATA)

        # manifest
        with self.meta.read() as r:
            seg_rows = r.raw_items(M.DB_SEGMENTS)
            snap_rows = r.raw_items(M.DB_SNAPSHOTS)
            stable_rows = r.raw_items(M.DB_STABLE)
        manifest, all_ok = [], True
        for k, raw in seg_rows:
            seg_id = int.from_bytes(k, "big")
            try:
                rec = M.decode_manifest(self.meta.open_value(M.DB_SEGMENTS, k, raw), self.meta.path)
            except StorageError as exc:
                f = self.error(exc, METADATA)
                f.detail = f"manifest record of segment {seg_id}: {f.detail}"
                all_ok = False
                continue
            if next_segment is not None and seg_id >= next_segment:
                self.error(CorruptionError(self.meta.path, None, f"segment {seg_id} is in the manifest but the "
                                           f"next segment counter is {next_segment}"), METADATA)
            manifest.append((seg_id, rec))
        snap_infos = self.snapshot_infos(snap_rows)
        self.newest = max((seg_id for seg_id, _ in manifest), default=None)   # the one a writer appends to
        for seg_id, rec in manifest:
            self.total += self.fsize(self.segment_path(seg_id, rec))
        for info in snap_infos:
            self.total += self.fsize(info.path)

        # segments
        segments, removed = [], False
        for seg_id, rec in sorted(manifest, key=lambda x: x[0]):
            rep.segments += 1
            try:
                seg = self.check_segment(seg_id, rec)
            except Removed:
                rep.segments -= 1
                removed = True
                continue
            if seg is None:
                all_ok = False
            else:
                segments.append(seg)
        wal = None
        if all_ok and removed:
            self.note(None, "log continuity was not checked: the running writer removed segments of the log "
                      "while this check read it", LOG)
        elif all_ok:
            wal = Wal(st)
            try:
                wal.load(segments, c_index, c_term, reset)
                rep.first_index, rep.last_index = wal.first_index(), wal.last_index()
            except StorageError as exc:
                self.error(exc, LOG)
                wal = None
        self.leftover_segments({seg_id for seg_id, _ in manifest})

        # snapshots
        wal_snapshot_records = {r[0]: r for s in segments for r in s.snapshot_records}
        good = []
        for n, info in enumerate(snap_infos):
            rep.snapshots += 1
            try:
                size = self.check_snapshot(info)
                logged = wal_snapshot_records.get(info.snapshot_id)
                if logged is not None and (logged[1], logged[2], logged[3]) != (info.index, info.term, info.digest):
                    raise AuthenticationError(info.path, None, f"snapshot {info.snapshot_id} differs from the "
                                              "SNAPSHOT record the log holds for it (replaced file or registry)")
                rep.snapshot_bytes += size
                good.append(info)
            except Removed:
                rep.snapshots -= 1
                self.note(info.path, f"snapshot {info.snapshot_id} was removed by the running writer (retention) "
                          "while this check read the store; its registry record is gone too: not checked", SNAPSHOT)
            except WalcryptError as exc:
                f = self.error(exc, SNAPSHOT, index=info.index)
                if n == len(snap_infos) - 1 and good and wal is not None:
                    # The engine renames a broken newest snapshot .broken and falls back to the next older
                    # one, provided the log still reaches back to it (storage._after_snapshot_fallback).
                    older = good[-1].index
                    physical_first = wal.view_first[0] if wal.view_first else wal.last + 1
                    if older >= c_index or physical_first <= older + 1:
                        f.repairable = True
                        f.hint = (f"'walcrypt repair' renames it .broken and falls back to the snapshot at "
                                  f"index {older}")
        self.leftover_snapshots({os.path.basename(i.path) for i in snap_infos}, set(wal_snapshot_records))

        # stable store
        for k, raw in stable_rows:
            try:
                stable.open_value(st, k, self.meta.open_value(M.DB_STABLE, k, raw))
            except WalcryptError as exc:
                self.error(exc, METADATA)
        self.other_mode()


