"""Profile walcrypt's hot paths: ``python -m benchmarks.profiling [WORKLOAD ...] [--sync none|always]``.

Workloads: ``append-1k-b1``, ``append-1k-b64``, ``replay-1k`` (open + read all).  ``--phases``
times where each save's wall time goes instead (before its pwrite, the pwrite, the fdatasync,
after it), without a profiler.
Uses pyinstrument when it is installed (``pip install pyinstrument``; wall-clock
sampling, so time blocked in fdatasync shows up) and cProfile otherwise.  The
store is written in a temporary directory that is removed afterwards.  This is
a diagnostic tool: nothing here is a benchmark figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from .common import WALCRYPT_KEK, make_batches


def _open(path: str, sync: str):
    import walcrypt

    return walcrypt.open(path, kek=walcrypt.RawKey(WALCRYPT_KEK), sync=sync)


def _batches(n: int, batch: int):
    from walcrypt import Entry

    return [[Entry(i, t, d) for i, t, d in b] for b in make_batches(n, 1024, batch)]


def workload(name: str, d: str, sync: str, n: int):
    """(setup, timed) callables for one workload."""
    path = os.path.join(d, "wal")
    if name.startswith("append"):
        batch = 1 if name.endswith("b1") else 64
        batches = _batches(n, batch)
        box = {}

        def setup():
            box["store"] = _open(path, sync)

        def timed():
            save = box["store"].save
            for b in batches:
                save(entries=b)
            box["store"].close()

        return setup, timed
    if name == "replay-1k":
        def setup():
            store = _open(path, "none")
            for b in _batches(n, 64):
                store.save(entries=b)
            store.close()

        def timed():
            store = _open(path, "none")
            lo, hi = store.first_index(), store.last_index()
            got = len(store.entries(lo, hi + 1))
            store.close()
            assert got == n

        return setup, timed
    raise SystemExit(f"unknown workload {name!r}")


def phases(name: str, sync: str, n: int) -> None:
    """Where the wall time of each save goes (an append workload): from the call to its pwrite,
    the pwrite, the fdatasync, and from the fdatasync's return to the save's; medians in us.
    ``Segment.write`` and ``Segment.sync`` are wrapped for the run (the wrappers' cost is in the
    figures, well under a microsecond each)."""
    import statistics

    from walcrypt.segment import Segment

    marks: dict = {}
    write, sync_ = Segment.write, Segment.sync

    def timed_write(self, buf):
        marks["w0"] = time.perf_counter_ns()
        try:
            return write(self, buf)
        finally:
            marks["w1"] = time.perf_counter_ns()

    def timed_sync(self):
        marks["s0"] = time.perf_counter_ns()
        try:
            return sync_(self)
        finally:
            marks["s1"] = time.perf_counter_ns()

    d = tempfile.mkdtemp(prefix="walcrypt-phases-")
    Segment.write, Segment.sync = timed_write, timed_sync
    try:
        store = _open(os.path.join(d, "wal"), sync)
        rows = {"before the pwrite": [], "pwrite": [], "fdatasync": [], "after the fdatasync": []}
        clock = time.perf_counter_ns
        for b in _batches(n, 1 if name.endswith("b1") else 64):
            marks.clear()
            t0 = clock()
            store.save(entries=b)
            t1 = clock()
            if "w0" not in marks:
                continue                                    # (never: every save writes a unit)
            end = marks.get("s1", marks["w1"])
            rows["before the pwrite"].append(marks["w0"] - t0)
            rows["pwrite"].append(marks["w1"] - marks["w0"])
            rows["fdatasync"].append(end - marks.get("s0", end))
            rows["after the fdatasync"].append(t1 - end)
        store.close()
    finally:
        Segment.write, Segment.sync = write, sync_
        shutil.rmtree(d, ignore_errors=True)
    print(f"=== {name}, sync={sync}: median us per save ({n} entries)")
    for k, v in rows.items():
        print(f"  {k:22} {statistics.median(v) / 1000:8.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    ap.add_argument("workloads", nargs="*", default=["append-1k-b1", "append-1k-b64", "replay-1k"])
    ap.add_argument("--sync", default="always", choices=("always", "batch", "none"))
    ap.add_argument("--entries", type=int, default=None, help="default: 5000 for b1, 50000 otherwise")
    ap.add_argument("--cprofile", action="store_true", help="use cProfile even if pyinstrument is there")
    ap.add_argument("--phases", action="store_true",
                    help="append workloads: where each save's wall time goes, no profiler")
    args = ap.parse_args(argv)
    if args.phases:
        for name in args.workloads:
            if name.startswith("append"):
                phases(name, args.sync, args.entries or (5000 if name.endswith("b1") else 50_000))
        return 0
    try:
        if args.cprofile:
            raise ImportError
        from pyinstrument import Profiler
    except ImportError:
        Profiler = None
    for name in args.workloads:
        n = args.entries or (5000 if name.endswith("b1") else 50_000)
        d = tempfile.mkdtemp(prefix="walcrypt-profile-")
        try:
            setup, timed = workload(name, d, args.sync, n)
            setup()
            print(f"=== {name} ({n} entries of 1 KiB, sync={args.sync if name.startswith('append') else 'n/a'})")
            if Profiler is not None:
                prof = Profiler(interval=0.0005)
                prof.start()
                t0 = time.perf_counter()
                timed()
                dt = time.perf_counter() - t0
                prof.stop()
                print(prof.output_text(unicode=False, color=False, show_all=False))
            else:
                import cProfile
                import pstats

                pr = cProfile.Profile()
                t0 = time.perf_counter()
                pr.runcall(timed)
                dt = time.perf_counter() - t0
                pstats.Stats(pr).sort_stats("tottime").print_stats(20)
            print(f"{name}: {dt:.3f} s, {dt / n * 1e6:.1f} us per entry\n")
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
