"""Disaster recovery without meta/ (walcrypt.recover, ``walcrypt recover``) and restoring a snapshot
onto another node (``walcrypt snapshot restore`` with a raw .snap file or under the target's KEK).

Real stores, real LMDB, real files; the command surface as subprocesses.  Every rebuilt or restored
store is opened with ``walcrypt.open`` and compared entry by entry, byte for byte, with what the
original store served.  The adversarial cases plant files an attacker without the key could make
(or files of another store under the same KEK) and check that none is adopted.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

import walcrypt
from walcrypt import (ConfState, Entry, HardState, KeyFile, RawKey, SnapshotMeta, UsageError, WrongKeyError,
                      backup)
from walcrypt import format as fmt
from walcrypt.check import check
from walcrypt.recover import recover

import wctest

KEK = RawKey(wctest.KEK_BYTES)
KEK_B = RawKey(bytes(range(32)))
SEG = 4096
N = 300
SNAP = 150
ENC, SNAPDIR = "wal-v1-encrypted", "snap-v1-encrypted"


def _data(i: int) -> bytes:
    return b"payload %05d " % i + bytes([i % 256]) * (i % 50)


def _entries(lo: int, hi: int, term=lambda i: 1 + i // 100) -> list[Entry]:
    return [Entry(i, term(i), _data(i)) for i in range(lo, hi + 1)]


def _build(path: str, kek=KEK, *, compact: bool = True, n: int = N, snap: int = SNAP) -> dict:
    """n entries ten per save, a snapshot at ``snap`` (then compacted to it), a stable value; returns what
    the store serves."""
    with walcrypt.open(path, kek=kek, segment_size=SEG, sync="none") as s:
        for lo in range(1, n + 1, 10):
            ents = _entries(lo, lo + 9)
            s.save(hard_state=HardState(ents[-1].term + 1, 3, ents[-1].index), entries=ents)
            if lo + 9 == snap:
                s.save_snapshot(SnapshotMeta(snap, s.term(snap), ConfState((1, 2, 3))), b"state machine at %d" % snap)
                if compact:
                    s.compact(snap)
        s.stable_set(b"CurrentTerm", b"\x04" + bytes(7))
        return _served(s)


def _served(s) -> dict:
    first, last = s.first_index(), s.last_index()
    snap = s.snapshot()
    return {"first": first, "last": last, "entries": s.entries(first, last + 1) if last >= first else [],
            "hard_state": s.initial_state()[0], "snapshot": (snap.meta, snap.data) if snap else None}


def _open_served(path: str, kek=KEK) -> dict:
    with walcrypt.open(path, kek=kek) as s:
        return _served(s)


def _tree(root: str) -> dict:
    return wctest.tree_hashes(root, exclude=("lock.mdb", "LOCK"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("recover") / "node1")
    return root, _build(root)


@pytest.fixture
def store(pristine, tmp_path) -> tuple[str, dict]:
    src, served = pristine
    return wctest.copy_store(src, str(tmp_path / "node1")), served


# ---------------------------------------------------------------------------------------------
# The rebuild
# ---------------------------------------------------------------------------------------------

def test_recover_after_meta_was_deleted(store):
    root, served = store
    shutil.rmtree(os.path.join(root, "meta"))
    before = _tree(root)
    with pytest.raises(walcrypt.CorruptionError, match="walcrypt recover"):
        walcrypt.open(root, kek=KEK)                             # the engine refuses, and says what to do
    plan = recover(root, KEK)                                    # dry run: writes nothing
    assert _tree(root) == before
    assert plan["meta"] == "missing" and plan["can_apply"] and not plan["refused"]
    assert plan["log"] == {"first_index": SNAP + 1, "last_index": N} and plan["compacted_to"] == SNAP
    assert plan["hard_state"] == {"term": served["hard_state"].term, "vote": 3, "commit": N}
    assert any("stable store" in x for x in plan["lost"]) and any("vote" in x for x in plan["notes"])
    rep = recover(root, KEK, apply=True)
    assert rep["applied"]
    got = _open_served(root)
    assert got == served                                          # entries, hard state, snapshot: byte for byte
    with walcrypt.open(root, kek=KEK) as s:
        assert s.stable_get(b"CurrentTerm") is None               # lived only in meta/: lost, as reported
        s.save(entries=_entries(N + 1, N + 3))                    # the node goes on
    with walcrypt.open(root, kek=KEK) as s:
        assert s.entries(N + 1, N + 4) == _entries(N + 1, N + 3)
    assert check(root, kek=KEK).ok


def test_recover_from_a_garbage_data_mdb_keeps_the_old_meta_aside(store):
    root, served = store
    mdb = os.path.join(root, "meta", "data.mdb")
    garbage = os.urandom(os.path.getsize(mdb))
    with open(mdb, "wb") as f:
        f.write(garbage)
    with pytest.raises(walcrypt.StorageError):
        walcrypt.open(root, kek=KEK)
    plan = recover(root, KEK)
    assert plan["meta"].startswith("damaged")
    recover(root, KEK, apply=True)
    assert _open_served(root) == served
    aside = glob.glob(os.path.join(root, "meta.lost-*"))
    assert len(aside) == 1 and wctest.read(os.path.join(aside[0], "data.mdb")) == garbage     # never deleted


def test_recover_keeps_unread_compaction_out_of_the_log(tmp_path):
    """Not compacted: the rebuilt store serves the log above the snapshot only (nothing proves an older
    segment file still belongs to the log), byte for byte."""
    root = str(tmp_path / "node1")
    served = _build(root, compact=False)
    assert served["first"] == 1
    shutil.rmtree(os.path.join(root, "meta"))
    recover(root, KEK, apply=True)
    got = _open_served(root)
    assert got["first"] == SNAP + 1 and got["last"] == N
    assert got["entries"] == served["entries"][SNAP:]
    assert got["hard_state"] == served["hard_state"] and got["snapshot"] == served["snapshot"]


def test_an_intact_meta_is_not_rebuilt_without_force(store):
    root, served = store
    before = _tree(root)
    with pytest.raises(UsageError, match="nothing to recover"):
        recover(root, KEK)
    assert _tree(root) == before
    rep = recover(root, KEK, apply=True, force=True)
    assert rep["meta"] == "intact" and rep["applied"]
    assert _open_served(root)["entries"] == served["entries"]


def test_wrong_kek_adopts_nothing(store):
    root, _served = store
    shutil.rmtree(os.path.join(root, "meta"))
    before = _tree(root)
    plan = recover(root, KEK_B)
    assert not plan["can_apply"] and plan["store_id"] is None and not plan["segments"]
    assert any("wrapped under another KEK" in a["reason"] for a in plan["set_aside"])
    with pytest.raises(walcrypt.CorruptionError, match="refused"):
        recover(root, KEK_B, apply=True)
    assert _tree(root) == before


@pytest.mark.parametrize("segment_size", [SEG, 1 << 16], ids=["small-segments", "one-segment"])
def test_log_reset_by_a_snapshot_is_rebuilt(tmp_path, segment_size):
    """A snapshot that disagrees with the log resets it: the suffix it replaced is never served.  With
    one big segment, the segment holding the replaced suffix still holds index 80 (with the old term)."""
    root = str(tmp_path / "node1")
    with walcrypt.open(root, kek=KEK, segment_size=segment_size, sync="none") as s:
        for lo in range(1, 101, 10):
            s.save(hard_state=HardState(1, 1, lo + 9), entries=_entries(lo, lo + 9, term=lambda i: 1))
        s.save_snapshot(SnapshotMeta(80, 5, ConfState((1,))), b"leader state at 80")     # InstallSnapshot
        s.save(hard_state=HardState(5, 2, 90), entries=_entries(81, 95, term=lambda i: 5))
        served = _served(s)
    assert served["first"] == 81
    shutil.rmtree(os.path.join(root, "meta"))
    plan = recover(root, KEK)
    assert plan["can_apply"]
    assert any("reset the log" in x for x in plan["notes"]) == (segment_size > SEG)
    recover(root, KEK, apply=True)
    assert _open_served(root) == served


@pytest.mark.parametrize("segment_size", [SEG, 1 << 16], ids=["small-segments", "one-segment"])
def test_log_reset_with_nothing_written_after_it(tmp_path, segment_size):
    """Nothing written after a snapshot that reset the log.  With one segment it still holds index 80
    with the old term: the reset shows, and the stale 81..100 are never served.  With small segments the
    one holding 80 was purged and the survivor starts at 81: whether the save reset the log cannot be
    told without meta/ (a snapshot of the node's own leaves the same files), so the rebuild refuses, and
    the snapshot file alone restores the node."""
    root = str(tmp_path / "node1")
    with walcrypt.open(root, kek=KEK, segment_size=segment_size, sync="none") as s:
        for lo in range(1, 101, 10):
            s.save(hard_state=HardState(1, 1, lo + 9), entries=_entries(lo, lo + 9, term=lambda i: 1))
        s.save_snapshot(SnapshotMeta(80, 5, ConfState((1,))), b"leader state at 80")
        served = _served(s)
    assert served["first"] == 81 and served["last"] == 80
    shutil.rmtree(os.path.join(root, "meta"))
    if segment_size > SEG:
        recover(root, KEK, apply=True)
        got = _open_served(root)
        assert got["first"] == 81 and got["last"] == 80 and got["entries"] == []      # the stale 81..100: never
        assert got["snapshot"] == served["snapshot"]
        return
    before = _tree(root)
    plan = recover(root, KEK)
    assert not plan["can_apply"] and "cannot be told without meta/" in plan["refused"][0]
    with pytest.raises(walcrypt.CorruptionError):
        recover(root, KEK, apply=True)
    assert _tree(root) == before
    snap = glob.glob(os.path.join(root, SNAPDIR, "*.snap"))[0]
    backup.restore_export(snap, str(tmp_path / "node1.new"), kek=KEK)
    got = _open_served(str(tmp_path / "node1.new"))
    assert got["snapshot"] == served["snapshot"] and got["first"] == 81 and got["last"] == 80


def test_own_snapshot_then_more_writes_in_the_same_segment(tmp_path):
    """The node's own snapshot, compacted, the segment holding its index purged, more writes after the
    record in the same segment: no reset, the entries after the snapshot are live and served."""
    root = str(tmp_path / "node1")
    with walcrypt.open(root, kek=KEK, segment_size=SEG, sync="none", keep_snapshots=1) as s:
        for lo in range(1, 101, 10):
            s.save(hard_state=HardState(1, 1, lo + 9), entries=_entries(lo, lo + 9, term=lambda i: 1))
        segs = sorted(os.listdir(os.path.join(root, ENC)))
        edge = int(segs[-1][17:33], 16) - 1                      # the last entry of the next-to-last segment
        s.save_snapshot(SnapshotMeta(edge, 1, ConfState((1,))), b"own state")
        s.compact(edge)
        s.save(hard_state=HardState(1, 1, 100), entries=[])
        served = _served(s)
    assert not any(n.startswith(segs[-2][:16]) for n in os.listdir(os.path.join(root, ENC)))   # purged
    shutil.rmtree(os.path.join(root, "meta"))
    recover(root, KEK, apply=True)
    assert _open_served(root) == served


def test_segments_under_a_key_no_snapshot_carries_cannot_be_read(tmp_path):
    """A DEK rotation waiting for its snapshot: the segments under the pending key cannot be read
    without meta/ (no snapshot carries that key), and the report says so."""
    root = str(tmp_path / "node1")
    served = _build(root)
    with walcrypt.open(root, kek=KEK, segment_size=SEG, sync="none") as s:
        s.rotate_dek()                                           # no snapshot source: it waits
        s.save(entries=_entries(N + 1, N + 20))
        pending = s.rotation.pending_key_id.hex()
    shutil.rmtree(os.path.join(root, "meta"))
    plan = recover(root, KEK)
    unread = [a for a in plan["set_aside"] if "no readable snapshot carries" in a["reason"]]
    assert unread and all(pending in a["reason"] for a in unread)
    assert plan["log"]["last_index"] == N
    assert any("newer than every readable segment" in x for x in plan["lost"])      # said, not hidden
    recover(root, KEK, apply=True)
    got = _open_served(root)
    assert got["entries"] == served["entries"]


# ---------------------------------------------------------------------------------------------
# An attacker without the key, and files of other stores
# ---------------------------------------------------------------------------------------------

def _other_store(tmp_path, kek, name: str) -> str:
    p = str(tmp_path / name)
    _build(p, kek)
    return p


def _plant(src: str, dst: str, data: bytes | None = None) -> None:
    with open(dst, "wb") as f:
        f.write(wctest.read(src) if data is None else data)


def test_planted_and_foreign_files_are_never_adopted(store, tmp_path):
    root, served = store
    other = _other_store(tmp_path, KEK, "other")                  # the same KEK, another store
    stranger = _other_store(tmp_path, KEK_B, "stranger")          # another KEK
    shutil.rmtree(os.path.join(root, "meta"))
    wal, snapdir = os.path.join(root, ENC), os.path.join(root, SNAPDIR)
    ours = sorted(n for n in os.listdir(wal) if n.endswith(".wal"))
    last_id, last_base = int(ours[-1][:16], 16), int(ours[-1][17:33], 16)
    theirs = sorted(glob.glob(os.path.join(other, ENC, "*.wal")))
    newest = wctest.read(os.path.join(wal, ours[-1]))
    planted = {}
    # another store's segment, named as our next one
    planted["foreign"] = os.path.join(wal, f"{last_id + 1:016x}-{N + 1:016x}.wal")
    _plant(theirs[-1], planted["foreign"])
    # our newest header under a key nobody has (CRC fixed), with its frames: someone without the key
    forged = bytearray(newest)
    forged[48:64] = os.urandom(16)
    wctest.fix_header_crc(forged)
    planted["forged-key"] = os.path.join(wal, f"{last_id + 2:016x}-{last_base:016x}.wal")
    forged[32:40] = (last_id + 2).to_bytes(8, "little")
    wctest.fix_header_crc(forged)
    _plant("", planted["forged-key"], bytes(forged))
    # our header with garbage frames
    planted["garbage"] = os.path.join(wal, f"{last_id + 3:016x}-{N + 1:016x}.wal")
    g = bytearray(newest[:128])
    g[32:40] = (last_id + 3).to_bytes(8, "little")
    g[40:48] = (N + 1).to_bytes(8, "little")
    wctest.fix_header_crc(g)
    _plant("", planted["garbage"], bytes(g) + os.urandom(2048))
    # a plaintext (algorithm NONE) copy of a frame-less header
    plain = bytearray(g)
    plain[12] = fmt.ALG_NONE
    plain[32:40] = (last_id + 4).to_bytes(8, "little")
    wctest.fix_header_crc(plain)
    planted["plaintext"] = os.path.join(wal, f"{last_id + 4:016x}-{N + 1:016x}.wal")
    _plant("", planted["plaintext"], bytes(plain))
    # a snapshot of a store under another KEK, named as our next snapshot
    sfile = glob.glob(os.path.join(stranger, SNAPDIR, "*.snap"))[0]
    planted["stranger-snap"] = os.path.join(snapdir, "0000000000000009" + os.path.basename(sfile)[16:])
    s = bytearray(wctest.read(sfile))
    s[16:24] = (9).to_bytes(8, "little")
    from crc32c import crc32c
    s[124:128] = crc32c(bytes(s[:124])).to_bytes(4, "little")
    _plant("", planted["stranger-snap"], bytes(s))

    plan = recover(root, KEK)
    adopted = {os.path.join(wal, x["file"]) for x in plan["segments"]}
    assert adopted == {os.path.join(wal, n) for n in ours}
    aside = {a["file"]: a["reason"] for a in plan["set_aside"]}
    for what, p in planted.items():
        assert p in aside, f"{what} was not reported"
    assert "another store" in aside[planted["foreign"]]
    assert "no readable snapshot carries" in aside[planted["forged-key"]]
    assert "another KEK" in aside[planted["stranger-snap"]]
    assert [x["id"] for x in plan["snapshots"]] == [1]
    recover(root, KEK, apply=True)
    assert _open_served(root)["entries"] == served["entries"]
    for p in planted.values():
        assert not os.path.exists(p) and os.path.exists(p + ".unlisted")      # set aside, never deleted


def test_two_stores_ambiguity_refused_until_chosen(store, tmp_path):
    root, served = store
    other = _other_store(tmp_path, KEK, "other")
    with walcrypt.open(root, kek=KEK, read_only=True) as s:
        ours = s.store_id
    shutil.rmtree(os.path.join(root, "meta"))
    with walcrypt.open(other, kek=KEK) as s:                     # a second snapshot of the other store, ID 7
        s.save_snapshot(SnapshotMeta(N, s.term(N), ConfState((1,))), b"other state")
        path = s.snapshot().info.path
    mine = [int(n[:16], 16) for n in os.listdir(os.path.join(root, SNAPDIR))]
    name = os.path.basename(path)
    assert int(name[:16], 16) not in mine
    shutil.copy(path, os.path.join(root, SNAPDIR, name))
    before = _tree(root)
    plan = recover(root, KEK)
    assert not plan["can_apply"] and "several stores" in plan["refused"][0]
    assert _tree(root) == before
    plan = recover(root, KEK, store_id=ours)
    assert plan["can_apply"] and plan["store_id"] == ours.hex()
    assert os.path.join(root, SNAPDIR, name) in {a["file"] for a in plan["set_aside"]}
    recover(root, KEK, apply=True, store_id=ours)
    assert _open_served(root) == served


# ---------------------------------------------------------------------------------------------
# The command surface
# ---------------------------------------------------------------------------------------------

def _cli(*args, env=None) -> subprocess.CompletedProcess:
    e = wctest.child_env()
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "walcrypt.cli", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=wctest.REPO_ROOT, timeout=180)


def _keyfile(path: str, key: bytes) -> str:
    with open(path, "w") as f:
        f.write(key.hex())
    os.chmod(path, 0o600)
    return path


def _dump(root: str, keyfile: str) -> dict:
    res = _cli("dump", root, "--key-file", keyfile, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_cli_recover(store, tmp_path):
    root, served = store
    k = _keyfile(str(tmp_path / "kek"), wctest.KEK_BYTES)
    want = _dump(root, k)
    with open(os.path.join(root, "meta", "data.mdb"), "r+b") as f:
        f.write(b"\0" * 4096)                                    # LMDB's meta pages gone
    res = _cli("dump", root, "--key-file", k)
    assert res.returncode != 0 and "walcrypt recover" in res.stderr + res.stdout
    before = _tree(root)
    res = _cli("recover", root, "--key-file", k)
    assert res.returncode == 0 and "dry run" in res.stderr + res.stdout, res.stdout + res.stderr
    assert f"entries {SNAP + 1}..{N}" in res.stdout and "cannot be recovered: the stable store" in res.stdout
    assert "removeNodeFromCluster" in res.stdout
    assert _tree(root) == before
    res = _cli("recover", root, "--key-file", k, "--json")
    assert json.loads(res.stdout)["can_apply"]
    res = _cli("recover", root, "--key-file", k, "--apply")
    assert res.returncode == 0 and "rebuilt" in res.stdout, res.stdout + res.stderr
    assert _dump(root, k) == want
    assert _cli("verify", root, "--key-file", k).returncode == 0
    res = _cli("recover", root, "--key-file", k)
    assert res.returncode == 2 and "nothing to recover" in res.stderr


def test_cli_recover_refusal_exits_1_and_changes_nothing(store, tmp_path):
    root, _served = store
    k = _keyfile(str(tmp_path / "kek-b"), bytes(range(32)))
    shutil.rmtree(os.path.join(root, "meta"))
    before = _tree(root)
    res = _cli("recover", root, "--key-file", k, "--apply")
    assert res.returncode == 1 and "REFUSED" in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert _tree(root) == before


def test_cli_restore_a_raw_snap_file(store, tmp_path):
    root, served = store
    k = _keyfile(str(tmp_path / "kek"), wctest.KEK_BYTES)
    snap = glob.glob(os.path.join(root, SNAPDIR, "*.snap"))[0]
    new = str(tmp_path / "restored")
    res = _cli("snapshot", "restore", snap, new, "--key-file", k)
    assert res.returncode == 0, res.stdout + res.stderr
    with walcrypt.open(new, kek=KeyFile(k)) as s:
        assert (s.snapshot().meta, s.snapshot().data) == served["snapshot"]
        assert s.first_index() == SNAP + 1
    wrong = _keyfile(str(tmp_path / "b"), bytes(32))
    res = _cli("snapshot", "restore", snap, str(tmp_path / "r2"), "--key-file", wrong)
    assert res.returncode == 2 and not os.path.exists(str(tmp_path / "r2"))


def test_cli_one_step_restore_under_the_target_nodes_kek(store, tmp_path):
    root, served = store
    k1 = _keyfile(str(tmp_path / "node1.kek"), wctest.KEK_BYTES)
    k3 = _keyfile(str(tmp_path / "node3.kek"), bytes(range(100, 132)))
    export = str(tmp_path / "node1.wcx")
    assert _cli("snapshot", "export", root, export, "--key-file", k1).returncode == 0
    node3 = str(tmp_path / "node3")
    res = _cli("snapshot", "restore", export, node3, "--key-file", k1, "--new-key-file", k3)
    assert res.returncode == 0 and "new KEK" in res.stdout, res.stdout + res.stderr
    with walcrypt.open(node3, kek=KeyFile(k3)) as s:
        assert (s.snapshot().meta, s.snapshot().data) == served["snapshot"]
        node3_snap = s.snapshot().info.path
    with pytest.raises(WrongKeyError):
        walcrypt.open(node3, kek=KeyFile(k1))
    # the restored snapshot's own bundle is wrapped under node 3's KEK only
    assert _cli("snapshot", "inspect", node3_snap, "--key-file", k3).returncode == 0
    assert _cli("snapshot", "inspect", node3_snap, "--key-file", k1).returncode == 2
    # a raw .snap of node 1 onto node 4 in one step as well
    node4 = str(tmp_path / "node4")
    snap = glob.glob(os.path.join(root, SNAPDIR, "*.snap"))[0]
    assert _cli("snapshot", "restore", snap, node4, "--key-file", k1, "--new-key-file", k3).returncode == 0
    with walcrypt.open(node4, kek=KeyFile(k3)) as s:
        assert s.snapshot().data == served["snapshot"][1]


def test_cli_plaintext_export_is_restored_only_with_plaintext(tmp_path):
    src = str(tmp_path / "plain")
    with walcrypt.open(src, encrypted=False, segment_size=SEG) as s:
        s.save(hard_state=HardState(1, 1, 10), entries=_entries(1, 10, term=lambda i: 1))
        s.save_snapshot(SnapshotMeta(10, 1, ConfState((1,))), b"plain state")
        s.export_snapshot(str(tmp_path / "plain.wcx"))
    k3 = _keyfile(str(tmp_path / "node3.kek"), bytes(range(100, 132)))
    export = str(tmp_path / "plain.wcx")
    for args in ([], ["--key-file", k3], ["--new-key-file", k3]):
        res = _cli("snapshot", "restore", export, str(tmp_path / "x"), *args)
        assert res.returncode == 1 and "plaintext" in res.stderr, res.stderr
        assert not os.path.exists(str(tmp_path / "x"))
    res = _cli("snapshot", "restore", export, str(tmp_path / "p"), "--plaintext")
    assert res.returncode == 0
    with walcrypt.open(str(tmp_path / "p"), encrypted=False) as s:
        assert s.snapshot().data == b"plain state"
    res = _cli("snapshot", "restore", export, str(tmp_path / "e"), "--plaintext", "--new-key-file", k3)
    assert res.returncode == 0 and "new KEK" in res.stdout
    with walcrypt.open(str(tmp_path / "e"), kek=KeyFile(k3)) as s:
        assert s.snapshot().data == b"plain state"


def test_restore_export_api_under_a_new_kek(store, tmp_path):
    root, served = store
    export = str(tmp_path / "n1.wcx")
    with walcrypt.open(root, kek=KEK, read_only=True) as s:
        s.export_snapshot(export)
    res = backup.restore_export(export, str(tmp_path / "n3"), kek=KEK, new_kek=KEK_B)
    assert res["encrypted"] and res["index"] == SNAP
    with walcrypt.open(str(tmp_path / "n3"), kek=KEK_B) as s:
        assert (s.snapshot().meta, s.snapshot().data) == served["snapshot"]
    with pytest.raises(UsageError):
        backup.restore_export(export, str(tmp_path / "n4"), kek=KEK, new_kek=b"not a kek")


def test_recover_after_a_completed_dek_rotation(tmp_path):
    """The keys of older segments went with their snapshots: those segments cannot be read and hold
    nothing above the newest snapshot, so the rebuilt log is the same."""
    root = str(tmp_path / "node1")

    def source(st):
        i = st.last_index()
        return SnapshotMeta(i, st.term(i), ConfState((1,))), b"state at %d" % i

    with walcrypt.open(root, kek=KEK, segment_size=SEG, sync="none", snapshot_source=source) as s:
        for lo in range(1, 201, 10):
            s.save(hard_state=HardState(2, 1, lo + 9), entries=_entries(lo, lo + 9))
        s.save_snapshot(SnapshotMeta(100, s.term(100), ConfState((1,))), b"state at 100")
        old = s.active_key_id()
        s.rotate_dek()                                  # completes through the source: snapshot at 200
        assert not s.needs_snapshot and s.active_key_id() != old
        for lo in range(201, 301, 10):
            s.save(hard_state=HardState(3, 1, lo + 9), entries=_entries(lo, lo + 9))
        served = _served(s)
        new = s.active_key_id()
    shutil.rmtree(os.path.join(root, "meta"))
    plan = recover(root, KEK)
    assert plan["can_apply"] and [k["key_id"] for k in plan["keys"] if k["state"] == "active"] == [new.hex()]
    recover(root, KEK, apply=True)
    got = _open_served(root)
    assert got == served
    with walcrypt.open(root, kek=KEK) as s:
        assert s.active_key_id() == new


def test_recover_a_crashed_store_with_a_torn_tail(tmp_path):
    """A copy taken while the store was open is what a crash leaves: the newest segment unsealed.  A
    torn write after its last commit is cut by the first open of the rebuilt store (a .broken copy kept)."""
    src = str(tmp_path / "running")
    root = str(tmp_path / "node1")
    with walcrypt.open(src, kek=KEK, segment_size=SEG, sync="always") as s:
        for lo in range(1, 201, 10):
            s.save(hard_state=HardState(2, 1, lo + 9), entries=_entries(lo, lo + 9))
            if lo == 91:
                s.save_snapshot(SnapshotMeta(100, s.term(100), ConfState((1,))), b"state at 100")
                s.compact(100)
        served = _served(s)
        shutil.copytree(src, root)
    shutil.rmtree(os.path.join(root, "meta"))
    newest = sorted(glob.glob(os.path.join(root, ENC, "*.wal")))[-1]
    frames = wctest.parse_frames(wctest.read(newest))
    end = frames[-1].next
    with open(newest, "r+b") as f:
        f.seek(end)
        f.write(os.urandom(300))                          # a torn unit after the last commit
    plan = recover(root, KEK)
    assert plan["can_apply"] and any("torn tail" in n for n in plan["notes"])
    assert not plan["segments"][-1]["sealed"]
    recover(root, KEK, apply=True)
    assert _open_served(root) == served
    assert os.path.exists(newest + ".broken")
    assert check(root, kek=KEK).ok
