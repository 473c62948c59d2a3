"""The records of the snapshot store: what a registered snapshot is (its registry record and how it
is encoded, FORMAT.md 9.8), a snapshot as it is read, the checks of a snapshot's metadata, and the
rule for unregistered snapshot files (FORMAT.md 11.8).  Below :mod:`walcrypt.snapstore` and
:mod:`walcrypt.snaprecovery`, which both use them."""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from typing import BinaryIO

from . import format as fmt
from . import meta as M
from .errors import WIPE_ADVICE, CorruptionError, UsageError
from .snapshot import (
    MetaRuleError,
    SnapshotFile,
    check_meta,
    snapshot_file_name,
)
from .types import ConfState, SnapshotMeta
from .values import MAX_ENTRY_INDEX, U64_MAX, check_u64

log = logging.getLogger("walcrypt")

SNAP_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")


@dataclass
class SnapshotInfo:
    snapshot_id: int
    index: int
    term: int
    key_id: bytes
    digest: bytes
    size: int
    path: str


class Snapshot:
    """A readable snapshot: ``meta``, ``size``, ``open()`` (a stream) and ``data`` (all bytes)."""

    def __init__(self, info: SnapshotInfo, file: SnapshotFile):
        self.info = info
        self.file = file
        assert file.meta is not None        # made from an unlocked file: unlock() decoded its metadata
        self.meta: SnapshotMeta = file.meta

    @property
    def size(self) -> int:
        return self.info.size

    def open(self) -> BinaryIO:
        """A binary stream of the decrypted data, authenticated chunk by chunk."""
        return io.BufferedReader(self.file.stream(), buffer_size=self.file.header.chunk_size)

    @property
    def data(self) -> bytes:
        with self.open() as f:
            return f.read()

    def __repr__(self) -> str:
        return f"<Snapshot index={self.meta.index} term={self.meta.term} size={self.size}>"


def check_snapshot_meta(meta, extra_meta: dict | None = None) -> tuple[SnapshotMeta, dict | None]:
    """Validate a caller's SnapshotMeta (and extra metadata) before anything is written, with the
    rules the reader applies (snapshot.check_meta): -> (metadata, extra metadata) of plain values,
    as they will be sealed.  A UsageError names the offending field."""
    try:
        index, term, conf_state = meta
    except (TypeError, ValueError):
        raise UsageError("meta must be a SnapshotMeta(index, term, conf_state)") from None
    index = check_u64(index, "snapshot index", 1, MAX_ENTRY_INDEX)
    term = check_u64(term, "snapshot term", 1, U64_MAX)
    if isinstance(conf_state, (str, bytes, bytearray, dict)):
        raise UsageError("meta.conf_state must be a ConfState(voters, learners)")
    try:
        voters, learners = conf_state
    except (TypeError, ValueError):
        raise UsageError("meta.conf_state must be a ConfState(voters, learners)") from None
    ids = []
    for name, v in (("voters", voters), ("learners", learners)):
        if isinstance(v, (str, bytes, bytearray, dict)):
            raise UsageError(f"meta.conf_state.{name} must be a sequence of node IDs, not {type(v).__name__}")
        try:
            v = tuple(v)
        except TypeError:
            raise UsageError(f"meta.conf_state.{name} must be a sequence of node IDs, not "
                             f"{type(v).__name__}") from None
        for k, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, (int, str)):
                raise UsageError(f"meta.conf_state.{name}[{k}] is a {type(x).__name__}; node IDs are integers "
                                 "or strings")
        ids.append(tuple(int(x) if isinstance(x, int) else str(x) for x in v))
    meta = SnapshotMeta(index, term, ConfState(*ids))
    try:
        return check_meta(meta, extra_meta)
    except MetaRuleError as exc:
        raise UsageError(f"snapshot metadata refused: {exc} (the reader would refuse the snapshot)") from None


def data_blocks(data, size: int):
    """The blocks of a snapshot's data: bytes-like as one block, a binary file read ``size`` at a time."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield data
        return
    read = getattr(data, "read", None)
    if read is None:
        raise UsageError(f"snapshot data must be bytes-like or a binary file, not {type(data).__name__}")
    while True:
        block = read(size)
        if not block:
            return
        yield block


def forget_creation_intent(tx, snap_id: int) -> None:
    """In the registering transaction: the ID is no longer being written, and never given out again."""
    nxt = tx.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
    nxt = int.from_bytes(nxt, "little") if nxt else 1
    tx.put(M.DB_STATE, M.K_NEXT_SNAPSHOT, max(nxt, snap_id + 1).to_bytes(8, "little"))
    intents = M.decode_ids(tx.get(M.DB_STATE, M.K_SNAP_CREATING), tx.meta.path)
    tx.put(M.DB_STATE, M.K_SNAP_CREATING, M.encode_ids(i for i in intents if i != snap_id))


def encode_info(info: SnapshotInfo) -> bytes:
    return fmt.SNAPSHOT_MANIFEST_STRUCT.pack(1, bytes(7), info.index, info.term, info.key_id, info.digest, info.size)


def decode_info(snap_id: int, raw: bytes, directory: str, path: str) -> SnapshotInfo:
    if len(raw) != fmt.SNAPSHOT_MANIFEST_STRUCT.size:
        raise CorruptionError(path, None, f"snapshot registry record {snap_id} has a bad size")
    version, _r, index, term, key_id, digest, size = fmt.SNAPSHOT_MANIFEST_STRUCT.unpack(raw)
    if version != 1:
        raise CorruptionError(path, None, f"snapshot registry record {snap_id} has unknown version {version}")
    return SnapshotInfo(snap_id, index, term, key_id, digest, size,
                        os.path.join(directory, snapshot_file_name(snap_id, index, term)))


# What a read-write open does with a snapshot file the registry does not list (FORMAT.md 11.8).
DELETE = "delete"                   # a leftover: removed by the latest retention, or a save short of its commit point


REGISTER = "register"               # a save got past its commit point (SNAPSHOT record in the log): rolled forward


REFUSE_OR_KEEP = "refuse-or-keep"   # not named as a leftover: this store's refuses the open, another's is left alone


def orphan_fate(snap_id: int, *, purged: set[int], intents: set[int] | None, next_id: int, in_log) -> str:
    """The fate of the unregistered snapshot file ``snap_id``: DELETE, REGISTER or REFUSE_OR_KEEP.

    ``purged``: IDs the latest retention removed; ``intents``: IDs being written (None: a store written
    before creation intents, where IDs up to ``next_id`` are leftovers); ``in_log()``: whether the log
    holds a SNAPSHOT record for it.  Decides only; the caller acts (or reports)."""
    leftover = snap_id in purged or (snap_id in intents if intents is not None else snap_id <= next_id)
    if not leftover:
        return REFUSE_OR_KEEP
    if snap_id not in purged and in_log():
        return REGISTER
    return DELETE


def unaccounted_snapshot(path: str, snap_id: int, next_id: int) -> CorruptionError:
    """Why a read-write open refuses a snapshot file of this store that the registry lacks."""
    return CorruptionError(
        path, None, f"snapshot {snap_id} of this store is not in the registry (which gives out ID {next_id} "
        "next), and the metadata does not name it as a leftover: its registry record was deleted, or meta/ "
        "is older than the data - restored from an older copy or rolled back",
        "walcrypt deleted nothing. Put back the meta/ that belongs to this data directory; otherwise "
        "restore the node from a snapshot export or " + WIPE_ADVICE)
