"""How a pysyncobj node's data lies in a walcrypt store.

The pysyncobj adapter writes this and resumes from it; the importer of pysyncobj's own files
(:mod:`walcrypt.legacy.pysyncobj_import`) writes the same, so that a node adopted from
``FileJournal`` files starts as if it had always run on walcrypt.  Nothing here needs pysyncobj.

* Entries: pysyncobj's ``(command, index, term)`` as ``Entry(index, term + offset, command)``.
  pysyncobj's first entry (the NO_OP at index 1) has term 0, but walcrypt requires entry and
  snapshot terms >= 1 (FORMAT.md, section 13): stores made by the adapter or the importer keep
  term ``t`` as ``t + TERM_OFFSET``, recorded in the stable store under ``STABLE_TERM_OFFSET``; a
  store written before that keeps terms as they are (offset 0).
* Term and vote: JSON ``{"term": t, "vote": v}`` under ``STABLE_TERM_VOTE`` (pysyncobj's own term,
  without the offset).
* The snapshot: ``DUMP_MAGIC``, a u32 length, the pickled head ``(last, prev, cluster)``, then the
  pickled state of the SyncObj and its consumers.
* ``MARKER_NAME``: a small file in the data directory (pysyncobj's ``fullDumpFile``) that exists
  exactly when a snapshot does; it holds no secret.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from typing import Any, Protocol

from ..storage import Store
from ..vfs import open_private

DUMP_MAGIC = b"WCPSO1"
MARKER_NAME = "pysyncobj-snapshot.marker"
STABLE_TERM_VOTE = b"pysyncobj/term-vote"
STABLE_TERM_OFFSET = b"pysyncobj/term-offset"
TERM_OFFSET = 1                                  # pysyncobj's term t is kept as t + 1


class Reader(Protocol):
    """What a snapshot is read from: a store snapshot's file, or a received snapshot's chunks."""

    def read(self, size: int = -1, /) -> bytes: ...


def record_term_offset(store: Store) -> None:
    """Record that ``store`` keeps pysyncobj's terms with TERM_OFFSET added."""
    store.stable_set(STABLE_TERM_OFFSET, str(TERM_OFFSET).encode())


def term_offset(store: Store) -> int:
    """The offset ``store`` keeps pysyncobj's terms with; an empty store is given TERM_OFFSET."""
    raw = store.stable_get(STABLE_TERM_OFFSET)
    if raw is not None:
        return int(raw)
    if store.last_index() == 0 and store.snapshot() is None:
        record_term_offset(store)
        return TERM_OFFSET
    return 0


def save_term_vote(store: Store, term: int, vote: Any) -> None:
    """Make pysyncobj's current term and vote durable (the Raft stable store)."""
    store.stable_set(STABLE_TERM_VOTE, json.dumps({"term": term, "vote": vote}).encode())


def load_term_vote(store: Store) -> tuple[int, Any]:
    """(term, vote) as last saved; (0, None) when never saved."""
    raw = store.stable_get(STABLE_TERM_VOTE)
    if not raw:
        return 0, None
    tv = json.loads(raw)
    return tv["term"], tv["vote"]


def encode_dump(last: Any, prev: Any, cluster: Any, state: Any) -> bytes:
    """The snapshot of a running node: the head, then its state pickled."""
    return encode_dump_pickled(last, prev, cluster, pickle.dumps(state, protocol=4))


def encode_dump_pickled(last: Any, prev: Any, cluster: Any, state_pickle: bytes) -> bytes:
    """The snapshot with the state given already pickled (the importer carries a dump's own bytes)."""
    head = pickle.dumps((tuple(last), tuple(prev), cluster), protocol=4)
    return DUMP_MAGIC + struct.pack("<I", len(head)) + head + state_pickle


def read_head(f: Reader) -> tuple[Any, Any, Any]:
    """(last, prev, cluster) from the start of a snapshot; ``f`` is left at the state."""
    magic = f.read(len(DUMP_MAGIC))
    if magic != DUMP_MAGIC:
        raise ValueError("not a walcrypt pysyncobj snapshot")
    (n,) = struct.unpack("<I", f.read(4))
    last, prev, cluster = pickle.loads(f.read(n))
    return last, prev, cluster


def decode_dump(f: Reader) -> tuple[Any, Any, Any, Any]:
    """(last, prev, cluster, state) of a snapshot."""
    last, prev, cluster = read_head(f)
    return last, prev, cluster, pickle.loads(f.read())


def write_marker(path: str, index: int) -> None:
    """Write the marker (a temporary name: the caller renames it into place), never through a link."""
    fd = open_private(path, replace_stale=True)
    with os.fdopen(fd, "w") as f:
        json.dump({"walcrypt_snapshot_index": index, "note": "the snapshot lives in the walcrypt store"}, f)
