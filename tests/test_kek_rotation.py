"""Key material at rest after a KEK rotation and after a key is destroyed.

``rotate_kek`` replaces every retained snapshot file (each carries its own keyring bundle, the DEK
wrapped under the KEK) by a copy wrapped under the new KEK, in the commit that re-wraps the keyring,
and overwrites the free pages of ``meta/data.mdb`` that LMDB's copy-on-write leaves behind (a scrub,
in the same file); destroying a retired DEK does the same for its record.  Checked here on generated stores (several retained
snapshots, several generations of data keys, extra snapshot metadata, quarantined ``.broken``
copies), while the store is still open and after it closed, and after an interruption at every step:

* no file under the data directory holds a key wrapped under the old KEK (every file is scanned for
  the wrapped bytes, LMDB's free pages included), nor a destroyed key;
* the old KEK opens nothing and unwraps nothing from any bundle left in the directory;
* every acknowledged entry and every retained snapshot is there, byte for byte;
* a power loss (tests/test_crash_points.py's CrashVFS) at every file operation of a rotation, and a
  SIGKILL of a real process at random moments of rotations, leave a store that exactly one of the
  two KEKs opens, with everything in it; the next open finishes what the crash left.

The exception-injection enumeration of the same operations is in tests/test_exception_injection.py
(scenarios ``rotate-kek`` and ``rotate-dek-destroy``).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta, WrongKeyError
from walcrypt import keys as K
from walcrypt import meta as M
from walcrypt import metascrub as MS
from walcrypt.check import check
from walcrypt.snapshot import SnapshotFile
from walcrypt.vfs import DEFAULT_VFS
from walcrypt.testing import CrashVFS, SimulatedCrash

import snaptest as T
import wctest
from injectvfs import KINDS

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
NEW_KEK = walcrypt.RawKey(bytes(reversed(wctest.KEK_BYTES)))
CS = ConfState(voters=(1, 2, 3))
SEG = 4096
OPTS = dict(segment_size=SEG, snapshot_chunk_size=512, sync="always")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(i, term, wctest.entry_data(i, 24 + i % 40)) for i in range(lo, hi)]


def fill(s, lo: int, hi: int, term: int = 1, step: int = 4) -> None:
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        s.save(HardState(term, 1, b - 1), ents(a, b, term))


def wrapped_blobs(s) -> set[bytes]:
    """Every wrapped key the store holds now: the keyring's and the metadata key."""
    with s.meta.read() as r:
        out = {r.raw(M.DB_STORE, M.K_META_KEY)}
    return out | {k.wrapped for k in s.keys.values() if k.wrapped}


def holders(root: str, blobs) -> list[str]:
    """Files under ``root`` holding any of ``blobs``, raw or as the hex a keyring bundle stores."""
    pats = [b for b in blobs if b] + [b.hex().encode() for b in blobs if b]
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            if any(p in data for p in pats):
                found.append(os.path.relpath(path, root))
    return found


def snap_names(root: str) -> list[str]:
    d = os.path.join(root, "snap-v1-encrypted")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def assert_old_kek_unwraps_nothing(root: str, old_kek, old_params: dict) -> None:
    """Every keyring bundle in the data directory: neither its check value nor any of its wrapped
    keys is the old KEK's (the unwrap itself is tried, check value aside)."""
    wrapper = old_kek.wrapper(old_params)
    d = os.path.join(root, "snap-v1-encrypted")
    for name in os.listdir(d):
        if not name.endswith(".snap"):
            continue
        doc = SnapshotFile(DEFAULT_VFS, os.path.join(d, name)).bundle_doc()
        assert doc["kek_check"] != (wrapper.check_value() or b"").hex(), f"{name}: bundle under the old KEK"
        store_id = bytes.fromhex(doc["store_id"])
        tries = [(doc["meta_key"], K.PURPOSE_META)] + [(k, k["purpose"]) for k in doc["keys"]]
        for k, purpose in tries:
            with pytest.raises(WrongKeyError):
                wrapper.unwrap(bytes.fromhex(k["wrapped"]), K.wrap_context(store_id, bytes.fromhex(k["id"]), purpose))


def snapshot_contents(s) -> list[tuple]:
    """(index, term, key ID, data, extra metadata) of every retained snapshot, oldest first."""
    out = []
    for info in s.snapshots.infos:
        snap = s.snapshots.open_info(info)
        out.append((info.index, info.term, info.key_id, snap.data, snap.file.extra))
    return out


def _save_snap(s, index: int, rng: random.Random | None = None) -> None:
    extra = {"app": "kv", "revision": index} if rng is None or rng.random() < 0.7 else None
    w = s.begin_snapshot(SnapshotMeta(index, s.term(index), CS), extra_meta=extra)
    w.write(T.snap_data(index, 1500 + index % 700))
    w.commit()


# ---------------------------------------------------------------------------------------------
# Generated stores
# ---------------------------------------------------------------------------------------------

def _generated_store(path: str, rng: random.Random, **kw) -> dict:
    """A store with a generated history: entries, several snapshots (some with extra metadata),
    DEK rotations between them.  -> what a reopen must find."""
    keep = kw.get("keep_snapshots", 2)
    with walcrypt.open(path, kek=KEK, **OPTS, **kw) as s:
        last = 0
        for _ in range(rng.randint(1, 5)):
            n = rng.randint(3, 25)
            fill(s, last + 1, last + 1 + n)
            last += n
            if rng.random() < 0.8:
                _save_snap(s, rng.randint(max(1, last - 5), last), rng)
            if rng.random() < 0.3:
                s.rotate_dek()
                _save_snap(s, last, rng)                   # completes it
        if not s.snapshots.infos:
            _save_snap(s, last, rng)
        assert len(s.snapshots.infos) <= keep
        return {"entries": s.entries(s.first_index(), s.last_index() + 1), "hs": s.initial_state()[0],
                "snapshots": snapshot_contents(s)}


def _check_contents(s, expect: dict) -> None:
    assert s.entries(s.first_index(), s.last_index() + 1) == expect["entries"]
    assert s.initial_state()[0] == expect["hs"]
    assert snapshot_contents(s) == expect["snapshots"]


@pytest.mark.parametrize("seed", range(8))
def test_rotate_kek_leaves_no_key_under_the_old_kek_in_any_file(tmp_path, seed):
    rng = random.Random(seed)
    path = str(tmp_path / "data")
    keep = rng.choice([1, 2, 3, 4])
    expect = _generated_store(path, rng, keep_snapshots=keep)
    keks = [KEK, NEW_KEK, walcrypt.RawKey(os.urandom(32))]
    for old, new in zip(keks, keks[1:]):                    # and once more, from the new KEK to a third
        with walcrypt.open(path, kek=old, keep_snapshots=keep, **OPTS) as s:
            before_names = snap_names(path)
            old_blobs, old_params = wrapped_blobs(s), s.kek_params
            s.rotate_kek(new)
            # at once, while the store is open: the snapshots are copies, the free pages gone
            assert not holders(path, old_blobs), "a file holds a key wrapped under the old KEK"
            assert len(snap_names(path)) == len(before_names) and not set(snap_names(path)) & set(before_names)
            _check_contents(s, expect)
            fill(s, s.last_index() + 1, s.last_index() + 3)    # still writable
            expect["entries"] = s.entries(s.first_index(), s.last_index() + 1)
            expect["hs"] = s.initial_state()[0]
        assert not holders(path, old_blobs)
        assert_old_kek_unwraps_nothing(path, old, old_params)
        with pytest.raises(WrongKeyError):
            walcrypt.open(path, kek=old, **OPTS)
        with walcrypt.open(path, kek=new, keep_snapshots=keep, **OPTS) as s:
            _check_contents(s, expect)
        report = check(path, kek=new)
        assert report.ok, report.findings


def test_the_old_kek_does_not_verify_a_snapshot_file_after_the_rotation(tmp_path):
    """The CLI's view: `walcrypt snapshot inspect FILE --key-file OLD` authenticates nothing."""
    path = str(tmp_path / "data")
    old_file = tmp_path / "old.kek"
    old_file.write_bytes(wctest.KEK_BYTES.hex().encode())
    os.chmod(old_file, 0o600)
    with walcrypt.open(path, kek=KEK, keep_snapshots=3, **OPTS) as s:
        fill(s, 1, 40)
        for idx in (10, 25, 39):
            _save_snap(s, idx)
        s.rotate_kek(NEW_KEK)
    env = wctest.child_env()
    for name in snap_names(path):
        proc = subprocess.run([sys.executable, "-m", "walcrypt.cli", "snapshot", "inspect",
                               os.path.join(path, "snap-v1-encrypted", name), "--key-file", str(old_file), "--json"],
                              env=env, capture_output=True, timeout=120)
        assert not (proc.returncode == 0 and b'"verified": true' in proc.stdout), name


def test_quarantined_snapshot_copies_lose_their_wrapped_keys(tmp_path):
    """A `.broken` copy of a snapshot that failed its checks keeps its bundle: the rotation
    overwrites the wrapped keys in it (the rest is kept for inspection)."""
    path = str(tmp_path / "data")
    with walcrypt.open(path, kek=KEK, keep_snapshots=3, **OPTS) as s:
        fill(s, 1, 40)
        for idx in (10, 25, 39):
            _save_snap(s, idx)
        newest = s.snapshots.infos[-1].path
    with open(newest, "r+b") as f:                      # damage the last chunk: quarantined at open
        f.seek(-5, os.SEEK_END)
        f.write(b"\xff" * 5)
    with walcrypt.open(path, kek=KEK, keep_snapshots=3, **OPTS) as s:
        assert os.path.exists(newest + ".broken") and s.snapshot().meta.index == 25
        size = os.path.getsize(newest + ".broken")
        old_blobs = wrapped_blobs(s)
        assert holders(path, old_blobs)                   # the .broken copy among them
        s.rotate_kek(NEW_KEK)
        assert not holders(path, old_blobs)
        assert os.path.getsize(newest + ".broken") == size
    with walcrypt.open(path, kek=NEW_KEK, keep_snapshots=3, **OPTS) as s:
        assert s.snapshot().data == T.snap_data(25, 1500 + 25 % 700)


def test_rotate_kek_is_refused_while_a_snapshot_is_being_written(tmp_path):
    path = str(tmp_path / "data")
    with walcrypt.open(path, kek=KEK, **OPTS) as s:
        fill(s, 1, 20)
        w = s.begin_snapshot(SnapshotMeta(19, 1, CS))
        w.write(b"half of it")
        with pytest.raises(walcrypt.UsageError, match="being written"):
            s.rotate_kek(NEW_KEK)
        w.commit()
        s.rotate_kek(NEW_KEK)                           # once it is committed
    with walcrypt.open(path, kek=NEW_KEK, **OPTS) as s:
        assert s.snapshot().data == b"half of it"


def _legacy_rotate_kek(s, new_kek) -> None:
    """rotate_kek as walcrypt did it before snapshot files were rewritten: the keyring only."""
    import dataclasses
    params = new_kek.new_params()
    wrapper = new_kek.wrapper(params)
    with s.meta.read() as r:
        meta_id, meta_wrapped = r.raw(M.DB_STORE, M.K_META_KEY_ID), r.raw(M.DB_STORE, M.K_META_KEY)
    meta_secret = s.wrapper.unwrap(meta_wrapped, K.wrap_context(s.store_id, meta_id, K.PURPOSE_META))
    with s.meta.write() as tx:
        tx.put_raw(M.DB_STORE, M.K_KEK_PARAMS, json.dumps(params).encode())
        tx.put_raw(M.DB_STORE, M.K_KEK_CHECK, wrapper.check_value())
        tx.put_raw(M.DB_STORE, M.K_META_KEY, wrapper.wrap(meta_secret, K.wrap_context(s.store_id, meta_id,
                                                                                     K.PURPOSE_META)))
        for k in s.keys.values():
            secret = K.unwrap_entry(s.wrapper, s.store_id, k).material
            blob = wrapper.wrap(secret, K.wrap_context(s.store_id, k.key_id, k.purpose))
            tx.put(M.DB_KEYRING, k.key_id, M.encode_keyring(dataclasses.replace(k, wrapped=blob)))


@pytest.mark.parametrize("seed", range(3))
def test_an_open_rewrites_snapshot_files_an_earlier_rotation_left_under_the_old_kek(tmp_path, seed):
    """A store whose KEK was rotated by a walcrypt that left the snapshot files (and LMDB's free
    pages) alone: the next read-write open replaces them and scrubs the metadata file."""
    rng = random.Random(100 + seed)
    path = str(tmp_path / "data")
    expect = _generated_store(path, rng, keep_snapshots=3)
    with walcrypt.open(path, kek=KEK, keep_snapshots=3, **OPTS) as s:
        old_blobs = wrapped_blobs(s)
        _legacy_rotate_kek(s, NEW_KEK)
    assert holders(path, old_blobs)
    with walcrypt.open(path, kek=NEW_KEK, keep_snapshots=3, **OPTS) as s:
        assert not holders(path, old_blobs)
        _check_contents(s, expect)
    assert_old_kek_unwraps_nothing(path, KEK, {"kind": "raw"})
    assert check(path, kek=NEW_KEK).ok


# ---------------------------------------------------------------------------------------------
# Destroyed keys
# ---------------------------------------------------------------------------------------------

def _source(store):
    idx = store.last_index()
    return SnapshotMeta(idx, store.term(idx), CS), T.snap_data(idx, 1500)


@pytest.mark.parametrize("seed", range(6))
def test_a_destroyed_key_is_in_no_file_once_the_call_returns(tmp_path, seed):
    """DEK rotations (completed by a snapshot source) and full re-keys with destroy_retired_keys, in a
    generated order, with several retained snapshots and a quarantined copy: after each call, while
    the store is still open, and after it closed, no file holds a destroyed key."""
    rng = random.Random(200 + seed)
    path = str(tmp_path / "data")
    kw = dict(kek=KEK, destroy_retired_keys=True, snapshot_source=_source, keep_snapshots=rng.choice([1, 2, 3]),
              **OPTS)
    destroyed: dict[bytes, bytes] = {}
    s = walcrypt.open(path, **kw)
    try:
        fill(s, 1, 30)
        _save_snap(s, 20)
        if rng.random() < 0.5:                             # a quarantined copy under the first key
            _save_snap(s, 29)
            newest = s.snapshots.infos[-1].path
            s.close()
            with open(newest, "r+b") as f:
                f.seek(-3, os.SEEK_END)
                f.write(b"\x00\x01\x02")
            s = walcrypt.open(path, **kw)
            assert os.path.exists(newest + ".broken")
        for _ in range(rng.randint(2, 4)):
            fill(s, s.last_index() + 1, s.last_index() + rng.randint(2, 12))
            blobs = {k.key_id: k.wrapped for k in s.keys.values() if k.wrapped}
            (s.rekey if rng.random() < 0.4 else s.rotate_dek)()
            for kid, st in T.key_states(s).items():
                if st == "destroyed" and kid in blobs:
                    destroyed[kid] = blobs[kid]
            assert not holders(path, destroyed.values()), "a destroyed key survives in the data directory"
            fill(s, s.last_index() + 1, s.last_index() + 3)
            assert not holders(path, destroyed.values())
    finally:
        s.close()
    assert destroyed
    assert not holders(path, destroyed.values())
    with walcrypt.open(path, **kw) as s:
        assert s.snapshot() is not None


# ---------------------------------------------------------------------------------------------
# Power loss at every file operation of a rotation (CrashVFS)
# ---------------------------------------------------------------------------------------------

CRASH_OPS = ("pwrite", "fdatasync", "fsync_dir", "rename", "unlink", "preallocate", "ftruncate")


@pytest.fixture(scope="module")
def snaps_template(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("kek-tpl") / "snaps")
    with walcrypt.open(d, kek=KEK, keep_snapshots=3, **OPTS) as s:
        fill(s, 1, 31)
        for idx in (10, 20, 30):
            _save_snap(s, idx)
        expect = {"entries": s.entries(1, 31), "hs": s.initial_state()[0], "snapshots": snapshot_contents(s),
                  "blobs": wrapped_blobs(s)}
    quarantined = d + "-quarantined"                   # the same, with a .broken copy of a fourth snapshot
    shutil.copytree(d, quarantined)
    with walcrypt.open(quarantined, kek=KEK, keep_snapshots=4, **OPTS) as s:
        _save_snap(s, 30)
        broken = s.snapshots.infos[-1].path
    with open(broken, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xee" * 4)
    with walcrypt.open(quarantined, kek=KEK, keep_snapshots=3, **OPTS):
        pass
    assert os.path.exists(broken + ".broken")
    return {"plain": d, "quarantined": quarantined, "expect": expect}


def _open_either(root: str) -> tuple:
    """Exactly one of the two KEKs opens the store.  -> (store, kek)"""
    opened = []
    for kek in (KEK, NEW_KEK):
        try:
            opened.append((walcrypt.open(root, kek=kek, keep_snapshots=3, **OPTS), kek))
        except WrongKeyError:
            pass
        if opened:
            break
    assert len(opened) == 1, "neither KEK opens the store"
    return opened[0]


def _after_crash(root: str, expect: dict, label: str, opened_by: dict) -> list[str]:
    problems = []
    try:
        s, kek = _open_either(root)
    except (AssertionError, walcrypt.WalcryptError) as exc:
        return [f"{label}: reopening failed: {exc!r}"]
    opened_by["new" if kek is NEW_KEK else "old"] += 1
    try:
        _check_contents(s, expect)
        registered = sorted(os.path.basename(i.path) for i in s.snapshots.infos)
        others = [n for n in snap_names(root) if n not in registered and not n.endswith(".broken")]
        if others:
            problems.append(f"{label}: unregistered snapshot files survive the reopen: {others}")
        if kek is NEW_KEK:
            if holders(root, expect["blobs"]):
                problems.append(f"{label}: after the reopen, {holders(root, expect['blobs'])} hold keys wrapped "
                                "under the old KEK")
        else:
            for info in s.snapshots.infos:
                doc = SnapshotFile(s.vfs, info.path).bundle_doc()
                if bytes.fromhex(doc["kek_check"]) != KEK.wrapper({"kind": "raw"}).check_value():
                    problems.append(f"{label}: the old KEK opens the store but {info.path} is under another")
        nxt = s.last_index() + 1
        s.save(HardState(9, 1, nxt), [Entry(nxt, 9, b"after the crash")])
    except (AssertionError, walcrypt.WalcryptError) as exc:
        problems.append(f"{label}: {type(exc).__name__}: {exc}")
    finally:
        s.close()
    if not problems:
        with walcrypt.open(root, kek=kek, keep_snapshots=3, **OPTS) as s:
            if s.entries(nxt, nxt + 1) != [Entry(nxt, 9, b"after the crash")]:
                problems.append(f"{label}: a save after the reopen did not survive")
    return problems



def _until_crash(*steps) -> None:
    """Run each step (an operation, then close) under an armed CrashVFS; the simulated power loss
    may land in any of them."""
    for step in steps:
        try:
            step()
        except SimulatedCrash:
            pass

@pytest.mark.parametrize("template", ["plain", "quarantined"])
def test_power_loss_at_every_file_operation_of_rotate_kek(snaps_template, tmp_path, template):
    expect = snaps_template["expect"]
    problems, fired, opened_by = [], {}, {"old": 0, "new": 0}
    for op in CRASH_OPS:
        fired[op] = 0
        for when in ("before", "after"):
            for n in range(1, 200):
                hit = False
                for torn in (False, True):
                    root = str(tmp_path / f"{op}-{when}-{n}-{int(torn)}")
                    shutil.copytree(snaps_template[template], root)
                    cv = CrashVFS(holding_root=str(tmp_path))
                    s = walcrypt.open(root, kek=KEK, keep_snapshots=3, vfs=cv, **OPTS)
                    cv.arm_crash(op, n, when)
                    _until_crash(lambda: s.rotate_kek(NEW_KEK), s.close)
                    hit = cv.crashed
                    if not hit:
                        cv.shutdown()
                        shutil.rmtree(root)
                        break
                    cv.crash(torn=torn, rng=random.Random(n * 7 + torn))
                    problems += _after_crash(root, expect, f"{template}: crash {when} {op} #{n} torn={torn}",
                                             opened_by)
                    shutil.rmtree(root)
                if not hit:
                    break
                fired[op] += 1
    print(f"\nrotate_kek ({template}): crash points per operation: {fired}; reopened by {opened_by}")
    assert all(fired[op] for op in ("pwrite", "fdatasync", "fsync_dir", "rename", "unlink")), fired
    assert opened_by["old"] and opened_by["new"], opened_by        # crashes before and after the commit
    assert not problems, f"{len(problems)} crash points failed:\n" + "\n".join(problems[:10])


def test_power_loss_at_every_file_operation_of_a_destroying_rotation(snaps_template, tmp_path):
    kw = dict(kek=KEK, keep_snapshots=3, destroy_retired_keys=True, snapshot_source=_source, **OPTS)
    with walcrypt.open(snaps_template["plain"], kek=KEK, keep_snapshots=3, read_only=True, **OPTS) as s:
        old_key = s.active_key_id()
        old_blob = s.keys[old_key].wrapped
    problems, fired = [], {}
    for op in CRASH_OPS:
        fired[op] = 0
        for when in ("before", "after"):
            for n in range(1, 200):
                root = str(tmp_path / f"{op}-{when}-{n}")
                shutil.copytree(snaps_template["plain"], root)
                cv = CrashVFS(holding_root=str(tmp_path))
                s = walcrypt.open(root, vfs=cv, **kw)
                cv.arm_crash(op, n, when)
                _until_crash(s.rotate_dek, s.close)
                if not cv.crashed:
                    cv.shutdown()
                    shutil.rmtree(root)
                    break
                fired[op] += 1
                cv.crash(torn=bool(n % 2), rng=random.Random(n))
                label = f"crash {when} {op} #{n}"
                try:
                    with walcrypt.open(root, **kw) as s2:       # resumes and finishes the rotation
                        if T.key_states(s2).get(old_key) != "destroyed":
                            problems.append(f"{label}: the retired key was not destroyed by the reopen")
                        if s2.last_index() != 30 or s2.snapshot().meta.index != 30 \
                                or s2.snapshot().data != T.snap_data(30, 1500):
                            problems.append(f"{label}: the log or the rotation's snapshot differs")
                    if holders(root, [old_blob]):
                        problems.append(f"{label}: the destroyed key survives in {holders(root, [old_blob])}")
                except walcrypt.WalcryptError as exc:
                    problems.append(f"{label}: {exc!r}")
                shutil.rmtree(root)
    print(f"\ndestroying rotation: crash points per operation: {fired}")
    assert not problems, f"{len(problems)} crash points failed:\n" + "\n".join(problems[:10])


# ---------------------------------------------------------------------------------------------
# Scrubbing the metadata file's free pages
# ---------------------------------------------------------------------------------------------

def _scrub_done(meta_dir: str) -> bool:
    """Whether the scratch table is there and empty: no scrub is pending (FORMAT.md 9.11)."""
    import lmdb
    env = lmdb.open(meta_dir, readonly=True, lock=False, max_dbs=8)
    try:
        if env.begin().get(MS.SCRUB_DB) is None:
            return False
        db = env.open_db(MS.SCRUB_DB, create=False)
        with env.begin() as txn:
            return txn.stat(db)["entries"] == 0
    finally:
        env.close()


def test_scrub_runs_alongside_transactions_of_other_threads(tmp_path):
    """Threads reading and writing stable values while another scrubs the metadata file over and
    over: every call succeeds, and every value written is there after a reopen."""
    path = str(tmp_path / "data")
    s = walcrypt.open(path, kek=KEK, **OPTS)
    fill(s, 1, 10)
    errors, written = [], {}
    stop = threading.Event()

    def worker(n):
        k = 0
        try:
            while not stop.is_set() and k < 400:
                key, value = b"t%d-%d" % (n, k % 50), os.urandom(24)
                s.stable_set(key, value)
                written[key] = value
                assert s.stable_get(key) == value
                k += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            s.meta.scrub()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    s.close()
    assert _scrub_done(os.path.join(path, "meta"))
    with walcrypt.open(path, kek=KEK, **OPTS) as s2:
        for key, value in written.items():
            assert s2.stable_get(key) == value


READER = """
import sys, walcrypt
kek = walcrypt.RawKey(bytes.fromhex(sys.argv[2]))
for _ in range(8):
    with walcrypt.open(sys.argv[1], kek=kek, read_only=True) as r:
        assert r.meta.locked                      # registered in LMDB's reader table
        print("ready", flush=True)
        for _ in range(60):
            assert r.last_index() >= 19
            assert r.entries(1, 20)[-1].index == 19
            with r.meta.read() as t:              # a read transaction while the writer scrubs
                assert t.raw(b"store", b"store_id") is not None
print("ok", flush=True)
"""


def test_a_reader_in_another_process_is_not_disturbed_by_scrubbing(tmp_path):
    """A read-only open in another process, registered in LMDB's reader table through the shared
    lock.mdb, reads over and over while the writer commits and scrubs: every read succeeds, and so
    does every commit of the writer (data.mdb and lock.mdb are never swapped under either)."""
    path = str(tmp_path / "data")
    s = walcrypt.open(path, kek=KEK, **OPTS)
    fill(s, 1, 20)
    proc = subprocess.Popen([sys.executable, "-c", READER, path, wctest.KEK_BYTES.hex()], env=wctest.child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    scrubs = 0
    try:
        assert proc.stdout.readline().strip() == b"ready"
        while proc.poll() is None:
            s.stable_set(b"k", os.urandom(16))
            s.meta.scrub()
            scrubs += 1
        out, err = proc.communicate(timeout=60)
        s.stable_set(b"k", b"last")
        assert s.stable_get(b"k") == b"last"
    finally:
        s.close()
    assert proc.returncode == 0 and b"ok" in out, err.decode()[-2000:]
    assert scrubs >= 2
    with walcrypt.open(path, kek=KEK, **OPTS) as s2:
        assert s2.entries(1, 20) == ents(1, 20) and s2.stable_get(b"k") == b"last"


PINNER = """
import sys, walcrypt.meta as M
m = M.Meta(sys.argv[1], readonly=True)
with m.read() as r:
    r.raw(b"keyring", b"x")
    print("pinned", flush=True)
    sys.stdin.readline()
m.close()
print("released", flush=True)
"""


def test_a_reader_pinning_a_destroyed_key_delays_its_removal_to_the_next_scrub(tmp_path, caplog):
    """A reader in another process holds a read transaction from before a key is destroyed: the
    pages holding the key cannot be reused while it lasts, so the call returns (after its bounded
    retries) with a warning and the key still in data.mdb; once the reader is done, the next scrub
    removes it."""
    path = str(tmp_path / "data")
    kw = dict(kek=KEK, destroy_retired_keys=True, snapshot_source=_source, **OPTS)
    s = walcrypt.open(path, **kw)
    try:
        fill(s, 1, 30)
        _save_snap(s, 20)
        old = s.active_key_id()
        blob = s.keys[old].wrapped
        proc = subprocess.Popen([sys.executable, "-c", PINNER, os.path.join(path, "meta")], env=wctest.child_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"pinned"
            with caplog.at_level("WARNING", logger="walcrypt"):
                s.rekey()
            assert T.key_states(s)[old] == "destroyed"
            assert holders(path, [blob]) == ["meta/data.mdb"]
            assert any("still in the metadata database" in r.getMessage() for r in caplog.records)
            assert s.meta.scrub_pending()               # the next read-write open scrubs again
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == b"released"
        finally:
            proc.kill()
            proc.wait()
        assert s.meta.scrub([blob]) is True
        assert not holders(path, [blob]) and not s.meta.scrub_pending()
    finally:
        s.close()


def test_a_scrub_interrupted_at_a_crash_is_finished_by_the_next_open(tmp_path):
    """A destroying rotation whose scrub never ran (a crash right after the commit, which marked a
    scrub pending): the next read-write open scrubs, and the key is in no file after it; an open
    with no scrub pending does not scrub (nor grow the file)."""
    path = str(tmp_path / "data")
    kw = dict(kek=KEK, destroy_retired_keys=True, snapshot_source=_source, **OPTS)
    with walcrypt.open(path, **kw) as s:
        fill(s, 1, 30)
        _save_snap(s, 20)
        old = s.active_key_id()
        blob = s.keys[old].wrapped
        real, s.scrub_meta = s.scrub_meta, lambda secrets=(): True
        s.rekey()
        assert T.key_states(s)[old] == "destroyed"
    assert holders(path, [blob]) and not _scrub_done(os.path.join(path, "meta"))
    with walcrypt.open(path, **kw) as s:
        assert not holders(path, [blob])
        assert s.entries(1, 30) == ents(1, 30)
    assert _scrub_done(os.path.join(path, "meta"))
    calls = []
    real = M.Meta._scrub_pass
    M.Meta._scrub_pass = lambda meta: calls.append(1) or real(meta)
    try:
        with walcrypt.open(path, **kw) as s:
            pass
    finally:
        M.Meta._scrub_pass = real
    assert not calls


class _Interrupt:
    """Raise ``kind`` at the k-th step of a scrub: before or after one of its LMDB transactions
    (Meta._txn) or the renewal of the environment (Meta._renew)."""

    def __init__(self, monkeypatch, k: int, when: str, kind):
        self.k, self.when, self.kind, self.n, self.fired = k, when, kind, 0, None
        real_txn, real_renew = M.Meta._txn, M.Meta._renew
        me = self

        def hit(what):
            me.n += 1
            if me.n == me.k and me.fired is None:
                me.fired = (what, me.when)
                raise me.kind()

        from contextlib import contextmanager

        @contextmanager
        def txn(meta, *, write):
            if not write or not me.armed:
                with real_txn(meta, write=write) as t:
                    yield t
                return
            if me.when == "before":
                hit("txn")
            with real_txn(meta, write=write) as t:
                yield t
            if me.when == "after":
                hit("txn")

        def renew(meta):
            if me.armed and me.when == "before":
                hit("renew")
            real_renew(meta)
            if me.armed and me.when == "after":
                hit("renew")

        self.armed = False
        monkeypatch.setattr(M.Meta, "_txn", txn)
        monkeypatch.setattr(M.Meta, "_renew", renew)


@pytest.mark.parametrize("kind", list(KINDS))
def test_scrub_interrupted_at_every_step_leaves_a_valid_metadata_file(tmp_path, monkeypatch, kind):
    """An exception before or after each step of the scrub (the renewal of the environment and
    each of its LMDB commits): the store either goes on (a later commit is durable) or refuses
    every transaction, and it reopens with everything in it, the catalog intact and no scrub left
    pending (the open finishes an interrupted one)."""
    template = str(tmp_path / "template")
    with walcrypt.open(template, kek=KEK, **OPTS) as s:
        fill(s, 1, 20)
        s.stable_set(b"CurrentTerm", b"\x05")
    k, runs = 1, 0
    while True:
        fired_any = False
        for when in ("before", "after"):
            root = str(tmp_path / f"run-{k}-{when}")
            shutil.copytree(template, root)
            s = walcrypt.open(root, kek=KEK, **OPTS)
            s.stable_set(b"free", b"pages")                         # something to scrub away
            hook = _Interrupt(monkeypatch, k, when, KINDS[kind])
            hook.armed = True
            try:
                s.meta.scrub()
            except KINDS[kind]:
                pass
            hook.armed = False
            if hook.fired is None:
                s.close()
                shutil.rmtree(root)
                continue
            fired_any, runs = True, runs + 1
            try:
                s.stable_set(b"after", b"the interruption")      # either durable, or refused
                wrote = True
            except walcrypt.StorageError:
                wrote = False
            s.close()
            with walcrypt.open(root, kek=KEK, **OPTS) as s2:
                assert s2.entries(1, 20) == ents(1, 20)
                assert s2.stable_get(b"CurrentTerm") == b"\x05" and s2.stable_get(b"free") == b"pages"
                assert s2.stable_get(b"after") == (b"the interruption" if wrote else None), (k, when, hook.fired)
                s2.meta.verify_catalog()
            assert _scrub_done(os.path.join(root, "meta")), (k, when, hook.fired)
            assert check(root, kek=KEK).ok
            shutil.rmtree(root)
        if not fired_any:
            break
        k += 1
    assert runs >= 8, runs


def test_a_left_over_scratch_table_never_breaks_an_open(tmp_path):
    """A scratch table left by a crash in the middle of a scrub (made here by hand, with records):
    read-only opens, the catalog check and walcrypt check ignore it; a read-write open scrubs and
    empties it."""
    import lmdb
    path = str(tmp_path / "data")
    with walcrypt.open(path, kek=KEK, **OPTS) as s:
        fill(s, 1, 10)
        with s.meta._txn(write=True) as txn:
            db = s.meta.scratch_table(txn, create=True)
            for i in range(50):
                txn.put(MS.scrub_key(i), bytes(1000), db=db, append=True)
    meta_dir = os.path.join(path, "meta")
    assert not _scrub_done(meta_dir)
    with walcrypt.open(path, kek=KEK, read_only=True) as r:
        assert r.entries(1, 10) == ents(1, 10)
        r.meta.verify_catalog()
    assert check(path, kek=KEK).ok
    with walcrypt.open(path, kek=KEK, **OPTS) as s:
        assert s.entries(1, 10) == ents(1, 10)
    assert _scrub_done(meta_dir)
    del lmdb


def test_each_scrub_grows_the_metadata_file_by_a_few_pages_at_most(tmp_path):
    path = str(tmp_path / "data")
    with walcrypt.open(path, kek=KEK, **OPTS) as s:
        fill(s, 1, 20)
        data = os.path.join(path, "meta", "data.mdb")
        for _ in range(10):
            s.stable_set(b"k", os.urandom(100))
            before = os.path.getsize(data)
            s.meta.scrub()
            assert os.path.getsize(data) - before <= 8 * 4096


def test_an_existing_metadata_file_without_the_store_table_is_refused(tmp_path):
    """A data.mdb that has commits but no store table (not walcrypt's, or read through the wrong
    meta page) is refused by a read-write open, never written walcrypt's tables."""
    import lmdb
    meta_dir = tmp_path / "data" / "meta"
    meta_dir.mkdir(parents=True)
    env = lmdb.open(str(meta_dir), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"other", b"data")
    env.close()
    size = os.path.getsize(meta_dir / "data.mdb")
    with pytest.raises(walcrypt.CorruptionError):
        M.Meta(str(meta_dir))
    env = lmdb.open(str(meta_dir), max_dbs=8)
    with env.begin() as txn:
        assert txn.get(M.DB_STORE) is None and txn.get(b"other") == b"data"
    env.close()
    assert os.path.getsize(meta_dir / "data.mdb") == size


# ---------------------------------------------------------------------------------------------
# SIGKILL of a real process during rotations
# ---------------------------------------------------------------------------------------------

CHILD = """
import os, sys, random, walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta
path, seed, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keks = {"A": walcrypt.RawKey(bytes.fromhex(sys.argv[4])), "B": walcrypt.RawKey(bytes.fromhex(sys.argv[5]))}
cur = sys.argv[6]
rng = random.Random(seed)
def source(st):
    i = st.last_index()
    return SnapshotMeta(i, st.term(i), ConfState((1, 2, 3))), b"snap:%d" % i
s = walcrypt.open(path, kek=keks[cur], keep_snapshots=3, segment_size=16384, sync="always",
                  destroy_retired_keys=True, snapshot_source=source, snapshot_chunk_size=256)
def say(*a):
    sys.stdout.write(" ".join(map(str, a)) + "\\n"); sys.stdout.flush()
for k in range(100000):
    gen += 1
    last = s.last_index()
    op = rng.choice(["append"] * 4 + ["snapshot", "kek", "kek", "dek"])
    if op == "append" or last < s.first_index():
        say("TRY append", last + 1, gen)
        s.save(HardState(1, 1, last), [Entry(last + 1, 1, b"%d:%d" % (last + 1, gen))])
        say("ACK append", last + 1, gen)
    elif op == "snapshot":
        say("TRY snapshot", last)
        s.save_snapshot(SnapshotMeta(last, s.term(last), ConfState((1, 2, 3))), b"snap:%d" % last)
        say("ACK snapshot", last)
    elif op == "kek":
        nxt = "B" if cur == "A" else "A"
        say("TRY kek", nxt)
        s.rotate_kek(keks[nxt])
        cur = nxt
        say("ACK kek", nxt)
    else:
        say("TRY dek")
        s.rotate_dek()
        say("ACK dek")
"""

ROUNDS = int(os.environ.get("WALCRYPT_KEK_SIGKILL_ROUNDS", "12"))


def _kill_inside(proc, rng: random.Random) -> bytes:
    """SIGKILL the child: mostly right after it announced its n-th KEK rotation (then, with a short
    random delay or none, inside it), else after n acknowledged operations.  -> everything it printed
    (complete lines are what it announced)."""
    trigger = b"TRY kek" if rng.random() < 0.7 else b"ACK "
    wanted = rng.randint(1, 3) if trigger == b"TRY kek" else rng.randint(1, 40)
    delay = rng.choice([0.0, 0.0, rng.random() * 0.05])
    buf, seen = b"", 0
    deadline = time.monotonic() + 120                      # bounded: a hung child fails below
    try:
        while seen < wanted and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            seen = sum(1 for line in buf.split(b"\n")[:-1] if line.startswith(trigger))
        if delay:
            time.sleep(delay)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return buf + proc.stdout.read()


def test_sigkill_during_kek_rotations(tmp_path):
    """A child appends, saves snapshots, rotates the KEK back and forth and rotates (and destroys)
    DEKs; it is killed at a random moment.  The KEK the acknowledged operations leave (or, with a
    rotation in flight, the other one) opens the store, every acknowledged entry is there, every
    snapshot bundle is under that KEK, and no file holds a key wrapped under the other KEK that the
    parent has seen."""
    path = str(tmp_path / "data")
    a, b = os.urandom(32), os.urandom(32)
    keks = {"A": walcrypt.RawKey(a), "B": walcrypt.RawKey(b)}
    cur = "A"
    acked: dict[int, bytes] = {}
    seen_blobs = {"A": set(), "B": set()}
    rng = random.Random(4242)
    interrupted = {}
    for rnd in range(ROUNDS):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, path, str(rng.randrange(1 << 30)), str(rnd * 100000),
                                 a.hex(), b.hex(), cur], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=wctest.child_env())
        out = _kill_inside(proc, rng)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert b"Traceback" not in err, err.decode()[-3000:]
        pending = None
        for line in out.decode(errors="replace").split("\n")[:-1]:     # complete lines only
            parts = line.split()
            if len(parts) < 2:
                continue
            if parts[0] == "TRY":
                pending = parts[1:]
            elif parts[0] == "ACK":
                pending = None
                if parts[1] == "append":
                    idx, gen = int(parts[2]), int(parts[3])
                    for i in [i for i in acked if i >= idx]:
                        del acked[i]
                    acked[idx] = b"%d:%d" % (idx, gen)
                elif parts[1] == "kek":
                    cur = parts[2]
        if pending:
            interrupted[pending[0]] = interrupted.get(pending[0], 0) + 1
        candidates = [cur] + ([pending[1]] if pending and pending[0] == "kek" else [])
        store = None
        for name in candidates:
            try:
                store = walcrypt.open(path, kek=keks[name], keep_snapshots=3, segment_size=16384,
                                      destroy_retired_keys=True)
                cur = name
                break
            except WrongKeyError:
                continue
        assert store is not None, f"round {rnd}: none of {candidates} opens the store"
        other = "B" if cur == "A" else "A"
        try:
            first = store.first_index()
            for i, data in acked.items():
                if i >= first:
                    assert store.entries(i, i + 1)[0].data == data, f"round {rnd}: entry {i} differs"
            check_value = keks[cur].wrapper({"kind": "raw"}).check_value()
            for info in store.snapshots.infos:
                doc = SnapshotFile(store.vfs, info.path).bundle_doc()
                assert bytes.fromhex(doc["kek_check"]) == check_value, f"round {rnd}: a bundle under the other KEK"
            seen_blobs[cur] |= wrapped_blobs(store)
            found = holders(path, seen_blobs[other])
            assert not found, f"round {rnd}: {found} hold keys wrapped under KEK {other}"
        finally:
            store.close()
        with pytest.raises(WrongKeyError):
            walcrypt.open(path, kek=keks[other], read_only=True)
    print("operations interrupted by a kill:", interrupted)
    assert interrupted.get("kek"), f"no kill landed inside a KEK rotation: {interrupted}"

