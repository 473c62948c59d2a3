"""Verification: read and authenticate every record of a store.

``check(path, kek=..., fix=False)`` returns findings instead of raising, the way
python-diskcache's ``check`` does; ``fix=True`` is the same walk, opening the
store read-write so that a torn tail is truncated (with a ``.broken`` copy).
Mid-log corruption is never "fixed": it is reported with what to do instead.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import format as fmt
from .errors import CorruptionError, StorageError, WalcryptError
from .storage import Store


@dataclass
class Finding:
    severity: str            # "error" | "repaired" | "warning"
    path: str | None
    offset: int | None
    detail: str
    index: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    segments: int = 0
    records: int = 0
    entries: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def _finding(exc: WalcryptError) -> Finding:
    if isinstance(exc, CorruptionError):
        return Finding("error", exc.path, exc.offset, str(exc))
    return Finding("error", None, None, f"{type(exc).__name__}: {exc}")


def check(path: str, *, kek=None, encrypted: bool = True, fix: bool = False,
          progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Walk every segment of the store at ``path``; authenticate every record and chain link."""
    report = CheckReport()
    try:
        store = Store(path, kek=kek, encrypted=encrypted, read_only=not fix)
    except StorageError as exc:
        report.findings.append(_finding(exc))
        return report
    try:
        for rep in store.repairs:
            report.findings.append(Finding("repaired", rep["path"], rep["offset"],
                                           f"torn tail truncated to {rep['truncated_to']} bytes "
                                           f"({rep['detail']}); copy kept in {rep['broken_copy']}"))
        segs = list(store.wal.segments)
        total = sum(os.path.getsize(s.path) for s in segs if os.path.exists(s.path))
        done = 0
        for seg in segs:
            report.segments += 1
            try:
                data = store.vfs.read_file(seg.path)
                fresh = type(seg)(store.vfs, seg.path, seg.ident, seg.cipher)

                def on_entries(rec):
                    report.entries += len(rec)
                    report.bytes += rec.ends[-1] - rec.ends[0]

                committed_end, torn = fresh.scan(data, on_entries=on_entries)
                report.records += fresh.seq
                if torn is not None:
                    report.findings.append(Finding("error", seg.path, torn[0], f"torn tail: {torn[1]}"))
                if seg.sealed and not fresh.sealed:
                    report.findings.append(Finding("error", seg.path, committed_end,
                                                   "the manifest says sealed but the segment has no index frame"))
                if seg.sealed and fresh.sealed and (fresh.rec_index != seg.rec_index
                                                    or fresh.rec_offset != seg.rec_offset):
                    report.findings.append(Finding("error", seg.path, getattr(seg, "index_offset", None),
                                                   "the index frame disagrees with the records it indexes"))
            except WalcryptError as exc:
                report.findings.append(_finding(exc))
            done += os.path.getsize(seg.path) if os.path.exists(seg.path) else 0
            if progress:
                progress(done, total)
    finally:
        store.close()
    return report


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
            "algorithm": fmt.ALG_NONE if seg.ident.algorithm == fmt.ALG_NONE else seg.ident.algorithm,
            "sealed": seg.sealed,
            "size": os.path.getsize(seg.path) if os.path.exists(seg.path) else None,
        })
    return rows
