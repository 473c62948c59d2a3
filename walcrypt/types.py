"""The value types of the Storage API (names follow etcd raft)."""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    """One Raft log entry.  ``data`` is opaque bytes."""

    index: int
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
    index: int
    term: int
    conf_state: ConfState = ConfState()
