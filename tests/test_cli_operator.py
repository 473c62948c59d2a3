"""What an operator meets at the command line: damage reported as damage, which key a store needs,
JSON errors for scripts, key-file modes as services deploy them, and the small things around them.

Like ``test_cli.py`` (whose helpers this module uses), every command runs as a real subprocess
(``python -m walcrypt.cli``) against a real store built with the public API, and read-only
commands are checked to leave the store byte for byte unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import lmdb
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import walcrypt
from walcrypt import ConfState, Entry, HardState, KeyFile, SnapshotMeta

from test_cli import (CHUNK, ENC_WAL, REPO, SEG, Unchanged, _env, _flip_sealed_frame, build, data, keys,  # noqa: F401
                      ok, one_line_error, pristine, segments, snap_bytes, snapshot_files, wc)

ERROR_KEYS = {"kind", "type", "message", "hint", "path", "exit_code"}


@pytest.fixture
def store(pristine, tmp_path) -> str:
    dst = str(tmp_path / "store")
    shutil.copytree(pristine, dst)
    return dst


def json_error(res: subprocess.CompletedProcess, code: int, kind: str, *words: str) -> dict:
    """--json and an error: stdout is exactly the error object, stderr the usual one line."""
    one_line_error(res, code)
    doc = json.loads(res.stdout)
    assert set(doc) == {"error"} and set(doc["error"]) == ERROR_KEYS, doc
    err = doc["error"]
    assert err["exit_code"] == code and err["kind"] == kind, err
    for w in words:
        assert w.lower() in (err["message"] + " " + (err["hint"] or "")).lower(), (w, err)
    return err


# ---------------------------------------------------------------------------
# 6. Damaged or missing metadata is damage: exit 1, what is damaged, what to do
# ---------------------------------------------------------------------------

def _drop_meta(root):
    shutil.rmtree(os.path.join(root, "meta"))


def _drop_data_mdb(root):
    os.unlink(os.path.join(root, "meta", "data.mdb"))


def _truncate_data_mdb(root):
    os.truncate(os.path.join(root, "meta", "data.mdb"), 100)


def _garbage_data_mdb(root):
    with open(os.path.join(root, "meta", "data.mdb"), "r+b") as f:
        f.write(os.urandom(8192))


def _corrupt_lmdb_pages(root):
    """Every page past the two meta pages gets a page type LMDB does not know: MDB_CORRUPTED."""
    p = os.path.join(root, "meta", "data.mdb")
    with open(p, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        for pg in range(2, size // 4096):
            f.seek(pg * 4096 + 10)
            f.write(struct.pack("<H", 0x40))


def _drop_table(root):
    env = lmdb.open(os.path.join(root, "meta"), max_dbs=8)
    with env.begin(write=True) as t:
        t.drop(env.open_db(b"keyring", txn=t), delete=True)
    env.close()


def _empty_store_table(root):
    env = lmdb.open(os.path.join(root, "meta"), max_dbs=8)
    with env.begin(write=True) as t:
        t.drop(env.open_db(b"store", txn=t), delete=False)
    env.close()


def _bad_mode_byte(root):
    env = lmdb.open(os.path.join(root, "meta"), max_dbs=8)
    with env.begin(write=True) as t:
        t.put(b"encrypted", b"\x07", db=env.open_db(b"store", txn=t))
    env.close()


DAMAGE = [
    # name, damage(root), words the one line must hold
    ("meta-missing", _drop_meta, ["meta/", "missing", "segment files in wal-v1-encrypted/", "put back"]),
    ("data-mdb-missing", _drop_data_mdb, ["data.mdb is missing", "put back"]),
    ("data-mdb-truncated", _truncate_data_mdb, ["not an LMDB database", "restore"]),
    ("data-mdb-garbage", _garbage_data_mdb, ["not an LMDB database", "restore"]),
    ("lmdb-page-corrupted", _corrupt_lmdb_pages, ["damaged", "MDB_CORRUPTED", "restore"]),
    ("table-missing", _drop_table, ["lacks the walcrypt table(s) keyring", "restore"]),
    ("store-record-missing", _empty_store_table, ["no store record", "segments or snapshots", "put back"]),
    ("store-record-damaged", _bad_mode_byte, ["store identity record", "damaged"]),
]
COMMANDS = [
    ["inspect"], ["verify", "KEY"], ["dump", "KEY"], ["repair", "KEY"], ["rotate-dek", "KEY"],
    ["snapshot", "export", "DIR", "OUT", "KEY"], ["migrate", "--to", "plaintext", "--yes", "KEY"],
]


def _argv(cmd, root, keys, out):
    argv = []
    for a in cmd:
        argv += {"KEY": ["--key-file", keys["kek"]], "DIR": [root], "OUT": [out]}.get(a, [a])
    return argv if "DIR" in cmd else [argv[0], root] + argv[1:]


@pytest.mark.parametrize("name,damage,words", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_metadata_is_exit_1_and_says_what_to_do(store, keys, tmp_path, name, damage, words):
    damage(store)
    for cmd in COMMANDS:
        argv = _argv(cmd, store, keys, str(tmp_path / "out.wcx"))
        with Unchanged(store):
            line = one_line_error(wc(*argv), 1, *words)
        assert "not a walcrypt data directory" not in line, (argv, line)
    err = json_error(wc("inspect", store, "--json"), 1, "damaged", *words)
    assert err["path"] and err["hint"]


def test_a_directory_without_walcrypt_files_is_not_a_data_directory(store, keys, tmp_path):
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    for d in (empty, other):
        one_line_error(wc("inspect", d), 2, "not a walcrypt data directory")
        one_line_error(wc("verify", d, "--key-file", keys["kek"]), 2, "not a walcrypt data directory")
    # the segment directory itself: pointed at its parent
    one_line_error(wc("verify", os.path.join(store, ENC_WAL), "--key-file", keys["kek"]), 2,
                   "not a walcrypt data directory", "give the data directory above it")


def test_a_store_whose_creation_never_committed(tmp_path, keys):
    """LOCK alone, or a metadata database without a store record and no data: damage that says nothing
    was stored yet and how to start over - not 'not a data directory'."""
    lock_only = tmp_path / "lock-only"
    lock_only.mkdir()
    (lock_only / "LOCK").write_bytes(b"")
    one_line_error(wc("inspect", lock_only), 1, "meta/ is missing", "holds no data", "walcrypt init")
    no_record = str(tmp_path / "no-record")
    build(no_record, keys["kek"], batches=1, snapshot_at=None)
    for d in ("wal-v1-encrypted", "snap-v1-encrypted"):
        shutil.rmtree(os.path.join(no_record, d), ignore_errors=True)
    _empty_store_table(no_record)
    one_line_error(wc("inspect", no_record), 1, "no store record", "creation did not commit", "walcrypt init")


def test_lmdb_map_full_says_what_happened_and_what_to_do(tmp_path, keys):
    """MapFullError, met for real: the CLI run with a metadata map too small for a new store."""
    res = subprocess.run([sys.executable, "-c", "import walcrypt.meta as M; M.MAP_SIZE = 6 * 4096; "
                          "from walcrypt.cli import main; main()", "init", str(tmp_path / "s"), "--key-file",
                          keys["kek"]], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    one_line_error(res, 1, "metadata database", "is full", "nothing was committed", "snapshot export")


LMDB_ERRORS = [
    # LMDB error, walcrypt error class name, CLI kind, exit code, words of the advice
    (lmdb.InvalidError, "CorruptionError", "damaged", 1, ["not an LMDB database", "restore"]),
    (lmdb.CorruptedError, "CorruptionError", "damaged", 1, ["damaged", "restore"]),
    (lmdb.PageNotFoundError, "CorruptionError", "damaged", 1, ["damaged", "restore"]),
    (lmdb.VersionMismatchError, "UnsupportedFormatError", "unsupported", 1, ["another on-disk version"]),
    (lmdb.MapFullError, "StorageError", "storage", 1, ["is full", "nothing was committed", "snapshot export"]),
    (lmdb.ReadonlyError, "StorageError", "permission", 2, ["no permission", "read-only", "remount"]),
    (lmdb.DiskError, "StorageError", "storage", 1, ["no space left", "free space"]),
    (lmdb.LockError, "LockedError", "locked", 2, ["another process", "stop it first"]),
    (lmdb.ReadersFullError, "StorageError", "storage", 1, ["too many readers"]),
    (lmdb.MemoryError, "StorageError", "storage", 1, ["out of memory"]),
    (lmdb.InvalidParameterError, "StorageError", "storage", 1, ["local file system"]),
]


@pytest.mark.parametrize("lmdb_exc,wc_type,kind,code,words", LMDB_ERRORS, ids=[e[0].__name__ for e in LMDB_ERRORS])
def test_lmdb_error_translation_table(lmdb_exc, wc_type, kind, code, words):
    """Every LMDB error class the engine can meet becomes a walcrypt error with advice, and the CLI gives it
    the right kind and exit code.  (The classes met for real above - InvalidError, CorruptedError,
    MapFullError, a read-only mount - run through subprocesses; the rest cannot be provoked on demand.)"""
    from walcrypt import meta
    from walcrypt.cli import errors as cli
    exc = meta.lmdb_error(lmdb_exc("mdb_env_open", 0), "/data/meta", "opening")
    try:
        raise exc from lmdb_exc("mdb_env_open", 0)
    except Exception as e:           # noqa: BLE001 - the chained error, as the engine raises it
        chained = e
    assert type(chained).__name__ == wc_type
    assert cli.error_kind(chained) == kind and cli.exit_code_of(chained) == code
    for w in words:
        assert w in str(chained), (w, str(chained))


def _mount_tmpfs(path: str) -> None:
    os.makedirs(path)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", path], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")


def test_read_only_file_system(tmp_path, pristine, keys):
    """A store on a read-only mount: read-only commands work; read-write ones exit 2 saying so (not a
    'disk full' hint, not a half-done operation)."""
    mnt = str(tmp_path / "mnt")
    _mount_tmpfs(mnt)
    try:
        root = os.path.join(mnt, "store")
        shutil.copytree(pristine, root)
        assert subprocess.run(["mount", "-o", "remount,ro", mnt]).returncode == 0
        ok(wc("verify", root, "--key-file", keys["kek"]))
        ok(wc("inspect", root))
        for argv in (["rotate-dek", root], ["migrate", root, "--to", "plaintext", "--yes"],
                     ["rotate-kek", root, "--new-key-file", keys["kek2"]]):
            one_line_error(wc(*argv, "--key-file", keys["kek"]), 2, "read-only", "remount")
        json_error(wc("rotate-dek", root, "--key-file", keys["kek"], "--json"), 2, "permission", "read-only")
    finally:
        subprocess.run(["umount", mnt])


def test_verify_collapses_identical_findings(store, keys):
    """The same finding in many places is one entry with a count and its locations."""
    for seg in segments(store):
        shutil.copy(seg, seg + ".broken")
    n = len(segments(store))
    with Unchanged(store):
        res = ok(wc("verify", store, "--key-file", keys["kek"]))
        rep = json.loads(ok(wc("verify", store, "--key-file", keys["kek"], "--json")).stdout)
    assert res.stdout.count("copy of a segment kept by an earlier repair") == 1, res.stdout
    assert f"WARNING  {n} x copy of a segment kept by an earlier repair" in res.stdout
    assert f"and {n - 5} more (--json lists every one)" in res.stdout
    assert res.stdout.count("what to do: keep it for analysis") == 1
    assert len(rep["findings"]) == n                 # JSON keeps every finding


def _wal_files(root):
    return sorted(os.listdir(os.path.join(root, ENC_WAL)))


def test_verify_says_what_open_really_does_with_unlisted_files(tmp_path, keys):
    """Each leftover message names what the next read-write open does - and it does exactly that."""
    root = str(tmp_path / "s")
    opts = dict(segment_size=SEG, snapshot_chunk_size=CHUNK, sync="always", keep_snapshots=1)
    with walcrypt.open(root, kek=KeyFile(keys["kek"]), **opts) as s:
        for b in range(20):
            lo = b * 10 + 1
            s.save(hard_state=HardState(1, 1, lo + 9), entries=[Entry(i, 1, data(i)) for i in range(lo, lo + 10)])
        s.save_snapshot(SnapshotMeta(100, 1, ConfState((1,))), snap_bytes())
        first_snap = snapshot_files(root)[0]
        kept_snap = first_snap + ".keep"
        shutil.copy(first_snap, kept_snap)
        purged_seg = segments(root)[0]
        kept_seg = purged_seg + ".keep"
        shutil.copy(purged_seg, kept_seg)
        s.save_snapshot(SnapshotMeta(150, 1, ConfState((1,))), snap_bytes())    # retention drops the first
        s.compact(150)
        s.purge_segments()
    assert not os.path.exists(first_snap) and not os.path.exists(purged_seg)
    os.rename(kept_snap, first_snap)            # leftovers of a retention and a purge that were interrupted
    os.rename(kept_seg, purged_seg)
    other = build(str(tmp_path / "other"), keys["kek"], batches=3, snapshot_at=None)
    foreign = os.path.join(root, ENC_WAL, "00000000000000f0-0000000000000001.wal")
    shutil.copy(segments(other)[0], foreign)    # not this store's
    os.mkdir(os.path.join(root, ".migrate-wal"))  # no migration recorded

    with Unchanged(root):
        rep = json.loads(ok(wc("verify", root, "--key-file", keys["kek"], "--json")).stdout)
        text = ok(wc("verify", root, "--key-file", keys["kek"])).stdout
    by_path = {f["path"]: f for f in rep["findings"]}
    assert "the latest purge removed it" in by_path[purged_seg]["detail"]
    assert "the next read-write open deletes it" in by_path[purged_seg]["detail"]
    assert "the latest retention removed it" in by_path[first_snap]["detail"]
    assert "the next read-write open deletes it" in by_path[first_snap]["detail"]
    assert "not a segment of this store" in by_path[foreign]["detail"]
    assert "keeps it aside as 00000000000000f0-0000000000000001.wal.unlisted" in by_path[foreign]["detail"]
    mig = by_path[os.path.join(root, ".migrate-wal")]
    assert "no migration is recorded" in mig["detail"] and "leaves it alone" in mig["detail"]
    assert "OK (4 warning(s))" in text

    ok(wc("rotate-kek", root, "--key-file", keys["kek"], "--new-key-file", keys["kek2"]))     # a read-write open
    assert not os.path.exists(purged_seg) and not os.path.exists(first_snap)
    assert not os.path.exists(foreign) and os.path.exists(foreign + ".unlisted")
    assert os.path.isdir(os.path.join(root, ".migrate-wal"))
    after = json.loads(ok(wc("verify", root, "--key-file", keys["kek2"], "--json")).stdout)
    assert {f["path"]: f["detail"] for f in after["findings"]}[foreign + ".unlisted"].startswith(
        "file kept aside by an earlier open")


def test_verify_reports_an_unregistered_snapshot_open_refuses(store, keys):
    """A snapshot of this store that the registry lacks and the metadata does not name as a leftover:
    the read-write open refuses (it deletes nothing), so verify says so and exits 1 - it used to
    promise that the next open deletes the file."""
    src = snapshot_files(store)[0]
    planted = os.path.join(os.path.dirname(src), "0000000000000009" + os.path.basename(src)[16:])
    shutil.copy(src, planted)
    with Unchanged(store):
        res = ok(wc("verify", store, "--key-file", keys["kek"]), 1)
        one_line_error(wc("rotate-dek", store, "--key-file", keys["kek"]), 1, "snapshot 9 of this store",
                       "deleted nothing")
    assert "a read-write open refuses this store" in res.stdout and "deletes it" not in res.stdout


def test_verify_reports_a_segment_every_open_refuses(store, keys):
    src = segments(store)[2]
    planted = os.path.join(os.path.dirname(src), "0000000000000020" + os.path.basename(src)[16:])
    shutil.copy(src, planted)
    with Unchanged(store):
        res = ok(wc("verify", store, "--key-file", keys["kek"]), 1)
    assert "every open refuses this store" in res.stdout and "deletes it" not in res.stdout
    assert res.stdout.count("segment 32 of this store is not in the manifest") == 1, res.stdout


# ---------------------------------------------------------------------------
# 7. Which key does this need? The KEK fingerprint
# ---------------------------------------------------------------------------

def _fingerprint(kek: bytes) -> str:
    """FORMAT.md 8.1, computed independently of walcrypt."""
    check = HKDF(hashes.SHA256(), 16, None, b"walcrypt/v1/kek-check").derive(kek)
    return hashlib.sha256(b"walcrypt/v1/kek-fingerprint" + check).digest()[:8].hex()


def _key_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return base64.b64decode(f.read().strip())


def test_fingerprint_vector():
    """The worked example of FORMAT.md 8.1: the KEK 00 01 02 ... 1f."""
    kek = bytes(range(32))
    check = HKDF(hashes.SHA256(), 16, None, b"walcrypt/v1/kek-check").derive(kek)
    assert check.hex() == "30d85f3e7ecb61ff5ff0d346baaf8728"
    assert walcrypt.keys.kek_fingerprint(check) == "91159fc72957fe99"
    assert _fingerprint(kek) == walcrypt.keys.fingerprint_of(walcrypt.RawKey(kek)) == "91159fc72957fe99"
    with open(os.path.join(REPO, "formats", "FORMAT.md")) as f:
        spec = f.read()
    assert "`30d85f3e7ecb61ff5ff0d346baaf8728`" in spec and "`91159fc72957fe99`" in spec


def test_keygen_inspect_and_snapshot_inspect_show_the_fingerprint(store, keys, tmp_path):
    fp = _fingerprint(_key_bytes(keys["kek"]))
    new = str(tmp_path / "k3")
    res = ok(wc("keygen", new))
    assert f"fingerprint {_fingerprint(_key_bytes(new))}" in res.stdout
    assert json.loads(ok(wc("keygen", str(tmp_path / "k4"), "--json")).stdout)["fingerprint"] == \
        _fingerprint(_key_bytes(str(tmp_path / "k4")))
    assert ok(wc("key", "fingerprint", "--key-file", keys["kek"])).stdout.split()[0] == fp

    exp = str(tmp_path / "node.wcx")
    ok(wc("snapshot", "export", store, exp, "--key-file", keys["kek"]))
    with Unchanged(store), Unchanged(exp):
        assert f"KEK            file, fingerprint {fp}" in ok(wc("inspect", store)).stdout
        assert json.loads(ok(wc("inspect", store, "--json")).stdout)["kek"] == {"kind": "file", "fingerprint": fp}
        assert f"fingerprint {fp} (the key given matches)" in ok(wc("inspect", store, "--key-file", keys["kek"])).stdout
        for f in (exp, snapshot_files(store)[0]):
            assert f"KEK needed     file, fingerprint {fp}" in ok(wc("snapshot", "inspect", f)).stdout
            info = json.loads(ok(wc("snapshot", "inspect", f, "--json")).stdout)
            assert info["kek"] == {"kind": "file", "fingerprint": fp}, info
        ok(wc("key", "fingerprint", "--key-file", keys["kek"], store))
        ok(wc("key", "fingerprint", "--key-file", keys["kek"], exp))
        line = one_line_error(wc("key", "fingerprint", "--key-file", keys["kek2"], exp), 2, "is not the KEK")
        assert fp in line and _fingerprint(_key_bytes(keys["kek2"])) in line
        # a wrong key names both fingerprints
        line = one_line_error(wc("dump", store, "--key-file", keys["kek2"]), 2, "not the one")
        assert f"needs the KEK with fingerprint {fp}" in line
        assert f"the key given has fingerprint {_fingerprint(_key_bytes(keys['kek2']))}" in line

    # after a KEK rotation the store names the new key, the older export still the old one
    ok(wc("rotate-kek", store, "--key-file", keys["kek"], "--new-key-file", keys["kek2"]))
    fp2 = _fingerprint(_key_bytes(keys["kek2"]))
    assert json.loads(ok(wc("inspect", store, "--json")).stdout)["kek"]["fingerprint"] == fp2
    assert json.loads(ok(wc("snapshot", "inspect", exp, "--json")).stdout)["kek"]["fingerprint"] == fp


def test_fingerprint_of_env_and_passphrase_keys(tmp_path):
    """--key-env: as for a key file.  A passphrase: only against a store (its salt), and then it is a
    function of the stored check value alone - the fingerprint tells a guesser nothing the check value
    does not, and each guess still costs scrypt under the store's salt."""
    raw = bytes(range(32))
    env = {"WALCRYPT_TEST_KEY": raw.hex(), "WALCRYPT_TEST_PASS": "correct horse battery staple"}
    assert ok(wc("key", "fingerprint", "--key-env", "WALCRYPT_TEST_KEY", env=env)).stdout.split()[0] == \
        _fingerprint(raw)
    one_line_error(wc("key", "fingerprint", "--passphrase-env", "WALCRYPT_TEST_PASS", env=env), 2, "salt", "SOURCE")
    d = str(tmp_path / "pass-store")
    ok(wc("init", d, "--passphrase-env", "WALCRYPT_TEST_PASS", env=env))
    lm = lmdb.open(os.path.join(d, "meta"), max_dbs=8, readonly=True, lock=False)
    with lm.begin() as t:
        check = bytes(t.get(b"kek_check", db=lm.open_db(b"store", txn=t, create=False)))
    lm.close()
    from_check = hashlib.sha256(b"walcrypt/v1/kek-fingerprint" + check).digest()[:8].hex()
    with Unchanged(d):
        out = json.loads(ok(wc("key", "fingerprint", "--passphrase-env", "WALCRYPT_TEST_PASS", d, "--json",
                               env=env)).stdout)
        assert out["fingerprint"] == from_check and out["matches"] is True
        assert json.loads(ok(wc("inspect", d, "--json")).stdout)["kek"]["fingerprint"] == from_check
        one_line_error(wc("key", "fingerprint", "--passphrase-env", "WALCRYPT_TEST_PASS", d,
                          env={"WALCRYPT_TEST_PASS": "wrong"}), 2, from_check)


def test_kms_key_has_no_fingerprint_and_says_so(tmp_path):
    site = tmp_path / "site"
    dist = site / "fakekms-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakekms\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[walcrypt.kms]\nfake = fakekms:factory\n")
    (site / "fakekms.py").write_text(textwrap.dedent("""
        import os
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        class _Fake:
            aead = AESGCM(b"\\x11" * 32)
            def wrap(self, plaintext, context):
                n = os.urandom(12)
                return n + self.aead.encrypt(n, plaintext, context)
            def unwrap(self, blob, context):
                return self.aead.decrypt(blob[:12], blob[12:], context)
        def factory():
            return _Fake()
    """))
    env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    d = str(tmp_path / "kms-store")
    ok(wc("init", d, "--kms", "fake", env=env))
    rep = json.loads(ok(wc("inspect", d, "--json", env=env)).stdout)
    assert rep["kek"] == {"kind": "kms", "plugin": "fake", "fingerprint": None}
    assert "fingerprint none: a KMS-held key has no check value" in ok(wc("inspect", d, env=env)).stdout
    out = ok(wc("key", "fingerprint", "--kms", "fake", env=env)).stdout
    assert out.startswith("none") and "no check value" in out
    assert json.loads(ok(wc("key", "fingerprint", "--kms", "fake", d, "--json", env=env)).stdout)["fingerprint"] is None


# ---------------------------------------------------------------------------
# 8. Scripts get JSON
# ---------------------------------------------------------------------------

def test_json_error_shape(store, keys, tmp_path):
    """With --json an error is {"error": {kind, type, message, hint, path, exit_code}} on stdout, and the
    one line on stderr as ever."""
    err = json_error(wc("verify", str(tmp_path / "nope"), "--key-file", keys["kek"], "--json"), 2, "usage",
                     "does not exist")
    assert err["type"] == "UsageError"
    err = json_error(wc("dump", store, "--json"), 2, "key", "--key-file")
    err = json_error(wc("dump", store, "--key-file", keys["kek2"], "--json"), 2, "key", "not the one",
                     "fingerprint")
    assert err["type"] == "WrongKeyError" and "walcrypt key fingerprint" in err["hint"]
    json_error(wc("dump", store, "--key-fil", keys["kek"], "--json"), 2, "usage", "no such option")
    json_error(wc("nosuch", "--json"), 2, "usage", "no such command")
    json_error(wc("snapshot", "inspect", str(tmp_path / "missing.wcx"), "--json"), 2, "usage", "does not exist")
    json_error(wc("verify", store, "--key-file", keys["kek"], "--key-env", "X", "--json"), 2, "usage", "only one")


def test_json_error_of_damage_carries_path_and_hint(store, keys):
    _garbage_lmdb = DAMAGE[3][1]
    _garbage_lmdb(store)
    err = json_error(wc("dump", store, "--key-file", keys["kek"], "--json"), 1, "damaged", "not an LMDB database")
    assert err["path"].endswith(os.path.join("meta", "data.mdb")) and "restore" in err["hint"]
    assert err["hint"] not in err["message"]


def test_dump_from_past_the_end_is_an_error(store, keys):
    with Unchanged(store):
        one_line_error(wc("dump", store, "--key-file", keys["kek"], "--from", 301), 2, "--from 301 is beyond the last "
                       "index 300")
        one_line_error(wc("dump", store, "--key-file", keys["kek"], "--to", 301), 2, "--to 301 is beyond the last "
                       "index 300")
        json_error(wc("dump", store, "--key-file", keys["kek"], "--from", 1000, "--json"), 2, "usage", "--from 1000")
        res = ok(wc("dump", store, "--key-file", keys["kek"], "--from", 300, "--json"))
        assert [e["index"] for e in json.loads(res.stdout)["entries"]] == [300]


def test_dump_json_failing_midway_closes_its_document(store, keys):
    _flip_sealed_frame(store)
    with Unchanged(store):
        res = wc("dump", store, "--key-file", keys["kek"], "--json")
    one_line_error(res, 1)
    doc = json.loads(res.stdout)                 # still one valid JSON document
    assert "entries" in doc and set(doc["error"]) == ERROR_KEYS
    assert doc["error"]["kind"] == "damaged" and doc["error"]["exit_code"] == 1


# ---------------------------------------------------------------------------
# 9. Key files as operators deploy them (PostgreSQL's rule)
# ---------------------------------------------------------------------------

MODES = [
    # mode, owned by root?, accepted, words in the refusal
    (0o600, True, True, []),
    (0o400, True, True, []),
    (0o640, True, True, []),
    (0o440, True, True, []),
    (0o600, False, True, []),
    (0o640, False, False, ["accessible by its group", "0640", "owner uid 4321", "chmod 600", "chown root"]),
    (0o644, True, False, ["accessible by its group and others", "0644", "owner root", "chmod 600", "chmod 640"]),
    (0o604, True, False, ["accessible by others", "0604", "chmod 600"]),
    (0o660, True, False, ["accessible by its group", "0660", "at most (0640)", "chmod 640"]),
    (0o644, False, False, ["0644", "owner uid 4321", "chmod 600"]),
]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
@pytest.mark.parametrize("mode,root_owned,accepted,words", MODES,
                         ids=[f"{m:04o}-{'root' if r else 'uid4321'}" for m, r, _a, _w in MODES])
def test_key_file_modes(store, keys, tmp_path, mode, root_owned, accepted, words):
    path = str(tmp_path / "kek")
    shutil.copy(keys["kek"], path)
    os.chmod(path, mode)
    if not root_owned:
        os.chown(path, 4321, 4321)
    with Unchanged(store):
        res = wc("verify", store, "--key-file", path)
        if accepted:
            ok(res)
        else:
            line = one_line_error(res, 2, *words)
            assert path in line


# ---------------------------------------------------------------------------
# 11. Small things an operator tripped on
# ---------------------------------------------------------------------------

def test_demo_help_describes_the_cluster_and_the_store_tour():
    top = ok(wc("--help")).stdout
    demo_line = next(ln for ln in top.splitlines() if ln.strip().startswith("demo "))
    assert "3-node pysyncobj cluster" in demo_line and "tour of one encrypted store" not in top
    text = " ".join(ok(wc("demo", "--help")).stdout.split())
    for words in ("3-node pysyncobj cluster", "SIGKILL", "rolling DEK rotation", "full-cluster restart",
                  "every acknowledged write", "one store up close", "torn tail"):
        assert words in text, words


def _fake_checkout(tmp_path) -> str:
    """A checkout whose benchmark suite records how it was called and writes what --json asks for."""
    root = tmp_path / "checkout"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "RESULTS.md").write_text("committed results\n")
    (root / "benchmarks" / "__main__.py").write_text(textwrap.dedent("""
        import json, sys
        args = sys.argv[1:]
        with open("argv.json", "w") as f:
            json.dump(args, f)
        if "--no-save" not in args:
            open("benchmarks/RESULTS.md", "w").write("rewritten\\n")
        if "--json" in args:
            open(args[len(args) - 1 - args[::-1].index("--json") + 1], "w").write("{}")
    """))
    return str(root)


def test_bench_leaves_the_committed_results_alone(tmp_path):
    root = _fake_checkout(tmp_path)
    results_md = os.path.join(root, "benchmarks", "RESULTS.md")
    res = ok(wc("bench", cwd=root))
    written = [n for n in os.listdir(root) if n.startswith("walcrypt-bench-") and n.endswith(".json")]
    assert len(written) == 1 and f"results written to {os.path.join(root, written[0])}" in res.stdout
    with open(results_md) as f:
        assert f.read() == "committed results\n"
    with open(os.path.join(root, "argv.json")) as f:
        assert "--no-save" in json.load(f)

    out = str(tmp_path / "mine.json")
    ok(wc("bench", "--out", out, cwd=root))
    assert os.path.exists(out)
    one_line_error(wc("bench", "--out", out, cwd=root), 2, "already exists")

    ok(wc("bench", "--update-repo", "--out", str(tmp_path / "release.json"), cwd=root))
    with open(results_md) as f:
        assert f.read() == "rewritten\n"


def test_redact_without_kek_out_says_it_discards_the_kek(store, keys, tmp_path):
    emb = str(tmp_path / "full.wcx")
    ok(wc("snapshot", "export", store, emb, "--key-file", keys["kek"], "--embed-kek"))
    res = ok(wc("snapshot", "redact", emb))
    fp = _fingerprint(_key_bytes(keys["kek"]))
    assert "discarded it (no --kek-out was given)" in res.stdout and f"fingerprint {fp}" in res.stdout
    assert "discards the embedded KEK" in " ".join(ok(wc("snapshot", "redact", "--help")).stdout.split()) or \
        "the embedded KEK is discarded" in " ".join(ok(wc("snapshot", "redact", "--help")).stdout.split())
