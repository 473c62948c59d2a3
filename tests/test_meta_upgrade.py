"""Stores written under older metadata format versions (1 and 2) open, and are upgraded to the
current one by their first read-write open; no record of their older past verifies afterwards.

An older store is made here from a current one by rewriting its ``meta/`` the way the older
version laid it out (FORMAT.md 9.1 and 17): every MAC'd value re-MAC'd without the version 3
domain tag, ``store/format_version`` set back and, for version 1, the compaction record cut to
24 bytes and the creation-intent and purge records removed.
"""

from __future__ import annotations

import os
import shutil

import lmdb
import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta
from walcrypt import format as fmt
from walcrypt import meta as M
from walcrypt.check import check
from walcrypt.errors import AuthenticationError, WalcryptError

import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
CS = ConfState(voters=(1, 2, 3))


def _ents(lo, hi, term=1):
    return [Entry(i, term, b"entry %d " % i + bytes(range(i % 50))) for i in range(lo, hi)]


def _make_store(data_dir: str, encrypted: bool) -> bytes | None:
    """A store with entries, a snapshot, stable values and a sealed segment; returns its MAC key."""
    opts = dict(kek=KEK) if encrypted else dict(encrypted=False)
    with walcrypt.open(data_dir, segment_size=4096, **opts) as s:
        s.save(HardState(2, 1, 5), _ents(1, 30))
        s.stable_set(b"CurrentTerm", b"2")
        s.save_snapshot(SnapshotMeta(10, 1, CS), b"state machine at 10")
        s.save(None, _ents(30, 35, 2))
        return s.meta.mac_key


def _stored_version(data_dir: str) -> int:
    env = lmdb.open(os.path.join(data_dir, "meta"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return txn.get(M.K_FORMAT_VERSION, db=env.open_db(M.DB_STORE, txn=txn))[0]
    finally:
        env.close()


def _open(data_dir, encrypted, **kw):
    return walcrypt.open(data_dir, **(dict(kek=KEK) if encrypted else dict(encrypted=False)), **kw)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plaintext"])
@pytest.mark.parametrize("version", [1, 2])
def test_an_older_store_is_read_then_upgraded_with_everything_intact(tmp_path, version, encrypted):
    data_dir = str(tmp_path / "data")
    mac_key = _make_store(data_dir, encrypted)
    wctest.rewrite_meta_as(data_dir, mac_key, version)
    assert check(data_dir, kek=KEK if encrypted else None).ok
    with _open(data_dir, encrypted, read_only=True) as s:          # read as it is, not upgraded
        assert s.last_index() == 34 and s.snapshot().data == b"state machine at 10"
    assert _stored_version(data_dir) == version
    with _open(data_dir, encrypted) as s:                          # the first read-write open upgrades
        assert s.entries(11, 35) == _ents(11, 30) + _ents(30, 35, 2)
        assert s.stable_get(b"CurrentTerm") == b"2"
        s.save(HardState(3, 3, 34), _ents(35, 40, 3))
    assert _stored_version(data_dir) == fmt.META_FORMAT_VERSION
    assert check(data_dir, kek=KEK if encrypted else None).ok
    with _open(data_dir, encrypted) as s:
        assert s.last_index() == 39 and s.initial_state()[0] == HardState(3, 3, 34)
        assert s.snapshot().data == b"state machine at 10"


@pytest.mark.parametrize("version", [1, 2])
def test_no_record_of_the_older_past_verifies_after_the_upgrade(tmp_path, version):
    """Every MAC'd record of a copy of ``meta/`` taken before the upgrade, put back alone into the
    upgraded store, fails its MAC: a replay from before the upgrade cannot pass as current."""
    data_dir = str(tmp_path / "data")
    mac_key = _make_store(data_dir, True)
    wctest.rewrite_meta_as(data_dir, mac_key, version)
    before = str(tmp_path / "meta-before")
    shutil.copytree(os.path.join(data_dir, "meta"), before)
    _open(data_dir, True).close()
    assert _stored_version(data_dir) == fmt.META_FORMAT_VERSION
    old_env = lmdb.open(before, max_dbs=8, readonly=True, lock=False)
    try:
        with old_env.begin() as txn:
            old = {(db, bytes(k)): bytes(v) for db in M.CATALOG_DBS
                   for k, v in txn.cursor(db=old_env.open_db(db, txn=txn))}
    finally:
        old_env.close()
    assert len(old) >= 6
    for (db, key), stored in sorted(old.items()):
        work = str(tmp_path / "work")
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(data_dir, work)
        env = lmdb.open(os.path.join(work, "meta"), max_dbs=8)
        try:
            with env.begin(write=True) as txn:
                current = txn.get(key, db=env.open_db(db, txn=txn))
                txn.put(key, stored, db=env.open_db(db, txn=txn))
        finally:
            env.close()
        if current is not None and bytes(current) == stored:
            continue                              # (none expected: every MAC changed)
        with pytest.raises(WalcryptError):
            with _open(work, True) as s:
                s.stable_get(b"CurrentTerm")
                s.entries(s.first_index(), s.last_index() + 1)
        assert not check(work, kek=KEK).ok, f"{db.decode()}/{key!r} from before the upgrade passed"


def test_an_interrupted_upgrade_leaves_the_older_version_whole(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "data")
    mac_key = _make_store(data_dir, True)
    wctest.rewrite_meta_as(data_dir, mac_key, 1)
    real_put = M.WriteTxn.put_raw

    def interrupted(self, db, key, value):
        if db == M.DB_STORE and key == M.K_FORMAT_VERSION:
            raise KeyboardInterrupt
        return real_put(self, db, key, value)

    monkeypatch.setattr(M.WriteTxn, "put_raw", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _open(data_dir, True)
    monkeypatch.setattr(M.WriteTxn, "put_raw", real_put)
    assert _stored_version(data_dir) == 1
    with _open(data_dir, True) as s:
        assert s.last_index() == 34
    assert _stored_version(data_dir) == fmt.META_FORMAT_VERSION


def test_a_24_byte_compaction_record_is_refused_in_a_current_store(tmp_path):
    data_dir = str(tmp_path / "data")
    mac_key = _make_store(data_dir, True)
    env = lmdb.open(os.path.join(data_dir, "meta"), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            state = env.open_db(M.DB_STATE, txn=txn)
            value = bytes(txn.get(M.K_COMPACTED, db=state))[:24]
            txn.put(M.K_COMPACTED, value + M.keyed_mac(mac_key, M.DB_STATE, M.K_COMPACTED, value), db=state)
    finally:
        env.close()
    with pytest.raises(AuthenticationError, match="catalog"):
        _open(data_dir, True)
