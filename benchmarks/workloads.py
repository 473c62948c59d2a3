"""Workloads: the walcrypt adapter, the case matrix and :func:`run_all`.

Three kinds of case, each named with its parameters:

* ``append/entry=1k/batch=64/sync=on/v=walcrypt-encrypted`` -- append a fixed
  amount of payload in batches into a fresh store; one sync per batch when
  ``sync=on``.  Throughput in payload MiB/s.  The cipher limit does no I/O, so
  its cases say ``sync=na``; pysyncobj cannot sync, so its ``sync=on`` cases are
  listed as skipped.
* ``replay/entry=1k/v=lmdb`` -- open an existing store and read every entry
  (decrypting).  The store is written untimed first; the page cache is warm.
  ``v=cipher`` is the cipher's own limit: AES-256-GCM decryption of every entry
  (sealed untimed, in memory), no I/O and no store.
* ``read/entry=1k/pattern=random/v=sqlite`` -- single-entry reads at uniformly
  random indexes of an existing store, in ops/s.

The append matrix has two disk baselines: ``raw`` (``os.write`` to a file opened
``O_APPEND``: each sync also flushes the grown size) and ``raw-prealloc``
(``os.pwrite`` into a preallocated file: the disk's floor).

More kinds live in their own modules and run after these, in the same process
run: ``concurrent`` (:mod:`benchmarks.concurrent`: 1, 4 and 16 threads saving
single entries), ``snapshot``, ``open`` and ``rotation`` (:mod:`benchmarks.scenarios`),
``memory`` (:mod:`benchmarks.memory`, fresh subprocesses) and ``cluster``
(:mod:`benchmarks.cluster`, three pysyncobj nodes).  :mod:`benchmarks.goals`
turns the cases into the ratios and metrics of the JSON and checks the goals.
This module is the registry: it imports those modules, and they import what
they share with it (variants, sizings, the selector, payload batches) from
:mod:`benchmarks.common`, never this module.

Repetitions of the variants of one parameter set are interleaved.  walcrypt
cases are listed as skipped while ``walcrypt.open`` does not exist yet.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import os
import random
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import baselines, cluster, concurrent, goals, memory, scenarios
from .common import (
    ENTRY_SIZES,
    FULL,
    KINDS,
    QUICK,
    RATIO_DEFS,
    STORE_VARIANTS,
    TINY,
    VARIANTS,
    WALCRYPT_KEK,
    WALCRYPT_VARIANTS,
    Selector,
    Sizing,
    make_batches,
)
from .harness import MIN_REPS, Case, Printer, Sample, machine_info, make_workdir, run_groups

__all__ = [
    "run_all", "build_all", "build_groups", "walcrypt_status", "WalcryptStore", "make_store", "compute_ratios",
    "SCHEMA_VERSION", "FULL_APPEND", "QUICK_APPEND", "BATCHES", "REPLAY_VARIANTS", "READ_VARIANTS",
    # the shared vocabulary of benchmarks.common, offered here too
    "ENTRY_SIZES", "FULL", "KINDS", "QUICK", "RATIO_DEFS", "TINY", "VARIANTS", "WALCRYPT_KEK", "Selector", "Sizing",
    "make_batches",
]

SCHEMA_VERSION = 3  # 3: ratios are medians of per-repetition ratios; "stats" holds their min/max

REPLAY_VARIANTS = WALCRYPT_VARIANTS + ("lmdb", "sqlite", "raw", "pysyncobj", "cipher")
READ_VARIANTS = WALCRYPT_VARIANTS + ("lmdb", "sqlite", "raw")


# ------------------------------------------------------------------ walcrypt


def walcrypt_status() -> Tuple[Optional[object], Optional[str]]:
    """``(module, None)`` when walcrypt's API is usable, else ``(None, reason)``."""
    try:
        import walcrypt  # noqa: F401
        from walcrypt import Entry, RawKey  # noqa: F401
    except ImportError as exc:
        return None, f"walcrypt API not importable yet ({exc})"
    except Exception as exc:  # noqa: BLE001 - a half-written engine may raise anything
        return None, f"walcrypt import failed ({type(exc).__name__}: {exc})"
    if not callable(getattr(walcrypt, "open", None)):
        return None, "walcrypt.open not available yet"
    return walcrypt, None


class WalcryptStore:
    """walcrypt behind the baselines' interface (open/append_batch/scan/get/close)."""

    supports_sync = True
    supports_scan = True
    supports_get = True

    def __init__(self, sync: bool = True, encrypted: bool = True):
        self.sync = bool(sync)
        self.encrypted = bool(encrypted)
        self.name = "walcrypt-encrypted" if encrypted else "walcrypt-plain"
        import walcrypt

        self._wc = walcrypt

    def prepare(self, batches):
        """Build the ``Entry`` objects outside the timed section (as for the baselines)."""
        Entry = self._wc.Entry
        return [[Entry(index=i, term=t, data=d) for i, t, d in b] for b in batches]

    def open(self, dir: str) -> None:
        kwargs = {"encrypted": self.encrypted, "sync": "always" if self.sync else "none"}
        if self.encrypted:
            kwargs["kek"] = self._wc.RawKey(WALCRYPT_KEK)
        # A path that does not exist yet on first open: the store creates it.
        self.store = self._wc.open(os.path.join(dir, "wal"), **kwargs)

    def append_batch(self, batch) -> None:
        self.store.save(entries=batch)

    def scan(self) -> int:
        # A host replaying its log at start: every entry's (index, term, data), authenticated and
        # decrypted, handed out as it is read (as the baselines' cursors do).
        s = self.store
        n = 0
        for _index, _term, _data in s.iter_entries(s.first_index(), s.last_index() + 1):
            n += 1
        return n

    def get(self, index: int) -> bytes:
        return self.store.entries(index, index + 1)[0].data

    def close(self) -> None:
        self.store.close()


def make_store(variant: str, sync: bool):
    if variant == "walcrypt-encrypted":
        return WalcryptStore(sync=sync, encrypted=True)
    if variant == "walcrypt-plain":
        return WalcryptStore(sync=sync, encrypted=False)
    return baselines.make(variant, sync)


def capability(variant: str, attr: str) -> bool:
    if variant in WALCRYPT_VARIANTS:
        return getattr(WalcryptStore, attr)
    return getattr(baselines.BASELINES[variant], attr)


# -------------------------------------------------------------------- the append matrix

BATCHES = (1, 64)
FULL_APPEND = [(e, b, s) for s in (True, False) for e in ENTRY_SIZES for b in BATCHES]
QUICK_APPEND = [("1k", 1, True), ("1k", 64, True), ("128", 64, False), ("16k", 64, False)]


def append_entries(sz: Sizing, entry: int, batch: int, sync: bool) -> int:
    n = min(sz.append_bytes // entry, sz.max_entries)
    if sync:
        n = min(n, sz.max_sync_batches * batch)
    return max(n, 1)


# ----------------------------------------------------------------- run_once


def _append_once(variant: str, sync: bool, batches, nbytes: int) -> Callable[[str], Sample]:
    n = sum(len(b) for b in batches)

    def run(d: str) -> Sample:
        store = make_store(variant, sync)
        prepared = store.prepare(batches)
        lat = [0.0] * len(prepared)
        store.open(d)
        try:
            append = store.append_batch
            clock = time.perf_counter
            t0 = prev = clock()
            for k, b in enumerate(prepared):
                append(b)
                now = clock()
                lat[k] = now - prev
                prev = now
            dt = prev - t0
        finally:
            store.close()
        return Sample(dt, n, nbytes, latencies=lat)

    return run


def _populate(variant: str, d: str, n: int, entry: int) -> None:
    store = make_store(variant, False)
    prepared = store.prepare(make_batches(n, entry, 256))
    store.open(d)
    try:
        for b in prepared:
            store.append_batch(b)
    finally:
        store.close()


def _replay_once(variant: str, n: int, entry: int) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        _populate(variant, d, n, entry)
        store = make_store(variant, False)
        t0 = time.perf_counter()
        store.open(d)
        try:
            got = store.scan()
            dt = time.perf_counter() - t0
        finally:
            store.close()
        if got != n:
            raise AssertionError(f"{variant} replay read {got} entries, wrote {n}")
        return Sample(dt, n, n * entry)

    return run


def _cipher_replay_once(n: int, entry: int) -> Callable[[str], Sample]:
    """The cipher's own limit for a replay: decrypt every entry, sealed beforehand (untimed)."""
    def run(d: str) -> Sample:
        store = baselines.make("cipher", False)
        store.open(d)
        try:
            for b in make_batches(n, entry, 256):
                store.append_batch(b)
            t0 = time.perf_counter()
            got = store.scan()
            dt = time.perf_counter() - t0
        finally:
            store.close()
        if got != n:
            raise AssertionError(f"cipher replay decrypted {got} entries, sealed {n}")
        return Sample(dt, n, n * entry)

    return run


def _read_once(variant: str, n: int, ops: int, entry: int) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        _populate(variant, d, n, entry)
        rnd = random.Random(7)
        idx = [rnd.randint(1, n) for _ in range(ops)]
        store = make_store(variant, False)
        store.open(d)
        try:
            if len(store.get(idx[0])) != entry:
                raise AssertionError(f"{variant} get returned a payload of the wrong size")
            get = store.get
            t0 = time.perf_counter()
            for i in idx:
                get(i)
            dt = time.perf_counter() - t0
        finally:
            store.close()
        return Sample(dt, ops, ops * entry)

    return run


# -------------------------------------------------------------------- matrix


def build_groups(
    sz: Sizing, append_matrix, wc_reason: Optional[str], select: Selector
) -> List[List[Case]]:
    groups: List[List[Case]] = []
    cipher_done = set()

    def skip_for(variant: str) -> Optional[str]:
        # the details are printed once and kept in results["walcrypt_skip_reason"]
        return "walcrypt unavailable" if wc_reason and variant in WALCRYPT_VARIANTS else None

    for ename, batch, sync in append_matrix:
        entry = ENTRY_SIZES[ename]
        n = append_entries(sz, entry, batch, sync)
        batches: Dict[int, list] = {}
        group: List[Case] = []
        for variant in STORE_VARIANTS:
            syncname = "on" if sync else "off"
            reason = skip_for(variant)
            if variant == "cipher":
                if (ename, batch) in cipher_done:
                    continue
                syncname = "na"
            elif not capability(variant, "supports_sync") and sync:
                reason = reason or f"{variant} cannot sync; measured with sync=off only"
            name = f"append/entry={ename}/batch={batch}/sync={syncname}/v={variant}"
            if not select(name, "append", variant):
                continue
            if variant == "cipher":
                cipher_done.add((ename, batch))
                n_case = append_entries(sz, entry, batch, False)
            else:
                n_case = n
            case = Case(
                name=name,
                kind="append",
                variant=variant,
                unit="MiB/s",
                params={"entry": entry, "batch": batch, "sync": syncname, "entries": n_case},
                skip_reason=reason,
            )
            if not reason:
                if n_case not in batches:
                    batches[n_case] = make_batches(n_case, entry, batch)
                bts = batches[n_case]
                case.run_once = _append_once(variant, sync, bts, n_case * entry)
            group.append(case)
        if group:
            groups.append(group)

    entry = 1024
    group = []
    for variant in REPLAY_VARIANTS:
        name = f"replay/entry=1k/v={variant}"
        if not select(name, "replay", variant):
            continue
        reason = skip_for(variant)
        case = Case(name, "replay", variant, "MiB/s",
                    params={"entry": entry, "entries": sz.replay_entries}, skip_reason=reason)
        if not reason:
            once = _cipher_replay_once if variant == "cipher" else functools.partial(_replay_once, variant)
            case.run_once = once(sz.replay_entries, entry)
        group.append(case)
    if group:
        groups.append(group)

    group = []
    for variant in READ_VARIANTS:
        name = f"read/entry=1k/pattern=random/v={variant}"
        if not select(name, "read", variant):
            continue
        reason = skip_for(variant)
        case = Case(name, "read", variant, "ops/s",
                    params={"entry": entry, "entries": sz.read_store_entries, "ops": sz.read_ops},
                    skip_reason=reason)
        if not reason:
            case.run_once = _read_once(variant, sz.read_store_entries, sz.read_ops, entry)
        group.append(case)
    if group:
        groups.append(group)
    return groups


# -------------------------------------------------------------------- ratios

def compute_ratios(cases: Dict[str, Dict[str, object]]) -> Dict[str, float]:
    """The append/replay ratios only, each the median of its per-repetition ratios (see
    :func:`benchmarks.goals.compute_metrics` for all)."""
    out: Dict[str, float] = {}
    for key, (num, den) in RATIO_DEFS.items():
        st = goals.paired(cases.get(num), cases.get(den))
        if st is not None:
            out[key] = st["median"]
    return out


# ------------------------------------------------------------------- run_all


def build_all(sz: Sizing, matrix, wc_reason: Optional[str], select: Selector):
    """Every case of a run, by phase: (throughput groups, memory cases, cluster groups)."""
    groups = build_groups(sz, matrix, wc_reason, select)
    groups += concurrent.build_groups(sz, wc_reason, select)
    groups += scenarios.build_groups(sz, wc_reason, select)
    return groups, memory.build_cases(sz, wc_reason, select), cluster.build_groups(sz, wc_reason, select)


def run_all(
    *,
    quick: bool = False,
    tiny: bool = False,
    out_dir: Optional[str] = None,
    only: Optional[Sequence[str]] = None,
    reps: Optional[int] = None,
    printer: Optional[Printer] = None,
) -> Dict[str, object]:
    """Run the suite and return the results dict (nothing is written to the repo).

    ``tiny`` runs every case once on ~50 entries (the smoke test); ``quick`` uses
    the reduced matrix and sizes.  ``out_dir`` is where the temporary data
    directory is made (default: the system temp dir); it is removed afterwards.
    """
    sz = TINY if tiny else (QUICK if quick else FULL)
    if reps is None:
        reps = sz.reps
    if not tiny and reps < MIN_REPS:
        raise ValueError(f"reps must be >= {MIN_REPS} (got {reps})")
    matrix = QUICK_APPEND if quick else FULL_APPEND
    select = Selector(only)
    printer = printer or Printer(False)

    _wc, wc_reason = walcrypt_status()
    workdir = make_workdir(out_dir)
    started = time.time()
    t0 = time.perf_counter()
    phases: Dict[str, float] = {}
    try:
        machine = machine_info(workdir)
        printer.line(
            f"walcrypt benchmarks ({'tiny' if tiny else 'quick' if quick else 'full'}, "
            f"{reps} reps, data in {workdir})"
        )
        printer.line(
            f"{machine.get('cpu_model')} | {machine.get('cores_logical')} cores | "
            f"Python {machine.get('python')} | cryptography {machine.get('cryptography')} "
            f"({machine.get('openssl')}) | {machine.get('kernel')} | "
            f"fs {machine.get('tempdir_fs', {}).get('fstype')}"
        )
        if wc_reason:
            printer.line(f"walcrypt cases skipped: {wc_reason}")
        printer.line()
        groups, mem_cases, cluster_groups = build_all(sz, matrix, wc_reason, select)
        for group in groups:
            p0 = time.perf_counter()
            run_groups([group], reps, workdir, printer)
            kind = group[0].kind
            phases[kind] = phases.get(kind, 0.0) + time.perf_counter() - p0
        if mem_cases:
            p0 = time.perf_counter()
            memory.run_cases(mem_cases, workdir, sz, reps, printer)
            phases["memory"] = time.perf_counter() - p0
        if cluster_groups:
            p0 = time.perf_counter()
            run_groups(cluster_groups, reps, workdir, printer)
            phases["cluster"] = time.perf_counter() - p0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    cases: Dict[str, Dict[str, object]] = {}
    skipped: Dict[str, str] = {}
    errors: Dict[str, str] = {}
    for group in groups + [mem_cases] + cluster_groups:
        for c in group:
            if c.skip_reason:
                skipped[c.name] = c.skip_reason
                continue
            if c.error:
                errors[c.name] = c.error
            if c.samples:
                cases[c.name] = c.summary()
    metrics = goals.compute_metrics(cases, sz)
    elapsed = time.perf_counter() - t0
    results: Dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "date": _dt.date.fromtimestamp(started).isoformat(),
        "started": _dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
        "mode": "tiny" if tiny else ("quick" if quick else "full"),
        "reps": reps,
        "only": list(only or []),
        "sizing": dataclasses.asdict(sz),
        "walcrypt_available": wc_reason is None,
        "walcrypt_skip_reason": wc_reason,
        "machine": machine,
        "cases": cases,
        "skipped": skipped,
        "errors": errors,
        **metrics,
        "ratio_defs": {k: list(v) for k, v in goals.ratio_defs(sz).items()},
    }
    results["goals"] = goals.evaluate(results)
    printer.line()
    for section in goals.SECTIONS:
        for k, v in metrics[section].items():
            printer.line(f"{section}.{k:<42} " + (f"{v:10d}" if isinstance(v, int) else f"{v:10.3f}"))
    printer.line()
    for g in results["goals"]:
        printer.line(goals.goal_line(g))
    printer.line(f"\n{len(cases)} cases measured, {len(skipped)} skipped, "
                 f"{len(errors)} errors, {elapsed:.1f} s "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in phases.items())})")
    return results
