"""Smoke test of the benchmark suite: every workload once, at a tiny size.

No timing is asserted -- only that every case runs (append/replay/read matrix,
snapshots, open time, rotation, memory subprocesses, the 3-node pysyncobj
cluster with all three journals) and that the results dict has the structure
the report and CI read.  A stand-in walcrypt module checks the walcrypt
adapter and the append/replay ratio keys independently of the engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types

import pytest

# benchmarks/ is not an installed package: import it from the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import baselines, goals, report, sources, workloads  # noqa: E402

MATRIX_RATIO_KEYS = {
    "encrypted_vs_plain_append_1k_b64",
    "vs_raw_limit_append_1k_b1",
    "vs_raw_limit_append_1k_b64",
    "vs_lmdb_append_1k_b1",
    "vs_lmdb_append_1k_b64",
    "vs_sqlite_append_1k_b64",
    "replay_vs_lmdb_scan_1k",
}
RATIO_KEYS = MATRIX_RATIO_KEYS | {
    "snapshot_encrypted_vs_raw_write",
    "snapshot_encrypted_vs_raw_read",
    "cluster_vs_filejournal",
    "cluster_vs_naive_durable",
}
CASE_KEYS = {"median", "min", "max", "unit", "reps"}
TOP_KEYS = {"cases", "ratios", "memory", "latency", "open", "goals", "skipped", "errors", "machine",
            "mode", "reps", "date", "phase_seconds"}
UNITS = {"MiB/s", "ops/s", "s", "MiB", "B/entry"}


def _walcrypt_ready() -> bool:
    mod, reason = workloads.walcrypt_status()
    return reason is None


def _expected_baseline_cases() -> set:
    sz = workloads.TINY
    names = set()
    for ename, batch, sync in workloads.FULL_APPEND:
        on = "on" if sync else "off"
        for v in ("raw", "lmdb", "sqlite"):
            names.add(f"append/entry={ename}/batch={batch}/sync={on}/v={v}")
        names.add(f"append/entry={ename}/batch={batch}/sync=na/v=cipher")
        if not sync:
            names.add(f"append/entry={ename}/batch={batch}/sync=off/v=pysyncobj")
    for v in ("lmdb", "sqlite", "raw", "pysyncobj"):
        names.add(f"replay/entry=1k/v={v}")
    for v in ("lmdb", "sqlite", "raw"):
        names.add(f"read/entry=1k/pattern=random/v={v}")
    snap = sources.size_name(sz.snapshot_bytes)
    names |= {f"snapshot/op=write/size={snap}/v=raw", f"snapshot/op=read/size={snap}/v=raw",
              f"rotation/state={sources.size_name(sz.rotation_state_bytes)}/v=raw"}
    for v in ("pysyncobj", "naive-durable"):
        names.add(f"cluster/nodes=3/value=256/window={sz.cluster_window}/v={v}")
    return names


def _check_case(name: str, case: dict) -> None:
    assert CASE_KEYS <= set(case), name
    assert case["unit"] in UNITS, name
    assert case["reps"] >= 1, name
    assert case["min"] <= case["median"] <= case["max"], name
    if case["unit"] in ("MiB", "B/entry"):
        # a quantity from RSS: at tiny sizes page-granular noise may even make it negative
        assert case["median"] == case["median"], name      # not NaN
    else:
        assert case["median"] > 0, name


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = workloads.run_all(tiny=True, out_dir=str(out))
    return res, out


def test_tiny_run_structure(tiny_results):
    res, out = tiny_results
    assert TOP_KEYS <= set(res)
    assert res["mode"] == "tiny"
    assert not res["errors"], res["errors"]
    cases = res["cases"]
    missing = _expected_baseline_cases() - set(cases)
    assert not missing, sorted(missing)
    for name, case in cases.items():
        _check_case(name, case)
        assert name.split("/", 1)[0] in workloads.KINDS
        assert name.rsplit("/v=", 1)[1] == case["variant"]
    # pysyncobj cannot sync: its sync=on cases are reported as skipped, not measured.
    assert "append/entry=1k/batch=1/sync=on/v=pysyncobj" in res["skipped"]
    assert set(res["ratios"]) <= RATIO_KEYS
    assert all(isinstance(v, float) for v in res["ratios"].values())
    # appends and cluster commands carry latency percentiles
    lat = cases["append/entry=1k/batch=1/sync=on/v=raw"]["latency_us"]
    assert lat["p50"] <= lat["p99"] <= lat["max"]
    assert "latency_us" in cases[f"cluster/nodes=3/value=256/window={workloads.TINY.cluster_window}/v=pysyncobj"]
    # every goal is listed, measured or not
    assert [g["key"] for g in res["goals"]] == [g[1] for g in goals.GOALS]
    assert {g["status"] for g in res["goals"]} <= {"PASS", "MISS", "not measured"}
    # the temporary data directory is removed
    assert os.listdir(out) == []
    json.dumps(res)  # serialisable as is


def test_walcrypt_cases_skipped_or_measured(tiny_results):
    res, _ = tiny_results
    wc_names = [n for n in list(res["cases"]) + list(res["skipped"]) if "/v=walcrypt-" in n]
    assert wc_names, "walcrypt cases must be listed (measured or skipped)"
    if not _walcrypt_ready():
        assert not res["walcrypt_available"]
        assert all(n in res["skipped"] for n in wc_names)
        assert not any("/v=walcrypt-" in n for n in res["cases"])
        return
    assert set(res["ratios"]) == RATIO_KEYS
    assert not [n for n in res["skipped"] if "/v=walcrypt-" in n]
    for kind in ("snapshot", "open", "rotation", "memory", "cluster"):
        assert any(n.startswith(kind + "/") and "/v=walcrypt-" in n for n in res["cases"]), kind
    assert {"sealed_vs_replay", "sealed_vs_unsealed_scan"} <= set(res["open"])
    assert {"bytes_per_entry", "snapshot_write_peak_growth_mib", "snapshot_read_peak_growth_mib"} <= set(res["memory"])
    assert res["memory"]["bytes_per_entry_store_entries"] == workloads.TINY.index_entries
    assert "bytes_per_entry_1m" not in res["memory"]           # only a real 1M-entry store sets it
    assert res["latency"]["rotation_seconds"] > 0


def test_report_outputs(tiny_results, tmp_path):
    res, _ = tiny_results
    md = report.render_markdown(res)
    for heading in ("## Goals", "## Machine", "## Ratios and metrics", "## All cases", "## Snapshots",
                    "## Open time", "## DEK rotation", "## Memory", "## 3-node pysyncobj cluster"):
        assert heading in md, heading
    p = report.write_json(res, tmp_path / "r.json")
    assert json.loads(p.read_text())["cases"].keys() == res["cases"].keys()
    pytest.importorskip("matplotlib")
    chart = report.write_chart(res, tmp_path / "chart.png")
    assert chart is not None and chart.stat().st_size > 0


def test_result_file_names():
    base = {"date": "2026-01-02", "only": []}
    assert report.json_name({**base, "mode": "full"}) == "2026-01-02.json"
    assert report.json_name({**base, "mode": "quick"}) == "2026-01-02-quick.json"
    assert report.json_name({**base, "mode": "full", "only": ["raw"]}) == "2026-01-02-partial.json"
    assert report.chart_name({**base, "mode": "full"}) == "chart.png"
    assert report.chart_name({**base, "mode": "quick"}) == "chart-quick.png"


def test_goal_evaluation():
    res = {"ratios": {"vs_raw_limit_append_1k_b1": 0.9, "vs_lmdb_append_1k_b1": 1.2},
           "memory": {"bytes_per_entry_1m": 41.0}}
    by_key = {g["key"]: g for g in goals.evaluate(res)}
    assert by_key["ratios.vs_raw_limit_append_1k_b1"]["status"] == "PASS"
    assert by_key["ratios.vs_lmdb_append_1k_b1"]["status"] == "MISS"
    assert by_key["memory.bytes_per_entry_1m"]["status"] == "MISS"
    assert by_key["ratios.cluster_vs_filejournal"]["status"] == "not measured"


def test_duration_ratios_are_oriented_higher_is_better():
    sz = workloads.TINY
    defs = goals.ratio_defs(sz)
    sealed, replay = defs["open.sealed_vs_replay"]
    cases = {sealed: {"median": 0.01, "unit": "s"}, replay: {"median": 0.5, "unit": "s"}}
    assert goals.compute_metrics(cases, sz)["open"]["sealed_vs_replay"] == pytest.approx(50.0)


def test_selector():
    sel = workloads.Selector(["raw", "lmdb"])
    assert sel("append/entry=1k/batch=1/sync=on/v=raw", "append", "raw")
    assert not sel("append/entry=1k/batch=1/sync=on/v=sqlite", "append", "sqlite")
    sel = workloads.Selector(["walcrypt", "replay"])
    assert sel("replay/entry=1k/v=walcrypt-plain", "replay", "walcrypt-plain")
    assert not sel("append/entry=1k/batch=1/sync=on/v=walcrypt-plain", "append", "walcrypt-plain")
    sel = workloads.Selector(["cluster", "naive"])
    assert sel("cluster/nodes=3/value=256/window=10/v=naive-durable", "cluster", "naive-durable")
    with pytest.raises(ValueError):
        workloads.Selector(["no-such-thing"])


def test_pattern_stream_and_sizes():
    s = sources.PatternStream(3 * (1 << 20) + 5, seed=9)
    blocks = [s.read(1 << 20) for _ in range(4)]
    assert [len(b) for b in blocks] == [1 << 20, 1 << 20, 1 << 20, 5]
    assert blocks[0] == blocks[1] and blocks[3] == blocks[0][:5] and s.read(10) == b""
    assert [sources.size_name(n) for n in (1 << 30, 256 << 20, 1_000_000, 50_000, 64)] == \
        ["1g", "256m", "1m", "50k", "64"]


def test_naive_durable_journal_round_trip(tmp_path):
    pytest.importorskip("pysyncobj")
    path = str(tmp_path / "j")
    j = baselines.NaiveDurableJournal(path)
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    j.setCurrentTerm(3, "node-b")
    j.deleteEntriesFrom(3)                      # positions, not indexes: keeps 1..3
    j.add(b"new4", 4, 2)
    j._destroy()
    j = baselines.NaiveDurableJournal(path)
    assert [j[k] for k in range(len(j))] == [(b"cmd1", 1, 1), (b"cmd2", 2, 1), (b"cmd3", 3, 1), (b"new4", 4, 2)]
    assert (j.getCurrentTerm(), j.getVotedForNodeId()) == (3, "node-b")
    j.deleteEntriesTo(2)                        # compaction rewrites the file
    j._destroy()
    j = baselines.NaiveDurableJournal(path)
    assert [j[k][1] for k in range(len(j))] == [3, 4]
    with open(path, "rb") as f:
        assert b"cmd3" not in f.read()          # encrypted on disk
    j._destroy()


# --- a stand-in walcrypt, to exercise the adapter and the ratio keys ---------------


def _fake_walcrypt() -> types.ModuleType:
    mod = types.ModuleType("walcrypt")
    stores: dict = {}

    @dataclasses.dataclass(frozen=True)
    class Entry:
        index: int
        term: int
        data: bytes

    class RawKey:
        def __init__(self, key: bytes):
            assert len(key) == 32
            self.key = key

    class Store:
        def __init__(self, path):
            self.log = stores.setdefault(path, [])

        def save(self, entries):
            for e in entries:
                assert isinstance(e, Entry)
                assert e.index == len(self.log) + 1
                self.log.append(e)

        def entries(self, lo, hi):
            return self.log[lo - 1 : hi - 1]

        def iter_entries(self, lo, hi):
            return ((e.index, e.term, e.data) for e in self.log[lo - 1 : hi - 1])

        def first_index(self):
            return 1

        def last_index(self):
            return len(self.log)

        def close(self):
            pass

    def open(path, kek=None, encrypted=True, sync="always"):
        assert sync in ("always", "none")
        assert (kek is not None) == encrypted
        os.makedirs(path, exist_ok=True)
        return Store(path)

    mod.Entry, mod.RawKey, mod.open = Entry, RawKey, open
    return mod


def test_walcrypt_adapter_and_ratios_with_stand_in(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "walcrypt", _fake_walcrypt())
    res = workloads.run_all(
        tiny=True, quick=True, out_dir=str(tmp_path),
        only=["append", "replay", "read", "walcrypt", "raw", "lmdb", "sqlite"],
    )
    assert not res["errors"], res["errors"]
    assert res["walcrypt_available"]
    assert set(res["ratios"]) == MATRIX_RATIO_KEYS
    for name in ("append/entry=1k/batch=64/sync=on/v=walcrypt-encrypted",
                 "replay/entry=1k/v=walcrypt-plain",
                 "read/entry=1k/pattern=random/v=walcrypt-encrypted"):
        _check_case(name, res["cases"][name])
