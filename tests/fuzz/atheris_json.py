#!/usr/bin/env python3
"""libFuzzer entry point (atheris) for the JSON records read from disk (KEK parameters, keyring
bundles, the DEK rotation record, snapshot metadata).

The harness is tests/fuzz/fuzzlib.py:json_records, the same function the hypothesis test
tests/fuzz/test_fuzz_json.py runs in CI.  Needs the ``fuzz`` extra (atheris).  From the repository root:

    mkdir -p /tmp/fuzz-json
    python tests/fuzz/atheris_json.py /tmp/fuzz-json -max_total_time=3600 -rss_limit_mb=2048 -timeout=10

An empty corpus directory is seeded first (KEK parameters of every kind, the keyring bundles of the
corpus exports and snapshots, a rotation record, snapshot metadata; the first byte of an input picks
the parser).  Add -jobs=N -workers=N to use N cores.  A crash is any exception other than
walcrypt.errors.StorageError (or a key error from a KEK provider), or an assertion of the harness (a
value accepted outside its bounds); libFuzzer writes the input to crash-<sha1> in the current directory:
replay it with ``python tests/fuzz/atheris_json.py crash-<sha1>``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["walcrypt"]):
    import fuzzlib  # noqa: E402

if __name__ == "__main__":
    fuzzlib.atheris_main("json")
