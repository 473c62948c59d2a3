"""The options of ``walcrypt.open`` and the Store's other arguments, checked in the caller's thread
before anything is touched: each bad value is a UsageError naming the option (FORMAT.md 13 gives
the bounds the readers accept)."""

from __future__ import annotations

from . import crypto
from . import format as fmt
from . import keys as K
from .errors import UsageError
from .values import U64_MAX, as_bytes, check_u64
from .wal import SYNC_POLICIES

MAX_STABLE_KEY = 400               # LMDB's key limit, with room for the table's own prefix
MAX_SEGMENT_SIZE = 1 << 40          # segment_size: frames and offsets stay far inside their u64 fields


def stable_key(key) -> bytes:
    key = as_bytes(key, "a stable-store key")
    if not 1 <= len(key) <= MAX_STABLE_KEY:
        raise UsageError(f"a stable-store key is 1 to {MAX_STABLE_KEY} bytes, not {len(key)}")
    return key


def check_bool(value, what: str) -> None:
    if type(value) is not bool:
        raise UsageError(f"{what} must be True or False, not {value!r}")


def check_options(*, kek, encrypted, sync, segment_size, algorithm, max_entry_size, read_only, keep_snapshots,
                   snapshot_chunk_size, snapshot_source, destroy_retired_keys, max_records_per_dek,
                   max_bytes_per_dek, max_dek_age_s) -> None:
    """Every option of open(), checked before anything is touched, against what the readers accept
    (FORMAT.md 13): a UsageError naming the option."""
    for name, value in (("encrypted", encrypted), ("read_only", read_only),
                        ("destroy_retired_keys", destroy_retired_keys)):
        check_bool(value, name)
    if kek is not None and not isinstance(kek, K.KeyEncryptionKey):
        raise UsageError(f"kek must be a key-encryption key (RawKey, KeyFile, Passphrase, EnvKey, Kms), not "
                         f"{type(kek).__name__}")
    if not isinstance(sync, str) or sync not in SYNC_POLICIES:
        raise UsageError(f"sync must be one of {', '.join(SYNC_POLICIES)}, not {sync!r}")
    if not isinstance(algorithm, str):
        raise UsageError(f"algorithm must be a cipher suite name, not {type(algorithm).__name__}")
    if encrypted:
        if crypto.suite_by_name(algorithm).alg_id == fmt.ALG_NONE:   # (UsageError for an unknown suite)
            raise UsageError(f"algorithm {algorithm!r} is the plaintext format: an encrypted store needs a cipher "
                             "suite (aes-256-gcm, chacha20-poly1305, aes-256-gcm-siv); for a plaintext store pass "
                             "encrypted=False")
    check_u64(segment_size, "segment_size", 4096, MAX_SEGMENT_SIZE)
    # The limit leaves room for the rest of the record the entry may share (FORMAT.md 13), and a record
    # is never built beyond the readers' bound (Wal._records): a larger entry could be acknowledged in a
    # record every reader refuses.
    check_u64(max_entry_size, "max_entry_size", 1, min(fmt.MAX_ENTRY_SIZE_LIMIT, fmt.max_entry_size_bound()))
    check_u64(keep_snapshots, "keep_snapshots", 1, U64_MAX)
    check_u64(snapshot_chunk_size, "snapshot_chunk_size", 1, fmt.MAX_SNAPSHOT_CHUNK)
    check_u64(max_records_per_dek, "max_records_per_dek", 1, U64_MAX)
    check_u64(max_bytes_per_dek, "max_bytes_per_dek", 1, U64_MAX)
    if max_dek_age_s is not None:
        if isinstance(max_dek_age_s, bool) or not isinstance(max_dek_age_s, (int, float)) \
                or not 0 < max_dek_age_s < float("inf"):
            raise UsageError(f"max_dek_age_s must be a positive number of seconds or None, not {max_dek_age_s!r}")
    if snapshot_source is not None and not callable(snapshot_source):
        raise UsageError(f"snapshot_source must be callable or None, not {type(snapshot_source).__name__}")
