"""Metadata older than the data is a finding, not a cleanup.

``meta/`` (LMDB) and the segment and snapshot files are separate files: an operator restoring
``meta/`` from an older backup, a broken file-system snapshot, or an attacker with write access
can put an older ``meta/`` beside newer data.  walcrypt must then refuse to open, name both, and
delete nothing; files it deletes at open are only those that provably never held an
acknowledged write (a crash between creating a segment and registering it, a purge or a staged
re-key interrupted by a crash).
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta
from walcrypt.errors import CorruptionError, StoreFailedError
from walcrypt.testing import FaultyVFS

import wctest

OPTS = dict(segment_size=4096, snapshot_chunk_size=4096, sync="always")
CS = ConfState(voters=(1,))
WAL = "wal-v1-encrypted"


def _ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(i, term, wctest.entry_data(i, 200)) for i in range(lo, hi)]


def _data_files(root: str) -> dict[str, str]:
    out = {}
    for d in (WAL, "snap-v1-encrypted"):
        p = os.path.join(root, d)
        for n in sorted(os.listdir(p)) if os.path.isdir(p) else ():
            with open(os.path.join(p, n), "rb") as f:
                out[f"{d}/{n}"] = hashlib.sha256(f.read()).hexdigest()
    return out


def _swap_meta(root: str, older: str) -> None:
    shutil.rmtree(os.path.join(root, "meta"))
    shutil.copytree(older, os.path.join(root, "meta"))


def _backup_meta(root: str, dest: str) -> str:
    shutil.copytree(os.path.join(root, "meta"), dest)
    return dest


@pytest.mark.parametrize("later", ["writes", "rollover", "snapshot", "dek-rotation"])
def test_older_meta_is_refused_and_nothing_is_deleted(tmp_path, kek, later):
    d = str(tmp_path / "store")
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        s.save(HardState(1, 1, 5), _ents(1, 11))
    older = _backup_meta(d, str(tmp_path / "meta-backup"))
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        if later == "writes":
            s.save(HardState(1, 1, 12), _ents(11, 13))
        elif later == "rollover":
            s.save(HardState(1, 1, 40), _ents(11, 41))
        elif later == "snapshot":
            s.save_snapshot(SnapshotMeta(10, 1, CS), b"state" * 100)
        elif later == "dek-rotation":
            s.rotate_dek()
            s.save(HardState(1, 1, 20), _ents(11, 21))
            s.save_snapshot(SnapshotMeta(20, 1, CS), b"state" * 100)
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        assert s.last_index() >= 10
    before = _data_files(d)

    _swap_meta(d, older)
    with pytest.raises(CorruptionError, match="older than the data") as info:
        walcrypt.open(d, kek=kek, **OPTS)
    assert "deleted nothing" in str(info.value)
    assert _data_files(d) == before, "open deleted or changed data files beside an older meta/"
    with pytest.raises(CorruptionError):                    # and it stays refused
        walcrypt.open(d, kek=kek, **OPTS)
    assert _data_files(d) == before


def test_matching_meta_put_back_opens_everything(tmp_path, kek):
    d = str(tmp_path / "store")
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        s.save(HardState(1, 1, 5), _ents(1, 11))
    older = _backup_meta(d, str(tmp_path / "old"))
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        s.save(HardState(1, 1, 30), _ents(11, 31))
    newest = _backup_meta(d, str(tmp_path / "new"))
    _swap_meta(d, older)
    with pytest.raises(CorruptionError):
        walcrypt.open(d, kek=kek, **OPTS)
    _swap_meta(d, newest)
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        assert s.entries(1, 31) == _ents(1, 31)
        assert s.initial_state()[0] == HardState(1, 1, 30)


def test_purge_interrupted_after_its_commit_leaves_no_unaccounted_file(tmp_path, kek):
    """Segments superseded by a suffix replacement lie above the compaction point; a purge that
    commits their removal and is interrupted before unlinking them must not leave them behind as
    '.unlisted' files (and never under a key that is later retired)."""
    d = str(tmp_path / "store")
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        s.save(HardState(1, 1, 4), _ents(1, 41))                     # several segments
        s.save(HardState(2, 2, 4), _ents(5, 8, term=2))              # a new leader replaces 5..40
        s.save(HardState(2, 2, 7), _ents(8, 20, term=2))
    segs_before = set(os.listdir(os.path.join(d, WAL)))
    vfs = FaultyVFS()
    s = walcrypt.open(d, kek=kek, vfs=vfs, **OPTS)
    vfs.fail_nth("unlink", 1)
    with pytest.raises(StoreFailedError):
        s.compact(15)
    s.close()
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        assert s.entries(16, 20) == _ents(16, 20, term=2)
    left = os.listdir(os.path.join(d, WAL))
    assert not [n for n in left if n.endswith(".unlisted")], left
    assert len(set(left) - segs_before) <= 2 and len(left) < len(segs_before), (sorted(segs_before), sorted(left))


class _Stop(Exception):
    pass


def test_interrupted_rekey_staging_is_removed_and_ids_are_not_reused(tmp_path, kek):
    d = str(tmp_path / "store")
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        s.save(HardState(1, 1, 60), _ents(1, 61))
        s.save_snapshot(SnapshotMeta(10, 1, CS), b"state" * 100)
    vfs = FaultyVFS()
    s = walcrypt.open(d, kek=kek, vfs=vfs, **OPTS)
    before = set(os.listdir(os.path.join(d, WAL)))
    real_seal = s._seal_staged
    calls = {"n": 0}

    def seal_then_stop(seg):
        real_seal(seg)
        calls["n"] += 1
        if calls["n"] == 1:
            raise _Stop()

    s._seal_staged = seal_then_stop
    with pytest.raises((_Stop, StoreFailedError)):
        s.rekey()
    staged = set(os.listdir(os.path.join(d, WAL))) - before
    assert staged
    s.close()
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        assert s.entries(11, 61) == _ents(11, 61)
        nxt = s.next_segment
    left = set(os.listdir(os.path.join(d, WAL)))
    assert not (left & staged), "staged segments of the interrupted re-key were left behind"
    assert not [n for n in left if n.endswith(".unlisted")], left
    assert min(int(n[:16], 16) for n in staged) < nxt
