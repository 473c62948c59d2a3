"""The profile-driven changes to walcrypt's hot paths, with the figures measured before and after
each (rendered into RESULTS.md by :mod:`benchmarks.report`).  Maintained by hand when a change is
made: these are measurements of two revisions, not of the run RESULTS.md reports.

To reproduce one: check out the revision before it (``git worktree add ../before REV``) and run the
command; ``benchmarks.ab`` runs both sides itself (``--before ../before``), alternating, in fresh
processes; a ``python -m benchmarks`` command is run once in each checkout.
"""

from __future__ import annotations

from typing import List, NamedTuple


class Change(NamedTuple):
    change: str
    before_rev: str        # the revision measured as "before" (the change's parent)
    measure: str
    before: str
    after: str
    command: str


CHANGES: List[Change] = [
    Change("bulk read: `Store.iter_entries` / `iter_batches` (1 MiB preads, one decrypt per record, "
           "tuples built in C), used by the benchmark's replay and the pysyncobj journal load",
           "a996346^", "replay of 200k x 1 KiB, median of interleaved runs of a script in one process "
           "(LMDB cursor + decrypt: 337 ms)", "285 ms (`entries()`)", "157 ms (2.15x LMDB; 1.57-3.0x per repetition)",
           "`python -m benchmarks --no-save --only replay walcrypt-encrypted lmdb cipher`"),
    Change("pysyncobj journal load through `iter_batches`", "93a297c^",
           "load of a 200k-entry journal", "335 ms", "196 ms",
           "a script timing the journal's construction over a 200k-entry store (not kept; the cluster "
           "case `python -m benchmarks --no-save --only cluster walcrypt-encrypted` loads it at each "
           "node's start)"),
    Change("group commit: waiters sleep on their own event and are woken as soon as their unit is "
           "durable; the oldest waiter is named the next leader", "041fba9^",
           "16 threads of one-entry saves: saves per fdatasync; ratio to the raw group-commit writer "
           "(a loaded `--quick` run)", "2 per fdatasync; 0.46", "7 per fdatasync; 0.92",
           "`python -m benchmarks --no-save --quick --only concurrent threads=16/`"),
    Change("open: the unsealed segment's scan and the sealed index tables vectorised", "6e8aa33^",
           "crash-recovery open / (read + decrypt once), medians: 64-entry saves; 64 MiB of 256-entry "
           "saves; 64 MiB of one-entry saves", "2.28x; 1.61x; 3.74x", "1.63x; 1.46x; 2.76x",
           "`python -m benchmarks --no-save --only open segments=crashed-full/`"),
    Change("group commit writes the one-entry records of the saves of one unit as one record "
           "(`coalesce_records`)", "336271c",
           "16 threads vs the raw group-commit writer, 3 alternating full-size runs per revision: "
           "median (min-max)", "0.816 (0.749-0.926)", "0.838 (0.830-0.839)",
           "`python -m benchmarks --no-save --only concurrent threads=16/`"),
    Change("less Python per save: `pwrite_all` writes bytes in one call, `seal` binds the frame "
           "layout once and a unit is joined once (`seal_parts`), the checks of the save path "
           "inlined, `split_records` by bisection, a save's columns from one `zip`", "336271c",
           "us per entry (sync=none), 5 alternating runs, median: 1 KiB x 1; 1 KiB x 64; "
           "and 1 KiB x 64 with fdatasync", "22.0; 2.87; 7.55", "19.9 (0.94x); 2.70 (0.93x); 6.92 (0.92x)",
           "`python -m benchmarks.ab --before ../before append-1k-b1` (and `append-1k-b64`, "
           "`append-1k-b64 --sync always`)"),
]
