"""A busy writer for tests/test_online.py: appends, replaces log suffixes, saves snapshots (kept: 2),
compacts, rotates its data key and rolls small segments, in a bounded loop, until the parent kills it.

    python tests/_online_child.py DATA KEY_FILE

Prints READY once a snapshot exists.  Reads commands from stdin between iterations (without
blocking): ``quiet`` stops snapshots, compaction and rotation (the log keeps growing and rolling
segments, so sealed segments stay where they are) and answers QUIET; ``snapshots N`` saves N
snapshots at once (retention drops the older ones), compacts up to the last and answers DONE.

Snapshot data is a function of the snapshot's index and term (``snapshot_data``), so a test can
check what it restores from an export.
"""

from __future__ import annotations

import hashlib
import os
import select
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import walcrypt  # noqa: E402
from walcrypt import ConfState, Entry, HardState, SnapshotMeta  # noqa: E402

SEGMENT_SIZE = 16 << 10
CONF = ConfState((1, 2, 3))
ITERATIONS = 200_000            # bounded; the parent kills the process long before


def snapshot_data(index: int, term: int) -> bytes:
    block = hashlib.sha256(b"snapshot %d %d" % (index, term)).digest()
    return block * (64 + index % 50)          # 2 to 4 KiB: several chunks


def entry_data(index: int, term: int) -> bytes:
    return b"entry %d term %d " % (index, term) + b"x" * (index % 90)


def main() -> None:
    path, key_file = sys.argv[1], sys.argv[2]
    s = walcrypt.open(path, kek=walcrypt.KeyFile(key_file), segment_size=SEGMENT_SIZE, sync="always",
                      keep_snapshots=2, snapshot_chunk_size=1024)
    term, snap_index, quiet, ready = max(1, s.initial_state()[0].term), 0, False, False
    for i in range(ITERATIONS):
        if select.select([sys.stdin], [], [], 0)[0]:
            line = sys.stdin.readline()
            if not line:
                break
            if line.strip() == "quiet":
                quiet = True
                print("QUIET", flush=True)
            elif line.startswith("snapshots "):
                for _ in range(int(line.split()[1])):
                    lo = s.last_index() + 1
                    s.save(hard_state=HardState(term, 1, lo), entries=[Entry(lo, term, entry_data(lo, term))])
                    snap_index = lo
                    s.save_snapshot(SnapshotMeta(lo, term, CONF), snapshot_data(lo, term))
                s.compact(snap_index - 1)
                print("DONE", flush=True)
        last = s.last_index()
        if i % 37 == 36 and last - 3 > max(snap_index, s.first_index()):
            term += 1                          # a new leader replaces the last entries (a new segment)
            lo = last - 2
        else:
            lo = last + 1
        ents = [Entry(k, term, entry_data(k, term)) for k in range(lo, lo + 3)]
        s.save(hard_state=HardState(term, 1, ents[-1].index), entries=ents)
        if not quiet and i % 11 == 10:
            snap_index = s.last_index()
            t = s.term(snap_index)
            s.save_snapshot(SnapshotMeta(snap_index, t, CONF), snapshot_data(snap_index, t))
            if not ready:
                print("READY", flush=True)
                ready = True
        if not quiet and i % 11 == 5 and snap_index > s.first_index():
            s.compact(snap_index - 1)
        if not quiet and i % 97 == 96 and not s.needs_snapshot:
            s.rotate_dek()
        time.sleep(0.002)                      # leave the readers some of the two cores
    s.close()


if __name__ == "__main__":
    main()
