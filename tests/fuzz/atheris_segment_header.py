#!/usr/bin/env python3
"""libFuzzer entry point (atheris) for walcrypt.segment_codec.decode_header.

The harness is tests/fuzz/fuzzlib.py:segment_header, the same function the hypothesis test
tests/fuzz/test_fuzz_segment_header.py runs in CI.  Needs the ``fuzz`` extra (atheris).  From the repository root:

    mkdir -p /tmp/fuzz-segment_header
    python tests/fuzz/atheris_segment_header.py /tmp/fuzz-segment_header -max_total_time=3600 -rss_limit_mb=2048 -timeout=10

An empty corpus directory is seeded from tests/corpus first (pristine files and every damaged case).
Set WALCRYPT_FUZZ_FIXCRC=1 to recompute the checksums of each input before the harness runs, so that
mutations reach the checks behind the CRCs.  Add -jobs=N -workers=N to use N cores.  A crash is any
exception other than walcrypt.errors.StorageError, or an assertion of the harness (data that was
never written came back); libFuzzer writes the input to crash-<sha1> in the current directory:
replay it with ``python tests/fuzz/atheris_segment_header.py crash-<sha1>``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["walcrypt"]):
    import fuzzlib  # noqa: E402

if __name__ == "__main__":
    fuzzlib.atheris_main("segment_header")
