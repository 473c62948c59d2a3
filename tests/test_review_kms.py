"""Findings of an adversarial review of the key-service (KMS) KEK providers and of the engine's
handling of them: outages during DEK rotations put off and retried, a queued rotation, the full
re-key and the KEK rotation next to a slow service, the Vault plug-in's error mapping, and what the
CLI prints from hostile or mistyped input.

Each test reproduces one break with real files, real LMDB and real threads (the key service is the
in-process ``FlakyService`` of tests/test_kms_outage.py, or a misbehaving HTTP peer on 127.0.0.1),
and asserts what FORMAT.md 8.1/8.5 and the README's "Key services" promise.  Each was a strict
xfail on the code it was written against; all pass since their fixes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import walcrypt
import walcrypt.rotation as R
from walcrypt import KeyProviderError, KeyProviderUnavailableError, Kms, RawKey, Retry, SnapshotMeta
from walcrypt import keys as K
from walcrypt import meta as M

import wctest
from test_kms_outage import CS, FlakyService, fill, kms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_WAIT = Retry(attempts=3, delay=0.0)


class HangingService(FlakyService):
    """A service whose wrap hangs (until released) and then fails as a network would, once
    ``hanging`` is set: a KMS call in flight that the test can hold open deterministically."""

    def __init__(self):
        super().__init__()
        self.hanging = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        if self.hanging:
            self.entered.set()
            self.release.wait(20)
            raise ConnectionRefusedError(111, "Connection refused")
        return super().wrap(plaintext, context)


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WALCRYPT_", "VAULT_", "BAO_"))}
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "walcrypt", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=120)


# -------------------------------------------------------------------------------------------------
# 1. A put-off budget rotation is retried in full (every attempt, every sleep) at each segment cut
# -------------------------------------------------------------------------------------------------

def test_a_put_off_budget_rotation_is_not_retried_in_full_at_every_segment(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "DEFER_FIRST_WAIT_S", 60.0)      # no retry is due during this test
    svc = FlakyService()
    with walcrypt.open(str(tmp_path / "d"), kek=kms(svc, NO_WAIT), segment_size=1 << 16,
                       max_records_per_dek=5) as s:
        svc.up = False
        calls = svc.calls
        for i in range(1, 101, 10):                          # about three segment cuts
            fill(s, i, i + 10, length=2000)
        assert s.key_info()["deferred"] is not None and not s.wal.failed
        # The first attempt may use the whole retry schedule (3 calls); after that the deferral's
        # backoff (60 s here) decides when the service is asked again.
        assert svc.calls - calls <= NO_WAIT.attempts, \
            f"{svc.calls - calls} calls to a service that is down within one backoff interval"


# -------------------------------------------------------------------------------------------------
# 2. A queued DEK rotation started by a snapshot's commit during an outage fails the store
# -------------------------------------------------------------------------------------------------

def test_a_queued_rotation_started_during_an_outage_is_put_off_not_a_failed_store(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "DEFER_FIRST_WAIT_S", 0.0)
    svc = FlakyService()
    with walcrypt.open(str(tmp_path / "d"), kek=kms(svc, NO_WAIT)) as s:
        fill(s, 1, 11)
        s.rotate_dek()                                       # in flight: waits for a snapshot
        s.rotate_dek()                                       # queued behind it (no key needed yet)
        assert s.key_info()["rotation"]["queued"] == 1
        svc.up = False
        s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")     # completes the first rotation
        assert not s.wal.failed, f"the store was failed by an outage: {s.wal.failed}"
        fill(s, 11, 21)                                      # writes go on
        info = s.key_info()
        assert info["deferred"] is not None or info["rotation"] is not None, "the queued rotation was lost"
        svc.up = True
        fill(s, 21, 22)                                      # the retry, once the service is back
        assert s.key_info()["rotation"] is not None, "the queued rotation never started"
        assert s.entries(11, 22) == wctest.make_entries(11, 22)     # (the snapshot at 10 compacted 1..10)


# -------------------------------------------------------------------------------------------------
# 3. A put-off rotation whose retry meets a refusal raises from every save, asking every time
# -------------------------------------------------------------------------------------------------

def test_a_put_off_rotation_meeting_a_refusal_does_not_fail_every_save(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "DEFER_FIRST_WAIT_S", 0.5)
    svc = FlakyService()
    with walcrypt.open(str(tmp_path / "d"), kek=kms(svc, NO_WAIT)) as s:
        fill(s, 1, 11)
        svc.up = False
        s.rotate_dek()                                       # put off
        assert s.key_info()["deferred"] is not None
        svc.up, svc.fail_with = True, PermissionError("permission denied")    # back, but refusing
        time.sleep(0.6)                                      # the first retry is due
        raised, calls = 0, svc.calls
        for i in range(11, 16):
            try:
                fill(s, i, i + 1)
            except KeyProviderError:
                raised += 1
        assert s.last_index() == 15 and not s.wal.failed
        # Reporting the refusal once is acceptable; failing every save (and asking each time) is not.
        assert raised <= 1, f"{raised} of 5 saves raised although their entries are durable"
        assert svc.calls - calls <= 1, f"{svc.calls - calls} calls in a row to a refusing service"


# -------------------------------------------------------------------------------------------------
# 4. vault-transit: a connection broken in the middle of the answer is a wrong key
# -------------------------------------------------------------------------------------------------

class _BrokenAnswers:
    """An HTTP peer on 127.0.0.1 that announces a 500-byte JSON answer, sends 14 bytes and hangs up
    (a proxy or server restarting mid-response)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                                 b'{"data": {"pla')
                except OSError:
                    pass

    def close(self):
        self.sock.close()
        self.thread.join(10)


def test_vault_connection_broken_mid_answer_is_an_outage():
    pytest.importorskip("hvac")
    peer = _BrokenAnswers()
    try:
        kek = Kms("vault-transit", retry=Retry(attempts=2, delay=0.0), key="node1",
                  addr=f"http://127.0.0.1:{peer.port}", token="s.not-a-real-token", timeout="5")
        w = kek.wrapper(None)
        ctx = K.wrap_context(bytes(16), bytes(range(16)), K.PURPOSE_DEK)
        with pytest.raises(KeyProviderUnavailableError):
            w.unwrap(bytes([K.WRAP_VERSION_KMS]) + b"vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", ctx)
        with pytest.raises(KeyProviderUnavailableError):
            w.wrap(bytes(32), ctx)
    finally:
        peer.close()


# -------------------------------------------------------------------------------------------------
# 5. A full re-key holds snapshot writers back while it waits on the key service
# -------------------------------------------------------------------------------------------------

def test_rekey_does_not_hold_snapshot_writers_back_while_the_service_hangs(tmp_path):
    svc = HangingService()
    with walcrypt.open(str(tmp_path / "d"), kek=kms(svc, Retry(attempts=1))) as s:
        fill(s, 1, 11)
        svc.hanging = True
        errors = []

        def rekey():
            try:
                s.rekey()
            except KeyProviderUnavailableError:
                pass
            except BaseException as exc:     # noqa: BLE001 - reported below
                errors.append(exc)

        t = threading.Thread(target=rekey)
        saved = threading.Event()

        def snapshot():
            try:
                s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")
            finally:
                saved.set()

        t2 = threading.Thread(target=snapshot)
        try:
            t.start()
            assert svc.entered.wait(10), "the re-key never asked the service"
            t2.start()
            done_while_hanging = saved.wait(3)
        finally:
            svc.release.set()
            t.join(20)
            t2.join(20)
        assert not errors, errors
        assert done_while_hanging, "save_snapshot waited on the re-key's call to the key service"


# -------------------------------------------------------------------------------------------------
# 6. A KEK rotation queued behind a DEK rotation's KMS call holds snapshot writers back meanwhile
# -------------------------------------------------------------------------------------------------

def test_kek_rotation_behind_a_hanging_dek_rotation_does_not_stall_snapshots(tmp_path):
    svc = HangingService()
    with walcrypt.open(str(tmp_path / "d"), kek=kms(svc, Retry(attempts=1))) as s:
        fill(s, 1, 11)
        svc.hanging = True
        errors = []

        def run(fn):
            try:
                fn()
            except BaseException as exc:     # noqa: BLE001 - reported below
                errors.append(exc)

        t_dek = threading.Thread(target=run, args=(s.rotate_dek,))
        t_kek = threading.Thread(target=run, args=(lambda: s.rotate_kek(RawKey(wctest.KEK_BYTES)),))
        saved = threading.Event()

        def snapshot():
            try:
                run(lambda: s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10"))
            finally:
                saved.set()

        t_snap = threading.Thread(target=snapshot)
        try:
            t_dek.start()
            assert svc.entered.wait(10), "the DEK rotation never asked the service"
            t_kek.start()
            deadline = time.monotonic() + 3             # let the KEK rotation get as far as it goes
            while time.monotonic() < deadline and s.snapshots._rotating_by is None and t_kek.is_alive():
                time.sleep(0.01)
            t_snap.start()
            done_while_hanging = saved.wait(3)
        finally:
            svc.release.set()
            for t in (t_dek, t_kek, t_snap):
                if t.ident is not None:
                    t.join(20)
        assert not [e for e in errors if not isinstance(e, walcrypt.UsageError)], errors
        assert done_while_hanging, "save_snapshot waited on another thread's call to the key service"


# -------------------------------------------------------------------------------------------------
# 7. inspect prints C1 control characters (a CSI) from a hostile store/kek_params
# -------------------------------------------------------------------------------------------------

def test_inspect_does_not_print_control_characters_from_a_hostile_kms_identity(tmp_path):
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=RawKey(wctest.KEK_BYTES)) as s:
        fill(s, 1, 3)
        hostile = {"kind": "kms", "plugin": "vault-transit", "version": 3,
                   "key": {"mount": "transit", "key": "node1\x9b2J\x9b31mOK\x7f"}}
        with s.meta.write() as tx:                           # what an attacker with write access does
            tx.put_raw(M.DB_STORE, M.K_KEK_PARAMS, json.dumps(hostile).encode())
    res = _cli("inspect", path)
    assert "Traceback" not in res.stderr, res.stderr
    out = res.stdout + res.stderr
    bad = sorted({hex(ord(c)) for c in out if ord(c) == 0x7f or 0x80 <= ord(c) <= 0x9f})
    assert not bad, f"inspect printed control characters {bad} taken from store/kek_params"


# -------------------------------------------------------------------------------------------------
# 8. A mistyped --kms-option is echoed whole: the secret it carries goes to stderr
# -------------------------------------------------------------------------------------------------

def test_a_mistyped_kms_option_does_not_echo_its_secret(tmp_path):
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=RawKey(wctest.KEK_BYTES)) as s:
        fill(s, 1, 3)
    secret = "hvs.TOPSECRETTOKEN0123456789"
    for typo in (f"token:{secret}", f"token {secret}"):
        res = _cli("inspect", path, "--kms", "vault-transit", "--kms-option", typo,
                   "--kms-option", "key=node1", "--kms-option", "addr=http://127.0.0.1:9")
        assert res.returncode == 2, (res.returncode, res.stderr)
        assert "Traceback" not in res.stderr, res.stderr
        assert secret not in res.stdout + res.stderr, f"the secret was echoed: {res.stderr.strip()}"
