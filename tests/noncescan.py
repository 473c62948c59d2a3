"""A (key, nonce) reuse scanner for walcrypt data: segments and snapshots, without the KEK.

Every AEAD call of the format uses a key derived from a DEK and fields in the clear header of
the file it sits in (FORMAT.md sections 3.3, 7.2, 10.3, 10.4):

* a segment's frames use HKDF(DEK[key_id], salt, "walcrypt/v1/segment" || store_id ||
  segment_id || algorithm): the effective key is named by (algorithm, store_id, segment_id,
  key_id, salt) of the segment header; the nonce is the frame's ``nonce`` field (00000000 ||
  BE64(seq));
* a snapshot's META frame and chunks use HKDF(DEK[key_id], salt, "walcrypt/v1/snapshot" ||
  store_id || snapshot_id || index || term || algorithm): the effective key is named by those
  header fields; the META frame has nonce(0), chunk i has nonce(i).

The scanner reads every file given (directories are walked), recognises segments and snapshots
by their magic whatever their name (``.broken``, ``.unlisted`` and ``.tmp-`` files, staging
directories and copies taken elsewhere count as well), and records for each (effective key,
nonce) the SHA-256 of every sealed payload (ciphertext || tag) found under it.  Two *different*
sealed payloads under one (key, nonce) are a reuse; the same bytes twice (a copy of a file, a
frame rewritten identically) are not.  Plaintext data (algorithm NONE) has no key and is skipped.

Damaged, torn or partial files are tolerated: a segment header that fails its CRC makes the file
unusable (its key fields cannot be trusted) and is reported as skipped; inside a segment, a
frame that is cut off or fails its CRC is skipped and the scan resynchronises on the next
8-aligned offset that holds a CRC-valid frame; a snapshot is read up to its first malformed or
cut-off chunk.  Nothing here needs or uses a key.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import defaultdict
from dataclasses import dataclass, field

from crc32c import crc32c

from walcrypt import format as fmt
from walcrypt.snapshot import SNAPSHOT_HEADER_STRUCT

_CHUNK_HEAD = struct.Struct("<II")
_MAX_SNAPSHOT_CHUNK = (64 << 20) + fmt.TAG_SIZE
_NONE = fmt.ALG_NONE


@dataclass(frozen=True)
class Use:
    path: str
    offset: int
    what: str            # "frame type N seq S" or "snapshot chunk N"


@dataclass
class ScanResult:
    files: int = 0                     # segment and snapshot files read
    sealed: int = 0                    # sealed payloads recorded
    skipped: list = field(default_factory=list)      # (path, reason): files or regions not usable
    uses: dict = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))

    def reuses(self) -> list[tuple[tuple, bytes, list[list[Use]]]]:
        """[(effective key, nonce, [uses of each distinct sealed payload])] with 2+ distinct payloads."""
        out = []
        for (key, nonce), by_digest in self.uses.items():
            if len(by_digest) > 1:
                out.append((key, nonce, list(by_digest.values())))
        return out

    def describe(self, limit: int = 5) -> str:
        lines = []
        for key, nonce, groups in self.reuses()[:limit]:
            where = "; ".join(f"{u[0].path}@{u[0].offset} ({u[0].what})" for u in groups)
            lines.append(f"{key[0]} key {_key_name(key)} nonce {nonce.hex()} sealed {len(groups)} different "
                         f"payloads: {where}")
        return "\n".join(lines)


def _key_name(key: tuple) -> str:
    return "/".join(str(x) if isinstance(x, int) else x.hex()[:12] for x in key[1:])


def scan(*roots: str) -> ScanResult:
    """Scan every file under the given files and directories."""
    res = ScanResult()
    for root in roots:
        if os.path.isdir(root):
            for dirpath, _dirs, files in os.walk(root):
                for name in sorted(files):
                    scan_file(os.path.join(dirpath, name), res)
        elif os.path.exists(root):
            scan_file(root, res)
    return res


def scan_file(path: str, res: ScanResult) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
            if magic not in (fmt.SEGMENT_MAGIC, fmt.SNAPSHOT_MAGIC):
                return
            data = magic + f.read()
    except OSError as exc:
        res.skipped.append((path, f"unreadable: {exc}"))
        return
    res.files += 1
    if magic == fmt.SEGMENT_MAGIC:
        _scan_segment(path, data, res)
    else:
        _scan_snapshot(path, data, res)


def _record(res: ScanResult, key: tuple, nonce: bytes, sealed: bytes, use: Use) -> None:
    res.uses[(key, bytes(nonce))][hashlib.sha256(sealed).digest()].append(use)
    res.sealed += 1


# ------------------------------------------------------------------------------------------
# Segments (FORMAT.md sections 3 and 4)
# ------------------------------------------------------------------------------------------

def _scan_segment(path: str, data: bytes, res: ScanResult) -> None:
    if len(data) < fmt.SEGMENT_HEADER_SIZE:
        res.skipped.append((path, "segment header cut off"))
        return
    (_magic, _version, _hsize, alg, _flags, _r0, store_id, seg_id, _base, key_id, salt, _commitment,
     _r1, crc) = fmt.SEGMENT_HEADER_STRUCT.unpack_from(data)
    if crc32c(data[:124]) != crc:
        res.skipped.append((path, "segment header fails its CRC (key fields untrusted)"))
        return
    if alg == _NONE:
        return
    key = ("segment", alg, store_id, seg_id, key_id, salt)
    hsize = fmt.FRAME_HEADER_SIZE
    off = fmt.SEGMENT_HEADER_SIZE
    size = len(data)
    while off + hsize <= size:                       # bounded: off grows by >= 8 per step
        frame = _frame_at(data, off, alg, key_id)
        if frame is None:
            if not any(data[off:off + hsize]) and not any(data[off:]):
                return                               # preallocated zeros up to the end
            res.skipped.append((path, f"no valid frame at offset {off}"))
            off = _resync(data, off + fmt.ALIGN, alg, key_id)
            if off is None:
                return
            continue
        ftype, seq, nonce, sealed, end = frame
        _record(res, key, nonce, sealed, Use(path, off, f"frame type {ftype} seq {seq}"))
        off = fmt.align_up(end)


def _frame_at(data: bytes, off: int, alg: int, key_id: bytes):
    """(type, seq, nonce, sealed payload, end) of a CRC-valid frame of this segment at ``off``, else None."""
    hsize = fmt.FRAME_HEADER_SIZE
    if off + hsize > len(data):
        return None
    h = fmt.FRAME_HEADER_STRUCT.unpack_from(data, off)
    ftype, falg, length, seq, fcrc, nonce = h[0], h[1], h[4], h[5], h[9], h[10]
    if ftype not in fmt.FRAME_TYPES or falg != alg or not fmt.TAG_SIZE <= length <= fmt.MAX_RECORD_PAYLOAD:
        return None
    end = off + hsize + length
    if end > len(data):
        return None
    header = data[off:off + hsize]
    sealed = data[off + hsize:end]
    co = fmt.FRAME_CRC_OFFSET
    if crc32c(sealed, crc32c(header[co + 4:], crc32c(header[:co]))) != fcrc:
        return None
    return ftype, seq, nonce, sealed, end


def _resync(data: bytes, start: int, alg: int, key_id: bytes) -> int | None:
    """The next 8-aligned offset from ``start`` holding a CRC-valid frame of this segment."""
    off = fmt.align_up(start)
    last = len(data) - fmt.FRAME_HEADER_SIZE
    while off <= last:
        if data[off] in fmt.FRAME_TYPES and data[off + 1] == alg and _frame_at(data, off, alg, key_id) is not None:
            return off
        off += fmt.ALIGN
    return None


# ------------------------------------------------------------------------------------------
# Snapshots (FORMAT.md section 10)
# ------------------------------------------------------------------------------------------

def _scan_snapshot(path: str, data: bytes, res: ScanResult) -> None:
    if len(data) < 128:
        res.skipped.append((path, "snapshot header cut off"))
        return
    (_magic, _version, _hsize, alg, _flags, _r0, snap_id, index, term, _chunk_size, bundle_len, store_id,
     key_id, salt, _commitment, _r1, crc) = SNAPSHOT_HEADER_STRUCT.unpack_from(data)
    if crc32c(data[:124]) != crc:
        res.skipped.append((path, "snapshot header fails its CRC (key fields untrusted)"))
        return
    if alg == _NONE:
        return
    key = ("snapshot", alg, store_id, snap_id, index, term, key_id, salt)
    off = 128 + bundle_len
    counter = 0                                      # the META frame is nonce(0), chunk i is nonce(i)
    while off + 8 <= len(data):                      # bounded: off grows by >= 8 + 16 per step
        length, flags = _CHUNK_HEAD.unpack_from(data, off)
        if not fmt.TAG_SIZE <= length <= _MAX_SNAPSHOT_CHUNK or off + 8 + length > len(data):
            res.skipped.append((path, f"snapshot frame {counter} at offset {off} is malformed or cut off"))
            return
        sealed = data[off + 8:off + 8 + length]
        nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "big")
        _record(res, key, nonce, sealed, Use(path, off, "snapshot meta" if counter == 0 else f"snapshot chunk {counter}"))
        off += 8 + length
        counter += 1
        if counter > 1 and flags & 1:
            return
