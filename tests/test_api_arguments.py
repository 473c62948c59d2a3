"""Generated arguments for every option of ``walcrypt.open`` and every public method of a Store.

Whatever a caller passes -- valid values, huge or negative integers, bools, floats, NaN, str where
bytes are expected, lists, arbitrary objects -- the outcome is a result or a walcrypt error raised in
the caller's thread (never a StoreFailedError: a bad argument must be refused before anything is
written), and afterwards the store reopens to exactly the state it served before it was closed.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta, StoreFailedError, WalcryptError

import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
OTHER_KEK = walcrypt.RawKey(bytes(range(32)))
SETTINGS = settings(max_examples=int(os.environ.get("WALCRYPT_API_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=list(HealthCheck))

WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, 1, -1, (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1, 1 << 64, 1 << 200]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.binary(max_size=4),
    st.lists(st.integers(-2, 3), max_size=3), st.just(object()), st.just({"index": 1}),
)
SMALL = st.integers(0, 40)
INDEX = st.one_of(SMALL, SMALL, WEIRD)
TERM = st.one_of(st.integers(1, 4), st.integers(1, 4), WEIRD)
DATA = st.one_of(st.binary(max_size=64), st.binary(max_size=64), WEIRD, st.builds(bytearray, st.binary(max_size=8)))
NODE = st.one_of(st.integers(0, 9), st.text(max_size=3), WEIRD)
CONF = st.one_of(st.builds(ConfState, st.tuples(NODE, NODE).map(tuple), st.lists(NODE, max_size=2).map(tuple)),
                 st.just(ConfState((1, 2, 3))), WEIRD)
META = st.one_of(st.builds(SnapshotMeta, INDEX, TERM, CONF), WEIRD)
HASHABLE = st.one_of(st.text(max_size=12), st.sampled_from(["index", "term", "conf_state", "hc_version"]),
                     st.integers(-2, 2), st.none(), st.booleans(), st.floats(allow_nan=False))
EXTRA = st.one_of(st.none(), st.dictionaries(HASHABLE, st.one_of(WEIRD, st.just([[[[]]]])), max_size=3), WEIRD)
HARD = st.one_of(st.none(), st.builds(HardState, INDEX, INDEX, INDEX), st.tuples(INDEX, INDEX), WEIRD)
KEY = st.one_of(st.binary(min_size=1, max_size=8), st.sampled_from([b"", b"k" * 401]), WEIRD)


def _entries(draw_first):
    return st.one_of(
        st.builds(lambda lo, n, t, d: [Entry(lo + k, t, d) for k in range(n)], draw_first, st.integers(0, 4), TERM,
                  DATA),
        st.lists(st.builds(Entry, INDEX, TERM, DATA), max_size=3), st.lists(WEIRD, max_size=2), WEIRD)


CALLS = st.one_of(
    st.tuples(st.just("save"), HARD, _entries(SMALL)),
    st.tuples(st.just("save"), st.none(), _entries(SMALL)),
    st.tuples(st.just("entries"), INDEX, INDEX, st.one_of(st.none(), INDEX)),
    st.tuples(st.just("term"), INDEX),
    st.tuples(st.just("compact"), INDEX),
    st.tuples(st.just("truncate"), INDEX),
    st.tuples(st.just("reset_log"), INDEX, TERM),
    st.tuples(st.just("stable_set"), KEY, DATA),
    st.tuples(st.just("stable_get"), KEY),
    st.tuples(st.just("save_snapshot"), META, DATA),
    st.tuples(st.just("begin_snapshot"), META, EXTRA, DATA),
    st.tuples(st.just("rotate_kek"), st.one_of(st.just(OTHER_KEK), WEIRD)),
    st.tuples(st.just("export_snapshot"), st.one_of(st.just("export.wcx"), WEIRD), WEIRD),
)


def _observe(s, stable_keys) -> dict:
    first, last = s.first_index(), s.last_index()
    snap = s.snapshot()
    return {"first": first, "last": last, "entries": s.entries(first, last + 1) if last >= first else [],
            "initial": s.initial_state(), "snapshot": None if snap is None else (snap.meta, snap.data),
            "stable": {k: s.stable_get(k) for k in sorted(stable_keys)}}


def _call(s, call, work: str, stable_keys: set, kek: list):
    name, *args = call
    if name == "begin_snapshot":
        meta, extra, data = args
        w = s.begin_snapshot(meta, extra_meta=extra)
        try:
            w.write(data)
        except WalcryptError:
            w.abort()
            raise
        return w.commit()
    if name == "export_snapshot":
        path, embed = args
        if isinstance(path, (str, bytes)):     # kept inside the test's directory, whatever the name
            name = path if isinstance(path, str) else os.fsdecode(path)
            path = os.path.join(work, "out", name.replace("/", "_").replace("\0", "_") or "x")
            if isinstance(args[0], bytes):
                path = os.fsencode(path)
        return s.export_snapshot(path, embed_kek=embed)
    result = getattr(s, name)(*args)
    if name == "stable_set":
        stable_keys.add(bytes(args[0]))
    if name == "rotate_kek":
        kek[0] = args[0]
    return result


@SETTINGS
@given(calls=st.lists(CALLS, min_size=1, max_size=12))
def test_public_methods_refuse_bad_arguments_in_the_callers_thread(calls):
    work = tempfile.mkdtemp(prefix="wc-api-")
    data_dir = os.path.join(work, "data")
    os.makedirs(os.path.join(work, "out"))
    kek = [KEK]
    stable_keys: set = set()
    try:
        s = walcrypt.open(data_dir, kek=KEK, segment_size=4096, sync="none")
        try:
            s.save(HardState(1, 1, 5), [Entry(i, 1, b"seed %d" % i) for i in range(1, 11)])
            s.save_snapshot(SnapshotMeta(3, 1, ConfState((1, 2, 3))), b"state at 3")
            for call in calls:
                try:
                    _call(s, call, work, stable_keys, kek)
                except StoreFailedError as exc:
                    pytest.fail(f"{call!r} failed the store: {exc!r}")
                except WalcryptError:
                    pass
                except Exception as exc:   # noqa: BLE001 - the assertion
                    pytest.fail(f"{call!r} raised {type(exc).__name__}: {exc}")
            before = _observe(s, stable_keys)
        finally:
            s.close()
        with walcrypt.open(data_dir, kek=kek[0]) as s:
            after = _observe(s, stable_keys)
            s.save(None, [Entry(s.last_index() + 1, max(1, s.initial_state()[0].term), b"after reopen")])
        assert after == before
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Options of open()
# ----------------------------------------------------------------------------------------------

def _bounded(valid, weird=WEIRD):
    return st.one_of(st.nothing() if valid is None else valid, weird)


OPTIONS = st.fixed_dictionaries({}, optional={
    "segment_size": _bounded(st.integers(4096, 1 << 16)),
    "sync": _bounded(st.sampled_from(["always", "batch", "none", "sometimes"])),
    "algorithm": _bounded(st.sampled_from(["aes-256-gcm", "chacha20-poly1305", "AES-256-GCM", "rot13", "none"])),
    "max_entry_size": _bounded(st.sampled_from([1024, 1 << 20, (1 << 30) - 81944, (1 << 30) - 81943])),
    "keep_snapshots": _bounded(st.integers(1, 4)),
    "snapshot_chunk_size": _bounded(st.sampled_from([1, 16, 4096, 64 << 20, (64 << 20) + 1, 1 << 32])),
    "snapshot_source": _bounded(st.just(lambda store: None)),
    "destroy_retired_keys": _bounded(st.booleans()),
    "max_records_per_dek": _bounded(st.integers(1, 1 << 40)),
    "max_bytes_per_dek": _bounded(st.integers(1, 1 << 40)),
    "max_dek_age_s": _bounded(st.one_of(st.none(), st.floats(0.001, 1e9))),
    "read_only": _bounded(st.just(False)),
    "encrypted": _bounded(st.just(True)),
})


@SETTINGS
@given(options=OPTIONS)
def test_open_options_are_refused_up_front_or_work(options):
    work = tempfile.mkdtemp(prefix="wc-opt-")
    data_dir = os.path.join(work, "data")
    try:
        try:
            s = walcrypt.open(data_dir, kek=KEK, **options)
        except StoreFailedError as exc:
            pytest.fail(f"open({options!r}) failed the store: {exc!r}")
        except WalcryptError:
            return
        except Exception as exc:   # noqa: BLE001 - the assertion
            pytest.fail(f"open({options!r}) raised {type(exc).__name__}: {exc}")
        with s:
            s.save(HardState(1, 1, 3), [Entry(i, 1, bytes([i])) for i in range(1, 6)])   # 1 byte: any max_entry_size
            s.save_snapshot(SnapshotMeta(3, 1, ConfState((1,))), b"snapshot data " * 50)
            s.compact(3)
            s.save(None, [Entry(6, 1, b"x")])
            expect = (s.first_index(), s.last_index(), s.entries(4, 7), s.snapshot().data)
        with walcrypt.open(data_dir, kek=KEK, **options) as s:
            assert (s.first_index(), s.last_index(), s.entries(4, 7), s.snapshot().data) == expect
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 0, True, "60"])
def test_max_dek_age_must_be_a_positive_finite_number(tmp_path, value):
    with pytest.raises(walcrypt.UsageError, match="max_dek_age_s"):
        walcrypt.open(str(tmp_path / "d"), kek=KEK, max_dek_age_s=value)


def test_an_encrypted_store_refuses_the_plaintext_suite_up_front(tmp_path):
    """algorithm='none' with a KEK was accepted, then every save failed its own check ("segment 1 is
    plaintext inside an encrypted store"): it is refused before anything is created."""
    with pytest.raises(walcrypt.UsageError, match="plaintext format"):
        walcrypt.open(str(tmp_path / "data"), kek=walcrypt.RawKey(bytes(range(32))), algorithm="none")
    assert not os.path.exists(tmp_path / "data")
