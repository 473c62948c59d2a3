"""The ``kmip`` KMS plug-in against PyKMIP's own server, started here on 127.0.0.1 (a free port) with
a CA, server and client certificates made by the test (tests/kms_kmip_server.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("kmip", reason="PyKMIP (walcrypt[kmip]) is not installed")

import walcrypt
from walcrypt import Entry, HardState, KeyProviderError, KeyProviderUnavailableError, WrongKeyError
from walcrypt import keys as K
from walcrypt.backup import export_snapshot, restore_export
from walcrypt.kms.kmip import KmipKey

import kms_kmip_server as S
import snaptest as T
import wctest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = walcrypt.Retry(attempts=2, delay=0.05)


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return S.make_pki(tmp_path_factory.mktemp("kmip-pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    srv = S.KmipTestServer(tmp_path_factory.mktemp("kmip-server"), pki)
    try:
        srv.start()
    except Exception:
        srv.stop()
        raise
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def key_ids(server):
    return {"main": S.create_key(server), "other": S.create_key(server)}


def options(server, key_id, **over) -> dict:
    pki = server.pki
    opts = {"host": S.HOST, "port": str(server.port), "key_id": key_id, "client_cert": pki.client_cert,
            "client_key": pki.client_key, "ca_cert": pki.ca}
    opts.update(over)
    return opts


@pytest.fixture
def opts(server, key_ids):
    return options(server, key_ids["main"])


def kms(opts, **over):
    return walcrypt.Kms("kmip", retry=FAST, **{**opts, **over})


def secrets_of(pki) -> list[str]:
    """What must never be shown: the client's private key (its PEM body lines)."""
    with open(pki.client_key) as f:
        body = [ln for ln in f.read().splitlines() if ln and not ln.startswith("-----")]
    return body


def fill(store, lo, hi):
    for a in range(lo, hi, 10):
        ents = [Entry(i, 1 + i // 50, b"entry-%d-" % i + os.urandom(8).hex().encode()) for i in range(a, min(hi, a + 10))]
        store.save(hard_state=HardState(ents[-1].term, 2, ents[-1].index), entries=ents)


def read_all(store):
    return store.entries(store.first_index(), store.last_index() + 1), store.initial_state()[0]


# ------------------------------------------------------------------------------- 1. a store on the KEK

def test_store_roundtrip(tmp_path, opts):
    d = str(tmp_path / "s")
    with walcrypt.open(d, kek=kms(opts)) as s:
        fill(s, 1, 41)
        before = read_all(s)
        assert s.kek_params["plugin"] == "kmip" and s.kek_params["key"] == {"key_id": opts["key_id"]}
    with walcrypt.open(d, kek=kms(opts)) as s:
        ents, hs = read_all(s)
    assert [(e.index, e.term, bytes(e.data)) for e in ents] == [(e.index, e.term, bytes(e.data)) for e in before[0]]
    assert hs == before[1] == HardState(1, 2, 40)


# ----------------------------------------------------------------------------------------- 2. DEK rotation

def test_rotate_dek_then_snapshot(tmp_path, opts):
    d = str(tmp_path / "s")
    with T.open_store(d, kms(opts)) as s:
        fill(s, 1, 61)
        old = T.active_key(s)
        s.rotate_dek()
        T.save_snap(s, 60)
        new = T.active_key(s)
        assert new != old and s.key_info()["rotation"] is None
        fill(s, 61, 81)
        after = s.entries(61, 81)
    with T.open_store(d, kms(opts)) as s:
        assert T.active_key(s) == new
        assert s.snapshot().data == T.snap_data(60)
        assert s.entries(61, 81) == after


# ----------------------------------------------------------------------------------------- 3. KEK rotation

def test_rotate_kek_to_local_key_and_back(tmp_path, opts):
    d = str(tmp_path / "s")
    raw = walcrypt.RawKey(os.urandom(32))
    with walcrypt.open(d, kek=kms(opts)) as s:
        fill(s, 1, 21)
        before = read_all(s)
        s.rotate_kek(raw)
    with pytest.raises(WrongKeyError):
        walcrypt.open(d, kek=kms(opts))
    with walcrypt.open(d, kek=raw) as s:
        assert read_all(s) == before
        s.rotate_kek(kms(opts))
    with pytest.raises(WrongKeyError):
        walcrypt.open(d, kek=raw)
    with walcrypt.open(d, kek=kms(opts)) as s:
        assert read_all(s) == before


def test_local_key_for_a_kms_store_is_a_wrong_key(store_dir):
    with pytest.raises(WrongKeyError):
        walcrypt.open(store_dir, kek=walcrypt.RawKey(os.urandom(32)))


# ----------------------------------------------------------------------------------- 4. export and restore

def test_export_and_restore(tmp_path, opts):
    d, out, target = str(tmp_path / "s"), str(tmp_path / "n1.wcx"), str(tmp_path / "restored")
    with T.open_store(d, kms(opts)) as s:
        fill(s, 1, 31)
        T.save_snap(s, 30)
        export_snapshot(s, out)
    restore_export(out, target, kek=kms(opts))
    with T.open_store(target, kms(opts)) as s:
        snap = s.snapshot()
        assert snap.meta.index == 30 and snap.data == T.snap_data(30)
    other = str(tmp_path / "restored-raw")
    raw = walcrypt.RawKey(os.urandom(32))
    restore_export(out, other, kek=kms(opts), new_kek=raw)
    with T.open_store(other, raw) as s:
        assert s.snapshot().data == T.snap_data(30)


# -------------------------------------------------------------------- 5. a wrapped key is bound to its store

def test_wrapped_keys_are_bound_to_the_store(tmp_path, opts, key_ids, server):
    d = str(tmp_path / "s")
    with walcrypt.open(d, kek=kms(opts)) as s:
        fill(s, 1, 11)
        store_id = s.store_id
        entry = next(k for k in s.keys.values() if k.purpose == K.PURPOSE_DEK)
    ctx = K.wrap_context(store_id, entry.key_id, entry.purpose)
    other_ctx = K.wrap_context(bytes(b ^ 0xFF for b in store_id), entry.key_id, entry.purpose)
    wrapper = kms(opts).wrapper(None)
    plug = KmipKey(**opts)
    assert len(wrapper.unwrap(entry.wrapped, ctx)) == 32
    assert plug.unwrap(entry.wrapped[1:], ctx) == wrapper.unwrap(entry.wrapped, ctx)
    with pytest.raises(WrongKeyError):
        wrapper.unwrap(entry.wrapped, other_ctx)
    with pytest.raises(WrongKeyError):
        plug.unwrap(entry.wrapped[1:], other_ctx)
    with pytest.raises(WrongKeyError):            # another purpose of the same key ID
        plug.unwrap(entry.wrapped[1:], K.wrap_context(store_id, entry.key_id, K.PURPOSE_META))
    blob = entry.wrapped[1:]
    for pos in (1, 1 + 12, len(blob) - 1):        # the nonce, the tag, the ciphertext
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(WrongKeyError):
            plug.unwrap(bytes(bad), ctx)
        with pytest.raises(WrongKeyError):
            wrapper.unwrap(entry.wrapped[:1] + bytes(bad), ctx)
    with pytest.raises(WrongKeyError):            # truncated
        plug.unwrap(blob[:-1], ctx)
    with pytest.raises(WrongKeyError):            # another key on the same server, asked directly
        KmipKey(**options(server, key_ids["other"])).unwrap(blob, ctx)
    # two wraps of the same key differ (fresh nonce) and both open
    w1, w2 = plug.wrap(b"k" * 32, ctx), plug.wrap(b"k" * 32, ctx)
    assert w1 != w2 and plug.unwrap(w1, ctx) == plug.unwrap(w2, ctx) == b"k" * 32


# ------------------------------------------------------------------------------------- 6. error mapping

def _snapshot_of_files(root):
    # every file's bytes, except LMDB's lock file (a reader table, rewritten by any open)
    return {p: wctest.read(p) for p in wctest.all_files(root) if os.path.basename(p) != "lock.mdb"}


def _assert_refused_unchanged(d, kek, exc_type):
    before = _snapshot_of_files(d)
    with pytest.raises(exc_type) as info:
        walcrypt.open(d, kek=kek)
    assert type(info.value) is exc_type, repr(info.value)
    assert _snapshot_of_files(d) == before
    return info.value


@pytest.fixture
def store_dir(tmp_path, opts):
    d = str(tmp_path / "s")
    with walcrypt.open(d, kek=kms(opts)) as s:
        fill(s, 1, 11)
    return d


def test_unreachable_server_is_unavailable_and_changes_nothing(store_dir, opts):
    exc = _assert_refused_unchanged(store_dir, kms(opts, port=str(S.free_port())), KeyProviderUnavailableError)
    assert "kmip" in str(exc)


def test_silent_server_times_out_as_unavailable(store_dir, opts):
    with socket.socket() as listener:          # accepts TCP (kernel backlog) but never speaks TLS
        listener.bind((S.HOST, 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        exc = _assert_refused_unchanged(store_dir, kms(opts, port=str(port), timeout="0.3"),
                                        KeyProviderUnavailableError)
    assert "did not answer" in str(exc)


def test_stopped_server_is_unavailable(tmp_path, pki):
    srv = S.KmipTestServer(tmp_path / "srv2", pki)
    try:
        srv.start()
        o = options(srv, S.create_key(srv))
        d = str(tmp_path / "s")
        with walcrypt.open(d, kek=kms(o)) as s:
            fill(s, 1, 11)
    finally:
        srv.stop()
    _assert_refused_unchanged(d, kms(o), KeyProviderUnavailableError)


@pytest.mark.parametrize("creds", ["foreign_client_cert", "untrusted_server", "no_client_auth_usage"])
def test_wrong_credentials_are_provider_errors(store_dir, opts, pki, creds):
    over = {"foreign_client_cert": {"client_cert": pki.foreign_cert, "client_key": pki.foreign_key},
            "untrusted_server": {"ca_cert": pki.foreign_ca},
            "no_client_auth_usage": {"client_cert": pki.noauth_cert, "client_key": pki.noauth_key}}[creds]
    _assert_refused_unchanged(store_dir, kms(opts, **over), KeyProviderError)


def test_hostname_is_verified(tmp_path, pki):
    """A server whose certificate (from the trusted CA) names another host is refused, unless
    verify_hostname=false."""
    srv = S.KmipTestServer(tmp_path / "srv-misnamed", pki, misnamed=True)
    try:
        srv.start()
        o = options(srv, "1")
        with pytest.raises(KeyProviderError) as info:
            KmipKey(**o).wrap(b"k" * 32, b"ctx")
        assert type(info.value) is KeyProviderError and "does not verify" in str(info.value)
        with pytest.raises(KeyProviderError, match="not found"):    # TLS passes; no key 1 on this server
            KmipKey(**o, verify_hostname="false").wrap(b"k" * 32, b"ctx")
    finally:
        srv.stop()


def test_another_key_is_a_wrong_key(store_dir, server, key_ids):
    # the stored identity names the key: refused before the server is asked
    _assert_refused_unchanged(store_dir, kms(options(server, key_ids["other"])), WrongKeyError)


def test_unknown_or_inactive_keys_are_provider_errors(store_dir, server, opts):
    _assert_refused_unchanged(store_dir, kms(opts, key_id="no-such-key"), WrongKeyError)   # identity differs
    with pytest.raises(KeyProviderError, match="not found"):
        KmipKey(**{**opts, "key_id": "4242"}).wrap(b"k" * 32, b"ctx")
    revoked = S.create_key(server)
    plug = KmipKey(**options(server, revoked))
    blob = plug.wrap(b"k" * 32, b"ctx")
    S.revoke_key(server, revoked)
    for call in (lambda: plug.wrap(b"k" * 32, b"ctx"), lambda: plug.unwrap(blob, b"ctx")):
        with pytest.raises(KeyProviderError) as info:
            call()
        assert type(info.value) is KeyProviderError and "permission denied" in str(info.value)
    inactive = S.create_key(server, activate=False)
    with pytest.raises(KeyProviderError, match="permission denied"):
        KmipKey(**options(server, inactive)).wrap(b"k" * 32, b"ctx")


def test_options_are_checked(opts, tmp_path):
    with pytest.raises(KeyProviderError, match="key_id, client_cert"):
        KmipKey(host="h")
    with pytest.raises(KeyProviderError, match="port"):
        KmipKey(**{**opts, "port": "http"})
    with pytest.raises(KeyProviderError, match="timeout"):
        KmipKey(**{**opts, "timeout": "-1"})
    with pytest.raises(KeyProviderError, match="unknown kmip option"):
        KmipKey(**opts, token="x")
    with pytest.raises(KeyProviderError, match="client certificate"):
        KmipKey(**{**opts, "client_key": str(tmp_path / "missing.key")})
    with pytest.raises(KeyProviderError, match="needs the option"):
        walcrypt.open(str(tmp_path / "s"), kek=walcrypt.Kms("kmip", retry=FAST, host="h"))
    assert KmipKey(**opts).identity() == {"key_id": opts["key_id"]}
    assert KmipKey(**{**opts, "port": "5696"}).port == 5696


# ----------------------------------------------------------------------------------------------- 7. CLI

def wc(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCRYPT_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "walcrypt", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_cli(tmp_path, opts, pki):
    d = str(tmp_path / "cli-store")
    kopts = [a for k, v in opts.items() for a in ("--kms-option", f"{k}={v}")]
    outputs = []

    def run(*args, code=0):
        res = wc(*args)
        outputs.append(res.stdout + res.stderr)
        assert res.returncode == code, (args, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr
        return res

    run("init", d, "--kms", "kmip", *kopts)
    run("verify", d, "--kms", "kmip", *kopts)
    assert "KEK            kms (kmip)" in run("inspect", d).stdout
    doc = json.loads(run("inspect", d, "--json").stdout)
    assert doc["kek"]["kind"] == "kms" and doc["kek"]["plugin"] == "kmip"
    fp = K.kms_fingerprint("kmip", {"key_id": opts["key_id"]})
    assert run("key", "fingerprint", "--kms", "kmip", *kopts).stdout.startswith(f"{fp}  KMS plug-in kmip")
    assert f"fingerprint {fp}" in run("key", "fingerprint", "--kms", "kmip", *kopts, d).stdout
    other = [a if not a.startswith("port=") else f"port={S.free_port()}" for a in kopts]
    res = run("verify", d, "--kms", "kmip", *other, "--kms-retries", "1", code=3)
    assert "kmip" in res.stderr
    for out in outputs:
        for line in secrets_of(pki):
            assert line not in out


def test_cli_inspect_names_the_kms_key(tmp_path, opts):
    d = str(tmp_path / "cli-store")
    kopts = [a for k, v in opts.items() for a in ("--kms-option", f"{k}={v}")]
    assert wc("init", d, "--kms", "kmip", *kopts).returncode == 0
    kek = json.loads(wc("inspect", d, "--json").stdout)["kek"]
    assert kek.get("key") == {"key_id": opts["key_id"]}
    assert kek["fingerprint"] == K.kms_fingerprint("kmip", {"key_id": opts["key_id"]})
    assert f"key_id={opts['key_id']}" in wc("inspect", d).stdout


# ------------------------------------------------------------------------------------ 8. no secret shown

def test_no_secret_in_repr_or_messages(opts, pki, server):
    plug = KmipKey(**opts)
    k = kms(opts)
    texts = [repr(plug), str(plug), repr(k), repr(k.wrapper(None)), k.describe()]
    for bad in ({"port": str(S.free_port())}, {"client_cert": pki.foreign_cert, "client_key": pki.foreign_key},
                {"key_id": "4242"}):
        try:
            KmipKey(**{**opts, **bad}).wrap(b"S" * 32, b"ctx")
        except KeyProviderError as exc:
            texts.append(str(exc))
        else:
            pytest.fail(f"{bad} did not fail")
    blob = plug.wrap(b"S" * 32, b"ctx")
    try:
        plug.unwrap(blob, b"other")
    except WrongKeyError as exc:
        texts.append(str(exc))
    for text in texts:
        assert "SSSS" not in text and (b"S" * 32).hex() not in text
        for line in secrets_of(pki):
            assert line not in text


def test_a_server_that_fails_every_decrypt_is_unavailable_not_a_wrong_key(opts, monkeypatch):
    """PyKMIP reports a failed GCM tag as a General Failure; the plug-in tells a bad blob from a failing
    server by a test round trip.  Here every Decrypt fails (the real server still encrypts)."""
    from walcrypt.kms import kmip as mod
    plug = KmipKey(**opts)
    blob = plug.wrap(b"k" * 32, b"ctx")

    def broken(self, blob, context):
        raise mod._OperationFailed(mod.enums.ResultReason.GENERAL_FAILURE, "Operation failed.")
    monkeypatch.setattr(KmipKey, "_decrypt", broken)
    with pytest.raises(KeyProviderUnavailableError):
        plug.unwrap(blob, b"ctx")
