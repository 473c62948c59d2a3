"""tests/noncescan.py must find a (key, nonce) reuse when there is one -- a scanner that cannot
fail proves nothing -- and must not report identical copies, other keys or damaged files as one.

Reuses are built with the engine's own sealing code (crypto.FrameCipher for segment frames,
snapshot.SnapshotWriter for snapshot chunks) under a known key, the way a buggy writer would
produce them: two frames with one sequence number, two snapshot files with one header."""

from __future__ import annotations

import os
import shutil

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from walcrypt import HardState, SnapshotMeta
from walcrypt import crypto
from walcrypt import format as fmt
from walcrypt.segment_codec import SegmentIdentity, encode_header, segment_file_name
from walcrypt.snapshot import SnapshotHeader, SnapshotWriter
from walcrypt.vfs import DEFAULT_VFS

import noncescan
import wctest

STORE_ID = bytes(range(16))
KEY_ID = bytes(range(100, 116))
DEK = bytes(range(32))


def _cipher(seg_id: int, salt: bytes):
    key, commitment = crypto.segment_keys(DEK, salt, STORE_ID, seg_id, fmt.ALG_AES_256_GCM)
    ident = SegmentIdentity(STORE_ID, seg_id, 1, fmt.ALG_AES_256_GCM, KEY_ID, salt, commitment)
    return ident, crypto.FrameCipher(fmt.ALG_AES_256_GCM, AESGCM(key), KEY_ID, STORE_ID, seg_id)


def _segment(path: str, seg_id: int, salt: bytes, frames: list[tuple[int, bytes]]) -> None:
    """A segment file whose frames are ENTRIES-typed, with the given (seq, payload) pairs."""
    ident, cipher = _cipher(seg_id, salt)
    out = bytearray(encode_header(ident))
    chain = crypto.ZERO_CHAIN
    for seq, payload in frames:
        frame, chain = cipher.seal(fmt.FRAME_ENTRIES, seq, 1 + seq, 1, 1, payload, chain)
        out += frame
    out += bytes(512)                                       # preallocated zeros
    with open(path, "wb") as f:
        f.write(out)


def test_two_frames_with_one_seq_in_one_segment_are_a_reuse(tmp_path):
    p = str(tmp_path / segment_file_name(1, 1))
    _segment(p, 1, b"s" * 32, [(0, b"first"), (1, b"second"), (1, b"other bytes")])
    res = noncescan.scan(str(tmp_path))
    assert res.files == 1 and res.sealed == 3
    reuses = res.reuses()
    assert len(reuses) == 1
    key, nonce, groups = reuses[0]
    assert nonce == crypto.nonce_for(1) and len(groups) == 2
    assert "seq 1" in res.describe()


def test_a_reuse_across_a_file_and_its_earlier_copy_is_found(tmp_path):
    """What an interrupted unit followed by another write at the same offset leaves: the copy taken
    at the moment of the interruption holds one frame, the file now holds another."""
    (tmp_path / "data").mkdir()
    (tmp_path / "copy").mkdir()
    name = segment_file_name(7, 1)
    _segment(str(tmp_path / "copy" / name), 7, b"t" * 32, [(0, b"hs"), (1, b"lost entry")])
    _segment(str(tmp_path / "data" / name), 7, b"t" * 32, [(0, b"hs"), (1, b"index frame")])
    res = noncescan.scan(str(tmp_path / "data"), str(tmp_path / "copy"))
    assert [r[1] for r in res.reuses()] == [crypto.nonce_for(1)]


def test_identical_copies_other_salts_and_other_segments_are_not_reuses(tmp_path):
    name = segment_file_name(3, 1)
    _segment(str(tmp_path / name), 3, b"a" * 32, [(0, b"x"), (1, b"y")])
    shutil.copyfile(tmp_path / name, tmp_path / (name + ".broken"))         # the same bytes twice
    _segment(str(tmp_path / "other-salt.wal"), 3, b"b" * 32, [(0, b"p"), (1, b"q")])
    _segment(str(tmp_path / segment_file_name(4, 1)), 4, b"a" * 32, [(0, b"p"), (1, b"q")])
    res = noncescan.scan(str(tmp_path))
    assert res.files == 4 and res.sealed == 8
    assert not res.reuses()


def test_torn_and_damaged_segments_are_tolerated(tmp_path):
    p = str(tmp_path / segment_file_name(1, 1))
    _segment(p, 1, b"c" * 32, [(0, b"a" * 300), (1, b"b" * 300), (2, b"c" * 300), (2, b"d" * 300)])
    data = bytearray(wctest.read(p))
    second = fmt.SEGMENT_HEADER_SIZE + fmt.align_up(fmt.FRAME_HEADER_SIZE + 316)
    data[second + 100] ^= 0xFF                                # a damaged frame in the middle: skipped
    with open(p, "wb") as f:
        f.write(data)
    torn = str(tmp_path / "torn.wal")
    with open(torn, "wb") as f:
        f.write(bytes(data[:second + 200]))                    # cut inside the second frame
    with open(str(tmp_path / "header-only.wal"), "wb") as f:
        f.write(bytes(data[:60]))
    res = noncescan.scan(str(tmp_path))
    assert res.skipped                                         # reported, not fatal
    # the damaged frame is skipped, the frames after it are still found (resynchronisation)
    assert len(res.reuses()) == 1 and res.reuses()[0][1] == crypto.nonce_for(2)


def _snapshot(directory: str, header: SnapshotHeader, data: bytes, name: str) -> str:
    key = crypto.hkdf(DEK, salt=header.salt, info=b"test", length=32)
    w = SnapshotWriter(DEFAULT_VFS, directory, header, AESGCM(key), b"", SnapshotMeta(header.index, header.term))
    w.write(data)
    path = w.publish()
    os.rename(path, os.path.join(directory, name))
    return os.path.join(directory, name)


def test_two_snapshots_with_one_header_are_a_reuse(tmp_path):
    h = SnapshotHeader(fmt.ALG_AES_256_GCM, 0, STORE_ID, 5, 10, 2, 64, 0, KEY_ID, b"n" * 16, bytes(24))
    _snapshot(str(tmp_path), h, b"A" * 200, "one.snap")
    _snapshot(str(tmp_path), h, b"B" * 200, "two.snap")
    res = noncescan.scan(str(tmp_path))
    assert res.files == 2
    nonces = sorted(r[1] for r in res.reuses())
    # META frames agree (same metadata), the four data chunks differ
    assert nonces == [crypto.nonce_for(i) for i in range(1, 5)]
    other = SnapshotHeader(fmt.ALG_AES_256_GCM, 0, STORE_ID, 5, 10, 2, 64, 0, KEY_ID, b"m" * 16, bytes(24))
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    _snapshot(str(tmp_path), h, b"A" * 200, "one.snap")
    _snapshot(str(tmp_path), other, b"B" * 200, "two.snap")
    with open(str(tmp_path / "one.snap"), "rb") as f:
        head = f.read(300)
    with open(str(tmp_path / "cut.snap"), "wb") as f:
        f.write(head)                                          # a partial snapshot file
    res = noncescan.scan(str(tmp_path))
    assert not res.reuses() and res.skipped


def test_a_real_store_has_no_reuse_and_a_planted_one_is_found(tmp_path):
    """End to end on a store the engine wrote: the scan sees its frames and snapshot chunks and
    finds nothing; a frame sealed by the engine's own cipher for that segment under a sequence
    number already used is found."""
    d = str(tmp_path / "data")
    with wctest.open_store(d, segment_size=4096) as s:
        for i in range(1, 40, 3):
            s.save(hard_state=HardState(1, 1, i), entries=wctest.make_entries(i, i + 3))
        s.save_snapshot(SnapshotMeta(20, 1), b"snapshot data " * 300)
        seg = s.wal.segments[-1]
        cipher, _ = s._cipher(seg.ident)
        planted, _tag = cipher.seal(fmt.FRAME_ENTRIES, 1, 999, 1, 1, b"planted payload", crypto.ZERO_CHAIN)
    res = noncescan.scan(d)
    assert res.files >= 3 and res.sealed > 40
    assert any(k[0] == "snapshot" for (k, _n) in res.uses)
    assert not res.reuses(), res.describe()
    copy = str(tmp_path / "planted.wal")
    data = bytearray(wctest.read(seg.path))
    data[fmt.SEGMENT_HEADER_SIZE:fmt.SEGMENT_HEADER_SIZE] = planted  # one more frame with seq 1
    with open(copy, "wb") as f:
        f.write(data)
    res = noncescan.scan(d, copy)
    assert [r[1] for r in res.reuses()] == [crypto.nonce_for(1)]


def test_plaintext_stores_are_skipped(tmp_path):
    d = str(tmp_path / "plain")
    with wctest.open_store(d, encrypted=False, segment_size=4096) as s:
        s.save(entries=wctest.make_entries(1, 10))
    res = noncescan.scan(d)
    assert res.files >= 1 and res.sealed == 0 and not res.reuses()


@pytest.mark.parametrize("garbage", [b"", b"WCRYPSEG", b"WCRYPSNP" + bytes(200), os.urandom(3000)])
def test_garbage_files_do_not_break_the_scan(tmp_path, garbage):
    with open(str(tmp_path / "x.wal"), "wb") as f:
        f.write(garbage)
    res = noncescan.scan(str(tmp_path))
    assert not res.reuses()
