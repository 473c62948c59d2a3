"""Memory cases, each measured in a fresh subprocess (``python -m benchmarks.memory CHILD ...``).

* ``memory/metric=bytes-per-entry/entries=1m/batch=1/v=walcrypt-encrypted`` --
  resident memory per indexed entry: (RSS after opening a store of N entries -
  RSS after opening an empty store) / N, each in its own fresh process, after
  ``gc.collect()``.  The store is written once per run (untimed, in a child)
  with one entry per ``save()`` -- the worst case for walcrypt's per-record
  index (a record per save); ``batch`` says so in the name.
* ``memory/metric=peak-growth/op=snapshot-write/size=256m/...`` -- peak RSS
  growth while ``save_snapshot`` streams a state of that size (produced on the
  fly, never held in memory) into a freshly opened store; ``op=snapshot-read``
  reads it back through ``snapshot().open()``.  The peak is the kernel's
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right
  before the operation), cross-checked by a thread sampling RSS every 2 ms;
  where ``clear_refs`` is not writable, only the sampler is used.  MiB.

Every child gets the repository root first on ``PYTHONPATH`` (the walcrypt being
measured), prints one JSON line, and is bounded by a timeout.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from .common import WALCRYPT_KEK, Selector, Sizing
from .harness import MIB, Case, Printer, Sample
from .sources import PatternStream, size_name

E = "walcrypt-encrypted"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_TIMEOUT = 900.0


# ------------------------------------------------------------------ the child side


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Samples RSS every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _measure_peak(fn) -> Dict[str, object]:
    """Run ``fn()`` and report RSS before, the peak during it and the growth (bytes)."""
    gc.collect()
    base = _rss()
    hwm_ok = _reset_hwm()
    with _Sampler() as s:
        fn()
    hwm = _hwm() if hwm_ok else None
    peak = max(s.peak, hwm or 0)
    return {"rss_before": base, "peak_sampled": s.peak, "peak_hwm": hwm, "hwm_reset": hwm_ok,
            "growth": peak - base}


def _open(path: str, **kw):
    import walcrypt

    return walcrypt.open(path, kek=walcrypt.RawKey(WALCRYPT_KEK), **kw)


def child_populate(path: str, n: int, entry: int, batch: int) -> Dict[str, object]:
    from walcrypt import Entry

    data = os.urandom(entry)
    t0 = time.perf_counter()
    store = _open(path, sync="none")
    try:
        i = 1
        while i <= n:
            k = min(batch, n - i + 1)
            store.save(entries=[Entry(j, 1, data) for j in range(i, i + k)])
            i += k
    finally:
        store.close()
    return {"entries": n, "seconds": time.perf_counter() - t0}


def child_open_rss(path: str) -> Dict[str, object]:
    store = _open(path)
    try:
        gc.collect()
        return {"rss": _rss(), "last_index": store.last_index()}
    finally:
        store.close()


def child_snapshot_write(path: str, size: int) -> Dict[str, object]:
    from walcrypt import SnapshotMeta

    store = _open(path)
    try:
        out = _measure_peak(lambda: store.save_snapshot(SnapshotMeta(1, 1), PatternStream(size)))
    finally:
        store.close()
    return out


def child_snapshot_read(path: str, size: int) -> Dict[str, object]:
    box = {}

    def do_open():
        box["store"] = _open(path)         # opening authenticates the newest snapshot end to end

    opened = _measure_peak(do_open)
    store = box["store"]
    got = [0]

    def do_read():
        with store.snapshot().open() as f:
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                got[0] += len(block)

    try:
        out = _measure_peak(do_read)
    finally:
        store.close()
    if got[0] != size:
        raise AssertionError(f"read {got[0]} bytes of a {size}-byte snapshot")
    out["open_growth"] = opened["growth"]
    return out


CHILDREN = {
    "populate": lambda a: child_populate(a[0], int(a[1]), int(a[2]), int(a[3])),
    "open-rss": lambda a: child_open_rss(a[0]),
    "snapshot-write": lambda a: child_snapshot_write(a[0], int(a[1])),
    "snapshot-read": lambda a: child_snapshot_read(a[0], int(a[1])),
}


def main(argv: List[str]) -> int:
    if not argv or argv[0] not in CHILDREN:
        print(f"usage: python -m benchmarks.memory {{{','.join(CHILDREN)}}} ARGS...", file=sys.stderr)
        return 2
    print(json.dumps(CHILDREN[argv[0]](argv[1:])), flush=True)
    return 0


# ------------------------------------------------------------------ the parent side


def start_child(op: str, *args) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "benchmarks.memory", op, *map(str, args)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_child(proc: subprocess.Popen, op: str, timeout: float = CHILD_TIMEOUT) -> Dict[str, object]:
    """Wait (bounded) for a child started by :func:`start_child`; its JSON result."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"memory child {op!r} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"memory child {op!r} exited {proc.returncode}: {tail[0]}")
    return json.loads(out.strip().splitlines()[-1])


def run_child(op: str, *args, timeout: float = CHILD_TIMEOUT) -> Dict[str, object]:
    return finish_child(start_child(op, *args), op, timeout)


def _bytes_per_entry(case: Case, populating: subprocess.Popen, full: str, empty: str, sz: Sizing,
                     reps: int) -> None:
    info = finish_child(populating, "populate")
    run_child("populate", empty, 0, sz.index_entry, 1)
    for _ in range(reps):
        # the two opens are independent processes: run them side by side
        pe, pf = start_child("open-rss", empty), start_child("open-rss", full)
        e, f = finish_child(pe, "open-rss"), finish_child(pf, "open-rss")
        if f["last_index"] != sz.index_entries:
            raise AssertionError(f"the indexed store ends at {f['last_index']}, expected {sz.index_entries}")
        grow = f["rss"] - e["rss"]
        case.samples.append(Sample(0.0, sz.index_entries, 0, value=grow / sz.index_entries,
                                   extra={"rss_empty": e["rss"], "rss_full": f["rss"],
                                          "populate_seconds": round(info["seconds"], 2)}))


def _snapshot_peaks(write: Optional[Case], read: Optional[Case], workdir: str, sz: Sizing,
                    reps: int) -> None:
    """Per repetition: a fresh child writes a snapshot into a new store, another reads it back."""
    for r in range(reps):
        path = os.path.join(workdir, f"snap-mem-{r}")
        try:
            for case, op in ((write, "snapshot-write"), (read, "snapshot-read")):
                if op == "snapshot-read" and (read is None or read.error):
                    continue
                try:
                    out = run_child(op, path, sz.snapshot_bytes)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    for c in (write, read) if op == "snapshot-write" else (read,):
                        if c is not None and not c.error:
                            c.error = f"{type(exc).__name__}: {exc}"
                    break
                if case is not None:
                    case.samples.append(Sample(0.0, 1, sz.snapshot_bytes, value=out["growth"] / MIB, extra=out))
        finally:
            _rmtree(path)
        if (write is None or write.error) and (read is None or read.error):
            return


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def build_cases(sz: Sizing, wc_reason: Optional[str], select: Selector) -> List[Case]:
    names = [
        (f"memory/metric=bytes-per-entry/entries={size_name(sz.index_entries)}/batch={sz.index_batch}/v={E}",
         "B/entry", {"metric": "bytes-per-entry", "entries": sz.index_entries, "batch": sz.index_batch,
                     "entry": sz.index_entry}),
        (f"memory/metric=peak-growth/op=snapshot-write/size={size_name(sz.snapshot_bytes)}/v={E}",
         "MiB", {"metric": "peak-growth", "op": "snapshot-write", "bytes": sz.snapshot_bytes}),
        (f"memory/metric=peak-growth/op=snapshot-read/size={size_name(sz.snapshot_bytes)}/v={E}",
         "MiB", {"metric": "peak-growth", "op": "snapshot-read", "bytes": sz.snapshot_bytes}),
    ]
    cases = []
    for name, unit, params in names:
        if select(name, "memory", E):
            cases.append(Case(name, "memory", E, unit, params=params,
                              skip_reason="walcrypt unavailable" if wc_reason else None))
    return cases


def run_cases(cases: List[Case], workdir: str, sz: Sizing, reps: int, printer: Printer) -> None:
    """Run the memory cases (their own loop: one store written per run, probed ``reps`` times).

    The big store for bytes-per-entry is written by a child in the background while the
    snapshot probes run: nothing here is a timing, so sharing the CPU changes no figure."""
    live = {c.params["metric"] + "/" + str(c.params.get("op", "")): c for c in cases if not c.skip_reason}
    bpe = live.get("bytes-per-entry/")
    full, empty = os.path.join(workdir, "index-full"), os.path.join(workdir, "index-empty")
    populating = None
    if bpe is not None:
        populating = start_child("populate", full, sz.index_entries, sz.index_entry, sz.index_batch)
    try:
        w, r = live.get("peak-growth/snapshot-write"), live.get("peak-growth/snapshot-read")
        if w is not None or r is not None:
            _snapshot_peaks(w, r, workdir, sz, reps)
        if bpe is not None:
            try:
                _bytes_per_entry(bpe, populating, full, empty, sz, reps)
            except Exception as exc:  # noqa: BLE001 - report and go on
                bpe.error = f"{type(exc).__name__}: {exc}"
    finally:
        if populating is not None and populating.poll() is None:
            populating.kill()
            populating.communicate()
        _rmtree(full)
        _rmtree(empty)
    for c in cases:
        printer.case(c)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
