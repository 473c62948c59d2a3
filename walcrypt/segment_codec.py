"""What a segment file is made of, without the file: its name, its header (FORMAT.md 3.3) and the
ENTRIES payload (4.4) - encoded, and decoded with bounds checks."""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import Sequence

from crc32c import crc32c

from . import format as fmt
from .errors import CorruptionError, UnsupportedFormatError
from .types import EntryBatch

SECTOR = 512
ZERO_RUN = 32
# Sealing a segment that an earlier process lifetime wrote (after recovery) must not reuse the
# nonce of a torn frame that lifetime may have written past the last commit: the INDEX frame's
# sequence number skips ahead by this much, far beyond any count of records one segment can hold.
RECOVERY_SEQ_JUMP = 1 << 32
COMMIT_LEN = fmt.COMMIT_STRUCT.size + fmt.TAG_SIZE




def segment_file_name(seg_id: int, base_index: int) -> str:
    return f"{seg_id:016x}-{base_index:016x}.wal"


@dataclass
class SegmentIdentity:
    """The fields of a segment header other than magic/version/size/crc."""

    store_id: bytes
    segment_id: int
    base_index: int
    algorithm: int
    key_id: bytes
    salt: bytes
    commitment: bytes


def encode_header(ident: SegmentIdentity) -> bytes:
    body = fmt.SEGMENT_HEADER_STRUCT.pack(
        fmt.SEGMENT_MAGIC, fmt.FORMAT_VERSION, fmt.SEGMENT_HEADER_SIZE, ident.algorithm, 0, 0,
        ident.store_id, ident.segment_id, ident.base_index, ident.key_id, ident.salt, ident.commitment, 0, 0)
    return body[:124] + crc32c(body[:124]).to_bytes(4, "little")


def decode_header(raw: bytes, path: str) -> SegmentIdentity:
    if len(raw) < fmt.SEGMENT_HEADER_SIZE:
        raise CorruptionError(path, 0, f"segment header is truncated ({len(raw)} bytes)",
                              "the file is not a complete walcrypt segment")
    (magic, version, hsize, alg, flags, _r0, store_id, seg_id, base, key_id, salt, commitment,
     _r1, crc) = fmt.SEGMENT_HEADER_STRUCT.unpack_from(raw)
    if magic != fmt.SEGMENT_MAGIC:
        raise CorruptionError(path, 0, "not a walcrypt segment (bad magic)")
    if crc32c(raw[:124]) != crc:
        raise CorruptionError(path, 0, "segment header fails its CRC32C")
    if version != fmt.FORMAT_VERSION or hsize != fmt.SEGMENT_HEADER_SIZE:
        raise UnsupportedFormatError(
            f"{path}: segment format version {version} (header {hsize} bytes) is not supported; upgrade walcrypt")
    if flags or _r0 or _r1:
        raise CorruptionError(path, 13, "segment header has reserved bits set")
    fmt.check_algorithm(alg, path=path, offset=12)
    return SegmentIdentity(store_id, seg_id, base, alg, key_id, salt, commitment)


_ONE_ENTRY_HEAD = struct.Struct("<IIQI")     # the whole table of a one-entry ENTRIES payload


def encode_entries(terms, lengths, datas) -> bytes:
    """The ENTRIES payload (FORMAT.md 4.4): count, reserved, terms, lengths, data."""
    n = len(terms)
    if n == 1:                                  # the common Raft case, one pack
        return _ONE_ENTRY_HEAD.pack(1, 0, terms[0], lengths[0]) + datas[0]
    return b"".join((fmt.ENTRIES_PREFIX_STRUCT.pack(n, 0), struct.pack(f"<{n}Q", *terms),
                     struct.pack(f"<{n}I", *lengths), *datas))


def join_entries_payloads(payloads, counts, total: int) -> bytes:
    """One ENTRIES payload holding, in order, the entries of the payloads ``payloads`` of ``counts``
    entries each (``total`` in all): the tables' terms, then their lengths, then the data."""
    prefix = fmt.ENTRIES_PREFIX_STRUCT.size
    terms_b, lengths_b, datas = [], [], []
    for payload, n in zip(payloads, counts):
        view = memoryview(payload)
        lengths_at = prefix + 8 * n
        data_at = lengths_at + 4 * n
        terms_b.append(view[prefix:lengths_at])
        lengths_b.append(view[lengths_at:data_at])
        datas.append(view[data_at:])
    return b"".join((fmt.ENTRIES_PREFIX_STRUCT.pack(total, 0), *terms_b, *lengths_b, *datas))


def encode_entries_payload(entries, start: int, stop: int) -> bytes:
    """The ENTRIES payload of ``entries[start:stop]`` (Entry-like (index, term, data) tuples)."""
    chunk = entries[start:stop]
    return encode_entries([e[1] for e in chunk], [len(e[2]) for e in chunk], [e[2] for e in chunk])


# The decrypted payload of one ENTRIES record; entry data is sliced out only when asked for.
EntriesRecord = EntryBatch


def _entries_table(payload: bytes, count: int, path: str, offset: int) -> tuple[int, array]:
    """(end of the table, entry lengths) of an ENTRIES payload of ``count`` entries, the lengths
    checked against the payload size before anything is sliced."""
    n = len(payload)
    if n < 8:
        raise CorruptionError(path, offset, "entries record payload is truncated")
    pcount, _ = fmt.ENTRIES_PREFIX_STRUCT.unpack_from(payload)
    table_end = 8 + 12 * pcount
    if pcount != count or pcount == 0 or table_end > n:
        raise CorruptionError(path, offset, f"entries record table is inconsistent (count {pcount})")
    lengths = array("I")
    lengths.frombytes(payload[8 + 8 * pcount:table_end])
    return table_end, lengths


def decode_entries_payload(payload: bytes, first_index: int, count: int, *, path: str,
                           offset: int) -> EntryBatch:
    """Check and index an ENTRIES payload.  Lengths are checked before anything is sliced."""
    table_end, lengths = _entries_table(payload, count, path, offset)
    ends = list(accumulate(lengths, initial=table_end))      # a list: its ints are made once, not per use
    if ends[-1] != len(payload):
        raise CorruptionError(path, offset, "entries record lengths do not add up to its payload")
    terms = array("Q")
    terms.frombytes(payload[8:8 + 8 * count])
    return EntryBatch(first_index, terms, ends, payload)


def entries_payload_terms(payload: bytes, count: int, *, path: str, offset: int) -> Sequence[int]:
    """The terms of an ENTRIES payload, after the checks of :func:`decode_entries_payload`, without
    indexing the data (what a scan needs)."""
    if count == 1 and len(payload) >= _ONE_ENTRY_HEAD.size:      # the common Raft case, one unpack
        pcount, _, term, length = _ONE_ENTRY_HEAD.unpack_from(payload)
        if pcount == 1:
            if _ONE_ENTRY_HEAD.size + length != len(payload):
                raise CorruptionError(path, offset, "entries record lengths do not add up to its payload")
            return (term,)
    table_end, lengths = _entries_table(payload, count, path, offset)
    if table_end + sum(lengths) != len(payload):
        raise CorruptionError(path, offset, "entries record lengths do not add up to its payload")
    terms = array("Q")
    terms.frombytes(payload[8:8 + 8 * count])
    return terms
