"""Before/after timing of one workload on two checkouts of walcrypt:
``python -m benchmarks.ab --before DIR [--after DIR] WORKLOAD [--sync none] [--repeat 5]``.

DIR is a checkout of the project (``git worktree add ../before <revision>``); ``--after`` defaults
to this one.  The workloads are those of :mod:`benchmarks.profiling` (``append-1k-b1``,
``append-1k-b64``, ``replay-1k``), timed without a profiler.  Each repetition runs the before and
the after side in fresh subprocesses, alternating, and the figure is wall time per entry; the
report gives each side's median, min and max and the after/before ratio per repetition (below 1:
the after side is faster).  The benchmark code is this checkout's for both sides; only the
``walcrypt`` package differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import os, shutil, sys, tempfile, time
sys.path.insert(0, {here!r})
from benchmarks.profiling import workload       # this checkout's benchmark code ...
sys.path.insert(0, {root!r})                    # ... and the walcrypt of the side measured
d = tempfile.mkdtemp(prefix="walcrypt-ab-")
try:
    setup, timed = workload({name!r}, d, {sync!r}, {n})
    setup()
    import walcrypt
    assert os.path.dirname(os.path.dirname(os.path.abspath(walcrypt.__file__))) == {root!r}, walcrypt.__file__
    t0 = time.perf_counter()
    timed()
    print((time.perf_counter() - t0) / {n} * 1e6)
finally:
    shutil.rmtree(d, ignore_errors=True)
"""


def _once(root: str, name: str, sync: str, n: int) -> float:
    code = _CHILD.format(here=HERE, root=os.path.abspath(root), name=name, sync=sync, n=n)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd="/")
    if out.returncode != 0:
        raise SystemExit(f"{root}: {out.stderr.strip()[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab")
    ap.add_argument("workload")
    ap.add_argument("--before", required=True, help="a checkout of the revision before the change")
    ap.add_argument("--after", default=HERE, help="a checkout of the revision after it (default: this one)")
    ap.add_argument("--sync", default="none", choices=("always", "batch", "none"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--entries", type=int, default=None, help="default: 20000 for b1, 50000 otherwise")
    args = ap.parse_args(argv)
    n = args.entries or (20_000 if args.workload.endswith("b1") else 50_000)
    sides: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(max(1, args.repeat)):
        sides["before"].append(_once(args.before, args.workload, args.sync, n))
        sides["after"].append(_once(args.after, args.workload, args.sync, n))
    print(f"{args.workload}, sync={args.sync}, {n} entries, {args.repeat} alternating repetitions (us per entry)")
    for side, v in sides.items():
        print(f"  {side:6}  median {statistics.median(v):8.2f}  min {min(v):8.2f}  max {max(v):8.2f}")
    ratios = [a / b for a, b in zip(sides["after"], sides["before"])]
    print(f"  after/before per repetition: median {statistics.median(ratios):.3f}  "
          f"min {min(ratios):.3f}  max {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
