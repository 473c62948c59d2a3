"""The corrupted-segment corpus (tests/corpus/): every case gives the outcome MANIFEST.json states.

Table-driven like raft-wal's TestRecovery: each case names a small real store, the file of it that
the case replaces (or deletes), and the expected outcome derived from formats/FORMAT.md by
tests/corpus/make_corpus.py.  A store case copies the base store, puts the damaged file in place,
opens it read-write with the real VFS and reads everything; an export case inspects the file.

Also checked: the corpus is small, and make_corpus.py regenerates it byte for byte.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest

import walcrypt
from walcrypt import HardState
from walcrypt.backup import inspect_export

import wctest

CORPUS = os.path.join(wctest.TESTS_DIR, "corpus")
SCRIPT = os.path.join(CORPUS, "make_corpus.py")

with open(os.path.join(CORPUS, "MANIFEST.json"), encoding="utf-8") as _f:
    MANIFEST = json.load(_f)
CASES = MANIFEST["cases"]
KEK = walcrypt.RawKey(bytes.fromhex(MANIFEST["kek"]))
ERRORS = {name: getattr(walcrypt, name) for name in
          ("CorruptionError", "AuthenticationError", "UnsupportedFormatError", "StorageError")}


def _snap_data(index: int) -> bytes:
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.snap_data(index)


def _place(case: dict, root: str) -> str:
    base = MANIFEST["stores"][case["base"]]
    shutil.copytree(os.path.join(CORPUS, base["dir"]), root)
    target = os.path.join(root, case["target"])
    if case["file"] is None:
        os.unlink(target)
    else:
        shutil.copyfile(os.path.join(CORPUS, case["file"]), target)
    return target


def _open(case: dict, root: str):
    enc = MANIFEST["stores"][case["base"]]["encrypted"]
    return walcrypt.open(root, kek=KEK if enc else None, encrypted=enc, segment_size=4096)


def _run_store_case(case: dict, root: str):
    """Open and read everything; -> ('opens', facts) or ('error', exception, 'open'|'read')."""
    try:
        s = _open(case, root)
    except walcrypt.WalcryptError as exc:
        return "error", exc, "open"
    try:
        try:
            ents, hs = wctest.read_everything(s)
        except walcrypt.WalcryptError as exc:
            return "error", exc, "read"
        snap = s.snapshot()
        facts = {"entries": ents, "hs": hs, "first": s.first_index(), "last": s.last_index(),
                 "repairs": list(s.repairs), "snapshot": snap}
        if snap is not None:
            facts["snapshot_data_ok"] = snap.data == _snap_data(snap.meta.index)
        # the store works after recovery: one more save survives a reopen
        nxt = s.last_index() + 1
        s.save(hard_state=HardState(9, 9, nxt), entries=[walcrypt.Entry(nxt, 9, b"after-the-corpus-case")])
    finally:
        s.close()
    with _open(case, root) as s2:
        assert s2.last_index() == facts["last"] + 1
        assert s2.entries(facts["last"] + 1, facts["last"] + 2)[0].data == b"after-the-corpus-case"
    return "opens", facts


STORE_CASES = [c for c in CASES if c["kind"] == "store"]
EXPORT_CASES = [c for c in CASES if c["kind"] == "export"]


@pytest.mark.parametrize("case", STORE_CASES, ids=[c["name"] for c in STORE_CASES])
def test_store_case(case, tmp_path):
    root = str(tmp_path / "data")
    target = _place(case, root)
    exp = case["expect"]
    before = wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))
    got = _run_store_case(case, root)
    if exp["outcome"] == "opens":
        assert got[0] == "opens", f"{case['name']}: expected to open, got {got[1]!r} ({case['note']})"
        facts = got[1]
        n = exp["last_index"]
        assert facts["first"] == exp["first_index"] and facts["last"] == n, case["name"]
        assert facts["entries"] == wctest.make_entries(exp["first_index"], n + 1, length=24), case["name"]
        assert list(facts["hs"]) == exp["hard_state"], case["name"]
        seg_repairs = [r for r in facts["repairs"] if r.get("kind") != "snapshot"]
        assert bool(seg_repairs) == exp["repaired"], f"{case['name']}: repairs {facts['repairs']}"
        assert os.path.exists(target + ".broken") == (exp["repaired"] or exp.get("snapshot_quarantined", False))
        if "snapshot_index" in exp:
            assert facts["snapshot"] is not None and facts["snapshot"].meta.index == exp["snapshot_index"]
            assert facts["snapshot_data_ok"]
            assert any(r.get("kind") == "snapshot" for r in facts["repairs"]) == exp["snapshot_quarantined"]
    else:
        assert got[0] == "error", f"{case['name']}: expected {exp['error']}, the store opened ({case['note']})"
        exc, when = got[1], got[2]
        assert type(exc) is ERRORS[exp["error"]], f"{case['name']}: {type(exc).__name__}: {exc}"
        assert when == exp["when"], f"{case['name']}: raised at {when}: {exc}"
        if exp["path"] is not None:
            assert os.path.abspath(exc.path) == os.path.abspath(os.path.join(root, exp["path"])), str(exc)
            assert os.path.basename(exc.path) in str(exc)
        if exp.get("offset") is not None:
            assert exc.offset == exp["offset"], f"{case['name']}: {exc}"
        # an error found at open is never 'repaired' away: the files are left as they were found
        # (damage found by a later read leaves the recovery of the open segment in place)
        if when == "open":
            assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before, case["name"]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c["name"] for c in EXPORT_CASES])
def test_export_case(case, tmp_path):
    path = os.path.join(CORPUS, case["file"])
    exp = case["expect"]
    kek = None if exp.get("kek_embedded") else KEK
    if exp["outcome"] == "inspects":
        info = inspect_export(path, kek)
        assert info["verified"] and info["index"] == exp["index"] and info["term"] == exp["term"]
        assert info["data_bytes"] == exp["data_bytes"]
        assert info["kek_embedded"] == exp.get("kek_embedded", False)
        assert bool(info["warnings"]) == exp.get("kek_embedded", False)
    else:
        with pytest.raises(walcrypt.StorageError) as err:
            inspect_export(path, kek)
        assert type(err.value) is ERRORS[exp["error"]], f"{case['name']}: {err.value!r}"


def test_every_corruption_kind_is_in_the_corpus():
    names = {c["name"] for c in CASES}
    for prefix in ("header-", "frame-", "truncated-", "last-unit-", "garbage-", "records-swapped",
                   "record-duplicated", "segment-from-another-store", "stale-", "snapshot-", "export-",
                   "sealed-", "plain-", "rollback-"):
        assert any(n.startswith(prefix) for n in names), prefix
    # every header field and every frame field, flipped with and without the CRC fixed
    for field in wctest.HEADER_FIELDS:
        assert f"header-{field}-flip" in names
    for field in list(wctest.FRAME_FIELDS) + ["payload", "tag"]:
        assert f"frame-{field}-flip" in names
        assert field == "crc" or f"frame-{field}-flip+crc" in names


def test_corpus_is_small():
    total = sum(os.path.getsize(p) for p in wctest.all_files(CORPUS) if "__pycache__" not in p)
    assert total < 2 * 1024 * 1024, f"the committed corpus is {total} bytes"


def test_make_corpus_is_deterministic(tmp_path):
    out = str(tmp_path / "corpus")
    os.makedirs(out)
    res = subprocess.run([sys.executable, SCRIPT, out], capture_output=True, text=True, timeout=300,
                         env={**wctest.child_env()})
    assert res.returncode == 0, res.stderr[-3000:]
    for rel in ["MANIFEST.json"] + [os.path.relpath(p, out) for p in wctest.all_files(out)]:
        assert filecmp.cmp(os.path.join(out, rel), os.path.join(CORPUS, rel), shallow=False), \
            f"{rel} differs from the committed corpus: run 'python tests/corpus/make_corpus.py' and commit it"
    committed = {os.path.relpath(p, CORPUS) for p in wctest.all_files(CORPUS)
                 if "__pycache__" not in p and not p.endswith(".py")}
    generated = {os.path.relpath(p, out) for p in wctest.all_files(out)}
    assert committed == generated
