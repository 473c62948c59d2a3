"""The Storage API contract (DESIGN.md, "Storage API contract"), mirroring etcd raft's Storage."""

from __future__ import annotations

import os
import random
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import walcrypt
from walcrypt import CompactedError, Entry, HardState, UnavailableError, UsageError

import wctest
from wctest import entry_data, make_entries, segment_files


def _segment_ranges(data_dir: str, encrypted: bool = True) -> list[tuple[str, int]]:
    """(path, base index) of every segment file, from the file names ``<id>-<base>.wal``."""
    out = []
    for p in segment_files(data_dir, encrypted):
        seg_id, base = os.path.basename(p)[:-4].split("-")
        assert len(seg_id) == 16 and len(base) == 16
        out.append((p, int(base, 16)))
    return out


def _check_log(store, expected: list[Entry], first: int = 1) -> None:
    last = first - 1 + len(expected)
    assert store.first_index() == first
    assert store.last_index() == last
    got = store.entries(first, last + 1) if expected else []
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert isinstance(g.data, bytes)
        assert (g.index, g.term, g.data) == (e.index, e.term, e.data), f"entry {e.index} differs"
    for e in expected[:: max(1, len(expected) // 200)]:
        assert store.term(e.index) == e.term


# ---------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------


def test_100k_entries_round_trip_through_reopen(open_store):
    n = 100_000
    rng = random.Random(7)
    expected = make_entries(1, n + 1, per_term=7_000)
    s = open_store(sync="batch")
    pos = 0
    while pos < n:                                   # bounded: pos grows by >= 1 each turn
        k = min(rng.randint(1, 3000), n - pos)
        s.save(hard_state=HardState(expected[pos + k - 1].term, 2, pos + k), entries=expected[pos:pos + k])
        pos += k
    _check_log(s, expected)
    s.close()
    segs = segment_files(s.path)
    assert len(segs) >= 5, f"expected several 64 KiB segments, got {len(segs)}"

    s2 = open_store()
    _check_log(s2, expected)
    hs, _cs = s2.initial_state()
    assert hs == HardState(expected[-1].term, 2, n)
    # terms at every term boundary (term runs must be exact)
    for i in range(6_999, n + 1, 7_000):
        for j in (i - 1, i, i + 1):
            if 1 <= j <= n:
                assert s2.term(j) == expected[j - 1].term
    assert s2.term(0) == 0
    # a read that starts and ends inside other segments
    assert s2.entries(31_337, 68_001) == expected[31_336:68_000]


def test_entry_larger_than_a_segment(open_store):
    big = os.urandom(150 * 1024)
    ents = [Entry(1, 1, b"a"), Entry(2, 1, big), Entry(3, 1, b""), Entry(4, 2, big[:1000])]
    s = open_store()
    s.save(entries=ents[:1])
    s.save(entries=ents[1:])
    assert s.entries(1, 5) == ents
    s.close()
    s = open_store()
    assert s.entries(1, 5) == ents
    assert s.entries(3, 4) == [ents[2]]


def test_fresh_store(open_store):
    s = open_store()
    assert s.first_index() == 1
    assert s.last_index() == 0
    assert s.term(0) == 0
    assert s.entries(1, 1) == []
    assert s.initial_state()[0] == HardState(0, 0, 0)
    with pytest.raises(UnavailableError):
        s.entries(1, 2)
    with pytest.raises(UnavailableError):
        s.term(1)


# ---------------------------------------------------------------------------
# entries(lo, hi, max_size): etcd raft Storage semantics
# ---------------------------------------------------------------------------


@pytest.fixture
def sized_store(open_store):
    """Entries 1..300 of exactly 100 bytes each, written in batches of 7 (several segments)."""
    s = open_store(segment_size=8192)
    ents = [Entry(i, 1 + i // 50, entry_data(i, 100)) for i in range(1, 301)]
    for k in range(0, 300, 7):
        s.save(entries=ents[k:k + 7])
    assert len(segment_files(s.path)) >= 3
    return s, ents


@pytest.mark.parametrize("reopen", [False, True])
def test_entries_max_size(sized_store, open_store, reopen):
    s, ents = sized_store
    if reopen:
        s.close()
        s = open_store(segment_size=8192)
    assert s.entries(10, 20) == ents[9:19]
    assert s.entries(10, 20, max_size=None) == ents[9:19]
    # at least one entry, even when it alone exceeds max_size
    assert s.entries(10, 20, max_size=0) == ents[9:10]
    assert s.entries(10, 20, max_size=99) == ents[9:10]
    assert s.entries(10, 20, max_size=100) == ents[9:10]
    assert s.entries(10, 20, max_size=199) == ents[9:10]
    # the cumulative size may reach max_size exactly
    assert s.entries(10, 20, max_size=200) == ents[9:11]
    assert s.entries(10, 20, max_size=250) == ents[9:11]
    assert s.entries(10, 20, max_size=300) == ents[9:12]
    assert s.entries(10, 20, max_size=10**9) == ents[9:19]
    # hi bounds the result even with room to spare
    assert s.entries(10, 11, max_size=10**9) == ents[9:10]
    # across segment boundaries
    assert s.entries(1, 301, max_size=250 * 100) == ents[0:250]
    assert s.entries(1, 301, max_size=250 * 100 + 99) == ents[0:250]
    assert s.entries(1, 301) == ents
    # empty ranges
    assert s.entries(5, 5) == []
    assert s.entries(301, 301) == []


def test_entries_max_size_with_uneven_entries(open_store):
    s = open_store()
    ents = [Entry(1, 1, b"x" * 500), Entry(2, 1, b"y" * 10), Entry(3, 1, b"z" * 10), Entry(4, 1, b"")]
    s.save(entries=ents)
    assert s.entries(1, 5, max_size=100) == ents[:1]          # first entry alone exceeds
    assert s.entries(2, 5, max_size=20) == ents[1:4]          # 10 + 10 + 0 == 20
    assert s.entries(2, 5, max_size=19) == ents[1:2]


def test_entries_range_errors(sized_store):
    s, ents = sized_store
    with pytest.raises(CompactedError):
        s.entries(0, 5)
    with pytest.raises(UnavailableError):
        s.entries(290, 302)
    with pytest.raises(UnavailableError):
        s.entries(301, 302)
    s.compact(100)
    for lo in (1, 50, 99, 100):
        with pytest.raises(CompactedError):
            s.entries(lo, 150)
    assert s.entries(101, 150) == ents[100:149]
    with pytest.raises(CompactedError):
        s.entries(100, 100)


def test_term_range(sized_store, open_store):
    s, ents = sized_store
    assert s.term(0) == 0                                 # first_index - 1
    assert s.term(300) == ents[-1].term
    with pytest.raises(UnavailableError):
        s.term(301)
    s.compact(120)
    assert s.first_index() == 121
    assert s.term(120) == ents[119].term                  # first_index - 1 stays answerable
    assert s.term(121) == ents[120].term
    with pytest.raises(CompactedError):
        s.term(119)
    with pytest.raises(CompactedError):
        s.term(0)
    s.close()
    s = open_store(segment_size=8192)
    assert s.first_index() == 121
    assert s.term(120) == ents[119].term
    with pytest.raises(CompactedError):
        s.term(119)
    with pytest.raises(UnavailableError):
        s.term(301)
    for i in range(120, 301):
        assert s.term(i) == ents[i - 1].term


# ---------------------------------------------------------------------------
# Suffix replacement (Raft semantics)
# ---------------------------------------------------------------------------


def test_suffix_replacement_within_a_segment(open_store):
    s = open_store()
    old = make_entries(1, 101)
    s.save(entries=old)
    new = [Entry(i, 5, b"new-%d" % i) for i in range(50, 61)]
    s.save(hard_state=HardState(5, 1, 40), entries=new)
    expected = old[:49] + new
    _check_log(s, expected)
    with pytest.raises(UnavailableError):
        s.entries(61, 62)
    with pytest.raises(UnavailableError):
        s.term(61)
    s.close()
    s = open_store()
    _check_log(s, expected)
    # and the log continues after the replaced suffix
    more = [Entry(i, 5, b"more-%d" % i) for i in range(61, 70)]
    s.save(entries=more)
    s.close()
    s = open_store()
    _check_log(s, expected + more)


def test_suffix_replacement_across_segment_boundaries(open_store):
    s = open_store(segment_size=8192)
    old = make_entries(1, 2001, length=40)
    for k in range(0, 2000, 25):
        s.save(entries=old[k:k + 25])
    ranges = _segment_ranges(s.path)
    assert len(ranges) >= 6
    # replace from the middle of the second segment: every later segment is superseded
    cut = ranges[1][1] + 3
    new = [Entry(i, 9, entry_data(i + 10**6, 40)) for i in range(cut, cut + 400)]
    for k in range(0, 400, 25):
        s.save(entries=new[k:k + 25])
    expected = old[:cut - 1] + new
    _check_log(s, expected)
    s.close()

    s = open_store(segment_size=8192)
    _check_log(s, expected)
    # replace exactly at the base index of a segment written by the previous process
    base = next(b for _p, b in _segment_ranges(s.path) if cut < b < expected[-1].index)
    new2 = [Entry(i, 10, b"r2-%d" % i) for i in range(base, base + 5)]
    s.save(entries=new2)
    expected = expected[:base - 1] + new2
    _check_log(s, expected)
    # replace only the last entry, then everything from the first index
    last = expected[-1].index
    s.save(entries=[Entry(last, 11, b"only-last")])
    expected = expected[:-1] + [Entry(last, 11, b"only-last")]
    _check_log(s, expected)
    s.close()
    s = open_store(segment_size=8192)
    _check_log(s, expected)
    everything = [Entry(i, 12, b"all-%d" % i) for i in range(1, 30)]
    s.save(entries=everything)
    _check_log(s, everything)
    s.close()
    s = open_store(segment_size=8192)
    _check_log(s, everything)


def test_suffix_replacement_after_reopen_into_sealed_segments(open_store):
    s = open_store(segment_size=8192)
    old = make_entries(1, 1201, length=40)
    for k in range(0, 1200, 30):
        s.save(entries=old[k:k + 30])
    s.close()
    s = open_store(segment_size=8192)                       # every segment is sealed now
    new = [Entry(i, 20, entry_data(i * 7, 30)) for i in range(77, 1500)]
    for k in range(0, len(new), 100):
        s.save(entries=new[k:k + 100])
    expected = old[:76] + new
    _check_log(s, expected)
    s.close()
    s = open_store(segment_size=8192)
    _check_log(s, expected)


def test_gap_is_a_usage_error(open_store):
    s = open_store()
    ents = make_entries(1, 11)
    s.save(entries=ents)
    with pytest.raises(UsageError):
        s.save(entries=[Entry(12, 1, b"gap")])                       # 11 is missing
    with pytest.raises(UsageError):
        s.save(entries=[Entry(11, 1, b"a"), Entry(13, 1, b"b")])     # not contiguous
    with pytest.raises(UsageError):
        s.save(entries=[Entry(11, 1, b"a"), Entry(11, 1, b"b")])
    _check_log(s, ents)
    # the store is not failed by a usage error
    s.save(entries=[Entry(11, 1, b"ok")])
    s.close()
    s = open_store()
    _check_log(s, ents + [Entry(11, 1, b"ok")])


# ---------------------------------------------------------------------------
# Compaction
# ---------------------------------------------------------------------------


def test_compaction(open_store):
    s = open_store(segment_size=8192)
    ents = make_entries(1, 3001, length=40, per_term=400)
    for k in range(0, 3000, 50):
        s.save(entries=ents[k:k + 50])
    ranges = _segment_ranges(s.path)
    assert len(ranges) >= 8
    c = ranges[4][1] + 10                     # inside the fifth segment
    s.compact(c)
    assert s.first_index() == c + 1
    assert s.last_index() == 3000
    assert s.term(c) == ents[c - 1].term
    remaining = {p for p, _b in _segment_ranges(s.path)}
    for (p, _b), (_p2, next_base) in zip(ranges, ranges[1:]):
        if next_base - 1 <= c:               # every entry of this file is compacted
            assert p not in remaining, f"{os.path.basename(p)} should have been deleted"
        else:
            assert p in remaining
    for lo in (1, c - 1, c):
        with pytest.raises(CompactedError):
            s.entries(lo, c + 5)
    with pytest.raises(CompactedError):
        s.term(c - 1)
    assert s.entries(c + 1, 3001) == ents[c:]
    with pytest.raises(CompactedError):
        s.compact(c)                          # already compacted
    with pytest.raises(walcrypt.WalcryptError):
        s.compact(3001)                       # beyond the last index
    assert s.first_index() == c + 1 and s.last_index() == 3000
    s.close()

    s = open_store(segment_size=8192)
    assert s.first_index() == c + 1
    assert s.term(c) == ents[c - 1].term
    with pytest.raises(CompactedError):
        s.entries(c, c + 1)
    assert s.entries(c + 1, 3001) == ents[c:]
    # compacting everything, then the log continues
    s.compact(3000)
    assert s.first_index() == 3001 and s.last_index() == 3000
    assert s.term(3000) == ents[-1].term
    assert s.entries(3001, 3001) == []
    more = make_entries(3001, 3101, length=40, per_term=400)
    s.save(entries=more)
    s.close()
    s = open_store(segment_size=8192)
    assert s.first_index() == 3001
    assert s.term(3000) == ents[-1].term
    _check_log(s, more, first=3001)
    assert len(segment_files(s.path)) <= 3


def test_compaction_then_suffix_replacement(open_store):
    s = open_store(segment_size=8192)
    ents = make_entries(1, 1001, length=40)
    for k in range(0, 1000, 40):
        s.save(entries=ents[k:k + 40])
    s.compact(500)
    new = [Entry(i, 7, b"n%d" % i) for i in range(700, 760)]
    s.save(entries=new)
    expected = ents[500:699] + new
    _check_log(s, expected, first=501)
    s.close()
    s = open_store(segment_size=8192)
    _check_log(s, expected, first=501)
    # Raft may resend entries at or below the compacted index: those are ignored, the rest is
    # a suffix replacement (here with the same content, so nothing changes but the tail after it)
    s.save(entries=[Entry(i, 7, b"ignored") for i in range(495, 501)] + expected[:5])
    expected = expected[:5]
    _check_log(s, expected, first=501)
    s.save(entries=ents[505:699] + new)
    expected = ents[500:699] + new
    s.compact(720)
    s.close()
    s = open_store(segment_size=8192)
    _check_log(s, new[21:], first=721)


# ---------------------------------------------------------------------------
# Hard state
# ---------------------------------------------------------------------------


def test_hard_state_persists(open_store):
    s = open_store(segment_size=8192)
    s.save(hard_state=HardState(1, 1, 0))
    s.close()
    s = open_store(segment_size=8192)
    assert s.initial_state()[0] == HardState(1, 1, 0)
    s.save(hard_state=HardState(2, 3, 0), entries=make_entries(1, 11))
    s.save(hard_state=HardState(3, 2, 5))
    s.close()
    s = open_store(segment_size=8192)
    hs, cs = s.initial_state()
    assert hs == HardState(3, 2, 5)
    assert isinstance(cs, walcrypt.ConfState)
    # the hard state survives segment rotation, compaction of the segment that carried it, reopen
    ents = make_entries(11, 1011, length=60)
    for k in range(0, 1000, 20):
        s.save(entries=ents[k:k + 20])
    assert len(segment_files(s.path)) >= 5
    assert s.initial_state()[0] == HardState(3, 2, 5)
    s.compact(900)
    s.close()
    s = open_store(segment_size=8192)
    assert s.initial_state()[0] == HardState(3, 2, 5)
    s.save(hard_state=HardState(4, 4, 1000))
    s.close()
    s = open_store(segment_size=8192)
    assert s.initial_state()[0] == HardState(4, 4, 1000)
    assert s.last_index() == 1010


# ---------------------------------------------------------------------------
# Plaintext mode
# ---------------------------------------------------------------------------


def test_plaintext_round_trip(open_store, data_dir):
    ents = make_entries(1, 5001, length=50)
    s = open_store(encrypted=False, segment_size=16384)
    for k in range(0, 5000, 100):
        s.save(hard_state=HardState(1, 1, k), entries=ents[k:k + 100])
    s.close()
    assert len(segment_files(data_dir, encrypted=False)) >= 3
    assert not segment_files(data_dir, encrypted=True)
    s = open_store(encrypted=False, segment_size=16384)
    _check_log(s, ents)
    assert s.initial_state()[0] == HardState(1, 1, 4900)
    s.close()


def test_encrypted_store_refuses_plaintext_open(open_store):
    s = open_store()
    s.save(entries=make_entries(1, 5))
    s.close()
    with pytest.raises(UsageError):
        open_store(encrypted=False)


# ---------------------------------------------------------------------------
# Concurrency (sync="batch": group commit)
# ---------------------------------------------------------------------------


def test_concurrent_saves_with_group_commit(open_store):
    s = open_store(sync="batch", segment_size=16384)
    alloc = threading.Lock()
    state = {"next": 1}
    errors: list[BaseException] = []
    hs_written: set[HardState] = set()
    expected: dict[int, Entry] = {}

    def entry_writer(tid: int) -> None:
        try:
            for r in range(60):
                # Raft indexes must be contiguous: allocation and submission are serialised,
                # but the saves still overlap with the other threads' hard-state saves.
                with alloc:
                    lo = state["next"]
                    ents = [Entry(i, 1, b"t%d-r%d-i%d" % (tid, r, i)) for i in range(lo, lo + 1 + r % 5)]
                    s.save(entries=ents)
                    for e in ents:
                        expected[e.index] = e
                    state["next"] = ents[-1].index + 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def hs_writer(tid: int) -> None:
        try:
            for r in range(80):
                hs = HardState(1, tid, r)
                s.save(hard_state=hs)
                hs_written.add(hs)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=entry_writer, args=(t,)) for t in range(3)]
    threads += [threading.Thread(target=hs_writer, args=(t,)) for t in range(10, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a saving thread hung"
    assert not errors, errors
    exp = [expected[i] for i in sorted(expected)]
    assert [e.index for e in exp] == list(range(1, len(exp) + 1))
    _check_log(s, exp)
    final_hs = s.initial_state()[0]
    assert final_hs in hs_written
    s.close()
    s = open_store(sync="batch", segment_size=16384)
    _check_log(s, exp)
    assert s.initial_state()[0] == final_hs


def test_concurrent_hard_state_saves_all_return_durable(open_store):
    s = open_store(sync="batch")
    errors: list[BaseException] = []
    last_by_thread: dict[int, HardState] = {}

    def run(tid: int) -> None:
        try:
            for r in range(100):
                hs = HardState(tid, tid, r)
                s.save(hard_state=hs)
                last_by_thread[tid] = hs
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    # after every thread finished, the last hard state written is one of the threads' final ones
    final = s.initial_state()[0]
    assert final in last_by_thread.values()
    s.close()
    s = open_store(sync="batch")
    assert s.initial_state()[0] == final


# ---------------------------------------------------------------------------
# Closed store
# ---------------------------------------------------------------------------


def test_closed_store_raises_usage_error(open_store):
    s = open_store()
    s.save(entries=make_entries(1, 4))
    s.close()
    s.close()                                    # idempotent
    calls = [
        lambda: s.save(entries=[Entry(4, 1, b"x")]),
        lambda: s.save(hard_state=HardState(1, 1, 1)),
        lambda: s.entries(1, 2),
        lambda: s.term(1),
        lambda: s.first_index(),
        lambda: s.last_index(),
        lambda: s.initial_state(),
        lambda: s.compact(1),
    ]
    for call in calls:
        with pytest.raises(UsageError):
            call()


def test_context_manager_closes_and_releases(data_dir, kek):
    with wctest.open_store(data_dir, kek=kek) as s:
        s.save(entries=make_entries(1, 3))
    with pytest.raises(UsageError):
        s.last_index()
    with wctest.open_store(data_dir, kek=kek) as s2:          # the lock was released
        assert s2.last_index() == 2


def test_bad_options_are_usage_errors(data_dir, kek):
    with pytest.raises(UsageError):
        wctest.open_store(data_dir, kek=kek, sync="sometimes")
    with pytest.raises(UsageError):
        wctest.open_store(data_dir, kek=kek, segment_size=100)


# ---------------------------------------------------------------------------
# A model of the log against the engine (random operations, reopen included)
# ---------------------------------------------------------------------------

_op = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 60), st.integers(0, 2), st.integers(0, 300)),
    st.tuples(st.just("replace"), st.floats(0, 1), st.integers(1, 40), st.integers(0, 300)),
    st.tuples(st.just("compact"), st.floats(0, 1), st.just(0), st.just(0)),
    st.tuples(st.just("hs"), st.integers(0, 10**6), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("resend"), st.integers(1, 6), st.integers(1, 30), st.integers(0, 100)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=25), seed=st.integers(0, 2**32 - 1))
def test_model_of_the_log(ops, seed):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data")
        s = wctest.open_store(path, segment_size=4096)
        try:
            log: dict[int, Entry] = {}
            first, term, hs = 1, 1, HardState()
            compacted_term = 0

            def last() -> int:
                return max(log) if log else first - 1

            for kind, a, b, c in ops:
                if kind == "append":
                    term += b
                    lo = last() + 1
                    ents = [Entry(i, term, rng.randbytes(rng.randint(0, c))) for i in range(lo, lo + a)]
                    s.save(entries=ents)
                    log.update((e.index, e) for e in ents)
                elif kind == "replace" and log:
                    term += 1
                    lo = first + int(a * (last() - first))
                    ents = [Entry(i, term, rng.randbytes(rng.randint(0, c))) for i in range(lo, lo + b)]
                    s.save(entries=ents)
                    for i in [i for i in log if i >= lo]:
                        del log[i]
                    log.update((e.index, e) for e in ents)
                elif kind == "compact" and log:
                    ci = first + int(a * (last() - first))
                    s.compact(ci)
                    compacted_term = log[ci].term
                    for i in [i for i in log if i <= ci]:
                        del log[i]
                    first = ci + 1
                elif kind == "resend":
                    # Raft may resend entries at or below the compacted index: those are ignored,
                    # the rest replaces the suffix from the first index
                    term += 1
                    lo = max(1, first - a)
                    ents = [Entry(i, term, rng.randbytes(rng.randint(0, c))) for i in range(lo, lo + b)]
                    s.save(entries=ents)
                    kept = [e for e in ents if e.index >= first]
                    if kept:
                        for i in [i for i in log if i >= kept[0].index]:
                            del log[i]
                        log.update((e.index, e) for e in kept)
                elif kind == "hs":
                    hs = HardState(term, 1, a)
                    s.save(hard_state=hs)
                elif kind == "reopen":
                    s.close()
                    s = wctest.open_store(path, segment_size=4096)
                assert s.first_index() == first
                assert s.last_index() == last()
                assert s.initial_state()[0] == hs
                if first > 1:
                    assert s.term(first - 1) == compacted_term
            s.close()
            s = wctest.open_store(path, segment_size=4096)
            expected = [log[i] for i in sorted(log)]
            assert [e.index for e in expected] == list(range(first, first + len(expected)))
            _check_log(s, expected, first=first)
            assert s.initial_state()[0] == hs
        finally:
            s.close()
