"""The whole-file segment scan walcrypt used before scans were bounded, kept as a test oracle.

``LegacySegment.scan`` reads ``data`` (the whole file, in memory) exactly as the engine did when
FORMAT.md 11.3-11.4 were last changed.  The fuzz harness (fuzzlib.segment) checks that the engine's
windowed scan reaches the same outcome -- the same committed end and torn tail, or the same error at
the same offset, and the same index -- for every input and for several window sizes, so bounding
the memory of the scan cannot have changed the torn-tail rule.  ``legacy_scan_frame_headers`` is
the keyless header walk of ``walcrypt inspect`` as it was, for the same comparison.
"""

from __future__ import annotations

from crc32c import crc32c

from walcrypt import crypto
from walcrypt import format as fmt
from walcrypt.errors import AuthenticationError, CorruptionError
from walcrypt.segment import Segment
from walcrypt.segment_codec import COMMIT_LEN
from walcrypt.segment_codec import RECOVERY_SEQ_JUMP, SECTOR, ZERO_RUN


class LegacySegment(Segment):
    def scan(self, data: bytes, *, on_entries=None):
        """Scan every frame of ``data`` (the whole file), building the index.

        Returns (committed_end, torn) where torn is None for a clean end or a
        (offset, detail) pair for a torn tail after committed_end.  Raises for
        corruption.  ``on_entries(record)`` sees every committed
        entries record (used by verify and replay).
        """
        path = self.path
        size = len(data)
        off = fmt.SEGMENT_HEADER_SIZE
        seq = 0
        chain = crypto.ZERO_CHAIN
        pending = []
        committed_end = off
        hsize = fmt.FRAME_HEADER_SIZE
        unpack = fmt.FRAME_HEADER_STRUCT.unpack_from
        while True:
            if off + hsize > size:
                return self._classify(data, committed_end, off, size, "frame header cut off by the end of the file",
                                      seq, chain)
            h = unpack(data, off)
            ftype, length = h[0], h[4]
            if ftype == fmt.FRAME_UNWRITTEN:
                return self._classify(data, committed_end, off, off + hsize, "unwritten space", seq, chain)
            end = off + hsize + length
            if ftype in fmt.FRAME_TYPES and length >= fmt.TAG_SIZE and end > size:
                # A length pointing past the end of the file is a torn write (etcd #14114), whatever its size.
                return self._classify(data, committed_end, off, end, "frame runs past the end of the file", seq, chain)
            if ftype not in fmt.FRAME_TYPES or length < fmt.TAG_SIZE or length > fmt.MAX_RECORD_PAYLOAD:
                return self._classify(data, committed_end, off, off + hsize, "malformed frame header", seq, chain)
            header = data[off:off + hsize]
            ct = data[off + hsize:end]
            if crypto.frame_crc(header, ct) != h[9]:
                return self._classify(data, committed_end, off, end, "frame fails its CRC32C", seq, chain)
            # From here on the frame is intact: any failure is tampering or foreign data.
            if ftype == fmt.FRAME_INDEX and seq < h[5] < seq + RECOVERY_SEQ_JUMP + 1:
                seq = h[5]      # an index written by recovery skips ahead (see Segment.seal)
            self._check_frame_fields(h, off, seq=seq, chain=chain)
            plain = self.cipher.open(header, ct, path=path, offset=off)
            chain = ct[-fmt.TAG_SIZE:]
            seq += 1
            next_off = fmt.align_up(end)
            if ftype == fmt.FRAME_COMMIT:
                if len(plain) != fmt.COMMIT_STRUCT.size or fmt.COMMIT_STRUCT.unpack(plain)[0] != len(pending):
                    raise AuthenticationError(path, off, "commit frame does not close the records before it")
                for p in pending:
                    self._apply_scanned(p, on_entries)
                pending = []
                committed_end = next_off
                self.write_offset = next_off
                self.seq = seq
                self.chain = chain
            elif ftype == fmt.FRAME_INDEX:
                if pending:
                    raise AuthenticationError(path, off, "index frame follows uncommitted records")
                self.index_offset = off
                self.end_offset = next_off
                self.sealed = True
                if len(data.rstrip(b"\x00")) > next_off:
                    raise CorruptionError(path, next_off, "bytes follow the index frame of a sealed segment")
                return committed_end, None
            else:
                pending.append((ftype, off, h, plain))
            off = next_off

    def _classify(self, data: bytes, committed_end: int, bad: int, extent_end: int, detail: str,
                  seq: int, chain: bytes):
        """Decide torn tail vs corruption for the first failing frame at ``bad`` (see module doc)."""
        size = len(data)
        written_end = len(data.rstrip(b"\x00"))      # one past the last nonzero byte of the file
        if written_end <= committed_end:
            return committed_end, None                # clean end: nothing but preallocated zeros
        # Rule 1: a CRC-valid COMMIT frame after ``bad`` that closes a write unit starting after the
        # sequence number ``bad`` should have had proves that ``bad`` lay in an earlier, durable unit.
        pattern = bytes([fmt.FRAME_COMMIT, self.ident.algorithm, 0, 0]) + COMMIT_LEN.to_bytes(4, "little")
        pos = data.find(pattern, bad + 1)
        while pos != -1:
            commit_end = pos + fmt.FRAME_HEADER_SIZE + COMMIT_LEN
            if pos % fmt.ALIGN == 0 and commit_end <= size:
                header = data[pos:pos + fmt.FRAME_HEADER_SIZE]
                h = fmt.FRAME_HEADER_STRUCT.unpack_from(header)
                if (crypto.frame_crc(header, data[pos + fmt.FRAME_HEADER_SIZE:commit_end]) == h[9]
                        and h[5] - h[8] > seq):
                    raise CorruptionError(self.path, bad, f"{detail}, but a later write unit was committed after it",
                                          "mid-log corruption is not repaired automatically; restore the node "
                                          "from a snapshot or wipe it and let Raft re-replicate")
            pos = data.find(pattern, pos + 1)
        if self._is_our_frame(data, bad, seq, chain) and not _legacy_looks_incomplete(data, bad, extent_end,
                                                                                         committed_end):
            raise CorruptionError(self.path, bad, f"{detail} in the last batch, and the damage does not look like "
                                  "an incomplete write", "run 'walcrypt verify'; restore from a snapshot if needed")
        return committed_end, (bad, detail)


    def _is_our_frame(self, data: bytes, off: int, seq: int, chain: bytes) -> bool:
        """Whether the bytes at ``off`` are the head of the frame this segment wrote next: at least one
        of its nonce, key ID and chain value fields holds exactly the expected bytes.  One damaged
        field cannot hide the other two; zeros, garbage and stale blocks match none."""
        h = data[off:off + fmt.FRAME_HEADER_SIZE]
        if len(h) < fmt.FRAME_HEADER_SIZE:
            return False
        return (h[40:52] == crypto.nonce_for(seq) or h[56:72] == self.ident.key_id
                or h[72:88] == chain)


def end_never_written(data: bytes, lo: int, hi: int) -> bool:
    """FORMAT.md 11.4 rule 3, second case, over the whole file: the frame's last byte and the ZERO_RUN - 1
    bytes after it are zero, and when fewer than 3 of its last bytes are zero, one value of them
    gives the CRC the frame's header holds."""
    if any(data[hi - 1:hi - 1 + ZERO_RUN]):
        return False
    zeros = 3 - len(data[hi - 3:hi].rstrip(b"\x00"))
    if zeros >= 3:
        return True
    known = crc32c(data[lo + 40:hi - zeros], crc32c(data[lo:lo + 36]))
    stored = int.from_bytes(data[lo + 36:lo + 40], "little")
    return any(crc32c(v.to_bytes(zeros, "little"), known) == stored for v in range(256 ** zeros))


def _legacy_looks_incomplete(data: bytes, lo: int, hi: int, unit_start: int) -> bool:
    """A frame at ``lo`` with extent [lo, hi) looks like an incomplete write: it runs past the end of
    the file, its end never reached the disk (end_never_written), its first sector is zero from the
    sector's start or the unit's, whichever is later, up to the frame's end or the next sector
    boundary, or it holds an all-zero run of ZERO_RUN bytes starting at ``lo`` or at a sector
    boundary (a sector that never reached the disk)."""
    if hi > len(data):
        return True
    if hi > lo and end_never_written(data, lo, hi):
        return True          # its end never reached the disk
    first_boundary = (lo // SECTOR + 1) * SECTOR
    if not any(data[max(unit_start, lo // SECTOR * SECTOR):min(hi, first_boundary)]):
        return True          # the part of the frame in its first sector never reached the disk
    for s in [lo] + list(range(first_boundary, hi, SECTOR)):
        e = min(hi, s + ZERO_RUN)
        if e - s >= min(ZERO_RUN, hi - lo) and not any(data[s:e]):
            return True
    return False


def legacy_scan_frame_headers(data: bytes) -> dict:
    """Walk the clear frame headers of a segment (CRC-checked, not authenticated).

    -> {"last_index", "committed_end", "sealed", "tail"} where tail says what follows the
    last COMMIT frame ("clean", or a description of uncommitted bytes)."""
    off = fmt.SEGMENT_HEADER_SIZE
    base = int.from_bytes(data[40:48], "little") if len(data) >= 48 else 0
    last = base - 1
    pending_last = None
    committed_end = off
    sealed = False
    tail = "clean"
    while off + fmt.FRAME_HEADER_SIZE <= len(data):
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(data, off)
        ftype, length = h[0], h[4]
        if ftype == fmt.FRAME_UNWRITTEN:
            break
        end = off + fmt.FRAME_HEADER_SIZE + length
        if ftype not in fmt.FRAME_TYPES or length < fmt.TAG_SIZE or end > len(data) or \
                crypto.frame_crc(data[off:off + fmt.FRAME_HEADER_SIZE], data[off + fmt.FRAME_HEADER_SIZE:end]) != h[9]:
            tail = f"unreadable or uncommitted bytes from offset {off}"
            break
        if ftype == fmt.FRAME_ENTRIES:
            pending_last = h[6] + h[8] - 1
        elif ftype == fmt.FRAME_COMMIT:
            if pending_last is not None:
                last = pending_last
            pending_last = None
            committed_end = fmt.align_up(end)
        elif ftype == fmt.FRAME_INDEX:
            sealed = True
            break
        off = fmt.align_up(end)
    else:
        if off < len(data) and any(data[off:]):
            tail = f"unreadable or uncommitted bytes from offset {off}"
    if tail == "clean" and pending_last is not None:
        tail = f"uncommitted records after offset {committed_end}"
    return {"last_index": last, "committed_end": committed_end, "sealed": sealed, "tail": tail}
