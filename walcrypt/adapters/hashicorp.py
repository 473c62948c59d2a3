"""hashicorp/raft-shaped stores over one walcrypt store: LogStore, StableStore, SnapshotStore.

For hosts written like hashicorp/raft (Go names in snake_case)::

    store = walcrypt.open(path, kek=kek)
    logs, stable, snaps = LogStore(store), StableStore(store), SnapshotStore(store)

* ``LogStore``: ``first_index()`` / ``last_index()`` (0 when empty), ``get_log(i)``
  (:class:`LogNotFoundError` when absent), ``store_log``, ``store_logs`` (atomic and
  durable), ``delete_range(min, max)`` inclusive: a prefix is compacted, a suffix is
  durably truncated; removing from the middle is refused.
* ``StableStore``: ``set/get/set_uint64/get_uint64``; a missing key raises
  :class:`NotFoundError` whose text is ``"not found"`` (hashicorp's convention).
* ``SnapshotStore``: ``create(...)`` returns a sink with ``write/close/cancel/id``;
  ``list()`` newest first; ``open(id)`` -> (meta, binary reader).

A log entry is stored as the walcrypt entry data ``type (1) | appended_at ns (8) |
extensions length (4) | extensions | data``.
"""

from __future__ import annotations

import base64
import struct
from typing import NamedTuple, Sequence

from ..errors import CorruptionError, UsageError, WalcryptError
from ..storage import Store
from ..types import Entry, SnapshotMeta
from ..values import U64_MAX, as_bytes, check_u64

_LOG_HEAD = struct.Struct("<BQI")


class LogNotFoundError(WalcryptError, LookupError):
    """hashicorp's ErrLogNotFound."""

    def __init__(self, index: int):
        super().__init__("log not found")
        self.index = index


class NotFoundError(WalcryptError, LookupError):
    """A missing stable-store key; its text is "not found" as hashicorp hosts expect."""

    def __init__(self, key: bytes):
        super().__init__("not found")
        self.key = key


class Log(NamedTuple):
    index: int  # type: ignore[assignment]  # hashicorp's field name; mypy reports it as shadowing tuple.index
    term: int
    type: int = 0
    data: bytes = b""
    extensions: bytes = b""
    appended_at: int = 0


def encode_log(log: Log) -> Entry:
    ext = bytes(log.extensions)
    return Entry(log.index, log.term,
                 _LOG_HEAD.pack(log.type, log.appended_at, len(ext)) + ext + bytes(log.data))


def decode_log(e: Entry) -> Log:
    t, at, n = _LOG_HEAD.unpack_from(e.data)
    off = _LOG_HEAD.size
    return Log(e.index, e.term, t, e.data[off + n:], e.data[off:off + n], at)


class LogStore:
    def __init__(self, store: Store):
        self.store = store

    def first_index(self) -> int:
        s = self.store
        return s.first_index() if s.last_index() >= s.first_index() else 0

    def last_index(self) -> int:
        s = self.store
        return s.last_index() if s.last_index() >= s.first_index() else 0

    def get_log(self, index: int) -> Log:
        s = self.store
        if not s.first_index() <= index <= s.last_index():
            raise LogNotFoundError(index)
        return decode_log(s.entries(index, index + 1)[0])

    def store_log(self, log: Log) -> None:
        self.store_logs([log])

    def store_logs(self, logs: Sequence[Log]) -> None:
        """Atomic and durable; logs at or below last_index() replace the suffix (Raft semantics).

        After the whole log was deleted, the first logs stored may start anywhere (after a
        snapshot restore hashicorp/raft continues past the snapshot's index)."""
        if not logs:
            return
        s = self.store
        if s.last_index() < s.first_index() and logs[0].index > s.last_index() + 1:
            s.reset_log(logs[0].index - 1, 0)
        s.save(entries=[encode_log(x) for x in logs])

    def delete_range(self, lo: int, hi: int) -> None:
        """Delete logs lo..hi inclusive: a prefix (compaction) or a suffix (conflict truncation)."""
        s = self.store
        first, last = s.first_index(), s.last_index()
        if hi < lo or last < first:
            return
        if lo <= first:
            if hi >= last:
                s.truncate(first)      # everything: durable, and store_logs may start anywhere after
            else:
                s.compact(hi)
        elif hi >= last:
            s.truncate(lo)
        else:
            raise UsageError(f"delete_range({lo}, {hi}) would remove logs from the middle of {first}..{last}")


class StableStore:
    _PREFIX = b"hc/"

    def __init__(self, store: Store):
        self.store = store

    def set(self, key: bytes, value: bytes) -> None:
        self.store.stable_set(self._PREFIX + as_bytes(key, "key"), value)

    def get(self, key: bytes) -> bytes:
        v = self.store.stable_get(self._PREFIX + as_bytes(key, "key"))
        if v is None:
            raise NotFoundError(key)
        return v

    def set_uint64(self, key: bytes, value: int) -> None:
        value = check_u64(value, "value", 0, U64_MAX)
        self.set(key, struct.pack("<Q", value))

    def get_uint64(self, key: bytes) -> int:
        v = self.get(key)
        if len(v) != 8:
            raise UsageError(f"stable key {key!r} does not hold a uint64")
        return struct.unpack("<Q", v)[0]


class SnapshotInfo(NamedTuple):
    id: str
    index: int  # type: ignore[assignment]  # hashicorp's field name; mypy reports it as shadowing tuple.index
    term: int
    size: int
    version: int
    configuration: bytes
    configuration_index: int


class SnapshotSink:
    """Receives one snapshot's bytes; ``close()`` makes it durable, ``cancel()`` discards it."""

    def __init__(self, store: Store, meta: SnapshotMeta, extra: dict):
        self._pending = store.begin_snapshot(meta, extra_meta=extra)
        self._id: str | None = None

    def write(self, data: bytes) -> int:
        return self._pending.write(data)

    def close(self) -> None:
        info = self._pending.commit()
        self._id = _snap_id(info.snapshot_id, info.index, info.term)

    def cancel(self) -> None:
        self._pending.abort()

    def id(self) -> str:
        if self._id is None:
            raise UsageError("the snapshot has an ID once close() has made it durable")
        return self._id


def _snap_id(snapshot_id: int, index: int, term: int) -> str:
    return f"{term}-{index}-{snapshot_id}"


class SnapshotStore:
    def __init__(self, store: Store):
        self.store = store

    def create(self, version: int, index: int, term: int, configuration: bytes = b"",
               configuration_index: int = 0, trans=None) -> SnapshotSink:
        # checked here, in the caller's thread, against what _describe reads back
        version = check_u64(version, "version", 0, U64_MAX)
        configuration_index = check_u64(configuration_index, "configuration_index", 0, U64_MAX)
        configuration = as_bytes(configuration, "configuration")
        extra = {"hc_version": version, "hc_configuration": base64.b64encode(configuration).decode(),
                 "hc_configuration_index": configuration_index}
        return SnapshotSink(self.store, SnapshotMeta(index, term), extra)

    def _describe(self, snap) -> SnapshotInfo:
        extra = snap.file.extra
        version, conf, conf_index = (extra.get("hc_version", 1), extra.get("hc_configuration", ""),
                                     extra.get("hc_configuration_index", 0))
        try:
            if type(version) is not int or type(conf_index) is not int or not isinstance(conf, str):
                raise ValueError("wrong types")
            configuration = base64.b64decode(conf, validate=True)
        except ValueError:
            raise CorruptionError(snap.info.path, None, "the snapshot's hashicorp metadata (hc_version, "
                                  "hc_configuration, hc_configuration_index) is malformed") from None
        return SnapshotInfo(_snap_id(snap.info.snapshot_id, snap.meta.index, snap.meta.term), snap.meta.index,
                            snap.meta.term, snap.size, version, configuration, conf_index)

    def list(self) -> list[SnapshotInfo]:
        """Retained snapshots, newest first."""
        snaps = self.store.snapshots
        return [self._describe(snaps.open_info(i)) for i in reversed(snaps.infos)]

    def open(self, snapshot_id: str):
        """(SnapshotInfo, binary reader) for a retained snapshot."""
        snaps = self.store.snapshots
        for info in snaps.infos:
            if _snap_id(info.snapshot_id, info.index, info.term) == snapshot_id:
                snap = snaps.open_info(info)
                return self._describe(snap), snap.open()
        raise LookupError(f"no retained snapshot {snapshot_id!r}")
