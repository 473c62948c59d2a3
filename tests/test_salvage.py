"""Damage below the newest valid snapshot loses nothing (walcrypt.salvage, FORMAT.md 11.10).

Generated, not listed: every segment of a real store is damaged in turn, in each way below, and
the outcome is derived from where the segment lies (its reach, from the file names) relative to
the snapshot -- never from the engine's own answer:

* a segment wholly at or below the snapshot's index that is not the newest: a read-write open
  (damage the open sees) or ``check(fix=True)`` (any damage) sets it aside as ``.broken`` and
  compacts the log up to the snapshot; every entry above the snapshot is served byte for byte,
  and the repair reports the index range it no longer serves;
* a segment that holds an entry above the snapshot (straddling it or above it), or the newest:
  the open refuses with every file left as it was, or (damage the open never reads) opens and
  serves every entry above the snapshot byte for byte or raises when the damaged one is read --
  never wrong data, never a shorter log; ``check(fix=True)`` refuses with nothing modified.

Real files, real LMDB; the command surface (repair, compact) as subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, RawKey, SnapshotMeta, StorageError
from walcrypt import format as fmt
from walcrypt.check import check

import wctest

KEK = RawKey(wctest.KEK_BYTES)
SEG = 4096
N = 300                      # entries 1..300, ten per save, about 40 per segment
ENC = "wal-v1-encrypted"
KINDS = ("delete", "header", "truncate", "payload")
SEGMENTS = 10                # what the writes make with 4 KiB segments (checked by the fixture)


def _data(i: int) -> bytes:
    return b"entry-%05d-" % i + bytes([i % 251]) * 40


def _entries(lo: int, hi: int) -> list[Entry]:
    return [Entry(i, 1 + i // 100, _data(i)) for i in range(lo, hi + 1)]


def _build(path: str, snaps: tuple[int, ...]) -> None:
    with walcrypt.open(path, kek=KEK, segment_size=SEG, sync="none", keep_snapshots=2) as s:
        for lo in range(1, N + 1, 10):
            ents = _entries(lo, lo + 9)
            s.save(hard_state=HardState(ents[-1].term, 2, ents[-1].index), entries=ents)
            for at in snaps:
                if at == lo + 9:
                    s.save_snapshot(SnapshotMeta(at, s.term(at), ConfState((1, 2, 3))), b"state at %d" % at)


def _segments(root: str) -> list[tuple[int, int, str]]:
    d = os.path.join(root, ENC)
    out = []
    for n in sorted(os.listdir(d)):
        if n.endswith(".wal"):
            out.append((int(n[:16], 16), int(n[17:33], 16), os.path.join(d, n)))
    return out


def _reach(root: str) -> dict[int, tuple[int, int | None]]:
    """Each segment's first and last index, from the file names alone (the next segment's base)."""
    segs = _segments(root)
    return {sid: (base, segs[k + 1][1] - 1 if k + 1 < len(segs) else None) for k, (sid, base, _p) in enumerate(segs)}


def _damage(path: str, kind: str) -> None:
    if kind == "delete":
        os.unlink(path)
        return
    data = bytearray(wctest.read(path))
    if kind == "header":
        data[40] ^= 0x01                                   # base_index, CRC not fixed
    elif kind == "truncate":
        data = data[:len(data) // 2]
    elif kind == "payload":
        f = next(f for f in wctest.parse_frames(bytes(data)) if f.type == fmt.FRAME_ENTRIES)
        data[f.offset + wctest.FRAME_HEADER_SIZE + 20] ^= 0x10
        wctest.fix_frame_crc(data, f.offset)               # an attacker fixes the CRC: a failed tag
    wctest.write(path, bytes(data))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    """'mid': one snapshot at 140, inside a segment; 'edge': snapshots at 60 and at a segment's last
    index (the older one is kept for a fallback, so the segments between them are retained)."""
    out = {}
    root = str(tmp_path_factory.mktemp("salvage") / "mid")
    _build(root, (140,))
    out["mid"] = (root, 140)
    assert all(b != 141 for _sid, b, _p in _segments(root)), "140 must lie inside a segment"
    probe = str(tmp_path_factory.mktemp("salvage") / "probe")
    _build(probe, ())
    edge = next(b - 1 for _sid, b, _p in _segments(probe) if 150 < b - 1 < N)   # a segment ends here
    root = str(tmp_path_factory.mktemp("salvage") / "edge")
    _build(root, (60, edge))
    out["edge"] = (root, edge)
    for r, _s in out.values():
        assert len(_segments(r)) == SEGMENTS, "the writes no longer make the segments the cases are generated for"
    return out


def _cases(bases_names=("mid", "edge")):
    return [(b, k, seg) for b in bases_names for k in KINDS for seg in range(1, SEGMENTS + 1)]


def _expected_above(snap: int) -> list[Entry]:
    return _entries(snap + 1, N)


def _read_above(store, snap: int) -> list[Entry]:
    return store.entries(snap + 1, store.last_index() + 1)


@pytest.mark.parametrize("base,kind,seg", _cases())
def test_damage_to_each_segment_in_turn(bases, tmp_path, base, kind, seg):
    src, snap = bases[base]
    reach = _reach(src)
    root = wctest.copy_store(src, str(tmp_path / "data"))
    path = {sid: p for sid, _b, p in _segments(root)}[seg]
    lo, hi = reach[seg]
    newest = seg == max(reach)
    below = not newest and hi is not None and hi <= snap
    _damage(path, kind)
    before = wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))
    seen_at_open = kind != "payload"

    # -- the engine's own read-write open ------------------------------------------------------
    work = wctest.copy_store(root, str(tmp_path / "open"))
    try:
        s = walcrypt.open(work, kek=KEK, segment_size=SEG)
    except StorageError:
        assert not below or not seen_at_open, f"{kind} of segment {seg} (entries {lo}..{hi}) is below {snap}"
        assert wctest.tree_hashes(work, exclude=("lock.mdb", "LOCK")) == before, "a refused open modified files"
    else:
        with s:
            repairs = [r for r in s.repairs if r.get("kind") == "compacted"]
            if below and seen_at_open:
                assert repairs and repairs[0]["plan"]["dropped"] == [1, snap]
                assert s.first_index() == snap + 1
                assert os.path.exists(path.replace(root, work) + ".broken") == (kind != "delete")
            else:
                assert not repairs and s.first_index() == 1
            assert s.last_index() == N, "the log above the snapshot became shorter"
            try:
                got = _read_above(s, snap)
            except StorageError:
                assert not below, "reading above the snapshot failed for damage below it"
            else:
                assert got == _expected_above(snap)

    # -- walcrypt repair (check fix=True) ----------------------------------------------------------
    rep = check(root, kek=KEK, fix=True)
    if below:
        assert rep.repaired and rep.ok, [f.to_dict() for f in rep.findings]
        assert rep.compaction["dropped"] == [1, snap] and rep.compaction["segments"] == [seg]
        assert rep.compaction["damaged_range"][0] == lo
        done = [f for f in rep.findings if f.severity == "repaired"]
        assert done and f"entries 1..{snap}" in done[0].detail
        with walcrypt.open(root, kek=KEK, read_only=True) as s:
            assert s.first_index() == snap + 1 and s.last_index() == N
            assert _read_above(s, snap) == _expected_above(snap)
            assert s.snapshot().meta.index == snap and s.snapshot().data == b"state at %d" % snap
        names = os.listdir(os.path.dirname(path))
        assert (os.path.basename(path) + ".broken" in names) == (kind != "delete")
    else:
        assert rep.refused and not rep.repaired
        assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before, "a refused repair modified files"


def test_read_only_open_refuses_with_a_hint_and_modifies_nothing(bases, tmp_path):
    src, snap = bases["mid"]
    root = wctest.copy_store(src, str(tmp_path / "data"))
    os.unlink(_segments(root)[1][2])
    before = wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))
    with pytest.raises(walcrypt.CorruptionError) as err:
        walcrypt.open(root, kek=KEK, read_only=True)
    assert f"snapshot at index {snap}" in str(err.value) and "walcrypt repair" in str(err.value)
    assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before
    rep = check(root, kek=KEK)                     # verify: an error, marked repairable, with the plan
    assert not rep.ok and all(f.repairable for f in rep.errors)
    assert rep.compaction["dropped"] == [1, snap]
    assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before


def test_two_damaged_segments_repaired_together(bases, tmp_path):
    src, snap = bases["mid"]
    root = wctest.copy_store(src, str(tmp_path / "data"))
    segs = _segments(root)
    os.unlink(segs[0][2])
    _damage(segs[2][2], "payload")
    rep = check(root, kek=KEK, fix=True)
    assert rep.repaired and rep.ok and rep.compaction["segments"] == [segs[0][0], segs[2][0]]
    assert rep.compaction["dropped"] == [1, snap]
    with walcrypt.open(root, kek=KEK) as s:
        assert s.first_index() == snap + 1 and s.entries(snap + 1, N + 1) == _entries(snap + 1, N)
        s.save(entries=_entries(N + 1, N + 5))                  # the node goes on
    with walcrypt.open(root, kek=KEK) as s:
        assert s.entries(snap + 1, N + 6) == _entries(snap + 1, N + 5)


def test_newest_segment_is_never_set_aside_even_below_the_snapshot(tmp_path):
    """The newest segment holds the hard state: losing it could roll back the node's vote."""
    root = str(tmp_path / "data")
    _build(root, ())
    with walcrypt.open(root, kek=KEK, segment_size=SEG) as s:
        s.save_snapshot(SnapshotMeta(N, s.term(N), ConfState((1,))), b"state at the end")
    newest = _segments(root)[-1][2]
    os.unlink(newest)
    before = wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))
    with pytest.raises(walcrypt.CorruptionError):
        walcrypt.open(root, kek=KEK)
    assert check(root, kek=KEK, fix=True).refused
    assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before


def test_no_valid_snapshot_refuses(tmp_path):
    root = str(tmp_path / "data")
    _build(root, (150,))
    snap = [os.path.join(root, "snap-v1-encrypted", n) for n in os.listdir(os.path.join(root, "snap-v1-encrypted"))]
    data = bytearray(wctest.read(snap[0]))
    data[-5] ^= 1                                       # the only snapshot fails its last chunk
    wctest.write(snap[0], bytes(data))
    os.unlink(_segments(root)[1][2])
    before = wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))
    with pytest.raises(walcrypt.CorruptionError):
        walcrypt.open(root, kek=KEK)
    assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before


# ---------------------------------------------------------------------------------------------
# The command surface
# ---------------------------------------------------------------------------------------------

def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walcrypt.cli", *map(str, args)], capture_output=True, text=True,
                          env=wctest.child_env(), cwd=wctest.REPO_ROOT, timeout=120)


@pytest.fixture
def keyfile(tmp_path) -> str:
    p = str(tmp_path / "kek")
    with open(p, "w") as f:
        f.write(wctest.KEK_BYTES.hex())
    os.chmod(p, 0o600)
    return p


def test_cli_repair_lists_the_range_it_dropped(bases, tmp_path, keyfile):
    src, snap = bases["mid"]
    root = wctest.copy_store(src, str(tmp_path / "data"))
    seg = _segments(root)[2]
    _damage(seg[2], "truncate")
    res = _cli("verify", root, "--key-file", keyfile)
    assert res.returncode == 1 and "'walcrypt repair' can fix this" in res.stdout, res.stdout + res.stderr
    res = _cli("repair", root, "--key-file", keyfile)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"dropped: entries 1..{snap} are no longer served" in res.stdout
    assert "REPAIRED" in res.stdout and ".broken" in res.stdout and "Traceback" not in res.stderr
    res = _cli("dump", root, "--key-file", keyfile, "--json")
    dumped = json.loads(res.stdout)
    assert dumped["first_index"] == snap + 1 and len(dumped["entries"]) == N - snap
    res = _cli("repair", root, "--key-file", keyfile, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["ok"]


def test_cli_repair_refuses_damage_above_the_snapshot(bases, tmp_path, keyfile):
    src, snap = bases["mid"]
    root = wctest.copy_store(src, str(tmp_path / "data"))
    seg = next(p for sid, b, p in _segments(root) if b > snap + 1 and sid != _segments(root)[-1][0])
    os.unlink(seg)
    before = wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))
    res = _cli("repair", root, "--key-file", keyfile)
    assert res.returncode == 1 and "REFUSED" in res.stdout
    assert "vote" in res.stdout and "removeNodeFromCluster" in res.stdout      # what wiping means for Raft
    assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before


def test_cli_compact(bases, tmp_path, keyfile):
    src, snap = bases["edge"]
    root = wctest.copy_store(src, str(tmp_path / "data"))
    before = wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))
    res = _cli("compact", root, "--to", snap + 1, "--key-file", keyfile)
    assert res.returncode == 2 and f"newest valid snapshot at index {snap}" in res.stderr
    res = _cli("compact", root, "--to", 100, "--key-file", keyfile)                 # dry run
    assert res.returncode == 0 and "would drop entries 1..100" in res.stdout and "dry run" in res.stdout
    assert wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK")) == before
    res = _cli("compact", root, "--to", snap, "--key-file", keyfile, "--apply", "--json")
    out = json.loads(res.stdout)
    assert res.returncode == 0 and out["applied"] and out["dropped"] == [1, snap] and out["compacted_to"] == snap
    with walcrypt.open(root, kek=KEK, read_only=True) as s:
        assert s.first_index() == snap + 1 and s.entries(snap + 1, N + 1) == _entries(snap + 1, N)
    res = _cli("compact", root, "--to", 10, "--key-file", keyfile, "--apply")
    assert res.returncode == 0 and "already compacted" in res.stdout

