"""Crash-point enumeration (walcrypt.testing.CrashVFS) for every multi-step operation of the engine.

For each operation below and each VFS call kind in OPS, the n-th call (n = 1, 2, ... until no
crash fires, bounded) is made a power loss, before or after the call; unsynced writes are then
either dropped (torn=False) or torn into a random subset of their 512-byte sectors (torn=True);
the store is reopened with the real VFS and compared with a model of what was acknowledged:
every entry whose save returned is there byte for byte, nothing else is invented, and the
operation in flight either took effect or did not (a DEK rotation may also be resumable: the
engine finishes it at open).

Operations: segment cut (rollover while saving), seal on close, suffix truncation (save with an
earlier index), compaction, snapshot publish with retention deleting the older snapshot, DEK
rotation with ``snapshot_source(store)``, KEK rotation (without snapshots; with them in
tests/test_kek_rotation.py), and migration (``walcrypt.open`` on a
plaintext store with a KEK).

What is already covered elsewhere is not repeated: tests/test_faults.py (saves at every pwrite,
fdatasync, fsync_dir, ftruncate, preallocate point), tests/test_snapshots.py (save_snapshot at
fdatasync/fsync_dir/rename/pwrite), tests/test_rotation.py (DEK rotation at fdatasync/fsync_dir/
rename/unlink) and tests/test_migration.py (migration at fdatasync/fsync_dir/rename).  Here the
rotation and the migration run at the remaining call kinds, every case both torn and not.

LMDB commits happen outside the VFS: CrashVFS takes them as durable when they return, so the
metadata is always the one of the crash point.  Losing an LMDB commit itself is covered by the
FUSE power-loss tests (a separate suite).
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import tempfile
from dataclasses import dataclass, replace
from typing import Callable

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta
from walcrypt.testing import CrashVFS, SimulatedCrash

import snaptest as T
import wctest
from logmodel import State, ents, observe

OPS = ("pwrite", "fdatasync", "fsync_dir", "rename", "unlink", "ftruncate", "preallocate")
KEK = walcrypt.RawKey(wctest.KEK_BYTES)
NEW_KEK = walcrypt.RawKey(bytes(reversed(wctest.KEK_BYTES)))
SEG = 4096
OPTS = dict(segment_size=SEG, snapshot_chunk_size=512, sync="always")
CS = ConfState(voters=(1, 2, 3))


@pytest.fixture
def tmp_path(tmp_path):
    """CrashVFS models the power loss itself, so the real disk's durability plays no part here: run on
    tmpfs where there is one (fsyncs then cost nothing), else in pytest's tmp_path."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="walcrypt-crash-points-", dir=shm)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Model:
    """What was acknowledged, and the state the operation in flight would leave."""

    def __init__(self, state: State):
        self.acked = state
        self.inflight: State | None = None

    def attempt(self, new: State) -> None:
        self.inflight = new

    def ack(self) -> None:
        if self.inflight is not None:
            self.acked, self.inflight = self.inflight, None

    def allowed(self) -> list[State]:
        return [self.acked] + ([self.inflight] if self.inflight is not None else [])




def save(s, m: Model, lo: int, hi: int, term: int = 1) -> None:
    batch = ents(lo, hi, term)
    hs = HardState(term, 1, hi - 1)
    m.attempt(m.acked.save(batch, hs))
    s.save(hard_state=hs, entries=batch)
    m.ack()


def save_snapshot(s, m: Model, index: int, term: int) -> None:
    m.attempt(m.acked.snapshot(index, term))
    s.save_snapshot(SnapshotMeta(index, term, CS), T.snap_data(index, 1500))
    m.ack()


# ---------------------------------------------------------------------------------------------
# The enumeration
# ---------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    template: str                                     # a store built once, copied per crash point
    initial: State                                    # what the template holds
    action: Callable                                  # action(store, model, cv) -> None
    open_kw: dict                                     # how the action opens the store
    verify_kw: dict                                   # how the store is reopened afterwards
    extra_check: Callable | None = None               # extra_check(reopened store, model)
    pre: Callable | None = None                       # pre(store, model): before the crash is armed
    arm_at_open: bool = False                         # the open itself is the operation (migration)


def _run_point(sc: Scenario, root: str, op: str, n: int, when: str, torn: bool, hold: str):
    """One crash point.  -> (fired, problem or None)"""
    shutil.copytree(sc.template, root)
    cv = CrashVFS(holding_root=hold)
    m = Model(sc.initial)
    s = None
    try:
        if sc.arm_at_open:
            cv.arm_crash(op, n, when)
        s = walcrypt.open(root, vfs=cv, **sc.open_kw)
        if sc.arm_at_open:
            sc.action(s, m, cv)
            return _after_action(sc, root, cv, m, op, n, when, torn, s)
        if sc.pre is not None:
            sc.pre(s, m)
        cv.arm_crash(op, n, when)
        sc.action(s, m, cv)
    except SimulatedCrash:
        pass
    return _after_action(sc, root, cv, m, op, n, when, torn, s)


def _after_action(sc: Scenario, root: str, cv, m: Model, op: str, n: int, when: str, torn: bool, s):
    if s is not None:
        try:
            s.close()
        except SimulatedCrash:
            pass
    fired = cv.crashed
    if fired:
        cv.crash(torn=torn, rng=random.Random(n * 31 + torn))
    else:
        cv.shutdown()
    label = f"{sc.name}: crash {when} {op} #{n} torn={torn}"
    try:
        with walcrypt.open(root, **sc.verify_kw) as s2:
            got = observe(s2)
            if got not in m.allowed():
                return fired, (f"{label}: store holds first={got.first} last={got.last} hs={got.hs} "
                               f"snap={got.snap}; allowed: "
                               + "; ".join(f"first={a.first} last={a.last} hs={a.hs} snap={a.snap}"
                                           for a in m.allowed()))
            if sc.extra_check is not None:
                sc.extra_check(s2, m)
            nxt = s2.last_index() + 1
            s2.save(hard_state=HardState(50, 2, nxt), entries=[Entry(nxt, 50, b"after-the-crash")])
        with walcrypt.open(root, **sc.verify_kw) as s3:
            assert s3.entries(nxt, nxt + 1) == [Entry(nxt, 50, b"after-the-crash")]
    except (AssertionError, walcrypt.WalcryptError) as exc:
        return fired, f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return fired, None


def enumerate_points(sc: Scenario, tmp_path, ops=OPS, max_n: int = 60) -> tuple[int, list[str], dict]:
    """Every crash point of ``sc`` for ``ops``.  -> (points run, problems, points per op)"""
    problems: list[str] = []
    per_op: dict[str, int] = {}
    runs = 0
    for op in ops:
        per_op[op] = 0
        for when in ("before", "after"):
            for n in range(1, max_n + 1):
                fired_any = False
                for torn in (False, True):
                    root = str(tmp_path / f"{op}-{when}-{n}-{int(torn)}")
                    fired, problem = _run_point(sc, root, op, n, when, torn, str(tmp_path))
                    shutil.rmtree(root, ignore_errors=True)
                    runs += 1
                    if problem:
                        problems.append(problem)
                    if not fired:
                        break
                    fired_any = True
                    per_op[op] += 1
                if not fired_any:
                    break
            else:
                pytest.fail(f"{sc.name}: {op} {when}: crashes still firing after {max_n} points")
    print(f"\n{sc.name}: {sum(per_op.values())} crash points fired ({runs} runs): {per_op}")
    return runs, problems, per_op


def _template(tmp_path_factory, name: str, build: Callable, **kw) -> str:
    d = str(tmp_path_factory.mktemp("crash-tpl") / name)
    with walcrypt.open(d, **kw) as s:
        build(s)
    return d


def _fill(s, lo: int, hi: int, term: int = 1, step: int = 3) -> None:
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        s.save(hard_state=HardState(term, 1, b - 1), entries=ents(a, b, term))


def _state_after_fill(hi: int, term: int = 1, snap=None) -> State:
    return State(1, tuple(ents(1, hi, term)), HardState(term, 1, hi - 1), snap)


@pytest.fixture(scope="module")
def log_template(tmp_path_factory):
    """Entries 1..30 (three sealed segments' worth at 4 KiB), closed."""
    return _template(tmp_path_factory, "log", lambda s: _fill(s, 1, 31), kek=KEK, **OPTS)


def _check(sc: Scenario, tmp_path, ops=OPS, *, expect_ops=(), max_n: int = 60) -> dict:
    runs, problems, per_op = enumerate_points(sc, tmp_path, ops, max_n)
    for op in expect_ops:
        assert per_op.get(op), f"{sc.name}: no crash point found for {op} (per op: {per_op})"
    assert not problems, f"{len(problems)} of {runs} crash points failed:\n" + "\n".join(problems[:12])
    return per_op


ENC = dict(kek=KEK, **OPTS)


# ---------------------------------------------------------------------------------------------
# Log operations
# ---------------------------------------------------------------------------------------------

def test_segment_cut_rollover(log_template, tmp_path):
    """Saves after an open: the first cuts a fresh segment, later ones fill it and roll over."""
    def action(s, m, cv):
        for k in range(10):                              # 10 units: at least one rollover at 4 KiB
            lo = 31 + 3 * k
            save(s, m, lo, lo + 3)
    sc = Scenario("rollover", log_template, _state_after_fill(31), action, ENC, ENC)
    _check(sc, tmp_path, expect_ops=("pwrite", "fdatasync", "fsync_dir", "ftruncate", "preallocate"))


def test_seal_on_close(log_template, tmp_path):
    def pre(s, m):
        save(s, m, 31, 34)

    def action(s, m, cv):
        s.close()                                        # seals the active segment
    sc = Scenario("seal-on-close", log_template, _state_after_fill(31), action, ENC, ENC, pre=pre)
    _check(sc, tmp_path, expect_ops=("pwrite", "fdatasync", "ftruncate"))


@pytest.fixture(scope="module")
def suffix_template(tmp_path_factory):
    """Entries 1..30 with the commit index at 10: entries above it may still be replaced (Raft)."""
    def build(s):
        for a in range(1, 31, 3):
            s.save(hard_state=HardState(1, 1, min(a + 2, 10)), entries=ents(a, a + 3))
    return _template(tmp_path_factory, "suffix", build, kek=KEK, **OPTS)


@pytest.mark.parametrize("at", [32, 12], ids=["inside-the-active-segment", "below-sealed-segments"])
def test_suffix_truncation(suffix_template, tmp_path, at):
    """save() with an earlier index: the active segment is sealed, a new one starts at ``at``.  The
    replacement is atomic: after a crash the log is the old one or the new one, never cut at ``at``
    without the new entries (the manifest registration of the new segment, which carries the first
    replacing unit, is the commit point), nothing acknowledged below ``at`` is lost, nothing invented."""
    initial = State(1, tuple(ents(1, 31)), HardState(1, 1, 10))

    def pre(s, m):
        batch = ents(31, 34)
        m.attempt(m.acked.save(batch))
        s.save(entries=batch)
        m.ack()

    def action(s, m, cv):
        save_hs = HardState(2, 1, 10)
        for lo, hi in ((at, at + 4), (at + 4, at + 6)):
            batch = ents(lo, hi, 2)
            m.attempt(m.acked.save(batch, save_hs))
            s.save(hard_state=save_hs, entries=batch)
            m.ack()
    sc = Scenario(f"suffix-at-{at}", suffix_template, initial, action, ENC, ENC, pre=pre)
    _check(sc, tmp_path, expect_ops=("pwrite", "fdatasync", "fsync_dir", "ftruncate", "preallocate"))


def test_compaction(log_template, tmp_path):
    """compact(): the compaction point (LMDB), then whole segments below it are unlinked."""
    def action(s, m, cv):
        m.attempt(m.acked.compact(25))
        s.compact(25)
        m.ack()
        save(s, m, 31, 34)

    sc = Scenario("compaction", log_template, _state_after_fill(31), action, ENC, ENC)
    _check(sc, tmp_path, expect_ops=("unlink", "fsync_dir"))


# ---------------------------------------------------------------------------------------------
# Snapshot publish with retention (keep_snapshots=1: the older snapshot file is deleted)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def snap_template(tmp_path_factory):
    def build(s):
        _fill(s, 1, 31)
        s.save_snapshot(SnapshotMeta(15, 1, CS), T.snap_data(15, 1500))
    return _template(tmp_path_factory, "snap", build, kek=KEK, keep_snapshots=1, **OPTS)


@pytest.mark.parametrize("kind", ["inside-log", "from-leader"])
def test_snapshot_publish_with_retention(snap_template, tmp_path, kind):
    index, term = (30, 1) if kind == "inside-log" else (60, 3)
    kw = dict(kek=KEK, keep_snapshots=1, **OPTS)

    def action(s, m, cv):
        save_snapshot(s, m, index, term)
        save(s, m, index + 1 if kind == "from-leader" else 31, (index + 1 if kind == "from-leader" else 31) + 3,
             term=term)
    sc = Scenario(f"snapshot-{kind}", snap_template, _state_after_fill(31, snap=(15, 1)), action, kw, kw)
    _check(sc, tmp_path, expect_ops=("pwrite", "fdatasync", "fsync_dir", "rename", "unlink"))


# ---------------------------------------------------------------------------------------------
# DEK rotation with snapshot_source(store)
# ---------------------------------------------------------------------------------------------

def _source(store):
    idx = store.last_index()
    return SnapshotMeta(idx, store.term(idx), CS), T.snap_data(idx, 1500)


@pytest.fixture(scope="module")
def rot_template(tmp_path_factory):
    def build(s):
        _fill(s, 1, 31)
        s.save_snapshot(SnapshotMeta(15, 1, CS), T.snap_data(15, 1500))
    return _template(tmp_path_factory, "rot", build, kek=KEK, **OPTS)


def test_rotate_dek_with_source(rot_template, tmp_path):
    """rotate_dek() with a snapshot source at the call kinds tests/test_rotation.py does not cover.
    Reopened with the source registered (as a host would), the rotation is complete: either it had
    finished before the crash, or the open resumes and finishes it.  Either way the log up to the
    rotation's snapshot is compacted, the snapshot is at the last index and every file is under
    the new key."""
    kw = dict(kek=KEK, snapshot_source=_source, **OPTS)
    initial = _state_after_fill(31, snap=(15, 1))
    done = replace(initial.compact(30), snap=(30, 1))
    keys_before: dict = {}

    def pre(s, m):
        keys_before["ids"] = set(T.key_states(s))

    def action(s, m, cv):
        try:
            s.rotate_dek()
        finally:
            m.acked = done                               # finished now, or by the reopen

    def extra(s2, m):
        assert not s2.needs_snapshot and s2.key_info()["rotation"] is None
        assert not [k for k, st in T.key_states(s2).items() if st == "pending"]
        active = T.active_key(s2)
        assert active not in keys_before["ids"], "the rotation did not take effect"
        stale = {os.path.relpath(p, s2.path) for p, k in T.header_key_ids(s2.path).items() if k != active}
        assert not stale, f"files under retired keys: {stale}"

    sc = Scenario("rotate-dek", rot_template, initial, action, kw, kw, extra_check=extra, pre=pre)
    _check(sc, tmp_path, ops=("pwrite", "ftruncate", "preallocate"), expect_ops=("pwrite", "preallocate"))


# ---------------------------------------------------------------------------------------------
# KEK rotation (LMDB only)
# ---------------------------------------------------------------------------------------------

def test_rotate_kek(log_template, tmp_path):
    """rotate_kek() on a store without snapshots: one LMDB transaction re-wraps the keys, then the
    free pages of the metadata file are scrubbed in place (LMDB commits only, FORMAT.md 9.11): no
    file operation of the VFS is left for a power loss to hit, and the new KEK opens the store with
    everything in it while the old one is refused.  (With snapshots to copy, every step before the
    commit: tests/test_kek_rotation.py; an interruption at every step of the scrub:
    test_kek_rotation.py::test_scrub_interrupted_at_every_step_leaves_a_valid_metadata_file.)"""
    def action(s, m, cv):
        s.rotate_kek(NEW_KEK)
    sc = Scenario("rotate-kek", log_template, _state_after_fill(31), action, dict(kek=KEK, **OPTS),
                  dict(kek=NEW_KEK, **OPTS))
    per_op = _check(sc, tmp_path, max_n=5)
    assert not any(per_op.values()), f"rotate_kek without snapshots made file operations: {per_op}"
    d = str(tmp_path / "old-kek")
    shutil.copytree(log_template, d)
    with walcrypt.open(d, kek=KEK, **OPTS) as s:
        s.rotate_kek(NEW_KEK)
    with pytest.raises(walcrypt.WrongKeyError):
        walcrypt.open(d, kek=KEK, **OPTS)


# ---------------------------------------------------------------------------------------------
# Migration: walcrypt.open(plaintext store, kek=..., migrate=True)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_template(tmp_path_factory):
    def build(s):
        _fill(s, 1, 31)
        s.save_snapshot(SnapshotMeta(20, 1, CS), T.snap_data(20, 1500))
    return _template(tmp_path_factory, "plain", build, encrypted=False, **OPTS)


def test_migration_to_encrypted(plain_template, tmp_path):
    """Interrupted at the call kinds tests/test_migration.py does not cover: the next open with the
    KEK finishes (or redoes) the migration and the content is intact."""
    initial = _state_after_fill(31, snap=(20, 1))
    kw = dict(kek=KEK, migrate=True, **OPTS)

    def action(s, m, cv):
        pass                                             # walcrypt.open itself is the operation

    def extra(s2, m):
        assert s2.encrypted
        assert not [n for n in os.listdir(s2.path) if n.startswith(".migrate")]

    sc = Scenario("migration", plain_template, initial, action, kw, kw, extra_check=extra, arm_at_open=True)
    _check(sc, tmp_path, ops=("pwrite", "unlink", "ftruncate", "preallocate"),
           expect_ops=("pwrite", "ftruncate", "preallocate"), max_n=80)
