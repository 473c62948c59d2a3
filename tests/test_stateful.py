"""A stateful model of the log against the engine (hypothesis RuleBasedStateMachine).

Rules: save (random batches, with or without a hard state), suffix replacement, compaction,
save_snapshot (inside the log, ahead of it, or disagreeing with it), DEK rotation with and without
a snapshot source, reopen, and a power loss in the middle of a save (CrashVFS) followed by a
reopen.  The model is a list of entries with its first index, the hard state, the newest
snapshot's (index, term) and the DEK rotation in flight; after every step the store must agree
with it, and after every reopen every entry is compared byte for byte.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import walcrypt
from walcrypt import CompactedError, ConfState, Entry, HardState, SnapshotMeta, UnavailableError
from walcrypt.testing import CrashVFS, SimulatedCrash

import snaptest as T
import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
OPTS = dict(segment_size=4096, snapshot_chunk_size=256, sync="batch", keep_snapshots=2)
CS = ConfState(voters=(1, 2, 3))


def _data(index: int, term: int, salt: int) -> bytes:
    return b"%d/%d/%d|" % (index, term, salt) * (1 + salt % 5)


def _snap_bytes(index: int) -> bytes:
    return T.snap_data(index, 700)


@dataclass
class Model:
    first: int = 1
    entries: list = field(default_factory=list)       # entries first..last
    compacted_term: int = 0
    hs: HardState = HardState()
    snap: tuple | None = None                         # (index, term) of the newest snapshot
    pending: dict | None = None                       # {"need": index, "queued": n} while a rotation waits

    @property
    def last(self) -> int:
        return self.first - 1 + len(self.entries)

    def term_at(self, index: int) -> int:
        if index == self.first - 1:
            return self.compacted_term
        return self.entries[index - self.first].term

    def copy(self) -> "Model":
        return Model(self.first, list(self.entries), self.compacted_term, self.hs, self.snap,
                     dict(self.pending) if self.pending else None)

    def save(self, ents, hs) -> None:
        if ents:
            del self.entries[ents[0].index - self.first:]
            self.entries.extend(ents)
        if hs is not None:
            self.hs = hs

    def compact(self, index: int, term: int) -> None:
        self.entries = [e for e in self.entries if e.index > index]
        self.first, self.compacted_term = index + 1, term

    def snapshot(self, index: int, term: int) -> None:
        """Snapshots.save (a log reset when the snapshot is ahead or disagrees), then Rotation.on_snapshot."""
        reset = index > self.last or (index >= self.first and self.term_at(index) != term)
        if reset:
            self.entries, self.first, self.compacted_term = [], index + 1, term
        self.snap = (index, term)
        if self.pending and index >= self.pending["need"]:
            queued = self.pending["queued"]
            if index > self.first - 1:
                self.compact(index, term)
            self.pending = {"need": self.last, "queued": queued - 1} if queued else None

    def rotate(self) -> None:
        if self.pending:
            self.pending["queued"] += 1
        else:
            self.pending = {"need": self.last, "queued": 0}

    def ask_source(self) -> None:
        """Rotation._ask_for_snapshot with a source registered: a snapshot at the last index, saved
        whether or not it satisfies the rotation; a promotion that starts a queued rotation asks again."""
        for _ in range(100):                                   # bounded: queued counts down
            if not self.pending:
                return
            satisfied = self.last >= self.pending["need"]
            self.snapshot(self.last, self.term_at(self.last))
            if not satisfied:
                return
        raise AssertionError("rotation chain did not end")


def _source(store):
    idx = store.last_index()
    return SnapshotMeta(idx, store.term(idx), CS), _snap_bytes(idx)


def _tmp_root() -> str:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="walcrypt-stateful-", dir=base)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = _tmp_root()
        self.path = os.path.join(self.root, "data")
        self.cv = CrashVFS(holding_root=self.root)
        self.m = Model()
        self.term = 1
        self.salt = 0
        self.fresh = True            # no active segment: the next append cuts one at last_index + 1
        self.s = self._open()

    def _open(self, source=None):
        return walcrypt.open(self.path, kek=KEK, vfs=self.cv, snapshot_source=source, **OPTS)

    def teardown(self):
        try:
            if self.s is not None and not self.s.closed:
                self.s.close()
                self._check_full(reopen=True)
        finally:
            self.cv.shutdown()
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def _entries(self, lo: int, n: int, term: int) -> list[Entry]:
        self.salt += 1
        return [Entry(i, term, _data(i, term, self.salt)) for i in range(lo, lo + n)]

    def _reopen(self, source=None) -> None:
        self.s.close()
        self.s = self._open(source)
        self.fresh = True

    def _newest_segment_base(self) -> int:
        """Base index of the newest segment (FORMAT.md 3.1: <segment_id>-<base_index>.wal, hex)."""
        names = sorted(os.listdir(os.path.join(self.path, "wal-v1-encrypted")))
        names = [n for n in names if n.endswith(".wal")]
        return int(names[-1][17:33], 16) if names else 0

    def _observe(self, s) -> Model:
        first, last = s.first_index(), s.last_index()
        ents = s.entries(first, last + 1) if last >= first else []
        snap = s.snapshot()
        if snap is not None:
            assert snap.data == _snap_bytes(snap.meta.index)
        pending = None
        if s.needs_snapshot:
            rot = s.key_info()["rotation"]
            pending = {"need": s.snapshot_index_needed, "queued": rot["queued"]}
        return Model(first, ents, s.term(first - 1), s.initial_state()[0],
                     (snap.meta.index, snap.meta.term) if snap else None, pending)

    def _check_full(self, reopen: bool = False) -> None:
        if reopen:
            with walcrypt.open(self.path, kek=KEK, **OPTS) as s:
                got = self._observe(s)
        else:
            got = self._observe(self.s)
        assert got == self.m, f"store {got} != model {self.m}"

    # ------------------------------------------------------------------ rules
    @rule(n=st.integers(1, 6), with_hs=st.booleans())
    def save(self, n, with_hs):
        ents = self._entries(self.m.last + 1, n, self.term)
        hs = HardState(self.term, 1, ents[-1].index) if with_hs else None
        self.s.save(hard_state=hs, entries=ents)
        self.m.save(ents, hs)
        self.fresh = False

    def _replaceable_from(self) -> int:
        """Raft replaces only entries that cannot be committed: above the commit index and above
        every snapshot (and, of course, above the compaction point)."""
        return max(self.m.first, self.m.hs.commit + 1, (self.m.snap[0] + 1) if self.m.snap else 1)

    @precondition(lambda self: self.m.last >= self._replaceable_from())
    @rule(back=st.integers(0, 30), n=st.integers(1, 4))
    def replace_suffix(self, back, n):
        at = max(self._replaceable_from(), self.m.last - back)
        self.term += 1
        ents = self._entries(at, n, self.term)
        hs = HardState(self.term, 1, self.m.hs.commit)
        self.s.save(hard_state=hs, entries=ents)
        self.m.save(ents, hs)
        self.fresh = False

    @precondition(lambda self: self.m.entries)
    @rule(data=st.data())
    def compact(self, data):
        i = data.draw(st.integers(self.m.first, self.m.last))
        self.s.compact(i)
        self.m.compact(i, self.m.term_at(i))
        try:
            self.s.compact(i)
            raise AssertionError("compacting again to the same index must fail")
        except CompactedError:
            pass
        try:
            self.s.compact(self.m.last + 1)
            raise AssertionError("compacting beyond the last index must fail")
        except (UnavailableError, CompactedError):
            pass

    @rule(kind=st.sampled_from(["inside", "ahead", "disagreeing"]), data=st.data())
    def save_snapshot(self, kind, data):
        floor = max(1, self.m.snap[0] if self.m.snap else 1, self.m.first - 1)
        if kind == "ahead" or self.m.last < floor:
            index, term = self.m.last + data.draw(st.integers(1, 5)), self.term
        elif kind == "inside":
            index = data.draw(st.integers(floor, self.m.last))
            term = self.m.term_at(index)
        else:
            lo = max(floor, self.m.first)
            if self.m.last < lo:
                return
            index = data.draw(st.integers(lo, self.m.last))
            self.term += 1
            term = self.term
        before = self.m.copy()
        self.s.save_snapshot(SnapshotMeta(index, term, CS), _snap_bytes(index))
        self.m.snapshot(index, term)
        reset = index > before.last or (index >= before.first and before.term_at(index) != term)
        self.fresh = reset                       # a log reset leaves no active segment

    @rule()
    def rotate_dek_without_source(self):
        self.s.rotate_dek()
        self.m.rotate()

    @precondition(lambda self: self.m.last >= 1)
    @rule()
    def rotate_dek_with_source(self):
        self._reopen(source=_source)             # the open resumes a rotation in flight with the source
        self.m.ask_source()
        queued = bool(self.m.pending)            # a rotation still in flight: this one is queued behind it
        self.s.rotate_dek()
        self.m.rotate()
        if not queued:
            self.m.ask_source()
        self._reopen()
        self._check_full()

    @rule()
    def reopen(self):
        self._reopen()
        self._check_full()

    @rule(op=st.sampled_from(["pwrite", "fdatasync", "fsync_dir", "ftruncate", "preallocate"]),
          n=st.integers(1, 4), when=st.sampled_from(["before", "after"]), torn=st.booleans(),
          k=st.integers(1, 5), seed=st.integers(0, 2**16))
    def crash_during_save(self, op, n, when, torn, k, seed):
        """Power loss during an appending save (replacements under power loss: test_crash_points.py)."""
        before = self.m.copy()
        ents = self._entries(self.m.last + 1, k, self.term)
        hs = HardState(self.term, 1, ents[-1].index)
        after = self.m.copy()
        after.save(ents, hs)
        self.cv.arm_crash(op, n, when)
        acked = False
        try:
            self.s.save(hard_state=hs, entries=ents)
            acked = True
        except SimulatedCrash:
            pass
        except walcrypt.StoreFailedError as exc:
            assert isinstance(exc.__cause__, SimulatedCrash) or self.cv.crashed, exc
        try:
            self.s.close()
        except SimulatedCrash:
            pass
        self.cv.crash(torn=torn, rng=random.Random(seed))
        self.s = self._open()
        self.fresh = True
        got = self._observe(self.s)
        allowed = [after] if acked else [before, after]
        assert got in allowed, f"after a crash the store holds {got}; allowed: {allowed}"
        self.m = got

    @invariant()
    def agrees(self):
        s, m = self.s, self.m
        assert (s.first_index(), s.last_index()) == (m.first, m.last)
        assert s.initial_state()[0] == m.hs
        snap = s.snapshot()
        assert ((snap.meta.index, snap.meta.term) if snap else None) == m.snap
        assert s.needs_snapshot == bool(m.pending)
        if m.pending:
            assert s.snapshot_index_needed == m.pending["need"]
        if m.entries:
            e = m.entries[-1]
            assert s.entries(e.index, e.index + 1) == [e]


_PHASES = None if not os.environ.get("WALCRYPT_NO_SHRINK") else [Phase.explicit, Phase.generate]
StoreMachine.TestCase.settings = settings(
    max_examples=int(100 * float(os.environ.get("WALCRYPT_STATEFUL_EXAMPLES", "1"))), stateful_step_count=30,
    deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None,
    **({"phases": _PHASES} if _PHASES else {}))
TestStore = StoreMachine.TestCase


def test_disagreeing_snapshot_as_the_first_write_after_an_open(tmp_path):
    """Also reached when the active segment starts above the snapshot's index + 1 for another reason (a
    DEK rotation's cut, an empty segment after a reset) and retention purges the segments between."""
    d = str(tmp_path / "data")
    with walcrypt.open(d, kek=KEK, **OPTS) as s:
        s.save(hard_state=HardState(1, 1, 10), entries=[Entry(i, 1, b"x%d" % i) for i in range(1, 11)])
    with walcrypt.open(d, kek=KEK, **OPTS) as s:
        s.save_snapshot(SnapshotMeta(5, 2, CS), _snap_bytes(5))        # term 2 at index 5: a log reset
        assert (s.first_index(), s.last_index()) == (6, 5)
    with walcrypt.open(d, kek=KEK, **OPTS) as s:
        assert (s.first_index(), s.last_index()) == (6, 5)
        assert s.snapshot().meta == SnapshotMeta(5, 2, CS)
