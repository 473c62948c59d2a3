"""etcd v3 member directories into walcrypt and back (walcrypt.legacy.etcd), against the real thing.

Two sources of etcd data:

* ``tests/fixtures/etcd-member.tar.gz``: a member directory a real etcd 3.4.23 wrote (two WAL files
  of 64 MB, two snap files; the v3 database left out), plus ``keys.json`` (what ``etcdctl get``
  returned).  Regenerate it with ``python tests/etcd_server.py make-fixture
  tests/fixtures/etcd-member.tar.gz`` on a machine with Debian's etcd-server and etcd-client.
  These tests run everywhere.
* a real etcd (tests/etcd_server.py) started here on 127.0.0.1 with free ports; those tests skip,
  saying why, where etcd is not installed.

What etcd wrote is checked with a decoder written here from etcd's format facts (a few lines of
varint and CRC-32C), independent of walcrypt's reader: every entry's bytes, the hard state, the
snapshot's data and conf state.  The export is checked by the real etcd starting on it and
returning every key through ``etcdctl get``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile

import pytest
from crc32c import crc32c

import walcrypt
from walcrypt import CorruptionError, UsageError
from walcrypt.legacy import etcd as E
from walcrypt.legacy import etcdpb

import etcd_server
import wctest

TESTS = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(TESTS, "fixtures", "etcd-member.tar.gz")
needs_etcd = pytest.mark.skipif(not etcd_server.available(), reason=etcd_server.SKIP_REASON)


# ---------------------------------------------------------------------------------------------
# An independent decoder of what etcd wrote (facts: etcd v3.4 wal/decoder.go, snapshotter.go)
# ---------------------------------------------------------------------------------------------

def pb_fields(buf: bytes) -> dict[int, list]:
    """Protobuf wire format -> {field number: [values]} (varints as ints, length-delimited as bytes)."""
    out: dict[int, list] = {}
    i = 0

    def varint():
        nonlocal i
        shift = v = 0
        while True:
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7
    while i < len(buf):
        key = varint()
        num, wt = key >> 3, key & 7
        if wt == 0:
            val = varint()
        elif wt == 2:
            n = varint()
            val = buf[i:i + n]
            i += n
        elif wt == 5:
            val = struct.unpack_from("<I", buf, i)[0]
            i += 4
        else:
            raise AssertionError(f"wire type {wt}")
        out.setdefault(num, []).append(val)
    return out


def one(f: dict, n: int, default=0):
    return f.get(n, [default])[-1]


def frames(path: str):
    """(offset, type, crc, data, frame end) of each record of a WAL file."""
    raw = open(path, "rb").read()
    off = 0
    while off + 8 <= len(raw):
        (word,) = struct.unpack_from("<Q", raw, off)
        if word == 0:
            return
        n = word & ((1 << 56) - 1)
        pad = (word >> 56) & 7 if word >> 63 else 0
        if off + 8 + n + pad > len(raw):
            return
        f = pb_fields(raw[off + 8:off + 8 + n])
        yield off, one(f, 1), one(f, 2), one(f, 3, b""), off + 8 + n + pad
        off += 8 + n + pad


def decode_member(member: str) -> dict:
    """What etcd starts from: newest valid snap file, the WAL's entries after it, last hard state."""
    wal = os.path.join(member, "wal")
    names = sorted(n for n in os.listdir(wal) if n.endswith(".wal"))
    snap = None
    for name in sorted((n for n in os.listdir(os.path.join(member, "snap")) if n.endswith(".snap")), reverse=True):
        outer = pb_fields(open(os.path.join(member, "snap", name), "rb").read())
        if crc32c(one(outer, 2, b"")) == one(outer, 1):
            inner = pb_fields(one(outer, 2))
            md = pb_fields(one(inner, 2, b""))
            cs = pb_fields(one(md, 1, b""))
            snap = {"name": name, "raw": one(outer, 2), "data": one(inner, 1, b""), "index": one(md, 2),
                    "term": one(md, 3), "voters": cs.get(1, []), "learners": cs.get(2, [])}
            break
    start = snap["index"] if snap else 0
    crc, ents, state, metadata, positions = 0, [], None, None, {}
    for name in names:
        for off, typ, rcrc, data, _end in frames(os.path.join(wal, name)):
            if typ == 4:
                assert crc in (0, rcrc)
                crc = rcrc
                continue
            crc = crc32c(data, crc)
            assert crc == rcrc, (name, off)
            if typ == 1:
                metadata = data
            elif typ == 2:
                f = pb_fields(data)
                index, term = one(f, 3), one(f, 2)
                if index > start:
                    del ents[index - start - 1:]
                    ents.append((index, term, data))
                    positions[index] = name
            elif typ == 3:
                f = pb_fields(data)
                state = (one(f, 1), one(f, 2), one(f, 3))
    return {"entries": ents, "hard_state": state, "metadata": metadata, "snapshot": snap, "wal_files": names,
            "entry_file": positions}


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """The committed member directory, unpacked (an etcd --data-dir holding member/)."""
    root = str(tmp_path_factory.mktemp("etcd-fixture"))
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)            # 128 MB of WAL files


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    """A member directory written here by a real etcd: snapshots and two WAL files."""
    if not etcd_server.available():
        pytest.skip(etcd_server.SKIP_REASON)
    root = str(tmp_path_factory.mktemp("etcd-real"))
    srv = etcd_server.EtcdServer(os.path.join(root, "etcd"), snapshot_count=100)
    try:
        srv.start()
        expect = etcd_server.write_workload(srv, several_files=True)
        got = srv.get_all()
    finally:
        srv.stop()
    assert got == expect
    keys = {base64.b64encode(k).decode(): etcd_server.describe_value(v) for k, v in got.items()}
    with open(os.path.join(root, "etcd", "keys.json"), "w") as f:
        json.dump({"keys": keys}, f)
    yield os.path.join(root, "etcd")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["fixture", "real"])
def source(request, tmp_path):
    """A private copy of one source (tests may damage it), without etcd's v3 database."""
    src = request.getfixturevalue("fixture_data" if request.param == "fixture" else "real_data")
    dst = str(tmp_path / "etcd-src")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("db"))
    yield dst
    shutil.rmtree(dst, ignore_errors=True)


KEK = walcrypt.RawKey(wctest.KEK_BYTES)


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    """Stores and copies here are 60-130 MB each: removed when the test ends."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def read_store(path: str) -> dict:
    with walcrypt.open(path, kek=KEK, read_only=True) as st:
        hs, cs = st.initial_state()
        snap = st.snapshot()
        first, last = st.first_index(), st.last_index()
        ents = st.entries(first, last + 1) if last >= first else []
        return {"hs": hs, "cs": cs, "entries": ents, "snap": snap and (snap.meta, snap.data, snap.file.extra),
                "metadata": st.stable_get(E.STABLE_METADATA), "marker": json.loads(st.stable_get(E.STABLE_IMPORT))}


def assert_same(store: dict, want: dict) -> None:
    assert [(e.index, e.term, e.data) for e in store["entries"]] == want["entries"]
    assert tuple(store["hs"]) == want["hard_state"]
    assert store["metadata"] == want["metadata"]
    ws = want["snapshot"]
    meta, data, extra = store["snap"]
    assert (meta.index, meta.term, data) == (ws["index"], ws["term"], ws["data"])
    assert (list(meta.conf_state.voters), list(meta.conf_state.learners)) == (ws["voters"], ws["learners"])
    cs = extra["etcd"]["conf_state"]
    assert base64.b64decode(cs["raw"]) == pb_fields_raw_conf_state(ws["raw"])
    assert extra["etcd"]["snap_file"] == ws["name"]


def pb_fields_raw_conf_state(raft_snapshot: bytes) -> bytes:
    return one(pb_fields(one(pb_fields(raft_snapshot), 2)), 1)


def values_in_entries(entries, data_root: str) -> int:
    """Each key etcdctl returned whose put is in the log: its value is inside an entry, byte for byte."""
    keys = json.load(open(os.path.join(data_root, "keys.json")))["keys"]
    blob = b"".join(e[2] for e in entries)
    found = 0
    for k64, desc in keys.items():
        key = base64.b64decode(k64)
        if not key.startswith((b"/big/", b"/tail/")):
            continue                     # written before the snapshot: in etcd's v3 database, not the log
        head = base64.b64decode(desc["head"])
        pos = blob.find(key)
        assert pos >= 0, key
        vpos = blob.find(head, pos)
        assert vpos >= 0 and hashlib.sha256(blob[vpos:vpos + desc["len"]]).hexdigest() == desc["sha256"], key
        found += 1
    return found


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

def test_schema_files_match_the_descriptors():
    """The .proto files beside walcrypt.legacy.etcdpb and the descriptors built in code agree."""
    here = os.path.dirname(etcdpb.__file__)
    for package, (_deps, enums, messages) in etcdpb._SCHEMA.items():
        text = open(os.path.join(here, f"{package}.proto")).read()
        assert re.search(rf"^package {package};", text, re.M)
        found = {}
        for m in re.finditer(r"^message (\w+) \{(.*?)^\}", text, re.M | re.S):
            found[m.group(1)] = [(f.group(3), int(f.group(4)), f.group(2), f.group(1) == "repeated")
                                 for f in re.finditer(r"^\s*(optional|repeated)\s+([\w.]+)\s+(\w+)\s*=\s*(\d+);",
                                                      m.group(2), re.M)]
        assert set(found) == set(messages), package
        for name, fields in messages.items():
            got = [(n, num, typ if typ in ("uint64", "int64", "uint32", "bool", "bytes") else "ref", rep)
                   for n, num, typ, rep in found[name]]
            want = [(n, num, t if t not in ("enum", "message") else "ref", rep) for n, num, t, _tn, rep in fields]
            assert sorted(got) == sorted(want), (package, name)
        for ename, values in enums.items():
            body = re.search(rf"^enum {ename} \{{(.*?)^\}}", text, re.M | re.S).group(1)
            assert re.findall(r"(\w+)\s*=\s*(\d+);", body) == [(v, str(n)) for v, n in values]


def test_import_equals_what_etcd_wrote(source, tmp_path):
    want = decode_member(os.path.join(source, "member"))
    assert len(want["wal_files"]) >= 2 and want["snapshot"] is not None
    files_used = set(want["entry_file"].values())
    assert len(files_used) >= 2, "the entries after the snapshot should span both WAL files"
    before = wctest.tree_hashes(source)
    data = str(tmp_path / "store")
    rep = E.import_etcd(data, member_dir=source, kek=KEK)
    assert wctest.tree_hashes(source) == before                      # the source is only read
    st = read_store(data)
    assert_same(st, want)
    assert rep["entries"] == len(want["entries"]) and rep["torn_tail"] is None
    assert rep["snapshot"]["index"] == want["snapshot"]["index"] and rep["wal_files"] == len(want["wal_files"])
    md = pb_fields(want["metadata"])
    assert (rep["node_id"], rep["cluster_id"]) == (f"{one(md, 1):x}", f"{one(md, 2):x}")
    assert st["marker"]["flavour"] == "etcd-v3" and st["marker"]["entry_data"] == "raftpb.Entry"
    assert values_in_entries(want["entries"], source) >= 70
    # encrypted: no value, key or snapshot text in clear anywhere in the store
    for path in wctest.all_files(data):
        blob = open(path, "rb").read()
        for needle in (b"big-0003:", b"/big/003", b"/tail/1", b"clientURLs", b"CreatedIndex"):
            assert needle not in blob, (path, needle)


def test_torn_tail_is_cut(source, tmp_path):
    """The last WAL file ends inside its last record (etcd's repair case): imported up to the record
    before it, reported; the damaged source is left as it is."""
    member = os.path.join(source, "member")
    last = os.path.join(member, "wal", sorted(os.listdir(os.path.join(member, "wal")))[-1])
    recs = list(frames(last))
    entry_recs = [r for r in recs if r[1] == 2]
    off, _t, _c, data, end = entry_recs[-1]
    with open(last, "r+b") as f:
        f.truncate(off + 8 + len(data) // 2)                # mid-record
    want = decode_member(member)
    cut_index = one(pb_fields(data), 3)
    assert want["entries"][-1][0] == cut_index - 1
    before = wctest.tree_hashes(source)
    rep = E.import_etcd(str(tmp_path / "store"), member_dir=member, kek=KEK)
    assert wctest.tree_hashes(source) == before
    assert rep["torn_tail"]["file"] == last and rep["torn_tail"]["offset"] == off
    st = read_store(str(tmp_path / "store"))
    assert [(e.index, e.term, e.data) for e in st["entries"]] == want["entries"]
    assert st["entries"][-1].index == cut_index - 1


def test_zeroed_sector_in_last_record_is_torn(source, tmp_path):
    """A record of the last file with a sector that was never written (zeros, file size unchanged):
    torn, cut from that record on (etcd's isTornEntry)."""
    member = os.path.join(source, "member")
    last = os.path.join(member, "wal", sorted(os.listdir(os.path.join(member, "wal")))[-1])
    off, _t, _c, data, end = [r for r in frames(last) if r[1] == 2 and len(r[3]) > 2048][-1]
    zero_from = (off + 8 + 511) // 512 * 512
    with open(last, "r+b") as f:
        f.seek(zero_from)
        f.write(b"\0" * min(512, end - zero_from))
    rep = E.import_etcd(str(tmp_path / "store"), member_dir=member, kek=KEK)
    assert rep["torn_tail"]["offset"] == off
    assert rep["last_index"] == one(pb_fields(data), 3) - 1


def test_crc_damage_is_an_error_and_nothing_is_written(source, tmp_path):
    """A flipped byte in an entry of the first (not the last) WAL file: CorruptionError naming the
    file and the record's offset; no target, no staging directory left."""
    member = os.path.join(source, "member")
    first = os.path.join(member, "wal", sorted(os.listdir(os.path.join(member, "wal")))[0])
    off, _t, _c, data, _end = [r for r in frames(first) if r[1] == 2][-3]
    raw = bytearray(open(first, "rb").read())
    pos = raw.index(data, off) + len(data) - 2
    raw[pos] ^= 0x01
    open(first, "wb").write(bytes(raw))
    target = tmp_path / "out" / "store"
    target.parent.mkdir()
    with pytest.raises(CorruptionError) as ei:
        E.import_etcd(str(target), member_dir=member, kek=KEK)
    assert ei.value.path == first and ei.value.offset == off
    assert "CRC mismatch" in ei.value.detail
    assert os.listdir(target.parent) == []


def test_damaged_newest_snap_falls_back_to_older(fixture_data, tmp_path):
    src = str(tmp_path / "src")
    shutil.copytree(fixture_data, src)
    snap_dir = os.path.join(src, "member", "snap")
    newest, older = sorted(os.listdir(snap_dir), reverse=True)[:2]
    raw = bytearray(open(os.path.join(snap_dir, newest), "rb").read())
    raw[-5] ^= 0xFF
    open(os.path.join(snap_dir, newest), "wb").write(bytes(raw))
    rep = E.import_etcd(str(tmp_path / "store"), member_dir=src, kek=KEK)
    assert os.path.basename(rep["snapshot"]["file"]) == older
    assert rep["skipped_snapshots"][0]["file"].endswith(newest) and "CRC" in rep["skipped_snapshots"][0]["reason"]
    assert sorted(os.listdir(snap_dir), reverse=True)[0] == newest      # not renamed: the source is only read
    want = decode_member(os.path.join(src, "member"))
    st = read_store(str(tmp_path / "store"))
    assert st["snap"][0].index == int(older.split("-")[1][:16], 16) == want["snapshot"]["index"]
    assert [(e.index, e.term, e.data) for e in st["entries"]] == want["entries"]


def test_refusals(fixture_data, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(UsageError, match="not an empty directory"):
        E.import_etcd(str(busy), member_dir=fixture_data, kek=KEK)
    with pytest.raises(UsageError, match="not an etcd member directory"):
        E.import_etcd(str(tmp_path / "s"), member_dir=str(busy), kek=KEK)
    with pytest.raises(UsageError, match="kek"):
        E.import_etcd(str(tmp_path / "s"), member_dir=fixture_data, kek=None)
    # a WAL file missing from the sequence
    src = str(tmp_path / "gap")
    shutil.copytree(fixture_data, src)
    wal = os.path.join(src, "member", "wal")
    first, second = sorted(os.listdir(wal))[:2]
    os.rename(os.path.join(wal, second), os.path.join(wal, "0000000000000002" + second[16:]))
    with pytest.raises(CorruptionError, match="a WAL file is missing"):
        E.import_etcd(str(tmp_path / "s"), member_dir=src, kek=KEK)
    assert not os.path.exists(tmp_path / "s")
    # export of a store that etcd did not write
    plain = str(tmp_path / "plain")
    with walcrypt.open(plain, kek=KEK) as st:
        st.save(walcrypt.HardState(1, 1, 1), [walcrypt.Entry(1, 1, b"x")])
    with pytest.raises(UsageError, match="not imported from etcd"):
        E.export_etcd(plain, member_dir=str(tmp_path / "m" / "member"), kek=KEK)
    assert not os.path.exists(tmp_path / "m")


def test_detect(fixture_data, tmp_path):
    for path in (fixture_data, os.path.join(fixture_data, "member")):
        (f,) = E.detect(path)
        assert f["kind"] == "etcd" and f["paths"] == [os.path.join(fixture_data, "member")]
        assert "2 WAL file(s), 2 snap file(s)" in f["detail"] and "member ID" in f["detail"]
        assert f["command"].startswith("walcrypt import etcd ") and "--member-dir" in f["command"]
    assert E.detect(str(tmp_path)) == []
    from walcrypt.legacy import detect
    assert [f["kind"] for f in detect(fixture_data)] == ["etcd"]


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def test_export_writes_what_was_imported(fixture_data, tmp_path):
    """Export of the fixture: the snap file is the source's byte for byte; the WAL decodes (with
    the decoder above) to the same entries, hard state and metadata."""
    store = str(tmp_path / "store")
    E.import_etcd(store, member_dir=fixture_data, kek=KEK)
    out = str(tmp_path / "etcd-out" / "member")
    rep = E.export_etcd(store, member_dir=out, kek=KEK)
    want = decode_member(os.path.join(fixture_data, "member"))
    name = want["snapshot"]["name"]
    assert os.listdir(os.path.join(out, "snap")) == [name]
    assert open(os.path.join(out, "snap", name), "rb").read() == \
        open(os.path.join(fixture_data, "member", "snap", name), "rb").read()
    assert os.listdir(os.path.join(out, "wal")) == ["0000000000000000-0000000000000000.wal"]
    got = decode_member(out)
    assert (got["entries"], got["hard_state"], got["metadata"]) == \
        (want["entries"], want["hard_state"], want["metadata"])
    types = [t for _o, t, _c, _d, _e in frames(os.path.join(out, "wal", "0000000000000000-0000000000000000.wal"))]
    assert types[:5] == [4, 1, 5, 5, 2] and types[-1] == 3
    assert rep["needs_backend_db"] and rep["etcd_data_dir"] == str(tmp_path / "etcd-out")
    for root, dirs, files in os.walk(out):
        assert all(os.stat(os.path.join(root, n)).st_mode & 0o077 == 0 for n in dirs + files)
    with pytest.raises(UsageError, match="not an empty directory"):
        E.export_etcd(store, member_dir=out, kek=KEK)


@needs_etcd
def test_export_round_trip_booted_by_etcd(tmp_path):
    """A cluster without snapshots (log from index 1): import, export to a fresh member directory
    (no v3 database), start the real etcd on it and read every key back with etcdctl."""
    srv = etcd_server.EtcdServer(str(tmp_path / "src"), snapshot_count=1_000_000)
    expect = {}
    try:
        srv.start()
        for i in range(120):
            key, val = f"/rt/{i:04d}", etcd_server.small_value(i) + os.urandom(i % 50)
            srv.put(key, val)
            expect[key.encode()] = val
        srv.put("/rt/big", etcd_server.big_value(1, 900_000))
        expect[b"/rt/big"] = etcd_server.big_value(1, 900_000)
        srv.put("/rt/0003", b"again")
        expect[b"/rt/0003"] = b"again"
        srv.ctl("del", "/rt/0004")
        del expect[b"/rt/0004"]
        assert srv.get_all() == expect
    finally:
        srv.stop()
    assert etcd_server.snap_files(str(tmp_path / "src" / "member")) == []
    store = str(tmp_path / "store")
    rep = E.import_etcd(store, member_dir=str(tmp_path / "src"), kek=KEK)
    assert rep["first_index"] == 1 and rep["snapshot"] is None
    shutil.rmtree(tmp_path / "src")                      # nothing of the original is left to help etcd
    res = subprocess.run([sys.executable, "-m", "walcrypt", "export", "etcd", store, "--member-dir",
                          str(tmp_path / "restored" / "member"), "--key-env", "K", "--json"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, K=wctest.KEK_BYTES.hex(), PYTHONPATH=wctest.REPO_ROOT))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["entries"] == rep["entries"] and out["snapshot"] is None
    assert sorted(os.listdir(tmp_path / "restored" / "member")) == ["snap", "wal"]
    srv2 = etcd_server.EtcdServer(str(tmp_path / "restored"), snapshot_count=1_000_000)
    try:
        srv2.start()
        assert srv2.get_all() == expect
        srv2.put("/rt/after", b"etcd keeps writing")          # and it goes on as an ordinary member
        assert srv2.get_all()[b"/rt/after"] == b"etcd keeps writing"
    finally:
        srv2.stop()


@needs_etcd
def test_export_with_snapshot_boots_with_the_source_db(tmp_path):
    """With a snapshot, etcd also needs the v3 database belonging to it: given the source's
    member/snap/db, etcd starts on the exported member directory and returns every key."""
    src = str(tmp_path / "src")
    srv = etcd_server.EtcdServer(src, snapshot_count=100)
    try:
        srv.start()
        expect = etcd_server.write_workload(srv, several_files=False)
    finally:
        srv.stop()
    store = str(tmp_path / "store")
    assert E.import_etcd(store, member_dir=src, kek=KEK)["snapshot"] is not None
    out = tmp_path / "restored" / "member"
    rep = E.export_etcd(store, member_dir=str(out), kek=KEK)
    assert rep["needs_backend_db"]
    shutil.copy(os.path.join(src, "member", "snap", "db"), out / "snap" / "db")
    srv2 = etcd_server.EtcdServer(str(tmp_path / "restored"), snapshot_count=100)
    try:
        srv2.start()
        assert srv2.get_all() == expect
    finally:
        srv2.stop()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def wc(*args, env=None):
    return subprocess.run([sys.executable, "-m", "walcrypt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=wctest.REPO_ROOT, **(env or {})))


def test_cli_inspect_import_export(fixture_data, tmp_path):
    res = wc("inspect", fixture_data)
    assert res.returncode == 0, res.stderr
    assert "etcd v3 member directory" in res.stdout and "adopt it with: walcrypt import etcd" in res.stdout
    doc = json.loads(wc("inspect", fixture_data, "--json").stdout)
    assert doc["store"] is False and doc["legacy"][0]["kind"] == "etcd"
    env = {"K": wctest.KEK_BYTES.hex()}
    store = tmp_path / "store"
    res = wc("import", "etcd", store, "--member-dir", fixture_data, "--key-env", "K", "--json", env=env)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    want = decode_member(os.path.join(fixture_data, "member"))
    assert (rep["first_index"], rep["last_index"]) == (want["entries"][0][0], want["entries"][-1][0])
    res = wc("import", "etcd", store, "--member-dir", fixture_data, "--key-env", "K", env=env)
    assert res.returncode == 2 and "not an empty directory" in res.stderr
    res = wc("import", "etcd", tmp_path / "s2", "--member-dir", fixture_data)
    assert res.returncode == 2 and "KEK" in res.stderr
    res = wc("export", "etcd", store, "--member-dir", tmp_path / "e" / "member", "--key-env", "K", env=env)
    assert res.returncode == 0, res.stderr
    assert "start etcd with --data-dir" in res.stdout and "member/snap/db" in res.stderr
    assert decode_member(str(tmp_path / "e" / "member"))["entries"] == want["entries"]
