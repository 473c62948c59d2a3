"""Adopting pysyncobj's own files (walcrypt.legacy.pysyncobj_files): a real 3-node cluster on
FileJournal + full-dump files restarted on walcrypt_conf; torn journal tails; hostile journals, meta
files and dumps refused with nothing written; the CLI (import, inspect, migrate --remove-source).

Every node runs in its own subprocess on 127.0.0.1 and is stopped by its PID in teardown (also on
failure); every wait is bounded; nothing asserts on timing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings

import pytest

pytest.importorskip("pysyncobj")

from pysyncobj.journal import FileJournal  # noqa: E402

import walcrypt  # noqa: E402
from walcrypt.cluster import Node, NodeError, free_ports  # noqa: E402
from walcrypt.errors import CorruptionError, UsageError  # noqa: E402
from walcrypt.legacy import _pickles, detect  # noqa: E402
from walcrypt.legacy import pysyncobj_files as P  # noqa: E402

from test_cli import ok, wc  # noqa: E402

import wctest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "_pysyncobj_legacy_child.py")
MARKER = "legacy-plaintext-marker"
KEK = walcrypt.RawKey(wctest.KEK_BYTES)


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def wait_until(pred, timeout: float = 60.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------

class LegacyCluster:
    """Three nodes; node i keeps pysyncobj's files at ROOT/node{i}.journal (+ .meta) and
    ROOT/node{i}.dump, and its walcrypt store at ROOT/node{i} (the adapter's "beside" rule)."""

    def __init__(self, root: str):
        self.root = root
        keys = os.path.join(root, "keys")
        os.makedirs(keys)
        self.nodes = []
        for i, port in enumerate(free_ports(3)):
            kf = os.path.join(keys, f"node{i}.kek")
            walcrypt.generate_key_file(kf)
            self.nodes.append(Node(f"node{i}", f"127.0.0.1:{port}", os.path.join(root, f"node{i}"), kf))

    def journal(self, n: Node) -> str:
        return n.data_dir + ".journal"

    def dump(self, n: Node) -> str:
        return n.data_dir + ".dump"

    def start(self, n: Node, mode: str, import_journal: str | None = None) -> None:
        cmd = [sys.executable, CHILD, "--mode", mode, "--self", n.addr, "--journal", self.journal(n),
               "--dump", self.dump(n), "--dir", n.data_dir, "--key-file", n.key_file]
        for p in self.nodes:
            if p is not n:
                cmd += ["--peer", p.addr]
        if import_journal:
            cmd += ["--import", import_journal]
        env = wctest.child_env()
        env["PYTHONUNBUFFERED"] = "1"
        n.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env=env)

    def stop(self, n: Node) -> None:
        if n.alive:
            try:
                n.request({"op": "stop"}, timeout=30)
                n.proc.wait(timeout=30)
            except (NodeError, subprocess.TimeoutExpired, OSError, ValueError):
                self.kill(n)

    def kill(self, n: Node) -> None:
        if n.proc is not None and n.proc.poll() is None:
            os.kill(n.proc.pid, signal.SIGKILL)
            n.proc.wait(timeout=10)

    def teardown(self) -> None:
        for n in self.nodes:
            self.kill(n)
            for stream in (n.proc.stdin, n.proc.stdout) if n.proc else ():
                try:
                    stream.close()
                except OSError:
                    pass

    def leader(self) -> Node:
        found: list = []

        def one():
            found[:] = [n for n in self.nodes if n.alive and n.request({"op": "status"})["leader"]]
            return len(found) == 1
        assert wait_until(one, 60), "no single leader within 60 s"
        return found[0]

    def write(self, lo: int, hi: int, acked: dict) -> None:
        items = [(f"k{i:05d}", f"{MARKER}-{i}") for i in range(lo, hi)]
        for _ in range(5):                       # bounded: a leader change may fail a batch
            todo = [kv for kv in items if kv[0] not in acked]
            if not todo:
                return
            got = set(self.leader().request({"op": "set", "items": todo, "timeout": 20}, timeout=60)["acked"])
            acked.update((k, v) for k, v in todo if k in got)
        assert all(k in acked for k, _ in items), "writes were not acknowledged after 5 attempts"

    def converged(self, acked: dict, timeout: float = 60) -> bool:
        def check():
            for n in self.nodes:
                d = n.request({"op": "dump"})["items"]
                if any(d.get(k) != v for k, v in acked.items()):
                    return False
            return True
        return wait_until(check, timeout, 0.3)


@pytest.fixture
def legacy_cluster(tmp_path):
    c = LegacyCluster(str(tmp_path))
    try:
        yield c
    finally:
        c.teardown()


def test_a_filejournal_cluster_restarts_on_walcrypt_with_every_committed_value(legacy_cluster):
    c = legacy_cluster
    for n in c.nodes:
        c.start(n, "file")
    acked: dict = {}
    c.write(0, 400, acked)                       # > logCompactionMinEntries (100): dumps and compactions
    for n in c.nodes:
        n.request({"op": "compact"})
    assert wait_until(lambda: all(os.path.exists(c.dump(n)) for n in c.nodes), 60), "no dump on some node"
    c.write(400, 460, acked)                     # entries after the dump: the journal holds them only
    assert c.converged(acked)
    for n in c.nodes:
        c.stop(n)
    originals = {p: sha(p) for n in c.nodes for p in (c.journal(n), c.journal(n) + ".meta", c.dump(n))}
    for n in c.nodes:
        with open(c.journal(n), "rb") as f:
            assert MARKER.encode() in f.read() or MARKER.encode() in gzip.open(c.dump(n)).read()

    # node0 by the "beside" rule (import_journal="auto"), the others by explicit paths
    for i, n in enumerate(c.nodes):
        c.start(n, "walcrypt", import_journal="auto" if i == 0 else c.journal(n))
    for n in c.nodes:
        st = n.request({"op": "status"})
        rep = st["import_report"]
        assert rep is not None and rep["snapshot_index"] and rep["cut"] is None, rep
        assert rep["first_index"] > 1, "pysyncobj never compacted this journal: the dump was not exercised"
        assert rep["last_index"] > rep["snapshot_index"], "no journal entries after the dump"
        assert {s["path"] for s in rep["sources"]} == {c.journal(n), c.journal(n) + ".meta", c.dump(n)}
        assert len(st["warnings"]) == 1 and "--remove-source" in st["warnings"][0], st["warnings"]
    assert c.converged(acked), "a committed value is missing after the restart on walcrypt"
    c.write(460, 500, acked)                     # the cluster works on: replicated, committed
    assert c.converged(acked)

    # a second start finds the store: nothing imported, nothing said
    c.stop(c.nodes[1])
    c.start(c.nodes[1], "walcrypt", import_journal=c.journal(c.nodes[1]))
    st = c.nodes[1].request({"op": "status"})
    assert st["import_report"] is None and st["warnings"] == []
    assert c.converged(acked)
    for n in c.nodes:
        c.stop(n)

    for n in c.nodes:
        assert not wctest.files_containing(n.data_dir, MARKER.encode()), f"plaintext under {n.data_dir}"
    assert {p: sha(p) for p in originals} == originals, "an original pysyncobj file was changed"


# ---------------------------------------------------------------------------------------------
# Journals written by pysyncobj's own FileJournal, then damaged
# ---------------------------------------------------------------------------------------------

def cmd(i: int) -> bytes:
    return f"command-{i}-{MARKER}".encode() + bytes(i % 7)


def make_journal(path: str, n: int = 20, term_every: int = 6, vote="127.0.0.1:1") -> list[int]:
    """A journal of entries 1..n; returns each record's start offset (and the end as the last item)."""
    j = FileJournal(path)
    offsets = [P.HEADER_SIZE]
    for i in range(1, n + 1):
        j.add(cmd(i), i, i // term_every)
        offsets.append(offsets[-1] + 8 + 16 + len(cmd(i)))
    j.setCurrentTerm(n // term_every + 1, vote)
    j.setRaftCommitIndex(n - 2)
    j.onOneSecondTimer()
    j._destroy()
    return offsets


def entries_of(data_dir: str):
    with walcrypt.open(data_dir, kek=KEK) as st:
        return st.entries(st.first_index(), st.last_index() + 1), st.initial_state()[0]


def test_journal_only_import_equals_the_journal(tmp_path):
    j = str(tmp_path / "j")
    make_journal(j)
    rep = P.import_pysyncobj(str(tmp_path / "data"), journal=j, kek=KEK)
    assert (rep["entries"], rep["first_index"], rep["last_index"], rep["cut"]) == (20, 1, 20, None)
    assert (rep["term"], rep["vote"], rep["commit"]) == (4, "127.0.0.1:1", 18)
    ents, hs = entries_of(str(tmp_path / "data"))
    assert [(e.index, e.term, e.data) for e in ents] == [(i, i // 6 + 1, cmd(i)) for i in range(1, 21)]
    assert hs.commit == 18
    assert not wctest.files_containing(str(tmp_path / "data"), MARKER.encode())


@pytest.mark.parametrize("damage", ["truncated mid-entry", "zero-filled tail", "closing length torn"])
def test_a_torn_journal_tail_imports_to_its_last_complete_entry(tmp_path, damage):
    j = str(tmp_path / "j")
    offs = make_journal(j)
    raw = bytearray(open(j, "rb").read())
    if damage == "truncated mid-entry":
        raw = raw[:offs[16] + 11]                  # record 17 cut after 11 bytes; the header still says 20
        expect_last, reason = 16, "file ends"
    elif damage == "zero-filled tail":
        raw[offs[17]:offs[20]] = bytes(offs[20] - offs[17])   # records 18..20 never reached the disk
        expect_last, reason = 17, "zero-filled"
    else:
        raw[offs[19] + 4:offs[20]] = bytes(offs[20] - offs[19] - 4)  # record 20's body and closing length lost
        expect_last, reason = 19, "closing length"
    with open(j, "wb") as f:
        f.write(raw)
    before = sha(j)
    rep = P.import_pysyncobj(str(tmp_path / "data"), journal=j, kek=KEK)
    assert rep["last_index"] == expect_last and rep["entries"] == expect_last
    assert rep["cut"]["offset"] == offs[expect_last] and reason in rep["cut"]["reason"], rep["cut"]
    assert rep["cut"]["bytes"] == offs[20] - offs[expect_last]
    assert rep["commit"] == min(18, expect_last)
    ents, _hs = entries_of(str(tmp_path / "data"))
    assert [e.data for e in ents] == [cmd(i) for i in range(1, expect_last + 1)]
    assert sha(j) == before


def nothing_written(tmp_path, target: str) -> None:
    assert not os.path.exists(target)
    assert not [n for n in os.listdir(tmp_path) if ".import-" in n], "a staging directory was left behind"


@pytest.mark.parametrize("damage", ["wrong magic", "huge length", "small length", "index gap", "end in header",
                                    "short file"])
def test_a_hostile_journal_is_refused_and_nothing_is_written(tmp_path, damage):
    j = str(tmp_path / "j")
    offs = make_journal(j)
    raw = bytearray(open(j, "rb").read())
    if damage == "wrong magic":
        raw[0:9] = b"NOTSYNCOB"
    elif damage == "huge length":
        raw[offs[3]:offs[3] + 4] = (0xFFFFFFF0).to_bytes(4, "little")
    elif damage == "small length":
        raw[offs[3]:offs[3] + 4] = (5).to_bytes(4, "little")
    elif damage == "index gap":
        raw[offs[3] + 4:offs[3] + 12] = (99).to_bytes(8, "little")
    elif damage == "end in header":
        raw[P.LAST_OFFSET_AT:P.LAST_OFFSET_AT + 4] = (12).to_bytes(4, "little")
    else:
        raw = raw[:30]
    with open(j, "wb") as f:
        f.write(raw)
    target = str(tmp_path / "data")
    with pytest.raises(CorruptionError) as ei:
        P.import_pysyncobj(target, journal=j, kek=KEK)
    assert ei.value.path == j
    nothing_written(tmp_path, target)


class _Boom:
    def __reduce__(self):
        return (os.mkdir, (BOOM_DIR,))


BOOM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".pysyncobj-legacy-boom")


def test_hostile_pickles_are_never_run(tmp_path):
    j = str(tmp_path / "j")
    make_journal(j)
    with open(j + ".meta", "wb") as f:            # the meta file: a REDUCE of os.mkdir
        f.write(pickle.dumps({"currentTerm": 3, "votedForNodeId": _Boom()}, protocol=2))
    target = str(tmp_path / "data")
    with pytest.raises(CorruptionError, match="meta"):
        P.import_pysyncobj(target, journal=j, kek=KEK)
    nothing_written(tmp_path, target)
    os.unlink(j + ".meta")
    from pysyncobj.node import TCPNode
    d = str(tmp_path / "d")
    for bad in [({}, (_Boom(), 2, 1), (b"x", 1, 1), {TCPNode("127.0.0.1:1")}),       # head: refused
                ({}, (b"y", 2, 1), (b"x", 1, 1), {_Boom()})]:
        with gzip.open(d, "wb") as f:
            f.write(pickle.dumps(bad, protocol=2))
        with pytest.raises(CorruptionError, match="dump"):
            P.import_pysyncobj(target, journal=j, dump=d, kek=KEK)
        nothing_written(tmp_path, target)
    # in the state machine's part it is carried as bytes, never run here
    with gzip.open(d, "wb") as f:
        f.write(pickle.dumps(([{}, {"x": _Boom()}], (b"y", 2, 1), (b"x", 1, 1), {TCPNode("127.0.0.1:1")}),
                             protocol=2))
    rep = P.import_pysyncobj(target, journal=j, dump=d, kek=KEK)
    assert rep["dump_opaque_classes"] == ["posix.mkdir"] and rep["snapshot_index"] == 2
    assert not os.path.exists(BOOM_DIR)
    # a memo index that would make the unpickler allocate gigabytes is refused before loading
    with pytest.raises(_pickles.PickleRefused, match="memo index"):
        _pickles.top_tuple(b"\x80\x02(Nr\xff\xff\xff\x7fNNNt.")


def test_a_truncated_dump_is_refused(tmp_path):
    j, d = str(tmp_path / "j"), str(tmp_path / "d")
    make_journal(j)
    from pysyncobj.node import TCPNode
    with gzip.open(d, "wb") as f:
        f.write(pickle.dumps(([{}, {"k": "v"}], (cmd(2), 2, 0), (cmd(1), 1, 0), {TCPNode("127.0.0.1:1")}),
                             protocol=2))
    raw = open(d, "rb").read()
    with open(d, "wb") as f:
        f.write(raw[:len(raw) // 2])
    target = str(tmp_path / "data")
    with pytest.raises(CorruptionError, match="gzip"):
        P.import_pysyncobj(target, journal=j, dump=d, kek=KEK)
    nothing_written(tmp_path, target)


def _start_single(conf):
    from pysyncobj import SyncObj
    from pysyncobj.batteries import ReplDict
    rd = ReplDict()
    so = SyncObj(f"127.0.0.1:{free_ports(1)[0]}", [], consumers=[rd], conf=conf)
    return so, rd


def _destroy(so) -> None:
    so.destroy()
    t = so.__dict__.get("_SyncObj__thread")
    if t is not None:
        t.join(timeout=15)


def test_adapter_files_beside_a_new_store_are_named_but_not_imported_without_the_option(tmp_path):
    from walcrypt.adapters.pysyncobj import LegacyFilesWarning, walcrypt_conf
    path = str(tmp_path / "node")
    make_journal(path + ".journal")
    before = sha(path + ".journal")
    with pytest.warns(LegacyFilesWarning, match="NOT imported"):
        so, rd = _start_single(walcrypt_conf(path, kek=KEK, password="pw"))
    try:
        assert so._SyncObj__raftLog[0][1] == 1 and len(so._SyncObj__raftLog) == 1   # an empty node: its no-op only
    finally:
        _destroy(so)
    assert sha(path + ".journal") == before

    with pytest.raises(UsageError, match="import_journal"):
        walcrypt_conf(str(tmp_path / "a"), kek=KEK, import_dump=str(tmp_path / "d"))
    with pytest.raises(UsageError, match="does not exist"):     # a typo must not start an empty node
        _start_single(walcrypt_conf(str(tmp_path / "b"), kek=KEK, password="pw",
                                    import_journal=str(tmp_path / "missing.journal")))
    assert not os.path.exists(tmp_path / "b" / "meta")
    with warnings.catch_warnings():                             # "auto" and nothing beside: a new node, no word
        warnings.simplefilter("error", LegacyFilesWarning)
        so, _rd = _start_single(walcrypt_conf(str(tmp_path / "c"), kek=KEK, password="pw", import_journal="auto"))
        _destroy(so)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def test_cli_import_inspect_and_remove_source(tmp_path):
    src = tmp_path / "pso"
    src.mkdir()
    j = str(src / "node.journal")
    make_journal(j, n=30)
    key = str(tmp_path / "kek")
    ok(wc("keygen", key))

    res = ok(wc("inspect", str(src)))                            # detection: what, and the command
    assert "pysyncobj FileJournal" in res.stdout and f"walcrypt import pysyncobj NEW_DATA_DIR --journal {j}" \
        in res.stdout
    found = json.loads(ok(wc("inspect", str(src), "--json")).stdout)["legacy"]
    assert found == detect(str(src)) and found[0]["paths"] == [j, j + ".meta"]
    assert detect(j)[0]["kind"] == "pysyncobj"

    data = str(tmp_path / "data")
    rep = json.loads(ok(wc("import", "pysyncobj", data, "--journal", j, "--key-file", key, "--json")).stdout)
    assert (rep["entries"], rep["first_index"], rep["last_index"], rep["term"]) == (30, 1, 30, 6)
    assert [s["role"] for s in rep["sources"]] == ["journal", "meta"]
    again = wc("import", "pysyncobj", data, "--journal", j, "--key-file", key, "--json")
    assert again.returncode == 2 and json.loads(again.stdout)["error"]["kind"] == "usage"

    bad = str(tmp_path / "bad.journal")
    with open(bad, "wb") as f:
        f.write(b"\0" * 100)
    res = wc("import", "pysyncobj", str(tmp_path / "d2"), "--journal", bad, "--key-file", key)
    assert res.returncode != 0 and "not a pysyncobj journal" in res.stderr
    assert not os.path.exists(tmp_path / "d2")

    res = ok(wc("inspect", data, "--key-file", key))             # a store: its report, plus what is beside
    assert "pysyncobj" not in res.stdout or "adopt it with" not in res.stdout

    res = wc("migrate", data, "--to", "encrypted", "--remove-source")
    assert res.returncode == 2 and "imported from" in res.stderr and os.path.exists(j)
    with open(j + ".meta", "ab") as f:                           # changed since the import: kept
        f.write(b"\0")
    res = wc("migrate", data, "--to", "encrypted", "--remove-source", "--key-file", key)
    assert res.returncode == 1 and f"removed the imported pysyncobj file {j}" in res.stdout
    assert not os.path.exists(j) and os.path.exists(j + ".meta") and "changed since" in res.stderr
