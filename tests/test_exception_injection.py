"""Exception-injection enumeration: every VFS call and every metadata commit of an operation, each
of KeyboardInterrupt, MemoryError and an arbitrary application exception, raised before the call
and after it returned (DESIGN.md, "Trust principles": any exception that escapes from the middle
of a write unit or a multi-step operation fails the store; a (key, nonce) pair is never used
twice, whatever the caller does next).

For each operation below, a dry run counts its injection points: every call through the VFS
(any op kind -- writes, syncs, renames, unlinks, opens, closes, reads, directory listings) and
every LMDB write transaction (a step boundary the VFS does not see; "after" means after the
commit returned, before the engine acted on it).  Then, for each point k, for "before" and
"after", and for each exception kind, the operation is run from a fresh copy of a template
store with the exception raised at point k.  At that moment a copy of every segment and
snapshot file is taken.  Then the test acts as an application would:

1. the exception reached the caller unchanged (the leader's caller in a group commit; the other
   requesters of the unit get StoreFailedError); a KeyboardInterrupt is never swallowed;
2. it retries the operation and saves new data: each call either succeeds or is refused with
   StoreFailedError (the store is failed from the injection until it is reopened); reads work;
3. it closes the store (close() must not raise) and reopens it: recovery succeeds, the log,
   hard state and snapshot are one of the states the model allows (every entry whose save
   returned is there byte for byte, nothing is invented), and a new save survives a reopen;
4. finally every file in the data directory plus the copies taken at the injection are scanned
   for a (key, nonce) pair that sealed two different payloads (tests/noncescan.py).

Operations: a single save (which cuts a fresh segment after the open), a group commit of four
threads sharing one unit, segment rollover, suffix replacement below sealed segments, truncate,
compaction, save_snapshot ahead of the log (a log reset), a streamed snapshot (begin_snapshot,
write, commit) with retention, DEK rotation with a snapshot source (also one that destroys the
retired key: redaction, keyring commit, metadata compaction), full re-key, KEK rotation (three
retained snapshots copied under the new KEK, the commit, the old files removed, compaction),
close (sealing the active segment), migration of a plaintext store to encrypted, an open that
repairs a torn tail and seals the crashed segment, and an open that resumes a DEK rotation.

A second enumeration injects at the engine's own step boundaries instead: the places inside
``walcrypt`` code where CPython can deliver an asynchronous exception (after a call returns, on
entering a function, on a loop's backward jump), found with ``dis`` and raised from an opcode
trace event in every thread.  CI runs a sample of them per operation (KeyboardInterrupt and the
application exception); ``WALCRYPT_INJECT_LINES=all`` runs every one (some 50 000 runs, about
ten minutes).

Per-operation figures (points, runs, seconds) are printed with -s.
"""

from __future__ import annotations

import collections
import dis
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta, StoreFailedError
from walcrypt import meta as M

import noncescan
import snaptest as T
import wctest
from injectvfs import KINDS, InjectVFS
from logmodel import State, ents, observe

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
NEW_KEK = walcrypt.RawKey(bytes(reversed(wctest.KEK_BYTES)))
SEG = 4096
OPTS = dict(segment_size=SEG, snapshot_chunk_size=512, sync="always")
ENC = dict(kek=KEK, **OPTS)
CS = ConfState(voters=(1, 2, 3))
WHENS = ("before", "after")
MAX_POINTS = 400


@pytest.fixture(scope="module")
def shm_root(tmp_path_factory):
    """Everything runs on tmpfs where there is one (fsyncs cost nothing; durability is not under
    test here), else in pytest's tmp_path."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        d = tempfile.mkdtemp(prefix="walcrypt-inject-", dir=shm)
        yield pathlib.Path(d)
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("inject")


# ---------------------------------------------------------------------------------------------
# The model: what was acknowledged, and what an operation in doubt may have left
# ---------------------------------------------------------------------------------------------

def _fmt(st: State) -> str:
    return f"first={st.first} last={st.last} hs={tuple(st.hs)} snap={st.snap}"


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One injection run: the store, the model, and what the operation reported."""
    s: object
    vfs: InjectVFS
    root: str
    acked: State
    doubt: list = field(default_factory=list)   # states the operation in doubt may have produced
    in_action: bool = True                      # False once the application carries on

    def allowed(self) -> list[State]:
        return [self.acked] + [d for d in self.doubt if d != self.acked]


@dataclass
class Scenario:
    name: str
    template: str
    initial: State
    action: Callable                    # action(run): the operation under injection
    retry: Callable | None = None       # retry(run): the application tries again
    open_kw: dict = field(default_factory=lambda: dict(ENC))
    verify_kw: dict | None = None       # how the store is reopened afterwards (default: open_kw)
    pre: Callable | None = None         # pre(run): before arming
    extra_allowed: Callable | None = None   # extra_allowed(allowed states) -> more that recovery may reach
    at_open: bool = False               # the open itself is the operation (migration)
    open_model: Callable | None = None  # what an open that returns does to the state (at_open)
    verify_keks: tuple = (KEK,)         # KEKs to try at reopen, in order (KEK rotation)


def attempt(run: Run, model: Callable[[State], State], fn: Callable) -> None:
    """Run ``fn``, an operation whose effect on a state is ``model``.  Success: the acknowledged
    state and every state in doubt move on.  A refusal (StoreFailedError once the store is failed)
    writes nothing.  Any other exception leaves the operation itself in doubt."""
    before = [run.acked] + run.doubt
    try:
        fn()
    except StoreFailedError:
        if not (run.vfs.fired is not None and not run.in_action):
            run.doubt += [model(st) for st in before]
        raise
    except BaseException:
        run.doubt += [model(st) for st in before]
        raise
    run.acked, run.doubt = model(run.acked), [model(st) for st in run.doubt]


def do_save(run: Run, lo: int, hi: int, term: int = 1, hs: HardState | None = None) -> None:
    batch = ents(lo, hi, term)
    hs = hs or HardState(term, 1, hi - 1)
    attempt(run, lambda st: st.save(batch, hs), lambda: run.s.save(hard_state=hs, entries=batch))


def _template(root: pathlib.Path, name: str, build: Callable, **kw) -> str:
    d = str(root / "templates" / name)
    with walcrypt.open(d, **kw) as s:
        build(s)
    return d


def _fill(s, lo: int, hi: int, term: int = 1, step: int = 3) -> None:
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        s.save(hard_state=HardState(term, 1, b - 1), entries=ents(a, b, term))


def _filled(hi: int, snap=None, hs=None) -> State:
    return State(1, tuple(ents(1, hi)), hs or HardState(1, 1, hi - 1), snap)


def _source(store):
    idx = store.last_index()
    return SnapshotMeta(idx, store.term(idx), CS), T.snap_data(idx, 1500)


@pytest.fixture(scope="module")
def templates(shm_root):
    return build_templates(shm_root)


def build_templates(shm_root) -> dict:
    t = {}
    t["log"] = _template(shm_root, "log", lambda s: _fill(s, 1, 31), **ENC)

    def suffix(s):
        for a in range(1, 31, 3):
            s.save(hard_state=HardState(1, 1, min(a + 2, 10)), entries=ents(a, a + 3))
    t["suffix"] = _template(shm_root, "suffix", suffix, **ENC)

    def snap(s):
        _fill(s, 1, 31)
        s.save_snapshot(SnapshotMeta(15, 1, CS), T.snap_data(15, 1500))
    t["snap"] = _template(shm_root, "snap", snap, **ENC)
    t["snap-keep1"] = _template(shm_root, "snap-keep1", snap, keep_snapshots=1, **ENC)

    def plain(s):
        _fill(s, 1, 31)
        s.save_snapshot(SnapshotMeta(20, 1, CS), T.snap_data(20, 1500))
    t["plain"] = _template(shm_root, "plain", plain, encrypted=False, **OPTS)

    # A store as a crash leaves it: the active segment unsealed (manifest OPEN) and torn garbage
    # after its last commit; the next open repairs the tail and seals it (with the sequence jump).
    live, crashed = str(shm_root / "templates" / "live"), str(shm_root / "templates" / "crashed")
    s = walcrypt.open(live, **ENC)
    _fill(s, 1, 31)
    active = s.wal.active
    shutil.copytree(live, crashed)
    s.close()
    with open(os.path.join(crashed, os.path.relpath(active.path, live)), "r+b") as f:
        f.seek(active.write_offset)
        f.write(bytes(range(256)) * 2)              # not a frame of this segment: a torn tail
    t["crashed"] = crashed

    def pending(s):                                 # a DEK rotation waiting for its snapshot
        _fill(s, 1, 31)
        s.save_snapshot(SnapshotMeta(15, 1, CS), T.snap_data(15, 1500))
        s.rotate_dek()
    t["rotation-pending"] = _template(shm_root, "rotation-pending", pending, **ENC)

    def snaps3(s):                                  # three retained snapshots for a KEK rotation to copy
        _fill(s, 1, 31)
        for idx in (10, 20, 30):
            s.save_snapshot(SnapshotMeta(idx, 1, CS), T.snap_data(idx, 1500))
    t["snaps3"] = _template(shm_root, "snaps3", snaps3, keep_snapshots=3, **ENC)
    return t


def scenarios(t: dict) -> dict[str, Scenario]:
    log0 = _filled(31)
    snap0 = _filled(31, snap=(15, 1))
    out: dict[str, Scenario] = {}

    # -- a single save: the first after the open cuts a fresh segment, the second is one unit ----
    def save_action(run):
        do_save(run, 31, 34)
        do_save(run, 34, 36)
    out["save"] = Scenario("save", t["log"], log0, save_action, retry=lambda run: save_action(run))

    # -- group commit: four threads, one unit (the first after the open: it cuts a segment) ------
    def group_action(run):
        s, wal = run.s, run.s.wal
        batch = ents(31, 34)
        hss = [HardState(2, k, 31) for k in range(1, 4)]
        run.doubt = [run.acked.save(batch, h) for h in hss]
        results: dict = {}
        calls = {"entries": lambda: s.save(entries=batch)}
        calls.update({f"hs{k}": (lambda h=h: s.save(hard_state=h)) for k, h in enumerate(hss)})

        def go(name, fn):
            enter = getattr(run.vfs, "enter_thread", None)
            if enter is not None:
                enter()                           # the line injector traces this thread as well
            try:
                fn()
                results[name] = "ok"
            except BaseException as exc:  # noqa: BLE001 - inspected below
                results[name] = exc

        threads = [threading.Thread(target=go, args=kv, name=kv[0]) for kv in calls.items()]
        with wal.write_lock:                          # every request queues before the leader starts
            for th in threads:
                th.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:    # bounded
                with wal._queue_lock:
                    if len(wal._queue) == len(threads):
                        break
                time.sleep(0.0005)
            run.vfs.arm_pending()                 # injection counts from the leader's first call
        for th in threads:
            th.join(timeout=30)
        assert not any(th.is_alive() for th in threads), "a saving thread hung"
        fired = run.vfs.fired
        injected = [r for r in results.values() if r is fired and fired is not None]
        others = [r for r in results.values() if r is not fired]
        assert len(injected) == (1 if fired is not None else 0), \
            f"the injected exception reached {len(injected)} callers: {results}"
        assert all(r == "ok" or isinstance(r, StoreFailedError) for r in others), \
            f"the other requesters of the unit must get StoreFailedError (or success): {results}"
        if any(r == "ok" for r in results.values()):       # the unit was written: all of it
            written = run.doubt
            run.acked, run.doubt = written[0], written[1:]
        if fired is not None:
            raise fired

    def group_retry(run):
        do_save(run, 31, 34, hs=HardState(2, 3, 31))
    out["group-commit"] = Scenario("group-commit", t["log"], log0, group_action, retry=group_retry,
                                   open_kw=dict(kek=KEK, segment_size=SEG, sync="batch"))

    # -- rollover: seals and cuts while saving ---------------------------------------------------
    def rollover(run):
        for k in range(10):                       # about 5 KiB: at least one seal and cut at 4 KiB
            do_save(run, 31 + 4 * k, 35 + 4 * k)
    out["rollover"] = Scenario("rollover", t["log"], log0, rollover, retry=rollover)

    # -- suffix replacement below sealed segments (the active segment is sealed first) ------------
    suffix0 = State(1, tuple(ents(1, 31)), HardState(1, 1, 10))

    def active(run):                                # a segment written in this lifetime, to be sealed
        do_save(run, 31, 34, hs=HardState(run.acked.hs.term, 1, min(run.acked.hs.commit, 30)))

    def replace_action(run):
        do_save(run, 12, 16, term=2, hs=HardState(2, 1, 10))
        do_save(run, 16, 18, term=2, hs=HardState(2, 1, 10))
    out["suffix-replace"] = Scenario("suffix-replace", t["suffix"], suffix0, replace_action, retry=replace_action,
                                     pre=active)

    # -- truncate ----------------------------------------------------------------------------------
    def truncate(run):
        attempt(run, lambda st: st.truncate(20), lambda: run.s.truncate(20))
    out["truncate"] = Scenario("truncate", t["suffix"], suffix0, truncate, retry=truncate, pre=active)

    # -- compaction ----------------------------------------------------------------------------------
    def compact(run):
        attempt(run, lambda st: st.compact(25), lambda: run.s.compact(25))

    def compact_retry(run):
        if run.s.first_index() <= 25:
            compact(run)
    out["compact"] = Scenario("compact", t["log"], log0, compact, retry=compact_retry, pre=active)

    # -- save_snapshot ahead of the log (a snapshot from the leader resets the log) --------------
    def snap_ahead_retry(run):
        attempt(run, lambda st: st.snapshot(60, 3),
                lambda: run.s.save_snapshot(SnapshotMeta(60, 3, CS), T.snap_data(60, 1500)))

    def snap_ahead(run):
        snap_ahead_retry(run)
        do_save(run, 61, 63, term=3)
    out["snapshot-ahead"] = Scenario("snapshot-ahead", t["snap"], snap0, snap_ahead, retry=snap_ahead_retry,
                                     pre=active)

    # -- a streamed snapshot inside the log, retention deleting the older one ------------------------
    def streamed(run):
        def go():
            data = T.snap_data(30, 1500)
            w = run.s.begin_snapshot(SnapshotMeta(30, 1, CS))
            for a in range(0, len(data), 700):
                w.write(data[a:a + 700])
            w.commit()
        attempt(run, lambda st: st.snapshot(30, 1), go)
    keep1 = dict(kek=KEK, keep_snapshots=1, **OPTS)
    out["snapshot-stream"] = Scenario("snapshot-stream", t["snap-keep1"], snap0, streamed, retry=streamed,
                                      open_kw=keep1)

    # -- DEK rotation with a snapshot source --------------------------------------------------------
    rot_kw = dict(kek=KEK, snapshot_source=_source, **OPTS)
    def rotated(st: State) -> State:
        """A DEK rotation with a source completes with a snapshot at the last index: now, or when a
        reopen resumes it (at whatever the last index is by then)."""
        if st.last < st.first:
            return st
        return replace(st.compact(st.last), snap=(st.last, st.entries[-1].term))

    def rotate(run):
        attempt(run, rotated, run.s.rotate_dek)
    out["rotate-dek"] = Scenario("rotate-dek", t["snap"], snap0, rotate, open_kw=rot_kw, pre=active,
                                 extra_allowed=lambda states: [rotated(st) for st in states])

    # -- full re-key ---------------------------------------------------------------------------------
    def rekey(run):
        run.s.rekey()
    out["rekey"] = Scenario("rekey", t["snap"], snap0, rekey, retry=rekey, pre=active)

    # -- KEK rotation: three retained snapshots copied under the new KEK, the commit, the old files
    #    removed, the metadata file scrubbed -----------------------------------------------------------
    def rotate_kek(run):
        run.s.rotate_kek(NEW_KEK)
    keep3 = dict(kek=KEK, keep_snapshots=3, **OPTS)
    out["rotate-kek"] = Scenario("rotate-kek", t["snaps3"], _filled(31, snap=(30, 1)), rotate_kek,
                                 open_kw=keep3, verify_keks=(NEW_KEK, KEK))

    # -- DEK rotation that destroys the retired key: the quarantined copies redacted, the keyring
    #    record overwritten, the metadata file scrubbed -------------------------------------------------
    destroy_kw = dict(kek=KEK, snapshot_source=_source, destroy_retired_keys=True, **OPTS)
    out["rotate-dek-destroy"] = Scenario("rotate-dek-destroy", t["snap"], snap0, rotate, open_kw=destroy_kw,
                                         pre=active, extra_allowed=lambda states: [rotated(st) for st in states])

    # -- close: seals the active segment ---------------------------------------------------------------
    def close(run):
        run.s.close()
    out["close"] = Scenario("close", t["log"], log0, close, pre=active)

    # -- migration: walcrypt.open(plaintext store, kek=..., migrate=True) ---------------------------------------
    plain0 = _filled(31, snap=(20, 1))

    def nothing(run):
        pass                                        # the open is the operation
    out["migrate"] = Scenario("migrate", t["plain"], plain0, nothing, at_open=True,
                              retry=lambda run: None, open_kw=dict(ENC, migrate=True))

    # -- open after a crash: torn-tail repair (.broken copy, truncate) and sealing with the jump ------
    out["open-recover"] = Scenario("open-recover", t["crashed"], log0, nothing, at_open=True,
                                   retry=lambda run: None)

    # -- open resuming a DEK rotation: the source is asked, the snapshot saved, the key promoted ----
    out["open-resume-rotation"] = Scenario("open-resume-rotation", t["rotation-pending"], snap0, nothing,
                                           at_open=True, retry=lambda run: None, open_kw=rot_kw,
                                           open_model=rotated,
                                           extra_allowed=lambda states: [rotated(st) for st in states])
    return out


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------

_CURRENT: list = [None]
_LAST_INJ: list = []         # the injector of the latest run (for diagnostics)      # the InjectVFS of the run in progress (LMDB commits report to it)


@contextmanager
def _lmdb_steps():
    """Make every LMDB write transaction an injection point of the current run."""
    orig = M.Meta.write

    @contextmanager
    def write(self):
        vfs = _CURRENT[0]
        if vfs is None:
            with orig(self) as tx:
                yield tx
            return
        vfs.step("lmdb-commit", "before")
        with orig(self) as tx:
            yield tx
        vfs.step("lmdb-commit", "after")

    M.Meta.write = write
    try:
        yield
    finally:
        M.Meta.write = orig


def _copy_files(root: str, dst: str) -> None:
    """A copy of every segment and snapshot file (staging, .broken and .tmp- files included)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith((".wal", ".snap", ".broken", ".unlisted")) or name.startswith(".tmp-"):
                src = os.path.join(dirpath, name)
                out = os.path.join(dst, os.path.relpath(src, root))
                os.makedirs(os.path.dirname(out), exist_ok=True)
                try:
                    shutil.copyfile(src, out)
                except FileNotFoundError:
                    pass


class LineInjector:
    """Injection at step boundaries inside the engine's own code: at the k-th point where the
    interpreter could deliver an asynchronous exception (KeyboardInterrupt, an exception raised by
    a signal handler) while running a ``walcrypt`` module, that exception is raised.  CPython
    delivers them when a call returns, on a backward jump and on entering a function, so the
    points are the instructions that follow a call or a function's RESUME, and loop heads
    (found with ``dis``; raised from an opcode trace event, in every thread).  An exception raised
    there sits in the same try/with region as the real one would, unlike one raised at the start
    of a line (which may fall outside a ``with`` block's cleanup region or inside an inlined
    ``finally``, places a real signal never reaches).

    Shares InjectVFS's interface (count/fired/arm/disarm), so the same runs and checks apply;
    file operations go to the real file system through an unarmed InjectVFS."""

    def __init__(self):
        self.vfs = InjectVFS()                     # the VFS the store uses (never armed itself)
        self.count = 0
        self.fired: BaseException | None = None
        self.fired_op: str | None = None
        self._k: int | None = None
        self._active = False
        self._exc_type: type[BaseException] = KeyboardInterrupt
        self._on_fire = None
        self.trace: list | None = None

    def count_calls(self):
        self._start(None, KeyboardInterrupt, None)

    def arm(self, k, when, exc_type, on_fire=None):
        self._start(k, exc_type, on_fire)

    def _start(self, k, exc_type, on_fire):
        self.count, self._k, self._exc_type, self._on_fire, self.fired = 0, k, exc_type, on_fire, None
        self.fired_in_host = False
        self._active = True
        threading.settrace(self._call)
        sys.settrace(self._call)
        # Engine frames already running (a group-commit follower waiting for the write lock) are
        # traced from here on too; their threads called enter_thread() when they started.
        for top in sys._current_frames().values():
            f = top
            while f is not None:
                if f.f_code.co_filename.startswith(_ENGINE_DIR):
                    f.f_trace, f.f_trace_opcodes, f.f_trace_lines = self._opcode, True, False
                f = f.f_back

    def enter_thread(self):
        """Trace the calling thread too (a thread started before arming)."""
        sys.settrace(self._call)

    def disarm(self):
        self._active = False
        sys.settrace(None)
        threading.settrace(None)

    def _call(self, frame, event, arg):
        if self._active and frame.f_code.co_filename.startswith(_ENGINE_DIR):
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return self._opcode
        return None

    def _opcode(self, frame, event, arg):
        if not self._active:
            return None
        if event != "opcode" or frame.f_lasti not in _delivery_points(frame.f_code):
            return self._opcode
        self.count += 1
        if self.count == self._k:
            self._active = False
            code = frame.f_code
            self.fired_op = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}"
            f = frame
            while f is not None and not self.fired_in_host:   # inside the host's snapshot source?
                self.fired_in_host = f.f_code is _source.__code__
                f = f.f_back
            exc = self.fired = self._exc_type(f"injected at {self.fired_op}")
            if self._on_fire is not None:
                self._on_fire()
            raise exc
        return self._opcode

    def step(self, name, when):                    # commits are ordinary code here
        pass

    def close_leftovers(self):
        return self.vfs.close_leftovers()


_ENGINE_DIR = os.path.dirname(os.path.abspath(walcrypt.__file__)) + os.sep
_POINTS: dict = {}
_AFTER = {"CALL", "CALL_FUNCTION_EX", "RESUME"}


def _delivery_points(code) -> frozenset:
    """Offsets of the instructions that follow a call (or a function's RESUME), and the targets of
    backward jumps: where CPython checks for a pending asynchronous exception.

    A real one is raised by the call instruction itself, after the callee returned; ours is raised
    at the next instruction.  The two agree only where both lie in the same exception-handling
    regions, so a point whose next instruction leaves the call's region (``return f()`` as the
    last statement of a ``try``, a ``with`` block's exit) is left out rather than tested wrongly."""
    found = _POINTS.get(code)
    if found is None:
        ins = list(dis.get_instructions(code))
        table = getattr(dis, "_parse_exception_table", None)
        entries = table(code) if table is not None else []

        def regions(offset: int) -> tuple:
            return tuple((e.start, e.end, e.target) for e in entries if e.start <= offset < e.end)

        out = {ins[i + 1].offset for i, x in enumerate(ins[:-1])
               if x.opname in _AFTER and regions(x.offset) == regions(ins[i + 1].offset)}
        out |= {x.argval for x in ins
                if x.opname.startswith("JUMP_BACKWARD") and regions(x.offset) == regions(x.argval)}
        found = _POINTS[code] = frozenset(out)
    return found


class _SourceFailures(logging.Handler):
    """Collects the engine's warnings that a snapshot source failed while a rotation resumed."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def seen(self, exc: BaseException) -> bool:
        return any("snapshot source failed" in m and str(exc) in m for m in self.messages)


def run_point(sc: Scenario, work: str, k: int | None, when: str, kind: str,
              lines: bool = False) -> tuple[bool, int, list[str]]:
    """Run ``sc`` with the exception ``kind`` at injection point ``k`` (None: a dry run counting the
    points); ``lines``: the points are executed lines of the engine, not VFS calls and commits.
    -> (fired, points counted, problems)"""
    root, copies = os.path.join(work, "data"), os.path.join(work, "copies")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(sc.template, root)
    os.makedirs(copies)
    inj = LineInjector() if lines else InjectVFS()
    _LAST_INJ[:] = [inj]
    vfs = inj.vfs if lines else inj
    if k is None:
        inj.trace = []
    exc_type = KINDS[kind]
    problems: list[str] = []
    label = f"{sc.name}: {kind} {'at line' if lines else when} point {k}"

    def arm():
        if k is None:
            inj.count_calls()
        else:
            inj.arm(k, when, exc_type, on_fire=lambda: _copy_files(root, copies))

    inj.arm_pending = arm                         # group commit arms once its requests are queued
    run = Run(None, inj, root, sc.initial)
    _CURRENT[0] = None if lines else inj
    raised: BaseException | None = None
    tolerated = False
    source_failure = _SourceFailures()
    logging.getLogger("walcrypt").addHandler(source_failure)
    try:
        if sc.at_open:
            arm()
            if sc.open_model is not None:
                run.doubt = [sc.open_model(run.acked)]
        try:
            run.s = walcrypt.open(root, vfs=vfs, **sc.open_kw)
            # The host's snapshot source failing at open is logged and tolerated by design (the
            # rotation stays pending, the next open asks again); a KeyboardInterrupt never is.
            tolerated = (inj.fired is not None and kind != "KeyboardInterrupt"
                         and (getattr(inj, "fired_in_host", False) or source_failure.seen(inj.fired)))
            if sc.at_open and sc.open_model is not None and not tolerated:
                run.acked, run.doubt = sc.open_model(run.acked), []
            if sc.pre is not None and not sc.at_open:
                inj.disarm()
                sc.pre(run)
                if sc.name != "group-commit":
                    arm()
            elif not sc.at_open and sc.name != "group-commit":
                arm()
            sc.action(run)
        except BaseException as exc:  # noqa: BLE001 - judged below
            raised = exc
        counted = inj.count
        inj.disarm()
        fired = inj.fired is not None
        if k is None:
            if raised is not None:
                problems.append(f"{label}: the dry run raised {raised!r}")
            if run.s is not None:
                run.s.close()
            run_point.last_trace = list(inj.trace or ())
            return False, counted, problems
        # 1. the caller got the injected exception itself
        if fired:
            if raised is None and not tolerated:
                problems.append(f"{label}: the injected exception at {inj.fired_op} was swallowed")
            elif raised is not inj.fired and not (raised is None and tolerated):
                problems.append(f"{label}: the operation raised {raised!r} instead of the injected "
                                f"{inj.fired!r} ({inj.fired_op})")
        elif raised is not None:
            problems.append(f"{label}: raised {raised!r} without an injection")
        # 2. the application carries on
        run.in_action = False
        s = run.s
        if sc.at_open and raised is not None:      # the open failed: the application opens again
            try:
                s = run.s = walcrypt.open(root, vfs=vfs, **sc.open_kw)
                if sc.open_model is not None:
                    run.acked, run.doubt = sc.open_model(run.acked), []
            except BaseException as exc:  # noqa: BLE001
                problems.append(f"{label}: opening again after the injection failed: {exc!r}")
                return fired, counted, problems
        if s is not None and not s.closed:
            if sc.retry is not None:
                try:
                    sc.retry(run)
                except StoreFailedError:
                    pass
                except BaseException as exc:  # noqa: BLE001
                    problems.append(f"{label}: the retry raised {exc!r} (expected success or StoreFailedError)")
            try:
                nxt = s.last_index() + 1
                do_save(run, nxt, nxt + 2, term=max(5, run.acked.hs.term))
            except StoreFailedError:
                pass
            except BaseException as exc:  # noqa: BLE001
                problems.append(f"{label}: a new save raised {exc!r} (expected success or StoreFailedError)")
            try:
                if s.last_index() >= s.first_index():
                    s.entries(s.first_index(), s.last_index() + 1)
            except BaseException as exc:  # noqa: BLE001
                problems.append(f"{label}: reading after the injection raised {exc!r}")
        if s is not None:
            try:
                s.close()
            except BaseException as exc:  # noqa: BLE001
                problems.append(f"{label}: close() raised {exc!r}")
        inj.close_leftovers()
        _CURRENT[0] = None
        # 3. reopen: recovery, the model, and a new save that survives
        problems += _verify(sc, run, root, label)
        # 4. no (key, nonce) pair sealed two different payloads
        found = noncescan.scan(root, copies)
        if found.reuses():
            problems.append(f"{label}: NONCE REUSE\n{found.describe()}")
        if found.sealed == 0 and sc.name != "migrate":
            problems.append(f"{label}: the scan found no sealed payload at all")
        return fired, counted, problems
    finally:
        _CURRENT[0] = None
        inj.disarm()
        inj.close_leftovers()
        logging.getLogger("walcrypt").removeHandler(source_failure)


def _verify(sc: Scenario, run: Run, root: str, label: str) -> list[str]:
    kw = dict(sc.verify_kw or sc.open_kw)
    kw.pop("kek", None)
    allowed = run.allowed()
    allowed += sc.extra_allowed(allowed) if sc.extra_allowed else []
    last_exc = None
    for kek in sc.verify_keks:
        try:
            with walcrypt.open(root, kek=kek, **kw) as s2:
                got = observe(s2)
                if got not in allowed:
                    return [f"{label}: the reopened store holds {_fmt(got)}; allowed: "
                            + "; ".join(_fmt(a) for a in allowed)]
                nxt = s2.last_index() + 1
                s2.save(hard_state=HardState(50, 2, nxt), entries=[Entry(nxt, 50, b"after the reopen")])
            with walcrypt.open(root, kek=kek, **kw) as s3:
                if s3.entries(nxt, nxt + 1) != [Entry(nxt, 50, b"after the reopen")]:
                    return [f"{label}: a save after the reopen did not survive"]
            return []
        except walcrypt.WrongKeyError as exc:
            last_exc = exc
        except BaseException as exc:  # noqa: BLE001
            return [f"{label}: reopening failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]
    return [f"{label}: no KEK opens the store: {last_exc}"]


# ---------------------------------------------------------------------------------------------
# The enumeration
# ---------------------------------------------------------------------------------------------

def enumerate_scenario(sc: Scenario, work: str, kinds=tuple(KINDS)) -> tuple[int, int, list[str]]:
    """-> (injection points, runs, problems)"""
    _fired, points, problems = run_point(sc, work, None, "before", "InjectedError")
    assert not problems, problems
    kinds_seen = collections.Counter(run_point.last_trace)
    print(f"\n{sc.name}: points by kind: " + ", ".join(f"{c} {n}" for c, n in sorted(kinds_seen.items())))
    if os.environ.get("WALCRYPT_INJECT_TRACE"):
        print(" ".join(run_point.last_trace))
    assert 0 < points <= MAX_POINTS, f"{sc.name}: {points} injection points"
    runs = 0
    for kind in kinds:
        for when in WHENS:
            for k in range(1, points + 1):
                fired, _n, probs = run_point(sc, work, k, when, kind)
                runs += 1
                problems += probs
                if not fired:
                    problems.append(f"{sc.name}: {kind} {when} point {k} of {points} never fired")
    return points, runs, problems


SCENARIOS = ["save", "group-commit", "rollover", "suffix-replace", "truncate", "compact", "snapshot-ahead",
             "snapshot-stream", "rotate-dek", "rotate-dek-destroy", "rekey", "rotate-kek", "close", "migrate",
             "open-recover", "open-resume-rotation"]


@pytest.fixture(scope="module")
def figures():
    table: dict = {}
    yield table
    vfs = {k: v for k, v in table.items() if not k.startswith("lines:")}
    lines = {k: v for k, v in table.items() if k.startswith("lines:")}
    if vfs:
        print(f"\nexception injection at VFS calls and metadata commits: {len(vfs)} operations, "
              f"{sum(v[0] for v in vfs.values())} injection points x {len(WHENS)} (before/after) x {len(KINDS)} "
              f"exception kinds = {sum(v[1] for v in vfs.values())} runs in {sum(v[2] for v in vfs.values()):.1f} s")
    if lines:
        print(f"\nexception injection at engine step boundaries: {len(lines)} operations, "
              f"{sum(v[0] for v in lines.values())} points, {sum(v[1] for v in lines.values())} runs "
              f"({', '.join(LINE_KINDS)}) in {sum(v[2] for v in lines.values()):.1f} s")


@pytest.mark.parametrize("name", SCENARIOS)
def test_exception_at_every_injection_point(name, templates, shm_root, figures):
    sc = scenarios(templates)[name]
    work = str(shm_root / f"work-{name}")
    t0 = time.monotonic()
    with _lmdb_steps():
        points, runs, problems = enumerate_scenario(sc, work)
    elapsed = time.monotonic() - t0
    figures[name] = (points, runs, elapsed)
    print(f"\n{name}: {points} injection points, {runs} runs, {elapsed:.1f} s")
    shutil.rmtree(work, ignore_errors=True)
    assert not problems, f"{len(problems)} problems in {runs} runs:\n" + "\n".join(problems[:15])


# ---------------------------------------------------------------------------------------------
# Step boundaries inside the engine: every executed line (sampled in CI)
# ---------------------------------------------------------------------------------------------

# Points per operation and exception kind in CI; WALCRYPT_INJECT_LINES=all runs every line.
LINE_BUDGET = 40
LINE_KINDS = ("KeyboardInterrupt", "InjectedError")


def enumerate_lines(sc: Scenario, work: str) -> tuple[int, int, list[str]]:
    """-> (lines counted, runs, problems)"""
    _fired, points, problems = run_point(sc, work, None, "line", "InjectedError", lines=True)
    assert not problems, problems
    if os.environ.get("WALCRYPT_INJECT_LINES") == "all":
        ks = range(1, points + 1)
    else:
        stride = max(1, points // LINE_BUDGET)
        # a fixed offset per operation, so successive CI runs need not agree but one run is reproducible
        ks = range(1 + zlib.crc32(sc.name.encode()) % stride, points + 1, stride)
    runs = 0
    for kind in LINE_KINDS:
        for k in ks:
            fired, _n, probs = run_point(sc, work, k, "line", kind, lines=True)
            runs += 1
            problems += probs
    return points, runs, problems


@pytest.mark.parametrize("name", SCENARIOS)
def test_exception_at_engine_step_boundaries(name, templates, shm_root, figures):
    sc = scenarios(templates)[name]
    work = str(shm_root / f"lines-{name}")
    t0 = time.monotonic()
    points, runs, problems = enumerate_lines(sc, work)
    elapsed = time.monotonic() - t0
    figures[f"lines:{name}"] = (points, runs, elapsed)
    print(f"\n{name}: {points} engine step boundaries, {runs} runs, {elapsed:.1f} s")
    shutil.rmtree(work, ignore_errors=True)
    assert not problems, f"{len(problems)} problems in {runs} runs:\n" + "\n".join(problems[:15])
