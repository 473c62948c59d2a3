"""The 3-node pysyncobj cluster figure: committed ops/s with three journals, in one run.

``cluster/nodes=3/value=256/window=500/v=walcrypt-encrypted`` -- three SyncObj
nodes in this process on 127.0.0.1 (free ports), each with a ``ReplDict``.  The
leader submits ``ops`` ``set(key, 256-byte value)`` commands asynchronously,
at most ``window`` outstanding, and the case ends when every callback has
reported success.  ops/s of committed (replicated, applied) commands, with
per-command latency percentiles (submit to callback).

Variants (each repetition starts a fresh cluster in a fresh directory):

* ``walcrypt-encrypted`` -- :func:`walcrypt.adapters.pysyncobj.walcrypt_conf`:
  durable before the node answers the leader, one fdatasync per tick (group commit);
* ``pysyncobj`` -- pysyncobj's own ``FileJournal`` (mmap, never fsyncs: not durable);
* ``naive-durable`` -- :class:`benchmarks.journal.NaiveDurableJournal`
  (AES-GCM per entry, one ``os.fsync`` per ``add``).

All three run with the same SyncObjConf: pysyncobj's defaults (election timeout
0.4-1.4 s, appendEntriesPeriod 0.1 s) except no transport password, log
compaction off during the measurement and ``useFork=False``.  Every wait is bounded; every node is
destroyed and its tick thread joined before the directory is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from typing import Callable, List, Optional

from .common import Selector, Sizing
from .harness import Case, Sample
from .journal import forget_naive_journal, use_naive_journal

VARIANTS = ("walcrypt-encrypted", "pysyncobj", "naive-durable")
VALUE_SIZE = 256
READY_TIMEOUT = 30.0
RUN_TIMEOUT = 300.0


def pysyncobj_reason() -> Optional[str]:
    try:
        import pysyncobj  # noqa: F401
    except ImportError:
        return "pysyncobj is not installed (pip install 'walcrypt[test]')"
    return None


def _conf(variant: str, d: str, i: int):
    from pysyncobj import SyncObjConf

    common = dict(logCompactionMinEntries=1 << 30, logCompactionMinTime=1 << 30, useFork=False)
    if variant == "walcrypt-encrypted":
        import walcrypt
        from walcrypt.adapters.pysyncobj import walcrypt_conf

        return walcrypt_conf(os.path.join(d, f"node{i}"), kek=walcrypt.RawKey(bytes([i + 1]) * 32), **common)
    path = os.path.join(d, f"node{i}.journal")
    if variant == "naive-durable":
        use_naive_journal(path)
    return SyncObjConf(journalFile=path, **common)


class _Cluster:
    def __init__(self, variant: str, d: str):
        from pysyncobj import SyncObj
        from pysyncobj.batteries import ReplDict

        from walcrypt.cluster import free_ports

        self.variant, self.dir = variant, d
        addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
        self.nodes, self.dicts, self.confs = [], [], []
        try:
            for i, addr in enumerate(addrs):
                conf = _conf(variant, d, i)
                rd = ReplDict()
                self.confs.append(conf)
                self.dicts.append(rd)
                with _no_password_acknowledged():
                    self.nodes.append(SyncObj(addr, [a for a in addrs if a != addr], consumers=[rd], conf=conf))
        except BaseException:
            self.close()
            raise

    def leader(self, timeout: float = READY_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = [i for i, so in enumerate(self.nodes) if so._isLeader()]
            if len(leaders) == 1 and self.nodes[leaders[0]].isReady():
                return leaders[0]
            time.sleep(0.01)
        raise TimeoutError(f"{self.variant}: no ready leader within {timeout:.0f} s")

    def run(self, leader: int, ops: int, window: int, tag: str, timeout: float = RUN_TIMEOUT):
        """Submit ``ops`` sets on the leader, ``window`` outstanding; returns (seconds, latencies)."""
        from pysyncobj import FAIL_REASON

        rd = self.dicts[leader]
        value = "v" * VALUE_SIZE
        slots = threading.Semaphore(window)
        lock = threading.Lock()
        all_done = threading.Event()
        submitted = [0.0] * ops
        lat = [0.0] * ops
        state = {"done": 0, "failed": 0, "reason": None}

        def make_cb(k: int):
            def cb(_res, err):
                lat[k] = time.perf_counter() - submitted[k]
                with lock:
                    state["done"] += 1
                    if err != FAIL_REASON.SUCCESS:
                        state["failed"] += 1
                        state["reason"] = err
                    if state["done"] == ops:
                        all_done.set()
                slots.release()
            return cb

        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        for k in range(ops):
            if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{self.variant}: {k} of {ops} commands submitted, window never freed")
            submitted[k] = time.perf_counter()
            rd.set(f"{tag}{k}", value, callback=make_cb(k))
        if not all_done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{self.variant}: {state['done']} of {ops} commands completed in {timeout:.0f} s")
        dt = time.perf_counter() - t0
        if state["failed"]:
            raise AssertionError(f"{self.variant}: {state['failed']} of {ops} commands failed "
                                 f"(e.g. FAIL_REASON {state['reason']})")
        return dt, lat

    def close(self) -> None:
        for so in self.nodes:
            try:
                so.destroy()
            except Exception:  # noqa: BLE001 - tear down the rest
                pass
        for so in self.nodes:
            t = getattr(so, "_SyncObj__thread", None)
            if t is not None:
                t.join(timeout=15)
        for conf in self.confs:
            node = getattr(conf, "walcrypt", None)
            deadline = time.monotonic() + 10
            while node is not None and node.store is not None and not node.store.closed \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
        if self.variant == "naive-durable":
            for i in range(len(self.nodes)):
                forget_naive_journal(os.path.join(self.dir, f"node{i}.journal"))


@contextlib.contextmanager
def _no_password_acknowledged():
    """The measurement runs without a transport password on purpose (the same conf for every
    variant, on 127.0.0.1): silence the adapter's start-up warning about it."""
    logger = logging.getLogger("walcrypt.adapters.pysyncobj")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            try:
                from walcrypt.adapters.pysyncobj import InsecureTransportWarning
            except ImportError:            # a stand-in walcrypt, or pysyncobj missing
                pass
            else:
                warnings.simplefilter("ignore", InsecureTransportWarning)
            yield
    finally:
        logger.setLevel(level)


class _WarningCounter:
    """Counts pysyncobj's log warnings during a repetition (instead of printing them)."""

    def __init__(self):
        self.logger = logging.getLogger("pysyncobj")
        self.count, self.first = 0, None
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self._emit  # type: ignore[method-assign]

    def _emit(self, record) -> None:
        self.count += 1
        if self.first is None:
            self.first = record.getMessage()[:200]

    def __enter__(self):
        self.propagate = self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.propagate


def _cluster_once(variant: str, ops: int, window: int, warmup: int) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        with _WarningCounter() as warnings:
            return _measure(d, warnings)

    def _measure(d: str, warnings) -> Sample:
        c = _Cluster(variant, d)
        try:
            leader = c.leader()
            if warmup:
                c.run(leader, warmup, window, "w")
            dt, lat = c.run(leader, ops, window, "k")
            sizes = [len(rd.rawData()) for rd in c.dicts]
            leaders_after = [i for i, so in enumerate(c.nodes) if so._isLeader()]
        finally:
            c.close()
        # a leader change during the run (a slow journal can starve heartbeats) shows here
        return Sample(dt, ops, ops * VALUE_SIZE, latencies=lat,
                      extra={"leader": leader, "leaders_after": leaders_after, "applied": sizes,
                             "pysyncobj_warnings": warnings.count, "first_warning": warnings.first})

    return run


def build_groups(sz: Sizing, wc_reason: Optional[str], select: Selector) -> List[List[Case]]:
    reason = pysyncobj_reason()
    group: List[Case] = []
    for v in VARIANTS:
        name = f"cluster/nodes=3/value={VALUE_SIZE}/window={sz.cluster_window}/v={v}"
        if not select(name, "cluster", v):
            continue
        why = reason or ("walcrypt unavailable" if wc_reason and v.startswith("walcrypt") else None)
        c = Case(name, "cluster", v, "ops/s",
                 params={"nodes": 3, "value": VALUE_SIZE, "window": sz.cluster_window, "ops": sz.cluster_ops},
                 skip_reason=why)
        if not why:
            c.run_once = _cluster_once(v, sz.cluster_ops, sz.cluster_window, sz.cluster_warmup)
        group.append(c)
    return [group] if group else []
