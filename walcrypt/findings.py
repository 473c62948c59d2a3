"""What verify and repair report: a finding (severity, file, offset, index, detail, hint, kind,
repairable) and the report that collects them (walcrypt.check)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

from . import format as fmt
from .bounded import Source
from .errors import (
    WIPE_NOTE,
    CorruptionError,
)
from .segment import Segment

if TYPE_CHECKING:
    from . import online
    from .storage import Store

# Finding kinds.  Only TORN (and SNAPSHOT, when an older snapshot can take over) are repairable.
TORN = "torn-tail"
SEGMENT = "segment"
LOG = "log"
METADATA = "metadata"
SNAPSHOT = "snapshot"
KEY = "key"
LEFTOVER = "leftover"
ENGINE = "open"


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


def finding_from(exc: BaseException, kind: str, index: int | None = None) -> Finding:
    if isinstance(exc, CorruptionError):
        return Finding("error", exc.path, exc.offset, exc.detail, index, kind, exc.hint)
    return Finding("error", None, None, f"{type(exc).__name__}: {exc}", index, kind)


class Removed(Exception):
    """A file the metadata copy names was removed by the running writer (its record is gone too)."""


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def index_at(src: Source | None, offset: int | None, seg: Segment | None) -> int | None:
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


class WalkHost:
    """What verify's walk (check_walk.Walk) gives its halves, the segment checks (check_segments) and
    the snapshot and leftover checks (check_leftovers): declared here for the type checker, set and
    defined by Walk.  Nothing of it exists at runtime."""

    path: str
    encrypted: bool
    meta: online.FrozenMeta
    vfs: online.PinnedVFS
    st: Store
    report: CheckReport

    if TYPE_CHECKING:
        def error(self, exc: BaseException, kind: str, index: int | None = None) -> Finding: ...
        def advance(self, n: int) -> None: ...
        def fsize(self, path: str) -> int: ...
        def is_live(self) -> bool: ...
        def fresh(self) -> online.FrozenMeta | None: ...
        def removed_meanwhile(self, db: bytes, ident: int) -> bool: ...
