"""Crash safety with real processes killed by SIGKILL at random moments.

A child (tests/_wal_child.py sigkill) opens the store with sync="always" and appends batches of
entries whose data and term are derived from their index; it prints "TRY <hi>" before each save
and "ACK <hi>" after save returned (flushed).  The parent kills it with SIGKILL -- sometimes
before it has even finished opening (so during recovery), sometimes after a random number of
acknowledgements, sometimes after a random delay -- and then reopens the store itself: every
acknowledged entry must be there byte for byte, nothing beyond what was attempted, and the hard
state saved with the last surviving batch.  All rounds share one data directory, so each round's
child recovers what the previous kill left and continues the log.
"""

from __future__ import annotations

import os
import random
import signal
import time

from walcrypt import HardState

import wctest

ROUNDS = 24
SEG = 16 * 1024
PER_TERM = 500


_read_until = wctest.read_lines_until

def _drain(proc, lines: list[str]) -> None:
    rest = proc.stdout.read()                   # the child is dead: EOF comes
    text = rest.decode(errors="replace")
    if lines and lines[-1].startswith("PARTIAL "):
        text = lines.pop()[len("PARTIAL "):] + text
    lines.extend(x for x in text.split("\n") if x)


def _verify(data_dir: str, acked: int, attempted: int) -> int:
    s = wctest.open_store(data_dir, segment_size=SEG)
    try:
        last = s.last_index()
        assert last >= acked, f"acknowledged entries lost: last index {last} < acknowledged {acked}"
        assert last <= attempted, f"entries invented: last index {last} > attempted {attempted}"
        ents, hs = wctest.read_everything(s)
        assert len(ents) == last
        expected = wctest.make_entries(1, last + 1, per_term=PER_TERM)
        for e, x in zip(ents, expected):
            assert e == x, f"entry {x.index} differs after recovery"
        if last:
            assert hs == HardState(wctest.entry_term(last, PER_TERM), 1, last), hs
        return last
    finally:
        s.close()


def test_sigkill_rounds(data_dir):
    rng = random.Random(20240607)
    acked_total = 0          # highest index whose save returned, over all rounds
    attempted_total = 0      # highest index any save tried to write
    recovered = 0            # last index seen by the parent after the previous round
    modes_seen = set()
    for rnd in range(ROUNDS):
        mode = ["early", "acks", "delay"][rnd % 3]
        modes_seen.add(mode)
        proc = wctest.spawn_child("sigkill", data_dir, "--seed", str(rnd), "--seg-size", str(SEG))
        lines: list[str] = []
        try:
            deadline = time.monotonic() + 60
            if mode == "early":
                time.sleep(rng.uniform(0.0, 0.6))          # maybe still importing, maybe recovering
            elif mode == "acks":
                want = rng.randint(1, 150)
                _read_until(proc, lines, lambda ls: sum(x.startswith("ACK ") for x in ls) >= want, deadline)
            else:
                _read_until(proc, lines, lambda ls: any(x.startswith("START ") for x in ls), deadline)
                time.sleep(rng.uniform(0.0, 0.15))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            _drain(proc, lines)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read().decode()[-2000:])
        starts = [int(x.split()[1]) for x in lines if x.startswith("START ")]
        tries = [int(x.split()[1]) for x in lines if x.startswith("TRY ")]
        acks = [int(x.split()[1]) for x in lines if x.startswith("ACK ")]
        if starts:
            assert starts[0] == recovered, f"round {rnd}: the child reopened at {starts[0]}, expected {recovered}"
        assert acks == sorted(acks) and all(a in tries for a in acks)
        acked_total = max([acked_total] + acks)
        attempted_total = max([attempted_total] + tries)
        try:
            recovered = _verify(data_dir, acked_total, attempted_total)
        except AssertionError as exc:
            raise AssertionError(f"round {rnd} ({mode}): {exc}") from exc
    assert modes_seen == {"early", "acks", "delay"}
    assert acked_total > 0, "no save was ever acknowledged: the kills came too early to test anything"
    assert len(wctest.segment_files(data_dir)) >= 2
