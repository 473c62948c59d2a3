"""Profile walcrypt's hot paths: ``python -m benchmarks.profiling [WORKLOAD ...] [--sync none|always]``.

Workloads: ``append-1k-b1``, ``append-1k-b64``, ``replay-1k`` (open + read all).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.profiling")
    ap.add_argument("workloads", nargs="*", default=["append-1k-b1", "append-1k-b64", "replay-1k"])
    ap.add_argument("--sync", default="always", choices=("always", "batch", "none"))
    ap.add_argument("--entries", type=int, default=None, help="default: 5000 for b1, 50000 otherwise")
    ap.add_argument("--cprofile", action="store_true", help="use cProfile even if pyinstrument is there")
    args = ap.parse_args(argv)
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
