"""Backups: export the newest snapshot with its wrapped keys, inspect, redact an embedded KEK,
restore into a fresh directory from the export and the KEK alone."""

from __future__ import annotations

import base64
import os
import shutil
import stat

import pytest

import walcrypt
from walcrypt import (ConfState, CorruptionError, Entry, HardState, KeyProviderError, SnapshotMeta, UsageError,
                      WrongKeyError, backup)

import snaptest as T

CS = ConfState(voters=(1, 2, 3), learners=(5,))
SNAP_INDEX, SNAP_TERM = 90, 3
SIZE = 9 * T.CHUNK + 321


def _data() -> bytes:
    return T.snap_data(SNAP_INDEX, SIZE)


def _make_store(path, kek, **opts):
    with T.open_store(path, kek, **opts) as s:
        for a in range(1, 101, 10):
            s.save(hard_state=HardState(SNAP_TERM, 1, a + 9),
                   entries=[Entry(i, SNAP_TERM, b"e%d" % i) for i in range(a, a + 10)])
        s.save_snapshot(SnapshotMeta(50, SNAP_TERM, ConfState(voters=(1,))), T.snap_data(50))
        s.save_snapshot(SnapshotMeta(SNAP_INDEX, SNAP_TERM, CS), _data())


@pytest.fixture
def export(tmp_path, kek):
    """An export (no KEK embedded) of a store whose directory is then deleted."""
    src = str(tmp_path / "src")
    _make_store(src, kek)
    out = str(tmp_path / "backup.wcx")
    with T.open_store(src, kek) as s:
        info = s.export_snapshot(out)
    assert info["index"] == SNAP_INDEX and info["term"] == SNAP_TERM and not info["kek_embedded"]
    shutil.rmtree(src)
    return out


def _assert_restored(path, kek):
    with T.open_store(path, kek) as s:
        snap = s.snapshot()
        assert snap.meta == SnapshotMeta(SNAP_INDEX, SNAP_TERM, CS)
        assert snap.size == SIZE and snap.data == _data()
        hs, cs = s.initial_state()
        assert hs.term == SNAP_TERM and hs.commit == SNAP_INDEX
        assert cs == CS
        assert s.first_index() == SNAP_INDEX + 1 and s.last_index() == SNAP_INDEX
        assert s.term(SNAP_INDEX) == SNAP_TERM
        s.save(entries=[Entry(SNAP_INDEX + 1, SNAP_TERM, b"next")])    # the node can go on
    with T.open_store(path, kek) as s:
        assert s.entries(SNAP_INDEX + 1, SNAP_INDEX + 2) == [Entry(SNAP_INDEX + 1, SNAP_TERM, b"next")]


# ----------------------------------------------------------------------------------------- restore

def test_export_restore_with_kek_only(export, tmp_path, kek, kek_bytes):
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o600
    T.assert_no_kek(export, kek_bytes)
    info = backup.inspect_export(export)                           # no key: metadata only
    assert info["index"] == SNAP_INDEX and info["term"] == SNAP_TERM
    assert not info["kek_embedded"] and not info["warnings"] and not info["verified"]
    assert any(k["key_id"] == info["key_id"] for k in info["keys"])
    info = backup.inspect_export(export, kek=kek)
    assert info["verified"] and info["data_bytes"] == SIZE
    assert info["conf_state"] == {"voters": [1, 2, 3], "learners": [5]}

    fresh = str(tmp_path / "restored")
    res = backup.restore_export(export, fresh, kek=kek, segment_size=T.SEG_SIZE, snapshot_chunk_size=T.CHUNK)
    assert res["index"] == SNAP_INDEX and res["term"] == SNAP_TERM and res["data_bytes"] == SIZE
    _assert_restored(fresh, kek)
    for p in T.files_in(fresh):
        T.assert_no_kek(p, kek_bytes)


def test_restore_into_non_empty_dir_refused(export, tmp_path, kek):
    d = tmp_path / "busy"
    d.mkdir()
    (d / "something").write_bytes(b"x")
    with pytest.raises(UsageError):
        backup.restore_export(export, str(d), kek=kek)
    assert os.listdir(d) == ["something"]


def test_restore_with_wrong_kek(export, tmp_path):
    fresh = str(tmp_path / "restored")
    with pytest.raises(WrongKeyError):
        backup.restore_export(export, fresh, kek=walcrypt.RawKey(b"\x55" * 32))
    assert not os.path.exists(fresh), "a failed restore created the target directory"
    with pytest.raises(WrongKeyError):
        backup.inspect_export(export, kek=walcrypt.RawKey(b"\x55" * 32))


def test_restore_without_kek_needs_one(export, tmp_path):
    fresh = str(tmp_path / "restored")
    with pytest.raises(KeyProviderError):
        backup.restore_export(export, fresh)
    assert not os.path.exists(fresh)


# ----------------------------------------------------------------------------------------- embedded KEK

def test_embedded_kek_inspect_redact(tmp_path, kek, kek_bytes):
    src = str(tmp_path / "src")
    _make_store(src, kek)
    out = str(tmp_path / "with-kek.wcx")
    with T.open_store(src, kek) as s:
        assert s.export_snapshot(out, embed_kek=True)["kek_embedded"]
    assert kek_bytes in T.read(out)
    info = backup.inspect_export(out)
    assert info["kek_embedded"] and info["verified"]        # the embedded KEK is enough to verify
    assert info["warnings"] and any("key" in w.lower() for w in info["warnings"])
    assert kek_bytes.hex() not in repr(info) and repr(kek_bytes) not in repr(info)

    # restore needs no KEK
    r1 = str(tmp_path / "r1")
    backup.restore_export(out, r1, segment_size=T.SEG_SIZE)
    _assert_restored(r1, kek)

    saved = str(tmp_path / "kek.out")
    res = backup.redact_export(out, kek_out=saved)
    assert res["redacted"]
    raw = T.read(out)
    T.assert_no_kek(out, kek_bytes)
    info = backup.inspect_export(out)
    assert not info["kek_embedded"] and not info["warnings"] and not info["verified"]
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert base64.b64decode(T.read(saved).strip()) == kek_bytes
    # the redacted export still restores with the saved key
    with pytest.raises(KeyProviderError):
        backup.restore_export(out, str(tmp_path / "r2"))
    r3 = str(tmp_path / "r3")
    backup.restore_export(out, r3, kek=walcrypt.RawKey(base64.b64decode(T.read(saved).strip())),
                          segment_size=T.SEG_SIZE)
    _assert_restored(r3, kek)
    # redacting again is a no-op
    assert not backup.redact_export(out)["redacted"]
    assert T.read(out) == raw


def test_redact_to_other_file(tmp_path, kek, kek_bytes):
    src = str(tmp_path / "src")
    _make_store(src, kek)
    out = str(tmp_path / "with-kek.wcx")
    with T.open_store(src, kek) as s:
        s.export_snapshot(out, embed_kek=True)
    clean = str(tmp_path / "clean.wcx")
    backup.redact_export(out, out_path=clean)
    T.assert_no_kek(clean, kek_bytes)
    assert stat.S_IMODE(os.stat(clean).st_mode) == 0o600
    assert backup.inspect_export(out)["kek_embedded"]        # the original is left as it was
    assert backup.inspect_export(clean, kek=kek)["verified"]


def test_export_never_overwrites(tmp_path, kek):
    src = str(tmp_path / "src")
    _make_store(src, kek)
    out = tmp_path / "exists.wcx"
    out.write_bytes(b"precious")
    with T.open_store(src, kek) as s:
        with pytest.raises(UsageError):
            s.export_snapshot(str(out))
    assert out.read_bytes() == b"precious"


# ----------------------------------------------------------------------------------------- damage

def _regions(path):
    ex = backup.ExportFile(path)
    lay = T.parse_snapshot(T.read(path), path, base=ex.snapshot_offset)
    return ex, lay


@pytest.mark.parametrize("where", ["chunk-first", "chunk-middle", "chunk-last", "chunk-tag", "meta", "bundle"])
def test_flipped_byte_detected_by_inspect(export, where, kek, tmp_path):
    ex, lay = _regions(export)
    c = {"chunk-first": lay.chunks[0], "chunk-middle": lay.chunks[len(lay.chunks) // 2],
         "chunk-last": lay.chunks[-1]}.get(where)
    if c is not None:
        off = c.offset + 8 + c.length // 3
    elif where == "chunk-tag":
        off = lay.chunks[1].end - 3
    elif where == "meta":
        off = lay.meta_offset + 8 + 4
    else:
        off = ex.snapshot_offset + T.SNAP_HEADER + len(lay.bundle) // 2
    raw = bytearray(T.read(export))
    raw[off] ^= 0x10
    T.write(export, bytes(raw))
    with pytest.raises(CorruptionError):
        backup.inspect_export(export, kek=kek)
    fresh = str(tmp_path / "restored")
    with pytest.raises(CorruptionError):
        backup.restore_export(export, fresh, kek=kek)
    leftovers = T.snap_files(fresh) if os.path.isdir(fresh) else []
    assert not leftovers, "a restore from a damaged export left a snapshot behind"


def test_truncated_export_detected(export, kek):
    raw = T.read(export)
    T.write(export, raw[:-100])
    with pytest.raises(CorruptionError):
        backup.inspect_export(export)


# ----------------------------------------------------------------------------------------- keys move on

def test_export_after_kek_rotation_restores_with_new_kek(tmp_path, kek):
    """Wrapped keys travel inside every snapshot so that an export plus *the* KEK is enough: after
    a KEK rotation the current KEK must restore an export of the existing snapshot."""
    src = str(tmp_path / "src")
    _make_store(src, kek)
    new_kek = walcrypt.RawKey(b"\x66" * 32)
    out = str(tmp_path / "after-rotation.wcx")
    with T.open_store(src, kek) as s:
        s.rotate_kek(new_kek)
        s.export_snapshot(out)
    with pytest.raises(WrongKeyError):
        T.open_store(src, kek)
    fresh = str(tmp_path / "restored")
    backup.restore_export(out, fresh, kek=new_kek, segment_size=T.SEG_SIZE)
    _assert_restored(fresh, new_kek)


def test_export_after_dek_rotation(tmp_path, kek):
    src = str(tmp_path / "src")
    _make_store(src, kek)
    out = str(tmp_path / "rotated.wcx")
    with T.open_store(src, kek) as s:
        s.rotate_dek()
        s.save_snapshot(SnapshotMeta(SNAP_INDEX + 10, SNAP_TERM, CS), _data())
        s.export_snapshot(out)
    fresh = str(tmp_path / "restored")
    backup.restore_export(out, fresh, kek=kek)
    with T.open_store(fresh, kek) as s:
        assert s.snapshot().meta.index == SNAP_INDEX + 10 and s.snapshot().data == _data()


def test_plaintext_export_restore(tmp_path):
    src = str(tmp_path / "src")
    with walcrypt.open(src, encrypted=False, segment_size=T.SEG_SIZE) as s:
        s.save(entries=[Entry(i, 2, b"p") for i in range(1, 11)])
        s.save_snapshot(SnapshotMeta(10, 2, CS), b"plain-state" * 1000)
        with pytest.raises(UsageError):
            s.export_snapshot(str(tmp_path / "x.wcx"), embed_kek=True)
        s.export_snapshot(str(tmp_path / "p.wcx"))
    info = backup.inspect_export(str(tmp_path / "p.wcx"))
    assert info["index"] == 10 and not info["kek_embedded"]
    assert info["plaintext"] and not info["verified"]
    fresh = str(tmp_path / "restored")
    with pytest.raises(walcrypt.errors.AuthenticationError, match="plaintext=True"):
        backup.restore_export(str(tmp_path / "p.wcx"), fresh)      # plaintext only when asked for
    assert not os.path.exists(fresh) or not os.listdir(fresh)
    assert backup.inspect_export(str(tmp_path / "p.wcx"), plaintext=True)["verified"]
    backup.restore_export(str(tmp_path / "p.wcx"), fresh, plaintext=True)
    with walcrypt.open(fresh, encrypted=False) as s:
        assert s.snapshot().data == b"plain-state" * 1000
        assert s.initial_state()[0].commit == 10
