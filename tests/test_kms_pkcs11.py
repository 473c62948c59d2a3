"""The ``pkcs11`` KMS plug-in against a real SoftHSM2 token.

A module-scoped fixture writes a private SoftHSM2 configuration (its own token directory under
pytest's temporary directory, exported as SOFTHSM2_CONF for this process and its children),
initialises the tokens with ``softhsm2-util`` and creates the keys - the KEK through
``python -m walcrypt.kms.pkcs11`` as the README does, the odd keys (extractable, not AES, a
duplicated label) with python-pkcs11 - all before this process loads the library (SoftHSM2 reads
its token directory when the library is initialised).

Tokens: ``walcrypt`` (the KEK, another AES key, a key named by CKA_ID, the odd keys), ``outage``
(a store on it is opened after its token directory was moved away: SoftHSM2 then reports
CKR_OBJECT_HANDLE_INVALID for the key and CKR_GENERAL_ERROR for the token, which the plug-in
maps to KeyProviderUnavailableError) and ``pintest`` (a wrong PIN reaches the token only there,
where no session of this process is logged in).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, KeyProviderError, KeyProviderUnavailableError, SnapshotMeta
from walcrypt import WrongKeyError
from walcrypt import backup
from walcrypt import keys as K

import wctest

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
PIN = "wc-pin-5f0d2b7e9a"
SO_PIN = "wc-so-3c8a1f6d42"
OUTAGE_PIN = "wc-pin-outage-81c2"
PINTEST_PIN = "wc-pin-pintest-4d7a"
SECRETS = (PIN, SO_PIN, OUTAGE_PIN, PINTEST_PIN)
FAST = walcrypt.Retry(attempts=2, delay=0.05)

if not os.path.exists(MODULE):
    pytest.skip(f"SoftHSM2 is not installed ({MODULE} is missing)", allow_module_level=True)
if shutil.which("softhsm2-util") is None:
    pytest.skip("softhsm2-util is not installed", allow_module_level=True)
pkcs11 = pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")
from pkcs11 import Attribute, KeyType  # noqa: E402

from walcrypt.kms import pkcs11 as plugin  # noqa: E402


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCRYPT_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def _run(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=_env(env), timeout=timeout)


def _init_token(label: str, pin: str) -> None:
    res = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
                          "--so-pin", SO_PIN], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    root = tmp_path_factory.mktemp("softhsm")
    tokens = root / "tokens"
    tokens.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        _init_token("walcrypt", PIN)
        before = set(os.listdir(tokens))
        _init_token("outage", OUTAGE_PIN)
        (outage_dir,) = set(os.listdir(tokens)) - before
        _init_token("pintest", PINTEST_PIN)
        for token, label, pin, extra in (("walcrypt", "walcrypt-kek", PIN, ()),
                                         ("walcrypt", "other-kek", PIN, ()),
                                         ("walcrypt", "by-id", PIN, ("--key-id", "c0ffee01")),
                                         ("outage", "outage-kek", OUTAGE_PIN, ()),
                                         ("pintest", "pintest-kek", PINTEST_PIN, ())):
            res = _run("-m", "walcrypt.kms.pkcs11", "--module", MODULE, "--token-label", token, "--key-label", label,
                       "--pin-env", "HSM_PIN", *extra, env={"HSM_PIN": pin})
            assert res.returncode == 0, res.stderr
        # This process loads the library now, after every token exists (or re-reads them if loaded before).
        real = os.path.realpath(MODULE)
        stale = [pkcs11._loaded[m] for m in {MODULE, real} if m in pkcs11._loaded]
        for loaded in stale:
            loaded.reinitialize()
        lib = pkcs11.lib(real)
        session = lib.get_token(token_label="walcrypt").open(rw=True, user_pin=PIN)
        try:
            aes = dict(store=True, template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
            session.generate_key(KeyType.AES, 256, label="extractable", store=True,
                                 template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
            session.generate_key(KeyType.AES, 128, label="aes-128", **aes)
            session.generate_key(KeyType.GENERIC_SECRET, 256, label="not-aes", capabilities=0, **aes)
            session.generate_key(KeyType.AES, 256, label="twice", **aes)
            session.generate_key(KeyType.AES, 256, label="twice", **aes)
        finally:
            session.close()
        yield {"root": str(root), "tokens": str(tokens), "outage_dir": str(tokens / outage_dir)}
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


def opts(**over) -> dict:
    o = {"module": MODULE, "token_label": "walcrypt", "key_label": "walcrypt-kek", "pin": PIN}
    o.update(over)
    return {k: v for k, v in o.items() if v is not None}


def kms(**over) -> walcrypt.Kms:
    return walcrypt.Kms("pkcs11", retry=FAST, **opts(**over))


def entries(lo: int, hi: int) -> list[Entry]:
    return [Entry(i, 1 + i // 10, hashlib.sha256(b"%d" % i).digest() * 3) for i in range(lo, hi)]


def read_all(store) -> tuple[list[Entry], HardState]:
    hs, _cs = store.initial_state()
    first, last = store.first_index(), store.last_index()
    return (store.entries(first, last + 1) if last >= first else []), hs


def filled_store(path: str, kek, n: int = 30, **kw):
    s = walcrypt.open(path, kek=kek, **kw)
    s.save(HardState(2, 1, n - 1), entries(1, n))
    return s


# ---------------------------------------------------------------------------
# 1-4: a store under the token's key
# ---------------------------------------------------------------------------

def test_store_roundtrip(hsm, tmp_path):
    d = str(tmp_path / "data")
    with filled_store(d, kms()) as s:
        want = read_all(s)
    assert want[0] == entries(1, 30) and want[1] == HardState(2, 1, 29)
    with walcrypt.open(d, kek=kms()) as s:               # a new plug-in object: a new lookup of the key
        got = read_all(s)
    assert [(e.index, e.term, bytes(e.data)) for e in got[0]] == [(e.index, e.term, bytes(e.data)) for e in want[0]]
    assert got[1] == want[1]


def test_key_by_id(hsm, tmp_path):
    d = str(tmp_path / "data")
    with filled_store(d, kms(key_label=None, key_id="C0FFEE01")) as s:
        pass
    with walcrypt.open(d, kek=kms(key_label=None, key_id="0xc0ffee01")) as s:
        assert read_all(s)[0] == entries(1, 30)
    with pytest.raises(WrongKeyError):                  # the identity names the ID, not a label
        walcrypt.open(d, kek=kms(key_label="by-id"))


def test_rotate_dek(hsm, tmp_path):
    d = str(tmp_path / "data")
    with filled_store(d, kms()) as s:
        old = {k for k, e in s.keys.items() if e.state_name == "active"}
        s.rotate_dek()
        assert s.needs_snapshot
        s.save_snapshot(SnapshotMeta(s.last_index(), s.term(s.last_index()), ConfState(voters=(1,))), b"state" * 100)
        assert not s.needs_snapshot
        new = {k for k, e in s.keys.items() if e.state_name == "active"}
        assert new and new != old
        s.save(HardState(3, 1, 40), entries(30, 41))
    with walcrypt.open(d, kek=kms()) as s:
        got, hs = read_all(s)
        assert hs == HardState(3, 1, 40) and s.first_index() <= 30        # entries up to 29 are in the snapshot
        assert got == entries(s.first_index(), 41)
        assert s.snapshot().meta.index == 29 and bytes(s.snapshot().data) == b"state" * 100


def test_rotate_kek_to_raw_and_back(hsm, tmp_path):
    d = str(tmp_path / "data")
    raw = walcrypt.RawKey(bytes(range(32)))
    with filled_store(d, kms()) as s:
        s.rotate_kek(raw)
    with pytest.raises(WrongKeyError):
        walcrypt.open(d, kek=kms())
    with walcrypt.open(d, kek=raw) as s:
        assert read_all(s)[0] == entries(1, 30)
        s.rotate_kek(kms())
    with pytest.raises(WrongKeyError):                  # the local key no longer opens it
        walcrypt.open(d, kek=raw)
    with walcrypt.open(d, kek=kms()) as s:
        assert read_all(s) == (entries(1, 30), HardState(2, 1, 29))


def test_local_key_on_a_kms_store_is_the_wrong_key(hsm, tmp_path):
    d = str(tmp_path / "data")
    with filled_store(d, kms()):
        pass
    with pytest.raises(WrongKeyError):
        walcrypt.open(d, kek=walcrypt.RawKey(bytes(range(32))))


def test_export_and_restore(hsm, tmp_path):
    d, out, restored = str(tmp_path / "data"), str(tmp_path / "node.wcx"), str(tmp_path / "restored")
    with filled_store(d, kms()) as s:
        s.save_snapshot(SnapshotMeta(29, s.term(29), ConfState(voters=(1, 2, 3))), b"snapshot-bytes" * 50)
        backup.export_snapshot(s, out)
    backup.restore_export(out, restored, kek=kms())
    with walcrypt.open(restored, kek=kms()) as s:
        snap = s.snapshot()
        assert snap.meta.index == 29 and snap.meta.conf_state == ConfState(voters=(1, 2, 3))
        assert bytes(snap.data) == b"snapshot-bytes" * 50
    with pytest.raises(WrongKeyError):                  # another key on the same token does not open it
        backup.restore_export(out, str(tmp_path / "other"), kek=kms(key_label="other-kek"))


# ---------------------------------------------------------------------------
# 5: the context is bound to every blob
# ---------------------------------------------------------------------------

def test_blobs_are_bound_to_their_store(hsm, tmp_path):
    d = str(tmp_path / "data")
    with filled_store(d, kms()) as s:
        store_id = s.store_id
        entry = next(iter(s.keys.values()))
    ctx = K.wrap_context(store_id, entry.key_id, entry.purpose)
    other_ctx = K.wrap_context(bytes(len(store_id)), entry.key_id, entry.purpose)
    wrapper = kms().wrapper(None)
    secret = wrapper.unwrap(entry.wrapped, ctx)
    assert len(secret) == 32
    with pytest.raises(WrongKeyError):
        wrapper.unwrap(entry.wrapped, other_ctx)
    tampered = bytearray(entry.wrapped)
    tampered[-3] ^= 0x40
    with pytest.raises(WrongKeyError):
        wrapper.unwrap(bytes(tampered), ctx)
    # The plug-in itself (the wrapper adds one format byte in front).
    key = plugin.Pkcs11Key(**opts())
    try:
        blob = entry.wrapped[1:]
        assert blob[0] == plugin.BLOB_VERSION and len(blob) == 1 + 12 + 32 + 16
        assert key.unwrap(blob, ctx) == secret
        for bad_blob, bad_ctx in ((blob, other_ctx), (bytes(tampered[1:]), ctx), (blob[:20], ctx),
                                  (b"\x02" + blob[1:], ctx), (blob[:13] + bytes(48), ctx)):
            with pytest.raises(WrongKeyError):
                key.unwrap(bad_blob, bad_ctx)
        with pytest.raises(WrongKeyError):              # another AES key of the token
            plugin.Pkcs11Key(**opts(key_label="other-kek")).unwrap(blob, ctx)
        assert key.wrap(secret, ctx) != key.wrap(secret, ctx)        # a fresh IV each time
    finally:
        key.close()


def test_concurrent_wraps_share_one_login(hsm):
    # Two objects (two keys of one token) from four threads: one logged-in session, serialised.
    keys = [plugin.Pkcs11Key(**opts()), plugin.Pkcs11Key(**opts(key_label="other-kek"))]
    errors, results = [], []

    def work(n):
        key = keys[n % 2]
        try:
            for i in range(20):
                ctx = b"ctx-%d-%d" % (n, i)
                secret = hashlib.sha256(ctx).digest()
                results.append(key.unwrap(key.wrap(secret, ctx), ctx) == secret)
        except Exception as exc:                         # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors and len(results) == 80 and all(results)
    # Closing one object logs nobody out while the other still uses the token.
    blob = keys[1].wrap(bytes(32), b"c")
    keys[0].close()
    assert keys[1].unwrap(blob, b"c") == bytes(32)
    keys[1].close()
    assert keys[1].unwrap(blob, b"c") == bytes(32)      # a closed object logs in again when used
    keys[1].close()


# ---------------------------------------------------------------------------
# 6: error mapping
# ---------------------------------------------------------------------------

def test_token_gone_is_unavailable_and_changes_nothing(hsm, tmp_path):
    # Staged in a child process (tests/kms_pkcs11_server.py): SoftHSM2 keeps a token it once found
    # unreadable failed until the library is initialised again, and this process's tokens must stay up.
    options = opts(token_label="outage", key_label="outage-kek", pin=None, pin_env="WC_OUTAGE_PIN")
    fine = opts(pin=None, pin_env="WC_FINE_PIN")
    res = _run(os.path.join(TESTS, "kms_pkcs11_server.py"), "outage", str(tmp_path / "data"), hsm["outage_dir"],
               json.dumps(options), json.dumps(fine), env={"WC_OUTAGE_PIN": OUTAGE_PIN, "WC_FINE_PIN": PIN})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"same_kms": "KeyProviderUnavailableError",     # the session and key handle of before
                   "new_kms": "KeyProviderUnavailableError",      # a new plug-in object, a new lookup
                   "other_token": None,                           # the other tokens still answer
                   "unchanged": True}
    assert os.path.isdir(hsm["outage_dir"])
    for secret in SECRETS:
        assert secret not in res.stdout + res.stderr


def test_no_such_token_is_a_configuration_error(hsm, tmp_path):
    # A second store pointed at a token label that no slot holds: a configuration error, not retried.
    d = str(tmp_path / "data")
    missing = walcrypt.Kms("pkcs11", retry=walcrypt.Retry(attempts=3, delay=0.05), **opts(token_label="no-such-token"))
    with pytest.raises(KeyProviderError) as err:
        walcrypt.open(d, kek=missing)
    assert not isinstance(err.value, (KeyProviderUnavailableError, WrongKeyError))
    assert "no-such-token" in str(err.value) and "walcrypt" in str(err.value)     # names the tokens present
    with pytest.raises(KeyProviderError) as err:       # the plug-in by itself
        plugin.Pkcs11Key(**opts(token_label="no-such-token")).unwrap(b"\x01" + bytes(60), b"c")
    assert not isinstance(err.value, (KeyProviderUnavailableError, WrongKeyError))


def test_wrong_pin(hsm, tmp_path):
    # On a token no session of this process is logged in to, the token itself refuses the PIN ...
    wrong = plugin.Pkcs11Key(**opts(token_label="pintest", key_label="pintest-kek", pin="0000-wrong"))
    with pytest.raises(KeyProviderError) as err:
        wrong.wrap(bytes(32), b"ctx")
    assert type(err.value) is not KeyProviderUnavailableError and "incorrect" in str(err.value)
    with pytest.raises(KeyProviderError, match="not presented again"):
        wrong.wrap(bytes(32), b"ctx")                   # ... once: a token locks after a few wrong PINs
    wrong.close()
    good = plugin.Pkcs11Key(**opts(token_label="pintest", key_label="pintest-kek", pin=PINTEST_PIN))
    assert good.unwrap(good.wrap(bytes(32), b"c"), b"c") == bytes(32)
    good.close()
    # ... and a store opened with a wrong PIN while this process is logged in is refused as well.
    d = str(tmp_path / "data")
    with filled_store(d, kms()):
        pass
    before = wctest.tree_bytes(d)
    for k in (kms(pin="0000-wrong"), kms(pin=None, pin_env="WC_TEST_NO_SUCH_PIN_VAR")):
        with pytest.raises(KeyProviderError) as err:
            walcrypt.open(d, kek=k)
        assert not isinstance(err.value, (KeyProviderUnavailableError, WrongKeyError))
    assert wctest.tree_bytes(d) == before


def test_another_key_is_wrong_key(hsm, tmp_path):
    d = str(tmp_path / "data")
    with filled_store(d, kms()):
        pass
    before = wctest.tree_bytes(d)
    with pytest.raises(WrongKeyError):
        walcrypt.open(d, kek=kms(key_label="other-kek"))
    assert wctest.tree_bytes(d) == before


@pytest.mark.parametrize("label, why", [("extractable", "extractable"), ("aes-128", "AES-256"),
                                        ("not-aes", "no secret key|AES-256"), ("twice", "2 secret keys"),
                                        ("missing", "no secret key")])
def test_unfit_keys_are_refused(hsm, label, why):
    key = plugin.Pkcs11Key(**opts(key_label=label))
    try:
        with pytest.raises(KeyProviderError, match=why) as err:
            key.wrap(bytes(32), b"ctx")
        assert not isinstance(err.value, KeyProviderUnavailableError)
    finally:
        key.close()


def test_bad_options(hsm, tmp_path):
    cases = [
        (dict(module=str(tmp_path / "nope.so")), "does not exist"),
        (dict(pin=None), "pin, pin_env .* and pin_file"),
        (dict(pin_env="X"), "exactly one of the options pin"),
        (dict(key_id="zz", key_label=None), "hex"),
        (dict(key_id="01"), "exactly one of the options key_label and key_id"),
        (dict(token_label=None), "token_label"),
        (dict(colour="blue"), "unknown pkcs11 option"),
    ]
    for over, why in cases:
        with pytest.raises(KeyProviderError, match=why):
            plugin.Pkcs11Key(**opts(**over))
    not_a_module = tmp_path / "fake.so"
    not_a_module.write_bytes(b"\x7fELF not really")
    for path in (str(not_a_module), "/lib/x86_64-linux-gnu/libz.so.1"):
        if os.path.exists(path):
            with pytest.raises(KeyProviderError, match="not a PKCS#11 library"):
                plugin.Pkcs11Key(**opts(module=path)).wrap(bytes(32), b"c")
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    key = plugin.Pkcs11Key(**opts(pin=None, pin_file=str(pin_file)))
    assert key.unwrap(key.wrap(bytes(32), b"c"), b"c") == bytes(32)
    key.close()
    # Through Kms: a configuration error is raised at once, not retried as an outage.
    with pytest.raises(KeyProviderError) as err:
        walcrypt.open(str(tmp_path / "d"), kek=walcrypt.Kms("pkcs11", **opts(pin=None)))
    assert not isinstance(err.value, KeyProviderUnavailableError)


# ---------------------------------------------------------------------------
# 7: the command line
# ---------------------------------------------------------------------------

def _wc(*args, env=None):
    return _run("-m", "walcrypt", *args, env=env)


def test_cli(hsm, tmp_path):
    d = str(tmp_path / "node")
    env = {"WALCRYPT_HSM_PIN": PIN}
    kms_args = ["--kms", "pkcs11", "--kms-option", f"module={MODULE}", "--kms-option", "token_label=walcrypt",
                "--kms-option", "key_label=walcrypt-kek", "--kms-option", "pin_env=WALCRYPT_HSM_PIN"]
    outputs = []

    def run(*args, code=0, env=env):
        res = _wc(*args, env=env)
        outputs.append(res.stdout + res.stderr)
        assert res.returncode == code, res.stdout + res.stderr
        return res

    run("init", d, *kms_args)
    run("verify", d, *kms_args)
    text = run("inspect", d, *kms_args).stdout
    assert "kms (pkcs11)" in text           # the key's name: test_inspect_names_the_kms_key (engine)
    doc = json.loads(run("inspect", d, *kms_args, "--json").stdout)
    assert doc["kek"]["kind"] == "kms" and doc["kek"]["plugin"] == "pkcs11"
    expected = K.kms_fingerprint("pkcs11", {"token": "walcrypt", "key": "walcrypt-kek"})
    assert run("key", "fingerprint", *kms_args).stdout.split()[0] == expected
    assert f"fingerprint {expected}" in run("key", "fingerprint", d, *kms_args).stdout
    other_fp = K.kms_fingerprint("pkcs11", {"token": "walcrypt", "key": "other-kek"})
    assert other_fp != expected
    # A wrong PIN reaches the token in the command's own process: a key error (exit 2), not an outage.
    res = run("verify", d, *kms_args, code=2, env={"WALCRYPT_HSM_PIN": "0000-wrong"})
    assert "incorrect" in res.stdout + res.stderr
    # Another key of the token: refused as the wrong key (exit 2).
    other = [a.replace("key_label=walcrypt-kek", "key_label=other-kek") for a in kms_args]
    run("verify", d, *other, code=2)
    # A token label that does not exist: a configuration error, not an outage (exit 2, not 3).
    missing = [a.replace("token_label=walcrypt", "token_label=absent") for a in kms_args]
    run("verify", d, *missing, code=2)
    for out in outputs:
        for secret in SECRETS:
            assert secret not in out


def test_inspect_names_the_kms_key(hsm, tmp_path):
    d = str(tmp_path / "node")
    with filled_store(d, kms()):
        pass
    res = _wc("inspect", d, "--json")
    assert res.returncode == 0, res.stderr
    kek = json.loads(res.stdout)["kek"]
    assert kek.get("key") == {"token": "walcrypt", "key": "walcrypt-kek"}
    assert kek.get("fingerprint") == K.kms_fingerprint("pkcs11", {"token": "walcrypt", "key": "walcrypt-kek"})
    text = _wc("inspect", d).stdout
    assert "walcrypt-kek" in text


# ---------------------------------------------------------------------------
# 8: secrets never shown
# ---------------------------------------------------------------------------

def test_secrets_never_shown(hsm, tmp_path):
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN)
    os.environ["WC_TEST_HSM_PIN"] = PIN
    try:
        keys = [plugin.Pkcs11Key(**opts()), plugin.Pkcs11Key(**opts(pin=None, pin_env="WC_TEST_HSM_PIN")),
                plugin.Pkcs11Key(**opts(pin=None, pin_file=str(pin_file)))]
    finally:
        del os.environ["WC_TEST_HSM_PIN"]
    texts = []
    for key in keys:
        key.wrap(bytes(32), b"c")
        texts += [repr(key), str(key), repr(vars(key)), json.dumps(key.identity())]
        key.close()
    k = kms()
    texts += [repr(k), k.describe(), repr(k.load()), repr(k.wrapper(None))]
    for attempt in (lambda: plugin.Pkcs11Key(**opts(pin="0000-wrong", token_label="pintest",
                                                     key_label="pintest-kek")).wrap(bytes(32), b"c"),
                    lambda: plugin.Pkcs11Key(**opts(pin=PIN + "x")).wrap(bytes(32), b"c"),
                    lambda: plugin.Pkcs11Key(**opts(key_label="other-kek")).unwrap(b"\x01" + bytes(60), b"c"),
                    lambda: plugin.Pkcs11Key(**opts(key_label="extractable")).wrap(bytes(32), b"c")):
        with pytest.raises(walcrypt.WalcryptError) as err:
            attempt()
        texts.append(str(err.value))
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(keys[0])
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    assert keys[0].identity() == {"token": "walcrypt", "key": "walcrypt-kek"}
