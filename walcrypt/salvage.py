"""Damage a snapshot makes harmless: segments that lie wholly below the newest valid snapshot.

A segment the manifest lists that is missing, or fails its checks, is normally fatal: its entries
are part of the log and nothing else holds them.  Not so when every entry it could still contribute
to the log lies at or below the index of the newest snapshot that authenticates end to end (the
registry's record, then every chunk): the snapshot stands for every entry up to its index, so such
a segment holds nothing the node needs.  Rule (FORMAT.md 11.10):

* A segment contributes the entries of its range that lie below the base index of every newer
  segment (11.7), and nothing when it is older than a log reset.  Its *reach* is the last index
  it could contribute: one below the lowest base of the newer segments, or its sealed
  ``last_index`` if that is lower.  The manifest (MAC'd) says all of this without the file.
* A damaged segment is set aside when it is not the newest segment (the newest holds the hard
  state: losing it could roll back the node's vote) and it contributes nothing or its reach is
  at most the newest valid snapshot's index S.  Then the compaction point moves to S (when it is
  lower and the damage reaches above it): entries up to S are no longer served, the snapshot
  covers them.  Nothing above S is ever dropped.
* Anything else (the newest segment damaged, a reach above S, no valid snapshot, a newer snapshot
  that fails while the compaction point lies beyond S) is refused as before: the first damaged
  segment's error is raised, nothing modified.

A read-write open applies the rule (the file is renamed ``<name>.broken``, never deleted; one
metadata commit removes the manifest records and moves the compaction point) and reports it in
``Store.repairs`` with the index range no longer served; a read-only open raises the error with a
hint.  ``walcrypt repair`` applies it also to damage only ``walcrypt verify`` finds (frames the
open never reads), through ``Store(..., _drop_segments=...)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from . import format as fmt
from . import meta as M
from .errors import CorruptionError, KeyNotFoundError, StorageError, SymlinkError
from .snapinfo import decode_info

if TYPE_CHECKING:
    from .snapinfo import SnapshotInfo

log = logging.getLogger("walcrypt")


def reach(seg_id: int, rec: dict, manifest: dict[int, dict], reset_segment: int) -> tuple[int, int | None] | None:
    """The index range a segment can contribute to the log, from the manifest alone: None when it
    contributes nothing, (base, None) when nothing newer bounds it (the newest segment)."""
    if seg_id < reset_segment:
        return None                                  # older than a log reset: no part of the log
    newer = [r["base_index"] for i, r in manifest.items() if i > seg_id]
    top = min(newer) - 1 if newer else None
    if rec["state"] == fmt.SEG_SEALED:
        top = rec["last_index"] if top is None else min(top, rec["last_index"])
    if top is not None and top < rec["base_index"]:
        return None
    return rec["base_index"], top


def newest_valid_snapshot(snapshots, meta, *, newer_failed: list | None = None) -> SnapshotInfo | None:
    """The SnapshotInfo of the newest registered snapshot that authenticates end to end, or None.
    Modifies nothing (a failing newer snapshot is left for Snapshots.load to quarantine); the newer
    ones that failed are appended to ``newer_failed``."""
    with meta.read() as r:
        rows = r.items(M.DB_SNAPSHOTS)
    infos = sorted((decode_info(int.from_bytes(k, "big"), v, snapshots.dir, meta.path) for k, v in rows),
                   key=lambda i: i.snapshot_id)
    for info in reversed(infos):
        try:
            snapshots.open_verified(info)
            return info
        except SymlinkError:
            raise                       # a planted link is refused, never counted as a bad snapshot
        except (StorageError, KeyNotFoundError):
            if newer_failed is not None:
                newer_failed.append(info)
            continue
    return None


@dataclass
class Plan:
    """What setting damaged segments aside does: which segments, and the compaction point after it."""
    segments: list[tuple[int, dict]] = field(default_factory=list)      # (segment ID, manifest record)
    snapshot_index: int | None = None
    compact_to: tuple[int, int] | None = None        # (index, term): the new compaction point, if it moves
    dropped: tuple[int, int] | None = None           # entries no longer served: (old point + 1, new point)
    damaged: tuple[int, int] | None = None           # the index range the damaged segments could hold

    def describe(self) -> str:
        ids = ", ".join(str(i) for i, _ in self.segments)
        text = f"damaged segment(s) {ids} set aside"
        if self.damaged is not None:
            text += f" (they held entries within {self.damaged[0]}..{self.damaged[1]})"
        else:
            text += " (they held no entry of the log)"
        if self.dropped is not None:
            text += (f"; the log is compacted to index {self.dropped[1]}: entries {self.dropped[0]}..{self.dropped[1]} "
                     f"are no longer served, the snapshot at index {self.snapshot_index} covers them")
        elif self.snapshot_index is not None:
            text += f"; the snapshot at index {self.snapshot_index} covers them, nothing served was dropped"
        if self.snapshot_index is not None:
            text += "; nothing above the snapshot was dropped"
        return text

    def to_dict(self) -> dict:
        return {"segments": [i for i, _ in self.segments], "snapshot_index": self.snapshot_index,
                "compacted_to": self.compact_to[0] if self.compact_to else None,
                "dropped": list(self.dropped) if self.dropped else None,
                "damaged_range": list(self.damaged) if self.damaged else None}


def plan(manifest: dict[int, dict], damaged: set[int], c_index: int, c_term: int, reset_segment: int,
         snapshots, meta) -> Plan | None:
    """The plan that sets ``damaged`` aside under the rule above, or None when the rule refuses."""
    if not damaged or max(manifest) in damaged:
        return None
    ranges: list[tuple[int, int]] = []
    for seg_id in sorted(damaged):
        r = reach(seg_id, manifest[seg_id], manifest, reset_segment)
        if r is not None:
            if r[1] is None:
                return None
            ranges.append((r[0], r[1]))
    p = Plan(segments=[(i, manifest[i]) for i in sorted(damaged)])
    if not ranges:
        return p                                     # nothing of the log was in them
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    p.damaged = (lo, hi)
    failed: list = []
    snap = newest_valid_snapshot(snapshots, meta, newer_failed=failed)
    if snap is None or hi > snap.index:
        return None
    if failed and c_index > snap.index:
        return None          # the open falls back to this snapshot and needs the log from it on (11.8)
    p.snapshot_index = snap.index
    if hi > c_index and snap.index > c_index:
        p.compact_to = (snap.index, snap.term)
        p.dropped = (c_index + 1, snap.index)
    return p


def settle(store, manifest: list, damaged: Mapping[int, BaseException], c_index: int, c_term: int,
           reset_segment: int) -> tuple[int, int]:
    """At open: set aside the damaged segments (read-write) when the rule allows it, else raise the
    first damaged segment's error.  Returns the compaction point to load the log with."""
    first = damaged[min(damaged)]
    man = dict(manifest)
    p = plan(man, set(damaged), c_index, c_term, reset_segment, store.snapshots, store.meta)
    if p is None:
        raise first
    if store.read_only:
        if isinstance(first, CorruptionError):
            hint = (f"every entry it could hold is covered by the snapshot at index {p.snapshot_index}: a read-write "
                    "open or 'walcrypt repair' sets it aside and compacts the log up to the snapshot; nothing above "
                    "the snapshot is lost" if p.snapshot_index is not None else
                    "it holds no entry of the log: a read-write open or 'walcrypt repair' sets it aside")
            raise type(first)(first.path, first.offset, first.detail, hint) from first
        raise first
    apply(store, p, damaged)
    return p.compact_to if p.compact_to else (c_index, c_term)


def _aside_name(vfs, path: str) -> str:
    aside = path + ".broken"
    n = 1
    while vfs.exists(aside):                         # an earlier repair's copy is never replaced
        aside = f"{path}.broken.{n}"
        n += 1
    return aside


def apply(store, p: Plan, damaged: Mapping[int, BaseException]) -> None:
    """Rename the damaged files aside, then one metadata commit: their manifest records go, the
    compaction point moves.  A crash before the commit leaves a manifest naming missing files, which
    the next open settles the same way."""
    vfs = store.vfs
    moved: dict[int, str | None] = {}
    for seg_id, rec in p.segments:
        path = store.segment_path(seg_id, rec)
        moved[seg_id] = None
        if vfs.exists(path):
            moved[seg_id] = _aside_name(vfs, path)
            vfs.rename(path, moved[seg_id])
    if any(moved.values()):
        vfs.fsync_dir(store.wal_dir)
    with store.meta.write() as w:
        for seg_id, _rec in p.segments:
            w.delete(M.DB_SEGMENTS, M.u64(seg_id))
        if p.compact_to is not None:
            w.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(*p.compact_to, reset_segment=_reset(store, w)))
    detail = p.describe()
    log.warning("%s: %s", store.path, detail)
    for seg_id, rec in p.segments:
        exc = damaged.get(seg_id)
        store.repairs.append({
            "kind": "compacted", "path": store.segment_path(seg_id, rec), "segment": seg_id,
            "offset": getattr(exc, "offset", None),
            "damage": getattr(exc, "detail", None) or str(exc),
            "detail": detail, "broken_copy": moved[seg_id], "plan": p.to_dict()})


def _reset(store, w) -> int:
    """The log-reset segment recorded in the compaction point (kept when the point moves on)."""
    return M.decode_compacted(w.get(M.DB_STATE, M.K_COMPACTED), store.meta.path)[2]


def segment_id_of(path: str) -> int | None:
    name = os.path.basename(path)
    if len(name) == 37 and name.endswith(".wal"):
        try:
            return int(name[:16], 16)
        except ValueError:
            return None
    return None
