"""Findings of an adversarial review of the import of legacy Raft data (walcrypt.legacy): pysyncobj's
FileJournal, .meta and full-dump files, etcd v3 member directories, and the export back to etcd.

Each test reproduces one break with real files (and, where it matters, a real process or a real
etcd on 127.0.0.1, stopped by its PID) and asserts what the import promises: everything read
from legacy files is untrusted input, parsed with bounds and refused with a typed walcrypt error,
never a bare Python exception or a dead process; a failure leaves nothing worse than before; the
imported store is one a node resumes from and the export one etcd starts from.  Each was a strict
xfail on the code it was written against; all pass since their fixes.
"""

from __future__ import annotations

import gzip
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest

import walcrypt
from walcrypt import WalcryptError

import etcd_server
import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
TESTS = os.path.dirname(os.path.abspath(__file__))
needs_etcd = pytest.mark.skipif(not etcd_server.available(), reason=etcd_server.SKIP_REASON)


def run_child(code: str, *args: str, timeout: float) -> tuple[int | None, str, str]:
    """Run ``code`` in a fresh interpreter (tests/ on sys.path); on timeout it is killed by its PID
    and the return code is None."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), TESTS, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=wctest.child_env())
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        return None, out, err


def nothing_left(parent: str, target: str) -> None:
    assert not os.path.exists(target)
    assert not [n for n in os.listdir(parent) if ".import-" in n or ".export-" in n], os.listdir(parent)


# -------------------------------------------------------------------------------------------------
# pysyncobj
# -------------------------------------------------------------------------------------------------

def _journal(path: str, n: int = 3) -> None:
    from pysyncobj.journal import FileJournal
    j = FileJournal(path)
    for i in range(1, n + 1):
        j.add(b"command-%d" % i, i, 1)
    j.setCurrentTerm(2, "127.0.0.1:1")
    j.setRaftCommitIndex(n)
    j.onOneSecondTimer()
    j._destroy()


def test_pysyncobj_dump_whose_nodes_have_non_string_ids(tmp_path):
    pytest.importorskip("pysyncobj")
    from pysyncobj.node import Node
    from walcrypt.legacy import pysyncobj_files as P
    j, d, target = str(tmp_path / "j"), str(tmp_path / "d"), str(tmp_path / "data")
    _journal(j)
    with gzip.open(d, "wb") as f:
        f.write(pickle.dumps(({}, (b"y", 2, 1), (b"x", 1, 1), {Node(5), Node(7)}), protocol=2))
    try:
        rep = P.import_pysyncobj(target, journal=j, dump=d, kek=KEK)
    except WalcryptError:
        nothing_left(str(tmp_path), target)            # refusing it, typed and with nothing written, is fine
        return
    assert rep["snapshot_index"] == 2
    with walcrypt.open(target, kek=KEK, read_only=True) as st:
        assert st.snapshot().meta.index == 2


def test_pysyncobj_meta_with_a_huge_int_vote(tmp_path):
    pytest.importorskip("pysyncobj")
    from walcrypt.legacy import pysyncobj_files as P
    j, target = str(tmp_path / "j"), str(tmp_path / "data")
    _journal(j)
    with open(j + ".meta", "wb") as f:
        f.write(pickle.dumps({"currentTerm": 2, "votedForNodeId": 10 ** 5000, "raftCommitIndex": 3}, protocol=2))
    assert os.path.getsize(j + ".meta") < 4096
    with pytest.raises(Exception) as ei:
        P.import_pysyncobj(target, journal=j, kek=KEK)
    assert isinstance(ei.value, WalcryptError), f"a bare {type(ei.value).__name__}: {str(ei.value)[:200]}"
    nothing_left(str(tmp_path), target)


_SHARED_REFS_CHILD = """
    import gzip, pickle, sys
    sys.path.insert(0, sys.argv[1])
    import walcrypt, wctest
    from pysyncobj.journal import FileJournal
    from pysyncobj.node import TCPNode
    from walcrypt.legacy import pysyncobj_files as P
    root = sys.argv[2]
    j = FileJournal(root + "/j")
    j.add(b"c1", 1, 1)
    j.onOneSecondTimer()
    j._destroy()
    x = 1
    for _ in range(8):                      # 8 levels of a 100-element list, each element the same list
        x = [x] * 100
    data = pickle.dumps(({}, (b"y", 2, 1), (b"x", 1, 1), {TCPNode("127.0.0.1:1", extra=x)}), protocol=2)
    assert len(data) < 4096                 # the memo makes the sharing cost two bytes per reference
    with gzip.open(root + "/d", "wb") as f:
        f.write(data)
    try:
        P.import_pysyncobj(root + "/data", journal=root + "/j", dump=root + "/d",
                           kek=walcrypt.RawKey(wctest.KEK_BYTES))
        print("imported")
    except walcrypt.WalcryptError as exc:
        print("refused", type(exc).__name__)
"""


def test_pysyncobj_dump_node_attributes_with_shared_references_end_quickly(tmp_path):
    pytest.importorskip("pysyncobj")
    code, out, err = run_child(_SHARED_REFS_CHILD, str(tmp_path), timeout=60)
    assert code is not None, "the import was still walking the dump's cluster after 60 s (killed)"
    assert code == 0 and out.strip() in ("imported", "refused UsageError", "refused CorruptionError"), (code, out,
                                                                                                         err[-2000:])


_BIG_LIST_CHILD = """
    import gzip, os, pickle, resource, sys
    sys.path.insert(0, sys.argv[1])
    import walcrypt, wctest
    from pysyncobj.journal import FileJournal
    from pysyncobj.node import TCPNode
    from walcrypt.legacy import pysyncobj_files as P
    root, n = sys.argv[2], int(sys.argv[3])
    j = FileJournal(root + "/j")
    j.add(b"c1", 1, 1)
    j.onOneSecondTimer()
    j._destroy()
    # A valid dump: state {"k": [None] * n}, the list written as one MARK ... LIST (any pickler may)
    full = pickle.dumps(({}, (b"y", 2, 1), (b"x", 1, 1), {TCPNode("127.0.0.1:1")}), protocol=2)
    assert full[:6] == b"\\x80\\x02(}q\\x00"
    data = full[:6] + b"(X\\x01\\x00\\x00\\x00k(" + b"N" * n + b"lu" + full[6:]
    with gzip.open(root + "/d", "wb") as f:
        f.write(data)
    del data, full
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        P.import_pysyncobj(root + "/data", journal=root + "/j", dump=root + "/d",
                           kek=walcrypt.RawKey(wctest.KEK_BYTES))
        outcome = "imported"
    except walcrypt.WalcryptError as exc:
        outcome = "refused " + type(exc).__name__
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(outcome, grown, os.path.getsize(root + "/d"))
"""


def test_pysyncobj_dump_memory_stays_proportionate_to_the_dump(tmp_path):
    pytest.importorskip("pysyncobj")
    n = 4_000_000
    code, out, err = run_child(_BIG_LIST_CHILD, str(tmp_path), str(n), timeout=300)
    assert code == 0, (code, out, err[-2000:])
    outcome, grown, packed = out.split()[0:-2], int(out.split()[-2]), int(out.split()[-1])
    assert packed < 16384
    # The dump decompresses to ~n bytes and loads to a list of n pointers (8n): 20n leaves room for
    # the copies a careful reader still makes.
    assert grown < 20 * n, (f"{' '.join(outcome)}: peak memory grew by {grown / 1e6:.0f} MB for a "
                            f"{n / 1e6:.0f} MB pickle ({packed} bytes of gzip)")


# -------------------------------------------------------------------------------------------------
# etcd
# -------------------------------------------------------------------------------------------------

def _etcd_member(root: str, recs) -> str:
    """A member directory with one WAL file: crc, metadata, the empty snapshot record, ``recs``."""
    from walcrypt.legacy import etcd_wal as W
    from walcrypt.legacy import etcdpb as pb
    m = os.path.join(root, "member")
    os.makedirs(os.path.join(m, "wal"))
    os.makedirs(os.path.join(m, "snap"))
    crc, out = 0, []
    for t, d in [(W.CRC, None), (W.METADATA, pb.marshal("etcdserverpb.Metadata", NodeID=1, ClusterID=2)),
                 (W.SNAPSHOT, pb.marshal("walpb.Snapshot"))] + list(recs):
        b, crc = W.frame(t, d, crc)
        out.append(b)
    with open(os.path.join(m, "wal", W.wal_name(0, 0)), "wb") as f:
        f.write(b"".join(out))
    return m


def _entries(lo: int, hi: int, term: int = 1):
    from walcrypt.legacy import etcd_wal as W
    from walcrypt.legacy import etcdpb as pb
    return [(W.ENTRY, pb.marshal("raftpb.Entry", Type=0, Term=term, Index=i, Data=b"value-%d" % i))
            for i in range(lo, hi + 1)]


def _hard_state(term: int, vote: int, commit: int):
    from walcrypt.legacy import etcd_wal as W
    from walcrypt.legacy import etcdpb as pb
    return (W.STATE, pb.marshal("raftpb.HardState", term=term, vote=vote, commit=commit))


_TRUNCATED_CHILD = """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import walcrypt, wctest
    from walcrypt.legacy import etcd as E
    from walcrypt.legacy import etcd_wal as W
    real = W.scan
    def scan(m, path, *args, **kwargs):
        os.truncate(path, 0)      # the file shrinks while it is mapped (etcd's own WAL repair truncates)
        return real(m, path, *args, **kwargs)
    W.scan = scan
    try:
        E.import_etcd(sys.argv[2], member_dir=sys.argv[3], kek=walcrypt.RawKey(wctest.KEK_BYTES))
        print("imported")
    except walcrypt.WalcryptError as exc:
        print("refused", type(exc).__name__)
"""


def test_etcd_wal_truncated_during_import_is_not_a_crash(tmp_path):
    pytest.importorskip("google.protobuf")
    member = _etcd_member(str(tmp_path), _entries(1, 40) + [_hard_state(1, 1, 40)])
    target = str(tmp_path / "data")
    code, out, err = run_child(_TRUNCATED_CHILD, target, member, timeout=120)
    assert code is not None and code >= 0, f"the importer died of signal {-code if code else code}"
    assert code == 0 and out.strip().startswith(("imported", "refused")), (code, out, err[-2000:])
    if out.startswith("refused"):
        nothing_left(str(tmp_path), target)


def test_etcd_hard_state_commit_beyond_the_log(tmp_path):
    pytest.importorskip("google.protobuf")
    from walcrypt.legacy import etcd as E
    member = _etcd_member(str(tmp_path), _entries(1, 3) + [_hard_state(2, 1, 50)])
    target = str(tmp_path / "data")
    try:
        E.import_etcd(target, member_dir=member, kek=KEK)
    except WalcryptError:
        nothing_left(str(tmp_path), target)            # refused: fine
        return
    with walcrypt.open(target, kek=KEK, read_only=True) as st:
        hs, _cs = st.initial_state()
        snap = st.snapshot()
        top = max(st.last_index(), snap.meta.index if snap else 0)
    assert hs.commit <= top, f"hard state commit {hs.commit} beyond the log's end {top}"


_OTHERS = "written by someone else"


def test_etcd_export_failure_keeps_a_member_dir_someone_else_created(tmp_path, monkeypatch):
    pytest.importorskip("google.protobuf")
    from walcrypt.legacy import etcd as E
    member = _etcd_member(str(tmp_path / "src"), _entries(1, 4) + [_hard_state(1, 1, 4)])
    store = str(tmp_path / "store")
    E.import_etcd(store, member_dir=member, kek=KEK)
    target = str(tmp_path / "restored" / "member")
    theirs = os.path.join(target, "theirs")
    real = E._fsync_dir

    def fsync_dir(path):                     # the export's files are written; meanwhile another writer
        if not os.path.exists(target):       # fills the member directory
            os.makedirs(target)
            with open(theirs, "w") as f:
                f.write(_OTHERS)
        return real(path)

    monkeypatch.setattr(E, "_fsync_dir", fsync_dir)
    with pytest.raises(WalcryptError):
        E.export_etcd(store, member_dir=target, kek=KEK)
    assert os.path.isfile(theirs), "the member directory another writer created was deleted"
    with open(theirs) as f:
        assert f.read() == _OTHERS


@needs_etcd
def test_etcd_export_of_a_store_compacted_to_its_end(tmp_path):
    pytest.importorskip("google.protobuf")
    from walcrypt.legacy import etcd as E
    src = str(tmp_path / "src")
    srv = etcd_server.EtcdServer(src, snapshot_count=1_000_000)
    try:
        srv.start()
        for i in range(5):
            srv.put(f"/k/{i}", b"value %d" % i)
    finally:
        srv.stop()
    store = str(tmp_path / "store")
    rep = E.import_etcd(store, member_dir=src, kek=KEK)
    assert rep["snapshot"] is None and rep["first_index"] == 1
    with walcrypt.open(store, kek=KEK) as st:         # the application compacts its log (no snapshot)
        st.compact(st.last_index())
    out = str(tmp_path / "restored" / "member")
    try:
        E.export_etcd(store, member_dir=out, kek=KEK)
    except WalcryptError:
        assert not os.path.exists(out)                # refused: fine
        return
    srv2 = etcd_server.EtcdServer(str(tmp_path / "restored"), snapshot_count=1_000_000)
    try:
        srv2.start(timeout=60)                         # etcd exiting while it starts raises, with its log
        srv2.put("/after", b"x")
    finally:
        srv2.stop()
