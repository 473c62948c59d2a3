"""The segment half of the verification walk (a mixin of walcrypt.check_walk.Walk): each segment
scanned from its header to its end, sealed ones compared with their INDEX frame, the segment
being appended to on a running store read up to its last COMMIT (twice, when in doubt)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import format as fmt
from . import layout, online
from . import meta as M
from .bounded import FileSource
from .errors import (
    WIPE_ADVICE,
    AuthenticationError,
    CorruptionError,
    KeyProviderError,
    StorageError,
    WalcryptError,
)
from .findings import KEY, SEGMENT, TORN, Finding, Removed, WalkHost, finding_from, index_at
from .segment import Segment
from .segment_codec import segment_file_name

if TYPE_CHECKING:
    pass


class SegmentChecks(WalkHost):
    """Checking segment files (see the module docstring)."""

    # Host contract: provided by Walk (check_walk.py), beyond findings.WalkHost.
    newest: int | None

    if TYPE_CHECKING:
        def note(self, path: str | None, detail: str, kind: str, offset: int | None = None) -> None: ...

    def segment_path(self, seg_id: int, rec: dict) -> str:
        d = layout.WAL_ENCRYPTED if rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED else layout.WAL_PLAIN
        return os.path.join(self.path, d, segment_file_name(seg_id, rec["base_index"]))

    def check_segment(self, seg_id: int, rec: dict) -> Segment | None:
        path = self.segment_path(seg_id, rec)
        size = self.fsize(path)
        try:
            return self._segment_checked(seg_id, rec, path)
        finally:
            self.advance(size)

    def _segment_checked(self, seg_id: int, rec: dict, path: str, *, again: bool = False) -> Segment | None:
        """Check one segment; None after a finding (or a note), raises Removed."""
        if (rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED) != self.encrypted:
            self.error(AuthenticationError(self.meta.path, None, f"the manifest places segment {seg_id} in "
                                           f"{os.path.basename(os.path.dirname(path))}/, which does not match "
                                           "the store's mode"), SEGMENT)
            return None
        if not self.vfs.pinned(path) and not os.path.lexists(path):
            if self.removed_meanwhile(M.DB_SEGMENTS, seg_id):
                self.note(path, f"segment {seg_id} was removed by the running writer (compaction) while this check "
                          "read the store; its manifest record is gone too: not checked", SEGMENT)
                raise Removed
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
                raise Removed
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
                counts[1] += r.offsets[-1] - r.offsets[0]

            committed_end, torn = seg.scan(src, on_entries=on_entries)
            if torn is not None and rec["state"] == fmt.SEG_SEALED:
                raise CorruptionError(path, torn[0], f"sealed segment is damaged: {torn[1]}",
                                      "a sealed segment is never repaired")
            return seg, committed_end, torn, counts
        except WalcryptError as exc:
            if isinstance(exc, KeyProviderError):
                raise
            f = finding_from(exc, KEY if not isinstance(exc, StorageError) else SEGMENT,
                         index_at(src, getattr(exc, "offset", None), seg))
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
