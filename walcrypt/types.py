"""The value types of the Storage API (names follow etcd raft)."""

from __future__ import annotations

from array import array
from itertools import repeat
from typing import Iterator, NamedTuple


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


class EntryBatch:
    """Consecutive log entries as one authenticated record holds them, without an object per entry.

    Entry ``k`` (``0 <= k < len(batch)``) has index ``first + k``, term ``terms[k]`` and data
    ``payload[offsets[k]:offsets[k + 1]]``: the decrypted record is kept whole and each entry's data
    is sliced out only when asked for (``data``, ``datas``, ``tuples``, ``entries``).  Returned by
    ``Store.iter_batches``; treat it as read-only."""

    __slots__ = ("first", "terms", "offsets", "payload")

    def __init__(self, first: int, terms: array[int], offsets: list[int], payload: bytes) -> None:
        self.first = first
        self.terms = terms          # one per entry
        self.offsets = offsets      # one more than terms: entry k's data ends where entry k + 1's begins
        self.payload = payload

    def __len__(self) -> int:
        return len(self.terms)

    def __repr__(self) -> str:
        return f"<EntryBatch {self.first}..{self.first + len(self.terms) - 1}>"

    @property
    def last(self) -> int:
        """The index of the batch's last entry."""
        return self.first + len(self.terms) - 1

    def data(self, k: int) -> bytes:
        """The data of entry ``k`` of the batch (index ``first + k``)."""
        return self.payload[self.offsets[k]:self.offsets[k + 1]]

    def size(self, k: int) -> int:
        return self.offsets[k + 1] - self.offsets[k]

    def datas(self) -> list[bytes]:
        """Every entry's data, in order."""
        o = self.offsets
        return list(map(self.payload.__getitem__, map(slice, o, o[1:])))

    def tuples(self) -> Iterator[tuple[int, int, bytes]]:
        """``(index, term, data)`` for every entry, built in C (no Python frame per entry)."""
        o = self.offsets
        first = self.first
        return zip(range(first, first + len(self.terms)), self.terms,
                   map(self.payload.__getitem__, map(slice, o, o[1:])))

    def entries(self) -> list[Entry]:
        """Every entry as an :class:`Entry`."""
        return list(map(_new_tuple, repeat(Entry), self.tuples()))


_new_tuple = tuple.__new__          # an Entry without NamedTuple's Python-level __new__ (hot read path)
