"""Child process of tests/test_rotation.py::test_rotate_and_restart_under_sigkill.

Loops (bounded) over: open the store with a snapshot source; finish a rotation a crash left
waiting for a snapshot (as a host would); save a few batches, printing "TRY <hi>" before each
save and "ACK <hi>" after it returned; rotate_dek(); close.  The parent kills it with SIGKILL.
Entry data and term, and snapshot data, are functions of the index (tests/snaptest.py).
"""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import walcrypt  # noqa: E402
from walcrypt import Entry, HardState, SnapshotMeta, ConfState  # noqa: E402

import snaptest as T  # noqa: E402
import wctest  # noqa: E402


def entry(i: int) -> Entry:
    return Entry(i, wctest.entry_term(i), wctest.entry_data(i, 100 + i % 300))


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    holder = {}

    def source(store):
        s = store
        idx = s.last_index()
        return SnapshotMeta(idx, s.term(idx), ConfState(voters=(1, 2, 3))), T.snap_data(idx)

    for cycle in range(100_000):                 # bounded; the parent kills us long before
        s = walcrypt.open(path, kek=walcrypt.RawKey(wctest.KEK_BYTES), segment_size=T.SEG_SIZE,
                          snapshot_chunk_size=T.CHUNK, snapshot_source=source, sync="always")
        holder["s"] = s
        print(f"OPEN {s.first_index()} {s.last_index()}", flush=True)
        if s.needs_snapshot and s.last_index() >= 1:
            idx = s.last_index()
            s.save_snapshot(SnapshotMeta(idx, s.term(idx), ConfState(voters=(1, 2, 3))), T.snap_data(idx))
            print("FINISHED-PENDING", flush=True)
        nxt = s.last_index() + 1
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, 12)
            ents = [entry(i) for i in range(nxt, nxt + n)]
            hi = nxt + n - 1
            print(f"TRY {hi}", flush=True)
            s.save(hard_state=HardState(ents[-1].term, 1, hi), entries=ents)
            print(f"ACK {hi}", flush=True)
            nxt = hi + 1
        print("ROTATE", flush=True)
        s.rotate_dek()
        print("ROTATED", flush=True)
        s.close()
        print("CLOSED", flush=True)


if __name__ == "__main__":
    main()
