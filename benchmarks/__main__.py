"""``python -m benchmarks [--quick] [--json FILE] [--only NAME...]``"""

from __future__ import annotations

import argparse
import sys

from . import common, report, workloads
from .harness import MIN_REPS, Printer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "walcrypt benchmarks: append / replay / random-read throughput, concurrent writers "
            "(1, 4, 16 threads of single saves), snapshot write and read, open time (sealed, "
            "scanned, crash recovery of a full segment), DEK rotation latency, memory (fresh "
            "subprocesses) and a 3-node pysyncobj cluster, each next to its baselines (raw disk "
            "O_APPEND and preallocated, AES-GCM, LMDB, SQLite, pysyncobj FileJournal, a naive "
            "durable journal) in the same run. "
            "Writes benchmarks/results/<date>.json (<date>-quick.json with --quick), "
            "benchmarks/RESULTS.md and a chart (results/chart.png, results/chart-quick.png)."
        ),
    )
    p.add_argument("--quick", action="store_true",
                   help="reduced append matrix (1k x batch 1,64 sync on; 128B/16k batch 64 "
                        "sync off) and smaller sizes (256 MiB snapshots, ...): under 3 minutes")
    p.add_argument("--json", metavar="FILE", help="also write the results dict to FILE")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="run only these: variants (%s, walcrypt), kinds (%s), or name "
                        "fragments containing '=' or '/' (e.g. entry=1k)"
                        % (", ".join(common.VARIANTS), ", ".join(common.KINDS)))
    p.add_argument("--dir", metavar="DIR",
                   help="make the temporary data directory under DIR (default: system temp)")
    p.add_argument("--reps", type=int, default=None,
                   help=f"repetitions per case (>= {MIN_REPS}; default {MIN_REPS})")
    p.add_argument("--tiny", action="store_true",
                   help="one repetition on ~50 entries per case: checks that everything runs")
    p.add_argument("--no-save", action="store_true",
                   help="do not write results/, RESULTS.md or the chart (--json still works)")
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        select = common.Selector(args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.reps is not None and args.reps < MIN_REPS and not args.tiny:
        print(f"error: --reps must be >= {MIN_REPS}", file=sys.stderr)
        return 2
    if args.list:
        sz = common.TINY if args.tiny else common.QUICK if args.quick else common.FULL
        matrix = workloads.QUICK_APPEND if args.quick else workloads.FULL_APPEND
        _, reason = workloads.walcrypt_status()
        groups, mem_cases, cluster_groups = workloads.build_all(sz, matrix, reason, select)
        for group in groups + [mem_cases] + cluster_groups:
            for c in group:
                print(c.name + (f"    [skipped: {c.skip_reason}]" if c.skip_reason else ""))
        return 0

    results = workloads.run_all(
        quick=args.quick, tiny=args.tiny, out_dir=args.dir, only=args.only,
        reps=args.reps, printer=Printer(True),
    )
    written = report.save(results, json_path=args.json,
                          write_repo=not (args.no_save or args.tiny))
    for path in written:
        print(f"wrote {path}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
