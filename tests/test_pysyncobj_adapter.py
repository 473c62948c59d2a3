"""The pysyncobj adapter's lifecycle with real SyncObj nodes on 127.0.0.1 and real stores.

Bugs found by running pysyncobj's own test suite on walcrypt, one test (or more) each:
nodes bound to their own SyncObj (no path-keyed lookup another conf can take over),
an idempotent journal destroy, restart in the same process right after ``destroy()``,
no plaintext ``FileJournal`` in a walcrypt data directory through any name, a loud
warning without a transport password; and stores left open by a tick thread that
ended on an exception, a failed bind or the end of the thread that built the node.

Every node is destroyed (and its tick thread joined, bounded) at teardown; every wait is
bounded; nothing asserts on timing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings

import pytest

pytest.importorskip("pysyncobj")

import pysyncobj  # noqa: E402
import pysyncobj.journal  # noqa: E402
import pysyncobj.syncobj  # noqa: E402
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, SyncObjException  # noqa: E402
from pysyncobj.batteries import ReplDict  # noqa: E402

import walcrypt  # noqa: E402
from walcrypt.adapters import pysyncobj as ps  # noqa: E402
from walcrypt.cluster import free_ports  # noqa: E402
from walcrypt.errors import LockedError, UsageError  # noqa: E402

import wctest  # noqa: E402

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
PASSWORD = "adapter-test-transport-secret"


def make_conf(path, **options):
    options.setdefault("password", PASSWORD)
    return ps.walcrypt_conf(str(path), kek=KEK, store_options={"segment_size": 1 << 16}, **options)


def new_addr() -> str:
    return f"127.0.0.1:{free_ports(1)[0]}"


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def tick_thread(so):
    return so.__dict__.get("_SyncObj__thread")


@pytest.fixture
def nodes():
    """start(addr, conf, consumers) -> a running single-node SyncObj; all destroyed at teardown."""
    made: list = []

    def start(addr, conf, consumers=(), others=()):
        so = SyncObj(addr, list(others), consumers=list(consumers), conf=conf)
        made.append(so)
        return so

    yield start
    for so in made:
        try:
            so.destroy()
        except Exception:
            pass
        t = tick_thread(so)
        if t is not None:
            t.join(timeout=15)


def start_ready(start, addr, conf, consumers=()):
    so = start(addr, conf, consumers)
    assert wait_until(lambda: so.isReady() and so._isLeader()), "a single-node cluster elects itself"
    return so


def write(rd: ReplDict, key: str, value: str) -> None:
    rd.set(key, value, sync=True, timeout=20)       # raises unless committed


# ---------------------------------------------------------------------------------------------
# Each node bound to its own SyncObj
# ---------------------------------------------------------------------------------------------


def test_a_new_conf_for_a_running_nodes_path_does_not_take_it_over(tmp_path, nodes):
    path = tmp_path / "node"
    addr = new_addr()
    conf_a, rd_a = make_conf(path), ReplDict()
    so_a = start_ready(nodes, addr, conf_a, [rd_a])
    write(rd_a, "k1", "v1")

    conf_b = make_conf(path)                         # a second conf for the same path, A still running
    so_a.forceLogCompaction()                        # A's snapshot goes to A's own store
    assert wait_until(lambda: conf_a.walcrypt.snapshots_saved >= 1), "A's compaction did not reach A's store"
    assert conf_b.walcrypt.snapshots_saved == 0 and conf_b.walcrypt.store is None
    ser = so_a._SyncObj__serializer
    assert ps.node_for_serializer(ser) is conf_a.walcrypt

    with pytest.raises(LockedError, match="destroy"):   # B cannot open what A holds ...
        SyncObj(new_addr(), [], consumers=[ReplDict()], conf=conf_b)
    write(rd_a, "k2", "v2")                          # ... and A keeps serving after B's failed start

    so_a.destroy()                                   # A's teardown must not unhook B
    rd_b = ReplDict()
    so_b = start_ready(nodes, addr, conf_b, [rd_b])
    assert wait_until(lambda: rd_b.rawData() == {"k1": "v1", "k2": "v2"}), rd_b.rawData()
    write(rd_b, "k3", "v3")
    assert isinstance(so_b._SyncObj__raftLog, ps.WalcryptJournal)


def test_a_conf_serves_one_running_syncobj_at_a_time(tmp_path, nodes):
    path = tmp_path / "node"
    addr = new_addr()
    conf, rd = make_conf(path), ReplDict()
    so = start_ready(nodes, addr, conf, [rd])
    write(rd, "k", "v")
    with pytest.raises(UsageError, match="already serves"):
        SyncObj(new_addr(), [], consumers=[ReplDict()], conf=conf)
    write(rd, "k2", "v2")                            # the refused start changed nothing
    so.destroy()
    rd2 = ReplDict()                                 # the same conf, once its SyncObj is destroyed
    start_ready(nodes, addr, conf, [rd2])
    assert wait_until(lambda: rd2.rawData() == {"k": "v", "k2": "v2"}), rd2.rawData()


# ---------------------------------------------------------------------------------------------
# Destroy is idempotent
# ---------------------------------------------------------------------------------------------


def test_journal_destroy_twice_after_the_commit_index_moved(tmp_path):
    path = tmp_path / "node"
    j = make_conf(path).walcrypt.open_journal()
    for i in range(1, 4):
        j.add(b"cmd-%d" % i, i, 1)
    j.flush()
    j.setRaftCommitIndex(3)
    j._destroy()
    j._destroy()                                     # was UsageError: the store is closed
    assert j.closed
    j2 = make_conf(path).walcrypt.open_journal()
    assert j2.getRaftCommitIndex() == 3 and len(j2) == 3
    j2._destroy()


def test_syncobj_destroy_twice_without_auto_tick(tmp_path, nodes):
    path = tmp_path / "node"
    conf, rd = make_conf(path, autoTick=False), ReplDict()
    so = nodes(new_addr(), conf, [rd])
    done = []
    assert wait_until(lambda: so.doTick(0.01) or so._isLeader())
    rd.set("k", "v", callback=lambda res, err: done.append(err))
    assert wait_until(lambda: so.doTick(0.01) or done), "the write was never committed"
    assert so._SyncObj__raftLog.getRaftCommitIndex() > 1
    so.destroy()
    so.destroy()                                     # _doDestroy twice: the journal's second destroy is a no-op
    assert conf.walcrypt.store.closed
    j = make_conf(path).walcrypt.open_journal()
    assert j.getRaftCommitIndex() == so._SyncObj__raftLog.getRaftCommitIndex()
    j._destroy()


# ---------------------------------------------------------------------------------------------
# Restart in the same process right after destroy()
# ---------------------------------------------------------------------------------------------


def test_restart_in_the_same_process_right_after_destroy(tmp_path, nodes):
    path = tmp_path / "node"
    addr = new_addr()
    expected: dict = {}
    for rnd in range(4):
        conf, rd = make_conf(path), ReplDict()       # a new conf each time, as a restarted program makes it
        so = start_ready(nodes, addr, conf, [rd])
        assert wait_until(lambda: rd.rawData() == expected), (rnd, rd.rawData())
        write(rd, f"k{rnd}", f"v{rnd}")
        expected[f"k{rnd}"] = f"v{rnd}"
        so.destroy()                                 # autoTick: the tick thread closes the store
        assert conf.walcrypt.store.closed, "destroy() returned before the store was closed"


def test_destroy_from_inside_the_tick_thread_does_not_wait_for_itself(tmp_path, nodes):
    path = tmp_path / "node"
    conf, rd = make_conf(path), ReplDict()
    so = start_ready(nodes, new_addr(), conf, [rd])
    rd.set("k", "v", callback=lambda res, err: so.destroy())      # callbacks run on the tick thread
    t = tick_thread(so)
    t.join(timeout=30)
    assert not t.is_alive() and conf.walcrypt.store.closed


# ---------------------------------------------------------------------------------------------
# No plaintext FileJournal in a walcrypt data directory, whatever the name
# ---------------------------------------------------------------------------------------------

JOURNAL_FACTORIES = {
    "pysyncobj.createJournal": lambda p: pysyncobj.createJournal(p),
    "pysyncobj.syncobj.createJournal": lambda p: pysyncobj.syncobj.createJournal(p),
    "pysyncobj.journal.createJournal": lambda p: pysyncobj.journal.createJournal(p),
    "pysyncobj.journal.FileJournal": lambda p: pysyncobj.journal.FileJournal(p),
}


@pytest.mark.parametrize("name", sorted(JOURNAL_FACTORIES))
def test_no_file_journal_at_or_inside_a_walcrypt_directory(tmp_path, name):
    factory = JOURNAL_FACTORIES[name]
    planned = tmp_path / "planned"                   # given to walcrypt_conf, not created yet
    make_conf(planned)
    with pytest.raises(UsageError, match="walcrypt"):
        factory(str(planned))
    assert not os.path.lexists(planned)
    with pytest.raises(UsageError, match="walcrypt"):
        factory(str(planned / "journal"))
    assert not os.path.lexists(planned)

    existing = tmp_path / "existing"                 # a store on disk this process never made a conf for
    walcrypt.open(str(existing), kek=KEK).close()
    before = sorted(os.listdir(existing))
    for target in (existing, existing / "journal", existing / "wal-v1-encrypted" / "journal"):
        with pytest.raises(UsageError, match="walcrypt"):
            factory(str(target))
    assert sorted(os.listdir(existing)) == before

    elsewhere = tmp_path / "plain.journal"           # anywhere else, pysyncobj's own journal as before
    j = factory(str(elsewhere))
    assert isinstance(j, pysyncobj.journal.FileJournal)
    j._destroy()
    assert os.path.isfile(elsewhere)


def test_create_journal_without_a_file_is_still_pysyncobjs_memory_journal(tmp_path):
    make_conf(tmp_path / "node")                    # the hooks are installed
    for create in (pysyncobj.createJournal, pysyncobj.syncobj.createJournal, pysyncobj.journal.createJournal):
        assert isinstance(create(None), pysyncobj.journal.MemoryJournal)


def test_a_plain_syncobjconf_pointing_at_a_walcrypt_directory_is_refused(tmp_path):
    path = tmp_path / "node"
    make_conf(path)
    walcrypt.open(str(path), kek=KEK).close()
    before = sorted(os.listdir(path))
    conf = SyncObjConf(journalFile=str(path / "journal"), password=PASSWORD, autoTick=False)
    with pytest.raises(UsageError, match="walcrypt_conf"):
        SyncObj(new_addr(), [], conf=conf)
    assert sorted(os.listdir(path)) == before


# ---------------------------------------------------------------------------------------------
# Without a transport password: a loud warning
# ---------------------------------------------------------------------------------------------


def test_no_password_warns_at_start(tmp_path, nodes, caplog):
    conf = make_conf(tmp_path / "node", password=None, autoTick=False)
    with caplog.at_level(logging.WARNING, logger="walcrypt.adapters.pysyncobj"):
        with pytest.warns(ps.InsecureTransportWarning, match="in clear"):
            nodes(new_addr(), conf)
    records = [r for r in caplog.records if r.name == "walcrypt.adapters.pysyncobj"]
    assert any(r.levelno == logging.WARNING and "password" in r.getMessage() for r in records)
    assert issubclass(ps.InsecureTransportWarning, UserWarning)


def test_the_warning_escalated_to_an_error_stops_the_start_before_anything_is_opened(tmp_path, nodes):
    path = tmp_path / "node"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ps.InsecureTransportWarning)
        with pytest.raises(ps.InsecureTransportWarning):
            SyncObj(new_addr(), [], conf=make_conf(path, password=None, autoTick=False))
    assert not os.path.lexists(path)                 # no store was created, none is held
    nodes(new_addr(), make_conf(path, autoTick=False))


def test_with_a_password_there_is_no_warning(tmp_path, nodes):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nodes(new_addr(), make_conf(tmp_path / "node", autoTick=False))
    assert not [w for w in caught if issubclass(w.category, ps.InsecureTransportWarning)]


# ---------------------------------------------------------------------------------------------
# A store is never left open by a tick thread or a constructor that ended early
# ---------------------------------------------------------------------------------------------


class ExplodingConsumer(SyncObjConsumer):
    def _destroy(self):
        raise RuntimeError("consumer teardown failed")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_consumer_whose_destroy_raises_does_not_leave_the_store_open(tmp_path, nodes):
    path = tmp_path / "node"
    addr = new_addr()
    conf, rd = make_conf(path), ReplDict()
    so = start_ready(nodes, addr, conf, [rd, ExplodingConsumer()])
    write(rd, "k", "v")
    so.destroy()                                     # the tick thread's _doDestroy raises in the consumer
    assert wait_until(lambda: conf.walcrypt.store.closed)
    rd2 = ReplDict()
    start_ready(nodes, addr, make_conf(path), [rd2])
    assert wait_until(lambda: rd2.rawData() == {"k": "v"})


def test_a_consumer_whose_destroy_raises_without_auto_tick(tmp_path, nodes):
    path = tmp_path / "node"
    conf = make_conf(path, autoTick=False)
    so = nodes(new_addr(), conf, [ExplodingConsumer()])
    with pytest.raises(RuntimeError, match="consumer teardown"):
        so.destroy()
    assert conf.walcrypt.store.closed
    make_conf(path).walcrypt.open_journal()._destroy()


@pytest.fixture
def taken_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_a_failed_bind_without_auto_tick_closes_the_store(tmp_path, nodes, taken_port):
    path = tmp_path / "node"
    conf = make_conf(path, autoTick=False, maxBindRetries=1, bindRetryTime=0.01)
    with pytest.raises(SyncObjException):
        SyncObj(taken_port, [], conf=conf)           # the journal was opened before the bind failed
    assert conf.walcrypt.store.closed
    nodes(new_addr(), make_conf(path, autoTick=False))


def test_a_failed_bind_with_auto_tick_closes_the_store(tmp_path, nodes, taken_port):
    path = tmp_path / "node"
    conf = make_conf(path, maxBindRetries=1, bindRetryTime=0.01)
    so = nodes(taken_port, conf)                     # returns; its tick thread ends at once
    tick_thread(so).join(timeout=30)
    assert conf.walcrypt.store.closed
    rd = ReplDict()
    start_ready(nodes, new_addr(), make_conf(path), [rd])


def test_the_store_closes_when_the_thread_that_built_the_node_ends(tmp_path, nodes):
    """pysyncobj's tick thread stops, without destroy(), once the thread that built the SyncObj
    has ended; the store it served is closed on the way out."""
    path = tmp_path / "node"
    conf, rd = make_conf(path), ReplDict()
    built = []
    builder = threading.Thread(target=lambda: built.append(nodes(new_addr(), conf, [rd])))
    builder.start()
    builder.join(timeout=30)
    assert built, "the builder thread did not start the node"
    t = tick_thread(built[0])
    t.join(timeout=30)
    assert not t.is_alive() and conf.walcrypt.store.closed
    j = make_conf(path).walcrypt.open_journal()
    assert len(j) >= 1
    j._destroy()


def test_a_failed_snapshot_save_is_logged_with_its_cause(tmp_path, monkeypatch, caplog):
    """pysyncobj's Serializer swallows the serializer's exception (it logs only "Failed to store
    full dump"): the adapter logs the cause."""
    import types
    node = make_conf(tmp_path / "node").walcrypt
    j = node.open_journal()
    node.syncobj = types.SimpleNamespace()
    for i in range(1, 4):
        j.add(b"cmd-%d" % i, i, 1)

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.store, "save_snapshot", full_disk)
    with caplog.at_level(logging.ERROR, logger="walcrypt.adapters.pysyncobj"):
        with pytest.raises(OSError):
            node.serialize(node.marker + ".tmp", (j[2], j[1], set()))
    assert any("No space left" in (r.exc_text or "") or (r.exc_info and "No space left" in str(r.exc_info[1]))
               for r in caplog.records if r.name == "walcrypt.adapters.pysyncobj")
    j._destroy()
