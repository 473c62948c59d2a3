"""Timing harness: cases, interleaved repetitions, statistics, machine information.

A :class:`Case` knows how to do one repetition in a fresh empty directory and
returns a :class:`Sample` (the seconds of the timed section and how much work
it did).  Cases that share parameters form a *group*; :func:`run_groups` runs
the repetitions of a group interleaved -- A B C A B C ... -- so that a burst of
noise on this shared machine hits every variant alike rather than one of them.

Each case reports the median, min and max of its throughput over ``reps``
repetitions (at least 5 in a real run).
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

MIB = float(1 << 20)

#: Fewest repetitions a real (non-tiny) run may use.
MIN_REPS = 5


@dataclass
class Sample:
    seconds: float  # duration of the timed section only
    entries: int  # entries (or operations) done in it
    nbytes: int  # payload bytes moved in it
    #: per-operation latencies in seconds (one per batch / op), for percentiles
    latencies: Optional[List[float]] = None
    #: the measured quantity itself, for cases whose unit is not a rate or a
    #: duration (memory in MiB, bytes per entry)
    value: Optional[float] = None
    #: extra facts of this repetition (kept in the JSON of the last one)
    extra: Optional[Dict[str, object]] = None


#: Units: rates (higher is better), durations (lower is better), quantities (lower is better).
RATE_UNITS = ("MiB/s", "ops/s")
DURATION_UNITS = ("s",)
VALUE_UNITS = ("MiB", "B/entry")
PERCENTILES = (50, 90, 99, 99.9)


def percentile(sorted_xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    if not sorted_xs:
        raise ValueError("percentile of an empty sequence")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(p / 100.0 * len(sorted_xs)) - 1))
    return sorted_xs[k]


@dataclass
class Case:
    name: str
    kind: str  # "append" | "replay" | "read" | "snapshot" | "open" | "rotation" | "cluster" | "memory"
    variant: str  # "walcrypt-encrypted", "raw", "lmdb", ...
    unit: str  # "MiB/s" (payload bytes), "ops/s", "s" (a duration), "MiB" or "B/entry" (a quantity)
    run_once: Optional[Callable[[str], Sample]] = None
    params: Dict[str, object] = field(default_factory=dict)
    skip_reason: Optional[str] = None
    samples: List[Sample] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def higher_is_better(self) -> bool:
        return self.unit in RATE_UNITS

    def throughput(self, s: Sample) -> float:
        """The figure of one repetition in this case's unit (a rate, a duration or a quantity)."""
        if self.unit in VALUE_UNITS:
            return float(s.value if s.value is not None else float("nan"))
        if self.unit in DURATION_UNITS:
            return s.seconds
        if s.seconds <= 0:
            return float("inf")
        if self.unit == "MiB/s":
            return s.nbytes / MIB / s.seconds
        return s.entries / s.seconds

    def summary(self) -> Dict[str, object]:
        tps = [self.throughput(s) for s in self.samples]
        eps = [s.entries / s.seconds for s in self.samples if s.seconds > 0]
        secs = [s.seconds for s in self.samples]
        last = self.samples[-1]
        lats = sorted(x for s in self.samples for x in (s.latencies or ()))
        out = {
            "median": statistics.median(tps),
            "min": min(tps),
            "max": max(tps),
            "unit": self.unit,
            "reps": len(tps),
            "kind": self.kind,
            "variant": self.variant,
            "params": dict(self.params),
            "entries": last.entries,
            "bytes": last.nbytes,
            "entries_per_s_median": statistics.median(eps) if eps else None,
            "seconds_median": statistics.median(secs),
            "samples": tps,
            "higher_is_better": self.higher_is_better,
        }
        if lats:
            # per-operation latency over every repetition, in microseconds
            out["latency_us"] = {f"p{p:g}": percentile(lats, p) * 1e6 for p in PERCENTILES}
            out["latency_us"]["max"] = lats[-1] * 1e6
            out["latency_us"]["count"] = len(lats)
        if last.extra:
            out["extra"] = dict(last.extra)
        return out


def timed(fn: Callable[[], object]) -> float:
    """Seconds taken by ``fn()`` (perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fmt_num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x != x:  # NaN
        return "nan"
    if 0 < abs(x) < 1:
        return f"{x:.3g}"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


class Printer:
    """Prints a readable table to stdout as results come in."""

    NAME_W = 58

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._header_done = False

    def line(self, text: str = "") -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def header(self) -> None:
        if not self._header_done:
            self.line(
                f"{'case':<{self.NAME_W}} {'median':>9} {'min':>9} {'max':>9} {'unit':<6} {'reps':>4}"
            )
            self.line("-" * (self.NAME_W + 44))
            self._header_done = True

    def case(self, c: Case) -> None:
        self.header()
        if c.skip_reason:
            self.line(f"{c.name:<{self.NAME_W}} {'skipped':>9}  ({c.skip_reason})")
        elif c.error and not c.samples:
            self.line(f"{c.name:<{self.NAME_W}} {'ERROR':>9}  ({c.error})")
        else:
            s = c.summary()
            extra = f"  (error after {s['reps']} reps: {c.error})" if c.error else ""
            lat = s.get("latency_us")
            if lat:
                extra = f"  p50 {fmt_num(lat['p50'])} p99 {fmt_num(lat['p99'])} us" + extra
            self.line(
                f"{c.name:<{self.NAME_W}} {fmt_num(s['median']):>9} {fmt_num(s['min']):>9} "
                f"{fmt_num(s['max']):>9} {c.unit:<6} {s['reps']:>4}{extra}"
            )


def _short_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= 300 else msg[:297] + "..."


_REP_SEQ = itertools.count(1)  # repetition directories are never reused within a process


def run_groups(
    groups: Sequence[Sequence[Case]],
    reps: int,
    workdir: str,
    printer: Optional[Printer] = None,
) -> None:
    """Run every group's cases ``reps`` times, interleaved (A B C A B C ...).

    Each repetition gets a fresh empty directory under ``workdir``, removed
    right after.  A case that raises is marked with its error and dropped from
    the remaining repetitions; the other cases go on.
    """
    printer = printer or Printer(False)
    for group in groups:
        live = [c for c in group if not c.skip_reason]
        for _rep in range(reps):
            for case in live:
                if case.error:
                    continue
                d = os.path.join(workdir, f"r{next(_REP_SEQ):06d}")
                os.mkdir(d)
                gc.collect()
                try:
                    case.samples.append(case.run_once(d))  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001 - report and go on
                    case.error = _short_error(exc)
                finally:
                    shutil.rmtree(d, ignore_errors=True)
        for case in group:
            printer.case(case)


def make_workdir(base: Optional[str] = None) -> str:
    """A fresh ``tempfile.mkdtemp()`` under ``base`` (default: the system temp dir)."""
    if base is not None:
        os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="walcrypt-bench-", dir=base)


# ----------------------------------------------------------------- machine info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _filesystem(path: str) -> Dict[str, object]:
    """Mount point, fs type, device and options of the filesystem holding ``path``."""
    real = os.path.realpath(path)
    best = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 4:
                    continue
                dev, mnt, fstype, opts = parts[:4]
                mnt = mnt.replace("\\040", " ")
                if real == mnt or real.startswith(mnt.rstrip("/") + "/") or mnt == "/":
                    if best is None or len(mnt) >= len(best[1]):
                        best = (dev, mnt, fstype, opts)
    except OSError:
        pass
    info: Dict[str, object] = {}          # no local paths in committed results
    if best:
        info.update(device=best[0], mountpoint=best[1], fstype=best[2], options=best[3])
    try:
        st = os.statvfs(real)
        info["free_gib"] = round(st.f_bavail * st.f_frsize / (1 << 30), 1)
    except OSError:
        pass
    return info


def _version(modname: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(modname)
    except Exception:  # noqa: BLE001
        return None


def machine_info(tempdir: Optional[str] = None) -> Dict[str, object]:
    import sqlite3

    info: Dict[str, object] = {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
    }
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import psutil

        info["cores_physical"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / (1 << 30), 1)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import cryptography
        from cryptography.hazmat.backends.openssl import backend

        info["cryptography"] = cryptography.__version__
        info["openssl"] = backend.openssl_version_text()
    except Exception:  # noqa: BLE001
        pass
    info["sqlite"] = sqlite3.sqlite_version
    try:
        import lmdb

        info["lmdb"] = "py-lmdb %s, liblmdb %s" % (
            getattr(lmdb, "__version__", "?"),
            ".".join(map(str, lmdb.version())),
        )
    except Exception:  # noqa: BLE001
        pass
    info["pysyncobj"] = _version("pysyncobj")
    info["psutil"] = _version("psutil")
    info["matplotlib"] = _version("matplotlib")
    try:
        import walcrypt

        info["walcrypt"] = getattr(walcrypt, "__version__", None) or _version("walcrypt")
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        pkg = os.path.dirname(os.path.abspath(walcrypt.__file__))
        info["walcrypt_path"] = ("this checkout" if os.path.dirname(pkg) == here else "an installed copy")
    except Exception:  # noqa: BLE001 - a half-written engine may raise anything
        info["walcrypt"] = _version("walcrypt")
    info["tempdir_fs"] = _filesystem(tempdir or tempfile.gettempdir())
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info
