"""Fuzz the JSON records read from disk (harness: fuzzlib.json_records; atheris: atheris_json.py):
store/kek_params and what a KEK provider does with accepted parameters, keyring bundles, the DEK
rotation record and snapshot metadata.  Any input gives a result or a StorageError; accepted values
are within the bounds of FORMAT.md 8.1, 9.6 and 10.5."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import given

import fuzzlib
from strategies import fuzz_settings, json_inputs
from walcrypt import keys as K


@given(json_inputs())
@fuzz_settings(3000)
def test_fuzz_json(data):
    fuzzlib.json_records(data)


def test_every_seed_is_accepted():
    for data in fuzzlib.seeds("json"):
        fuzzlib.json_records(data)


@pytest.mark.parametrize("n, r", [(2 ** 22, 32), (2 ** 22, 8), (2 ** 20, 8)])
def test_accepted_but_expensive_scrypt_costs_are_not_derived(n, r, monkeypatch):
    """Within the format's range, above the provider's cap: refused without allocating."""
    doc = {"kind": "passphrase", "kdf": "scrypt", "salt": "00" * 16, "n": n, "r": r, "p": 1}
    tracemalloc.start()
    try:
        fuzzlib.json_records(bytes([0]) + json.dumps(doc).encode())
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    with pytest.raises(fuzzlib.StorageError):
        K.Passphrase("pw").material(doc)
