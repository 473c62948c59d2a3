"""The binary records of the metadata tables (FORMAT.md 9.4-9.6): segment manifest records, keyring
records, the compaction record, ID lists and counters - encoded, and decoded with bounds checks
(a record that does not decode is a CorruptionError naming the metadata file)."""

from __future__ import annotations

import logging

from . import format as fmt
from .errors import (
    CorruptionError,
)
from .keys import KeyEntry

log = logging.getLogger("walcrypt")

CATALOG_SIZE = 32                   # the catalog digest a compaction record may carry (FORMAT.md 9.1)




def encode_manifest(rec: dict) -> bytes:
    return fmt.MANIFEST_STRUCT.pack(1, rec["state"], rec["algorithm"], 0, rec["dir_code"], rec["base_index"],
                                    rec["key_id"], rec.get("index_offset", 0), rec.get("end_offset", 0),
                                    rec.get("last_index", 0), rec.get("records", 0), rec.get("bytes", 0))


def decode_manifest(b: bytes, path: str) -> dict:
    if len(b) != fmt.MANIFEST_STRUCT.size:
        raise CorruptionError(path, None,
                              f"segment manifest record has {len(b)} bytes, expected {fmt.MANIFEST_STRUCT.size}")
    (version, state, algorithm, _r, dir_code, base_index, key_id, index_offset, end_offset,
     last_index, records, nbytes) = fmt.MANIFEST_STRUCT.unpack(b)
    if version != 1 or state not in (fmt.SEG_OPEN, fmt.SEG_SEALED):
        raise CorruptionError(path, None, f"segment manifest record version {version} state {state} is unknown")
    if dir_code not in (fmt.DIR_CODE_ENCRYPTED, fmt.DIR_CODE_PLAIN):
        raise CorruptionError(path, None, f"segment manifest record names unknown directory code {dir_code}")
    if state == fmt.SEG_SEALED and not (fmt.SEGMENT_HEADER_SIZE <= index_offset < end_offset <= fmt.MAX_FILE_OFFSET):
        raise CorruptionError(path, None, f"segment manifest record has offsets out of bounds (index frame at "
                                          f"{index_offset}, end {end_offset})")
    return {"state": state, "algorithm": algorithm, "dir_code": dir_code, "base_index": base_index,
            "key_id": key_id, "index_offset": index_offset, "end_offset": end_offset,
            "last_index": last_index, "records": records, "bytes": nbytes}


def encode_keyring(entry) -> bytes:
    return fmt.KEYRING_PREFIX_STRUCT.pack(1, entry.state, entry.algorithm, entry.purpose, entry.created_ns,
                                          entry.state_changed_ns, len(entry.wrapped)) + entry.wrapped


def decode_keyring(key_id: bytes, b: bytes, path: str):
    n = fmt.KEYRING_PREFIX_STRUCT.size
    if len(b) < n:
        raise CorruptionError(path, None, f"keyring record {key_id.hex()} is truncated")
    version, state, algorithm, purpose, created, changed, wlen = fmt.KEYRING_PREFIX_STRUCT.unpack_from(b)
    if version != 1 or len(b) != n + wlen:
        raise CorruptionError(path, None, f"keyring record {key_id.hex()} is malformed")
    return KeyEntry(key_id, state, algorithm, purpose, created, changed, b[n:])


def encode_compacted(index: int, term: int, reset_segment: int = 0) -> bytes:
    """The compaction point; ``reset_segment`` > 0 records a log reset by a snapshot (see Wal.load)."""
    return b"".join(x.to_bytes(8, "little") for x in (index, term, reset_segment))


def decode_compacted(raw: bytes | None, path: str) -> tuple[int, int, int]:
    """(index, term, reset segment); the catalog digest that may follow is Meta.verify_catalog's."""
    if raw is None or len(raw) not in (24, 24 + CATALOG_SIZE):
        raise CorruptionError(path, None, "the compaction point record is missing or damaged")
    return tuple(int.from_bytes(raw[k:k + 8], "little") for k in (0, 8, 16))  # type: ignore[return-value]


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def encode_ids(ids) -> bytes:
    return b"".join(int(i).to_bytes(8, "little") for i in ids)


def decode_ids(raw: bytes | None, path: str) -> list[int]:
    if raw is None:
        return []
    if len(raw) % 8:
        raise CorruptionError(path, None, "a segment ID list in the metadata has a bad size")
    return [int.from_bytes(raw[k:k + 8], "little") for k in range(0, len(raw), 8)]


def decode_counter(raw: bytes | None, path: str, what: str, *, default: int | None = None) -> int:
    """A u64 ID counter of DB_STATE (next segment, next snapshot): 1 .. format.MAX_ID, so that the IDs
    it hands out (and the blocks a re-key reserves) never overflow their u64 fields."""
    if raw is None and default is not None:
        return default
    if raw is None or len(raw) != 8:
        raise CorruptionError(path, None, f"the {what} counter is missing or damaged")
    n = int.from_bytes(raw, "little")
    if not 1 <= n <= fmt.MAX_ID:
        raise CorruptionError(path, None, f"the {what} counter is {n}, out of bounds (1 .. {fmt.MAX_ID})")
    return n
