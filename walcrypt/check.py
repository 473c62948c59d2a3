"""Verification and repair: read and authenticate every record and every snapshot chunk.

``check(path, kek=..., fix=False)`` returns findings instead of raising, the way
python-diskcache's ``check`` does; ``fix=True`` is the same walk followed by a
repair of what the written rule calls repairable.

The walk (``fix=False``) writes nothing and takes no lock, so it runs on a store
whose writer is running (see :mod:`walcrypt.online` for how it tells the writer's
work from damage).  It is two passes:

1. the engine's own read-only open, so that every check the engine makes at
   open time (manifest MACs, sealed indexes, the torn-tail rule, log
   continuity, the newest snapshot) also runs here;
2. an independent walk that does not stop at the first problem: each metadata
   record's MAC on its own, every segment scanned from its header to its end
   (sealed ones too: each frame's CRC, tag, sequence number and chain value,
   then the INDEX frame compared with what the scan found), log continuity
   across segments, every registered snapshot chunk by chunk, every
   stable-store value, and warnings about leftovers (``.broken`` copies, files
   the manifest does not list, data of the other mode, interrupted migrations).
   The walk reads the metadata once, in one short read transaction, and opens
   every file it names right away; a file the writer removed meanwhile, the
   write in progress at the tail of the segment being appended to, and an
   engine open that failed only because the store changed under it become
   ``note`` findings, never errors.

``fix=True`` runs the walk first.  Nothing wrong: nothing is written.  Only
torn tails (and a broken newest snapshot with an intact older one the log still
reaches back to): the store is opened read-write, which truncates each torn tail
after keeping a ``.broken`` copy and quarantines the snapshot, and the walk runs
again.  Anything else - mid-log corruption, tampering, a missing segment, an
edited manifest - is refused with nothing modified and a note of what the
operator can do instead.  Authenticated data is never deleted.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import format as fmt
from . import layout, online, snapinfo
from . import meta as M
from .bounded import FileSource, Source
from .errors import (
    WIPE_ADVICE,
    WIPE_NOTE,
    AuthenticationError,
    CorruptionError,
    KeyProviderError,
    LockedError,
    StorageError,
    UsageError,
    WalcryptError,
    WrongKeyError,
)
from .segment import Segment
from .storage import Store, stored_mode
from .vfs import DEFAULT_VFS

# Finding kinds.  Only TORN (and SNAPSHOT, when an older snapshot can take over) are repairable.
TORN = "torn-tail"
SEGMENT = "segment"
LOG = "log"
METADATA = "metadata"
SNAPSHOT = "snapshot"
KEY = "key"
LEFTOVER = "leftover"
ENGINE = "open"

_SNAP_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")

RESTORE_ADVICE = (
    "Do not start the node on this data. Keep a copy for analysis (cp -a {dir} {dir}.damaged), then either "
    "restore the node from a backup export ('walcrypt snapshot restore EXPORT NEW_DIR', then swap the "
    "directories) or wipe the data directory and let Raft re-replicate the node from the leader; "
    + WIPE_NOTE.replace("{", "{{").replace("}", "}}") + ". When only meta/ is lost or damaged, 'walcrypt "
    "recover' rebuilds it from the snapshot and segment files.")

Progress = Callable[[int, int], None]


@dataclass
class Finding:
    severity: str            # "error" | "repaired" | "warning" | "note" (what was not checked, and why)
    path: str | None
    offset: int | None
    detail: str
    index: int | None = None
    kind: str = SEGMENT
    hint: str | None = None
    repairable: bool = False         # what 'walcrypt repair' fixes: a torn tail, a snapshot with a fallback

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    segments: int = 0
    records: int = 0
    entries: int = 0
    bytes: int = 0
    snapshots: int = 0
    snapshot_bytes: int = 0
    first_index: int | None = None
    last_index: int | None = None
    refused: bool = False            # fix=True declined to touch the store
    advice: str | None = None        # what the operator can do instead
    repaired: bool = False           # fix=True opened the store read-write and repaired something
    # damaged segments wholly below the newest valid snapshot (walcrypt.salvage): what repair sets
    # aside and the index range it no longer serves (planned by verify, done by repair)
    compaction: dict | None = None

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "segments": self.segments, "records": self.records, "entries": self.entries,
                "bytes": self.bytes, "snapshots": self.snapshots, "snapshot_bytes": self.snapshot_bytes,
                "first_index": self.first_index, "last_index": self.last_index,
                "repaired": self.repaired, "refused": self.refused, "advice": self.advice,
                "compaction": self.compaction, "findings": [f.to_dict() for f in self.findings]}


def _finding(exc: BaseException, kind: str, index: int | None = None) -> Finding:
    if isinstance(exc, CorruptionError):
        return Finding("error", exc.path, exc.offset, exc.detail, index, kind, exc.hint)
    return Finding("error", None, None, f"{type(exc).__name__}: {exc}", index, kind)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def check(path: str, *, kek=None, encrypted: bool | None = None, fix: bool = False,
          progress: Progress | None = None) -> CheckReport:
    """Walk every segment and snapshot of the store at ``path``; authenticate every record and chunk.

    ``encrypted=None`` takes the mode from the store.  Key and usage problems (wrong KEK,
    missing key, not a store, locked for ``fix``) raise; problems with the bytes on disk
    become findings.  ``progress(done, total)`` is called with byte counts."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise UsageError(f"{path} does not exist or is not a directory")
    if not layout.looks_like_store(path):
        raise UsageError(f"{path} is not a walcrypt data directory (no meta/)")
    if encrypted is None:
        encrypted = stored_mode(path)
        if encrypted is None:
            raise UsageError(f"{path} is not an initialised walcrypt store")
    if encrypted and kek is None:
        raise KeyProviderError(f"{path} is encrypted: a key-encryption key is needed to verify it")
    if kek is not None and not encrypted:
        raise UsageError(f"{path} holds a plaintext store, but a key was given: nothing in it is authenticated "
                         "by a key. If this store was encrypted, its metadata was replaced and must not be "
                         "trusted; if it is a plaintext store, verify it without a key")
    if not fix:
        return _verify(path, kek, encrypted, progress)
    return _repair(path, kek, encrypted, progress)


def _verify(path: str, kek, encrypted: bool, progress: Progress | None) -> CheckReport:
    report = CheckReport()
    engine_exc: WalcryptError | None = None
    live = online.writer_active(path)
    try:
        online.engine_open(path, kek, encrypted, live=live).close()
    except (UsageError, LockedError, KeyProviderError, WrongKeyError):
        raise
    except online.ChangedMeanwhile as exc:
        report.findings.append(Finding("note", None, None, f"the engine's read-only open was not repeated on a "
                                       f"quiet moment ({exc}); the walk below stands alone", kind=ENGINE))
    except WalcryptError as exc:
        engine_exc = exc
    walk = _Walk(path, kek, encrypted, report, progress, live=live)
    walk.run()
    _below_snapshot(path, kek, encrypted, report)
    if engine_exc is not None:
        epath = getattr(engine_exc, "path", None)
        explained = any(f.severity == "error" and (epath is None or f.path == epath) for f in report.findings) \
            or (epath is not None and epath in walk.unsettled)
        if not explained:
            report.findings.insert(0, _finding(engine_exc, ENGINE))
    return report


def _repair(path: str, kek, encrypted: bool, progress: Progress | None) -> CheckReport:
    before = _verify(path, kek, encrypted, progress)
    errors = before.errors
    if not errors:
        return before
    blocking = [f for f in errors if not f.repairable]
    if blocking:
        before.refused = True
        before.advice = ("nothing was modified. This is not a torn tail: 'walcrypt repair' only truncates an "
                         "incomplete last write, drops a broken newest snapshot when an older one can take "
                         "over, and sets aside damaged segments that lie wholly below the newest valid snapshot; "
                         "it never deletes authenticated data. " + RESTORE_ADVICE.format(dir=path))
        return before
    drop = frozenset(before.compaction["segments"]) if before.compaction else frozenset()
    with Store(path, kek=kek, encrypted=encrypted, read_only=False, _drop_segments=drop) as s:
        repairs = list(s.repairs)
    after = _verify(path, kek, encrypted, None)
    done = []
    for rep in repairs:
        if rep.get("kind") == "compacted":
            damage = next((f.detail for f in errors if f.repairable and f.path == rep["path"]), rep["damage"])
            copy = (f"the file is kept as {os.path.basename(rep['broken_copy'])}" if rep["broken_copy"]
                    else "the file was missing")
            done.append(Finding("repaired", rep["path"], rep.get("offset"),
                                f"segment {rep['segment']} ({damage}): {copy}; {rep['detail']}",
                                kind=SEGMENT))
            after.compaction = rep["plan"]
            continue
        if rep.get("kind") == "snapshot":
            detail = (f"broken snapshot renamed to {os.path.basename(rep['broken_copy'])} and dropped from the "
                      "registry; the next older snapshot is used")
        else:
            detail = (f"torn tail truncated to {rep['truncated_to']} bytes ({rep['detail']}); "
                      f"a copy of the file before the repair is kept in {os.path.basename(rep['broken_copy'])}")
        done.append(Finding("repaired", rep["path"], rep.get("offset"), detail,
                            kind=SNAPSHOT if rep.get("kind") == "snapshot" else TORN))
    after.findings = done + after.findings
    after.repaired = bool(done)
    return after


def _below_snapshot(path: str, kek, encrypted: bool, report: CheckReport) -> None:
    """Mark the errors of damaged segments that lie wholly below the newest valid snapshot repairable
    (walcrypt.salvage: repair sets them aside and compacts the log up to the snapshot), and note the
    plan in ``report.compaction``.  All of them or none: one that cannot be set aside blocks repair."""
    from . import salvage
    from .snapstore import Snapshots
    candidates = [f for f in report.errors if not f.repairable and f.kind in (SEGMENT, ENGINE)
                  and f.path and salvage.segment_id_of(f.path) is not None]
    if not candidates:
        return
    hold = layout.ReadOnlyHold(path)
    try:
        meta = M.Meta(os.path.join(path, layout.META_DIR), readonly=True)
        try:
            st = bare_store(path, kek, encrypted, meta)
            with meta.read() as r:
                manifest = {int.from_bytes(k, "big"): M.decode_manifest(v, meta.path)
                            for k, v in r.items(M.DB_SEGMENTS)}
                c_index, c_term, reset = M.decode_compacted(r.get(M.DB_STATE, M.K_COMPACTED), meta.path)
            paths = {st.segment_path(i, rec): i for i, rec in manifest.items()}
            damaged = {paths[f.path] for f in candidates if f.path in paths}
            if not damaged:
                return
            snaps = Snapshots(st, os.path.join(path, layout.pair_for(encrypted).snap))
            p = salvage.plan(manifest, damaged, c_index, c_term, reset, snaps, meta)
        finally:
            meta.close()
    except WalcryptError:
        return                           # the metadata itself is in doubt: the walk reported it
    finally:
        hold.release()
    if p is None:
        return
    for f in candidates:
        if f.path in paths and paths[f.path] in damaged:
            f.repairable = True
            f.hint = ("it lies wholly below the snapshot at index {}: 'walcrypt repair' sets it aside and compacts "
                      "the log up to the snapshot (nothing above it is lost)".format(p.snapshot_index)
                      if p.snapshot_index is not None else
                      "it holds no entry of the log: 'walcrypt repair' sets it aside")
    report.compaction = p.to_dict()


# ---------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------

def bare_store(path: str, kek, encrypted: bool, meta: M.Meta) -> Store:
    """A Store that has its keys unwrapped but has opened nothing else (no lock, no recovery).

    Used by the walk, which must keep going where the engine's open stops at the first
    problem.  Raises WrongKeyError / KeyProviderError for key problems."""
    st = Store.__new__(Store)
    st.path, st.vfs, st.read_only, st.encrypted, st.closed = path, DEFAULT_VFS, True, encrypted, True
    st.repairs, st._kek, st._lock, st.meta = [], kek, None, meta
    st.open_keys(kek, "aes-256-gcm")
    return st


class _Removed(Exception):
    """A file the metadata copy names was removed by the running writer (its record is gone too)."""


class _Walk:
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

    # -- helpers ---------------------------------------------------------------
    def error(self, exc: BaseException, kind: str, index: int | None = None) -> Finding:
        if isinstance(exc, KeyProviderError):     # a KMS outage says nothing about the data
            raise exc
        f = _finding(exc, kind, index)
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
        return _size(path) if pinned is None else pinned

    # -- the walk --------------------------------------------------------------
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
                self.st = bare_store(self.path, self.kek, self.encrypted, self.meta)
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
        from .segment import segment_file_name
        from .snapinfo import decode_info
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
        snap_infos = self._snapshot_infos(snap_rows)
        self.newest = max((seg_id for seg_id, _ in manifest), default=None)   # the one a writer appends to
        for seg_id, rec in manifest:
            self.total += self.fsize(self._segment_path(seg_id, rec))
        for info in snap_infos:
            self.total += self.fsize(info.path)

        # segments
        segments, removed = [], False
        for seg_id, rec in sorted(manifest, key=lambda x: x[0]):
            rep.segments += 1
            try:
                seg = self._segment(seg_id, rec)
            except _Removed:
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
            from .wal import Wal
            wal = Wal(st)
            try:
                wal.load(segments, c_index, c_term, reset)
                rep.first_index, rep.last_index = wal.first_index(), wal.last_index()
            except StorageError as exc:
                self.error(exc, LOG)
                wal = None
        self._leftover_segments({seg_id for seg_id, _ in manifest})

        # snapshots
        wal_snapshot_records = {r[0]: r for s in segments for r in s.snapshot_records}
        good = []
        for n, info in enumerate(snap_infos):
            rep.snapshots += 1
            try:
                size = self._snapshot(info)
                rec = wal_snapshot_records.get(info.snapshot_id)
                if rec is not None and (rec[1], rec[2], rec[3]) != (info.index, info.term, info.digest):
                    raise AuthenticationError(info.path, None, f"snapshot {info.snapshot_id} differs from the "
                                              "SNAPSHOT record the log holds for it (replaced file or registry)")
                rep.snapshot_bytes += size
                good.append(info)
            except _Removed:
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
        self._leftover_snapshots({os.path.basename(i.path) for i in snap_infos}, set(wal_snapshot_records))

        # stable store
        from . import stable
        for k, raw in stable_rows:
            try:
                stable.open_value(st, k, self.meta.open_value(M.DB_STABLE, k, raw))
            except WalcryptError as exc:
                self.error(exc, METADATA)
        self._other_mode()

    # -- segments --------------------------------------------------------------
    def _segment_path(self, seg_id: int, rec: dict) -> str:
        d = layout.WAL_ENCRYPTED if rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED else layout.WAL_PLAIN
        from .segment import segment_file_name
        return os.path.join(self.path, d, segment_file_name(seg_id, rec["base_index"]))

    def _segment(self, seg_id: int, rec: dict) -> Segment | None:
        path = self._segment_path(seg_id, rec)
        size = self.fsize(path)
        try:
            return self._segment_checked(seg_id, rec, path)
        finally:
            self.advance(size)

    def _segment_checked(self, seg_id: int, rec: dict, path: str, *, again: bool = False) -> Segment | None:
        """Check one segment; None after a finding (or a note), raises _Removed."""
        if (rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED) != self.encrypted:
            self.error(AuthenticationError(self.meta.path, None, f"the manifest places segment {seg_id} in "
                                           f"{os.path.basename(os.path.dirname(path))}/, which does not match "
                                           "the store's mode"), SEGMENT)
            return None
        if not self.vfs.pinned(path) and not os.path.lexists(path):
            if self.removed_meanwhile(M.DB_SEGMENTS, seg_id):
                self.note(path, f"segment {seg_id} was removed by the running writer (compaction) while this check "
                          "read the store; its manifest record is gone too: not checked", SEGMENT)
                raise _Removed
            self.error(CorruptionError(path, None, f"segment {seg_id} listed in the manifest is missing",
                                       "a segment file was deleted or renamed; restore the node from a snapshot "
                                       "or " + WIPE_ADVICE), SEGMENT)
            return None
        sealed = rec["state"] == fmt.SEG_SEALED
        # A sealed segment never changes, nor does an unsealed one an earlier lifetime left (the writer
        # seals or repairs those at its open).  The newest, which a running writer appends to, is read
        # again when a read of it fails, and a failure is reported only when two reads in a row fail
        # alike (see walcrypt.online).
        def appending() -> bool:         # asked again after a failure: a writer may have started since
            return not sealed and seg_id == self.newest and self.is_live()

        prev = None
        for _attempt in range(1 if sealed else online.ATTEMPTS):
            out = self._read_segment(seg_id, rec, path, mid_write=appending())
            if not isinstance(out, Finding):
                break
            exc_key = (out.offset, out.detail)
            if not appending() or out.kind == KEY or exc_key == prev:
                self.report.findings.append(out)
                return None
            prev = exc_key
        else:
            self.note(path, "the running writer changed this segment during each attempt to read it: not checked",
                      SEGMENT)
            return None
        seg, committed_end, torn, counts = out
        if torn is not None and self.is_live():
            state = self._writer_state(seg_id)
            if state == "removed":
                seg.close()
                self.note(path, f"segment {seg_id} was removed by the running writer while this check read the "
                          "store; its manifest record is gone too: not checked", SEGMENT)
                raise _Removed
            if isinstance(state, dict) and not again:
                seg.close()              # sealed since the copy: checked again as the sealed segment it is now
                return self._segment_checked(seg_id, state, path, again=True)
            if state == "appending":
                # A second read, started after the first ended, with the rule that a later COMMIT frame
                # proves the unit complete: the COMMIT the first read saw was written after the bytes
                # before it, so if the same offset fails again with it, that is damage, not a write in
                # progress (FORMAT.md 11.13, 4).
                again_out = self._read_segment(seg_id, rec, path, mid_write=False)
                if isinstance(again_out, Finding) and again_out.offset == torn[0]:
                    seg.close()
                    self.report.findings.append(again_out)
                    return None
                if not isinstance(again_out, Finding):
                    again_out[0].close()
                self.note(path, f"the running writer appends to this segment: authenticated up to offset "
                          f"{committed_end}, its last commit when it was read; what follows ({torn[1]} at offset "
                          f"{torn[0]}) may be a write in progress", SEGMENT, offset=committed_end)
                torn = None
        rep = self.report
        rep.entries += counts[0]
        rep.bytes += counts[1]
        rep.records += seg.seq
        if torn is not None:
            rep.findings.append(Finding(
                "error", path, torn[0], f"torn tail: {torn[1]} after the last commit at offset "
                f"{committed_end} (an incomplete write by a process that crashed)", seg.last_index + 1, TORN,
                f"'walcrypt repair' truncates the file to {committed_end} bytes and keeps a .broken copy",
                repairable=True))
        if sealed:
            try:
                self._check_sealed(seg, rec, self.fsize(path))
            except WalcryptError as exc:
                self.error(exc, SEGMENT if isinstance(exc, StorageError) else KEY, index=seg.last_index + 1)
                seg.close()
                return None
        seg.close()
        return seg

    def _read_segment(self, seg_id: int, rec: dict, path: str, *, mid_write: bool):
        """One read of a segment: (segment, committed end, torn tail or None, [entries, bytes]), or the
        Finding its failure makes."""
        st = self.st
        src = fd = seg = None
        counts = [0, 0]
        try:
            fd = st.vfs.open(path, os.O_RDONLY)
            src = FileSource(st.vfs, fd)           # read a window at a time, whatever the file size
            seg = st.bind_segment(path, seg_id, rec, src.read(0, fmt.SEGMENT_HEADER_SIZE))
            seg.tail_may_be_mid_write = mid_write

            def on_entries(r):
                counts[0] += len(r)
                counts[1] += r.ends[-1] - r.ends[0]

            committed_end, torn = seg.scan(src, on_entries=on_entries)
            if torn is not None and rec["state"] == fmt.SEG_SEALED:
                raise CorruptionError(path, torn[0], f"sealed segment is damaged: {torn[1]}",
                                      "a sealed segment is never repaired")
            return seg, committed_end, torn, counts
        except WalcryptError as exc:
            if isinstance(exc, KeyProviderError):
                raise
            f = _finding(exc, KEY if not isinstance(exc, StorageError) else SEGMENT,
                         _index_at(src, getattr(exc, "offset", None), seg))
            if seg is not None:
                seg.close()
            return f
        finally:
            if fd is not None:
                st.vfs.close(fd)

    def _writer_state(self, seg_id: int):
        """How a fresh copy of the metadata names a segment: "removed", its record (a dict) when it is
        sealed now (the writer sealed it, or closed), "appending" when it is the newest segment, open,
        and a writer holds the store (the one it appends to), else "open"."""
        fresh = self.fresh()
        if fresh is None:
            return "open"
        rows = fresh.tables.get(M.DB_SEGMENTS, {})
        key = M.u64(seg_id)
        if key not in rows:
            return "removed"
        try:
            rec = M.decode_manifest(fresh.open_value(M.DB_SEGMENTS, key, rows[key]), fresh.path)
        except StorageError:
            return "open"
        if rec["state"] == fmt.SEG_SEALED:
            return rec
        return "appending" if key == max(rows) and online.writer_active(self.path) else "open"

    def _check_sealed(self, seg: Segment, rec: dict, size: int) -> None:
        path = seg.path
        if not seg.sealed:
            raise CorruptionError(path, None, "the manifest says sealed but the segment has no index frame")
        if size != rec["end_offset"] or seg.index_offset != rec["index_offset"]:
            raise CorruptionError(path, min(size, rec["end_offset"]),
                                  f"sealed segment is {size} bytes with its index at {seg.index_offset}, the "
                                  f"manifest says {rec['end_offset']} bytes with the index at {rec['index_offset']}")
        ref = Segment(seg.vfs, path, seg.ident, seg.cipher)
        try:
            ref.load_sealed(rec["index_offset"], rec["end_offset"])
        finally:
            ref.close()
        if (ref.rec_index != seg.rec_index or ref.rec_offset != seg.rec_offset or ref.rec_count != seg.rec_count
                or ref.last_index != seg.last_index or ref.hardstate_offset != seg.hardstate_offset):
            raise AuthenticationError(path, rec["index_offset"],
                                      "the index frame disagrees with the records it indexes")
        if rec["last_index"] != seg.last_index:
            raise AuthenticationError(self.meta.path, None, f"manifest record of segment {seg.seg_id} says last "
                                      f"index {rec['last_index']}, the segment ends at {seg.last_index}")

    def _fresh_if_live(self) -> "online.FrozenMeta | None":
        """While a writer holds the store: a fresh copy of the metadata, taken after a directory was
        listed, to tell the writer's files in progress from leftovers (None otherwise)."""
        return self.fresh() if self.is_live() else None

    def _leftover_segments(self, known: set[int]) -> None:
        """Files of the segment directory the manifest does not list, each with what a read-write open
        really does with it (Store.orphan_fate: the engine's own rule, told without acting)."""
        d = os.path.join(self.path, layout.pair_for(self.encrypted).wal)
        if not os.path.isdir(d):
            return
        names = sorted(os.listdir(d))
        fresh = self._fresh_if_live()
        rules = None
        for name in names:
            p = os.path.join(d, name)
            m = layout.SEGMENT_NAME.match(name)
            if name.endswith(".broken") or re.search(r"\.broken\.\d+$", name):
                self.warn(p, "copy of a segment kept by an earlier repair (a torn tail cut, or a damaged segment "
                             "set aside)",
                          "keep it for analysis or remove it; the store does not read it")
            elif name.endswith(".unlisted"):
                self.warn(p, "file kept aside by an earlier open: it was not in the manifest and not known to be "
                             "a leftover; the store does not read it", "inspect it, then remove it")
            elif m and int(m.group(1), 16) not in known:
                if fresh is not None and self._writers_segment(int(m.group(1), 16), p, fresh):
                    continue
                if rules is None:
                    try:
                        with self.meta.read() as r:
                            self.st.load_orphan_rules(r)
                        rules = True
                    except StorageError:
                        rules = False
                if not rules:
                    self.warn(p, "segment file not listed in the manifest; the metadata that decides what becomes "
                                 "of it is damaged (see the errors above), so no open gets as far as it")
                    continue
                try:
                    fate, why, hint = self.st.orphan_fate(p, int(m.group(1), 16), int(m.group(2), 16))
                except WalcryptError as exc:
                    self.error(exc, SEGMENT)
                    continue
                if fate == "refuse":
                    self.report.findings.append(Finding("error", p, None, f"{why}; every open refuses this store",
                                                        kind=METADATA, hint=hint))
                elif fate == "delete":
                    self.warn(p, f"segment file not listed in the manifest: {why}; the next read-write open "
                                 "deletes it")
                else:
                    self.warn(p, f"segment file not listed in the manifest: {why}; the next read-write open keeps "
                                 f"it aside as {name}.unlisted and deletes nothing", hint)
            elif not m:
                self.warn(p, "unexpected file in the segment directory; the store neither reads nor removes it")

    def _writers_segment(self, seg_id: int, path: str, fresh) -> bool:
        """A segment file the running writer is creating, has registered or is removing since the copy."""
        staging = sorted(fresh.state_ids(M.K_STAGING))
        return (seg_id in fresh.ids(M.DB_SEGMENTS) or seg_id in fresh.state_ids(M.K_CREATING)
                or seg_id in fresh.state_ids(M.K_PURGED) or (len(staging) == 2 and staging[0] <= seg_id < staging[1])
                or seg_id >= (self.meta.counter(M.K_NEXT_SEGMENT) or 0) or not os.path.lexists(path))

    # -- snapshots -------------------------------------------------------------
    def _snapshot_infos(self, rows) -> list:
        from .snapinfo import decode_info
        snap_dir = os.path.join(self.path, layout.pair_for(self.encrypted).snap)
        infos = []
        for k, raw in rows:
            sid = int.from_bytes(k, "big")
            try:
                infos.append(decode_info(sid, self.meta.open_value(M.DB_SNAPSHOTS, k, raw), snap_dir, self.meta.path))
            except StorageError as exc:
                f = self.error(exc, METADATA)
                f.detail = f"registry record of snapshot {sid}: {f.detail}"
        return sorted(infos, key=lambda i: i.snapshot_id)

    def _snapshot(self, info) -> int:
        """Authenticate one registered snapshot end to end; returns its data size (_Removed when the
        writer removed it meanwhile)."""
        from .snapstore import bind_to_registry
        st = self.st
        if not self.vfs.pinned(info.path) and not os.path.lexists(info.path):
            if self.removed_meanwhile(M.DB_SNAPSHOTS, info.snapshot_id):
                raise _Removed
            raise CorruptionError(info.path, None, "registered snapshot file is missing")
        fsize = self.fsize(info.path)
        counted = 0
        try:
            f = bind_to_registry(st, st.vfs, info)
            total = 0
            for chunk in f.chunks():
                total += len(chunk)
                step = min(len(chunk), fsize - counted)
                counted += step
                self.advance(step)
            if total != info.size:
                raise CorruptionError(info.path, None, f"snapshot holds {total} bytes, the registry says {info.size}")
            return total
        finally:
            self.advance(fsize - counted)

    def _leftover_snapshots(self, known: set[str], in_log: set[int]) -> None:
        """Files of the snapshot directory the registry does not list, each with what a read-write open
        really does with it (snapinfo.orphan_fate, the rule Snapshots._remove_orphans acts on)."""
        from .snapshot import SnapshotFile
        d = os.path.join(self.path, layout.pair_for(self.encrypted).snap)
        if not os.path.isdir(d):
            return
        names = sorted(os.listdir(d))
        fresh = self._fresh_if_live()
        rules = None
        for name in names:
            p = os.path.join(d, name)
            m = _SNAP_NAME.match(name)
            if fresh is not None and (name.startswith(".tmp-") or (m and name not in known and self._writers_snapshot(
                    int(name[:16], 16), p, fresh))):
                continue                # a save in progress, or registered or dropped since the copy
            if name.endswith(".broken"):
                self.warn(p, "snapshot quarantined because it failed its checks",
                          "keep it for analysis or remove it; the store does not read it")
            elif name.startswith(".tmp-"):
                self.warn(p, "partly written snapshot (its save never returned); the next read-write open deletes it")
            elif _SNAP_NAME.match(name) and name not in known:
                snap_id = int(name[:16], 16)
                if rules is None:
                    try:
                        with self.meta.read() as r:
                            nxt = r.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
                            creating = r.get(M.DB_STATE, M.K_SNAP_CREATING)
                            purged = set(M.decode_ids(r.get(M.DB_STATE, M.K_SNAP_PURGED), self.meta.path))
                        rules = (purged, None if creating is None else set(M.decode_ids(creating, self.meta.path)),
                                 int.from_bytes(nxt, "little") if nxt else 1)
                    except StorageError:
                        rules = False
                if not rules:
                    self.warn(p, "snapshot file not in the registry; the metadata that decides what becomes of it "
                                 "is damaged (see the errors above), so no open gets as far as it")
                    continue
                purged, intents, next_id = rules
                fate = snapinfo.orphan_fate(snap_id, purged=purged, intents=intents, next_id=next_id,
                                             in_log=lambda snap_id=snap_id: snap_id in in_log)
                if fate == snapinfo.REGISTER:
                    self.warn(p, "snapshot saved and tied to the log (its SNAPSHOT record) but not registered: its "
                                 "registration did not commit; the next read-write open registers it (or sets it "
                                 "aside as .broken if it fails its checks)")
                elif fate == snapinfo.DELETE:
                    why = ("the latest retention removed it from the registry" if snap_id in purged else
                           "its save never got past its commit point (no SNAPSHOT record in the log)")
                    self.warn(p, f"snapshot file not in the registry: {why}; the next read-write open deletes it")
                else:
                    try:
                        ours = SnapshotFile(self.st.vfs, p).header.store_id == self.st.store_id
                    except StorageError:
                        ours = False
                    if ours:
                        exc = snapinfo.unaccounted_snapshot(p, snap_id, next_id)
                        self.report.findings.append(Finding(
                            "error", p, None, f"{exc.detail}; a read-write open refuses this store", kind=METADATA,
                            hint=exc.hint))
                    else:
                        self.warn(p, "file named like a snapshot but not a snapshot of this store; opening leaves "
                                     "it in place and the store does not read it", "inspect it, then remove it")
            elif not _SNAP_NAME.match(name):
                self.warn(p, "unexpected file in the snapshot directory; the store neither reads nor removes it")

    def _writers_snapshot(self, snap_id: int, path: str, fresh) -> bool:
        """A snapshot file the running writer is saving, has registered or is dropping since the copy."""
        return (snap_id in fresh.ids(M.DB_SNAPSHOTS) or snap_id in fresh.state_ids(M.K_SNAP_CREATING)
                or snap_id in fresh.state_ids(M.K_SNAP_PURGED)
                or snap_id >= (self.meta.counter(M.K_NEXT_SNAPSHOT) or 1) or not os.path.lexists(path))

    def _other_mode(self) -> None:
        other = layout.pair_for(not self.encrypted)
        if layout.has_data(self.path, other):
            what = "legacy plaintext" if self.encrypted else "encrypted"
            self.warn(os.path.join(self.path, other.wal),
                      f"{what} data of an earlier mode is still present in {other.wal}/ and {other.snap}/",
                      "'walcrypt migrate DIR --to {} --remove-source' removes it".format(
                          "encrypted" if self.encrypted else "plaintext"))
        for name in (".migrate-wal", ".migrate-snap"):
            p = os.path.join(self.path, name)
            if os.path.isdir(p):
                if self._migration_recorded:
                    self.warn(p, "temporary directory of an interrupted migration",
                              "the next read-write open removes it; run 'walcrypt migrate' again")
                else:
                    self.warn(p, "temporary directory of an interrupted migration, but no migration is recorded: "
                                 "opening the store leaves it alone", "the next 'walcrypt migrate' replaces it; "
                                 "otherwise remove it")


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _index_at(src: Source | None, offset: int | None, seg: Segment | None) -> int | None:
    """The Raft index a finding concerns: the frame's own (clear, authenticated) index when the frame
    at ``offset`` holds entries, else the index after the last good one of the segment."""
    if src is not None and offset is not None and offset >= fmt.SEGMENT_HEADER_SIZE:
        head = src.read(offset, fmt.FRAME_HEADER_SIZE)
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(head) if len(head) == fmt.FRAME_HEADER_SIZE else None
        if h is not None and h[0] in (fmt.FRAME_ENTRIES, fmt.FRAME_SNAPSHOT):
            return h[6]
    if seg is not None:
        return seg.last_index + 1
    return None


def segment_summaries(store: Store) -> list[dict]:
    """One row per segment for inspection tools (no key material)."""
    rows = []
    for seg in store.wal.segments:
        rows.append({
            "id": seg.seg_id,
            "file": os.path.basename(seg.path),
            "first_index": seg.base_index,
            "last_index": seg.last_index,
            "key_id": seg.ident.key_id.hex(),
            "algorithm": seg.ident.algorithm,
            "sealed": seg.sealed,
            "size": _size(seg.path),
        })
    return rows
