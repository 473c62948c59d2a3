"""Raft-legal histories against walcrypt and an in-memory reference.

Regression tests first: histories the generator (or an audit) found, each as the plain calls a
host made.
"""

from __future__ import annotations

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta
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
