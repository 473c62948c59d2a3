"""Raft-legal histories against walcrypt and an in-memory reference.

The generator (``generate``) plays a small Raft cluster around one node and records what that node
persists, the way an etcd raft or hashicorp raft host would: appends (one entry or batches, with
hard states whose term never decreases, one vote per term, a commit index that never decreases and
never exceeds what the node knows to match the leader), conflicting suffixes from new leaders
(overwritten from an index above the commit index, sometimes through ``truncate`` first),
InstallSnapshot behind, inside and ahead of the log (agreeing with the local entry or not; now and
then as a host-driven ``reset_log`` instead), the node's own snapshots followed by compaction,
restarts (every open starts a new segment; with or without a snapshot source), DEK rotations (the
snapshot they need comes from the source or from the host later), on 4 KiB segments that roll over
every few saves, mostly with ``sync="none"`` and sometimes ``"always"``, now and then a plaintext
store.  Each operation is applied to walcrypt and to ``Ref``, a plain-list model of the Storage
semantics; after every operation the store must agree with it (first and last index, every entry
and term, out-of-range errors, hard state, conf state, snapshot meta and data, the rotation in
flight and every call of the snapshot source), it is reopened at least every five operations and
always at the end.  A failing history is shrunk and printed as the calls a host made.

Knobs (environment):
    WALCRYPT_HISTORIES=200000     histories to run (default 1800, split over 8 test cases)
    WALCRYPT_HISTORY_STEPS=60     the most operations in one history (default 24)
    WALCRYPT_HISTORY_SEED=random  another set of histories (default 0: the same ones every run)
    WALCRYPT_HISTORY_ONLY=<seed>  run only the history a failure message names (with the same
                                  WALCRYPT_HISTORY_STEPS), e.g. under a debugger
    WALCRYPT_HISTORY_PEEK=0.15    the share of histories that also kill and reopen a copy of the
                                  store after every step (slower)

The regression tests before the generator are histories found by it or by the audit, as plain calls.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import dataclasses
from dataclasses import dataclass

import pytest

import walcrypt
from walcrypt import CompactedError, ConfState, Entry, HardState, SnapshotMeta, UnavailableError
from walcrypt.check import check

import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
CS = ConfState(voters=(1, 2, 3))


def _open(path, **opts):
    opts.setdefault("segment_size", 4096)
    opts.setdefault("sync", "none")
    return walcrypt.open(path, kek=KEK, **opts)


def _ents(lo: int, hi: int, term: int) -> list[Entry]:
    return [Entry(i, term, b"%d/%d" % (i, term)) for i in range(lo, hi + 1)]


def _state(s):
    first, last = s.first_index(), s.last_index()
    snap = s.snapshot()
    return (first, last, s.term(first - 1), s.entries(first, last + 1) if last >= first else [],
            s.initial_state(), (snap.meta, snap.data) if snap else None)


@pytest.mark.parametrize("how", ["snapshot", "reset_log"])
@pytest.mark.parametrize("older_snapshot", [False, True])
def test_stale_suffix_over_several_lifetimes_then_a_disagreeing_snapshot(tmp_path, how, older_snapshot):
    """Issue 10, finding 5: a follower that restarted twice holds a stale suffix spanning several
    segments (one per open); a snapshot that disagrees with it resets the log, the next entry is
    saved, and the store must reopen (it used to fail: "entries 4..10 are missing")."""
    d = str(tmp_path / "data")
    with _open(d) as s:
        s.save(HardState(1, 1, 1), _ents(1, 3, 1))
        if older_snapshot:                       # a retained older snapshot keeps the first segment
            s.save_snapshot(SnapshotMeta(1, 1, CS), b"state at 1")
    with _open(d) as s:
        s.save(None, _ents(4, 10, 1))
    with _open(d) as s:
        s.save(None, _ents(11, 12, 1))
        # A new leader of term 2 committed other entries from index 3 on; it sends a snapshot at 3.
        if how == "snapshot":
            s.save_snapshot(SnapshotMeta(3, 2, CS), b"state at 3")
        else:
            s.reset_log(3, 2)
        s.save(HardState(2, 2, 4), _ents(4, 4, 2))
        before = _state(s)
        assert before[:3] == (4, 4, 2)
    with _open(d) as s:
        assert _state(s) == before
        s.save(HardState(2, 2, 5), _ents(5, 6, 2))
        before = _state(s)
    report = check(d, kek=KEK)
    assert report.ok, report.to_dict()
    with _open(d) as s:
        assert _state(s) == before


def test_replaced_suffix_then_a_snapshot_disagreeing_below_it(tmp_path):
    """The same class without any restart (found by the generator, shrunk): a new leader replaces
    the tail from index 10 (a new segment based at 10); a snapshot at 6 disagreeing with the log
    resets it; retention purges the old segment, and the replacement segment, kept as the newest,
    used to read as a gap 7..9 at the next open."""
    d = str(tmp_path / "data")
    with _open(d, keep_snapshots=2) as s:
        s.save(None, _ents(1, 5, 2))
        s.save(None, _ents(6, 6, 3) + _ents(7, 11, 4))
        s.save(None, _ents(10, 10, 5))
        s.save_snapshot(SnapshotMeta(6, 10, CS), b"state at 6")
        before = _state(s)
        assert before[:3] == (7, 6, 10)
    with _open(d) as s:
        assert _state(s) == before


@pytest.mark.parametrize("how", ["ahead", "disagreeing", "reset_log"])
@pytest.mark.parametrize("compact_after", ["no", "yes", "killed before its purge"])
def test_a_broken_snapshot_never_falls_back_across_a_log_reset(tmp_path, monkeypatch, how, compact_after):
    """Entries a log reset discarded must never come back, not even when the snapshot that reset the
    log turns out broken at the next open and an older snapshot takes over: the entries between the
    two are the stale suffix the reset threw away (here 4..8 of term 1, which the cluster replaced by
    entries of term 2), and applying them would diverge from the cluster.  The store must refuse
    instead of serving them - also when a later compaction was cut short after recording its new
    compaction point, before it purged the segments from before the reset."""
    d = str(tmp_path / "data")
    with _open(d, keep_snapshots=2, snapshot_chunk_size=256) as s:
        s.save(HardState(1, 1, 3), _ents(1, 10, 1))
        s.save_snapshot(SnapshotMeta(2, 1, CS), b"state at 2")       # the node's own snapshot
        index = 12 if how == "ahead" else 8
        if how == "reset_log":
            s.reset_log(index, 2)
        else:
            s.save_snapshot(SnapshotMeta(index, 2, CS), b"state at %d" % index * 100)
        s.save(HardState(2, 2, index), _ents(index + 1, index + 4, 2))
        if compact_after == "killed before its purge":
            monkeypatch.setattr(s, "purge_segments", lambda: None)
        if compact_after != "no":
            s.compact(index + 2)
    # A bit flip in the last chunk of the newest snapshot.  After reset_log (the host keeps that
    # snapshot elsewhere) the newest one here is the one at 2, and no snapshot is left at all.
    snaps = sorted(os.listdir(os.path.join(d, "snap-v1-encrypted")))
    newest = os.path.join(d, "snap-v1-encrypted", snaps[-1])
    raw = bytearray(open(newest, "rb").read())
    raw[-40] ^= 0x01
    open(newest, "wb").write(bytes(raw))
    try:
        s = _open(d)
    except walcrypt.CorruptionError:
        return                               # refused: right (the node must be rebuilt)
    with s:
        first, last = s.first_index(), s.last_index()
        ents = s.entries(first, last + 1)
        assert all(e.term == 2 for e in ents if e.index > 3), (first, ents)


# =============================================================================================
# Generated histories
# =============================================================================================

CONFS = (ConfState(voters=(1, 2, 3)), ConfState(voters=(1, 2, 3), learners=(4,)),
         ConfState(voters=(1, 2, 3, 4, 5)), ConfState(voters=(2, 3, 4)))
HISTORIES = int(os.environ.get("WALCRYPT_HISTORIES", "1800"))
MAX_STEPS = int(os.environ.get("WALCRYPT_HISTORY_STEPS", "24"))
_seed_env = os.environ.get("WALCRYPT_HISTORY_SEED", "0")
BASE_SEED = random.SystemRandom().randrange(1 << 32) if _seed_env == "random" else int(_seed_env)
CHUNKS = 8
PEEK_SHARE = float(os.environ.get("WALCRYPT_HISTORY_PEEK", "0.15"))


def entry_data(index: int, term: int, salt: int) -> bytes:
    """Entry payload: a function of (index, term) - Raft's log matching makes an entry's identity
    exactly that - and of the history.  Mostly small, sometimes empty, now and then 1-2 KiB so that
    4 KiB segments roll over inside a batch, and rarely larger than a segment."""
    h = (index * 2654435761 + term * 40503 + salt * 97) & 0xFFFFFFFF
    n = 700 + h % 1400 if h % 13 == 0 else 4200 + h % 2000 if h % 151 == 0 else h % 97
    return (b"%d.%d.%d;" % (index, term, salt) * (n // 6 + 1))[:n]


def snap_data(index: int, term: int, salt: int) -> bytes:
    n = (index * 7919 + term * 104729 + salt) % 2500
    return (b"snapshot %d/%d/%d|" % (index, term, salt) * (n // 16 + 1))[:n]


def source_conf(index: int) -> int:
    return index % len(CONFS)


# ---------------------------------------------------------------------------------------------
# The reference: walcrypt's Storage semantics on plain lists
# ---------------------------------------------------------------------------------------------

class Illegal(Exception):
    """The operation is not one a host may make in this state (used when shrinking)."""


class Ref:
    """What the store must hold: the compaction point, the terms of the entries after it, the hard
    state, the newest snapshot and a DEK rotation in flight.

    Snapshot semantics (README): a snapshot ahead of the log, or inside it but disagreeing with the
    entry at its index, resets the log to start after it; one that agrees keeps the log.  A DEK
    rotation needs a snapshot at or above the last index at the time of the rotation; the snapshot
    that satisfies it also compacts the log up to it; a rotation requested while one is in flight is
    queued and starts when the first completes.  A snapshot source bound at open answers with a
    snapshot of the host's applied state whenever walcrypt asks for one."""

    def __init__(self, salt: int):
        self.salt = salt
        self.compacted = 0
        self.compacted_term = 0
        self.terms: list[int] = []          # terms of compacted+1 .. last
        self.hs = HardState()
        self.snap: tuple | None = None      # (index, term, conf id)
        self.pending: list | None = None    # [index needed, queued rotations]
        self.source = False
        self.asked: list[tuple] = []        # snapshots the source hands out during the current operation

    def copy(self) -> "Ref":
        r = Ref(self.salt)
        r.compacted, r.compacted_term, r.terms, r.hs = self.compacted, self.compacted_term, list(self.terms), self.hs
        r.snap, r.pending, r.source = self.snap, list(self.pending) if self.pending else None, self.source
        return r

    @property
    def first(self) -> int:
        return self.compacted + 1

    @property
    def last(self) -> int:
        return self.compacted + len(self.terms)

    def term_at(self, i: int) -> int:
        if i == self.compacted:
            return self.compacted_term
        return self.terms[i - self.first]

    def applied(self) -> int:
        """The host's applied index: what its own snapshot (the snapshot source) covers."""
        return min(max(self.hs.commit, self.snap[0] if self.snap else 0, self.compacted), self.last)

    def source_meta(self) -> tuple:
        a = self.applied()
        if a < 1 or (self.snap and a < self.snap[0]):
            raise Illegal("the host has no snapshot to give")
        return (a, self.term_at(a), source_conf(a))

    # -- operations --------------------------------------------------------------------------
    def apply(self, op: tuple) -> None:
        """Apply ``op`` (see History) or raise Illegal without changing anything."""
        new = self.copy()
        new.asked = list(self.asked)
        getattr(new, "_" + op[0])(*op[1:])
        self.__dict__.update(new.__dict__)

    def check(self, op: tuple) -> None:
        self.copy().apply(op)

    def legalize(self, op: tuple) -> tuple | None:
        """``op`` made legal here (a shrunk history's hard state is clamped to Raft's rules), or None."""
        if op[0] == "save" and op[1] is not None:
            old, hs = self.hs, op[1]
            new_last = op[2] + len(op[3]) - 1 if op[3] and op[2] > self.compacted else self.last
            term = max(hs.term, old.term)
            vote = old.vote if term == old.term and old.vote not in (0, hs.vote) else hs.vote
            hs = HardState(term, vote, min(max(hs.commit, old.commit), max(new_last, old.commit)))
            op = ("save", None if hs == old else hs, op[2], op[3])
            if op[1] is None and not op[3]:
                return None
        try:
            self.check(op)
        except Illegal:
            return None
        return op

    def _save(self, hs, first, terms) -> None:
        if terms:
            if any(t < 1 for t in terms):
                raise Illegal("term 0")
            skip = max(0, self.compacted + 1 - first)
            first, terms = first + skip, terms[skip:]
            if terms:
                if first > self.last + 1:
                    raise Illegal("gap")
                del self.terms[first - self.first:]
                self.terms.extend(terms)
        if hs is not None:
            old = self.hs
            if (hs.term < old.term or hs.commit < old.commit or hs.commit > self.last
                    or (hs.term == old.term and old.vote not in (0, hs.vote))):
                raise Illegal(f"hard state {tuple(hs)} after {tuple(old)} with last index {self.last}")
            self.hs = hs

    def _compact(self, i) -> None:
        if not self.compacted < i <= self.last:
            raise Illegal("compact range")
        self._compact_to(i, self.term_at(i))

    def _compact_to(self, i, term) -> None:
        del self.terms[:i - self.compacted]
        self.compacted, self.compacted_term = i, term

    def _snapshot(self, index, term, conf) -> None:
        if index < 1 or term < 1 or (self.snap and index < self.snap[0]):
            raise Illegal("snapshot older than the newest")
        if index > self.last or (index > self.compacted and self.term_at(index) != term):
            self.compacted, self.compacted_term, self.terms = index, term, []
        self.snap = (index, term, conf)
        if self.pending and index >= self.pending[0]:
            queued = self.pending[1]
            if index > self.compacted:
                self._compact_to(index, term)
            self.pending = None
            if queued:
                self._rotate(queued - 1)

    def _snapshot_aborted(self, index, term, conf) -> None:
        if index < 1 or term < 1 or (self.snap and index < self.snap[0]):
            raise Illegal("snapshot older than the newest")

    def _rotate(self, queued=0) -> None:
        if self.pending:
            self.pending[1] += 1
            return
        if self.source:
            self.source_meta()               # raises Illegal before anything changes
        self.pending = [self.last, queued]
        self._ask()

    def _ask(self) -> None:
        if self.source and self.pending:
            meta = self.source_meta()
            self.asked.append(meta)
            self._snapshot(*meta)

    def _restart(self, source) -> None:
        if source and self.pending:
            self.source = True
            self.source_meta()
        self.source = source
        self._ask()

    def _truncate(self, i) -> None:
        if i > self.last:
            return
        if i <= self.compacted:
            raise Illegal("truncate into the compacted prefix")
        del self.terms[i - self.first:]

    def _reset_log(self, index, term) -> None:
        if index < self.compacted or term < 1:
            raise Illegal("reset below the compaction point")
        self.compacted, self.compacted_term, self.terms = index, term, []

    def _rekey(self) -> None:
        """The full re-key rewrites everything under a new DEK; it completes a rotation in flight
        (and the ones queued behind it: everything is under a new key)."""
        self.pending = None


# ---------------------------------------------------------------------------------------------
# The generator: a Raft cluster around the node whose storage is under test
# ---------------------------------------------------------------------------------------------

class Cluster:
    """Just enough of a Raft cluster to produce what its storage sees, legally.

    ``truth`` holds the terms of the committed entries (never changed once committed, and a prefix of
    every later leader's log); ``leader`` the terms of the current leader's log.  The node persists,
    like an etcd raft or hashicorp raft follower (or leader) would: the entries it is sent, starting
    at the first one that conflicts with its log (never at or below its commit index), its hard state
    (term never decreases, one vote per term, commit never decreases and only covers entries known to
    match the leader's), snapshots from the leader (any committed index at or above its newest
    snapshot: behind, inside or ahead of its log, agreeing with it or not), its own snapshots of
    applied entries followed by compaction, and it restarts."""

    def __init__(self, rng: random.Random, ref: Ref, encrypted: bool):
        self.rng = rng
        self.ref = ref
        self.encrypted = encrypted
        self.term = 1
        self.leader: list[int] = []
        self.truth: list[int] = []
        self.node_leads = False
        self.ops: list[tuple] = []
        self.hs_due: HardState | None = HardState(1, rng.choice((0, 1, 2)), 0)   # not persisted yet

    # -- the node's log as Raft sees it --------------------------------------------------------
    def local_term(self, i: int) -> int:
        r = self.ref
        if i <= 0:
            return 0
        if i <= r.compacted:
            return self.truth[i - 1]           # compacted entries were committed
        return r.term_at(i)

    def match(self) -> int:
        """The highest index where the node's log agrees with the leader's."""
        p = min(self.ref.last, len(self.leader))
        while p > self.ref.compacted and self.local_term(p) != self.leader[p - 1]:
            p -= 1
        return p

    def emit(self, op: tuple) -> None:
        self.ref.apply(op)
        self.ops.append(op)

    def hard_state(self, commit: int | None = None) -> HardState:
        hs = self.hs_due or self.ref.hs
        if commit is not None and commit > hs.commit:
            hs = hs._replace(commit=commit)
        return hs

    def save(self, hs: HardState | None, first: int, terms: list[int]) -> None:
        if hs == self.ref.hs:
            hs = None
        if hs is None and not terms:
            return
        self.emit(("save", hs, first, terms))
        self.hs_due = None

    def commit(self) -> None:
        """The leader commits some of its entries (replicated elsewhere)."""
        if self.rng.random() < 0.6 and len(self.leader) > len(self.truth):
            c = self.rng.randint(len(self.truth), len(self.leader))
            self.truth = self.leader[:c]

    # -- events --------------------------------------------------------------------------------
    def step(self) -> None:
        r, rng = self.ref, self.rng
        if not self.node_leads and self.match() < r.last:
            # The node holds a suffix the leader does not have: let it linger over restarts while the
            # leader commits past it, so that snapshots disagreeing with it come up.
            choices = [(self.replicate, 3), (self.elect, 1), (self.partitioned, 4), (self.leader_snapshot, 4),
                       (self.restart, 3)]
        else:
            choices = [(self.replicate, 10), (self.elect, 3), (self.partitioned, 3), (self.leader_snapshot, 3),
                       (self.restart, 2)]
        if min(r.hs.commit, r.last) > r.compacted:
            choices.append((self.compact, 2))
        if r.applied() >= 1:
            choices.append((self.own_snapshot, 4 if r.pending else 1))
        if self.encrypted:
            choices += [(self.rotate, 1), (self.rekey, 0.2)]
        fns, weights = zip(*choices)
        rng.choices(fns, weights)[0]()

    def replicate(self) -> None:
        r, rng = self.ref, self.rng
        if self.node_leads:
            k = rng.choice((1, 1, 2, 3, 5, 9))
            self.leader = [self.local_term(i) for i in range(1, r.last + 1)] + [self.term] * k
            self.commit()
            hs = self.hard_state(commit=len(self.truth))
            self.save(hs, r.last + 1, [self.term] * k)
            return
        if rng.random() < 0.8:
            self.leader += [self.term] * rng.choice((1, 1, 2, 3, 4, 8))
        self.commit()
        p = self.match()
        start = p + 1
        n = min(len(self.leader) - p, rng.choice((1, 2, 3, 4, 6, 10, 20)))
        if n > 0 and rng.random() < 0.1:
            # A resend that also covers entries the node holds (down into its compacted prefix, which
            # walcrypt skips); it reaches past every matching entry, so nothing acknowledged is dropped.
            start = max(1, p + 1 - rng.randint(1, 6))
            n += p + 1 - start
        terms = self.leader[start - 1:start - 1 + n] if n > 0 else []
        last_sent = start + n - 1 if n > 0 else p
        hs = self.hard_state(commit=min(len(self.truth), last_sent))
        if terms and start == p + 1 <= r.last and rng.random() < 0.3:
            # hashicorp raft: DeleteRange over the conflicting suffix, then StoreLogs.
            self.emit(("truncate", start))
            if rng.random() < 0.3:
                self.restart()
        self.save(hs, start, terms)

    def partitioned(self) -> None:
        """The leader goes on without the node (which does not hear of it)."""
        if self.node_leads:
            self.elect()
            return
        self.leader += [self.term] * self.rng.choice((1, 2, 3, 6))
        self.commit()

    def elect(self) -> None:
        r, rng = self.ref, self.rng
        old = self.term
        self.term += rng.choice((1, 1, 2, 3))
        c = len(self.truth)
        if (r.last >= c and (c == 0 or self.local_term(c) == self.truth[c - 1])
                and rng.random() < 0.3):
            # The node wins: its log becomes the leader's; it appends an empty entry of its term.
            self.node_leads = True
            self.leader = [self.local_term(i) for i in range(1, r.last + 1)] + [self.term]
            self.save(HardState(self.term, 1, r.hs.commit), r.last + 1, [self.term])
            return
        self.node_leads = False
        x = rng.randint(c, len(self.leader))
        # Entries of the leaders of the terms skipped over, which reached the new leader only (one
        # leader per term: no other log holds entries of those terms).
        skipped = range(old + 1, self.term)
        extra = sorted(rng.choice(skipped) for _ in range(rng.choice((0, 1, 2, 4)))) if skipped else []
        self.leader = self.leader[:x] + extra
        hs = HardState(self.term, rng.choice((0, 1, 2, 3)), r.hs.commit)
        if rng.random() < 0.6:
            self.save(hs, 0, [])
        else:
            self.hs_due = hs

    def leader_snapshot(self) -> None:
        r, rng = self.ref, self.rng
        self.commit()
        lo = max(1, r.snap[0] if r.snap else 1)
        hi = len(self.truth)
        if hi < lo:
            return
        kinds: dict[str, list[int]] = {}
        for s in range(lo, hi + 1):
            if s <= r.compacted:
                kind = "behind"
            elif s > r.last:
                kind = "ahead"
            else:
                kind = "agrees" if r.term_at(s) == self.truth[s - 1] else "disagrees"
            kinds.setdefault(kind, []).append(s)
        kind = rng.choice(sorted(kinds))
        s = rng.choice(kinds[kind])
        t = self.truth[s - 1]
        if kind in ("ahead", "disagrees") and rng.random() < 0.2:
            self.emit(("reset_log", s, t))       # a host keeping its snapshots elsewhere
        else:
            if rng.random() < 0.1:               # a transfer the node gave up on (the leader changed)
                self.emit(("snapshot_aborted", s, t, rng.randrange(len(CONFS))))
                if rng.random() < 0.5:
                    self.restart()            # (the restart may have made a newer snapshot)
                if r.snap and r.snap[0] > s:
                    return
            self.emit(("snapshot", s, t, rng.randrange(len(CONFS))))
        if rng.random() < 0.8:
            self.save(self.hard_state(commit=min(s, r.last)), 0, [])

    def own_snapshot(self) -> None:
        r, rng = self.ref, self.rng
        a = r.applied()
        lo = max(1, r.snap[0] if r.snap else 1, r.compacted if rng.random() < 0.5 else 1)
        if a < lo:
            return
        s = a if r.pending or rng.random() < 0.5 else rng.randint(lo, a)
        self.emit(("snapshot", s, self.local_term(s), rng.randrange(len(CONFS))))
        if rng.random() < 0.6 and s > r.compacted:
            self.emit(("compact", rng.randint(r.compacted + 1, s)))

    def compact(self) -> None:
        r = self.ref
        self.emit(("compact", self.rng.randint(r.compacted + 1, min(r.hs.commit, r.last))))

    def restart(self) -> None:
        r = self.ref
        source = self.encrypted and self.rng.random() < 0.35
        if source:
            try:
                r.check(("restart", True))
            except Illegal:
                source = False
        self.emit(("restart", source))
        if self.node_leads:                     # it comes back as a follower: a new term, a new leader
            self.elect()

    def rotate(self) -> None:
        try:
            self.ref.check(("rotate",))
        except Illegal:
            return
        self.emit(("rotate",))

    def rekey(self) -> None:
        self.emit(("rekey",))


@dataclass
class History:
    seed: int
    encrypted: bool
    sync: str
    keep: int
    ops: list
    peek: bool = False          # also reopen a copy of the directory after every operation (Runner.peek)

    def code(self, upto: int | None = None) -> str:
        """The history as the calls a host makes, one a line."""
        lines = [f"# seed {self.seed}: encrypted={self.encrypted}, sync={self.sync!r}, keep_snapshots={self.keep}, "
                 f"kill-and-reopen after each step={self.peek}"]
        for n, op in enumerate(self.ops[:upto]):
            lines.append(f"{n:3d}  " + describe(op))
        return "\n".join(lines)


def describe(op: tuple) -> str:
    kind = op[0]
    if kind == "save":
        _k, hs, first, terms = op
        runs, i = [], 0
        while i < len(terms):
            j = i
            while j + 1 < len(terms) and terms[j + 1] == terms[i]:
                j += 1
            runs.append(f"{first + i}..{first + j}@{terms[i]}" if j > i else f"{first + i}@{terms[i]}")
            i = j + 1
        ents = "[" + ", ".join(runs) + "]"
        hs_text = f"HardState{tuple(hs)}" if hs is not None else "None"
        return f"save({hs_text}, {ents})"
    if kind == "snapshot":
        return f"save_snapshot(SnapshotMeta({op[1]}, {op[2]}, CONFS[{op[3]}]))"
    if kind == "snapshot_aborted":
        return f"begin_snapshot(SnapshotMeta({op[1]}, {op[2]}, CONFS[{op[3]}])) ... abort()"
    if kind == "restart":
        return "restart(snapshot_source)" if op[1] else "restart()"
    if kind in ("rotate", "rekey"):
        return "rotate_dek()" if kind == "rotate" else "rekey()"
    return f"{kind}({', '.join(map(str, op[1:]))})"


def generate(seed: int, max_steps: int = MAX_STEPS) -> History:
    rng = random.Random(seed)
    encrypted = rng.random() < 0.9
    sync = rng.choices(("none", "always", "batch"), (8, 1, 1))[0]
    keep = rng.choice((1, 2, 2, 3))
    ref = Ref(salt=seed & 0xFFFF)
    cluster = Cluster(rng, ref, encrypted)
    steps = rng.randint(max(1, max_steps // 3), max_steps)
    since_restart = 0
    while len(cluster.ops) < steps:
        n = len(cluster.ops)
        try:
            cluster.step()
        except Illegal as exc:                  # a bug of the generator, not of walcrypt
            raise AssertionError(f"history {seed}: the generator made an illegal step ({exc}) after\n"
                                 + History(seed, encrypted, sync, keep, cluster.ops).code()) from exc
        since_restart = 0 if any(op[0] == "restart" for op in cluster.ops[n:]) else since_restart + 1
        if since_restart >= 5:                  # reopen at least every few steps
            cluster.restart()
            since_restart = 0
    return History(seed, encrypted, sync, keep, cluster.ops, peek=rng.random() < PEEK_SHARE)


# ---------------------------------------------------------------------------------------------
# Running a history against walcrypt
# ---------------------------------------------------------------------------------------------

class Mismatch(AssertionError):
    def __init__(self, what: str, detail: str = ""):
        super().__init__(f"{detail}{what}")
        self.what = what


def _tmp_root() -> str:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="walcrypt-histories-", dir=base)


class Runner:
    def __init__(self, history: History, root: str):
        self.h = history
        self.path = os.path.join(root, "data")
        self.ref = Ref(salt=history.seed & 0xFFFF)
        self.store = None
        self.answers: list[tuple] = []
        self.steps = 0
        self.done: list = []
        self.rng = random.Random(history.seed)

    def _source(self, store):
        if not self.answers:
            raise Mismatch("an unexpected call of the snapshot source")
        index, term, conf = self.answers.pop(0)
        return SnapshotMeta(index, term, CONFS[conf]), snap_data(index, term, self.ref.salt)

    def open(self, source: bool):
        kw = dict(segment_size=4096, sync=self.h.sync, keep_snapshots=self.h.keep, snapshot_chunk_size=256,
                  snapshot_source=self._source if source else None)
        if self.h.encrypted:
            return walcrypt.open(self.path, kek=KEK, **kw)
        return walcrypt.open(self.path, encrypted=False, **kw)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def run(self, ops, *, skip_illegal: bool = False) -> list:
        """Apply ``ops`` to the store and the reference, checking after each; -> the ops applied."""
        done = self.done
        self.store = self.open(False)
        if self.h.encrypted:                    # sealed under the DEK: re-sealed by rotations and re-keys
            self.store.stable_set(b"node-id", b"%d" % self.h.seed)
        self.check(None)
        for op in ops:
            self.ref.asked = []
            if skip_illegal:
                op = self.ref.legalize(op)
                if op is None:
                    continue
            self.ref.apply(op)
            done.append(op)
            self.answers = list(self.ref.asked)
            self.do(op)
            if self.answers:
                raise Mismatch("no call of the snapshot source", f"{self.answers}: ")
            self.check(op)
            if self.h.peek:
                self.peek(op)
            self.steps += 1
        self.close()                           # always end with a reopen
        self.answers = []
        self.store = self.open(False)
        self.check(("restart", False))
        self.close()
        return done

    def do(self, op: tuple) -> None:
        s = self.store
        kind = op[0]
        if kind == "save":
            _k, hs, first, terms = op
            salt = self.ref.salt
            s.save(hard_state=hs, entries=[Entry(first + k, t, entry_data(first + k, t, salt))
                                           for k, t in enumerate(terms)])
        elif kind == "compact":
            s.compact(op[1])
        elif kind in ("snapshot", "snapshot_aborted"):
            _k, index, term, conf = op
            meta, data = SnapshotMeta(index, term, CONFS[conf]), snap_data(index, term, self.ref.salt)
            if kind == "snapshot" and (index + term) % 3:
                s.save_snapshot(meta, data)
            else:                                # streamed in as it arrives, in uneven pieces
                w = s.begin_snapshot(meta)
                for k in range(0, len(data) if kind == "snapshot" else len(data) // 2, 300):
                    w.write(data[k:k + 300])
                w.commit() if kind == "snapshot" else w.abort()
        elif kind == "truncate":
            s.truncate(op[1])
        elif kind == "reset_log":
            s.reset_log(op[1], op[2])
        elif kind == "rotate":
            s.rotate_dek()
        elif kind == "rekey":
            s.rekey()
        elif kind == "restart":
            self.close()
            self.store = self.open(op[1])
        else:
            raise AssertionError(op)

    def peek(self, op) -> None:
        """What an open would find now, without closing the store: the data directory copied as it is
        (a process killed between two operations; on tmpfs or with sync="none" the files hold every
        completed write) and opened."""
        copy = self.path + "-killed"
        shutil.copytree(self.path, copy, ignore=shutil.ignore_patterns("lock.mdb", "LOCK"))
        try:
            kw = dict(segment_size=4096, sync="none", keep_snapshots=self.h.keep, snapshot_chunk_size=256)
            s = walcrypt.open(copy, kek=KEK, **kw) if self.h.encrypted else \
                walcrypt.open(copy, encrypted=False, **kw)
            try:
                self.check(op, s, "after a kill and reopen ")
            finally:
                s.close()
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    def check(self, op, store=None, where: str = "") -> None:
        s, r = store or self.store, self.ref

        def expect(what, got, want):
            if got != want:
                raise Mismatch(what, f"{where}after {describe(op) if op else 'open'}: {got!r} != {want!r} "
                                     "(reference): ")

        expect("(first_index, last_index)", (s.first_index(), s.last_index()), (r.first, r.last))
        expect("term at the compaction point", s.term(r.compacted), r.compacted_term)
        salt = r.salt
        want = [Entry(i, t, entry_data(i, t, salt)) for i, t in zip(range(r.first, r.last + 1), r.terms)]
        got = s.entries(r.first, r.last + 1)
        if got != want:
            bad = next((w.index for g, w in zip(got, want) if g != w), None)
            raise Mismatch("entries", f"{where}after {describe(op) if op else 'open'}: first difference at index {bad}; "
                           f"{len(got)} read, {len(want)} expected: ")
        for i, t in zip(range(r.first, r.last + 1), r.terms):
            expect("term", s.term(i), t)
        if want:                                # a range read with a size limit (etcd's maxSize)
            rng = self.rng
            lo = rng.randint(r.first, r.last)
            hi = rng.randint(lo, r.last + 1)
            limit = rng.choice((0, 1, 100, 1000, 5000))
            exp, size = [], 0
            for e in want[lo - r.first:hi - r.first]:
                size += len(e.data)
                if exp and size > limit:
                    break
                exp.append(e)
            expect("entries(lo, hi, max_size)", s.entries(lo, hi, max_size=limit), exp)
        if r.compacted > 0:
            _raises(CompactedError, s.term, r.compacted - 1)
            _raises(CompactedError, s.entries, r.compacted, r.last + 1)
        _raises(UnavailableError, s.term, r.last + 1)
        _raises(UnavailableError, s.entries, r.first, r.last + 2)
        conf = CONFS[r.snap[2]] if r.snap else ConfState()
        expect("initial_state()", s.initial_state(), (r.hs, conf))
        snap = s.snapshot()
        if r.snap is None:
            expect("snapshot()", snap, None)
        else:
            index, term, c = r.snap
            expect("snapshot().meta", snap and snap.meta, SnapshotMeta(index, term, CONFS[c]))
            expect("snapshot().data", snap.data, snap_data(index, term, salt))
        if self.h.encrypted:
            expect("stable_get()", s.stable_get(b"node-id"), b"%d" % self.h.seed)
        expect("needs_snapshot", s.needs_snapshot, bool(r.pending))
        if r.pending:
            expect("snapshot_index_needed", s.snapshot_index_needed, r.pending[0])
            expect("queued rotations", s.key_info()["rotation"]["queued"], r.pending[1])


def _raises(exc, fn, *args) -> None:
    try:
        fn(*args)
    except exc:
        return
    raise Mismatch(f"{fn.__name__} out of range", f"{fn.__name__}{args} did not raise {exc.__name__}: ")


def run_history(history: History, ops=None, *, skip_illegal: bool = False):
    """-> (steps run, the failure or None, the operations applied up to the failure)."""
    root = _tmp_root()
    runner = Runner(history, root)
    try:
        runner.run(history.ops if ops is None else ops, skip_illegal=skip_illegal)
        return runner.steps, None, runner.done
    except Exception as exc:                    # noqa: BLE001 - any exception is a finding
        return runner.steps, exc, runner.done
    finally:
        try:
            runner.close()
        except Exception:                       # noqa: BLE001 - the store may be broken on purpose
            pass
        shutil.rmtree(root, ignore_errors=True)


def _signature(exc: BaseException) -> str:
    """What kind of failure: the exception type and, for a disagreement, what disagreed."""
    if isinstance(exc, Mismatch):
        return "Mismatch:" + exc.what
    text = re.sub(r"\S*/\S*", "", str(exc))            # no paths (each run has its own directory)
    return type(exc).__name__ + ":" + re.sub(r"\d+", "#", text)[:60]


def shrink(history: History, exc: BaseException) -> list:
    """Drop operations (chunks, then single ones) and entries of saves while the same kind of
    failure remains; operations the shrunk history makes illegal are skipped."""
    sig = _signature(exc)
    _n, _e, ops = run_history(history, skip_illegal=True)   # what ran up to the failure

    def fails(candidate) -> bool:
        _n, e, _done = run_history(history, candidate, skip_illegal=True)
        return e is not None and _signature(e) == sig

    chunk = max(1, len(ops) // 2)
    while chunk >= 1:
        i = 0
        while i < len(ops):
            cand = ops[:i] + ops[i + chunk:]
            if fails(cand):
                ops = cand
            else:
                i += chunk
        chunk //= 2
    for i in range(len(ops)):                    # simpler operations
        op = ops[i]
        simpler = []
        if op[0] == "save":
            if op[1] is not None and op[3]:
                simpler.append(("save", None, op[2], op[3]))
            simpler += [("save", op[1], op[2], op[3][:n]) for n in range(1, len(op[3]))]
        elif op == ("restart", True):
            simpler.append(("restart", False))
        for cand_op in simpler:
            cand = ops[:i] + [cand_op] + ops[i + 1:]
            if fails(cand):
                ops = cand
                break
    _n, _e, ops = run_history(history, ops, skip_illegal=True)    # as legalized
    return ops


def check_history(seed: int) -> int:
    h = generate(seed)
    steps, exc, _done = run_history(h)
    if exc is None:
        return steps
    small = dataclasses.replace(h, ops=shrink(h, exc))
    _n, small_exc, _done = run_history(small, skip_illegal=True)
    raise AssertionError(f"history {seed} failed: {exc!r}\n\nshrunk to ({small_exc!r}):\n{small.code()}\n\n"
                         f"full history:\n{h.code()}") from exc


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_generated_histories(chunk):
    only = os.environ.get("WALCRYPT_HISTORY_ONLY")
    if only:
        if chunk == 0:
            check_history(int(only))
        return
    n = 0
    for k in range(chunk, HISTORIES, CHUNKS):
        n += check_history(BASE_SEED * 1_000_003 + k)
    assert HISTORIES < CHUNKS or n > 0
