"""Every on-disk structure, declared once.

The construct declarations below are the single source of truth and follow
``formats/FORMAT.md`` field for field.  Hot paths use the precompiled ``struct``
codecs at the bottom of this module; ``tests/test_format.py`` checks them byte
for byte against the construct declarations.  :func:`parse` is the one place
where a construct error becomes a walcrypt :class:`~walcrypt.errors.StorageError`.

All integers are little-endian.  Frames start at 8-byte aligned offsets.
"""

from __future__ import annotations

import struct

import construct as c

from .errors import CorruptionError, UnsupportedFormatError

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

FORMAT_VERSION = 1                  # segment, snapshot and export files
# The metadata (FORMAT.md 9): 2 adds the record catalog, creation intents and purge records
# (state/creating, snap_creating, purged, snap_purged, staging; a 56-byte compaction record);
# 3 puts a domain tag into every value MAC (so no record of a store's version 1 or 2 past
# verifies in it) and requires the catalog.  Versions 1 and 2 are read, and upgraded by their
# first read-write open; older releases refuse a newer store instead of misreading it.
META_FORMAT_VERSION = 3
META_FORMAT_VERSIONS_READ = (1, 2, 3)

SEGMENT_MAGIC = b"WCRYPSEG"
SNAPSHOT_MAGIC = b"WCRYPSNP"

SEGMENT_HEADER_SIZE = 128
FRAME_HEADER_SIZE = 88
TAG_SIZE = 16
ALIGN = 8

# Algorithm IDs (one byte).  0 is never valid on disk.
ALG_NONE = 1          # plaintext legacy mode: BLAKE2b-128 integrity tag, no secrecy
ALG_AES_256_GCM = 2
ALG_CHACHA20_POLY1305 = 3
ALG_AES_256_GCM_SIV = 4

# Frame types (one byte).  0 means "never written": preallocated zeros read as a clean end.
FRAME_UNWRITTEN = 0
FRAME_ENTRIES = 1     # a batch of consecutive Raft entries
FRAME_HARDSTATE = 2   # term, vote, commit
FRAME_COMMIT = 3      # closes one durable batch (one write + one fdatasync)
FRAME_INDEX = 4       # seals a segment: the table of its records
FRAME_SNAPSHOT = 5    # ties a published snapshot (ID, index, term, file digest) to the log
FRAME_TYPES = {
    FRAME_ENTRIES: "entries",
    FRAME_HARDSTATE: "hardstate",
    FRAME_COMMIT: "commit",
    FRAME_INDEX: "index",
    FRAME_SNAPSHOT: "snapshot",
}

# Frame flags
FLAG_NONE = 0

# Limits
MAX_ENTRY_SIZE_DEFAULT = 64 << 20        # one entry
MAX_RECORD_PAYLOAD = 1 << 30             # hard bound checked before any allocation
RECORD_TARGET_BYTES = 32 << 10           # a save() is split into records of about this size
RECORD_MAX_ENTRIES = 4096                # ... or this many entries
# The largest max_entry_size whose records always fit MAX_RECORD_PAYLOAD: a record holds less than
# RECORD_TARGET_BYTES before its last entry, a table of 8 + 12 bytes per entry, and the 16-byte tag.
MAX_ENTRY_SIZE_LIMIT = MAX_RECORD_PAYLOAD - RECORD_TARGET_BYTES - 8 - 12 * RECORD_MAX_ENTRIES - 16


def max_entry_size_bound() -> int:
    """The largest entry a record can hold alone within MAX_RECORD_PAYLOAD (read at call time): the
    8-byte prefix, one 12-byte table row and the tag.  The writer closes a record before it would
    exceed the bound, so any entry up to this size is written in a record every reader accepts."""
    return MAX_RECORD_PAYLOAD - ENTRIES_RECORD_OVERHEAD - ENTRIES_ROW_SIZE


ENTRIES_RECORD_OVERHEAD = 8 + 16         # ENTRIES payload prefix (count, reserved) + the AEAD tag
ENTRIES_ROW_SIZE = 12                    # per entry in the ENTRIES table: u64 term + u32 length

# Segment and snapshot IDs and file offsets read from the metadata: IDs are u64 on disk but a store
# never comes near 2^63 (one ID per segment cut or snapshot; a re-key reserves 2^16), and offsets are
# bounded by off_t.  Larger values are refused as damage before they reach a file call or a counter.
MAX_ID = (1 << 63) - 1
MAX_FILE_OFFSET = (1 << 63) - 1

MAX_STABLE_VALUE = 64 << 20              # one stable-store value (sealed in one AEAD call)
MAX_SNAPSHOT_CHUNK = 64 << 20            # plaintext bytes of one snapshot chunk (readers refuse more)

KEY_ID_SIZE = 16
STORE_ID_SIZE = 16
SALT_SIZE = 32
COMMITMENT_SIZE = 24
NONCE_SIZE = 12
CHAIN_SIZE = 16


def align_up(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


# ---------------------------------------------------------------------------
# Construct declarations (normative; FORMAT.md mirrors them)
# ---------------------------------------------------------------------------

SegmentHeader = c.Struct(
    "magic" / c.Const(SEGMENT_MAGIC),
    "version" / c.Int16ul,
    "header_size" / c.Int16ul,
    "algorithm" / c.Int8ul,
    "flags" / c.Int8ul,
    "reserved0" / c.Int16ul,
    "store_id" / c.Bytes(STORE_ID_SIZE),
    "segment_id" / c.Int64ul,
    "base_index" / c.Int64ul,
    "key_id" / c.Bytes(KEY_ID_SIZE),
    "salt" / c.Bytes(SALT_SIZE),
    "commitment" / c.Bytes(COMMITMENT_SIZE),
    "reserved1" / c.Int32ul,
    "crc" / c.Int32ul,          # CRC32C of bytes [0, 124)
)

FrameHeader = c.Struct(
    "type" / c.Int8ul,
    "algorithm" / c.Int8ul,
    "flags" / c.Int8ul,
    "reserved0" / c.Int8ul,
    "length" / c.Int32ul,       # payload bytes (ciphertext + tag), excluding padding
    "seq" / c.Int64ul,          # record sequence number in its segment, from 0
    "index" / c.Int64ul,        # Raft index (first entry; last index for commit/index frames)
    "term" / c.Int64ul,         # Raft term (first entry; hard state term)
    "count" / c.Int32ul,        # entries in the record / records in the batch or segment
    "crc" / c.Int32ul,          # CRC32C of header bytes [0,36) + [40,88) + payload
    "nonce" / c.Bytes(NONCE_SIZE),
    "reserved1" / c.Int32ul,
    "key_id" / c.Bytes(KEY_ID_SIZE),
    "prev_chain" / c.Bytes(CHAIN_SIZE),   # tag of the previous record in the segment
)

# Plaintext payloads (inside the AEAD).
HardStatePayload = c.Struct(
    "term" / c.Int64ul,
    "vote" / c.Int64ul,
    "commit" / c.Int64ul,
)

EntriesPayload = c.Struct(
    "count" / c.Int32ul,
    "reserved" / c.Int32ul,
    "terms" / c.Array(c.this.count, c.Int64ul),
    "lengths" / c.Array(c.this.count, c.Int32ul),
    "data" / c.GreedyBytes,
)

SnapshotRecordPayload = c.Struct(
    "snapshot_id" / c.Int64ul,
    "index" / c.Int64ul,
    "term" / c.Int64ul,
    "digest" / c.Bytes(16),     # first 16 bytes of SHA-256 over the snapshot file's header
)

SnapshotManifestRecord = c.Struct(
    "version" / c.Int8ul,
    "reserved" / c.Bytes(7),
    "index" / c.Int64ul,
    "term" / c.Int64ul,
    "key_id" / c.Bytes(KEY_ID_SIZE),
    "digest" / c.Bytes(16),
    "size" / c.Int64ul,         # data bytes
)

CommitPayload = c.Struct(
    "records" / c.Int32ul,      # records in the batch this frame closes (commit frame excluded)
    "reserved" / c.Int32ul,
)

IndexRecordEntry = c.Struct(
    "offset" / c.Int64ul,       # frame offset of an ENTRIES record
    "index" / c.Int64ul,        # its first Raft index
    "count" / c.Int32ul,        # its number of entries
    "reserved" / c.Int32ul,
)

TermRun = c.Struct(
    "index" / c.Int64ul,        # first Raft index of the run
    "term" / c.Int64ul,
)

IndexPayload = c.Struct(
    "record_count" / c.Int32ul,
    "run_count" / c.Int32ul,
    "end_offset" / c.Int64ul,        # offset where the INDEX frame starts (end of the data frames)
    "hardstate_offset" / c.Int64ul,  # frame offset of the last HARDSTATE record
    "records" / c.Array(c.this.record_count, IndexRecordEntry),
    "runs" / c.Array(c.this.run_count, TermRun),
)

# LMDB values (see FORMAT.md, "Metadata database").
SegmentManifestRecord = c.Struct(
    "version" / c.Int8ul,
    "state" / c.Int8ul,         # 1 open, 2 sealed
    "algorithm" / c.Int8ul,
    "reserved" / c.Int8ul,
    "dir_code" / c.Int32ul,     # 1 = wal-v1-encrypted, 2 = wal-v1
    "base_index" / c.Int64ul,
    "key_id" / c.Bytes(KEY_ID_SIZE),
    "index_offset" / c.Int64ul,  # sealed: offset of the INDEX frame
    "end_offset" / c.Int64ul,    # sealed: file size after sealing
    "last_index" / c.Int64ul,    # sealed: last Raft index written (base_index - 1 if none)
    "records" / c.Int64ul,       # sealed: records written (for key budgets)
    "bytes" / c.Int64ul,         # sealed: payload bytes written
)

KeyringRecord = c.Struct(
    "version" / c.Int8ul,
    "state" / c.Int8ul,
    "algorithm" / c.Int8ul,
    "purpose" / c.Int8ul,       # 1 = DEK, 2 = metadata MAC key
    "created_ns" / c.Int64ul,
    "state_changed_ns" / c.Int64ul,
    "wrapped_len" / c.Int32ul,
    "wrapped" / c.Bytes(c.this.wrapped_len),
)

# Segment manifest states
SEG_OPEN = 1
SEG_SEALED = 2

DIR_CODE_ENCRYPTED = 1
DIR_CODE_PLAIN = 2

# ---------------------------------------------------------------------------
# Hot-path struct codecs (checked against the declarations above by tests)
# ---------------------------------------------------------------------------

SEGMENT_HEADER_STRUCT = struct.Struct("<8sHHBBH16sQQ16s32s24sII")
FRAME_HEADER_STRUCT = struct.Struct("<BBBBIQQQII12sI16s16s")
HARDSTATE_STRUCT = struct.Struct("<QQQ")
COMMIT_STRUCT = struct.Struct("<II")
SNAPSHOT_RECORD_STRUCT = struct.Struct("<QQQ16s")
SNAPSHOT_MANIFEST_STRUCT = struct.Struct("<B7sQQ16s16sQ")
ENTRIES_PREFIX_STRUCT = struct.Struct("<II")
INDEX_PREFIX_STRUCT = struct.Struct("<IIQQ")
INDEX_RECORD_STRUCT = struct.Struct("<QQII")
TERM_RUN_STRUCT = struct.Struct("<QQ")
MANIFEST_STRUCT = struct.Struct("<BBBBIQ16sQQQQQ")
KEYRING_PREFIX_STRUCT = struct.Struct("<BBBBQQI")

assert SEGMENT_HEADER_STRUCT.size == SEGMENT_HEADER_SIZE
assert FRAME_HEADER_STRUCT.size == FRAME_HEADER_SIZE

FRAME_CRC_OFFSET = 36   # the crc field inside the frame header


def parse(declaration: c.Construct, data: bytes, *, path: str | None, offset: int | None, what: str):
    """Parse ``data`` with a construct declaration; any construct error becomes a CorruptionError."""
    try:
        return declaration.parse(data)
    except c.ConstructError as exc:
        raise CorruptionError(path, offset, f"malformed {what}: {exc.__class__.__name__}") from None


def check_algorithm(alg: int, *, path: str | None = None, offset: int | None = None) -> None:
    if alg not in (ALG_NONE, ALG_AES_256_GCM, ALG_CHACHA20_POLY1305, ALG_AES_256_GCM_SIV):
        raise UnsupportedFormatError(
            f"{path or '<data>'}"
            + (f" at offset {offset}" if offset is not None else "")
            + f": unknown algorithm ID {alg} (written by a newer walcrypt? upgrade walcrypt to read it)"
        )
