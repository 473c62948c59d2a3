"""The value types of the Storage API (names follow etcd raft)."""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    """One Raft log entry.  ``data`` is opaque bytes."""

    # The field shadows tuple.index; the name is etcd raft's and public API (Entry.index).
    index: int  # type: ignore[assignment]
    term: int
    data: bytes = b""


class HardState(NamedTuple):
    """What Raft must persist before answering: current term, vote and commit index."""

    term: int = 0
    vote: int = 0
    commit: int = 0


class ConfState(NamedTuple):
    """Cluster membership at a snapshot (node IDs)."""

    voters: tuple = ()
    learners: tuple = ()


class SnapshotMeta(NamedTuple):
    # The field shadows tuple.index; the name is etcd raft's and public API (SnapshotMeta.index).
    index: int  # type: ignore[assignment]
    term: int
    conf_state: ConfState = ConfState()
