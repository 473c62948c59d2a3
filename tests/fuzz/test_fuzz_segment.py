"""Fuzz frame decoding and whole-segment recovery (harness: fuzzlib.segment; atheris: atheris_segment.py).

The open path of Store._open_segment, Segment.scan with the segment's own key, and Segment.read_frame /
load_sealed / read_entries_record on a file: a result or a StorageError, never entries that were not
written, and bounded memory for any declared length.
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
