"""Torn tails are repaired to the durable prefix; anything else is a hard error naming file and offset.

The store under test is left by a child process that exits through os._exit(0) right after its
last save returned, so its last segment is unsealed (preallocated, zero-filled after the last
COMMIT frame) and recovery has to scan it.
"""

from __future__ import annotations

import os
import shutil

import pytest

from walcrypt import CorruptionError, Entry, HardState
from walcrypt import format as fmt

import wctest

SEG = 8192
BATCHES = 68
BATCH = 3


def _expected_entries(n: int) -> list[Entry]:
    return wctest.make_entries(1, n + 1)


def _hs_after(last: int) -> HardState:
    """The hard state the child saved together with the batch ending at ``last``."""
    return HardState(wctest.entry_term(last), 1, last)


@pytest.fixture(scope="module", params=["encrypted", "plaintext"])
def pristine(request, tmp_path_factory):
    plain = request.param == "plaintext"
    root = str(tmp_path_factory.mktemp(f"torn-{request.param}") / "data")
    args = ["write", root, "--seg-size", str(SEG), "--batches", str(BATCHES), "--batch-size", str(BATCH),
            "--hs", "--end", "exit"] + (["--plain"] if plain else [])
    res = wctest.run_child(*args)
    assert res.stdout.strip() == f"LAST {BATCHES * BATCH}"
    segs = wctest.segment_files(root, encrypted=not plain)
    assert len(segs) >= 3, "a few sealed segments before the unsealed last one"
    last = segs[-1]
    data = wctest.read(last)
    assert len(data) >= SEG, "the unsealed segment is preallocated"
    bs = wctest.batches(wctest.parse_frames(data))
    assert len(bs) >= 3
    final = bs[-1]
    assert final[-1].type == fmt.FRAME_COMMIT
    assert [f.type for f in final] == [fmt.FRAME_ENTRIES, fmt.FRAME_HARDSTATE, fmt.FRAME_COMMIT]
    assert final[0].index == BATCHES * BATCH - BATCH + 1
    assert not any(data[final[-1].next:]), "nothing but zeros after the last commit"
    return {"root": root, "plain": plain, "last": last, "data": data, "batches": bs,
            "start": bs[-2][-1].next, "end": final[-1].next}


def _open(p, root):
    return wctest.open_store(root, encrypted=not p["plain"], segment_size=SEG)


def _copy(p, tmp_path, name="data") -> tuple[str, str]:
    root = wctest.copy_store(p["root"], str(tmp_path / name))
    return root, os.path.join(wctest.wal_dir(root, not p["plain"]), os.path.basename(p["last"]))


def _assert_opens_to(p, root: str, n: int) -> None:
    """Opens to exactly entries 1..n and the hard state saved with entry n; a new save survives."""
    s = _open(p, root)
    try:
        ents, hs = wctest.read_everything(s)
        assert [(e.index, e.term, e.data) for e in ents] == [tuple(e) for e in _expected_entries(n)]
        assert hs == _hs_after(n)
        new = [Entry(n + 1, 99, b"after-repair-1"), Entry(n + 2, 99, b"after-repair-2")]
        s.save(hard_state=HardState(99, 2, n + 2), entries=new)
    finally:
        s.close()
    s = _open(p, root)
    try:
        ents, hs = wctest.read_everything(s)
        assert ents == _expected_entries(n) + new
        assert hs == HardState(99, 2, n + 2)
    finally:
        s.close()


def test_zero_from_every_offset_of_the_last_batch(pristine, tmp_path):
    p = pristine
    total = BATCHES * BATCH
    durable = total - BATCH
    start, end = p["start"], p["end"]
    assert end - start > 200
    for o in range(start, end):                       # every byte offset of the last write unit
        root, seg = _copy(p, tmp_path, f"o{o}")
        data = bytearray(p["data"])
        data[o:] = bytes(len(data) - o)
        wctest.write(seg, bytes(data))
        intact = not any(p["data"][o:])               # only zero bytes were zeroed: nothing was lost
        leftover = any(data[start:])                  # bytes of the torn batch that repair must cut
        try:
            _assert_opens_to(p, root, total if intact else durable)
        except Exception as exc:
            raise AssertionError(f"zeroing from offset {o} (last batch is [{start}, {end})): {exc!r}") from exc
        broken = seg + ".broken"
        assert os.path.exists(broken) == (leftover and not intact), f"offset {o}"
        if os.path.exists(broken):
            assert wctest.read(broken) == bytes(data), f"offset {o}: the .broken copy must be the file as found"
        shutil.rmtree(root)


def test_truncate_file_inside_the_last_batch(pristine, tmp_path):
    """The file itself ends inside the last batch (no preallocated zeros after it)."""
    p = pristine
    durable = BATCHES * BATCH - BATCH
    for o in range(p["start"] + 1, p["end"], 37):
        root, seg = _copy(p, tmp_path, f"t{o}")
        os.truncate(seg, o)
        _assert_opens_to(p, root, durable)
        assert os.path.exists(seg + ".broken")
        shutil.rmtree(root)


def test_short_garbage_after_the_last_commit_is_a_torn_tail(pristine, tmp_path):
    p = pristine
    root, seg = _copy(p, tmp_path)
    data = bytearray(p["data"])
    data[p["end"]:p["end"] + 40] = os.urandom(40)     # less than a frame header: an incomplete write
    wctest.write(seg, bytes(data))
    _assert_opens_to(p, root, BATCHES * BATCH)
    assert os.path.exists(seg + ".broken")


def test_garbage_appended_at_the_end_of_the_file_is_a_torn_tail(pristine, tmp_path):
    p = pristine
    root, seg = _copy(p, tmp_path)
    with open(seg, "ab") as f:
        f.write(os.urandom(100))
    _assert_opens_to(p, root, BATCHES * BATCH)
    assert os.path.exists(seg + ".broken")


def test_long_garbage_after_the_last_commit(pristine, tmp_path):
    """Random bytes after the last commit were never acknowledged: either they are cut as a torn
    tail (the full log survives) or recovery stops with an error naming the file and the offset
    of the garbage.  Never anything else, never invented entries."""
    p = pristine
    for k in range(8):
        root, seg = _copy(p, tmp_path, f"g{k}")
        data = bytearray(p["data"])
        data[p["end"]:p["end"] + 300] = os.urandom(300)
        wctest.write(seg, bytes(data))
        try:
            _assert_opens_to(p, root, BATCHES * BATCH)
        except CorruptionError as exc:
            assert os.path.abspath(exc.path) == os.path.abspath(seg)
            assert exc.offset == p["end"]


@pytest.mark.parametrize("truncate", [False, True], ids=["preallocated", "file-ends-after-header"])
@pytest.mark.parametrize("length", ["past-eof", "huge"])
@pytest.mark.parametrize("frame", ["entries", "commit"])
def test_length_field_pointing_past_eof_is_torn(pristine, tmp_path, length, frame, truncate):
    """etcd #14114: the last batch's length field points past the end of the file (a garbled
    header of a write that never completed).  That is a torn tail, not a fatal error -- also when
    the garbage length is larger than any record could be."""
    p = pristine
    final = p["batches"][-1]
    f = final[0] if frame == "entries" else final[-1]
    root, seg = _copy(p, tmp_path)
    data = bytearray(p["data"])
    if truncate:                                      # the file ends right after this frame's header
        del data[f.offset + wctest.FRAME_HEADER_SIZE:]
    lo, size = wctest.FRAME_FIELDS["length"]
    value = len(data) - f.offset + 4096 if length == "past-eof" else 0xFFFFFFF0
    data[f.offset + lo:f.offset + lo + size] = value.to_bytes(size, "little")
    wctest.write(seg, bytes(data))
    _assert_opens_to(p, root, BATCHES * BATCH - BATCH)
    assert os.path.exists(seg + ".broken")


def test_bit_flip_in_a_committed_record_followed_by_a_later_batch(pristine, tmp_path):
    """Every frame before the last batch, one bit flipped: a CorruptionError naming file and
    offset; the files are left as they were (no repair of acknowledged data)."""
    p = pristine
    frames = [f for b in p["batches"][:-1] for f in b]
    assert len(frames) >= 6
    for f in frames:
        for where in (f.offset + 5, f.offset + wctest.FRAME_HEADER_SIZE + (f.length - 1) // 2):
            root, seg = _copy(p, tmp_path, f"f{f.offset}-{where}")
            data = bytearray(p["data"])
            wctest.flip_bit(data, where, 3)
            wctest.write(seg, bytes(data))
            before = wctest.tree_hashes(root)
            try:
                ents, _hs = wctest.open_and_read_all(root, encrypted=not p["plain"], segment_size=SEG)
            except CorruptionError as exc:
                assert os.path.abspath(exc.path) == os.path.abspath(seg)
                assert exc.offset == f.offset, str(exc)
            else:
                pytest.fail(f"a bit flipped at offset {where} in {f} (a committed batch; a later committed "
                            f"batch follows) was not reported: the store opened with {len(ents)} of "
                            f"{BATCHES * BATCH} entries")
            assert wctest.tree_hashes(root) == before
            assert not os.path.exists(seg + ".broken")
            shutil.rmtree(root)


@pytest.mark.parametrize("damage", ["payload", "header", "none"])
def test_damaged_frame_of_the_last_batch_ending_in_a_zero_byte_is_corruption(pristine, tmp_path, damage):
    """An acknowledged last batch with one frame damaged, and that frame's last byte zero (as one
    tag in 256 is): damage, not a torn write.  The store refuses to open and nothing is cut (a
    one-byte zero end used to pass for a write that stopped there).  The COMMIT frame is followed
    by preallocated zeros, so its CRC tells: with only its last byte zeroed it is a write cut one
    byte short (exactly what a crash leaves), so that case is not damage for it."""
    p = pristine
    final = p["batches"][-1]
    for f in final if damage != "none" else final[:-1]:
        root, seg = _copy(p, tmp_path, f"z{f.offset}-{damage}")
        data = bytearray(p["data"])
        data[f.end - 1] = 0
        if damage == "payload":
            wctest.flip_bit(data, f.offset + wctest.FRAME_HEADER_SIZE + f.length // 2, 4)
        elif damage == "header":
            wctest.flip_bit(data, f.offset + 20, 1)
        if data == bytearray(p["data"]):
            data[f.end - 2] ^= 0x40                   # its last byte was zero already: damage another
        wctest.write(seg, bytes(data))
        before = wctest.tree_hashes(root)
        with pytest.raises(CorruptionError) as info:
            wctest.open_and_read_all(root, encrypted=not p["plain"], segment_size=SEG)
        assert os.path.abspath(info.value.path) == os.path.abspath(seg)
        assert info.value.offset == f.offset, str(info.value)
        assert wctest.tree_hashes(root) == before
        assert not os.path.exists(seg + ".broken")
        shutil.rmtree(root)


def test_lost_sector_inside_a_committed_batch_is_corruption(pristine, tmp_path):
    """A zeroed 512-byte sector inside an earlier, committed batch looks like a torn write but a
    later commit proves the batch was complete: a hard error, not a silent truncation."""
    p = pristine
    b = p["batches"][-3]
    lo, hi = b[0].offset, b[-1].next
    sector = ((lo + 511) // 512) * 512
    if sector + 512 > hi:
        sector = (lo // 512) * 512
    root, seg = _copy(p, tmp_path)
    data = bytearray(p["data"])
    data[max(sector, lo):min(sector + 512, hi)] = bytes(min(sector + 512, hi) - max(sector, lo))
    wctest.write(seg, bytes(data))
    with pytest.raises(CorruptionError) as info:
        wctest.open_and_read_all(root, encrypted=not p["plain"], segment_size=SEG)
    assert os.path.abspath(info.value.path) == os.path.abspath(seg)
    assert info.value.offset is not None and lo <= info.value.offset < hi


def _sector_pieces(lo: int, hi: int) -> list[tuple[int, int]]:
    out, pos = [], lo
    while pos < hi:                                   # bounded: pos strictly grows
        nxt = min(hi, (pos // 512 + 1) * 512)
        out.append((pos, nxt))
        pos = nxt
    return out


def test_lost_sectors_of_the_last_batch(pristine, tmp_path):
    """A power loss during the last write keeps any subset of its 512-byte sectors (the model of
    walcrypt.testing.CrashVFS).  Taking each batch of the unsealed segment in turn as the last one,
    every non-empty subset of its sectors lost must open to the durable prefix before it."""
    p = pristine
    bs = p["batches"]
    checked = 0
    failures: list[str] = []
    for k in range(1, len(bs)):
        lo, hi = bs[k - 1][-1].next, bs[k][-1].next
        prefix_entries = [f for b in bs[:k] for f in b if f.type == fmt.FRAME_ENTRIES]
        if prefix_entries:
            durable = prefix_entries[-1].index + prefix_entries[-1].count - 1
        else:
            durable = bs[k][0].index - 1 if bs[k][0].type == fmt.FRAME_ENTRIES else None
        if durable is None:
            continue
        base = bytearray(p["data"][:hi]) + bytes(len(p["data"]) - hi)   # batch k is the last write
        pieces = _sector_pieces(lo, hi)
        for mask in range(1, 2 ** len(pieces)):
            data = bytearray(base)
            for j, (a, b) in enumerate(pieces):
                if mask >> j & 1:
                    data[a:b] = bytes(b - a)
            root, seg = _copy(p, tmp_path, f"k{k}-m{mask}")
            wctest.write(seg, bytes(data))
            lost = [pieces[j] for j in range(len(pieces)) if mask >> j & 1]
            try:
                _assert_opens_to(p, root, durable)
            except Exception as exc:  # noqa: BLE001 - collected, reported together below
                failures.append(f"batch [{lo}, {hi}) as the last write, sectors {lost} lost: {exc!r}")
            checked += 1
            shutil.rmtree(root)
    assert checked >= 20
    assert not failures, f"{len(failures)} of {checked} torn last writes not recovered:\n" + "\n".join(failures[:5])
