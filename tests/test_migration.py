"""Migration between plaintext (wal-v1/, snap-v1/) and encrypted (wal-v1-encrypted/,
snap-v1-encrypted/) stores: round trip, refusal to decrypt silently, interruption at every
durability point (CrashVFS) and at every progress stage, progress reporting."""

from __future__ import annotations

import os
import random
import shutil

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta, UsageError
from walcrypt.testing import CrashVFS, SimulatedCrash

import snaptest as T

MARKER = b"WALCRYPT-SECRET-MARKER-7f3c9a1e"
LAST = 200
SNAP_AT = 150
CS = ConfState(voters=(1, 2, 3), learners=(4,))
OPTS = dict(segment_size=T.SEG_SIZE, snapshot_chunk_size=T.CHUNK, sync="always")


def _entry(i: int) -> Entry:
    return Entry(i, 2, MARKER + b"-entry-%d-" % i + bytes([i % 251]) * 150)


def _snapshot_bytes() -> bytes:
    return (MARKER + b"-snapshot-") * 700                 # ~28 KiB: several 4 KiB chunks


def _populate(store) -> None:
    for a in range(1, LAST + 1, 10):
        ents = [_entry(i) for i in range(a, a + 10)]
        store.save(hard_state=HardState(2, 3, ents[-1].index), entries=ents)
    store.save_snapshot(SnapshotMeta(SNAP_AT, 2, CS), _snapshot_bytes())
    store.stable_set(b"CurrentTerm", MARKER + b"-stable")


def _check_content(store, label="") -> None:
    assert store.first_index() == 1 and store.last_index() == LAST, label
    assert store.entries(1, LAST + 1) == [_entry(i) for i in range(1, LAST + 1)], label
    assert store.initial_state() == (HardState(2, 3, LAST), CS), label
    snap = store.snapshot()
    assert snap is not None and snap.meta == SnapshotMeta(SNAP_AT, 2, CS), label
    assert snap.data == _snapshot_bytes(), label
    assert store.stable_get(b"CurrentTerm") == MARKER + b"-stable", label


def _assert_no_marker(root: str, dirs=(T.ENC_WAL, T.ENC_SNAP)) -> None:
    for d in dirs:
        p = os.path.join(root, d)
        assert os.path.isdir(p), f"{d} is missing"
        files = T.files_in(p)
        assert files, f"{d} is empty"
        for f in files:
            assert MARKER not in T.read(f), f"plaintext marker found in {os.path.relpath(f, root)}"


def _assert_no_temp_dirs(root: str) -> None:
    left = [n for n in os.listdir(root) if n.startswith(".migrate")]
    assert not left, f"temporary migration directories left behind: {left}"


@pytest.fixture(scope="module")
def plain_template(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mig") / "plain")
    with walcrypt.open(d, encrypted=False, **OPTS) as s:
        _populate(s)
    assert T.seg_files(d, encrypted=False) and len(T.seg_files(d, encrypted=False)) > 3
    return d


@pytest.fixture(scope="module")
def enc_template(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mig") / "enc")
    with walcrypt.open(d, kek=walcrypt.RawKey(b"\x11" * 32), **OPTS) as s:
        _populate(s)
    return d


ENC_KEK = walcrypt.RawKey(b"\x11" * 32)


# ----------------------------------------------------------------------------------------- round trip

def test_plaintext_to_encrypted_and_back(plain_template, tmp_path, kek):
    d = str(tmp_path / "store")
    shutil.copytree(plain_template, d)
    with walcrypt.open(d, encrypted=False, **OPTS) as s:
        _check_content(s, "plaintext source")
    plain_before = {p: T.sha256_file(p) for p in T.files_in(os.path.join(d, T.PLAIN_WAL))
                    + T.files_in(os.path.join(d, T.PLAIN_SNAP))}

    with pytest.raises(UsageError, match="migrate=True"):  # a KEK alone never adopts plaintext data
        walcrypt.open(d, kek=kek, **OPTS)
    with walcrypt.open(d, kek=kek, migrate=True, **OPTS) as s:   # migrates
        assert s.encrypted
        _check_content(s, "after migrating to encrypted")
    _assert_no_marker(d)
    _assert_no_temp_dirs(d)
    # the source directories are kept, untouched
    for p, h in plain_before.items():
        assert os.path.exists(p) and T.sha256_file(p) == h, f"source file {p} changed or vanished"
    for p, kid in T.header_key_ids(os.path.join(d, T.ENC_WAL)).items():
        assert kid != bytes(16)
    with walcrypt.open(d, kek=kek, **OPTS) as s:           # plain reopen: no second migration
        _check_content(s, "reopened encrypted")
    with pytest.raises(walcrypt.WalcryptError):
        walcrypt.open(d, kek=walcrypt.RawKey(b"\x99" * 32), **OPTS)

    with walcrypt.open(d, kek=kek, encrypted=False, decrypt_existing=True, **OPTS) as s:
        assert not s.encrypted
        _check_content(s, "after migrating back to plaintext")
    _assert_no_temp_dirs(d)
    assert os.path.isdir(os.path.join(d, T.ENC_WAL)), "the encrypted source directories must be kept"
    with walcrypt.open(d, encrypted=False, **OPTS) as s:
        _check_content(s, "reopened plaintext")
        s.save(entries=[_entry(LAST + 1)])
    with walcrypt.open(d, encrypted=False, **OPTS) as s:
        assert s.entries(LAST + 1, LAST + 2) == [_entry(LAST + 1)]


def test_encrypted_to_plaintext_needs_decrypt_existing(enc_template, tmp_path):
    d = str(tmp_path / "store")
    shutil.copytree(enc_template, d)
    before = T.files_in(d)
    hashes = {p: T.sha256_file(p) for p in before if not p.endswith("lock.mdb")}
    with pytest.raises(UsageError):
        walcrypt.open(d, encrypted=False, **OPTS)
    with pytest.raises(UsageError):
        walcrypt.open(d, kek=ENC_KEK, encrypted=False, **OPTS)
    assert T.files_in(d) == before
    assert {p: T.sha256_file(p) for p in before if not p.endswith("lock.mdb")} == hashes
    with walcrypt.open(d, kek=ENC_KEK, **OPTS) as s:
        assert s.encrypted
        _check_content(s)


def test_plaintext_to_encrypted_needs_kek(plain_template, tmp_path):
    d = str(tmp_path / "store")
    shutil.copytree(plain_template, d)
    before = {p: T.sha256_file(p) for p in T.files_in(d) if not p.endswith("lock.mdb")}
    with pytest.raises(walcrypt.KeyProviderError):
        walcrypt.open(d, **OPTS)
    assert {p: T.sha256_file(p) for p in T.files_in(d) if not p.endswith("lock.mdb")} == before


def test_progress_callback(plain_template, tmp_path, kek):
    d = str(tmp_path / "store")
    shutil.copytree(plain_template, d)
    events = []
    with walcrypt.open(d, kek=kek, migrate=True, migration_progress=lambda *a: events.append(a), **OPTS) as s:
        _check_content(s)
    stages = [e[0] for e in events]
    assert {"log", "snapshot"} <= set(stages)
    assert stages[-1] == "done" and events[-1][1] == events[-1][2]
    for stage in set(stages):
        seq = [(done, total) for st, done, total in events if st == stage]
        assert all(0 <= done <= total for done, total in seq), (stage, seq)
        assert [x for x, _ in seq] == sorted(x for x, _ in seq), f"{stage} progress went backwards"
        assert seq[-1][0] == seq[-1][1], f"{stage} did not reach its total: {seq[-1]}"
    assert [x for x in events if x[0] == "snapshot"][-1][2] == len(_snapshot_bytes())
    # no migration, no callback
    events.clear()
    with walcrypt.open(d, kek=kek, migrate=True, migration_progress=lambda *a: events.append(a), **OPTS):
        pass
    assert events == []


# ----------------------------------------------------------------------------------------- interruptions

class _Stop(Exception):
    pass


def _stages(template, tmp_path, **kw) -> list[str]:
    d = str(tmp_path / "dry")
    shutil.copytree(template, d)
    events = []
    with walcrypt.open(d, migration_progress=lambda *a: events.append(a[0]), **kw, **OPTS):
        pass
    shutil.rmtree(d)
    return list(dict.fromkeys(events))


@pytest.mark.parametrize("direction", ["to-encrypted", "to-plaintext"])
def test_interrupted_by_progress_exception(plain_template, enc_template, tmp_path, kek, direction):
    if direction == "to-encrypted":
        template, kw, redo_kek = plain_template, dict(kek=kek, migrate=True), kek
    else:
        template, kw, redo_kek = enc_template, dict(kek=ENC_KEK, encrypted=False, decrypt_existing=True), ENC_KEK
    stages = _stages(template, tmp_path, **kw)
    assert "log" in stages and "done" in stages
    for stage in stages:
        for which in ("first", "last"):
            d = str(tmp_path / f"{stage}-{which}")
            shutil.copytree(template, d)
            seen = {"n": 0}
            total = {"n": 0}
            if which == "last":                          # count this stage's calls first
                dry = str(tmp_path / "count")
                shutil.copytree(template, dry)
                with walcrypt.open(dry, migration_progress=lambda st, *_: total.__setitem__(
                        "n", total["n"] + (st == stage)), **kw, **OPTS):
                    pass
                shutil.rmtree(dry)

            def progress(st, done, tot):
                if st == stage:
                    seen["n"] += 1
                    if which == "first" or seen["n"] == total["n"]:
                        raise _Stop(st)

            with pytest.raises(_Stop):
                walcrypt.open(d, migration_progress=progress, **kw, **OPTS)
            label = f"{direction}: stopped at {which} {stage!r} call"
            with walcrypt.open(d, **kw, **OPTS) as s:       # the next open redoes (or has finished) it
                assert s.encrypted == (direction == "to-encrypted"), label
                _check_content(s, label)
            _assert_no_temp_dirs(d)
            if direction == "to-encrypted":
                _assert_no_marker(d)
            with walcrypt.open(d, kek=redo_kek if direction == "to-encrypted" else None,
                               encrypted=direction == "to-encrypted", **OPTS) as s:
                _check_content(s, label + " (plain reopen)")
            shutil.rmtree(d)


@pytest.mark.parametrize("direction", ["to-encrypted", "to-plaintext"])
@pytest.mark.parametrize("op", ["fdatasync", "fsync_dir", "rename"])
def test_interrupted_by_crash(plain_template, enc_template, tmp_path, kek, op, direction):
    """Power loss at every durability point of a migration (LMDB commits are outside the VFS and
    taken as durable when they return)."""
    if direction == "to-encrypted":
        template, kw = plain_template, dict(kek=kek, migrate=True)
    else:
        template, kw = enc_template, dict(kek=ENC_KEK, encrypted=False, decrypt_existing=True)
    fired = 0
    failures = []
    for when in ("before", "after"):
        for n in range(1, 200):                          # bounded; stops when no crash fires
            d = str(tmp_path / f"{when}-{n}")
            shutil.copytree(template, d)
            cv = CrashVFS(holding_root=str(tmp_path))
            cv.arm_crash(op, n, when)
            crashed = False
            try:
                s = walcrypt.open(d, vfs=cv, **kw, **OPTS)
            except SimulatedCrash:
                crashed = True
            else:
                try:
                    s.close()
                except SimulatedCrash:
                    crashed = True
            if cv.crashed:
                cv.crash(torn=(n % 3 == 0), rng=random.Random(n))
            else:
                cv.shutdown()
            label = f"{direction}: crash {when} {op} #{n}"
            try:
                with walcrypt.open(d, **kw, **OPTS) as s:
                    assert s.encrypted == (direction == "to-encrypted"), label
                    _check_content(s, label)
                _assert_no_temp_dirs(d)
                if direction == "to-encrypted":
                    _assert_no_marker(d)
            except (AssertionError, walcrypt.WalcryptError) as exc:
                failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            shutil.rmtree(d)
            if not crashed:
                break
            fired += 1
        else:
            pytest.fail(f"{op} {when}: crashes still firing after 200 points")
    print(f"{op}/{direction}: {fired} crash points")
    assert fired >= 2
    assert not failures, f"{len(failures)} crash points failed:\n" + "\n".join(failures)
