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

from . import layout, online, salvage
from . import meta as M
from .check_walk import Walk
from .errors import (
    KeyProviderError,
    LockedError,
    UsageError,
    WalcryptError,
    WrongKeyError,
)
from .findings import (
    ENGINE,
    RESTORE_ADVICE,
    SEGMENT,
    SNAPSHOT,
    TORN,
    CheckReport,
    Finding,
    Progress,
    file_size,
    finding_from,
)
from .opening import stored_mode
from .snapstore import Snapshots
from .storage import Store

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
    walk = Walk(path, kek, encrypted, report, progress, live=live)
    walk.run()
    _below_snapshot(path, kek, encrypted, report)
    if engine_exc is not None:
        epath = getattr(engine_exc, "path", None)
        explained = any(f.severity == "error" and (epath is None or f.path == epath) for f in report.findings) \
            or (epath is not None and epath in walk.unsettled)
        if not explained:
            report.findings.insert(0, finding_from(engine_exc, ENGINE))
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
    candidates = [f for f in report.errors if not f.repairable and f.kind in (SEGMENT, ENGINE)
                  and f.path and salvage.segment_id_of(f.path) is not None]
    if not candidates:
        return
    hold = layout.ReadOnlyHold(path)
    try:
        meta = M.Meta(os.path.join(path, layout.META_DIR), readonly=True)
        try:
            st = Store.keys_only(path, kek, encrypted, meta)
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
            "size": file_size(seg.path),
        })
    return rows
