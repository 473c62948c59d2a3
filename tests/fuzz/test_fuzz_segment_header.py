"""Fuzz walcrypt.segment_codec.decode_header (harness: fuzzlib.segment_header; atheris: atheris_segment_header.py)."""

from __future__ import annotations

from hypothesis import example, given

import fuzzlib
from strategies import fuzz_settings, inputs


@given(inputs("segment_header"))
@example(b"")
@example(b"WCRYPSEG")
@fuzz_settings(2000)
def test_fuzz_segment_header(data):
    fuzzlib.segment_header(data)


def test_every_seed_is_accepted_or_rejected_cleanly():
    for data in fuzzlib.seeds("segment_header"):
        fuzzlib.segment_header(data)
