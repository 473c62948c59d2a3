"""Power-loss tests: the engine, LMDB included, on a filesystem that forgets what was not fsynced.

SIGKILL alone never loses what the kernel already holds, so it cannot catch a missing fsync, and
LMDB does its own I/O outside walcrypt's VFS seam (so CrashVFS does not see it).  These tests run
the engine in real child processes on tests/powerloss/lazyfs.py, a FUSE filesystem (mfusepy,
libfuse3) that keeps every write and directory entry not covered by an fsync in memory and drops it
on command, as LazyFS does for etcd's robustness tests.  A round: a child writes, printing an
acknowledgement after each call returned; the child is SIGKILLed; the filesystem drops everything
unsynced ("power cut"); the parent reopens the store through the mount and checks that every
acknowledged entry, stable value, snapshot and key change is there byte for byte and that nothing
was invented.  A second kind of round cuts the power at the N-th durability point of one operation
(``arm N``: the N-th fsync/fdatasync/fsyncdir/O_DSYNC write does not happen and the filesystem
freezes), for N = 1, 2, 3, ... until the operation completes: every step of a DEK rotation, a KEK
rotation, a full re-key, a migration, a snapshot (also one ahead of the log), a Raft suffix
replacement and segment cuts (also with torn writes: the power cut keeps a random subset of the
unsynced sectors), and of the recovery that follows an interrupted one (a second power cut).
The children's exceptions after such a power cut must be WalcryptErrors (typed) as well.

Where FUSE cannot be used (no /dev/fuse, no fusermount3, mfusepy not importable, the mount fails)
the tests are skipped with the reason; with WALCRYPT_REQUIRE_FUSE=1 they fail instead.

Needs: ``apt-get install -y fuse3 libfuse3-3`` and ``pip install mfusepy``.

Long runs:

    WALCRYPT_POWERLOSS_ROUNDS=1000 python -m pytest tests/test_powerloss.py -x

multiplies the random-kill rounds (RANDOM_ROUNDS = 10 per test by default; the whole file takes
about a minute by default) and, at any value above 1, crashes every operation at every one of its
durability points (by default at most POINTS_DEFAULT = 40 points of an operation are taken, always
including the first four and the last six; today every operation has fewer, so all are taken).
A long run takes about 0.25 s per round on a 2-core machine (ROUNDS=1000: about four hours;
ROUNDS=10: a few minutes).  WALCRYPT_POWERLOSS_SEED=<int> changes the random schedule (it is printed with
any failure, with the child's last lines).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time

import pytest

import walcrypt
from walcrypt import HardState, SnapshotMeta, WrongKeyError
from walcrypt.check import check

import wctest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "powerloss"))

from harness import ChildRunner, FuseUnavailable, LazyFSMount, fuse_unavailable_reason  # noqa: E402
import _child as C  # noqa: E402  (payload functions shared with the children)

ROUNDS = max(1, int(os.environ.get("WALCRYPT_POWERLOSS_ROUNDS", "1")))
SEED = int(os.environ.get("WALCRYPT_POWERLOSS_SEED", "20250611"))
ALL_POINTS = ROUNDS > 1
POINTS_DEFAULT = 40
RANDOM_ROUNDS = 10
KEK1, KEK2 = walcrypt.RawKey(C.KEK1), walcrypt.RawKey(C.KEK2)
SEG = 8192


# ------------------------------------------------------------------------------------------ fixtures

def _unavailable(reason: str):
    if os.environ.get("WALCRYPT_REQUIRE_FUSE") == "1":
        pytest.fail(f"WALCRYPT_REQUIRE_FUSE=1 but FUSE is unavailable: {reason}")
    pytest.skip(f"power-loss tests need FUSE: {reason}")


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    reason = fuse_unavailable_reason()
    if reason:
        _unavailable(reason)
    root = tmp_path_factory.mktemp("powerloss")
    try:
        m = LazyFSMount.start(str(root / "backing"), str(root / "mnt"))
    except FuseUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = ChildRunner(str(tmp_path_factory.mktemp("powerloss-children")), env=wctest.child_env())
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def place(fs, request):
    """A fresh directory name on the mount (and its backing path) for this test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    assert not os.path.exists(os.path.join(fs.mountpoint, name))
    yield os.path.join(fs.mountpoint, name), os.path.join(fs.backing, name)
    st = fs.stats()
    assert st["internal_errors"] == 0, f"lazyfs had internal errors:\n{fs.log_tail()}"


# ------------------------------------------------------------------------------------------ helpers

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: str, data: bytes, *, fsync: bool) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, data, 0)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _ints(lines: list[str], word: str, field: int = 1) -> list[int]:
    return [int(x.split()[field]) for x in lines if x.split()[:1] == [word]]


def _open(path: str, kek=KEK1, **opts):
    opts.setdefault("segment_size", SEG)
    opts.setdefault("sync", "always")
    opts.setdefault("snapshot_chunk_size", wctest_chunk())
    return walcrypt.open(path, kek=kek, **opts)


def wctest_chunk() -> int:
    import snaptest
    return snaptest.CHUNK


def _populate(path: str, last: int, *, snap_at: int | None = None, plain: bool = False, stable: bool = True):
    """A store with entries 1..last (hard state committing last), a snapshot and a stable value."""
    if plain:
        s = walcrypt.open(path, encrypted=False, segment_size=SEG, sync="always",
                          snapshot_chunk_size=wctest_chunk())
    else:
        s = _open(path)
    try:
        for a in range(1, last + 1, 10):
            hi = min(last, a + 9)
            s.save(hard_state=HardState(C.term_of(hi), 1, hi), entries=C.entries(a, hi + 1))
        if snap_at:
            s.save_snapshot(SnapshotMeta(snap_at, C.term_of(snap_at), C.CS), C.snap_data(snap_at))
        if stable:
            s.stable_set(b"CurrentTerm", C.stable_value(7))
        return s.key_info() if not plain else None
    finally:
        s.close()


def _check_entries(s, lo: int, hi: int) -> None:
    """Entries lo..hi are there, byte for byte, with their terms."""
    if hi < lo:
        return
    got = s.entries(lo, hi + 1)
    assert [e.index for e in got] == list(range(lo, hi + 1))
    for e, want in zip(got, C.entries(lo, hi + 1)):
        assert e == want, f"entry {e.index} differs after the power cut"
        assert s.term(e.index) == want.term


def _check_snapshot(s, allowed: set[int], at_least: int = 0):
    snap = s.snapshot()
    if snap is None:
        assert at_least == 0, f"the snapshot at {at_least} was acknowledged and is gone"
        return None
    idx = snap.meta.index
    assert idx >= at_least, f"snapshot at {idx}, but one at {at_least} was acknowledged"
    assert idx in allowed, f"snapshot at {idx} was never saved (saved: {sorted(allowed)[-5:]})"
    assert snap.meta.term == C.term_of(idx)
    assert snap.data == C.snap_data(idx), f"snapshot {idx} data differs after the power cut"
    return idx


def _active_keys(s) -> list[str]:
    return [k["key_id"] for k in s.key_info()["keys"] if k["state"] == "active"]


class Ledger:
    """What the children tried and what was acknowledged, over all rounds of one test."""

    def __init__(self, last: int = 0, snap: int = 0):
        self.acked = last           # highest entry index whose save returned
        self.tried = last           # highest entry index any save tried
        self.hs_tried = {last} if last else set()
        self.snap_acked = snap
        self.snaps = {snap} if snap else set()
        self.stable_acked: set[int] = set()
        self.stable_tried: set[int] = set()
        self.rotations = 0

    def add(self, lines: list[str]) -> None:
        acks, tries = _ints(lines, "ACK"), _ints(lines, "TRY")
        assert acks == sorted(acks) and set(acks) <= set(tries), lines[-20:]
        self.acked = max([self.acked] + acks)
        self.tried = max([self.tried] + tries)
        self.hs_tried |= set(tries)
        sacks, stries = _ints(lines, "SNAPACK"), _ints(lines, "SNAPTRY")
        self.snap_acked = max([self.snap_acked] + sacks)
        self.snaps |= set(stries)
        self.tried = max([self.tried] + stries)
        self.stable_acked |= set(_ints(lines, "SACK"))
        self.stable_tried |= set(_ints(lines, "STRY"))

    def verify(self, s) -> int:
        """Check the reopened store against the ledger; returns its last index."""
        last = s.last_index()
        lost = max(self.acked, self.snap_acked)
        assert last >= lost, f"acknowledged entries lost: last index {last} < acknowledged {lost}"
        assert last <= self.tried, f"entries invented: last index {last} > attempted {self.tried}"
        snap_idx = _check_snapshot(s, self.snaps, self.snap_acked) or 0
        first = s.first_index()
        assert first - 1 <= snap_idx or first == 1, f"entries below {first} are gone without a snapshot"
        _check_entries(s, first, last)
        hs, _cs = s.initial_state()
        if last:
            assert hs.commit in self.hs_tried, f"hard state {hs} was never saved"
            assert hs == HardState(C.term_of(hs.commit), 1, hs.commit), hs
            assert hs.commit >= self.acked, f"hard state {hs} is older than the acknowledged save {self.acked}"
        for k in self.stable_acked:
            assert s.stable_get(b"key-%d" % k) == C.stable_value(k), f"acknowledged stable value {k} lost"
        for k in self.stable_tried - self.stable_acked:
            v = s.stable_get(b"key-%d" % k)
            assert v in (None, C.stable_value(k)), f"stable value {k} is {v!r}"
        return last


def _kill_round(fs, runner, args: dict, rng: random.Random, rnd: int, *, torn: bool = False) -> list[str]:
    """Start a child, SIGKILL it at a random moment, cut the power; return its progress lines."""
    runner.run(args)
    how = ("early", "acks", "acks", "delay")[rnd % 4]
    if how == "early":
        time.sleep(rng.uniform(0.0, 0.05))              # maybe while it opens and recovers
    elif how == "acks":
        want = rng.randint(1, 60)
        sacks = 1 if args.get("stable") else 0
        runner.wait_for(lambda ls: sum(x.startswith("ACK ") for x in ls) >= want
                        and sum(x.startswith("SACK ") for x in ls) >= sacks, 30)
    else:
        runner.wait_for(lambda ls: any(x.startswith(("START", "OPEN")) for x in ls), 30)
        time.sleep(rng.uniform(0.0, 0.1))
    runner.kill()
    status = runner.wait()
    lines = runner.lines()
    assert status == -9, f"the child ended by itself ({status}): {lines[-5:]}\n{runner.errors()}"
    fs.crash(torn_seed=rng.randrange(1 << 30) if torn else None)
    return lines


# ------------------------------------------------------------------------------------------ canary

def test_canary_unsynced_data_is_dropped(fs, place):
    """The filesystem really forgets what was not fsynced, so a missing fsync would be caught."""
    mnt, back = place
    os.mkdir(mnt)
    _fsync_dir(fs.mountpoint)
    # data written but never fsynced: gone (the name was made durable)
    _write(os.path.join(mnt, "a"), b"synced", fsync=True)
    _fsync_dir(mnt)
    _write(os.path.join(mnt, "a"), b"UNSYNCED overwrite", fsync=False)
    assert _read(os.path.join(mnt, "a")) == b"UNSYNCED overwrite"      # readers see the page cache
    assert _read(os.path.join(back, "a")) == b"synced"                  # the disk does not have it
    # a file fsynced whose directory was not: gone; a rename not covered by fsyncdir: undone
    _write(os.path.join(mnt, "c"), b"c", fsync=True)
    _fsync_dir(mnt)
    _write(os.path.join(mnt, "b"), b"file synced, directory not", fsync=True)
    os.rename(os.path.join(mnt, "c"), os.path.join(mnt, "d"))
    os.unlink(os.path.join(mnt, "a"))
    assert sorted(os.listdir(mnt)) == ["b", "d"]
    fs.crash()
    assert sorted(os.listdir(mnt)) == ["a", "c"]
    assert _read(os.path.join(mnt, "a")) == b"synced"
    assert _read(os.path.join(back, "a")) == b"synced"
    # truncation not fsynced: undone; fsynced: kept
    fd = os.open(os.path.join(mnt, "a"), os.O_RDWR)
    os.ftruncate(fd, 2)
    os.close(fd)
    fs.crash()
    assert _read(os.path.join(mnt, "a")) == b"synced"
    fd = os.open(os.path.join(mnt, "a"), os.O_RDWR)
    os.ftruncate(fd, 2)
    os.pwrite(fd, b"!", 5)
    os.fdatasync(fd)
    os.close(fd)
    fs.crash()
    assert _read(os.path.join(mnt, "a")) == b"sy\0\0\0!"
    # LMDB: commits with sync=False are lost, synced commits are kept (LMDB's own I/O and mmap)
    import lmdb
    envdir = os.path.join(mnt, "lmdb")
    os.mkdir(envdir)
    env = lmdb.open(envdir, map_size=1 << 24)
    with env.begin(write=True) as t:
        t.put(b"durable", b"1")
    env.close()
    fs.sync()                                                            # the file names too
    env = lmdb.open(envdir, map_size=1 << 24, sync=False, metasync=False)
    with env.begin(write=True) as t:
        t.put(b"volatile", b"2")
    with env.begin() as t:
        assert t.get(b"volatile") == b"2"
    env.close()
    fs.crash()
    env = lmdb.open(envdir, map_size=1 << 24)
    with env.begin() as t:
        assert t.get(b"durable") == b"1" and t.get(b"volatile") is None
    env.close()


def test_canary_missing_fsync_is_caught(fs, runner, place):
    """With sync="none" (saves return before any fsync) acknowledged entries are lost after the
    power cut, and the checker used by every test below reports it."""
    mnt, _back = place
    _populate(mnt, 20, stable=False)
    fs.sync()
    ledger = Ledger(last=20)
    runner.run({"mode": "append", "path": mnt, "sync": "none", "seg_size": 1 << 20})
    assert runner.wait_for(lambda ls: sum(x.startswith("ACK ") for x in ls) >= 30, 30), runner.errors()
    runner.kill()
    assert runner.wait() == -9
    ledger.add(runner.lines())
    assert ledger.acked > 20
    before = fs.stats()
    assert before["dirty_files"] >= 1, "nothing was left unsynced: the canary proves nothing"
    fs.crash()
    with _open(mnt) as s:
        with pytest.raises(AssertionError, match="acknowledged entries lost"):
            ledger.verify(s)
        assert s.last_index() == 20


# ------------------------------------------------------------------------------------------ creation

def test_new_store_survives_power_cut(fs, runner, place):
    mnt, _back = place
    ledger = Ledger()
    runner.run({"mode": "append", "path": mnt, "sync": "always"})
    assert runner.wait_for(lambda ls: sum(x.startswith("ACK ") for x in ls) >= 5, 30), runner.errors()
    runner.kill()
    assert runner.wait() == -9
    ledger.add(runner.lines())
    fs.crash()
    with _open(mnt) as s:
        ledger.verify(s)


# ------------------------------------------------------------------------------------------ random kills

EPOCH = 25          # rounds per data directory (the log grows each round; a fresh one bounds the cost)


def _random_rounds(fs, runner, place, label: str, args: dict, *, torn: bool = False, rotation: bool = False):
    """RANDOM_ROUNDS * ROUNDS kill-and-power-cut rounds of a child; after each the parent reopens the store through
    the mount and checks it against the ledger.  Returns the ledgers (one per data directory)."""
    mnt, _back = place
    rng = random.Random(f"{SEED}-{label}")
    ledgers = []
    for rnd in range(RANDOM_ROUNDS * ROUNDS):
        if rnd % EPOCH == 0:
            path = f"{mnt}-{rnd // EPOCH}"
            _populate(path, 10, stable=False)
            fs.sync()
            ledger = Ledger(last=10)
            ledgers.append(ledger)
        run = dict(args, path=path, seed=rnd, stable_base=rnd * 100_000)
        lines = _kill_round(fs, runner, run, rng, rnd, torn=torn)
        ledger.add(lines)
        if rotation:
            ledger.rotations += len(_ints(lines, "ROTACK"))
            ledger.snaps |= set(range(1, ledger.tried + 1))   # a rotation snapshots the last index of the moment
            ledger.snap_acked = max([ledger.snap_acked] + _ints(lines, "ROTACK", 2))
        try:
            with _open(path, snapshot_source=C.snapshot_source if rotation else None) as s:
                ledger.verify(s)
                if rotation:
                    assert len(_active_keys(s)) == 1, s.key_info()
                    assert s.key_info()["rotation"] is None, "the interrupted rotation did not finish on reopen"
            if rotation:
                assert check(path, kek=KEK1).ok
        except AssertionError as exc:
            raise AssertionError(f"{label} round {rnd} (seed {SEED}): {exc}\nchild: {lines[-6:]}") from exc
    return ledgers


@pytest.mark.parametrize("variant", ["always", "batch+stable", "cuts", "torn"])
def test_appends_power_cut(fs, runner, place, variant):
    """Appends (and segment cuts) under sync="always"/"batch" (with stable-store values set from a
    second thread), SIGKILL + power cut at random moments; "torn" keeps random unsynced sectors."""
    args = {"mode": "append", "sync": "always", "seg_size": SEG}
    if variant == "batch+stable":
        args.update(sync="batch", stable=True)
    elif variant == "cuts":
        args.update(seg_size=4096)
    ledgers = _random_rounds(fs, runner, place, variant, args, torn=variant == "torn")
    assert any(lg.acked > 10 for lg in ledgers), "no save was acknowledged: the kills came too early"
    if variant == "batch+stable":
        assert any(lg.stable_acked for lg in ledgers), "no stable value was acknowledged"
    if variant == "cuts":
        assert len(wctest.segment_files(place[0] + "-0")) >= 2


def test_snapshots_power_cut(fs, runner, place):
    """Snapshots with data (at the last index, or ahead of the log: a log reset), compaction."""
    ledgers = _random_rounds(fs, runner, place, "snapshots", {"mode": "snapshots"})
    assert any(lg.snap_acked for lg in ledgers), "no snapshot was acknowledged"


def test_rotation_power_cut(fs, runner, place):
    """Cycles of saves and DEK rotations (with a snapshot source), SIGKILL + power cut anywhere; the
    parent's reopen finishes an interrupted rotation through the same source."""
    ledgers = _random_rounds(fs, runner, place, "rotation", {"mode": "rotate"}, rotation=True)
    assert any(lg.rotations for lg in ledgers), "no rotation was acknowledged"


# ------------------------------------------------------------------------------------------ every durability point

BASE_LAST = 60
BASE_SNAP = 40


def _arm_rounds(fs, runner, place, op: str, setup, verify, child_args: dict, all_points: bool = ALL_POINTS,
                torn: bool = False):
    """Crash ``op`` at its 1st, 2nd, ... durability point (each on a fresh copy of a base store)
    until it completes; ``verify(path, lines, done)`` checks the reopened store.

    With ``torn``, each power cut keeps a random subset of the unsynced 512-byte sectors.
    Returns (number of durability points, [(point, exception the child raised, traceback)])."""
    errors = []
    torn_wal: list[int] = []
    mnt, back = place
    base_m, base_b = mnt + "-base", back + "-base"
    setup(base_m)
    fs.sync()
    os.mkdir(mnt)
    _fsync_dir(fs.mountpoint)

    def one(n: int | None) -> list[str]:
        case = f"case-{n or 'free'}"
        shutil.copytree(base_b, os.path.join(back, case))           # outside FUSE: lazyfs knows no state of it
        path = os.path.join(mnt, case)
        if n is not None:
            fs.arm(n, torn_seed=(SEED + n) if torn else None)
        runner.run(dict(child_args, path=path, op=op))
        status = runner.wait(60)
        lines = runner.lines()
        st = fs.thaw()
        if n is not None and torn:
            torn_wal.append(sum(k for name, k in st["last_crash"].get("torn_files", {}).items()
                                if name.endswith(".wal")))
        for x in lines:
            if x.startswith("ERROR ") and x.endswith(" untyped"):
                errors.append((n, x.split()[1], runner.errors()[-1500:]))
        if n is None:
            assert status == 0 and "DONE" in lines, f"{op} failed without a power cut: {lines}\n{runner.errors()}"
        try:
            verify(path, lines, "DONE" in lines)
        except AssertionError as exc:
            raise AssertionError(f"{op}, power cut before durability point {n}: {exc}\n"
                                 f"child ({status}): {lines[-6:]}\n{runner.errors()[-1500:]}") from exc
        except walcrypt.WalcryptError as exc:
            raise AssertionError(f"{op}, power cut before durability point {n}: reopening raised "
                                 f"{type(exc).__name__}: {exc}\nchild ({status}): {lines[-6:]}") from exc
        return lines

    # one run without a power cut counts the durability points of the child (open, op, close)
    before = fs.stats()["sync_points"]
    one(None)
    total = fs.stats()["sync_points"] - before
    assert total > 0
    points = list(range(1, total + 1))
    if not all_points and total > POINTS_DEFAULT:
        rng = random.Random(f"{SEED}-{op}")
        must = set(points[:4]) | set(points[-6:])
        rest = sorted(rng.sample([p for p in points if p not in must], POINTS_DEFAULT - len(must)))
        points = sorted(must | set(rest))
    crashes = fs.stats()["crashes"]
    for n in points:
        one(n)
    assert fs.stats()["crashes"] - crashes >= len(points) * 3 // 4, "the armed power cuts did not happen"
    if torn:
        assert any(torn_wal), "no power cut kept part of an unsynced segment write: nothing was torn"
    return total, errors


def _base_entries_ok(s) -> None:
    """The base store's entries 1..BASE_LAST (those not covered by a snapshot) and its stable value."""
    assert s.last_index() == BASE_LAST, f"last index {s.last_index()}, expected {BASE_LAST}"
    snap = s.snapshot()
    assert s.first_index() == 1 or (snap is not None and snap.meta.index >= s.first_index() - 1)
    _check_entries(s, s.first_index(), BASE_LAST)
    assert s.stable_get(b"CurrentTerm") == C.stable_value(7)


def _setup_store(path) -> None:
    _populate(path, BASE_LAST, snap_at=BASE_SNAP)


def _old_key(path) -> str:
    with _open(path) as s:
        return _active_keys(s)[0]


def _verify_rotate_dek(path, done: bool, old_key: str) -> None:
    with _open(path, snapshot_source=C.snapshot_source) as s:
        _base_entries_ok(s)
        _check_snapshot(s, {BASE_SNAP, BASE_LAST}, BASE_LAST if done else BASE_SNAP)
        assert len(_active_keys(s)) == 1, s.key_info()
        assert s.key_info()["rotation"] is None, "the rotation did not finish on reopen"
        if done:
            assert _active_keys(s) != [old_key], "an acknowledged rotation was rolled back"
    assert check(path, kek=KEK1).ok


def _verify_rotate_kek(path, done: bool) -> None:
    opened = []
    for name, kek in (("old", KEK1), ("new", KEK2)):
        try:
            with _open(path, kek=kek) as s:
                _base_entries_ok(s)
                _check_snapshot(s, {BASE_SNAP}, BASE_SNAP)
            opened.append(name)
        except WrongKeyError:
            pass
    assert len(opened) == 1, f"opened with {opened}"
    if done:
        assert opened == ["new"], "an acknowledged KEK rotation was rolled back"


def _verify_migration(path, done: bool) -> None:
    from walcrypt.opening import stored_mode
    if done:
        assert stored_mode(path) is True, "an acknowledged migration was rolled back"
    with _open(path, migrate=True) as s:         # migrates (again) when the power cut came first
        _base_entries_ok(s)
        _check_snapshot(s, {BASE_SNAP}, BASE_SNAP)
    assert stored_mode(path) is True
    assert check(path, kek=KEK1).ok


def _verify_append(path, lines: list[str]) -> None:
    acked = max([BASE_LAST] + _ints(lines, "ACK"))
    with _open(path, segment_size=4096) as s:
        last = s.last_index()
        assert acked <= last <= BASE_LAST + 30, f"acknowledged up to {acked}, last index {last}"
        assert last % 10 == 0, f"a save was torn apart: last index {last}"
        _check_entries(s, s.first_index(), last)
        _check_snapshot(s, {BASE_SNAP}, BASE_SNAP)
        assert s.stable_get(b"CurrentTerm") == C.stable_value(7)


def test_rotate_dek_every_step(fs, runner, place):
    """rotate_dek (pending key in LMDB, cut, snapshot from the source, promote, purge, retire):
    a power cut before each durability point, then a reopen (which resumes the rotation)."""
    keys = {}

    def setup(path):
        _setup_store(path)
        keys["old"] = _old_key(path)

    total, _errors = _arm_rounds(fs, runner, place, "rotate_dek", setup,
                                 lambda path, lines, done: _verify_rotate_dek(path, done, keys["old"]), {"mode": "op"})
    assert total >= 10


def test_rotate_kek_every_step(fs, runner, place):
    """rotate_kek: after a power cut exactly one of the old and the new KEK opens the store."""
    _arm_rounds(fs, runner, place, "rotate_kek", _setup_store,
                lambda path, lines, done: _verify_rotate_kek(path, done), {"mode": "op"})


def test_migration_every_step(fs, runner, place):
    """walcrypt.open(plaintext store, kek=RawKey(...)) migrates it; a power cut at any point leaves a
    store that the same open migrates (again) with every entry, the snapshot and the stable value."""
    _arm_rounds(fs, runner, place, "migrate", lambda path: _populate(path, BASE_LAST, snap_at=BASE_SNAP, plain=True),
                lambda path, lines, done: _verify_migration(path, done), {"mode": "op"})


def test_rekey_every_step(fs, runner, place):
    """rekey (everything rewritten under a new DEK into staged segments and a snapshot, one LMDB
    commit, old keys destroyed): a power cut before each durability point, then a reopen."""
    keys = {}

    def setup(path):
        _setup_store(path)
        keys["old"] = _old_key(path)

    def verify(path, lines, done):
        with _open(path, snapshot_source=C.snapshot_source) as s:
            _base_entries_ok(s)
            _check_snapshot(s, {BASE_SNAP}, BASE_SNAP)
            assert len(_active_keys(s)) == 1, s.key_info()
            assert s.key_info()["rotation"] is None, "the re-key did not finish on reopen"
            if done:
                states = {k["key_id"]: k["state"] for k in s.key_info()["keys"]}
                assert states[keys["old"]] == "destroyed", states
        assert check(path, kek=KEK1).ok

    _arm_rounds(fs, runner, place, "rekey", setup, verify, {"mode": "op"})


def test_suffix_replacement_every_step(fs, runner, place):
    """A save whose entries conflict with the log's suffix (a new leader's entries): after a power cut
    the log is the old one or the replaced one, never a mix, and an acknowledged replacement stays."""
    start, hi = BASE_LAST - 15, BASE_LAST - 10

    def verify(path, lines, done):
        acked = bool(_ints(lines, "ACK"))
        with _open(path) as s:
            last = s.last_index()
            got = s.entries(s.first_index(), last + 1)
            replaced = s.term(start) == C.term_of(start) + 1
            if replaced:
                assert last == hi, f"replaced from {start} to {hi}, but the log ends at {last} (old suffix back?)"
                assert got[-(hi - start + 1):] == C.replaced_entries(start, hi + 1), "the replacement is torn"
                _check_entries(s, s.first_index(), start - 1)
            else:
                assert not acked, "an acknowledged suffix replacement was rolled back"
                assert last == BASE_LAST
                _check_entries(s, s.first_index(), BASE_LAST)
            _check_snapshot(s, {BASE_SNAP}, BASE_SNAP)

    _arm_rounds(fs, runner, place, "replace", _setup_store, verify, {"mode": "op"})


@pytest.mark.parametrize("ahead", [0, 5])
def test_snapshot_every_step(fs, runner, place, ahead):
    """save_snapshot with data, at the last index or ahead of the log (a log reset)."""
    new = BASE_LAST + ahead

    def verify(path, lines, done):
        with _open(path) as s:
            idx = _check_snapshot(s, {BASE_SNAP, new}, new if done else BASE_SNAP)
            if idx == new and ahead:
                assert s.last_index() == new and s.first_index() == new + 1
            else:
                _base_entries_ok(s)
            assert s.stable_get(b"CurrentTerm") == C.stable_value(7)

    _arm_rounds(fs, runner, place, "snapshot", _setup_store, verify, {"mode": "op", "ahead": ahead})


@pytest.mark.parametrize("torn", [False, True], ids=["drop", "torn"])
def test_append_and_cut_every_step(fs, runner, place, torn):
    """Saves that fill and cut segments (segment_size 4096): every acknowledged save survives, also
    when the power cut keeps a random subset of the unsynced sectors (a torn write)."""
    _arm_rounds(fs, runner, place, "append", _setup_store, lambda path, lines, done: _verify_append(path, lines),
                {"mode": "op", "seg_size": 4096, "batches": 3}, torn=torn)


@pytest.mark.parametrize("interrupted", ["rotate_dek", "migrate", "append-torn"])
def test_recovery_every_step(fs, runner, place, interrupted):
    """A power cut during recovery: the store left by a power cut in the middle of an operation is
    reopened (resuming the rotation, redoing the migration, repairing the tail, removing orphans)
    with a second power cut before each durability point of that reopen."""
    keys = {}
    op = interrupted.split("-")[0]
    cut_at = {"rotate_dek": 12, "migrate": 9, "append": 7}[op]

    def setup(path):
        if op == "migrate":
            _populate(path, BASE_LAST, snap_at=BASE_SNAP, plain=True)
        else:
            _setup_store(path)
            keys["old"] = _old_key(path)
        fs.sync()
        fs.arm(cut_at, torn_seed=SEED if interrupted.endswith("torn") else None)
        runner.run({"mode": "op", "op": op, "path": path, "seg_size": 4096 if op == "append" else SEG})
        runner.wait(60)
        lines = runner.lines()
        st = fs.thaw()
        assert "DONE" not in lines and st["last_crash"], f"the first power cut did not interrupt {op}: {lines}"
        keys["lines"] = lines

    def verify(path, lines, done):
        if op == "rotate_dek":
            _verify_rotate_dek(path, False, keys["old"])
        elif op == "migrate":
            _verify_migration(path, False)
        else:
            _verify_append(path, keys["lines"])

    # the reopen (with the KEK: a migration is redone) is what gets the second power cut
    _arm_rounds(fs, runner, place, "migrate" if op == "migrate" else "reopen", setup, verify, {"mode": "op"})


# ------------------------------------------------------------------------------------------ typed errors

def _untyped_errors(fs, runner, place, op: str, setup) -> list:
    """The child's exceptions, over every durability point of ``op``, that are not WalcryptErrors
    (after a failed fsync or metadata commit the API promises StoreFailedError/StorageError)."""
    _total, errors = _arm_rounds(fs, runner, place, op, setup, lambda path, lines, done: None, {"mode": "op"},
                                 all_points=True)
    return errors


def _report(errors) -> str:
    return "\n".join(f"power cut before point {n}: {name}\n{tb[-700:]}" for n, name, tb in errors[:3])


def test_migration_io_errors_are_typed(fs, runner, place):
    errors = _untyped_errors(fs, runner, place, "migrate",
                             lambda path: _populate(path, 20, snap_at=10, plain=True))
    assert not errors, _report(errors)


@pytest.mark.parametrize("interrupted", [
    "append-torn",
    "rotate_dek",
])
def test_recovery_io_errors_are_typed(fs, runner, place, interrupted):
    op = interrupted.split("-")[0]

    def setup(path):
        _setup_store(path)
        fs.sync()
        fs.arm(7 if op == "append" else 12, torn_seed=SEED if interrupted.endswith("torn") else None)
        runner.run({"mode": "op", "op": op, "path": path, "seg_size": 4096 if op == "append" else SEG})
        runner.wait(60)
        fs.thaw()

    errors = _untyped_errors(fs, runner, place, "reopen", setup)
    assert not errors, _report(errors)


def test_operation_io_errors_are_typed(fs, runner, place):
    """rotate_dek, rotate_kek, snapshots and appends report a failed fsync or commit as a WalcryptError."""
    errors = []
    for op in ("rotate_dek", "rotate_kek", "snapshot", "append"):
        sub = (place[0] + "-" + op, place[1] + "-" + op)
        errors += _untyped_errors(fs, runner, sub, op, lambda path: _populate(path, 20, snap_at=10))
    assert not errors, _report(errors)
