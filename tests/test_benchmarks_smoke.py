"""Smoke test of the benchmark suite: every workload once, on ~50 entries.

No timing is asserted -- only that every case runs and that the results dict
has the structure the report and CI read.  walcrypt cases are expected to be
skipped while ``walcrypt.open`` does not exist; a stand-in module checks the
walcrypt adapter and the ratio keys meanwhile.
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

from benchmarks import report, workloads  # noqa: E402

RATIO_KEYS = {
    "encrypted_vs_plain_append_1k_b64",
    "vs_raw_limit_append_1k_b1",
    "vs_raw_limit_append_1k_b64",
    "vs_lmdb_append_1k_b1",
    "vs_lmdb_append_1k_b64",
    "vs_sqlite_append_1k_b64",
    "replay_vs_lmdb_scan_1k",
}
CASE_KEYS = {"median", "min", "max", "unit", "reps"}
TOP_KEYS = {"cases", "ratios", "skipped", "errors", "machine", "mode", "reps", "date"}


def _walcrypt_ready() -> bool:
    mod, reason = workloads.walcrypt_status()
    return reason is None


def _expected_baseline_cases() -> set:
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
    return names


def _check_case(name: str, case: dict) -> None:
    assert CASE_KEYS <= set(case), name
    assert case["unit"] in ("MiB/s", "ops/s"), name
    assert case["reps"] >= 1, name
    assert case["min"] <= case["median"] <= case["max"], name
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
    # the temporary data directory is removed
    assert os.listdir(out) == []
    json.dumps(res)  # serialisable as is


def test_walcrypt_cases_skipped_or_measured(tiny_results):
    res, _ = tiny_results
    wc_names = [n for n in list(res["cases"]) + list(res["skipped"]) if "/v=walcrypt-" in n]
    assert wc_names, "walcrypt cases must be listed (measured or skipped)"
    if _walcrypt_ready():
        assert set(res["ratios"]) == RATIO_KEYS
        assert not [n for n in res["skipped"] if "/v=walcrypt-" in n]
    else:
        assert not res["walcrypt_available"]
        assert all(n in res["skipped"] for n in wc_names)
        assert not any("/v=walcrypt-" in n for n in res["cases"])


def test_report_outputs(tiny_results, tmp_path):
    res, _ = tiny_results
    md = report.render_markdown(res)
    assert "## Ratios" in md and "## All cases" in md
    p = report.write_json(res, tmp_path / "r.json")
    assert json.loads(p.read_text())["cases"].keys() == res["cases"].keys()
    pytest.importorskip("matplotlib")
    chart = report.write_chart(res, tmp_path / "chart.png")
    assert chart is not None and chart.stat().st_size > 0


def test_selector():
    sel = workloads.Selector(["raw", "lmdb"])
    assert sel("append/entry=1k/batch=1/sync=on/v=raw", "append", "raw")
    assert not sel("append/entry=1k/batch=1/sync=on/v=sqlite", "append", "sqlite")
    sel = workloads.Selector(["walcrypt", "replay"])
    assert sel("replay/entry=1k/v=walcrypt-plain", "replay", "walcrypt-plain")
    assert not sel("append/entry=1k/batch=1/sync=on/v=walcrypt-plain", "append", "walcrypt-plain")
    with pytest.raises(ValueError):
        workloads.Selector(["no-such-thing"])


# --- a stand-in walcrypt, to exercise the adapter and the ratio keys today -------


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
        tiny=True, quick=True, out_dir=str(tmp_path), only=["walcrypt", "raw", "lmdb", "sqlite"]
    )
    assert not res["errors"], res["errors"]
    assert res["walcrypt_available"]
    assert set(res["ratios"]) == RATIO_KEYS
    for name in ("append/entry=1k/batch=64/sync=on/v=walcrypt-encrypted",
                 "replay/entry=1k/v=walcrypt-plain",
                 "read/entry=1k/pattern=random/v=walcrypt-encrypted"):
        _check_case(name, res["cases"][name])
