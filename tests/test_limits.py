"""Bounded parsing: every parameter read from disk is checked, with a typed error and a documented cap
(FORMAT.md 8.1, 10.5, 13), before it sizes an allocation or steers anything.

* KEK parameters in the store table (``store/kek_params``) and in the keyring bundle of an export or
  snapshot: malformed values are a StorageError through the API and one line with exit code 1
  through the CLI (never "internal error"); scrypt costs beyond the memory cap are refused before
  any derivation.
* The DEK rotation record, the snapshot metadata.
* Segments whose files were extended far beyond what was written (sparse, 1 and 4 GiB): open and
  verify read them in bounded memory (checked in a subprocess with an address-space limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lmdb
import pytest

import walcrypt
from walcrypt import (ConfState, CorruptionError, Entry, HardState, Passphrase, RawKey, SnapshotMeta, StorageError,
                      UnsupportedFormatError, UsageError, backup)
from walcrypt import keys as K
from walcrypt import meta as M

import wctest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
PW = "correct horse battery staple"
N = 2 ** 10                                  # cheap scrypt for tests


def _put_store_value(root: str, key: bytes, value: bytes) -> None:
    """Overwrite a raw value of the (unauthenticated) store table, as damage or an attacker would."""
    env = lmdb.open(os.path.join(root, "meta"), max_dbs=8, subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, value, db=env.open_db(M.DB_STORE, txn=txn))
    finally:
        env.close()


def _get_store_value(root: str, key: bytes) -> bytes:
    env = lmdb.open(os.path.join(root, "meta"), max_dbs=8, subdir=True, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return bytes(txn.get(key, db=env.open_db(M.DB_STORE, txn=txn, create=False)))
    finally:
        env.close()


def _passphrase_store(root: str, *, snapshot: bool = False) -> dict:
    with walcrypt.open(root, kek=Passphrase(PW, n=N), segment_size=8192) as s:
        s.save(hard_state=HardState(1, 1, 20), entries=wctest.make_entries(1, 21))
        if snapshot:
            s.save_snapshot(SnapshotMeta(20, wctest.entry_term(20), ConfState((1,))), b"state" * 100)
    return json.loads(_get_store_value(root, M.K_KEK_PARAMS))


class _NoDerivation:
    """Stands in for scrypt: any derivation attempt fails the test."""

    def __init__(self, *a, **kw):
        raise AssertionError(f"scrypt derivation attempted with {kw}")


def _malformed_params(good: dict) -> dict[str, bytes]:
    """Ways the stored parameters can be wrong, each as the raw record value."""
    def variant(**changes) -> bytes:
        doc = dict(good)
        for k, v in changes.items():
            if v is ...:
                doc.pop(k)
            else:
                doc[k] = v
        return json.dumps(doc).encode()

    return {
        "not-an-object": b"[1]",
        "a-string": b'"passphrase"',
        "deeply-nested": b"[" * 100000 + b"]" * 100000,
        "too-large": json.dumps({**good, "pad": "x" * 10000}).encode(),
        "not-json": b"\xff{",
        "kind-missing": variant(kind=...),
        "kind-not-a-string": variant(kind=["passphrase"]),
        "kdf-missing": variant(kdf=...),
        "n-missing": variant(n=...),
        "n-a-string": variant(n="32768"),
        "n-a-list": variant(n=[1024]),
        "n-a-float": variant(n=1024.0),
        "n-a-bool": variant(n=True),
        "n-not-a-power-of-two": variant(n=1000),
        "n-zero": variant(n=0),
        "n-negative": variant(n=-1024),
        "r-zero": variant(r=0),
        "r-huge": variant(r=1 << 40),
        "p-zero": variant(p=0),
        "p-too-many": variant(p=1000),
        "salt-missing": variant(salt=...),
        "salt-not-hex": variant(salt="zz" * 16),
        "salt-odd-length": variant(salt="abc"),
        "salt-a-number": variant(salt=1234),
        "salt-too-short": variant(salt="00" * 4),
        "salt-too-long": variant(salt="00" * 1000),
        "kms-plugin-missing": json.dumps({"kind": "kms"}).encode(),
        "kms-plugin-a-number": json.dumps({"kind": "kms", "plugin": 5}).encode(),
        "kms-plugin-control-chars": json.dumps({"kind": "kms", "plugin": "a\nb"}).encode(),
        "kms-plugin-too-long": json.dumps({"kind": "kms", "plugin": "p" * 1000}).encode(),
    }


UNSUPPORTED = {"kind-unknown": {"kind": "hsm"}, "kdf-unknown": {"kdf": "argon2id"}}


# ---------------------------------------------------------------------------------------------
# store/kek_params
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pp_store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pp") / "store")
    good = _passphrase_store(root, snapshot=True)
    return root, good


@pytest.mark.parametrize("name", sorted(_malformed_params({"kind": "passphrase", "kdf": "scrypt", "salt": "00" * 16,
                                                           "n": N, "r": 8, "p": 1})))
def test_malformed_stored_kek_params_are_a_corruption_error(pp_store, tmp_path, name, monkeypatch):
    src, good = pp_store
    root = wctest.copy_store(src, str(tmp_path / "s"))
    _put_store_value(root, M.K_KEK_PARAMS, _malformed_params(good)[name])
    monkeypatch.setattr(K, "Scrypt", _NoDerivation)
    for kek in (Passphrase(PW, n=N), RawKey(bytes(32))):
        with pytest.raises(CorruptionError) as ei:
            walcrypt.open(root, kek=kek, read_only=True)
        assert "kek_params" in str(ei.value) and ei.value.hint


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unknown_kek_kind_or_kdf_is_unsupported(pp_store, tmp_path, name):
    src, good = pp_store
    root = wctest.copy_store(src, str(tmp_path / "s"))
    _put_store_value(root, M.K_KEK_PARAMS, json.dumps({**good, **UNSUPPORTED[name]}).encode())
    with pytest.raises(UnsupportedFormatError, match="upgrade walcrypt"):
        walcrypt.open(root, kek=Passphrase(PW, n=N), read_only=True)


@pytest.mark.parametrize("n, r, p", [(2 ** 24, 8, 1), (2 ** 22, 32, 1), (2 ** 20, 8, 1), (2 ** 19, 8, 16)])
def test_excessive_scrypt_costs_are_refused_before_any_derivation(pp_store, tmp_path, monkeypatch, n, r, p):
    """16 GiB (n = 2^24 or n = 2^22 with r = 32), 1 GiB, 512 MiB: over the 256 MiB cap, refused unread."""
    src, good = pp_store
    root = wctest.copy_store(src, str(tmp_path / "s"))
    _put_store_value(root, M.K_KEK_PARAMS, json.dumps({**good, "n": n, "r": r, "p": p}).encode())
    monkeypatch.setattr(K, "Scrypt", _NoDerivation)
    with pytest.raises(CorruptionError, match="scrypt"):
        walcrypt.open(root, kek=Passphrase(PW, n=N), read_only=True)


def test_the_memory_cap_is_the_callers_to_raise(tmp_path):
    """A store made with costs above the default cap opens when the caller raises the cap explicitly."""
    root = str(tmp_path / "s")
    big = Passphrase(PW, n=2 ** 16, r=8, max_memory=64 << 20)           # 64 MiB
    with walcrypt.open(root, kek=big) as s:
        s.save(entries=[Entry(1, 1, b"x")])
    with pytest.raises(CorruptionError, match="more than the 32 MiB allowed"):
        walcrypt.open(root, kek=Passphrase(PW, max_memory=32 << 20), read_only=True)
    with walcrypt.open(root, kek=Passphrase(PW, max_memory=64 << 20), read_only=True) as s:
        assert s.last_index() == 1


@pytest.mark.parametrize("kw", [dict(n=2 ** 24), dict(n=1000), dict(n=1), dict(r=0), dict(r=33), dict(p=0),
                                dict(p=17), dict(n=2 ** 19, r=8), dict(n="1024"), dict(max_memory=0)])
def test_passphrase_refuses_costs_it_could_not_open_again(kw):
    with pytest.raises(UsageError):
        Passphrase(PW, **kw)


@pytest.mark.parametrize("name", ["", " lead", "trail ", "a=b", "[x", "x" * 200, "new\nline", 7],
                         ids=["empty", "lead", "trail", "equals", "bracket", "long", "newline", "number"])
def test_kms_plugin_names_are_bounded(name):
    with pytest.raises(UsageError):
        walcrypt.Kms(name)


def test_a_good_store_still_opens(pp_store, tmp_path):
    src, _good = pp_store
    root = wctest.copy_store(src, str(tmp_path / "s"))
    with walcrypt.open(root, kek=Passphrase(PW), read_only=True) as s:
        assert s.last_index() == 20


# ---------------------------------------------------------------------------------------------
# The CLI: one line, exit code 1, never "internal error"
# ---------------------------------------------------------------------------------------------

def _wc(*args, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("WALCRYPT_")}
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PW"] = PW
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "walcrypt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=300)


def _assert_clean_failure(res, code: int, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code, f"exit {res.returncode}\n{out}"
    assert "internal error" not in out and "Traceback" not in out, out
    for n in needles:
        assert n in out, (n, out)


@pytest.mark.parametrize("name", ["not-an-object", "n-missing", "salt-not-hex", "n-not-a-power-of-two", "16GiB"])
def test_cli_reports_malformed_stored_params(pp_store, tmp_path, name):
    src, good = pp_store
    root = wctest.copy_store(src, str(tmp_path / "s"))
    bad = (json.dumps({**good, "n": 2 ** 22, "r": 32}).encode() if name == "16GiB"
           else _malformed_params(good)[name])
    _put_store_value(root, M.K_KEK_PARAMS, bad)
    res = _wc("verify", root, "--passphrase-env", "PW")
    _assert_clean_failure(res, 1, "kek_params")
    res = _wc("inspect", root)                    # no key: the damaged record is reported, the rest shown
    if name == "16GiB":                           # well-formed, nothing is derived: a warning
        _assert_clean_failure(res, 0, "kek_params", "16384 MiB")
    else:
        _assert_clean_failure(res, 1, "kek_params")
    assert "store ID" in res.stdout
    res = _wc("dump", root, "--passphrase-env", "PW")
    _assert_clean_failure(res, 1, "kek_params")


# ---------------------------------------------------------------------------------------------
# Keyring bundles: exports and snapshot files
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pp_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppx")
    root = str(d / "store")
    _passphrase_store(root, snapshot=True)
    out = str(d / "backup.wcx")
    with walcrypt.open(root, kek=Passphrase(PW)) as s:
        s.export_snapshot(out)
    return out


def _with_bundle(export: bytes, edit) -> bytes:
    """The export with its keyring bundle replaced by ``edit(doc)`` (a dict to re-encode, or raw bytes)
    and its CRCs recomputed, as anyone who can write the file can."""
    from crc32c import crc32c
    klen = int.from_bytes(export[12:16], "little")
    blen = int.from_bytes(export[52:56], "little")
    doc = json.loads(export[64 + klen:64 + klen + blen])
    new = edit(doc)
    bundle = new if isinstance(new, bytes) else json.dumps(new, sort_keys=True).encode()
    b = bytearray(export[:64 + klen]) + bundle + export[64 + klen + blen:]
    b[52:56] = len(bundle).to_bytes(4, "little")
    b[56:60] = crc32c(bundle).to_bytes(4, "little")
    b[60:64] = crc32c(bytes(b[:60])).to_bytes(4, "little")
    return bytes(b)


def _params_edit(changes):
    def edit(doc):
        p = dict(doc["kek_params"])
        for k, v in changes.items():
            if v is ...:
                p.pop(k)
            else:
                p[k] = v
        doc["kek_params"] = p
        return doc
    return edit


def _set(field, value):
    def edit(doc):
        doc[field] = value
        return doc
    return edit


def _key_set(field, value):
    def edit(doc):
        doc["keys"][0][field] = value
        return doc
    return edit


BUNDLE_EDITS = {
    "params-not-an-object": _set("kek_params", [1]),
    "params-n-missing": _params_edit({"n": ...}),
    "params-n-a-string": _params_edit({"n": "x"}),
    "params-n-not-a-power-of-two": _params_edit({"n": 1000}),
    "params-salt-not-hex": _params_edit({"salt": "zz" * 16}),
    "params-salt-missing": _params_edit({"salt": ...}),
    "params-16GiB": _params_edit({"n": 2 ** 22, "r": 32}),
    "params-n-2^24": _params_edit({"n": 2 ** 24}),
    "store-id-not-hex": _set("store_id", "zz" * 16),
    "store-id-short": _set("store_id", "00" * 5),
    "kek-check-not-hex": _set("kek_check", "not hex"),
    "kek-check-a-list": _set("kek_check", [1]),
    "version-missing": _set("version", None),
    "algorithm-a-string": _set("algorithm", "aes"),
    "meta-key-missing": _set("meta_key", None),
    "keys-too-many": lambda doc: {**doc, "keys": doc["keys"] * 5000},
    "key-id-short": _key_set("id", "00"),
    "key-wrapped-not-hex": _key_set("wrapped", "xyz"),
    "key-wrapped-a-number": _key_set("wrapped", 12),
    "key-purpose-a-string": _key_set("purpose", "1"),
    "key-state-a-list": _key_set("state", [2]),
    "key-state-unknown": _key_set("state", 9),
    "key-created-negative": _key_set("created_ns", -1),
    "not-json": lambda doc: b"{\xff",
    "deeply-nested": lambda doc: b"[" * 50000 + b"]" * 50000,
}


@pytest.mark.parametrize("name", sorted(BUNDLE_EDITS))
def test_malformed_export_keyring_is_a_storage_error(pp_export, tmp_path, name, monkeypatch):
    with open(pp_export, "rb") as f:
        raw = f.read()
    path = str(tmp_path / "x.wcx")
    with open(path, "wb") as f:
        f.write(_with_bundle(raw, BUNDLE_EDITS[name]))
    monkeypatch.setattr(K, "Scrypt", _NoDerivation)
    with pytest.raises(StorageError):
        backup.inspect_export(path, Passphrase(PW))
    with pytest.raises(StorageError):
        backup.restore_export(path, str(tmp_path / "restored"), kek=Passphrase(PW))


@pytest.mark.parametrize("name", ["params-n-missing", "params-salt-not-hex", "params-16GiB", "key-state-a-list"])
def test_cli_reports_a_malformed_export_keyring(pp_export, tmp_path, name):
    with open(pp_export, "rb") as f:
        raw = f.read()
    path = str(tmp_path / "x.wcx")
    with open(path, "wb") as f:
        f.write(_with_bundle(raw, BUNDLE_EDITS[name]))
    needle = "kek_params" if name.startswith("params-") else "keyring bundle"
    _assert_clean_failure(_wc("snapshot", "inspect", path, "--passphrase-env", "PW"), 1, needle)
    _assert_clean_failure(_wc("snapshot", "restore", path, str(tmp_path / "r"), "--passphrase-env", "PW"), 1,
                          needle)
    assert not os.path.exists(tmp_path / "r") or not os.listdir(tmp_path / "r")


def test_a_good_export_still_restores(pp_export, tmp_path):
    out = backup.restore_export(pp_export, str(tmp_path / "r"), kek=Passphrase(PW))
    assert out["index"] == 20


# ---------------------------------------------------------------------------------------------
# The DEK rotation record and the snapshot metadata
# ---------------------------------------------------------------------------------------------

ROTATION_RECORDS = {
    "list": b"[1]", "not-utf8": b"\xff", "empty-object": b"{}",
    "pending-not-hex": b'{"pending": "zz", "first_index": 1}',
    "first-index-a-string": b'{"pending": "' + b"00" * 16 + b'", "first_index": "7"}',
    "queued-negative": b'{"pending": "' + b"00" * 16 + b'", "first_index": 7, "queued": -1}',
    "deeply-nested": b"[" * 100000,
}


@pytest.mark.parametrize("name", sorted(ROTATION_RECORDS))
def test_malformed_rotation_record_is_a_corruption_error(name):
    value = ROTATION_RECORDS[name]
    from walcrypt.rotation import parse_state
    with pytest.raises(CorruptionError, match="state/rotation"):
        parse_state(value, "<meta>")


def test_plaintext_store_with_a_forged_rotation_record(tmp_path):
    """A plaintext store's MACs are keyless: a forged record must still give a typed error."""
    root = str(tmp_path / "p")
    with walcrypt.open(root, encrypted=False) as s:
        s.save(entries=[Entry(1, 1, b"x")])
    meta = M.Meta(os.path.join(root, "meta"))
    try:
        meta.set_mac_key(None)
        with meta.write() as tx:
            tx.put(M.DB_STATE, M.K_ROTATION, b"\xff\xfe")
    finally:
        meta.close()
    with pytest.raises(CorruptionError, match="state/rotation"):
        walcrypt.open(root, encrypted=False, read_only=True)


SNAPSHOT_METAS = {
    "list": b"[]", "no-conf-state": b'{"index": 1, "term": 1}',
    "index-a-string": b'{"index": "1", "term": 1, "conf_state": {}}',
    "voters-a-number": b'{"index": 1, "term": 1, "conf_state": {"voters": 5}}',
    "voters-nested": b'{"index": 1, "term": 1, "conf_state": {"voters": [[1]]}}',
    "index-negative": b'{"index": -1, "term": 1, "conf_state": {}}',
    "deeply-nested": b"[" * 100000,
}


@pytest.mark.parametrize("name", sorted(SNAPSHOT_METAS))
def test_malformed_snapshot_metadata_is_a_corruption_error(name):
    doc = SNAPSHOT_METAS[name]
    from walcrypt.snapshot import decode_meta
    with pytest.raises(CorruptionError):
        decode_meta(doc, "<snap>")


# ---------------------------------------------------------------------------------------------
# Files extended far beyond what was written: bounded memory whatever the file size
# ---------------------------------------------------------------------------------------------

HEADROOM = 600 << 20       # memory allowed above the interpreter's baseline (and LMDB's map, see below)
KEK_BYTES = bytes(range(100, 132))

_LIMITED_CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import walcrypt, walcrypt.check, walcrypt.cli, walcrypt.inspection
    from walcrypt import meta

    def vm_size():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024

    # Address space = what is mapped now + LMDB's map of the metadata (address space, not memory)
    # + the headroom: a whole-file read of the extended segment cannot fit.
    limit = vm_size() + meta.MAP_SIZE + int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    op, root = sys.argv[1], sys.argv[2]
    kek = walcrypt.RawKey(bytes(range(100, 132)))
    out = {}
    try:
        if op == "open-ro" or op == "open-rw":
            with walcrypt.open(root, kek=kek, read_only=op == "open-ro") as s:
                ents = []
                for lo in range(s.first_index(), s.last_index() + 1, 64):
                    ents += s.entries(lo, min(lo + 64, s.last_index() + 1))
                out = {"last_index": s.last_index(), "entries": len(ents), "repairs": len(s.repairs)}
        elif op == "verify":
            rep = walcrypt.check.check(root, kek=kek)
            out = {"ok": rep.ok, "errors": [f"{f.path}: {f.detail}" for f in rep.errors],
                   "last_index": rep.last_index}
        elif op == "inspect":
            rep = walcrypt.inspection.inspect_store(root)
            out = {"errors": rep["errors"], "tails": [s["tail"] for s in rep["segments"]]}
        elif op == "cli-verify":
            kf = os.path.join(os.path.dirname(root), "kek")
            try:
                walcrypt.cli.main(["verify", root, "--key-file", kf], standalone_mode=True)
            except SystemExit as exc:
                out = {"exit": exc.code}
    except walcrypt.WalcryptError as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    except MemoryError:
        out = {"error": "MemoryError"}
    print(json.dumps(out))
""")


def _limited(op: str, root: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"]
                                              if os.environ.get("PYTHONPATH") else ""))
    res = subprocess.run([sys.executable, "-c", _LIMITED_CHILD, op, root, str(HEADROOM)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"exit {res.returncode}\nstdout:\n{res.stdout[-2000:]}\nstderr:\n{res.stderr[-3000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def crash_image(tmp_path_factory):
    """A store with sealed segments and an open (unsealed, preallocated) last segment, as a crash
    leaves it: the directory is copied while the writer still has it open."""
    d = tmp_path_factory.mktemp("extended")
    live, image = str(d / "live"), str(d / "image")
    s = walcrypt.open(live, kek=RawKey(KEK_BYTES), segment_size=64 << 10, sync="always")
    try:
        for k in range(1, 301, 10):
            s.save(hard_state=HardState(1, 1, k + 9), entries=wctest.make_entries(k, k + 10, length=600))
        wctest.copy_store(live, image)
    finally:
        s.close()
    with open(d / "kek", "wb") as f:
        f.write(KEK_BYTES)
    os.chmod(d / "kek", 0o600)
    segs = wctest.segment_files(image)
    assert len(segs) >= 3
    with walcrypt.open(wctest.copy_store(image, str(d / "probe")), kek=RawKey(KEK_BYTES), read_only=True) as s:
        assert s.last_index() == 300 and not s.wal.segments[-1].sealed and s.wal.segments[0].sealed
    return image


def _extended(crash_image: str, tmp_path, which: str, size: int) -> tuple[str, str]:
    root = wctest.copy_store(crash_image, str(tmp_path / "s"))
    os.link(os.path.join(os.path.dirname(crash_image), "kek"), str(tmp_path / "kek"))
    segs = wctest.segment_files(root)
    target = segs[-1] if which == "open" else segs[0]
    os.truncate(target, size)               # sparse: no disk space, zeros when read
    return root, target


@pytest.mark.parametrize("size", [1 << 30, 4 << 30], ids=["1GiB", "4GiB"])
def test_open_segment_extended_sparsely_opens_in_bounded_memory(crash_image, tmp_path, size):
    root, target = _extended(crash_image, tmp_path, "open", size)
    assert _limited("open-ro", root) == {"last_index": 300, "entries": 300, "repairs": 0}
    rep = _limited("verify", root)
    assert rep["ok"] and rep["last_index"] == 300, rep
    assert _limited("inspect", root)["tails"][-1] == "clean"
    assert _limited("cli-verify", root) == {"exit": 0}
    # read-write: the zeros are unwritten space; recovery seals the segment, which cuts the file
    assert _limited("open-rw", root) == {"last_index": 300, "entries": 300, "repairs": 0}
    assert os.path.getsize(target) < 64 << 10


@pytest.mark.parametrize("size", [1 << 30, 4 << 30], ids=["1GiB", "4GiB"])
def test_sealed_segment_extended_sparsely_is_refused_in_bounded_memory(crash_image, tmp_path, size):
    root, target = _extended(crash_image, tmp_path, "sealed", size)
    for op in ("open-ro", "open-rw"):
        out = _limited(op, root)
        assert out["error"] == "CorruptionError" and "manifest says" in out["message"], out
    rep = _limited("verify", root)
    assert not rep["ok"] and any(os.path.basename(target) in e and f"{size} bytes" in e for e in rep["errors"]), rep
    assert _limited("cli-verify", root) == {"exit": 1}
    assert os.path.getsize(target) == size            # nothing repaired, nothing deleted


def test_max_entry_size_leaves_room_for_the_record_around_the_entry(tmp_path):
    from walcrypt import format as fmt
    with pytest.raises(UsageError):
        walcrypt.open(str(tmp_path / "s"), kek=RawKey(KEK_BYTES), max_entry_size=fmt.MAX_ENTRY_SIZE_LIMIT + 1)
    with walcrypt.open(str(tmp_path / "t"), kek=RawKey(KEK_BYTES), max_entry_size=fmt.MAX_ENTRY_SIZE_LIMIT):
        pass


def test_a_record_over_the_payload_bound_is_refused_by_readers(tmp_path, monkeypatch):
    """Readers check the payload bound whatever wrote the record, scaled down: a record of about 1 MiB
    written under the real bound, then read with the bound lowered to 1 MiB, is refused with a typed
    error, no more."""
    from walcrypt import format as fmt
    root = str(tmp_path / "s")
    with walcrypt.open(root, kek=RawKey(KEK_BYTES), segment_size=8 << 20) as s:
        s.save(entries=[Entry(1, 1, b"x" * 100), Entry(2, 1, b"y" * ((1 << 20) - 64))])
    monkeypatch.setattr(fmt, "MAX_RECORD_PAYLOAD", 1 << 20)
    with walcrypt.open(root, kek=RawKey(KEK_BYTES), read_only=True, max_entry_size=1 << 19) as s:
        with pytest.raises(CorruptionError, match="out of bounds"):
            s.entries(1, 3)


def test_the_writer_splits_records_at_the_payload_bound(tmp_path, monkeypatch):
    """With the bound lowered to 1 MiB (read at call time), entries that would share a record beyond it
    go to separate records, and every entry up to max_entry_size_bound() reads back."""
    from walcrypt import format as fmt
    monkeypatch.setattr(fmt, "MAX_RECORD_PAYLOAD", 1 << 20)
    root = str(tmp_path / "s")
    big = fmt.max_entry_size_bound()
    with pytest.raises(UsageError, match="max_entry_size"):
        walcrypt.open(root, kek=RawKey(KEK_BYTES), max_entry_size=big + 1)
    sizes = [100, big, fmt.RECORD_TARGET_BYTES - 1, big, 7]
    with walcrypt.open(root, kek=RawKey(KEK_BYTES), max_entry_size=big, segment_size=8 << 20) as s:
        s.save(entries=[Entry(i + 1, 1, bytes([i]) * n) for i, n in enumerate(sizes)])
    with walcrypt.open(root, kek=RawKey(KEK_BYTES), max_entry_size=big, read_only=True) as s:
        assert [len(e.data) for e in s.entries(1, len(sizes) + 1)] == sizes


def test_snapshot_extended_sparsely_is_refused_in_bounded_memory(tmp_path):
    """The newest snapshot grown to 1 GiB of zeros after its final chunk: a typed error, read in chunks."""
    root = str(tmp_path / "s")
    with walcrypt.open(root, kek=RawKey(KEK_BYTES), segment_size=64 << 10) as s:
        s.save(hard_state=HardState(1, 1, 10), entries=wctest.make_entries(1, 11))
        s.save_snapshot(SnapshotMeta(10, wctest.entry_term(10), ConfState((1,))), b"state" * 1000)
    with open(tmp_path / "kek", "wb") as f:
        f.write(KEK_BYTES)
    os.chmod(tmp_path / "kek", 0o600)
    snap_dir = os.path.join(root, "snap-v1-encrypted")
    (name,) = [n for n in os.listdir(snap_dir) if n.endswith(".snap")]
    os.truncate(os.path.join(snap_dir, name), 1 << 30)
    out = _limited("open-ro", root)
    assert out["error"] == "CorruptionError" and "follow the final snapshot chunk" in out["message"], out
    rep = _limited("verify", root)
    assert not rep["ok"] and any(name in e for e in rep["errors"]), rep
    assert _limited("cli-verify", root) == {"exit": 1}
