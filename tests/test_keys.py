"""KEK providers, wrong or missing keys, key hygiene and the directory lock."""

from __future__ import annotations

import base64
import logging
import os
import select
import stat
import traceback

import pytest

import walcrypt
from walcrypt import (Entry, EnvKey, HardState, KeyFile, KeyProviderError, LockedError, Passphrase, RawKey,
                      UsageError, WrongKeyError)

import wctest

OTHER_KEK = bytes(range(32))


def _secret_forms(secret: bytes) -> list[bytes]:
    forms = [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
             base64.urlsafe_b64encode(secret), repr(secret).encode()]
    if len(secret) >= 16:
        forms += [secret[:16], secret[:16].hex().encode()]
    return forms


def _assert_no_secret(text: str, *secrets: bytes) -> None:
    blob = text.encode("utf-8", "surrogateescape")
    for s in secrets:
        for form in _secret_forms(s):
            assert form not in blob, f"key material leaked: {form!r} in {text!r}"


def _exc_text(exc: BaseException) -> str:
    """Everything an error shows: its message, repr and args, and those of its whole chain.

    (Tracebacks print source lines, which are code, not data; the messages are what matter.)"""
    parts, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:                # bounded: stops at a cycle
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args), "".join(traceback.format_exception_only(type(e), e))]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _populate(path, kek, n=300) -> None:
    with wctest.open_store(path, kek=kek, segment_size=8192) as s:
        for k in range(1, n + 1, 20):
            s.save(hard_state=HardState(1, 1, k), entries=wctest.make_entries(k, k + 20))


def _check_populated(path, kek, n=300) -> None:
    with wctest.open_store(path, kek=kek, segment_size=8192) as s:
        ents, _hs = wctest.read_everything(s)
        assert ents == wctest.make_entries(1, n + 1)


# ---------------------------------------------------------------------------
# Wrong and missing keys
# ---------------------------------------------------------------------------


@pytest.fixture(params=["closed", "unsealed-torn"])
def store_on_disk(request, data_dir, kek):
    if request.param == "closed":
        _populate(data_dir, kek)
    else:
        # a store left by a killed writer, with a torn tail that recovery would repair
        wctest.run_child("write", data_dir, "--seg-size", "8192", "--batches", "30", "--batch-size", "10",
                         "--end", "exit")
        last = wctest.segment_files(data_dir)[-1]
        frames = wctest.parse_frames(wctest.read(last))
        with open(last, "r+b") as f:
            f.seek(frames[-1].next)
            f.write(os.urandom(40))
    return data_dir


def test_wrong_kek_is_wrong_key_error_and_changes_nothing(store_on_disk, caplog):
    caplog.set_level(logging.DEBUG)
    before = wctest.tree_hashes(store_on_disk)
    assert any(p.startswith("meta") for p in before)
    for wrong in (RawKey(OTHER_KEK), Passphrase("not the key", n=2**10)):
        with pytest.raises(WrongKeyError) as info:
            wctest.open_store(store_on_disk, kek=wrong)
        _assert_no_secret(_exc_text(info.value), OTHER_KEK, wctest.KEK_BYTES, b"not the key")
        assert wctest.tree_hashes(store_on_disk) == before
    _assert_no_secret(caplog.text, OTHER_KEK, wctest.KEK_BYTES)
    # ... and the right key still opens it afterwards
    with wctest.open_store(store_on_disk) as s:
        assert s.last_index() >= 300


def test_missing_kek_is_key_provider_error(data_dir, kek):
    _populate(data_dir, kek)
    before = wctest.tree_hashes(data_dir)
    with pytest.raises(KeyProviderError):
        walcrypt.open(data_dir, segment_size=8192)
    with pytest.raises(KeyProviderError):
        walcrypt.open(data_dir, kek=None, encrypted=True)
    with pytest.raises(KeyProviderError):
        walcrypt.open(data_dir, kek=KeyFile(os.path.join(os.path.dirname(data_dir), "no-such-key")))
    assert wctest.tree_hashes(data_dir) == before
    _check_populated(data_dir, kek)


def test_missing_kek_for_a_new_store_creates_nothing(data_dir):
    with pytest.raises(KeyProviderError):
        walcrypt.open(data_dir)
    assert not os.path.exists(data_dir) or wctest.all_files(data_dir) == []


# ---------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666])
def test_key_file_refuses_loose_permissions(tmp_path, data_dir, mode):
    path = str(tmp_path / "kek")
    walcrypt.generate_key_file(path)
    secret = open(path, "rb").read()
    os.chmod(path, mode)
    with pytest.raises(KeyProviderError) as info:
        walcrypt.open(data_dir, kek=KeyFile(path))
    msg = str(info.value)
    assert path in msg
    assert f"{mode:04o}" in msg or f"{mode:o}" in msg
    assert "chmod 600" in msg
    _assert_no_secret(_exc_text(info.value), secret.strip(), base64.b64decode(secret))
    os.chmod(path, 0o600)
    with walcrypt.open(data_dir, kek=KeyFile(path)) as s:
        s.save(entries=[Entry(1, 1, b"x")])


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_key_file_0640_only_when_owned_by_root(tmp_path, data_dir):
    """PostgreSQL's rule: group read is allowed for a root-owned key file (a service group), for no other."""
    path = str(tmp_path / "kek")
    walcrypt.generate_key_file(path)
    os.chmod(path, 0o640)
    with walcrypt.open(data_dir, kek=KeyFile(path)) as s:          # root-owned: accepted
        s.save(entries=[Entry(1, 1, b"x")])
    os.chown(path, 4321, -1)
    with pytest.raises(KeyProviderError) as info:
        walcrypt.open(data_dir, kek=KeyFile(path))
    assert "0640" in str(info.value) and "uid 4321" in str(info.value) and "chown root" in str(info.value)


def test_generate_key_file(tmp_path, data_dir):
    path = str(tmp_path / "kek")
    assert walcrypt.generate_key_file(path) == path
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    content = open(path, "rb").read()
    assert len(base64.b64decode(content.strip())) == 32
    with pytest.raises(UsageError) as info:
        walcrypt.generate_key_file(path)
    assert path in str(info.value)
    assert open(path, "rb").read() == content                 # not overwritten
    other = str(tmp_path / "kek2")
    walcrypt.generate_key_file(other)
    assert open(other, "rb").read() != content
    _populate(data_dir, KeyFile(path), n=40)
    _check_populated(data_dir, KeyFile(path), n=40)
    with pytest.raises(WrongKeyError):
        wctest.open_store(data_dir, kek=KeyFile(other))
    # a key file holding 32 raw bytes or 64 hex digits works too
    raw = base64.b64decode(content.strip())
    for name, body in (("raw", raw), ("hex", raw.hex().encode() + b"\n")):
        p = str(tmp_path / name)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, body)
        os.close(fd)
        _check_populated(data_dir, KeyFile(p), n=40)


def test_passphrase_round_trip(data_dir):
    pw = "correct horse battery staple"
    _populate(data_dir, Passphrase(pw, n=2**12), n=60)
    # the cost parameters are stored in the store: a default-cost Passphrase object opens it
    _check_populated(data_dir, Passphrase(pw), n=60)
    _check_populated(data_dir, Passphrase(pw.encode()), n=60)
    before = wctest.tree_hashes(data_dir)
    with pytest.raises(WrongKeyError) as info:
        wctest.open_store(data_dir, kek=Passphrase(pw + "!"))
    _assert_no_secret(_exc_text(info.value), pw.encode())
    with pytest.raises(WrongKeyError):
        wctest.open_store(data_dir, kek=RawKey(wctest.KEK_BYTES))
    assert wctest.tree_hashes(data_dir) == before


def test_env_key_round_trip(data_dir, monkeypatch):
    name = "WALCRYPT_TEST_KEK_ENV"
    key = os.urandom(32)
    monkeypatch.setenv(name, key.hex())
    _populate(data_dir, EnvKey(name), n=60)
    monkeypatch.setenv(name, base64.b64encode(key).decode())       # same key, other encoding
    _check_populated(data_dir, EnvKey(name), n=60)
    _check_populated(data_dir, RawKey(key), n=60)
    monkeypatch.setenv(name, os.urandom(32).hex())
    with pytest.raises(WrongKeyError) as info:
        wctest.open_store(data_dir, kek=EnvKey(name))
    _assert_no_secret(_exc_text(info.value), key)
    monkeypatch.delenv(name)
    with pytest.raises(KeyProviderError) as info:
        wctest.open_store(data_dir, kek=EnvKey(name))
    assert name in str(info.value)
    bad = "zz" + key.hex()[2:]                                       # not hex, not base64 of 32 bytes
    monkeypatch.setenv(name, bad)
    with pytest.raises(KeyProviderError) as info:
        wctest.open_store(data_dir, kek=EnvKey(name))
    assert bad not in _exc_text(info.value)
    _assert_no_secret(_exc_text(info.value), key)


def test_raw_key_must_be_32_bytes():
    with pytest.raises(KeyProviderError) as info:
        RawKey(b"short-secret-key")
    assert "short-secret-key" not in _exc_text(info.value)
    with pytest.raises(UsageError):
        RawKey("a string is not a key")                               # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Key material never shows
# ---------------------------------------------------------------------------


def test_key_material_not_in_repr_or_str(tmp_path, monkeypatch):
    key = os.urandom(32)
    pw = "a very secret passphrase 1234"
    kf = str(tmp_path / "kek")
    walcrypt.generate_key_file(kf)
    file_secret = base64.b64decode(open(kf, "rb").read().strip())
    monkeypatch.setenv("WALCRYPT_TEST_KEK_REPR", key.hex())
    objs = [RawKey(key), Passphrase(pw), KeyFile(kf), EnvKey("WALCRYPT_TEST_KEK_REPR")]
    for o in objs:
        for text in (repr(o), str(o), f"{o}", f"{o!r}", o.describe()):
            _assert_no_secret(text, key, file_secret, pw.encode())
    # wrappers (what a KEK turns into) do not show key material either
    for o in objs[:2]:
        w = o.wrapper(o.new_params())
        _assert_no_secret(repr(w) + str(w), key, pw.encode())


def test_store_and_errors_do_not_show_keys(data_dir, caplog):
    caplog.set_level(logging.DEBUG)
    key = os.urandom(32)
    with wctest.open_store(data_dir, kek=RawKey(key)) as s:
        s.save(entries=wctest.make_entries(1, 50))
        _assert_no_secret(repr(s) + str(s), key)
        with pytest.raises(walcrypt.WalcryptError) as info:
            s.save(entries=[Entry(60, 1, b"gap")])
        _assert_no_secret(_exc_text(info.value), key)
    with pytest.raises(WrongKeyError) as info:
        wctest.open_store(data_dir, kek=RawKey(OTHER_KEK))
    _assert_no_secret(_exc_text(info.value), key, OTHER_KEK)
    _assert_no_secret(caplog.text, key, OTHER_KEK)


# ---------------------------------------------------------------------------
# The directory lock
# ---------------------------------------------------------------------------


def _readline(proc, timeout=60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not answer in time"
    return proc.stdout.readline().decode().strip()


def test_second_opener_in_the_same_process_is_locked(data_dir, kek):
    s = wctest.open_store(data_dir, kek=kek)
    try:
        s.save(entries=wctest.make_entries(1, 5))
        with pytest.raises(LockedError) as info:
            wctest.open_store(data_dir, kek=kek)
        assert data_dir in str(info.value)
        with pytest.raises(LockedError):
            wctest.open_store(data_dir, kek=RawKey(OTHER_KEK))          # the lock comes before the key check
        s.save(entries=wctest.make_entries(5, 9))                         # the holder is unaffected
    finally:
        s.close()
    with wctest.open_store(data_dir, kek=kek) as s2:
        assert s2.last_index() == 8


def test_second_opener_in_another_process_is_locked(data_dir, kek):
    with wctest.open_store(data_dir, kek=kek) as s:
        s.save(entries=wctest.make_entries(1, 5))
        res = wctest.run_child("tryopen", data_dir)
        assert res.stdout.splitlines()[0] == "LockedError", res.stdout + res.stderr
    res = wctest.run_child("tryopen", data_dir)
    assert res.stdout.splitlines()[0] == "OPENED", res.stdout + res.stderr


def test_lock_held_by_another_process(data_dir, kek):
    _populate(data_dir, kek, n=40)
    proc = wctest.spawn_child("hold", data_dir)
    try:
        assert _readline(proc) == "READY"
        with pytest.raises(LockedError):
            wctest.open_store(data_dir, kek=kek)
        # the holder releases on a clean close
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert _readline(proc) == "CLOSED"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
    _check_populated(data_dir, kek, n=40)


def test_lock_released_when_the_holder_is_killed(data_dir, kek):
    _populate(data_dir, kek, n=40)
    proc = wctest.spawn_child("hold", data_dir)
    try:
        assert _readline(proc) == "READY"
        with pytest.raises(LockedError):
            wctest.open_store(data_dir, kek=kek)
        os.kill(proc.pid, 9)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
    _check_populated(data_dir, kek, n=40)


def test_files_are_0600_and_directories_0700(data_dir):
    """DESIGN.md: files are created 0600, directories 0700 (checked under a permissive umask)."""
    old = os.umask(0o022)
    try:
        wctest.run_child("write", data_dir, "--seg-size", "8192", "--batches", "30", "--batch-size", "10",
                         "--end", "exit")
        last = wctest.segment_files(data_dir)[-1]
        with open(last, "r+b") as f:                       # a torn tail, so recovery writes a .broken copy
            f.seek(wctest.parse_frames(wctest.read(last))[-1].next)
            f.write(os.urandom(40))
        with wctest.open_store(data_dir, segment_size=8192) as s:
            s.save(entries=wctest.make_entries(s.last_index() + 1, s.last_index() + 5))
    finally:
        os.umask(old)
    assert any(p.endswith(".broken") for p in wctest.all_files(data_dir))
    for dirpath, dirs, files in os.walk(data_dir):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for n in files:
            p = os.path.join(dirpath, n)
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
