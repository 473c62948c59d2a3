"""Child process for tests/test_sigkill_ops.py: a random mix of operations on one store.

Prints ``TRY <op> <args>`` before and ``ACK <op> <args>`` after each operation returned, flushed,
so the parent knows what was acknowledged when it kills this process with SIGKILL.
Operations: append, replace (Raft suffix replacement), truncate, compact, snapshot, rotate
(DEK rotation completed through a snapshot source), migrate (encrypted <-> plaintext).
"""

from __future__ import annotations

import random
import sys

import walcrypt
from walcrypt import Entry, HardState, SnapshotMeta
from walcrypt.opening import stored_mode

KEK = walcrypt.RawKey(bytes(range(32)))
SEG = 16 * 1024


def data_for(index: int, gen: int) -> bytes:
    return b"%d:%d:" % (index, gen) + bytes((index * 7 + gen) % 251 for _ in range(40 + index % 90))


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def open_store(path: str, encrypted: bool | None = None):
    mode = stored_mode(path)
    enc = mode if encrypted is None and mode is not None else (True if encrypted is None else encrypted)

    def source(store):
        i = store.last_index()
        return SnapshotMeta(i, store.term(i)), b"snap:%d" % i

    if enc:
        return walcrypt.open(path, kek=KEK, segment_size=SEG, sync="always", snapshot_source=source,
                             snapshot_chunk_size=4096, migrate=encrypted is not None)
    return walcrypt.open(path, kek=KEK if mode else None, encrypted=False, decrypt_existing=True,
                         segment_size=SEG, sync="always", snapshot_chunk_size=4096)


def main() -> None:
    path, seed, gen0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    s = open_store(path)
    say("OPEN", s.first_index(), s.last_index(), int(s.encrypted))
    gen = gen0
    for _ in range(10_000):                          # bounded; the parent kills us long before
        gen += 1
        first, last = s.first_index(), s.last_index()
        term = s.term(last) if last >= first - 1 and last > 0 else 1
        term = max(term, 1)
        snap = s.snapshot()
        floor = max(first, snap.meta.index + 1 if snap else 0)   # Raft never rewrites what a snapshot holds
        op = rng.choices(["append", "replace", "truncate", "compact", "snapshot", "rotate", "migrate"],
                         weights=[50, 10, 4, 6, 6, 3, 2])[0]
        if op == "append" or last < floor + 2:
            n = rng.randint(1, 20)
            say("TRY append", last + 1, last + n, gen, term)
            s.save(hard_state=HardState(term, 1, last), entries=[Entry(i, term, data_for(i, gen))
                                                               for i in range(last + 1, last + n + 1)])
            say("ACK append", last + 1, last + n, gen, term)
        elif op == "replace":
            at = rng.randint(floor + 1, last)
            n = rng.randint(1, 10)
            say("TRY replace", at, at + n - 1, gen, term + 1)
            s.save(entries=[Entry(i, term + 1, data_for(i, gen)) for i in range(at, at + n)])
            say("ACK replace", at, at + n - 1, gen, term + 1)
        elif op == "truncate":
            at = rng.randint(floor + 1, last)
            say("TRY truncate", at)
            s.truncate(at)
            say("ACK truncate", at)
        elif op == "compact":
            at = rng.randint(first, max(first, last - 5))
            say("TRY compact", at)
            s.compact(at)
            say("ACK compact", at)
        elif op == "snapshot":
            say("TRY snapshot", last, s.term(last))
            s.save_snapshot(SnapshotMeta(last, s.term(last)), b"snap:%d" % last)
            say("ACK snapshot", last, s.term(last))
        elif op == "rotate" and s.encrypted:
            say("TRY rotate")
            s.rotate_dek()
            say("ACK rotate")
        elif op == "migrate":
            to = not s.encrypted
            say("TRY migrate", int(to))
            s.close()
            s = open_store(path, encrypted=to)
            say("ACK migrate", int(to))


if __name__ == "__main__":
    main()
