"""SIGKILL during every kind of operation: append, suffix replacement, truncation, compaction,
snapshots, DEK rotation and migration between encrypted and plaintext.

A child (tests/_ops_child.py) runs a random mix of operations on one store, printing TRY/ACK
around each.  The parent kills it with SIGKILL at a random moment, reopens the store itself and
checks it against a model rebuilt from the acknowledged operations: the store must equal the model
either without or with the one operation that was in flight (never anything else), every
acknowledged entry byte for byte.  All rounds share one data directory.

CI runs 24 kills.  The long run: ``WALCRYPT_SIGKILL_ROUNDS=1000 python -m pytest
tests/test_sigkill_ops.py -q`` (about 15 minutes here).
"""

from __future__ import annotations

import copy
import os
import random
import select
import signal
import subprocess
import sys
import time

import wctest

sys.path.insert(0, wctest.TESTS_DIR)
import _ops_child as child  # noqa: E402

ROUNDS = int(os.environ.get("WALCRYPT_SIGKILL_ROUNDS", "24"))
CHILD = os.path.join(wctest.TESTS_DIR, "_ops_child.py")


class Model:
    def __init__(self):
        self.entries: dict[int, tuple[int, int]] = {}   # index -> (term, generation)
        self.first = 1

    @property
    def last(self) -> int:
        return max(self.entries) if self.entries else self.first - 1

    def apply(self, op: list[str]) -> None:
        kind, args = op[0], [int(a) for a in op[1:]]
        if kind in ("append", "replace"):
            lo, hi, gen, term = args
            for i in [i for i in self.entries if i >= lo]:
                del self.entries[i]
            for i in range(lo, hi + 1):
                self.entries[i] = (term, gen)
        elif kind == "truncate":
            for i in [i for i in self.entries if i >= args[0]]:
                del self.entries[i]
        elif kind == "compact":
            self._compact(args[0])
        elif kind == "rotate":                 # completed by a snapshot at the last index
            self._compact(self.last)

    def _compact(self, at: int) -> None:
        if at >= self.first:
            last = self.last
            self.first = at + 1
            for i in [i for i in self.entries if i <= at]:
                del self.entries[i]
            if not self.entries:
                self.first = max(self.first, last + 1)

    def matches(self, store) -> str | None:
        """None when the store holds exactly this model, else what differs."""
        first, last = store.first_index(), store.last_index()
        if (first, last) != (self.first, self.last):
            return f"first/last {first}/{last}, model {self.first}/{self.last}"
        got = store.entries(first, last + 1) if last >= first else []
        for e in got:
            term, gen = self.entries[e.index]
            if e.term != term or e.data != child.data_for(e.index, gen):
                return f"entry {e.index} differs (term {e.term} vs {term})"
        return None


def _run_round(path: str, seed: int, gen0: int, rng: random.Random) -> tuple[list[list[str]], list[str] | None]:
    env = wctest.child_env()
    proc = subprocess.Popen([sys.executable, CHILD, path, str(seed), str(gen0)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    acked: list[list[str]] = []
    pending: list[str] | None = None
    buf = b""
    kill_after = rng.choice([0, rng.randint(1, 8), rng.randint(5, 60)])
    deadline = time.monotonic() + 60
    try:
        while len(acked) < kill_after and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.decode().split()
                if parts[0] == "TRY":
                    pending = parts[1:]
                elif parts[0] == "ACK":
                    acked.append(parts[1:])
                    pending = None
        if kill_after and rng.random() < 0.5:
            time.sleep(rng.random() * 0.02)        # land inside the next operation
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    rest = proc.stdout.read()
    for line in (buf + rest).split(b"\n")[:-1]:      # complete lines only (each is one atomic write)
        parts = line.decode(errors="replace").split()
        if not parts:
            continue
        if parts[0] == "TRY":
            pending = parts[1:]
        elif parts[0] == "ACK":
            acked.append(parts[1:])
            pending = None
    err = proc.stderr.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    assert "Traceback" not in err, f"the child failed on its own:\n{err[-3000:]}"
    return acked, pending


def test_sigkill_during_every_kind_of_operation(tmp_path):
    path = str(tmp_path / "data")
    rng = random.Random(20261122)
    model = Model()
    kinds_interrupted: dict[str, int] = {}
    for round_no in range(ROUNDS):
        acked, pending = _run_round(path, seed=rng.randrange(1 << 30), gen0=round_no * 100_000, rng=rng)
        for op in acked:
            model.apply(op)
        if pending:
            kinds_interrupted[pending[0]] = kinds_interrupted.get(pending[0], 0) + 1
        store = child.open_store(path)             # recovery (and a resumed rotation) happens here
        try:
            diff_before = model.matches(store)
            if diff_before is None:
                continue
            assert pending is not None, f"round {round_no}: store differs from the acknowledged model: {diff_before}"
            after = copy.deepcopy(model)
            after.apply(pending)
            diff_after = after.matches(store)
            assert diff_after is None, (f"round {round_no}: after a kill during {pending}, the store matches "
                                        f"neither outcome: without it {diff_before}; with it {diff_after}")
            model = after
        finally:
            store.close()
    print("operations interrupted by a kill:", kinds_interrupted)
    assert sum(kinds_interrupted.values()) >= 1, "no kill ever landed inside an operation"
