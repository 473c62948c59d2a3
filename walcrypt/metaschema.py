"""What ``meta/`` holds: its tables and keys, and the MACs that authenticate its records.

FORMAT.md 9 is the normative description; every name here is re-exported by walcrypt.meta and used
as ``M.<name>``."""

from __future__ import annotations

import hashlib
import hmac

from . import format as fmt

DB_STORE = b"store"
DB_KEYRING = b"keyring"
DB_SEGMENTS = b"segments"
DB_STABLE = b"stable"
DB_STATE = b"state"
DB_SNAPSHOTS = b"snapshots"

# keys of DB_STORE (not MAC'd: they are needed to derive the MAC key)
K_STORE_ID = b"store_id"
K_FORMAT_VERSION = b"format_version"
K_ENCRYPTED = b"encrypted"
K_ALGORITHM = b"algorithm"
K_KEK_PARAMS = b"kek_params"
K_KEK_CHECK = b"kek_check"
K_META_KEY = b"meta_key"          # wrapped metadata MAC key
K_META_KEY_ID = b"meta_key_id"

# keys of DB_STATE (MAC'd)
K_COMPACTED = b"compacted"        # u64 index, u64 term, u64 reset segment (0: none)
K_NEXT_SEGMENT = b"next_segment"  # u64
K_NEXT_SNAPSHOT = b"next_snapshot"  # u64
K_ROTATION = b"rotation"          # JSON
K_MIGRATION = b"migration"        # JSON, present only while a migration is in progress
K_PURGED = b"purged"              # u64 segment IDs of the latest purge (their files may outlive the commit)
K_STAGING = b"staging"            # u64 first, u64 end: segment IDs reserved for a staged rewrite (re-key)
K_CREATING = b"creating"          # u64 segment IDs being created (recorded before the file exists)
K_SNAP_CREATING = b"snap_creating"  # u64 snapshot IDs being written (recorded before the file exists)
K_SNAP_PURGED = b"snap_purged"    # u64 snapshot IDs the latest retention removed from the registry

MAC_SIZE = 16
CATALOG_DBS = (DB_KEYRING, DB_SEGMENTS, DB_SNAPSHOTS, DB_STATE, DB_STABLE)


# Metadata format version 3 puts a domain tag in front of every MAC'd message, so that no MAC a
# store computed under versions 1 or 2 verifies under version 3: an upgraded store re-MACs every
# record in the upgrading transaction, and a record replayed from its older past (the 24-byte
# compaction record without a catalog, above all) fails its MAC instead of turning checks off.
MAC_DOMAIN_V3 = b"walcrypt/v3/meta-mac"
FIRST_DOMAIN_TAGGED_VERSION = 3


def _framed(h, parts) -> None:
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)


def _domain(version: int) -> tuple[bytes, ...]:
    return (MAC_DOMAIN_V3,) if version >= FIRST_DOMAIN_TAGGED_VERSION else ()


def keyless_mac(db: bytes, key: bytes, value: bytes, *, version: int = fmt.META_FORMAT_VERSION) -> bytes:
    """The MAC of a plaintext store (an accident check: anyone can compute it)."""
    h = hashlib.blake2b(digest_size=MAC_SIZE)
    _framed(h, _domain(version) + (db, key, value))
    return h.digest()


def keyed_mac(mac_key: bytes, db: bytes, key: bytes, value: bytes, *,
              version: int = fmt.META_FORMAT_VERSION) -> bytes:
    """The MAC of an encrypted store: HMAC-SHA256 under the metadata key, cut to 16 bytes."""
    h = hmac.new(mac_key, digestmod=hashlib.sha256)
    _framed(h, _domain(version) + (db, key, value))
    return h.digest()[:MAC_SIZE]
