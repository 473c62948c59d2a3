"""Snapshots: round trips, a > 256 MiB streamed snapshot in bounded memory, chunk damage,
.broken fallback, retention, log reset on install, ConfState, embedded wrapped keys."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

import walcrypt
from walcrypt import (AuthenticationError, CompactedError, ConfState, CorruptionError, Entry, HardState,
                      SnapshotMeta)
from walcrypt import crypto
from walcrypt.snapshot import SnapshotFile, snapshot_keys
from walcrypt.vfs import DEFAULT_VFS
from walcrypt.testing import CrashVFS, SimulatedCrash

import snaptest as T
import wctest


# ----------------------------------------------------------------------------------------- round trips

def test_round_trip_bytes(data_dir, kek):
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 51)
        data = T.snap_data(50)
        meta = SnapshotMeta(50, s.term(50), ConfState(voters=(1, 2, 3), learners=(7,)))
        s.save_snapshot(meta, data)
        snap = s.snapshot()
        assert snap.meta == meta
        assert snap.size == len(data)
        assert snap.data == data
        with snap.open() as f:
            assert f.read() == data
    with T.open_store(data_dir, kek) as s:
        snap = s.snapshot()
        assert snap.meta == meta and snap.size == len(data) and snap.data == data


@pytest.mark.parametrize("size", [0, 1, T.CHUNK - 1, T.CHUNK, T.CHUNK + 1, 5 * T.CHUNK, 5 * T.CHUNK + 17])
def test_round_trip_file_object(data_dir, kek, size):
    data = T.snap_data(9, size)
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 11)
        s.save_snapshot(SnapshotMeta(9, s.term(9), ConfState(voters=(1,))), io.BytesIO(data))
        assert s.snapshot().data == data
    with T.open_store(data_dir, kek) as s:
        snap = s.snapshot()
        assert snap.size == size
        got = bytearray()
        with snap.open() as f:
            for _ in range(size // 1000 + 2):          # small reads across chunk boundaries
                piece = f.read(1000)
                if not piece:
                    break
                got += piece
        assert bytes(got) == data


def test_round_trip_real_file(data_dir, kek, tmp_path):
    src = tmp_path / "state.bin"
    data = T.snap_data(3, 7 * T.CHUNK + 5)
    src.write_bytes(data)
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 4)
        with open(src, "rb") as f:
            s.save_snapshot(SnapshotMeta(3, s.term(3)), f)
        assert s.snapshot().data == data
        assert len(T.parse_snapshot(T.read(T.snap_files(data_dir)[0])).chunks) == 8


# ----------------------------------------------------------------------------------------- big snapshot

_BIG_CHILD = r"""
import hashlib, io, json, os, resource, sys
import walcrypt
from walcrypt import ConfState, Entry, SnapshotMeta
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SIZE = int(sys.argv[2])
BLOCK = 1 << 20

class Lazy(io.RawIOBase):
    # Deterministic pseudo-random bytes (AES-CTR keystream), produced on demand, never held whole.
    def __init__(self, size):
        self.left = size
        self.enc = Cipher(algorithms.AES(b"\x07" * 32), modes.CTR(bytes(16))).encryptor()
        self.sha = hashlib.sha256()
        self.zero = bytes(BLOCK)
    def readable(self):
        return True
    def readinto(self, b):
        n = min(len(b), self.left, BLOCK)
        if n <= 0:
            return 0
        block = self.enc.update(self.zero[:n])
        self.sha.update(block)
        b[:n] = block
        self.left -= n
        return n

def rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

path = sys.argv[1]
kek = walcrypt.RawKey(b"k" * 32)
s = walcrypt.open(path, kek=kek, segment_size=1 << 16)
s.save(entries=[Entry(i, 1, b"e") for i in range(1, 11)])
s.save_snapshot(SnapshotMeta(5, 1, ConfState((1,))), Lazy(3 << 20))     # warm up every code path
with s.snapshot().open() as f:
    while f.read(BLOCK):
        pass
before = rss_kib()
src = Lazy(SIZE)
s.save_snapshot(SnapshotMeta(10, 1, ConfState((1, 2, 3))), src)
assert src.left == 0
snap = s.snapshot()
h, n = hashlib.sha256(), 0
with snap.open() as f:
    for _ in range(SIZE // 4096 + 10):           # bounded
        piece = f.read(BLOCK)
        if not piece:
            break
        h.update(piece)
        n += len(piece)
s.close()
after_read = rss_kib()
s = walcrypt.open(path, kek=kek, segment_size=1 << 16)    # open authenticates the newest snapshot end to end
reopened = (s.snapshot().meta.index, s.snapshot().size)
s.close()
print(json.dumps({"gen": src.sha.hexdigest(), "read": h.hexdigest(), "n": n, "size": snap.size,
                  "before": before, "after_read": after_read, "after_reopen": rss_kib(),
                  "reopened": reopened}))
"""


def test_big_snapshot_streams_in_bounded_memory(tmp_path):
    size = (256 << 20) + 12345                       # > 256 MiB, not a multiple of the chunk size
    path = str(tmp_path / "big")
    proc = subprocess.Popen([sys.executable, "-c", _BIG_CHILD, path, str(size)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=wctest.child_env(), cwd=wctest.REPO_ROOT)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
        shutil.rmtree(path, ignore_errors=True)          # do not leave 256 MiB behind, pass or fail
    assert proc.returncode == 0, err.decode()[-3000:]
    res = json.loads(out.decode().strip().splitlines()[-1])
    assert res["n"] == size and res["size"] == size
    assert res["read"] == res["gen"], "the snapshot read back differs from what was written"
    assert res["reopened"] == [10, size]
    growth_mib = (max(res["after_read"], res["after_reopen"]) - res["before"]) / 1024
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.1f} MiB for a {size >> 20} MiB snapshot"


# ----------------------------------------------------------------------------------------- chunk damage

def _truncate_mid_last(raw, lay, other):
    last = lay.chunks[-1]
    return raw[:last.offset + 8 + last.length // 2]


def _truncate_drop_final(raw, lay, other):
    return raw[:lay.chunks[-1].offset]


def _truncate_to_data(raw, lay, other):
    return raw[:lay.data_offset]


def _truncate_one_byte(raw, lay, other):
    return raw[:-1]


def _swap(raw, lay, other):
    a, b = lay.chunks[0], lay.chunks[1]
    assert a.length == b.length
    return raw[:a.offset] + raw[b.offset:b.end] + raw[a.offset:a.end] + raw[b.end:]


def _duplicate_over(raw, lay, other):
    a, b = lay.chunks[0], lay.chunks[1]
    return raw[:b.offset] + raw[a.offset:a.end] + raw[b.end:]


def _duplicate_insert(raw, lay, other):
    a = lay.chunks[0]
    return raw[:a.end] + raw[a.offset:a.end] + raw[a.end:]


def _drop_middle(raw, lay, other):
    b = lay.chunks[1]
    return raw[:b.offset] + raw[b.end:]


def _flip(raw, lay, other):
    c = lay.chunks[1]
    out = bytearray(raw)
    out[c.offset + 8 + c.length // 2] ^= 0x01
    return bytes(out)


def _flip_tag(raw, lay, other):
    out = bytearray(raw)
    out[lay.chunks[0].end - 1] ^= 0x80
    return bytes(out)


def _mark_middle_final(raw, lay, other):
    c = lay.chunks[1]
    out = bytearray(raw)
    out[c.offset + 4] |= 1
    return bytes(out)


def _unmark_final(raw, lay, other):
    c = lay.chunks[-1]
    out = bytearray(raw)
    out[c.offset + 4] &= ~1
    return bytes(out)


def _from_other(raw, lay, other):
    olay = T.parse_snapshot(other)
    a, b = lay.chunks[1], olay.chunks[1]
    assert a.length == b.length
    return raw[:a.offset] + other[b.offset:b.end] + raw[a.end:]


def _other_tail(raw, lay, other):
    olay = T.parse_snapshot(other)
    return raw[:lay.chunks[1].offset] + other[olay.chunks[1].offset:]


def _trailing(raw, lay, other):
    return raw + b"\0" * 8


DAMAGE = {
    "truncated-mid-last-chunk": _truncate_mid_last,
    "truncated-final-chunk-missing": _truncate_drop_final,
    "truncated-no-chunks": _truncate_to_data,
    "truncated-one-byte": _truncate_one_byte,
    "two-chunks-swapped": _swap,
    "chunk-duplicated-over-next": _duplicate_over,
    "chunk-duplicated-inserted": _duplicate_insert,
    "middle-chunk-dropped": _drop_middle,
    "bit-flipped-in-chunk": _flip,
    "bit-flipped-in-tag": _flip_tag,
    "middle-chunk-marked-final": _mark_middle_final,
    "final-flag-cleared": _unmark_final,
    "chunk-from-other-snapshot": _from_other,
    "tail-from-other-snapshot": _other_tail,
    "bytes-after-final-chunk": _trailing,
}


@pytest.fixture
def two_snapshots(data_dir, kek):
    """An open store with two snapshots of equal size (4 chunks each); yields (store, newest path, older bytes)."""
    s = T.open_store(data_dir, kek)
    try:
        T.fill(s, 1, 41)
        T.save_snap(s, 20)
        T.save_snap(s, 40)
        files = T.snap_files(data_dir)
        assert len(files) == 2
        yield s, files[-1], T.read(files[0])
    finally:
        s.close()


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_chunk_damage_detected_by_snapshot_file(two_snapshots, case, tmp_path):
    s, path, other = two_snapshots
    raw = T.read(path)
    lay = T.parse_snapshot(raw)
    assert len(lay.chunks) == 4
    bad = DAMAGE[case](raw, lay, other)
    assert bad != raw
    copy = str(tmp_path / os.path.basename(path))
    with open(copy, "wb") as f:
        f.write(bad)
    sf = SnapshotFile(DEFAULT_VFS, copy)
    key, commitment = snapshot_keys(s.secret(sf.header.key_id), sf.header)
    sf.unlock(crypto.suite(sf.header.algorithm).new(key), commitment)
    assert sf.meta.index == 40
    with pytest.raises(CorruptionError):
        sf.verify()
    # the intact file verifies with the same procedure
    good = SnapshotFile(DEFAULT_VFS, path)
    good.unlock(crypto.suite(good.header.algorithm).new(key), commitment)
    assert good.verify() == len(T.snap_data(40))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_chunk_damage_detected_by_store_read(two_snapshots, case):
    s, path, other = two_snapshots
    raw = T.read(path)
    T.write(path, DAMAGE[case](raw, T.parse_snapshot(raw), other))
    snap = s.snapshot()
    assert snap.meta.index == 40
    got = bytearray()
    with pytest.raises(CorruptionError):
        with snap.open() as f:
            for _ in range(100):                         # bounded
                piece = f.read(T.CHUNK)
                if not piece:
                    break
                got += piece
    # whatever was handed out before the error is a correct prefix: bad data is never returned
    assert T.snap_data(40).startswith(bytes(got))


def test_chunk_from_other_snapshot_is_authentication_error(two_snapshots):
    s, path, other = two_snapshots
    raw = T.read(path)
    T.write(path, _from_other(raw, T.parse_snapshot(raw), other))
    with pytest.raises(AuthenticationError):
        s.snapshot().data


# ----------------------------------------------------------------------------------------- fallback

def test_corrupted_newest_falls_back_to_older(data_dir, kek):
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 301, length=200)                # ~60 KiB of log over many 8 KiB segments
        T.save_snap(s, 100)
        T.save_snap(s, 250, conf=ConfState(voters=(4, 5, 6)))
        s.compact(250)
        assert s.first_index() == 251
        hs, _ = s.initial_state()
    assert len(T.seg_files(data_dir)) > 3
    older, newest = T.snap_files(data_dir)
    raw = bytearray(T.read(newest))
    lay = T.parse_snapshot(bytes(raw))
    raw[lay.chunks[2].offset + 20] ^= 0x04
    T.write(newest, bytes(raw))

    with T.open_store(data_dir, kek) as s:
        snap = s.snapshot()
        assert snap.meta.index == 100 and snap.data == T.snap_data(100)
        assert s.initial_state() == (hs, ConfState(voters=(1, 2, 3)))
        assert os.path.exists(newest + ".broken") and not os.path.exists(newest)
        assert T.read(newest + ".broken") == bytes(raw)
        assert s.first_index() == 101 and s.last_index() == 300
        assert s.entries(101, 301) == T.entries(101, 301, 200)
        with pytest.raises(CompactedError):
            s.entries(100, 101)
        # the store goes on: new entries and a new snapshot
        T.fill(s, 301, 311, length=200)
        T.save_snap(s, 310)
    with T.open_store(data_dir, kek) as s:
        assert s.snapshot().meta.index == 310 and s.snapshot().data == T.snap_data(310)
        assert s.entries(s.first_index(), 311)[-1] == T.entries(310, 311, 200)[0]
        assert os.path.exists(newest + ".broken")


def test_corrupted_newest_header_falls_back(data_dir, kek):
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 61)
        T.save_snap(s, 30)
        T.save_snap(s, 60)
    older, newest = T.snap_files(data_dir)
    raw = bytearray(T.read(newest))
    raw[T.SNAP_HEADER + 5] ^= 0x20                   # inside the keyring bundle (authenticated by META)
    T.write(newest, bytes(raw))
    with T.open_store(data_dir, kek) as s:
        assert s.snapshot().meta.index == 30
        assert os.path.exists(newest + ".broken")
        assert s.entries(31, 61) == T.entries(31, 61)


# ----------------------------------------------------------------------------------------- retention

@pytest.mark.parametrize("keep", [None, 1, 3])
def test_retention_keeps_n(data_dir, kek, keep):
    opts = {} if keep is None else {"keep_snapshots": keep}
    n = 2 if keep is None else keep
    with T.open_store(data_dir, kek, **opts) as s:
        T.fill(s, 1, 61)
        for idx in (10, 20, 30, 40, 50):
            T.save_snap(s, idx, size=100)
            kept = T.snap_files(data_dir)
            assert len(kept) == min(n, idx // 10)
        assert s.snapshot().meta.index == 50
    files = T.snap_files(data_dir)
    assert [T.parse_snapshot(T.read(p)).header.index for p in files] == [50 - 10 * i for i in range(n)][::-1]
    with T.open_store(data_dir, kek, **opts) as s:
        assert s.snapshot().meta.index == 50 and s.snapshot().data == T.snap_data(50, 100)


def test_keep_zero_is_usage_error(data_dir, kek):
    with pytest.raises(walcrypt.UsageError):
        T.open_store(data_dir, kek, keep_snapshots=0)


# ----------------------------------------------------------------------------------------- log reset

@pytest.mark.parametrize("kind", ["ahead", "conflicting-term", "empty-log"])
def test_snapshot_from_leader_resets_log(data_dir, kek, kind):
    with T.open_store(data_dir, kek) as s:
        if kind != "empty-log":
            T.fill(s, 1, 31)
        index, term = {"ahead": (100, 7), "conflicting-term": (20, 9), "empty-log": (100, 7)}[kind]
        data = T.snap_data(index)
        cs = ConfState(voters=(1, 2, 3), learners=(9,))
        s.save_snapshot(SnapshotMeta(index, term, cs), data)
        assert s.first_index() == index + 1
        assert s.last_index() == index
        assert s.term(index) == term
        with pytest.raises(CompactedError):
            s.entries(index, index + 1)
        assert s.initial_state()[1] == cs
        s.save(hard_state=HardState(term, 1, index + 1), entries=[Entry(index + 1, term, b"after-reset")])
        assert s.entries(index + 1, index + 2) == [Entry(index + 1, term, b"after-reset")]
    with T.open_store(data_dir, kek) as s:
        assert s.first_index() == index + 1 and s.last_index() == index + 1
        assert s.term(index) == term
        assert s.entries(index + 1, index + 2) == [Entry(index + 1, term, b"after-reset")]
        assert s.snapshot().meta == SnapshotMeta(index, term, cs) and s.snapshot().data == data
        assert s.initial_state() == (HardState(term, 1, index + 1), cs)
        s.save(entries=[Entry(index + 2, term, b"more")])
    with T.open_store(data_dir, kek) as s:
        assert s.last_index() == index + 2
        assert [e.data for e in s.entries(index + 1, index + 3)] == [b"after-reset", b"more"]


def test_snapshot_inside_log_keeps_log(data_dir, kek):
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 31)
        T.save_snap(s, 20)
        assert s.last_index() == 30
        assert s.entries(1, 31) == T.entries(1, 31)    # a snapshot alone does not compact


def test_older_snapshot_is_refused(data_dir, kek):
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 31)
        T.save_snap(s, 20)
        with pytest.raises(walcrypt.UsageError):
            T.save_snap(s, 10)
        assert s.snapshot().meta.index == 20


# ----------------------------------------------------------------------------------------- conf state

def test_initial_state_carries_snapshot_conf_state(data_dir, kek):
    with T.open_store(data_dir, kek) as s:
        assert s.initial_state()[1] == ConfState()
        T.fill(s, 1, 21)
        T.save_snap(s, 10, conf=ConfState(voters=(1, 2), learners=(3,)))
        assert s.initial_state()[1] == ConfState(voters=(1, 2), learners=(3,))
        T.save_snap(s, 20, conf=ConfState(voters=(1, 2, 4)))
        assert s.initial_state()[1] == ConfState(voters=(1, 2, 4))
    with T.open_store(data_dir, kek) as s:
        hs, cs = s.initial_state()
        assert cs == ConfState(voters=(1, 2, 4))
        assert hs == HardState(1, 1, 20)


# ----------------------------------------------------------------------------------------- wrapped keys

def test_snapshot_embeds_wrapped_keys_never_the_kek(data_dir, kek, kek_bytes):
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 21)
        T.save_snap(s, 10)
        s.rotate_dek()
        T.fill(s, 21, 31)
        T.save_snap(s, 30)
        store_id = s.store_id.hex()
    files = T.snap_files(data_dir)
    assert files
    for p in files:
        lay = T.parse_snapshot(T.read(p), p)
        doc = json.loads(lay.bundle)
        assert doc["store_id"] == store_id
        ids = {k["id"]: k for k in doc["keys"]}
        assert lay.header.key_id.hex() in ids, "the snapshot's own data key is not in its keyring bundle"
        own = ids[lay.header.key_id.hex()]
        assert len(bytes.fromhex(own["wrapped"])) >= 32
        T.assert_no_kek(p, kek_bytes)
    for p in T.files_in(data_dir):                      # nowhere in the data directory, LMDB included
        T.assert_no_kek(p, kek_bytes)


def test_snapshot_restorable_from_its_own_bundle(data_dir, kek, tmp_path):
    """The wrapped key in a snapshot's bundle plus the KEK decrypts it (no LMDB needed)."""
    from walcrypt import keys as K
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 21)
        T.save_snap(s, 20)
    path = T.snap_files(data_dir)[0]
    copy = str(tmp_path / "alone.snap")
    shutil.copy(path, copy)
    shutil.rmtree(data_dir)
    sf = SnapshotFile(DEFAULT_VFS, copy)
    doc = sf.bundle_doc()
    entry = next(k for k in doc["keys"] if bytes.fromhex(k["id"]) == sf.header.key_id)
    wrapper = kek.wrapper(doc.get("kek_params"))
    dek = wrapper.unwrap(bytes.fromhex(entry["wrapped"]),
                         K.wrap_context(bytes.fromhex(doc["store_id"]), sf.header.key_id, entry["purpose"]))
    key, commitment = snapshot_keys(dek, sf.header)
    sf.unlock(crypto.suite(sf.header.algorithm).new(key), commitment)
    assert sf.meta.index == 20
    assert b"".join(sf.chunks()) == T.snap_data(20)


# ----------------------------------------------------------------------------------------- power loss

def _power_loss(store, cv) -> None:
    """Lose power now: the next write fails, the store is dropped, unsynced state is undone."""
    cv.arm_crash("pwrite", 1, "before")
    try:
        store.close()
    except SimulatedCrash:
        pass
    cv.crash()


@pytest.mark.parametrize("kind", ["inside-log", "from-leader"])
def test_first_snapshot_survives_power_loss(data_dir, kek, tmp_path, kind):
    """save_snapshot is durable on return, also for the store's very first snapshot (whose
    directory the save creates)."""
    with T.open_store(data_dir, kek) as s:
        T.fill(s, 1, 21)
    cv = CrashVFS(holding_root=str(tmp_path))
    s = T.open_store(data_dir, kek, vfs=cv)
    index, term = (20, 1) if kind == "inside-log" else (100, 4)
    s.save_snapshot(SnapshotMeta(index, term, ConfState(voters=(1, 2, 3))), T.snap_data(index))
    _power_loss(s, cv)
    with T.open_store(data_dir, kek) as s:
        snap = s.snapshot()
        assert snap is not None, f"an acknowledged snapshot was lost (repairs: {s.repairs})"
        assert snap.meta.index == index and snap.data == T.snap_data(index)
        if kind == "from-leader":
            assert (s.first_index(), s.last_index()) == (101, 100)
        else:
            assert s.entries(1, 21) == T.entries(1, 21)


@pytest.fixture(scope="module")
def snap_template(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("snapcrash") / "template")
    with T.open_store(d, walcrypt.RawKey(wctest.KEK_BYTES)) as s:
        T.fill(s, 1, 41)
        T.save_snap(s, 20)
    return d


@pytest.mark.parametrize("kind", ["inside-log", "from-leader"])
@pytest.mark.parametrize("op", ["fdatasync", "fsync_dir", "rename", "pwrite"])
def test_save_snapshot_crash_points(snap_template, tmp_path, kek, op, kind):
    """Power loss at every point of save_snapshot: afterwards the store holds either the old state
    (snapshot at 20, log 1..40) or the new snapshot, complete -- never a half of each.
    (LMDB commits are outside the VFS and durable when they return.)"""
    index, term = (40, 1) if kind == "inside-log" else (100, 4)
    failures, fired = [], 0
    for when in ("before", "after"):
        for n in range(1, 80):                               # bounded; stops when no crash fires
            d = str(tmp_path / f"{when}-{n}")
            shutil.copytree(snap_template, d)
            cv = CrashVFS(holding_root=str(tmp_path))
            s = T.open_store(d, kek, vfs=cv)
            cv.arm_crash(op, n, when)
            returned = False
            try:
                s.save_snapshot(SnapshotMeta(index, term, ConfState(voters=(1, 2, 3))), T.snap_data(index))
                returned = True
            except SimulatedCrash:
                pass
            try:
                s.close()
            except SimulatedCrash:
                pass
            crashed = cv.crashed
            if crashed:
                cv.crash(torn=(n % 2 == 1), rng=random.Random(n))
            else:
                cv.shutdown()
            label = f"{kind}: crash {when} {op} #{n}"
            try:
                with T.open_store(d, kek) as s:
                    snap = s.snapshot()
                    assert snap is not None, f"{label}: no snapshot at all"
                    assert snap.meta.index in (20, index), label
                    if returned:
                        assert snap.meta.index == index, f"{label}: acknowledged snapshot lost"
                    assert snap.data == T.snap_data(snap.meta.index), label
                    if snap.meta.index == 20:
                        assert (s.first_index(), s.last_index()) == (1, 40), label
                        assert s.entries(1, 41) == T.entries(1, 41), label
                    elif kind == "from-leader":
                        assert (s.first_index(), s.last_index()) == (101, 100), label
                    else:
                        assert s.entries(s.first_index(), 41) == T.entries(s.first_index(), 41), label
                    assert not [n_ for n_ in os.listdir(os.path.join(d, T.ENC_SNAP)) if n_.startswith(".tmp-")]
                    T.fill(s, s.last_index() + 1, s.last_index() + 3)
            except (AssertionError, walcrypt.WalcryptError) as exc:
                failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            shutil.rmtree(d)
            if not crashed:
                break
            fired += 1
        else:
            pytest.fail(f"{op} {when}: crashes still firing after 80 points")
    assert fired >= 1
    assert not failures, f"{len(failures)} crash points failed:\n" + "\n".join(failures)
