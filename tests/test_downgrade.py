"""No downgrade without the KEK: an attacker who can write the data directory (or the backup
store) but holds no key must not get walcrypt to serve, verify or restore data the KEK does not
vouch for, nor to write anything in clear.

Each case is what such an attacker can do with files alone: plant a plaintext store's ``meta/``
and ``wal-v1/`` over an encrypted store, edit the unauthenticated ``store`` table of LMDB, or put
a plaintext export where an encrypted backup was.  Every case runs the library and the CLI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import lmdb
import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta
from walcrypt import backup, crypto
from walcrypt.check import check
from walcrypt import format as fmt
from walcrypt.errors import AuthenticationError, StorageError, UsageError

import wctest

REPO = wctest.REPO_ROOT
SECRET = b"GENUINE-SECRET-7d1e0c"
FORGED = b"FORGED-BY-ATTACKER-55aa"
OPTS = dict(segment_size=8192, snapshot_chunk_size=4096)
CS = ConfState(voters=(1, 2, 3))


def _digest_tree(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _all_bytes(root: str) -> bytes:
    parts = []
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            with open(os.path.join(dirpath, n), "rb") as f:
                parts.append(f.read())
    return b"".join(parts)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCRYPT_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "walcrypt.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)


@pytest.fixture
def key_file(tmp_path) -> str:
    p = str(tmp_path / "kek")
    with open(p, "w") as f:
        f.write(wctest.KEK_BYTES.hex())
    os.chmod(p, 0o600)
    return p


def _genuine(path: str, kek) -> None:
    with walcrypt.open(path, kek=kek, **OPTS) as s:
        s.save(hard_state=HardState(3, 1, 20), entries=[Entry(i, 3, SECRET + bytes([i])) for i in range(1, 41)])
        s.save_snapshot(SnapshotMeta(20, 3, CS), SECRET * 100)
        s.stable_set(b"CurrentTerm", b"3")


def _forged_plaintext(path: str) -> None:
    with walcrypt.open(path, encrypted=False, **OPTS) as s:
        s.save(hard_state=HardState(99, 7, 50), entries=[Entry(i, 99, FORGED) for i in range(1, 51)])
        s.save_snapshot(SnapshotMeta(50, 99, CS), FORGED * 100)
        s.stable_set(b"CurrentTerm", b"99")


# ---------------------------------------------------------------------------------------------
# Finding 2: plaintext metadata and data planted over an encrypted store
# ---------------------------------------------------------------------------------------------

def test_planted_plaintext_store_is_not_adopted(tmp_path, kek, key_file):
    victim, forged = str(tmp_path / "victim"), str(tmp_path / "forged")
    _genuine(victim, kek)
    _forged_plaintext(forged)
    shutil.rmtree(os.path.join(victim, "meta"))
    for d in ("meta", "wal-v1", "snap-v1"):
        shutil.copytree(os.path.join(forged, d), os.path.join(victim, d))
    encrypted_before = {p: h for p, h in _digest_tree(victim).items() if "-encrypted" in p}
    assert encrypted_before

    with pytest.raises(UsageError, match="never adopts plaintext data"):
        walcrypt.open(victim, kek=kek, **OPTS)
    with pytest.raises(UsageError, match="plaintext store, but a key was given"):
        check(victim, kek=kek)
    for args in (["verify", victim], ["dump", victim], ["repair", victim]):
        res = _cli(*args, "--key-file", key_file)
        assert res.returncode != 0, (args, res.stdout, res.stderr)
        assert "plaintext store, but a key was given" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and FORGED.decode() not in res.stdout

    # The genuine encrypted data is untouched: nothing deleted, nothing rewritten.
    assert {p: h for p, h in _digest_tree(victim).items() if "-encrypted" in p} == encrypted_before


def test_migration_needs_migrate_true_and_keeps_what_it_replaces(tmp_path, kek):
    """An explicit migration of a plaintext store still never deletes an encrypted directory it
    finds beside it (left by an earlier life of the store, or planted): it is set aside."""
    d = str(tmp_path / "store")
    _forged_plaintext(d)
    in_the_way = os.path.join(d, "wal-v1-encrypted")
    os.mkdir(in_the_way)
    with open(os.path.join(in_the_way, "0000000000000001-0000000000000001.wal"), "wb") as f:
        f.write(b"an earlier life of this store")
    with pytest.raises(UsageError, match="migrate=True"):
        walcrypt.open(d, kek=kek, **OPTS)
    with walcrypt.open(d, kek=kek, migrate=True, **OPTS) as s:
        assert s.encrypted and s.entries(1, 2)[0].data == FORGED
    aside = [n for n in os.listdir(d) if n.startswith("wal-v1-encrypted.replaced-")]
    assert len(aside) == 1, os.listdir(d)
    with open(os.path.join(d, aside[0], "0000000000000001-0000000000000001.wal"), "rb") as f:
        assert f.read() == b"an earlier life of this store"
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        assert s.entries(1, 2)[0].data == FORGED


# ---------------------------------------------------------------------------------------------
# Finding 3: the unauthenticated store table
# ---------------------------------------------------------------------------------------------

def _set_store_record(path: str, key: bytes, value: bytes) -> None:
    env = lmdb.open(os.path.join(path, "meta"), max_dbs=8, subdir=True)
    try:
        db = env.open_db(b"store")
        with env.begin(write=True) as txn:
            txn.put(key, value, db=db)
    finally:
        env.close()


@pytest.mark.parametrize("alg", [fmt.ALG_NONE, crypto.suite_by_name("chacha20-poly1305").alg_id, 77])
def test_edited_algorithm_record_is_refused(tmp_path, kek, key_file, marker, alg):
    d = str(tmp_path / "store")
    _genuine(d, kek)
    _set_store_record(d, b"algorithm", bytes([alg]))
    try:
        s = walcrypt.open(d, kek=kek, **OPTS)
    except StorageError as exc:
        assert isinstance(exc, (AuthenticationError, walcrypt.errors.UnsupportedFormatError)), exc
    else:  # the audit's finding: the store opened and sealed stable values under NONE, in clear
        try:
            s.stable_set(b"k", marker.encode())
        finally:
            s.close()
        pytest.fail("an encrypted store opened with an edited algorithm record")
    assert marker.encode() not in _all_bytes(d)
    res = _cli("verify", d, "--key-file", key_file)
    assert res.returncode == 1 and "Traceback" not in res.stderr, (res.stdout, res.stderr)
    assert "OK" not in res.stdout.splitlines()[-1:]


def test_plaintext_keyring_entry_is_refused(tmp_path, kek):
    """A data key whose (authenticated) record names NONE cannot come from walcrypt: the record is
    rewritten here through the store's own metadata key, as a faulty writer would."""
    from walcrypt import meta as M
    d = str(tmp_path / "store")
    _genuine(d, kek)
    with walcrypt.open(d, kek=kek, **OPTS) as s:
        entry = s.keys[s.active_key_id()]
        entry.algorithm = fmt.ALG_NONE
        with s.meta.write() as w:
            w.put(M.DB_KEYRING, entry.key_id, M.encode_keyring(entry))
    with pytest.raises(AuthenticationError, match="NONE"):
        walcrypt.open(d, kek=kek, **OPTS)


# ---------------------------------------------------------------------------------------------
# Finding 2: a plaintext export where an encrypted backup was
# ---------------------------------------------------------------------------------------------

def test_plaintext_export_is_refused_when_a_key_is_given(tmp_path, kek, key_file):
    genuine, forged = str(tmp_path / "genuine"), str(tmp_path / "forged")
    _genuine(genuine, kek)
    _forged_plaintext(forged)
    backup_path = str(tmp_path / "node1.wcx")
    with walcrypt.open(genuine, kek=kek, **OPTS) as s:
        s.export_snapshot(backup_path)
    assert backup.inspect_export(backup_path, kek=kek)["verified"]
    os.unlink(backup_path)
    with walcrypt.open(forged, encrypted=False, **OPTS) as s:     # the attacker's swap
        s.export_snapshot(backup_path)

    with pytest.raises(AuthenticationError, match="plaintext export"):
        backup.inspect_export(backup_path, kek=kek)
    target = str(tmp_path / "restored")
    with pytest.raises(AuthenticationError, match="plaintext export"):
        backup.restore_export(backup_path, target, kek=kek)
    assert not os.path.exists(target) or not os.listdir(target)

    res = _cli("snapshot", "inspect", backup_path, "--key-file", key_file)
    assert res.returncode == 1 and "authenticated  yes" not in res.stdout, (res.stdout, res.stderr)
    assert "plaintext export" in res.stderr and "Traceback" not in res.stderr
    res = _cli("snapshot", "inspect", backup_path)
    assert res.returncode == 0 and "authenticated  NO" in res.stdout, (res.stdout, res.stderr)
    res = _cli("snapshot", "restore", backup_path, target, "--key-file", key_file)
    assert res.returncode == 1 and "plaintext export" in res.stderr, (res.stdout, res.stderr)
    assert not os.path.exists(target) or not os.listdir(target)
    res = _cli("snapshot", "restore", backup_path, target)
    assert res.returncode == 1 and "plaintext export" in res.stderr, (res.stdout, res.stderr)

    # Asked for explicitly, a plaintext export is usable (and still never called authenticated).
    res = _cli("snapshot", "inspect", backup_path, "--plaintext")
    assert res.returncode == 0 and "checked for damage only" in res.stdout, (res.stdout, res.stderr)
    res = _cli("snapshot", "restore", backup_path, target, "--plaintext")
    assert res.returncode == 0, (res.stdout, res.stderr)
    with walcrypt.open(target, encrypted=False) as s:
        assert s.snapshot().data == FORGED * 100


def test_raw_plaintext_snapshot_file_is_refused_when_a_key_is_given(tmp_path, key_file):
    forged = str(tmp_path / "forged")
    _forged_plaintext(forged)
    snap_dir = os.path.join(forged, "snap-v1")
    snap = os.path.join(snap_dir, sorted(n for n in os.listdir(snap_dir) if n.endswith(".snap"))[-1])
    res = _cli("snapshot", "inspect", snap, "--key-file", key_file)
    assert res.returncode == 1 and "plaintext" in res.stderr and "authenticated  yes" not in res.stdout
