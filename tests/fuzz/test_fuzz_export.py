"""Fuzz the export-file parser (harness: fuzzlib.export; atheris: atheris_export.py): ExportFile,
inspect_export with and without the KEK, and the snapshot inside."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given

import fuzzlib
from strategies import fuzz_settings, inputs
from walcrypt.errors import StorageError


@given(inputs("export"))
@fuzz_settings(2000)
def test_fuzz_export(data):
    fuzzlib.export(data)


def test_every_corpus_case_is_accepted_or_rejected_cleanly():
    for data in fuzzlib.seeds("export"):
        fuzzlib.export(data)


def test_huge_declared_lengths_are_bounded():
    """snapshot_len, kek_len and bundle_len far beyond the file: rejected from the file size, no allocation."""
    raw = fuzzlib.seeds("export")[0]
    for off, fmt_ in ((16, "<Q"), (12, "<I"), (52, "<I")):
        b = bytearray(raw)
        b[off:off + struct.calcsize(fmt_)] = struct.pack(fmt_, 2 ** (8 * struct.calcsize(fmt_)) - 1)
        fuzzlib.fix_export_crcs(b)
        tracemalloc.start()
        try:
            try:
                fuzzlib.export(bytes(b))
            except StorageError:
                pass
            assert tracemalloc.get_traced_memory()[1] < 4 << 20
        finally:
            tracemalloc.stop()


# ---------------------------------------------------------------------------------------------
# Regressions the fuzzer led to: a CRC-valid export whose keyring JSON has an unexpected shape.
# ---------------------------------------------------------------------------------------------

def _with_bundle(seed: bytes, bundle: bytes) -> bytes:
    klen = int.from_bytes(seed[12:16], "little")
    blen = int.from_bytes(seed[52:56], "little")
    b = bytearray(seed[:64 + klen]) + bundle + seed[64 + klen + blen:]
    b[52:56] = len(bundle).to_bytes(4, "little")
    fuzzlib.fix_export_crcs(b)
    return bytes(b)


def _bundle_variant(name: str) -> bytes:
    import json
    seed = [s for s in fuzzlib.seeds("export") if int.from_bytes(s[12:16], "little") == 0][0]
    klen, blen = 0, int.from_bytes(seed[52:56], "little")
    doc = json.loads(seed[64 + klen:64 + klen + blen])
    if name == "json-list":
        return _with_bundle(seed, b"[1]")
    if name == "deeply-nested":
        return _with_bundle(seed, b"[" * 50000 + b"]" * 50000)
    if name == "keys-not-a-list":
        doc["keys"] = 7
    elif name == "key-not-an-object":
        doc["keys"] = [5]
    elif name == "state-not-a-number":
        doc["keys"][0]["state"] = [1]
    elif name == "key-without-state":
        doc["keys"][0]["rtate"] = doc["keys"][0].pop("state")
    elif name == "purpose-out-of-range":
        doc["keys"][0]["purpose"] = 300
    return _with_bundle(seed, json.dumps(doc, sort_keys=True).encode())


@pytest.mark.parametrize("name", ["json-list", "deeply-nested", "keys-not-a-list", "key-not-an-object",
                                  "key-without-state", "state-not-a-number", "purpose-out-of-range"])
def test_export_with_a_malformed_keyring_is_a_storage_error(name):
    fuzzlib.export(_bundle_variant(name))
