"""Fuzz the snapshot reader (harness: fuzzlib.snapshot; atheris: atheris_snapshot.py): SnapshotFile,
its keyring bundle, unlock and every chunk."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given

import fuzzlib
from strategies import fuzz_settings, inputs
from walcrypt.errors import StorageError


@given(inputs("snapshot"))
@fuzz_settings(2000)
def test_fuzz_snapshot(data):
    fuzzlib.snapshot(data)


def test_every_corpus_case_is_accepted_or_rejected_cleanly():
    for data in fuzzlib.seeds("snapshot"):
        fuzzlib.snapshot(data)


def _peak(raw: bytes) -> int:
    path = fuzzlib.scratch().write(raw, "bounded.snap")
    tracemalloc.start()
    try:
        fuzzlib.snapshot_file(path)
        return tracemalloc.get_traced_memory()[1]
    except StorageError:
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _pristine() -> bytes:
    return min(f["raw"] for f in fuzzlib._snapshot_info()["files"].values())


def test_huge_declared_bundle_and_metadata_lengths_are_bounded():
    """bundle_len and the META frame length are bounded (1 MiB each) before anything is read."""
    raw = bytearray(_pristine())
    raw[44:48] = struct.pack("<I", 0xFFFF_FFFF)            # bundle_len
    fuzzlib.fix_snapshot_crc(raw)
    assert _peak(bytes(raw)) < 4 << 20
    raw = bytearray(_pristine())
    blen = struct.unpack_from("<I", raw, 44)[0]
    raw[128 + blen:128 + blen + 4] = struct.pack("<I", 0xFFFF_FFFF)   # META frame length
    assert _peak(bytes(raw)) < 4 << 20


def test_huge_declared_chunk_length_is_bounded():
    """A chunk length field far beyond the file (and beyond chunk_size) is rejected before reading."""
    import snaptest
    raw = bytearray(_pristine())
    lay = snaptest.parse_snapshot(bytes(raw))
    c = lay.chunks[0]
    raw[c.offset:c.offset + 4] = struct.pack("<I", 0xFFFF_FFFF)
    assert _peak(bytes(raw)) < 4 << 20


@pytest.mark.parametrize("bundle", [b"[1]", b"[" * 50000 + b"]" * 50000], ids=["json-list", "deeply-nested"])
def test_snapshot_bundle_that_is_not_a_json_object(bundle):
    raw = _pristine()
    blen = struct.unpack_from("<I", raw, 44)[0]
    b = bytearray(raw[:128]) + bundle + raw[128 + blen:]
    b[44:48] = struct.pack("<I", len(bundle))
    fuzzlib.fix_snapshot_crc(b)
    fuzzlib.snapshot(bytes(b))
