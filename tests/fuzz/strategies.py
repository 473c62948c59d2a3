"""Hypothesis side of the fuzz harnesses: inputs are corpus files mutated the way damage and
attackers change files (bit flips, bytes and length fields overwritten, truncation, zeroed
ranges, inserted / deleted / duplicated / swapped ranges, garbage tails), optionally with every
checksum recomputed afterwards so that mutations reach the checks behind the CRCs.

Budget: CI runs every harness in about 2 minutes in total.  ``WALCRYPT_FUZZ_EXAMPLES`` scales
the number of examples (e.g. ``WALCRYPT_FUZZ_EXAMPLES=20`` for a run 20 times longer).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import fuzzlib

SCALE = float(os.environ.get("WALCRYPT_FUZZ_EXAMPLES", "1"))

INTERESTING_U32 = [0, 1, 7, 8, 15, 16, 17, 24, 87, 88, 128, 4096, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF,
                   1 << 20, (1 << 20) + 1, 1 << 26, (1 << 26) + 1, 1 << 30, (1 << 30) + 1, (1 << 30) - 16]


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)


@st.composite
def mutated(draw, seeds: list[bytes], fixer=None, max_ops: int = 4):
    data = bytearray(draw(st.sampled_from(seeds)))
    n_ops = draw(st.integers(1, max_ops))
    for _ in range(n_ops):
        op = draw(st.sampled_from(["flip", "flip", "flip", "byte", "u32", "u64", "truncate", "zero", "insert",
                                   "delete", "copy", "swap", "append"]))
        size = len(data)
        pos = draw(st.integers(0, max(size - 1, 0)))
        if op == "flip" and size:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and size:
            data[pos] = draw(st.integers(0, 255))
        elif op == "u32" and size >= 4:
            pos = min(pos, size - 4)
            val = draw(st.sampled_from(INTERESTING_U32 + [size, size - pos, size + 1]))
            data[pos:pos + 4] = (val & 0xFFFF_FFFF).to_bytes(4, "little")
        elif op == "u64" and size >= 8:
            pos = min(pos & ~7, size - 8)
            val = draw(st.sampled_from([0, 1, 2, 2**32, 2**63, 2**64 - 1, pos, size]))
            data[pos:pos + 8] = val.to_bytes(8, "little")
        elif op == "truncate":
            del data[pos:]
        elif op == "zero" and size:
            n = draw(st.sampled_from([1, 8, 32, 88, 512]))
            data[pos:pos + n] = bytes(len(data[pos:pos + n]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 512))]
        elif op == "copy" and size:
            n = draw(st.integers(1, 512))
            src = draw(st.integers(0, max(size - 1, 0)))
            chunk = bytes(data[src:src + n])
            data[pos:pos + len(chunk)] = chunk
        elif op == "swap" and size:
            n = draw(st.integers(1, 256))
            other = draw(st.integers(0, max(size - 1, 0)))
            a, b = sorted((pos, other))
            if a + n <= b and b + n <= size:
                x, y = bytes(data[a:a + n]), bytes(data[b:b + n])
                data[a:a + n], data[b:b + n] = y, x
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=600))
    if fixer is not None and draw(st.booleans()):
        fixer(data)
    return bytes(data)


def inputs(name: str, target: str = "enc-open"):
    """Mutated corpus files, and now and then raw bytes, for harness ``name``."""
    seeds = fuzzlib.seeds(name, target) if name in ("segment", "segment_header") else fuzzlib.seeds(name)
    return st.one_of(mutated(seeds, fuzzlib.CRC_FIXERS[name]),
                     st.sampled_from(seeds),
                     st.binary(max_size=2048))
