"""Benchmark suite for walcrypt.

Run ``python -m benchmarks --help``.  The suite measures walcrypt's append,
replay and random-read throughput next to a set of baselines (raw disk limit,
AES-GCM cipher limit, LMDB, SQLite, pysyncobj's FileJournal) so that every
walcrypt figure can be read as a ratio to something the machine can do anyway.

Modules:

* :mod:`benchmarks.harness`   -- timing loop, statistics, machine information.
* :mod:`benchmarks.baselines` -- the baseline log stores.
* :mod:`benchmarks.workloads` -- the walcrypt adapter, the case matrix, ``run_all``.
* :mod:`benchmarks.report`    -- JSON results, ``RESULTS.md`` and the chart.
"""

from __future__ import annotations

__all__ = ["harness", "baselines", "workloads", "report"]
