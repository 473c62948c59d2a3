"""The vocabulary the case modules share: variants and kinds, sizings, payloads, ``--only``.

The registry (:mod:`benchmarks.workloads`) and every module that builds cases
(:mod:`benchmarks.scenarios`, :mod:`benchmarks.memory`, :mod:`benchmarks.cluster`,
:mod:`benchmarks.profiling`) and turns them into figures (:mod:`benchmarks.goals`,
:mod:`benchmarks.report`) import these names from here; nothing here imports them.

* the variant and kind names (:data:`VARIANTS`, :data:`KINDS`) and the KEK walcrypt is
  opened with (:data:`WALCRYPT_KEK`);
* :class:`Sizing` -- how much work one repetition does -- and the three sizings
  :data:`FULL`, :data:`QUICK` and :data:`TINY`; the entry sizes by name;
* :func:`make_batches` -- the (index, term, payload) batches every store is fed;
* :class:`Selector` -- the ``--only`` filter;
* :data:`RATIO_DEFS` -- the append/replay ratios (walcrypt case over baseline case);
* :data:`CONCURRENT_THREADS` and :func:`concurrent_case` -- the concurrent writers' case names.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from . import baselines
from .harness import MIN_REPS

WALCRYPT_VARIANTS = ("walcrypt-encrypted", "walcrypt-plain")
#: every variant any case uses ("naive-durable" is the cluster's hand-written durable journal,
#: "read-decrypt" the crash-recovery open's baseline: read a segment's bytes and decrypt them once)
STORE_VARIANTS = WALCRYPT_VARIANTS + tuple(baselines.names())  # the append/replay/read matrix
VARIANTS = STORE_VARIANTS + ("naive-durable", "read-decrypt")
KINDS = ("append", "replay", "read", "concurrent", "snapshot", "open", "rotation", "memory", "cluster")

#: The KEK the benchmark opens walcrypt with (speed does not depend on it).
WALCRYPT_KEK = b"k" * 32


# -------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class Sizing:
    """How much work one repetition does.  Fixed per mode, so cases stay comparable."""

    append_bytes: int  # payload per append case ...
    max_entries: int  # ... but at most this many entries ...
    max_sync_batches: int  # ... and at most this many syncs (sync=on)
    replay_entries: int
    read_store_entries: int
    read_ops: int
    reps: int
    snapshot_bytes: int  # snapshot write/read and its memory probes
    rotation_state_bytes: int  # what the rotation's snapshot_source returns ...
    rotation_entries: int  # ... on a store holding this many 1 KiB entries
    open_entries: int  # 1 KiB entries in the store whose open time is measured
    index_entries: int  # memory per indexed entry: entries in the store ...
    index_batch: int  # ... written this many per save() ...
    index_entry: int  # ... of this size
    cluster_ops: int  # committed commands per cluster repetition (after a warm-up)
    cluster_window: int  # outstanding commands at most
    cluster_warmup: int
    concurrent_entries: int  # single-entry saves per concurrent-writers repetition (all threads)
    crash_segment_bytes: int  # segment size of the crash-recovery open (a full unsealed segment)


# Sized so that the slowest baseline takes about 1-2 s per repetition (full) or
# well under 1 s (quick) on a VM disk with ~0.5 ms fdatasync.
FULL = Sizing(64 << 20, 40_000, 2000, 50_000, 20_000, 20_000, MIN_REPS,
              snapshot_bytes=1 << 30, rotation_state_bytes=100 << 20, rotation_entries=20_000,
              open_entries=200_000, index_entries=1_000_000, index_batch=1, index_entry=64,
              cluster_ops=10_000, cluster_window=1000, cluster_warmup=1000,
              concurrent_entries=4000, crash_segment_bytes=64 << 20)
QUICK = Sizing(8 << 20, 16_000, 500, 20_000, 10_000, 10_000, MIN_REPS,
               snapshot_bytes=256 << 20, rotation_state_bytes=32 << 20, rotation_entries=5_000,
               open_entries=50_000, index_entries=1_000_000, index_batch=1, index_entry=64,
               cluster_ops=2_000, cluster_window=1000, cluster_warmup=100,
               concurrent_entries=800, crash_segment_bytes=16 << 20)
TINY = Sizing(1 << 30, 50, 50, 50, 50, 50, 1,
              snapshot_bytes=2 << 20, rotation_state_bytes=1 << 20, rotation_entries=100,
              open_entries=200, index_entries=2_000, index_batch=1, index_entry=64,
              cluster_ops=30, cluster_window=10, cluster_warmup=0,
              concurrent_entries=48, crash_segment_bytes=1 << 20)

ENTRY_SIZES = {"128": 128, "1k": 1024, "16k": 16384}


# ------------------------------------------------------------------- payloads


def payload_pool(size: int, count: int = 16, seed: int = 1) -> List[bytes]:
    rnd = random.Random(seed * 1_000_003 + size)
    return [rnd.randbytes(size) for _ in range(count)]


def make_batches(n: int, entry: int, batch: int, term: int = 1) -> List[List[Tuple[int, int, bytes]]]:
    pool = payload_pool(entry)
    out, cur = [], []
    for i in range(1, n + 1):
        cur.append((i, term, pool[i % len(pool)]))
        if len(cur) == batch:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


# ------------------------------------------------------------------- selection


class Selector:
    """``--only`` tokens: kinds (append/replay/read/...), variants (a name also selects the
    variants named after it: ``walcrypt`` means both walcrypt variants, ``raw`` also selects
    ``raw-prealloc``), or any other text as a substring of the case name.
    Within one axis tokens are OR'ed; the axes are AND'ed."""

    def __init__(self, tokens: Optional[Iterable[str]] = None):
        self.kinds, self.variants, self.subs = set(), set(), []
        for t in tokens or ():
            if t in KINDS:
                self.kinds.add(t)
            elif any(v == t or v.startswith(t + "-") for v in VARIANTS):
                self.variants.update(v for v in VARIANTS if v == t or v.startswith(t + "-"))
            elif "=" in t or "/" in t:
                self.subs.append(t)
            else:
                raise ValueError(
                    f"--only {t!r}: not a kind ({', '.join(KINDS)}), a variant "
                    f"({', '.join(VARIANTS)}, walcrypt) or a name fragment containing '=' or '/'"
                )

    def __call__(self, name: str, kind: str, variant: str) -> bool:
        return (
            (not self.kinds or kind in self.kinds)
            and (not self.variants or variant in self.variants)
            and (not self.subs or any(s in name for s in self.subs))
        )


# -------------------------------------------------------------------- ratios

_E = "walcrypt-encrypted"


def _append(batch: int, variant: str) -> str:
    return f"append/entry=1k/batch={batch}/sync=on/v={variant}"


#: ratio key -> (walcrypt case, baseline case).  The ratio is computed per repetition (repetition
#: i of one case over repetition i of the other: the two run interleaved in one group) and stated
#: as the median, min and max of those (see :func:`benchmarks.goals.paired`).
RATIO_DEFS: Dict[str, Tuple[str, str]] = {
    "encrypted_vs_plain_append_1k_b64": (_append(64, _E), _append(64, "walcrypt-plain")),
    # the floor: pwrite + fdatasync into a preallocated file (no size change to flush)
    "vs_raw_prealloc_append_1k_b1": (_append(1, _E), _append(1, "raw-prealloc")),
    "vs_raw_prealloc_append_1k_b64": (_append(64, _E), _append(64, "raw-prealloc")),
    # O_APPEND write + fdatasync: every sync also flushes the grown file size
    "vs_raw_limit_append_1k_b1": (_append(1, _E), _append(1, "raw")),
    "vs_raw_limit_append_1k_b64": (_append(64, _E), _append(64, "raw")),
    "vs_lmdb_append_1k_b1": (_append(1, _E), _append(1, "lmdb")),
    "vs_lmdb_append_1k_b64": (_append(64, _E), _append(64, "lmdb")),
    "vs_sqlite_append_1k_b64": (_append(64, _E), _append(64, "sqlite")),
    "replay_vs_lmdb_scan_1k": (f"replay/entry=1k/v={_E}", "replay/entry=1k/v=lmdb"),
    "replay_vs_cipher_decrypt_1k": (f"replay/entry=1k/v={_E}", "replay/entry=1k/v=cipher"),
}

# ------------------------------------------------------------ concurrent writers

#: threads of the concurrent-writers workload; the goals are stated at the largest
CONCURRENT_THREADS = (1, 4, 16)
CONCURRENT_VARIANTS = (_E, "raw-prealloc", "lmdb", "sqlite")


def concurrent_case(threads: int, variant: str) -> str:
    return f"concurrent/threads={threads}/entry=1k/v={variant}"
