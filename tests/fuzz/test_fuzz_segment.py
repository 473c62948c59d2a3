"""Fuzz frame decoding and whole-segment recovery (harness: fuzzlib.segment; atheris: atheris_segment.py).

The open path of Store._open_segment, Segment.scan with the segment's own key, and Segment.read_frame /
load_sealed / read_entries_record / read_entries_records on a file: a result or a StorageError, never
entries that were not written, and bounded memory for any declared length.
"""

from __future__ import annotations

import os
import tracemalloc

import pytest
from hypothesis import given

import fuzzlib
from strategies import fuzz_settings, inputs
from walcrypt import format as fmt
from walcrypt.errors import StorageError

import wctest

EXAMPLES = {"enc-open": 3000, "enc-sealed": 1000, "plain-open": 1000, "snap-sealed": 600}


@pytest.mark.parametrize("target", list(EXAMPLES))
def test_fuzz_segment(target):
    @given(inputs("segment", target))
    @fuzz_settings(EXAMPLES[target])
    def run(data):
        fuzzlib.segment(data, target)
    run()


def test_every_corpus_case_is_accepted_or_rejected_cleanly():
    for target in fuzzlib.SEGMENT_TARGETS:
        for data in fuzzlib.seeds("segment", target):
            fuzzlib.segment(data, target)


def _with_length(data: bytes, offset: int, length: int) -> bytes:
    b = bytearray(data)
    lo, size = wctest.FRAME_FIELDS["length"]
    b[offset + lo:offset + lo + size] = length.to_bytes(size, "little")
    return bytes(b)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except StorageError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


BOUND = 8 << 20          # far below any declared length tried here, far above the files (a few KiB)


@pytest.mark.parametrize("length", [fmt.MAX_RECORD_PAYLOAD, fmt.MAX_RECORD_PAYLOAD + 1, 0xFFFF_FFFF])
def test_scan_memory_is_bounded_for_a_huge_declared_length(length):
    """A frame length far beyond the file: the scan allocates nothing in proportion to it."""
    info = fuzzlib._segment_info("enc-open")
    data = info["pristine"]
    last = wctest.batches(wctest.parse_frames(data))[-1][0]
    damaged = _with_length(data, last.offset, length)
    seg = fuzzlib._segment_for(info, info["salt"])
    assert _peak(lambda: seg.scan(damaged)) < BOUND


def test_read_frame_memory_is_bounded_for_a_huge_declared_length():
    """read_frame of a sealed segment's INDEX frame whose length says 2^30 in a 4 KiB file."""
    info = fuzzlib._segment_info("enc-sealed")
    damaged = _with_length(info["pristine"], info["index_offset"], fmt.MAX_RECORD_PAYLOAD)
    path = fuzzlib.scratch().write(damaged, "bounded.wal")
    seg = fuzzlib._segment_for(info, info["salt"], path)
    try:
        peak = _peak(lambda: seg.load_sealed(info["index_offset"], len(damaged)))
    finally:
        seg.close()
    assert peak < BOUND, f"read_frame allocated {peak} bytes for a {os.path.getsize(path)}-byte file"


def test_read_frame_memory_is_bounded_by_the_format_limit():
    """Whatever the declared length, read_frame never allocates beyond MAX_RECORD_PAYLOAD (+ slack)."""
    info = fuzzlib._segment_info("enc-sealed")
    damaged = _with_length(info["pristine"], info["index_offset"], 0xFFFF_FFFF)
    path = fuzzlib.scratch().write(damaged, "bounded.wal")
    seg = fuzzlib._segment_for(info, info["salt"], path)
    try:
        peak = _peak(lambda: seg.load_sealed(info["index_offset"], len(damaged)))
    finally:
        seg.close()
    assert peak < BOUND           # over the limit: rejected before any read


@pytest.mark.parametrize("length", [fmt.MAX_RECORD_PAYLOAD, 0xFFFF_FFFF])
@pytest.mark.parametrize("window", [1, None])
def test_bulk_read_memory_is_bounded_for_a_huge_declared_length(length, window):
    """read_entries_records over a sealed segment whose middle ENTRIES frame says 2^30 bytes (or more
    than the format allows) in a small file: rejected before anything of that size is allocated."""
    info = fuzzlib._segment_info("enc-sealed")
    frames = [f for f in wctest.parse_frames(info["pristine"]) if f.type == fmt.FRAME_ENTRIES]
    damaged = _with_length(info["pristine"], frames[len(frames) // 2].offset, length)
    path = fuzzlib.scratch().write(damaged, "bounded.wal")
    seg = fuzzlib._segment_for(info, info["salt"], path)
    try:
        seg.load_sealed(info["index_offset"], len(damaged))
        peak = _peak(lambda: list(seg.read_entries_records(0, len(seg.rec_offset) - 1, window)))
    finally:
        seg.close()
    assert peak < BOUND, f"the bulk read allocated {peak} bytes for a {os.path.getsize(path)}-byte file"


# ---------------------------------------------------------------------------------------------
# The bounded scan decides like the whole-file scan, on systematic damage to multi-sector frames
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multi_sector_segment(tmp_path_factory):
    """An unsealed segment (a crash image) whose last write units hold records spanning several
    512-byte sectors, with the identity and cipher needed to scan it outside a store."""
    import shutil
    import walcrypt
    from walcrypt import Entry, HardState
    d = tmp_path_factory.mktemp("multisector")
    live, image = str(d / "live"), str(d / "image")
    kek = walcrypt.RawKey(bytes(range(32)))
    s = walcrypt.open(live, kek=kek, segment_size=16 << 10)
    try:
        s.save(hard_state=HardState(1, 1, 0), entries=[Entry(1, 1, b"a" * 40), Entry(2, 1, b"b" * 40)])
        s.save(hard_state=HardState(1, 1, 2), entries=[Entry(3, 1, bytes(range(256)) * 12)])     # 3 KiB
        s.save(hard_state=HardState(2, 1, 3), entries=[Entry(4, 2, bytes(range(255, -1, -1)) * 20)])  # 5 KiB
        shutil.copytree(live, image)
    finally:
        s.close()
    with walcrypt.open(image, kek=kek, read_only=True) as s:
        seg = s.wal.segments[-1]
        assert not seg.sealed and seg.last_index == 4
        ident, cipher, path = seg.ident, seg.cipher, seg.path
    with open(path, "rb") as f:
        data = f.read()
    return ident, cipher, data


def _damage_cases(data: bytes):
    """(name, bytes): truncations, zeroed runs and bit flips (with and without the frame CRC fixed)
    over the last two write units, at frame fields, sector boundaries and window-ish offsets."""
    frames = wctest.parse_frames(data)
    units = wctest.batches(frames)
    lo, hi = units[-2][0].offset, units[-1][-1].end
    points = set()
    for f in units[-2] + units[-1]:
        points.update(f.offset + d for d in (0, 1, 8, 32, 36, 40, 52, 56, 72, 80, 87, 88, 89))
        points.update((f.end - 1, f.end, f.end - 16))
    for b in range((lo // 512 + 1) * 512, hi, 512):
        points.update((b - 33, b - 32, b - 1, b, b + 1, b + 31, b + 32))
    points = sorted(p for p in points if lo <= p < hi)
    for cut in list(range(lo, hi + 1, 24)) + points:
        yield f"cut@{cut}", data[:cut]
        yield f"cut@{cut}+zeros", data[:cut] + bytes(len(data) - cut)
    for p in points:
        for n in (1, 8, 31, 32, 33, 88, 512):
            b = bytearray(data)
            b[p:p + n] = bytes(len(b[p:p + n]))
            yield f"zero@{p}x{n}", bytes(b)
        for fix in (False, True):
            b = bytearray(data)
            b[p] ^= 0x40
            if fix:
                owner = [f for f in frames if f.offset <= p < f.end]
                if owner:
                    wctest.fix_frame_crc(b, owner[0].offset)
            yield f"flip@{p}{'+crc' if fix else ''}", bytes(b)
            if p < units[-1][0].offset:       # damage before the last unit, whose COMMIT ends the file
                yield f"flip@{p}{'+crc' if fix else ''}+cut", bytes(b[:units[-1][-1].end])


def test_bounded_scan_matches_the_whole_file_scan_on_systematic_damage(multi_sector_segment):
    from walcrypt.bounded import FileSource
    from walcrypt.segment import Segment
    from walcrypt.vfs import VFS
    from walcrypt.inspection import scan_frame_headers
    from legacy_scan import LegacySegment, legacy_scan_frame_headers
    ident, cipher, data = multi_sector_segment
    outcomes = set()
    n = 0
    for name, damaged in _damage_cases(data):
        path = fuzzlib.scratch().write(damaged, "systematic.wal")
        expected = fuzzlib._scan_outcome(LegacySegment(VFS(), path, ident, cipher), damaged)
        outcomes.add(expected[0] if expected[0] == "error" else ("torn" if expected[1][1] else "clean"))
        fd = os.open(path, os.O_RDONLY)
        try:
            for window in fuzzlib.SCAN_WINDOWS:
                got = fuzzlib._scan_outcome(Segment(VFS(), path, ident, cipher), FileSource(VFS(), fd), window=window)
                assert got == expected, f"{name}, window {window}: {got[:4]} where the whole-file scan gave {expected[:4]}"
                assert scan_frame_headers(path, window=window) == legacy_scan_frame_headers(damaged), (name, window)
        finally:
            os.close(fd)
        n += 1
    assert n > 1000 and outcomes == {"error", "torn", "clean"}, (n, outcomes)
