"""Key rotation: DEK rotation by forced snapshot (with and without a snapshot source, queued,
with crypto-shredding), KEK rotation, full re-key, crash points under CrashVFS and
rotate-and-restart cycles under SIGKILL."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, KeyNotFoundError, SnapshotMeta, WrongKeyError
from walcrypt.check import check
from walcrypt.testing import CrashVFS, SimulatedCrash

import snaptest as T
import wctest


def _source_for(holder: dict):
    """A snapshot source for the store in holder["s"]: a snapshot at the last index."""
    def source(store):
        s = store
        idx = s.last_index()
        return SnapshotMeta(idx, s.term(idx), ConfState(voters=(1, 2, 3))), T.snap_data(idx)
    return source


def _open_with_source(data_dir, kek, **opts):
    holder: dict = {}
    s = T.open_store(data_dir, kek, snapshot_source=_source_for(holder), **opts)
    holder["s"] = s
    return s


def _assert_no_file_under(data_dir, key_ids: set[bytes]) -> None:
    refs = T.header_key_ids(data_dir)
    assert refs, "no segment or snapshot file found"
    bad = {os.path.relpath(p, data_dir): k.hex() for p, k in refs.items() if k in key_ids}
    assert not bad, f"files still written under retired keys: {bad}"


# ----------------------------------------------------------------------------------------- DEK rotation

def test_rotate_dek_with_source(data_dir, kek):
    s = _open_with_source(data_dir, kek)
    try:
        T.fill(s, 1, 201, length=200)
        T.save_snap(s, 100)
        s.stable_set(b"CurrentTerm", b"\x07")
        old = T.active_key(s)
        assert len(T.seg_files(data_dir)) > 3
        assert set(T.header_key_ids(data_dir).values()) == {old}
        s.rotate_dek()
        new = T.active_key(s)
        assert new != old
        assert T.key_states(s)[old] in ("inactive", "destroyed")
        assert not s.needs_snapshot and s.snapshot_index_needed is None
        assert s.key_info()["rotation"] is None
        _assert_no_file_under(data_dir, {old})
        snap = s.snapshot()
        assert snap.meta.index == 200 and snap.data == T.snap_data(200)
        assert s.first_index() == 201 and s.last_index() == 200
        T.fill(s, 201, 231, length=200)
    finally:
        s.close()
    with T.open_store(data_dir, kek) as s:
        assert T.active_key(s) == new
        assert s.snapshot().data == T.snap_data(200)
        assert s.entries(201, 231) == T.entries(201, 231, 200)
        assert s.initial_state()[0] == HardState(1, 1, 230)
        assert s.stable_get(b"CurrentTerm") == b"\x07"
    _assert_no_file_under(data_dir, {old})
    assert check(data_dir, kek=kek).ok


@pytest.mark.parametrize("above", [0, 7])
def test_rotate_dek_without_source_waits_for_host_snapshot(data_dir, kek, above):
    s = T.open_store(data_dir, kek)
    try:
        T.fill(s, 1, 51, length=200)
        T.save_snap(s, 20)
        T.fill(s, 51, 101, length=200)
        old = T.active_key(s)
        assert not s.needs_snapshot and s.snapshot_index_needed is None
        s.rotate_dek()
        assert s.needs_snapshot and s.snapshot_index_needed == 100
        pending = [k for k, st in T.key_states(s).items() if st == "pending"]
        assert len(pending) == 1 and T.active_key(s) == old
        T.fill(s, 101, 121, length=200)               # written under the pending key
        T.save_snap(s, 60)                            # too old to satisfy the rotation
        assert s.needs_snapshot and T.active_key(s) == old
    finally:
        s.close()
    s = T.open_store(data_dir, kek)                   # the rotation state survives a restart
    try:
        assert s.needs_snapshot and s.snapshot_index_needed == 100
        assert T.key_states(s)[pending[0]] == "pending"
        assert s.entries(21, 121) == T.entries(21, 121, 200)
        T.save_snap(s, 100 + above)
        assert not s.needs_snapshot and s.snapshot_index_needed is None
        assert T.active_key(s) == pending[0]
        # the snapshot at 60 is still retained and may need the log after it (written partly under
        # the old key), so the old key may stay "retiring" until that snapshot leaves retention
        assert T.key_states(s)[old] in ("retiring", "inactive", "destroyed")
        assert s.first_index() == 101 + above
        assert s.entries(101 + above, 121) == T.entries(101 + above, 121, 200)
        assert s.snapshot().data == T.snap_data(100 + above)
        T.save_snap(s, 120)                       # pushes the snapshot at 60 out of retention
        _assert_no_file_under(data_dir, {old})
    finally:
        s.close()
    _assert_no_file_under(data_dir, {old})
    with T.open_store(data_dir, kek) as s:
        assert T.key_states(s)[old] in ("inactive", "destroyed")
        assert s.entries(101 + above, 121) == T.entries(101 + above, 121, 200)
        assert s.snapshot().data == T.snap_data(120)
        assert not s.needs_snapshot


def test_second_rotation_is_queued(data_dir, kek):
    s = T.open_store(data_dir, kek)
    try:
        T.fill(s, 1, 41)
        k0 = T.active_key(s)
        s.rotate_dek()
        s.rotate_dek()                                   # queued behind the first
        assert s.key_info()["rotation"]["queued"] == 1
        assert s.snapshot_index_needed == 40
        T.save_snap(s, 40)
        # the first completed; the queued one started at once
        k1 = T.active_key(s)
        assert k1 != k0 and T.key_states(s)[k0] != "active"
        assert s.needs_snapshot and s.key_info()["rotation"]["queued"] == 0
        T.fill(s, 41, 61)
        assert s.snapshot_index_needed == 40
        T.save_snap(s, 60)
        k2 = T.active_key(s)
        assert k2 not in (k0, k1)
        assert not s.needs_snapshot and s.key_info()["rotation"] is None
        states = T.key_states(s)
        assert len(states) == 3 and states[k0] != "active" and states[k1] != "active"
        assert s.entries(61, 61) == [] and s.snapshot().data == T.snap_data(60)
    finally:
        s.close()
    _assert_no_file_under(data_dir, {k0, k1})


def test_queued_rotations_with_source_all_complete(data_dir, kek):
    """Three rotations requested while one is stuck (its source failed): all must complete."""
    holder: dict = {"fail": True}
    inner = _source_for(holder)

    def source(store):
        if holder["fail"]:
            raise RuntimeError("host not ready to snapshot")
        return inner(store)

    s = T.open_store(data_dir, kek, snapshot_source=source)
    holder["s"] = s
    try:
        T.fill(s, 1, 41)
        with pytest.raises(RuntimeError):
            s.rotate_dek()
        assert s.needs_snapshot
        s.rotate_dek()
        s.rotate_dek()
        assert s.key_info()["rotation"]["queued"] == 2
        holder["fail"] = False
        T.save_snap(s, 40)                   # completes the first; the source then serves the queued ones
        assert not s.needs_snapshot and s.key_info()["rotation"] is None
        states = T.key_states(s)
        assert len(states) == 4, f"1 + 3 rotations should give 4 data keys, got {sorted(states.values())}"
    finally:
        s.close()


def test_destroy_retired_keys(data_dir, kek):
    s = _open_with_source(data_dir, kek, destroy_retired_keys=True)
    try:
        T.fill(s, 1, 101, length=200)
        old = T.active_key(s)
        s.rotate_dek()
        assert T.key_states(s)[old] == "destroyed"
        with pytest.raises(KeyNotFoundError):
            s.secret(old)
    finally:
        s.close()
    with T.open_store(data_dir, kek) as s:
        assert T.key_states(s)[old] == "destroyed"
        assert s.snapshot().data == T.snap_data(100)
    _assert_no_file_under(data_dir, {old})


def test_destroyed_key_not_carried_in_snapshot_bundles(data_dir, kek):
    """Crypto-shredding: once a DEK is destroyed no file in the data directory may still hold it
    wrapped (a snapshot's keyring bundle plus the KEK would resurrect it)."""
    s = _open_with_source(data_dir, kek, destroy_retired_keys=True)
    try:
        T.fill(s, 1, 101, length=200)
        old = T.active_key(s)
        s.rotate_dek()
        assert T.key_states(s)[old] == "destroyed"
    finally:
        s.close()
    for p in T.snap_files(data_dir):
        ids = {k["id"] for k in T.bundle_doc(p)["keys"]}
        assert old.hex() not in ids, f"{os.path.basename(p)} still carries destroyed key {old.hex()} wrapped"


# ----------------------------------------------------------------------------------------- KEK rotation

def test_rotate_kek(data_dir, kek, kek_bytes):
    new_bytes = bytes(reversed(kek_bytes))
    new_kek = walcrypt.RawKey(new_bytes)
    s = T.open_store(data_dir, kek)
    try:
        T.fill(s, 1, 101, length=200)
        T.save_snap(s, 50)
        s.rotate_dek()
        T.save_snap(s, 100)
        T.fill(s, 101, 121, length=200)
        s.stable_set(b"LastVoteCand", b"node-2")
        segs_before, snaps_before = T.seg_files(data_dir), T.snap_files(data_dir)
        assert segs_before and snaps_before
        old_blobs = {k.wrapped for k in s.keys.values() if k.wrapped}
        infos_before = [(i.index, i.term, i.key_id, i.size) for i in s.snapshots.infos]
        keys_before = T.key_states(s)
        s.rotate_kek(new_kek)
        # Segments are not rewritten (the active one gained a unit of SNAPSHOT records); every
        # retained snapshot was replaced by a copy whose bundle is wrapped under the new KEK.
        assert all(os.path.exists(p) for p in segs_before)
        snaps_after = T.snap_files(data_dir)
        assert len(snaps_after) == len(snaps_before) and not set(snaps_after) & set(snaps_before)
        for p in snaps_after:
            wrapped = {bytes.fromhex(k["wrapped"]) for k in T.bundle_doc(p)["keys"]}
            assert wrapped and not wrapped & old_blobs, f"{p} still carries keys wrapped under the old KEK"
        assert [(i.index, i.term, i.key_id, i.size) for i in s.snapshots.infos] == infos_before
        assert T.key_states(s) == keys_before
        T.fill(s, 121, 131, length=200)                    # still writable
    finally:
        s.close()
    with pytest.raises(WrongKeyError):
        T.open_store(data_dir, kek)
    with T.open_store(data_dir, new_kek) as s:
        assert s.snapshot().meta.index == 100 and s.snapshot().data == T.snap_data(100)
        assert s.entries(101, 131) == T.entries(101, 131, 200)
        assert T.key_states(s) == keys_before
        assert s.stable_get(b"LastVoteCand") == b"node-2"
    for p in T.files_in(data_dir):
        T.assert_no_kek(p, kek_bytes)
        T.assert_no_kek(p, new_bytes)
    assert check(data_dir, kek=new_kek).ok
    # and once more: the new KEK can hand over to a third one
    third = walcrypt.RawKey(bytes(range(32)))
    with T.open_store(data_dir, new_kek) as s:
        s.rotate_kek(third)
    with pytest.raises(WrongKeyError):
        T.open_store(data_dir, new_kek)
    with T.open_store(data_dir, third) as s:
        assert s.entries(101, 131) == T.entries(101, 131, 200)


# ----------------------------------------------------------------------------------------- full re-key

def test_rekey(data_dir, kek):
    s = T.open_store(data_dir, kek)
    try:
        T.fill(s, 1, 101, length=200)
        T.save_snap(s, 40)
        s.rotate_dek()                              # two generations of keys in the files
        T.fill(s, 101, 151, length=200)
        T.save_snap(s, 80)
        T.save_snap(s, 120)
        T.fill(s, 151, 181, length=200)
        s.stable_set(b"CurrentTerm", b"\x09")
        old = set(T.key_states(s))
        referenced = set(T.header_key_ids(data_dir).values())
        assert len(referenced) == 2
        first, last = s.first_index(), s.last_index()
        hs = s.initial_state()
        s.rekey()
        new = T.active_key(s)
        assert new not in old
        states = T.key_states(s)
        assert all(states[k] == "destroyed" for k in old), states
        assert s.key_info()["rotation"] is None
        assert (s.first_index(), s.last_index()) == (first, last)
        assert s.entries(first, last + 1) == T.entries(first, last + 1, 200)
        assert s.snapshot().meta.index == 120 and s.snapshot().data == T.snap_data(120)
        assert s.initial_state() == hs
        _assert_no_file_under(data_dir, old)
        assert set(T.header_key_ids(data_dir).values()) == {new}
        T.fill(s, 181, 191, length=200)
    finally:
        s.close()
    with T.open_store(data_dir, kek) as s:
        assert T.active_key(s) == new
        assert s.entries(first, 191) == T.entries(first, 191, 200)
        assert s.snapshot().data == T.snap_data(120)
        assert s.stable_get(b"CurrentTerm") == b"\x09"
        for k in old:
            with pytest.raises(KeyNotFoundError):
                s.secret(k)
    _assert_no_file_under(data_dir, old)
    assert check(data_dir, kek=kek).ok


def test_rekey_leaves_no_old_key_in_bundles(data_dir, kek):
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 61)
        T.save_snap(s, 60)
        old = set(T.key_states(s))
        s.rekey()
    for p in T.snap_files(data_dir):
        ids = {bytes.fromhex(k["id"]) for k in T.bundle_doc(p)["keys"]}
        assert not ids & old, f"{os.path.basename(p)} still carries destroyed keys {[k.hex() for k in ids & old]}"


# ----------------------------------------------------------------------------------------- crash points

PRE_LAST = 120


@pytest.fixture(scope="module")
def rotation_template(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rot") / "template")
    with T.open_store(d, walcrypt.RawKey(wctest.KEK_BYTES)) as s:
        T.fill(s, 1, PRE_LAST + 1, length=200)
        T.save_snap(s, 60)
    return d


def _verify_after_crash(d, kek, label):
    s = T.open_store(d, kek)
    try:
        snap = s.snapshot()
        first, last = s.first_index(), s.last_index()
        assert snap is not None, label
        assert snap.data == T.snap_data(snap.meta.index), label
        assert first - 1 <= snap.meta.index, f"{label}: entries up to {first - 1} compacted, snapshot at {snap.meta.index}"
        assert last >= PRE_LAST, f"{label}: acknowledged entries lost (last index {last})"
        assert s.entries(first, PRE_LAST + 1) == T.entries(first, PRE_LAST + 1, 200), label
        assert s.initial_state()[0] == HardState(1, 1, PRE_LAST), label
        # finish the rotation the way a host would
        if s.needs_snapshot:
            assert s.snapshot_index_needed <= s.last_index()
            T.save_snap(s, s.last_index())
        assert not s.needs_snapshot and s.key_info()["rotation"] is None, label
        active = T.active_key(s)
        assert not [k for k, st in T.key_states(s).items() if st == "pending"], label
        T.fill(s, PRE_LAST + 1, PRE_LAST + 11, length=200)
    finally:
        s.close()
    refs = T.header_key_ids(d)
    stale = {os.path.relpath(p, d): k.hex() for p, k in refs.items() if k != active}
    assert not stale, f"{label}: files under retired keys after the rotation finished: {stale}"
    report = check(d, kek=kek)
    assert report.ok, f"{label}: {[f.detail for f in report.findings]}"
    with T.open_store(d, kek) as s:
        assert s.last_index() == PRE_LAST + 10
        assert s.entries(s.first_index(), PRE_LAST + 11) == T.entries(s.first_index(), PRE_LAST + 11, 200)


@pytest.mark.parametrize("flow", ["source", "host"])
@pytest.mark.parametrize("op", ["fdatasync", "fsync_dir", "rename", "unlink"])
def test_rotation_crash_points(rotation_template, tmp_path, kek, op, flow):
    """Power loss at every durability point of a DEK rotation.

    Only VFS I/O is modelled: LMDB commits are outside the VFS and are taken as durable
    once they return (so the LMDB state is always the one at the crash point)."""
    fired_total = 0
    failures: list[str] = []
    for when in ("before", "after"):
        for n in range(1, 60):                             # bounded; stops when no crash fires
            d = str(tmp_path / f"{when}-{n}")
            shutil.copytree(rotation_template, d)
            cv = CrashVFS(holding_root=str(tmp_path))
            holder: dict = {}
            s = T.open_store(d, kek, vfs=cv, snapshot_source=_source_for(holder) if flow == "source" else None)
            holder["s"] = s
            cv.arm_crash(op, n, when)
            fired = False
            try:
                s.rotate_dek()
                if flow == "host":
                    T.save_snap(s, s.snapshot_index_needed)
            except SimulatedCrash:
                fired = True
            try:
                s.close()
            except SimulatedCrash:
                pass
            if cv.crashed:
                cv.crash(torn=(n % 2 == 0), rng=random.Random(n))
            else:
                cv.shutdown()
            try:
                _verify_after_crash(d, kek, f"{flow}: crash {when} {op} #{n}")
            except (AssertionError, walcrypt.WalcryptError) as exc:    # collect every failing point
                failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            shutil.rmtree(d)
            if not fired:
                break
            fired_total += 1
        else:
            pytest.fail(f"{op} {when}: crashes still firing after 60 points")
    if op in ("fdatasync", "fsync_dir", "rename"):
        assert fired_total >= 2, f"no crash point found for {op}"
    assert not failures, f"{len(failures)} crash points failed:\n" + "\n".join(failures)


def test_rotation_resumes_at_open_with_source(data_dir, kek):
    """A crash after the pending key was recorded but before the snapshot: reopening with a
    snapshot source registered finishes the rotation (DESIGN: "a crash at any step resumes")."""
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 41)
        old = T.active_key(s)
    cv = CrashVFS()
    holder: dict = {}
    s = T.open_store(data_dir, kek, vfs=cv, snapshot_source=_source_for(holder))
    holder["s"] = s
    cv.arm_crash("rename", 1, "before")                   # the snapshot file's publish
    with pytest.raises(SimulatedCrash):
        s.rotate_dek()
    try:
        s.close()
    except SimulatedCrash:
        pass
    cv.crash()
    s = _open_with_source(data_dir, kek)
    try:
        assert not s.needs_snapshot, "the rotation is still waiting although a snapshot source is registered"
        assert T.active_key(s) != old
    finally:
        s.close()


# ----------------------------------------------------------------------------------------- SIGKILL cycles

CHILD = os.path.join(wctest.TESTS_DIR, "_rotation_child.py")


_read_until = wctest.read_lines_until

def _child_entry(i: int) -> Entry:
    return Entry(i, wctest.entry_term(i), wctest.entry_data(i, 100 + i % 300))


def _verify_cycle(d, kek, acked, attempted, label):
    s = T.open_store(d, kek)
    try:
        first, last = s.first_index(), s.last_index()
        assert last >= acked, f"{label}: acknowledged entries lost: last {last} < acked {acked}"
        assert last <= attempted, f"{label}: entries invented: last {last} > attempted {attempted}"
        snap = s.snapshot()
        covered = snap.meta.index if snap else 0
        if snap:
            assert snap.meta.index <= attempted
            assert snap.data == T.snap_data(snap.meta.index), f"{label}: snapshot data differs"
        assert first - 1 <= covered, f"{label}: entries up to {first - 1} compacted without a snapshot"
        got = s.entries(first, last + 1) if last >= first else []
        assert got == [_child_entry(i) for i in range(first, last + 1)], f"{label}: entries differ"
        hs = s.initial_state()[0]
        assert acked <= hs.commit <= attempted and hs == HardState(wctest.entry_term(hs.commit), 1, hs.commit)
        return last, {k: st for k, st in T.key_states(s).items()}
    finally:
        s.close()


def test_rotate_and_restart_under_sigkill(data_dir, kek):
    rng = random.Random(7)
    acked = attempted = 0
    rotations = 0
    for cycle in range(30):
        proc = subprocess.Popen([sys.executable, CHILD, data_dir, str(cycle)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=wctest.child_env(), cwd=wctest.REPO_ROOT)
        lines: list[str] = []
        try:
            deadline = time.monotonic() + 60
            mode = cycle % 3
            if mode == 0:                                 # after some rotations
                want = rng.randint(1, 4)
                _read_until(proc, lines, lambda ls: sum(x == "ROTATE" for x in ls) >= want, deadline)
                time.sleep(rng.uniform(0, 0.02))
            elif mode == 1:                               # after some acknowledgements
                want = rng.randint(1, 40)
                _read_until(proc, lines, lambda ls: sum(x.startswith("ACK ") for x in ls) >= want, deadline)
            else:                                         # at a random time, maybe during open/recovery
                _read_until(proc, lines, lambda ls: any(x.startswith("OPEN ") for x in ls), deadline)
                time.sleep(rng.uniform(0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            rest = proc.stdout.read().decode(errors="replace")
            if lines and lines[-1].startswith("PARTIAL "):
                rest = lines.pop()[len("PARTIAL "):] + rest
            lines.extend(x for x in rest.split("\n") if x)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        assert proc.returncode == -signal.SIGKILL, f"cycle {cycle}: child died on its own:\n{err[-3000:]}"
        acked = max([acked] + [int(x.split()[1]) for x in lines if x.startswith("ACK ")])
        attempted = max([attempted] + [int(x.split()[1]) for x in lines if x.startswith("TRY ")])
        rotations += sum(x == "ROTATED" for x in lines)
        _verify_cycle(data_dir, kek, acked, attempted, f"cycle {cycle}")
    assert acked > 0 and rotations >= 5, (acked, rotations)
    # no file is readable with a retired DEK: every header names the active key or one still in use
    with T.open_store(data_dir, kek) as s:
        states = T.key_states(s)
    assert sum(st in ("inactive", "destroyed") for st in states.values()) >= 5
    refs = T.header_key_ids(data_dir)
    bad = {os.path.relpath(p, data_dir): states.get(k, "unknown")
           for p, k in refs.items() if states.get(k) not in ("active", "pending", "retiring")}
    assert not bad, f"files under retired keys: {bad}"
