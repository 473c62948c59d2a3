"""From measured cases to the figures of the JSON (``ratios``, ``open``, ``memory``, ``latency``,
``replay``, ``concurrent``, ``stats``) and the goals checked in RESULTS.md.

A ratio is walcrypt's figure over the baseline's, oriented so that higher is better: throughput /
throughput for rates; for durations (unit ``s``) the baseline's time over walcrypt's (so 10 means
walcrypt takes a tenth of the time).  The two cases of a ratio run interleaved in one group
(A B A B ...), so repetition i of one is paired with repetition i of the other: the ratio is
computed per repetition, and its median is the figure in ``ratios`` (or ``open``), with the
median, min and max over the repetitions in ``stats`` (:func:`paired`).

Each goal is checked on one statistic of its figure over the repetitions (its *gate*): the median,
the min (the goal must hold in every repetition) or the max (a memory peak: the worst repetition).
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Tuple

from .common import CONCURRENT_THREADS, RATIO_DEFS, Sizing, concurrent_case
from .sources import size_name

E = "walcrypt-encrypted"

#: the sections of figures in the JSON and RESULTS.md, in order
SECTIONS = ("ratios", "open", "replay", "concurrent", "memory", "latency")

_CONCURRENT_BASELINES = (("raw-prealloc", "raw_group"), ("lmdb", "lmdb"), ("sqlite", "sqlite"))


def ratio_defs(sz: Sizing) -> Dict[str, Tuple[str, str]]:
    """Every ratio key -> (walcrypt case, baseline case), with this sizing's case names."""
    snap = size_name(sz.snapshot_bytes)
    opn = size_name(sz.open_entries)
    crash = f"open/segment={size_name(sz.crash_segment_bytes)}/segments=crashed-full/v="
    window = sz.cluster_window
    defs = dict(RATIO_DEFS)
    for threads in CONCURRENT_THREADS:
        for variant, tag in _CONCURRENT_BASELINES:
            defs[f"concurrent_vs_{tag}_{threads}t"] = (concurrent_case(threads, E),
                                                       concurrent_case(threads, variant))
    defs.update({
        "snapshot_encrypted_vs_raw_write": (f"snapshot/op=write/size={snap}/v={E}",
                                            f"snapshot/op=write/size={snap}/v=raw"),
        "snapshot_encrypted_vs_raw_read": (f"snapshot/op=read/size={snap}/v={E}",
                                           f"snapshot/op=read/size={snap}/v=raw"),
        "cluster_vs_filejournal": (f"cluster/nodes=3/value=256/window={window}/v={E}",
                                   f"cluster/nodes=3/value=256/window={window}/v=pysyncobj"),
        "cluster_vs_naive_durable": (f"cluster/nodes=3/value=256/window={window}/v={E}",
                                     f"cluster/nodes=3/value=256/window={window}/v=naive-durable"),
        "open.sealed_vs_replay": (f"open/entries={opn}/segments=sealed/v={E}",
                                  f"open/entries={opn}/segments=sealed+read-all/v={E}"),
        "open.sealed_vs_unsealed_scan": (f"open/entries={opn}/segments=sealed/v={E}",
                                         f"open/entries={opn}/segments=unsealed/v={E}"),
        # crash-recovery open of a full unsealed segment vs reading + decrypting its bytes once
        "open.crash_vs_read_decrypt": (crash + E, crash + "read-decrypt"),
    })
    return defs


def _ratio(a: Optional[Dict], b: Optional[Dict]) -> Optional[float]:
    if not a or not b or not a["median"] or not b["median"]:
        return None
    if a.get("unit") == "s":
        return float(b["median"]) / float(a["median"])
    return float(a["median"]) / float(b["median"])


def paired(a: Optional[Dict], b: Optional[Dict]) -> Optional[Dict[str, object]]:
    """The ratio of case ``a`` over case ``b`` per repetition (repetition i with repetition i):
    ``{"median", "min", "max", "n"}``.  Results without per-repetition samples give the ratio of
    the medians, with ``n`` 0 and no min or max."""
    if not a or not b:
        return None
    duration = a.get("unit") == "s"
    rs = []
    for x, y in zip(a.get("samples") or (), b.get("samples") or ()):
        num, den = (y, x) if duration else (x, y)
        if num and den and math.isfinite(num) and math.isfinite(den):
            rs.append(float(num) / float(den))
    if rs:
        return {"median": statistics.median(rs), "min": min(rs), "max": max(rs), "n": len(rs)}
    r = _ratio(a, b)
    return None if r is None else {"median": r, "min": None, "max": None, "n": 0}


def _case_stats(c: Dict) -> Dict[str, object]:
    return {"median": c["median"], "min": c["min"], "max": c["max"], "n": c.get("reps", 0)}


def compute_metrics(cases: Dict[str, Dict], sz: Sizing) -> Dict[str, Dict]:
    """The sections of :data:`SECTIONS` from the case summaries, and ``stats``: median, min and
    max over the repetitions of every figure a goal can be checked on, keyed "section.key"."""
    out: Dict[str, Dict] = {s: {} for s in SECTIONS}
    stats: Dict[str, Dict[str, object]] = {}
    out["stats"] = stats
    for key, (num, den) in ratio_defs(sz).items():
        st = paired(cases.get(num), cases.get(den))
        if st is None:
            continue
        section, _, name = key.rpartition(".")
        section = section or "ratios"
        out[section][name] = st["median"]
        stats[f"{section}.{name}"] = st

    def find(prefix: str) -> Optional[Dict]:
        return next((c for n, c in cases.items() if n.startswith(prefix)), None)

    def put(section: str, key: str, c: Dict, value: Optional[float] = None) -> None:
        out[section][key] = c["median"] if value is None else value
        stats[f"{section}.{key}"] = _case_stats(c)

    bpe = find("memory/metric=bytes-per-entry/")
    if bpe:
        # the goal's key only when the store really held 1M entries (not in tiny runs)
        if bpe["params"].get("entries") == 1_000_000:
            put("memory", "bytes_per_entry_1m", bpe)
        put("memory", "bytes_per_entry", bpe)
        out["memory"]["bytes_per_entry_store_entries"] = bpe["params"]["entries"]
        out["memory"]["bytes_per_entry_store_batch"] = bpe["params"]["batch"]
    # memory peaks: the worst repetition (a peak is a bound, not a typical value)
    for op, key in (("snapshot-write", "snapshot_write_peak_growth_mib"),
                    ("snapshot-read", "snapshot_read_peak_growth_mib")):
        c = find(f"memory/metric=peak-growth/op={op}/")
        if c:
            put("memory", key, c, c["max"])
            if op == "snapshot-read" and c.get("extra", {}).get("open_growth") is not None:
                out["memory"]["snapshot_open_peak_growth_mib"] = c["extra"]["open_growth"] / (1 << 20)
    rot = find(f"rotation/state={size_name(sz.rotation_state_bytes)}/v={E}")
    if rot:
        out["latency"]["rotation_seconds"] = rot["median"]
        out["latency"]["rotation_state_bytes"] = sz.rotation_state_bytes
    raw = find(f"rotation/state={size_name(sz.rotation_state_bytes)}/v=raw")
    if raw:
        out["latency"]["raw_state_write_seconds"] = raw["median"]
    for name, c in cases.items():
        if name.startswith("open/") and c.get("variant") == E:
            put("open", f"{c['params']['segments'].replace('+', '_').replace('-', '_')}_seconds", c)
    for name, c in cases.items():
        lat = c.get("latency_us")
        if lat and name.startswith(("append/entry=1k/batch=1/sync=on/", "cluster/")) and c["variant"] == E:
            tag = "append_1k_b1" if name.startswith("append/") else "cluster_op"
            out["latency"][f"{tag}_p50_us"] = lat["p50"]
            out["latency"][f"{tag}_p99_us"] = lat["p99"]
    # replay throughput against the cipher's own limit (AES-GCM decryption of the same entries)
    for variant, key in ((E, "walcrypt_encrypted_mib_s"), ("cipher", "cipher_decrypt_mib_s")):
        c = cases.get(f"replay/entry=1k/v={variant}")
        if c:
            put("replay", key, c)
    # concurrent writers: latency and the group sizes reached (entries per fdatasync)
    for threads in CONCURRENT_THREADS:
        for variant, tag in ((E, "walcrypt"), ("raw-prealloc", "raw_group")):
            c = cases.get(concurrent_case(threads, variant))
            if not c:
                continue
            lat = c.get("latency_us") or {}
            if variant == E and lat:
                out["concurrent"][f"walcrypt_{threads}t_p50_us"] = lat["p50"]
                out["concurrent"][f"walcrypt_{threads}t_p99_us"] = lat["p99"]
            group = (c.get("extra") or {}).get("mean_group")
            if group is not None:
                out["concurrent"][f"{tag}_{threads}t_mean_group"] = group
    return out


_NO_SAVE = "python -m benchmarks --no-save --only "


def _append_cmd(batch: int, baseline: str) -> str:
    return _NO_SAVE + f"append walcrypt-encrypted {baseline} entry=1k/batch={batch}/sync=on/"


#: (label, "section.key", op, target, gate, command) -- RESULTS.md lists each with its median,
#: min and max over the repetitions, and PASS/MISS on the gate statistic.  The command reruns
#: the cases the goal is computed from (full sizes; add --quick for the reduced ones).
GOALS: List[Tuple[str, str, str, float, str, str]] = [
    ("encrypted vs plaintext append, 1 KiB x 64, sync", "ratios.encrypted_vs_plain_append_1k_b64", ">=", 0.95,
     "median", _NO_SAVE + "append walcrypt entry=1k/batch=64/sync=on/"),
    ("vs raw pwrite + fdatasync into a preallocated file (the disk's floor), 1 KiB x 1",
     "ratios.vs_raw_prealloc_append_1k_b1", ">=", 0.85, "median", _append_cmd(1, "raw-prealloc")),
    ("vs raw pwrite + fdatasync into a preallocated file (the disk's floor), 1 KiB x 64",
     "ratios.vs_raw_prealloc_append_1k_b64", ">=", 0.80, "median", _append_cmd(64, "raw-prealloc")),
    ("vs raw O_APPEND write + fdatasync (the file grows), 1 KiB x 1", "ratios.vs_raw_limit_append_1k_b1", ">=",
     0.85, "median", _append_cmd(1, "raw")),
    ("vs raw O_APPEND write + fdatasync (the file grows), 1 KiB x 64", "ratios.vs_raw_limit_append_1k_b64", ">=",
     0.70, "median", _append_cmd(64, "raw")),
    ("vs encrypted LMDB, 1 KiB x 1", "ratios.vs_lmdb_append_1k_b1", ">=", 1.5, "median", _append_cmd(1, "lmdb")),
    ("vs encrypted LMDB, 1 KiB x 64", "ratios.vs_lmdb_append_1k_b64", ">=", 1.5, "median", _append_cmd(64, "lmdb")),
    ("vs encrypted SQLite (WAL, FULL), 1 KiB x 64", "ratios.vs_sqlite_append_1k_b64", ">=", 1.5, "median",
     _append_cmd(64, "sqlite")),
    ("replay vs LMDB scan, 1 KiB, in every repetition", "ratios.replay_vs_lmdb_scan_1k", ">=", 1.0, "min",
     _NO_SAVE + "replay walcrypt-encrypted lmdb cipher"),
    ("16 threads of single saves vs raw group commit (same threads)", "ratios.concurrent_vs_raw_group_16t", ">=",
     0.8, "median", _NO_SAVE + "concurrent threads=16/"),
    ("16 threads of single saves vs encrypted LMDB (same threads)", "ratios.concurrent_vs_lmdb_16t", ">=", 2.0,
     "median", _NO_SAVE + "concurrent threads=16/"),
    ("16 threads of single saves vs encrypted SQLite (same threads)", "ratios.concurrent_vs_sqlite_16t", ">=", 2.0,
     "median", _NO_SAVE + "concurrent threads=16/"),
    ("crash-recovery open of a full 64 MiB unsealed segment: read + decrypt time / open time",
     "open.crash_vs_read_decrypt", ">=", 0.5, "median", _NO_SAVE + "open segments=crashed-full/"),
    ("encrypted snapshot write + fsync vs raw", "ratios.snapshot_encrypted_vs_raw_write", ">=", 0.80, "median",
     _NO_SAVE + "snapshot walcrypt-encrypted raw op=write/"),
    ("resident bytes per indexed entry at 1M entries", "memory.bytes_per_entry_1m", "<=", 40.0, "median",
     _NO_SAVE + "memory metric=bytes-per-entry/"),
    ("3-node cluster vs pysyncobj FileJournal", "ratios.cluster_vs_filejournal", ">=", 0.5, "median",
     _NO_SAVE + "cluster walcrypt-encrypted pysyncobj"),
    ("3-node cluster vs naive durable journal", "ratios.cluster_vs_naive_durable", ">=", 5.0, "median",
     _NO_SAVE + "cluster walcrypt-encrypted naive-durable"),
    ("snapshot write: peak memory growth (MiB)", "memory.snapshot_write_peak_growth_mib", "<=", 64.0, "max",
     _NO_SAVE + "memory op=snapshot-write/"),
    ("snapshot read: peak memory growth (MiB)", "memory.snapshot_read_peak_growth_mib", "<=", 64.0, "max",
     _NO_SAVE + "memory op=snapshot-read/"),
]


def lookup(results: Dict, path: str) -> Optional[float]:
    section, _, key = path.partition(".")
    v = (results.get(section) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def evaluate(results: Dict) -> List[Dict[str, object]]:
    """Each goal with its median, min and max over the repetitions, the gate statistic it is
    checked on (``value``) and "PASS", "MISS" or "not measured".  Without per-repetition
    statistics (older results) the stored figure is the value."""
    rows = []
    all_stats = results.get("stats") or {}
    for label, path, op, target, gate, command in GOALS:
        st = all_stats.get(path) or {}
        v = st.get(gate)
        if v is None and not st.get("n"):
            v = lookup(results, path)
        if v is None:
            status = "not measured"
        else:
            v = float(v)
            status = "PASS" if (v >= target if op == ">=" else v <= target) else "MISS"
        rows.append({"goal": label, "key": path, "op": op, "target": target, "gate": gate, "value": v,
                     "median": st.get("median", lookup(results, path)), "min": st.get("min"),
                     "max": st.get("max"), "reps": st.get("n"), "status": status, "command": command})
    return rows


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def goal_line(g: Dict) -> str:
    """One goal as a line of the console summary."""
    gate = "" if g["gate"] == "median" else f"{g['gate']} "
    return (f"goal {g['status']:<12} {g['key']:<44} median {_num(g['median']):>8} min {_num(g['min']):>8} "
            f"max {_num(g['max']):>8}   {gate}{g['op']} {g['target']:g}")
