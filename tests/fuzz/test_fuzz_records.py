"""Fuzz the LMDB record decoders (harness: fuzzlib.records; atheris: atheris_records.py): segment manifest,
keyring, compaction point, snapshot registry, sealed stable values and value MACs."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given

import fuzzlib
from strategies import fuzz_settings, inputs
from walcrypt import meta as M
from walcrypt.errors import StorageError


@given(inputs("records"))
@fuzz_settings(4000)
def test_fuzz_records(data):
    fuzzlib.records(data)


@pytest.mark.parametrize("sel", range(len(fuzzlib.RECORD_DECODERS)))
def test_every_decoder_takes_empty_and_short_values(sel):
    for n in range(0, 80):
        fuzzlib.records(bytes([sel]) + bytes(n))
        fuzzlib.records(bytes([sel]) + b"\xff" * n)


def test_keyring_record_with_a_huge_wrapped_length_is_bounded():
    rec = bytearray(fuzzlib.record_seeds()[1][1:])
    rec[20:24] = (0xFFFF_FFFF).to_bytes(4, "little")
    tracemalloc.start()
    try:
        with pytest.raises(StorageError):
            M.decode_keyring(b"\x01" * 16, bytes(rec), "<fuzz>")
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
