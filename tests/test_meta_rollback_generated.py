"""``meta/`` put back from *every* commit of a workload: open refuses, or serves all that was
acknowledged; it never deletes an acknowledged file.

A copy of ``meta/`` is taken after every LMDB commit of a workload that covers snapshots inside
and ahead of the log (a log reset), segment roll-over, compaction, a DEK rotation and close. Each
copy is then put back alone beside the final segment and snapshot files - what an operator
restoring ``meta/`` from a backup, or a file-system snapshot rolling it back, does - and the
store opened.  Every copy must either be refused (a ``WalcryptError``) with no file of the data
directory touched, or open and serve exactly the final log and the final newest snapshot.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta
from walcrypt import meta as M
from walcrypt.errors import WalcryptError

import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
CS = ConfState(voters=(1, 2, 3))
OPTS = dict(segment_size=4096, snapshot_chunk_size=512, sync="always")


def _ents(lo, hi, term):
    return [Entry(i, term, wctest.entry_data(i, 150)) for i in range(lo, hi)]


def _files(root: str) -> dict[str, str]:
    out = {}
    for d in sorted(os.listdir(root)):
        p = os.path.join(root, d)
        if d == "meta" or not os.path.isdir(p):
            continue
        for n in sorted(os.listdir(p)):
            with open(os.path.join(p, n), "rb") as f:
                out[f"{d}/{n}"] = hashlib.sha256(f.read()).hexdigest()
    return out


def _workload(s) -> None:
    s.save(HardState(1, 1, 0), _ents(1, 40, 1))
    s.save_snapshot(SnapshotMeta(20, 1, CS), b"state at 20" * 100)          # inside the log
    s.save(HardState(2, 2, 30), _ents(40, 60, 2))
    s.save_snapshot(SnapshotMeta(100, 3, CS), b"leader state at 100" * 80)  # ahead: a log reset
    s.save(HardState(3, 3, 100), _ents(101, 130, 3))
    s.rotate_dek()
    s.save(None, _ents(130, 140, 3))
    s.save_snapshot(SnapshotMeta(139, 3, CS), b"state at 139" * 90)          # completes the rotation
    s.save(HardState(3, 3, 139), _ents(140, 150, 3))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    base = tmp_path_factory.mktemp("rollback")
    data_dir, copies = str(base / "data"), str(base / "copies")
    os.makedirs(copies)
    real_write = M.Meta.write
    taken = []

    from contextlib import contextmanager

    @contextmanager
    def write(self):
        with real_write(self) as w:
            yield w
        if os.path.basename(self.path) == "meta" and self.path.startswith(data_dir):
            dest = os.path.join(copies, f"{len(taken):04d}")
            shutil.copytree(self.path, dest)
            taken.append(dest)

    mp = pytest.MonkeyPatch()
    mp.setattr(M.Meta, "write", write)
    try:
        with walcrypt.open(data_dir, kek=KEK, **OPTS) as s:
            _workload(s)
    finally:
        mp.undo()
    with walcrypt.open(data_dir, kek=KEK, read_only=True, **OPTS) as s:
        final = (s.first_index(), s.last_index(), s.entries(s.first_index(), s.last_index() + 1),
                 s.snapshot().meta.index, s.snapshot().data, s.initial_state()[0])
    return data_dir, taken, final


def test_the_workload_commits_often_enough_to_matter(recorded):
    _data_dir, taken, _final = recorded
    assert len(taken) >= 20


def test_meta_from_any_commit_is_refused_or_serves_everything_acknowledged(recorded, tmp_path):
    data_dir, taken, final = recorded
    outcomes = {"refused": 0, "opened": 0}
    for n, copy in enumerate(taken):
        work = str(tmp_path / f"w{n}")
        shutil.copytree(data_dir, work)
        shutil.rmtree(os.path.join(work, "meta"))
        shutil.copytree(copy, os.path.join(work, "meta"))
        before = _files(work)
        try:
            with walcrypt.open(work, kek=KEK, **OPTS) as s:
                got = (s.first_index(), s.last_index(), s.entries(s.first_index(), s.last_index() + 1),
                       s.snapshot().meta.index, s.snapshot().data, s.initial_state()[0])
        except WalcryptError:
            outcomes["refused"] += 1
            assert _files(work) == before, f"meta/ from commit {n}: refused, but files were changed"
            continue
        outcomes["opened"] += 1
        assert got[:2] == final[:2], f"meta/ from commit {n}: log {got[:2]}, acknowledged {final[:2]}"
        assert got == final, f"meta/ from commit {n}: served something other than what was acknowledged"
        gone = sorted(set(before) - set(_files(work)))
        assert not gone, f"meta/ from commit {n}: open deleted {gone}"   # the final files are all live
        shutil.rmtree(work)
    print(outcomes)
    assert outcomes["opened"] >= 1           # the newest copy is the store itself
