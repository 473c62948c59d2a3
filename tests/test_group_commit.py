"""Group commit under many writers: every acknowledged save is in the log, in order, none is lost or
doubled, no thread hangs, and units really combine requests (fewer fdatasyncs than saves) - with the
host sequencing indexes as a Raft leader does (an index handed out under a lock; a save that arrives
before its predecessor is refused as a gap, alone, and resubmitted)."""

from __future__ import annotations

import dis
import sys
import threading

import pytest

from walcrypt import Entry, HardState, UsageError
from walcrypt import wal as wal_mod

import wctest


def _hammer(s, threads: int, per_thread: int) -> tuple[list[int], list[BaseException]]:
    lock = threading.Lock()
    state = {"next": s.last_index() + 1}
    acked: list[int] = []
    errors: list[BaseException] = []

    def writer(tid: int) -> None:
        for _ in range(per_thread):
            with lock:
                index = state["next"]
                state["next"] += 1
            entry = Entry(index, 1, b"%d:%d" % (tid, index) * 40)
            for _attempt in range(10_000):                  # bounded: the predecessor is queued soon
                try:
                    s.save(HardState(1, 0, index), [entry])
                    break
                except UsageError as exc:
                    if "gap" not in str(exc):
                        errors.append(exc)
                        return
            else:
                errors.append(AssertionError(f"entry {index} was refused as a gap 10000 times"))
                return
            with lock:
                acked.append(index)

    ts = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a saving thread hung"
    return acked, errors


@pytest.mark.parametrize("threads", [4, 16])
def test_many_writers_every_acknowledged_save_is_durable_once(tmp_path, threads):
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch")
    per_thread = 60
    fsyncs_before = s.fsync_count
    acked, errors = _hammer(s, threads, per_thread)
    assert not errors, errors
    n = threads * per_thread
    assert sorted(acked) == list(range(1, n + 1))
    assert s.last_index() == n
    assert s.fsync_count - fsyncs_before < n, "no unit combined two saves: group commit is not grouping"
    s.close()
    with wctest.open_store(d) as s2:
        got = s2.entries(1, n + 1)
        assert [e.index for e in got] == list(range(1, n + 1))
        for e in got:                                        # each entry's own bytes, at its own index
            unit = e.data[:len(e.data) // 40]
            assert e.data == unit * 40 and unit.endswith(b":%d" % e.index)


def test_a_waiter_leads_itself_when_no_leader_names_it(tmp_path, monkeypatch):
    """The hand-over chain broken (a leader interrupted before naming the next one): a waiting
    requester leads itself after the wait, instead of sleeping forever."""
    monkeypatch.setattr(wal_mod, "LEADER_WAIT_S", 0.05)
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch")
    wal = s.wal
    with wal._queue_lock:
        wal._leader = wal_mod.Request([], 0, [], None, None)      # a leader that will never hand over
    s.save(HardState(1, 0, 1), [Entry(1, 1, b"still written")])
    assert s.entries(1, 2) == [Entry(1, 1, b"still written")]
    s.save(HardState(1, 0, 2), [Entry(2, 1, b"and the chain goes on")])
    s.close()
    with wctest.open_store(d) as s2:
        assert s2.last_index() == 2


def _after_queuing_point() -> int:
    """The instruction after the call that leaves ``with self._queue_lock`` once the request is
    queued in Wal.append: where an asynchronous exception (KeyboardInterrupt, a signal handler's)
    arriving during that call is raised."""
    ins = [x for x in dis.get_instructions(wal_mod.Wal.append) if x.opname != "CACHE"]
    i = next(k for k, x in enumerate(ins) if x.argval == "append" and ins[k - 1].argval == "_queue")
    j = next(k for k in range(i + 1, len(ins)) if ins[k].opname == "CALL" and ins[k].arg == 2)
    return ins[j + 1].offset


def _raise_in_append_at(offset: int, exc: BaseException):
    code = wal_mod.Wal.append.__code__

    def op(frame, event, arg):
        if event == "opcode" and frame.f_lasti == offset:
            frame.f_trace_opcodes = False
            raise exc
        return op

    def call(frame, event, arg):
        if frame.f_code is code:
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return op
        return None
    return call


def test_a_follower_interrupted_right_after_queuing_withdraws_its_save(tmp_path, monkeypatch):
    """A requester interrupted just after it queued (found by review): its request is withdrawn, so
    the leader neither writes it later nor names its gone thread the next leader (which made the next
    save wait for the takeover timeout)."""
    monkeypatch.setattr(wal_mod, "LEADER_WAIT_S", 30.0)    # a stall would show as a hang, caught below
    vfs = wctest.GateVFS()
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch", vfs=vfs)
    s.save(HardState(1, 0, 1), [Entry(1, 1, b"one")])
    results: dict = {}
    point = _after_queuing_point()

    def leader():
        s.save(None, [Entry(2, 1, b"two")])
        results["leader"] = "ok"

    def follower():
        sys.settrace(_raise_in_append_at(point, KeyboardInterrupt("arrived while queuing")))
        try:
            s.save(None, [Entry(3, 1, b"three, interrupted")])
            results["follower"] = "ok"
        except BaseException as exc:  # noqa: BLE001 - the injected interrupt
            results["follower"] = exc
        finally:
            sys.settrace(None)

    vfs.arm()                                           # the leader's unit waits inside its pwrite
    lt = threading.Thread(target=leader, daemon=True)
    lt.start()
    assert vfs.entered.wait(5)
    ft = threading.Thread(target=follower, daemon=True)
    ft.start()
    ft.join(5)
    assert isinstance(results.get("follower"), KeyboardInterrupt)
    vfs.gate.set()
    lt.join(5)
    assert results.get("leader") == "ok"
    assert s.last_index() == 2, "the interrupted (unacknowledged) save was written by a later leader"
    done = threading.Event()
    threading.Thread(target=lambda: (s.save(None, [Entry(3, 1, b"three, retried")]), done.set()),
                     daemon=True).start()
    assert done.wait(10), "the next save waited for a leader whose thread was gone"
    s.close()
    with wctest.open_store(d) as s2:
        assert s2.entries(1, 4) == [Entry(1, 1, b"one"), Entry(2, 1, b"two"), Entry(3, 1, b"three, retried")]
