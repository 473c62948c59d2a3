"""Smoke test of the benchmark suite: every workload once, at a tiny size.

No timing is asserted -- only that every case runs (append/replay/read matrix
with both disk baselines, concurrent writers, snapshots, open time including the
crash-recovery open, rotation, memory subprocesses, the 3-node pysyncobj
cluster with all three journals) and that the results dict has the structure
the report and CI read.  A stand-in walcrypt module checks the walcrypt
adapter and the append/replay ratio keys independently of the engine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import struct
import sys
import threading
import types

import pytest

# benchmarks/ is not an installed package: import it from the repository root.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import baselines, common, concurrent, goals, journal, report, sources, workloads  # noqa: E402

MATRIX_RATIO_KEYS = {
    "encrypted_vs_plain_append_1k_b64",
    "vs_raw_prealloc_append_1k_b1",
    "vs_raw_prealloc_append_1k_b64",
    "vs_raw_limit_append_1k_b1",
    "vs_raw_limit_append_1k_b64",
    "vs_lmdb_append_1k_b1",
    "vs_lmdb_append_1k_b64",
    "vs_sqlite_append_1k_b64",
    "replay_vs_lmdb_scan_1k",
    "replay_vs_cipher_decrypt_1k",
}
CONCURRENT_RATIO_KEYS = {f"concurrent_vs_{b}_{t}t" for b in ("raw_group", "lmdb", "sqlite") for t in (1, 4, 16)}
RATIO_KEYS = MATRIX_RATIO_KEYS | CONCURRENT_RATIO_KEYS | {
    "snapshot_encrypted_vs_raw_write",
    "snapshot_encrypted_vs_raw_read",
    "cluster_vs_filejournal",
    "cluster_vs_naive_durable",
}
CASE_KEYS = {"median", "min", "max", "unit", "reps"}
TOP_KEYS = {"cases", "ratios", "memory", "latency", "open", "replay", "concurrent", "stats", "goals", "skipped",
            "errors", "machine", "mode", "reps", "date", "phase_seconds"}
UNITS = {"MiB/s", "ops/s", "s", "MiB", "B/entry"}


def _walcrypt_ready() -> bool:
    mod, reason = workloads.walcrypt_status()
    return reason is None


def _expected_baseline_cases() -> set:
    sz = workloads.TINY
    names = set()
    for ename, batch, sync in workloads.FULL_APPEND:
        on = "on" if sync else "off"
        for v in ("raw", "raw-prealloc", "lmdb", "sqlite"):
            names.add(f"append/entry={ename}/batch={batch}/sync={on}/v={v}")
        names.add(f"append/entry={ename}/batch={batch}/sync=na/v=cipher")
        if not sync:
            names.add(f"append/entry={ename}/batch={batch}/sync=off/v=pysyncobj")
    for v in ("lmdb", "sqlite", "raw", "pysyncobj", "cipher"):
        names.add(f"replay/entry=1k/v={v}")
    for t in (1, 4, 16):
        for v in ("raw-prealloc", "lmdb", "sqlite"):
            names.add(f"concurrent/threads={t}/entry=1k/v={v}")
    names.add(f"open/segment={sources.size_name(sz.crash_segment_bytes)}/segments=crashed-full/v=read-decrypt")
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
    # concurrent writers: every thread count, latency per save, the group size of the raw writer
    for t in (1, 4, 16):
        c = cases[f"concurrent/threads={t}/entry=1k/v=raw-prealloc"]
        assert c["entries"] == workloads.TINY.concurrent_entries // t * t
        assert c["latency_us"]["count"] == c["entries"]
        assert c["extra"]["threads"] == t and c["extra"]["mean_group"] >= 1
    assert res["replay"]["cipher_decrypt_mib_s"] > 0
    assert "latency_us" in cases[f"cluster/nodes=3/value=256/window={workloads.TINY.cluster_window}/v=pysyncobj"]
    # every goal is listed, measured or not
    assert [g["key"] for g in res["goals"]] == [g[1] for g in goals.GOALS]
    assert {g["status"] for g in res["goals"]} <= {"PASS", "MISS", "not measured"}
    for g in res["goals"]:
        assert {"median", "min", "max", "gate", "command"} <= set(g), g["key"]
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
    for kind in ("concurrent", "snapshot", "open", "rotation", "memory", "cluster"):
        assert any(n.startswith(kind + "/") and "/v=walcrypt-" in n for n in res["cases"]), kind
    assert {"sealed_vs_replay", "sealed_vs_unsealed_scan", "crash_vs_read_decrypt", "crashed_full_seconds"} \
        <= set(res["open"])
    assert "walcrypt_encrypted_mib_s" in res["replay"]
    for t in (1, 4, 16):
        c = res["cases"][f"concurrent/threads={t}/entry=1k/v=walcrypt-encrypted"]
        assert c["latency_us"]["count"] == c["entries"] and c["extra"]["gap_retries"] >= 0
        assert {f"walcrypt_{t}t_p50_us", f"walcrypt_{t}t_p99_us", f"walcrypt_{t}t_mean_group",
                f"raw_group_{t}t_mean_group"} <= set(res["concurrent"])
    # every ratio goal has its per-repetition statistics
    for g in res["goals"]:
        if g["key"] in res["stats"]:
            st = res["stats"][g["key"]]
            assert st["min"] <= st["median"] <= st["max"] and st["n"] >= 1, g["key"]
    assert {"bytes_per_entry", "snapshot_write_peak_growth_mib", "snapshot_read_peak_growth_mib"} <= set(res["memory"])
    assert res["memory"]["bytes_per_entry_store_entries"] == workloads.TINY.index_entries
    assert "bytes_per_entry_1m" not in res["memory"]           # only a real 1M-entry store sets it
    assert res["latency"]["rotation_seconds"] > 0


def test_report_outputs(tiny_results, tmp_path):
    res, _ = tiny_results
    md = report.render_markdown(res)
    for heading in ("## Goals", "## Profile-driven changes", "## Machine", "## Ratios and metrics", "## All cases",
                    "## Snapshots",
                    "## Open time", "## DEK rotation", "## Memory", "## 3-node pysyncobj cluster",
                    "## Concurrent writers"):
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


def test_goal_gates_on_per_repetition_statistics():
    """The replay goal must hold in every repetition: a median above the target with one
    repetition below it is a MISS; a median goal looks at the median only."""
    stats = {"ratios.replay_vs_lmdb_scan_1k": {"median": 1.2, "min": 0.97, "max": 1.4, "n": 5},
             "ratios.vs_raw_prealloc_append_1k_b1": {"median": 0.86, "min": 0.7, "max": 0.9, "n": 5}}
    res = {"ratios": {"replay_vs_lmdb_scan_1k": 1.2, "vs_raw_prealloc_append_1k_b1": 0.86}, "stats": stats}
    by_key = {g["key"]: g for g in goals.evaluate(res)}
    replay = by_key["ratios.replay_vs_lmdb_scan_1k"]
    assert (replay["gate"], replay["value"], replay["status"]) == ("min", 0.97, "MISS")
    assert (replay["median"], replay["min"], replay["max"]) == (1.2, 0.97, 1.4)
    floor = by_key["ratios.vs_raw_prealloc_append_1k_b1"]
    assert (floor["value"], floor["status"]) == (0.86, "PASS")
    md = report.render_markdown({"goals": goals.evaluate(res), "cases": {}})
    assert "| >= 1 (min) | 1.200 | 0.970 | 1.400 | **MISS** |" in md


def test_ratios_pair_repetitions():
    rate = {"unit": "MiB/s", "median": 4.0}
    a = dict(rate, samples=[2.0, 4.0, 9.0])
    b = dict(rate, samples=[1.0, 2.0, 3.0])
    assert goals.paired(a, b) == {"median": 2.0, "min": 2.0, "max": 3.0, "n": 3}
    # durations: the baseline's time over walcrypt's
    a = {"unit": "s", "median": 2.0, "samples": [2.0, 4.0]}
    b = {"unit": "s", "median": 1.0, "samples": [1.0, 1.0]}
    assert goals.paired(a, b) == {"median": 0.375, "min": 0.25, "max": 0.5, "n": 2}
    # a case that stopped early (an error) pairs its repetitions that ran
    assert goals.paired(dict(rate, samples=[3.0]), dict(rate, samples=[1.0, 5.0]))["n"] == 1
    # results without samples: the ratio of the medians, no min or max
    assert goals.paired({"unit": "MiB/s", "median": 3.0}, {"unit": "MiB/s", "median": 2.0}) == \
        {"median": 1.5, "min": None, "max": None, "n": 0}


def _goal_selector(command: str) -> workloads.Selector:
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "benchmarks"]
    parsed = __import__("benchmarks.__main__", fromlist=["build_parser"]).build_parser().parse_args(args[3:])
    assert parsed.no_save
    return workloads.Selector(parsed.only)


def test_goal_commands_select_their_cases():
    """Each goal's command reruns (at least) the two cases of its ratio, with the full sizes'
    names, and the two cases are in one interleaved group (their repetitions pair up)."""
    sz = workloads.FULL
    defs = goals.ratio_defs(sz)
    everything = workloads.build_all(sz, workloads.FULL_APPEND, None, workloads.Selector())
    group_of = {}
    for k, group in enumerate(everything[0] + [everything[1]] + everything[2]):
        for c in group:
            group_of[c.name] = k
    for label, path, _op, _target, _gate, command in goals.GOALS:
        sel = _goal_selector(command)
        groups, mem, cl = workloads.build_all(sz, workloads.FULL_APPEND, None, sel)
        names = {c.name for g in groups + [mem] + cl for c in g}
        section, _, key = path.partition(".")
        ratio = defs.get(key) or defs.get(path)
        if ratio:
            assert set(ratio) <= names, (label, command)
            assert group_of[ratio[0]] == group_of[ratio[1]], label
        else:
            assert names and all(n.startswith(section + "/") for n in names), (label, command)


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
    j = journal.NaiveDurableJournal(path)
    for i in range(1, 6):
        j.add(b"cmd%d" % i, i, 1)
    j.setCurrentTerm(3, "node-b")
    j.deleteEntriesFrom(3)                      # positions, not indexes: keeps 1..3
    j.add(b"new4", 4, 2)
    j._destroy()
    j = journal.NaiveDurableJournal(path)
    assert [j[k] for k in range(len(j))] == [(b"cmd1", 1, 1), (b"cmd2", 2, 1), (b"cmd3", 3, 1), (b"new4", 4, 2)]
    assert (j.getCurrentTerm(), j.getVotedForNodeId()) == (3, "node-b")
    j.deleteEntriesTo(2)                        # compaction rewrites the file
    j._destroy()
    j = journal.NaiveDurableJournal(path)
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
        only=["append", "replay", "read", "walcrypt", "raw", "lmdb", "sqlite", "cipher"],
    )
    assert not res["errors"], res["errors"]
    assert res["walcrypt_available"]
    assert set(res["ratios"]) == MATRIX_RATIO_KEYS
    for name in ("append/entry=1k/batch=64/sync=on/v=walcrypt-encrypted",
                 "replay/entry=1k/v=walcrypt-plain",
                 "read/entry=1k/pattern=random/v=walcrypt-encrypted"):
        _check_case(name, res["cases"][name])


# --- the new baselines, on their own -------------------------------------------------


def test_raw_prealloc_never_grows_the_file_in_the_steady_state(tmp_path):
    store = baselines.make("raw-prealloc", sync=False)
    store.CHUNK = 1 << 16
    store.open(str(tmp_path))
    size0 = os.path.getsize(store.path)
    assert size0 == 1 << 16
    batches = common.make_batches(200, 400, 8)
    sizes = set()
    for b in batches[:12]:                         # 96 records of 420 bytes: within the first chunk
        store.append_batch(b)
        sizes.add(os.path.getsize(store.path))
    assert sizes == {size0}
    for b in batches[12:]:
        store.append_batch(b)
    assert os.path.getsize(store.path) == 2 << 16  # the next chunk, reserved when the first was full
    store.close()
    store = baselines.make("raw-prealloc", sync=False)
    store.open(str(tmp_path))                      # the end is found before the preallocated zeros
    assert store.scan() == 200 and store.get(200) == batches[-1][-1][2]
    assert store.end == 200 * (20 + 400)
    store.close()


def test_raw_group_commit_writer_keeps_index_order(tmp_path):
    w = concurrent.RawGroupWriters()
    w.open(str(tmp_path))
    threads = [threading.Thread(target=lambda t=t: [w.append_one(b"%02d" % t * 8) for _ in range(25)])
               for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert w.last() == 200 and 1 <= w.syncs <= 200
    path = w.file.path
    w.close()
    with open(path, "rb") as f:
        buf = f.read()
    hdr = struct.Struct("<IQQ")
    pos, seen = 0, []
    while True:
        length, index, _term = hdr.unpack_from(buf, pos)
        if index == 0:
            break
        seen.append(index)
        pos += hdr.size + length
    assert seen == list(range(1, 201))


def test_walcrypt_writers_resubmit_a_save_refused_as_a_gap():
    """A save that overtook its predecessor's is refused alone (nothing written) and resubmitted."""
    class UsageError(Exception):
        pass

    class Store:
        def __init__(self):
            self.log, self.refused = [], 0

        def save(self, entries):
            (e,) = entries
            if e.index != len(self.log) + 1:
                raise UsageError(f"entries start at index {e.index}: a gap is not allowed")
            if e.index == 2 and not self.refused:       # as if entry 3's save had come first
                self.refused += 1
                raise UsageError("entries start at index 3 but the log ends at 1; a gap is not allowed")
            self.log.append(e)

    w = concurrent.WalcryptWriters()
    w.store, w._entry, w._usage_error = Store(), common_entry, UsageError
    w._seq, w._next, w.retries = threading.Lock(), 1, 0
    for _ in range(3):
        w.append_one(b"x")
    assert [e.index for e in w.store.log] == [1, 2, 3] and w.retries == 1
    w.store.save = lambda entries: (_ for _ in ()).throw(UsageError("entry too large"))
    with pytest.raises(UsageError):
        w.append_one(b"y")                              # any other refusal is an error


@dataclasses.dataclass(frozen=True)
class common_entry:  # noqa: N801 - stands in for walcrypt.Entry
    index: int
    term: int
    data: bytes


def test_ab_times_two_checkouts_in_subprocesses(capsys):
    """benchmarks.ab runs each side in a fresh process with that side's walcrypt (here the same
    checkout twice) and reports both sides and their ratio."""
    from benchmarks import ab

    assert ab.main(["append-1k-b1", "--before", ab.HERE, "--entries", "40", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "before  median" in out and "after   median" in out and "after/before per repetition" in out


def test_profiling_phases_reports_where_a_save_spends_its_time(capsys):
    from benchmarks import profiling

    assert profiling.main(["--phases", "append-1k-b1", "--sync", "always", "--entries", "30"]) == 0
    out = capsys.readouterr().out
    for row in ("before the pwrite", "pwrite", "fdatasync", "after the fdatasync"):
        assert row in out, out
    assert float(out.split("fdatasync")[1].split()[0]) > 0        # the sync was timed
