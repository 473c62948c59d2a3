"""Opening a segment file, a mixin of walcrypt.segment.Segment: the header checked against the
manifest's identity and commitment, a sealed segment's INDEX frame loaded, and the scan that
authenticates every frame in order and applies the torn-tail rule (FORMAT.md 11.3-11.4)."""

from __future__ import annotations

import sys
from array import array
from typing import TYPE_CHECKING

from crc32c import crc32c
from cryptography.exceptions import InvalidTag

from . import bounded, crypto
from . import format as fmt
from .errors import WIPE_ADVICE, AuthenticationError, CorruptionError
from .segment_codec import (
    COMMIT_LEN,
    RECOVERY_SEQ_JUMP,
    SECTOR,
    ZERO_RUN,
    SegmentIdentity,
    decode_entries_payload,
    entries_payload_terms,
)
from .types import HardState

if TYPE_CHECKING:
    from .vfs import VFS

_LOW32 = 0xFFFFFFFF


def _changed(path: str, offset: int) -> CorruptionError:
    return CorruptionError(path, offset, "the file became shorter while it was being read",
                           "another process is modifying the store; stop it and try again")


# A frame whose zero end is shorter than this is checked against its CRC (see _end_never_written).
_CRC_CHECKED_TAIL = 3


def _end_never_written(src: bounded.Source, lo: int, hi: int, window: int) -> bool:
    """Whether the end of the frame [lo, hi) never reached the disk (FORMAT.md 11.4 rule 3): its last
    byte and the ZERO_RUN - 1 bytes after it are zero (fewer where the file ends), as they are when a
    write stopped inside the frame, or when the frame's last sector was lost and that part of it is
    shorter than ZERO_RUN (a longer part is a zero run at a sector boundary, see _looks_incomplete).
    When fewer than _CRC_CHECKED_TAIL of the frame's last bytes are zero, the bytes before them must
    be as written: one value of those bytes makes the frame's CRC match.  A zero last byte alone is
    no evidence: a tag byte is zero in one frame of 256, and damage anywhere in an acknowledged last
    unit (its COMMIT frame is followed by preallocated zeros) must not pass for a torn write."""
    if hi <= lo or not bounded.all_zero(src, hi - 1, hi - 1 + ZERO_RUN, window):
        return False
    tail = src.read(hi - _CRC_CHECKED_TAIL, _CRC_CHECKED_TAIL)
    zeros = len(tail) - len(tail.rstrip(b"\x00"))
    if zeros >= _CRC_CHECKED_TAIL:
        return True
    header = src.read(lo, fmt.FRAME_HEADER_SIZE)
    known = bounded.crc_range(src, lo + fmt.FRAME_CRC_OFFSET + 4, hi - zeros,
                              crc32c(header[:fmt.FRAME_CRC_OFFSET]), window)
    if known is None:
        return True                  # the file shrank while it was read: nothing is there
    stored = int.from_bytes(header[fmt.FRAME_CRC_OFFSET:fmt.FRAME_CRC_OFFSET + 4], "little")
    return any(crc32c(v.to_bytes(zeros, "little"), known) == stored for v in range(256 ** zeros))


def _looks_incomplete(src: bounded.Source, lo: int, hi: int, unit_start: int,
                      window: int = bounded.WINDOW) -> bool:
    """A frame at ``lo`` with extent [lo, hi), in the write unit that starts at ``unit_start``, looks
    like an incomplete write: it runs past the end of the file, its end never reached the disk
    (_end_never_written), its first sector never did, or it holds an all-zero run of ZERO_RUN bytes
    starting at ``lo`` or at a sector boundary (a sector that never reached the disk).  Reads
    [lo, hi) a window at a time."""
    if hi > src.size:
        return True
    if _end_never_written(src, lo, hi, window):
        return True
    first_boundary = (lo // SECTOR + 1) * SECTOR
    # A lost first sector is zero from its start, except for bytes of earlier, durable units: the
    # unit's own earlier frames in it (written by the same write) would be zero too, and fail first.
    # A few zero bytes at the head of a later frame of the unit are damage, not a lost sector.
    if bounded.all_zero(src, max(unit_start, lo // SECTOR * SECTOR), min(hi, first_boundary), window):
        return True
    need = min(ZERO_RUN, hi - lo)
    a = lo
    while a < hi:
        w_end = min(hi, a + window)
        block = src.read(a, min(hi, w_end + ZERO_RUN) - a)
        starts = ([a] if a == lo else []) + list(range(max(first_boundary, -(-a // SECTOR) * SECTOR), w_end, SECTOR))
        for s in starts:
            e = min(hi, s + ZERO_RUN)
            if e - s >= need and block.count(0, s - a, e - a) == e - s:
                return True
        a = w_end
    return False


class SegmentScan:
    """Opening and scanning a segment file (see the module docstring)."""

    # Host contract: provided by Segment (segment.py).
    vfs: VFS
    path: str
    ident: SegmentIdentity
    cipher: crypto.FrameCipher
    rec_offset: array[int]
    rec_index: array[int]
    rec_count: array[int]
    runs: list[tuple[int, int]]
    snapshot_records: list[tuple]
    last_index: int
    hardstate: HardState | None
    hardstate_offset: int
    sealed: bool
    index_offset: int
    end_offset: int
    write_offset: int
    seq: int
    chain: bytes
    units_scanned: int
    tail_may_be_mid_write: bool

    if TYPE_CHECKING:
        def ensure_open(self) -> int: ...
        def read_frame(self, offset: int, expect_type: int, size_hint: int = 0): ...
        def _check_frame_fields(self, h, offset: int, *, expect_type: int | None = None, seq: int | None = None,
                                chain: bytes | None = None) -> None: ...
        def _index_entries(self, offset: int, index: int, count: int, terms) -> None: ...

    # ------------------------------------------------------------------ open
    def check_identity(self, found: SegmentIdentity, expected_commitment: bytes) -> None:
        exp = self.ident
        if found.store_id != exp.store_id:
            raise AuthenticationError(self.path, 0, "segment belongs to another store",
                                      "a segment file was copied in from elsewhere; remove it")
        if found.segment_id != exp.segment_id or found.base_index != exp.base_index:
            raise AuthenticationError(self.path, 0,
                                      f"segment header says segment {found.segment_id} at index {found.base_index}, "
                                      f"the manifest says {exp.segment_id} at {exp.base_index} (renamed or replaced)")
        if found.key_id != exp.key_id or found.algorithm != exp.algorithm:
            raise AuthenticationError(self.path, 0, "segment header key ID or algorithm differs from the manifest")
        if not crypto.constant_time_equal(found.commitment, expected_commitment):
            raise AuthenticationError(self.path, 0,
                                      "segment key commitment does not match its data key (tampered header or "
                                      "a segment from another store)")

    def load_sealed(self, index_offset: int, end_offset: int) -> None:
        """Build the index from the INDEX frame of a sealed segment (no scan)."""
        fd = self.ensure_open()
        size = self.vfs.fstat_size(fd)
        if size != end_offset:
            raise CorruptionError(self.path, min(size, end_offset),
                                  f"sealed segment is {size} bytes, the manifest says {end_offset} "
                                  "(truncated or extended)")
        h, payload = self.read_frame(index_offset, fmt.FRAME_INDEX)
        if len(payload) < fmt.INDEX_PREFIX_STRUCT.size:
            raise CorruptionError(self.path, index_offset, "index frame payload is truncated")
        nrec, nruns, end, hs_off = fmt.INDEX_PREFIX_STRUCT.unpack_from(payload)
        pos = fmt.INDEX_PREFIX_STRUCT.size
        if end != index_offset or pos + nrec * fmt.INDEX_RECORD_STRUCT.size + nruns * 16 != len(payload):
            raise CorruptionError(self.path, index_offset, "index frame table is inconsistent")
        # The record table as columns, in C: (offset u64, index u64, count u32, reserved u32) per record
        # is three u64 per record, the count in the low half of the third.
        table = pos + nrec * fmt.INDEX_RECORD_STRUCT.size
        cols = array("Q")
        cols.frombytes(payload[pos:table])
        if sys.byteorder != "little":
            cols.byteswap()
        self.rec_offset.extend(cols[0::3])
        self.rec_index.extend(cols[1::3])
        self.rec_count.extend(map(_LOW32.__and__, cols[2::3]))
        self.runs.extend(fmt.TERM_RUN_STRUCT.iter_unpack(payload[table:table + nruns * fmt.TERM_RUN_STRUCT.size]))
        if nrec:
            self.last_index = self.rec_index[-1] + self.rec_count[-1] - 1
        if self.last_index != h[6]:
            raise CorruptionError(self.path, index_offset, "index frame's last index disagrees with its table")
        self.hardstate_offset = hs_off
        if hs_off:
            _h, hs_payload = self.read_frame(hs_off, fmt.FRAME_HARDSTATE)
            self.hardstate = HardState(*fmt.HARDSTATE_STRUCT.unpack(hs_payload))
        self.sealed = True
        self.end_offset = end_offset
        self.index_offset = index_offset

    def scan(self, data, *, on_entries=None, window: int = bounded.WINDOW):
        """Scan every frame of a segment, building the index.

        ``data`` is the whole file (bytes) or a :class:`walcrypt.bounded.Source` over it; a source
        is read in windows of ``window`` bytes, so memory stays bounded whatever the file size
        (FORMAT.md 11.3): a window, plus one frame when a frame is larger, plus the plaintexts of
        the write unit being scanned.  A frame larger than the window is read whole only once its
        CRC, computed window by window, matches.

        Returns (committed_end, torn) where torn is None for a clean end or a
        (offset, detail) pair for a torn tail after committed_end.  Raises for
        corruption.  ``on_entries(record)`` sees every committed
        entries record (used by verify and replay).
        """
        src = data if isinstance(data, bounded.Source) else bounded.BytesSource(data)
        window = max(window, fmt.FRAME_HEADER_SIZE)
        path = self.path
        size = src.size
        off = fmt.SEGMENT_HEADER_SIZE
        seq = 0
        chain = crypto.ZERO_CHAIN
        pending: list[tuple] = []
        committed_end = off
        hsize = fmt.FRAME_HEADER_SIZE
        crc_at = fmt.FRAME_CRC_OFFSET
        unpack = fmt.FRAME_HEADER_STRUCT.unpack_from
        frame_types = fmt.FRAME_TYPES
        tag_size, max_length = fmt.TAG_SIZE, fmt.MAX_RECORD_PAYLOAD
        commit_type, commit_struct = fmt.FRAME_COMMIT, fmt.COMMIT_STRUCT
        alg, key_id = self.ident.algorithm, self.ident.key_id
        decrypt, ad_prefix = self.cipher.decrypt, self.cipher.ad_prefix
        apply = self._apply_scanned
        view: bytes | memoryview
        buf = view = b""            # bytes [base, base + len(buf)) of the file
        base = 0
        while True:
            if off + hsize > size:
                return self._classify(src, committed_end, off, size, "frame header cut off by the end of the file",
                                      seq, chain, window)
            rel = off - base
            if rel < 0 or rel + hsize > len(buf):
                buf, base, rel = src.read(off, window), off, 0
                view = memoryview(buf)
                if len(buf) < hsize:
                    raise _changed(path, off)
            h = unpack(buf, rel)
            ftype, length = h[0], h[4]
            end = off + hsize + length
            if not (ftype in frame_types and tag_size <= length <= max_length and end <= size):
                if ftype == fmt.FRAME_UNWRITTEN:
                    return self._classify(src, committed_end, off, off + hsize, "unwritten space", seq, chain, window)
                if ftype in frame_types and length >= tag_size and end > size:
                    # A length pointing past the end of the file is a torn write (etcd #14114), whatever its size.
                    return self._classify(src, committed_end, off, end, "frame runs past the end of the file", seq,
                                          chain, window)
                return self._classify(src, committed_end, off, off + hsize, "malformed frame header", seq, chain,
                                      window)
            if rel + hsize + length > len(buf):
                if hsize + length > window:
                    # Bounded before it is allocated: the CRC decides whether this frame is read whole.
                    head = buf[rel:rel + hsize]
                    crc = crc32c(head[crc_at + 4:], crc32c(head[:crc_at]))
                    if bounded.crc_range(src, off + hsize, end, crc, window) != h[9]:
                        return self._classify(src, committed_end, off, end, "frame fails its CRC32C", seq, chain,
                                              window)
                buf, base, rel = src.read(off, max(hsize + length, window)), off, 0
                view = memoryview(buf)
                if len(buf) < hsize + length:
                    raise _changed(path, off)
            # The header without its CRC field: what the CRC (then the ciphertext) and the associated data cover.
            fields = buf[rel:rel + crc_at] + buf[rel + crc_at + 4:rel + hsize]
            ct_end = rel + hsize + length
            ct = view[rel + hsize:ct_end]
            if crc32c(ct, crc32c(fields)) != h[9]:
                return self._classify(src, committed_end, off, end, "frame fails its CRC32C", seq, chain, window)
            # From here on the frame is intact: any failure is tampering or foreign data.
            if ftype == fmt.FRAME_INDEX and seq < h[5] < seq + RECOVERY_SEQ_JUMP + 1:
                seq = h[5]      # an index written by recovery skips ahead (see Segment.seal)
            # The nonce is 4 zero bytes and the sequence number (big-endian): as a number, it is seq.
            if (h[5] != seq or h[13] != chain or h[12] != key_id or h[1] != alg or h[2] or h[3] or h[11]
                    or int.from_bytes(h[10], "big") != seq):
                self._check_frame_fields(h, off, seq=seq, chain=chain)    # raises, naming what is wrong
            try:
                plain = decrypt(h[10], ct, ad_prefix + fields)
            except InvalidTag:
                raise crypto.authentication_failure(path, off) from None
            chain = buf[ct_end - tag_size:ct_end]
            seq += 1
            next_off = (end + fmt.ALIGN - 1) & -fmt.ALIGN
            if ftype == commit_type:
                if len(plain) != commit_struct.size or commit_struct.unpack(plain)[0] != len(pending):
                    raise AuthenticationError(path, off, "commit frame does not close the records before it")
                for p in pending:
                    apply(p, on_entries)
                pending = []
                committed_end = next_off
                self.units_scanned += 1
                self.write_offset = next_off
                self.seq = seq
                self.chain = chain
            elif ftype == fmt.FRAME_INDEX:
                if pending:
                    raise AuthenticationError(path, off, "index frame follows uncommitted records")
                self.index_offset = off
                self.end_offset = next_off
                self.sealed = True
                if not bounded.all_zero(src, next_off, size, window):
                    raise CorruptionError(path, next_off, "bytes follow the index frame of a sealed segment")
                return committed_end, None
            else:
                pending.append((ftype, off, h, plain))
            off = next_off

    def _apply_scanned(self, p, on_entries) -> None:
        ftype, off, h, plain = p
        if ftype == fmt.FRAME_ENTRIES:
            if on_entries is None:          # the index needs the terms only: the data is not indexed
                terms = entries_payload_terms(plain, h[8], path=self.path, offset=off)
                rec = None
            else:
                rec = decode_entries_payload(plain, h[6], h[8], path=self.path, offset=off)
                terms = rec.terms
            if h[6] != self.last_index + 1:
                raise AuthenticationError(self.path, off,
                                          f"entries record starts at index {h[6]}, expected {self.last_index + 1}")
            self._index_entries(off, h[6], h[8], terms)
            if rec is not None:
                on_entries(rec)
        elif ftype == fmt.FRAME_HARDSTATE:
            if len(plain) != fmt.HARDSTATE_STRUCT.size:
                raise CorruptionError(self.path, off, "hard state record has a bad size")
            self.hardstate = HardState(*fmt.HARDSTATE_STRUCT.unpack(plain))
            self.hardstate_offset = off
        elif ftype == fmt.FRAME_SNAPSHOT:
            if len(plain) != fmt.SNAPSHOT_RECORD_STRUCT.size:
                raise CorruptionError(self.path, off, "snapshot record has a bad size")
            self.snapshot_records.append(fmt.SNAPSHOT_RECORD_STRUCT.unpack(plain))
        else:
            raise AuthenticationError(self.path, off, f"unexpected frame type {ftype} inside a batch")

    def _classify(self, src: bounded.Source, committed_end: int, bad: int, extent_end: int, detail: str,
                  seq: int, chain: bytes, window: int = bounded.WINDOW):
        """Decide torn tail vs corruption for the first failing frame at ``bad`` (see module doc and
        FORMAT.md 11.4).  Reads the file in windows: nothing here holds more than a window."""
        size = src.size
        # Rule 0: one past the last nonzero byte of the file is at most committed_end.
        if bounded.all_zero(src, committed_end, size, window):
            return committed_end, None                # clean end: nothing but preallocated zeros
        # Rule 1: a CRC-valid COMMIT frame after ``bad`` that closes a write unit starting after the
        # sequence number ``bad`` should have had proves that ``bad`` lay in an earlier, durable unit.
        pattern = bytes([fmt.FRAME_COMMIT, self.ident.algorithm, 0, 0]) + COMMIT_LEN.to_bytes(4, "little")
        hsize = fmt.FRAME_HEADER_SIZE
        for pos in bounded.find_aligned(src, pattern, bad + 1, size, fmt.ALIGN, window):
            if pos + hsize + COMMIT_LEN > size:
                break                                  # later matches end even further out
            frame = src.read(pos, hsize + COMMIT_LEN)
            if len(frame) < hsize + COMMIT_LEN:
                break
            header = frame[:hsize]
            h = fmt.FRAME_HEADER_STRUCT.unpack_from(header)
            if crypto.frame_crc(header, frame[hsize:]) == h[9] and h[5] - h[8] > seq:
                raise CorruptionError(self.path, bad, f"{detail}, but a later write unit was committed after it",
                                      "mid-log corruption is not repaired automatically; restore the node "
                                      "from a snapshot or " + WIPE_ADVICE)
        if not self.tail_may_be_mid_write and self._is_our_frame(src, bad, seq, chain) \
                and not _looks_incomplete(src, bad, extent_end, committed_end, window):
            raise CorruptionError(self.path, bad, f"{detail} in the last batch, and the damage does not look like "
                                  "an incomplete write", "run 'walcrypt verify'; restore from a snapshot if needed")
        return committed_end, (bad, detail)

    def _is_our_frame(self, src: bounded.Source, off: int, seq: int, chain: bytes) -> bool:
        """Whether the bytes at ``off`` are the head of the frame this segment wrote next: at least one
        of its nonce, key ID and chain value fields holds exactly the expected bytes.  One damaged
        field cannot hide the other two; zeros, garbage and stale blocks match none."""
        h = src.read(off, fmt.FRAME_HEADER_SIZE)
        if len(h) < fmt.FRAME_HEADER_SIZE:
            return False
        return (h[40:52] == crypto.nonce_for(seq) or h[56:72] == self.ident.key_id
                or h[72:88] == chain)
