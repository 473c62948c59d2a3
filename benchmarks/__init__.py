"""Benchmark suite for walcrypt.

Run ``python -m benchmarks --help``.  The suite measures walcrypt's append,
replay and random-read throughput, snapshot write/read, open time, DEK
rotation latency, memory and a 3-node pysyncobj cluster next to baselines run
in the same process run (raw disk limit, AES-GCM cipher limit, LMDB, SQLite,
pysyncobj's FileJournal, a naive durable encrypted journal) so that every
walcrypt figure can be read as a ratio to something the machine can do anyway.

Modules:

* :mod:`benchmarks.harness`   -- timing loop, statistics, percentiles, machine information.
* :mod:`benchmarks.baselines` -- the baseline log stores (one interface: open, append_batch, scan, get).
* :mod:`benchmarks.sources`   -- streamed snapshot data, raw write + fsync / read, size names.
* :mod:`benchmarks.common`    -- what the case modules share: variants, kinds, sizings, payload
  batches, the ``--only`` selector, the append/replay ratios.
* :mod:`benchmarks.workloads` -- the registry: the walcrypt adapter, the append/replay/read matrix,
  every case module's cases, ``run_all``.  Only ``__main__`` imports it.
* :mod:`benchmarks.scenarios` -- snapshot write/read, open time, DEK rotation latency.
* :mod:`benchmarks.memory`    -- memory cases measured in fresh subprocesses (and their child side).
* :mod:`benchmarks.cluster`   -- the 3-node pysyncobj cluster with three journals.
* :mod:`benchmarks.journal`   -- the cluster's hand-written durable encrypted journal.
* :mod:`benchmarks.goals`     -- ratios, metrics and the goals checked in RESULTS.md.
* :mod:`benchmarks.report`    -- JSON results, ``RESULTS.md`` and the chart.
* :mod:`benchmarks.profiling` -- ``python -m benchmarks.profiling``: profiles of the hot paths.
"""

from __future__ import annotations

__all__ = ["harness", "baselines", "sources", "common", "workloads", "scenarios", "memory", "cluster",
           "journal", "goals", "report"]
