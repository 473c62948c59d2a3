"""A key service that goes away: what the engine promises (FORMAT.md 8.1, README "Key services").

The service here is an in-process plug-in whose availability the test switches (real AES-GCM
wrapping, real files and LMDB), so these run everywhere; tests/test_kms_vault.py shows the same
against a real server that is stopped and started.  An outage is KeyProviderUnavailableError after
the configured retries, never a wrong key or damage; an open store keeps reading and writing; what
needs the service is refused or put off with nothing changed, and completes once it is back."""

from __future__ import annotations

import pytest
import wctest
from wctest import FlakyService

import walcrypt
import walcrypt.rotation as R
from walcrypt import (
    ConfState,
    HardState,
    KeyProviderError,
    KeyProviderUnavailableError,
    Kms,
    RawKey,
    Retry,
    SnapshotMeta,
    WrongKeyError,
)

FAST = Retry(attempts=3, delay=0.0)
CS = ConfState(voters=(1,))


def kms(service: FlakyService, retry: Retry = FAST) -> Kms:
    k = Kms("flaky", retry=retry)
    k._plugin = service            # an in-process plug-in instead of an entry point
    return k


def fill(s, lo: int, hi: int, length: int | None = None) -> None:
    ents = wctest.make_entries(lo, hi, length=length)
    s.save(HardState(1, 1, hi - 1), ents)


def test_an_open_store_keeps_serving_while_its_service_is_down(tmp_path):
    svc = FlakyService()
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=kms(svc)) as s:
        fill(s, 1, 11)
        s.rotate_dek()                                   # a second key: retiring keys are served too
        s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")
    with walcrypt.open(path, kek=kms(svc), segment_size=1 << 16) as s:
        svc.up = False
        calls = svc.calls
        fill(s, 11, 200)                                 # several segments: new segments need no service
        s.stable_set(b"k", b"v")
        assert s.stable_get(b"k") == b"v" and s.entries(11, 200) == wctest.make_entries(11, 200)
        assert s.snapshot().data == b"state at 10"
        assert svc.calls == calls, "the open store asked the service"


def test_opening_while_the_service_is_down_changes_nothing(tmp_path):
    svc = FlakyService()
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=kms(svc)) as s:
        fill(s, 1, 11)
    before = wctest.tree_bytes(path)
    svc.up = False
    calls = svc.calls
    with pytest.raises(KeyProviderUnavailableError) as ei:
        walcrypt.open(path, kek=kms(svc))
    assert "3 attempt(s)" in str(ei.value) and "Nothing was changed" in str(ei.value)
    assert svc.calls - calls == 3
    assert wctest.tree_bytes(path) == before
    svc.up = True
    with walcrypt.open(path, kek=kms(svc)) as s:
        assert s.entries(1, 11) == wctest.make_entries(1, 11)


def test_a_budget_rotation_during_an_outage_is_put_off_and_done_when_the_service_returns(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "DEFER_FIRST_WAIT_S", 0.0)
    svc = FlakyService()
    path = str(tmp_path / "d")
    sources = []

    def source(store):
        sources.append(store.last_index())
        return SnapshotMeta(store.last_index(), 1, CS), b"state at %d" % store.last_index()

    with walcrypt.open(path, kek=kms(svc), segment_size=1 << 16, max_records_per_dek=5,
                       snapshot_source=source) as s:
        first = s.active_key_id()
        svc.up = False
        for i in range(1, 200, 10):                     # the budget is reached: every save still succeeds
            fill(s, i, i + 10, length=2000)
        assert s.key_info()["deferred"]["reason"] == "key budget reached"
        assert s.active_key_id() == first and not sources and not s.wal.failed
        svc.up = True
        fill(s, 200, 210, length=2000)                   # the retry: new key, then the host's snapshot
        assert sources and s.active_key_id() != first and s.key_info()["deferred"] is None
        assert s.entries(s.first_index(), 210) == wctest.make_entries(s.first_index(), 210, length=2000)
    with walcrypt.open(path, kek=kms(svc)) as s:
        assert s.last_index() == 209


def test_a_kek_rotation_to_an_unreachable_service_changes_nothing(tmp_path):
    path = str(tmp_path / "d")
    local = RawKey(wctest.KEK_BYTES)
    with walcrypt.open(path, kek=local) as s:
        fill(s, 1, 11)
        s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")
        before = wctest.tree_bytes(path)
        svc = FlakyService()
        svc.up = False
        with pytest.raises(KeyProviderUnavailableError):
            s.rotate_kek(kms(svc))
        fill(s, 11, 21)                                  # the store was not failed
    with walcrypt.open(path, kek=local) as s:           # the old KEK still opens it
        assert s.entries(11, 21) == wctest.make_entries(11, 21)
    assert set(wctest.tree_bytes(path)) >= {k for k in before if "snap" in k}


def test_a_kek_rotation_away_from_a_service_that_is_down_needs_only_the_new_key(tmp_path):
    svc = FlakyService()
    path = str(tmp_path / "d")
    local = RawKey(wctest.KEK_BYTES)
    with walcrypt.open(path, kek=kms(svc)) as s:
        fill(s, 1, 11)
        s.save_snapshot(SnapshotMeta(10, 1, CS), b"state at 10")
        svc.up = False                                   # the old service is gone for good
        s.rotate_kek(local)                              # every key was unwrapped at open
    with walcrypt.open(path, kek=local) as s:
        assert s.entries(1, 11) == wctest.make_entries(1, 11) and s.snapshot().data == b"state at 10"


def test_a_rekey_during_an_outage_changes_nothing(tmp_path):
    svc = FlakyService()
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=kms(svc)) as s:
        fill(s, 1, 11)
        key = s.active_key_id()
        svc.up = False
        with pytest.raises(KeyProviderUnavailableError):
            s.rekey()
        fill(s, 11, 21)
        assert s.active_key_id() == key
    svc.up = True
    with walcrypt.open(path, kek=kms(svc)) as s:
        assert s.entries(1, 21) == wctest.make_entries(1, 21)


@pytest.mark.parametrize("exc", [ConnectionResetError(104, "reset"), TimeoutError("timed out"),
                                 KeyProviderUnavailableError("sealed")])
def test_an_outage_is_retried_then_the_rotation_put_off(tmp_path, exc):
    svc = FlakyService()
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=kms(svc)) as s:
        svc.fail_with = exc
        calls = svc.calls
        s.rotate_dek()                                   # wraps a new key: retried, then put off
        assert s.key_info()["deferred"] is not None and svc.calls - calls == FAST.attempts
        svc.fail_with = None
        fill(s, 1, 11)


@pytest.mark.parametrize("exc", [PermissionError(13, "denied"), ValueError("bad request"),
                                 KeyProviderError("no such key")])
def test_a_service_error_that_is_not_an_outage_is_raised_at_once(tmp_path, exc):
    svc = FlakyService()
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=kms(svc)) as s:
        fill(s, 1, 11)
        svc.fail_with = exc
        calls = svc.calls
        with pytest.raises(KeyProviderError) as ei:
            s.rotate_dek()
        assert not isinstance(ei.value, KeyProviderUnavailableError) and svc.calls - calls == 1
        svc.fail_with = None
        fill(s, 11, 21)                                 # a refused rotation does not fail the store


def test_unwrapping_under_another_key_or_context_is_a_wrong_key(tmp_path):
    svc = FlakyService(name="k1")
    path = str(tmp_path / "d")
    with walcrypt.open(path, kek=kms(svc)) as s:
        fill(s, 1, 11)
    with pytest.raises(WrongKeyError):                   # another key of the same service: told up front
        walcrypt.open(path, kek=kms(FlakyService(name="k2")))
    impostor = FlakyService(name="k1")                   # same name, other key material
    with pytest.raises(WrongKeyError):
        walcrypt.open(path, kek=kms(impostor))
    with pytest.raises(WrongKeyError):                   # a local key on a KMS keyring
        walcrypt.open(path, kek=RawKey(wctest.KEK_BYTES))
