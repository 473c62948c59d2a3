"""From measured cases to the figures of the JSON (``ratios``, ``memory``, ``latency``,
``open``) and the goals checked in RESULTS.md.

A ratio is walcrypt's figure over the baseline's, oriented so that higher is
better: median throughput / median throughput for rates; for durations
(unit ``s``) it is the baseline's median time over walcrypt's (so 10 means
walcrypt takes a tenth of the time).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .common import RATIO_DEFS, Sizing
from .sources import size_name

E = "walcrypt-encrypted"


def ratio_defs(sz: Sizing) -> Dict[str, Tuple[str, str]]:
    """Every ratio key -> (walcrypt case, baseline case), with this sizing's case names."""
    snap = size_name(sz.snapshot_bytes)
    opn = size_name(sz.open_entries)
    window = sz.cluster_window
    defs = dict(RATIO_DEFS)
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
    })
    return defs


def _ratio(a: Optional[Dict], b: Optional[Dict]) -> Optional[float]:
    if not a or not b or not a["median"] or not b["median"]:
        return None
    if a.get("unit") == "s":
        return float(b["median"]) / float(a["median"])
    return float(a["median"]) / float(b["median"])


def compute_metrics(cases: Dict[str, Dict], sz: Sizing) -> Dict[str, Dict[str, float]]:
    """{"ratios": {...}, "memory": {...}, "latency": {...}, "open": {...}} from the case summaries."""
    out: Dict[str, Dict[str, float]] = {"ratios": {}, "memory": {}, "latency": {}, "open": {}}
    for key, (num, den) in ratio_defs(sz).items():
        r = _ratio(cases.get(num), cases.get(den))
        if r is None:
            continue
        section, _, name = key.rpartition(".")
        out[section or "ratios"][name] = r

    def find(prefix: str) -> Optional[Dict]:
        return next((c for n, c in cases.items() if n.startswith(prefix)), None)

    bpe = find("memory/metric=bytes-per-entry/")
    if bpe:
        # the goal's key only when the store really held 1M entries (not in tiny runs)
        if bpe["params"].get("entries") == 1_000_000:
            out["memory"]["bytes_per_entry_1m"] = bpe["median"]
        out["memory"]["bytes_per_entry"] = bpe["median"]
        out["memory"]["bytes_per_entry_store_entries"] = bpe["params"]["entries"]
        out["memory"]["bytes_per_entry_store_batch"] = bpe["params"]["batch"]
    # memory peaks: the worst repetition (a peak is a bound, not a typical value)
    for op, key in (("snapshot-write", "snapshot_write_peak_growth_mib"),
                    ("snapshot-read", "snapshot_read_peak_growth_mib")):
        c = find(f"memory/metric=peak-growth/op={op}/")
        if c:
            out["memory"][key] = c["max"]
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
            out["open"][f"{c['params']['segments'].replace('+', '_').replace('-', '_')}_seconds"] = c["median"]
    for name, c in cases.items():
        lat = c.get("latency_us")
        if lat and name.startswith(("append/entry=1k/batch=1/sync=on/", "cluster/")) and c["variant"] == E:
            tag = "append_1k_b1" if name.startswith("append/") else "cluster_op"
            out["latency"][f"{tag}_p50_us"] = lat["p50"]
            out["latency"][f"{tag}_p99_us"] = lat["p99"]
    return out


#: (label, "section.key", op, target) -- RESULTS.md lists each with its value and PASS/MISS.
GOALS: List[Tuple[str, str, str, float]] = [
    ("encrypted vs plaintext append, 1 KiB x 64, sync", "ratios.encrypted_vs_plain_append_1k_b64", ">=", 0.90),
    ("vs raw write + fdatasync, 1 KiB x 1", "ratios.vs_raw_limit_append_1k_b1", ">=", 0.85),
    ("vs raw write + fdatasync, 1 KiB x 64", "ratios.vs_raw_limit_append_1k_b64", ">=", 0.70),
    ("vs encrypted LMDB, 1 KiB x 1", "ratios.vs_lmdb_append_1k_b1", ">=", 1.5),
    ("vs encrypted LMDB, 1 KiB x 64", "ratios.vs_lmdb_append_1k_b64", ">=", 1.5),
    ("vs encrypted SQLite (WAL, FULL), 1 KiB x 64", "ratios.vs_sqlite_append_1k_b64", ">=", 1.5),
    ("replay vs LMDB scan, 1 KiB", "ratios.replay_vs_lmdb_scan_1k", ">=", 1.0),
    ("encrypted snapshot write + fsync vs raw", "ratios.snapshot_encrypted_vs_raw_write", ">=", 0.80),
    ("resident bytes per indexed entry at 1M entries", "memory.bytes_per_entry_1m", "<=", 40.0),
    ("3-node cluster vs pysyncobj FileJournal", "ratios.cluster_vs_filejournal", ">=", 0.5),
    ("3-node cluster vs naive durable journal", "ratios.cluster_vs_naive_durable", ">=", 5.0),
    ("snapshot write: peak memory growth (MiB)", "memory.snapshot_write_peak_growth_mib", "<=", 64.0),
    ("snapshot read: peak memory growth (MiB)", "memory.snapshot_read_peak_growth_mib", "<=", 64.0),
]


def lookup(results: Dict, path: str) -> Optional[float]:
    section, _, key = path.partition(".")
    v = (results.get(section) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def evaluate(results: Dict) -> List[Dict[str, object]]:
    """Each goal with its measured value and "PASS", "MISS" or "not measured"."""
    rows = []
    for label, path, op, target in GOALS:
        v = lookup(results, path)
        if v is None:
            status = "not measured"
        else:
            status = "PASS" if (v >= target if op == ">=" else v <= target) else "MISS"
        rows.append({"goal": label, "key": path, "op": op, "target": target, "value": v, "status": status})
    return rows
