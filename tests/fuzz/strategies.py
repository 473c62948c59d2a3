"""Hypothesis side of the fuzz harnesses: inputs are corpus files mutated the way damage and
attackers change files (bit flips, bytes and length fields overwritten, truncation, zeroed
ranges, inserted / deleted / duplicated / swapped ranges, garbage tails), optionally with every
checksum recomputed afterwards so that mutations reach the checks behind the CRCs.

Budget: CI runs every harness in about 2 minutes in total.  ``WALCRYPT_FUZZ_EXAMPLES`` scales
the number of examples (e.g. ``WALCRYPT_FUZZ_EXAMPLES=20`` for a run 20 times longer).
"""

from __future__ import annotations

import copy
import json
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


# Values a JSON field is set to: types a parser must not trust, numbers at and around every bound of
# FORMAT.md 8.1 / 10.5 / 13, hex of the wrong length or alphabet, deep and wide nesting.
INTERESTING_JSON = [None, True, False, 0, 1, -1, 2, 3, 7, 15, 16, 17, 32, 33, 255, 256, 1000, 1 << 14, 1 << 15,
                    1 << 18, (1 << 18) + 1, 1 << 19, 1 << 22, 1 << 24, 2 ** 32, 2 ** 63, 2 ** 64, 2 ** 64 + 1,
                    -(2 ** 63), 1.5, 1e308, "", "0", "00", "zz", "0" * 31, "00" * 16, "AB" * 16, "00" * 15,
                    "00" * 17, "00" * 64, "00" * 65, "ff" * 8192, "x" * 300, "a=b", " demo", "demo\n",
                    "scrypt", "passphrase", "kms", "raw", [], {}, [1], [[1]], {"a": 1}, ["1", 2],
                    [[[[[[[[[[]]]]]]]]]]]


@st.composite
def json_mutated(draw, seeds: list[bytes]):
    """A seed record (selector byte + JSON) with fields replaced, deleted, added or retyped at any depth;
    now and then serialised oddly or cut."""
    seed = draw(st.sampled_from(seeds))
    sel, doc = seed[:1], json.loads(seed[1:])
    big = 5000                     # one operation per example may multiply a value this much
    for _ in range(draw(st.integers(1, 3))):
        # walk to a random container
        node, path = doc, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        value = copy.deepcopy(draw(st.one_of(st.sampled_from(INTERESTING_JSON), st.integers(), st.text(max_size=40))))
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            op = draw(st.sampled_from(["set", "set", "delete", "add", "wrap"]))
            if op == "set":
                node[key] = value
            elif op == "delete":
                del node[key]
            elif op == "add":
                node[draw(st.text(max_size=8))] = value
            else:
                node[key] = [node[key]] * draw(st.integers(1, max(big, 3)))
                big = 0
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
            op = draw(st.sampled_from(["set", "delete", "repeat"]))
            if op == "set":
                node[k] = value
            elif op == "delete":
                del node[k]
            else:
                node.extend([node[k]] * draw(st.integers(1, max(big, 3))))
                big = 0
        else:
            doc = value
    raw = json.dumps(doc, sort_keys=draw(st.booleans())).encode()
    form = draw(st.sampled_from(["plain", "plain", "plain", "cut", "nested", "bytes"]))
    if form == "cut" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif form == "nested":
        depth = draw(st.sampled_from([10, 1000, 100000]))
        raw = b"[" * depth + raw + b"]" * depth
    elif form == "bytes":
        raw = draw(st.binary(max_size=64)) + raw
    return sel + raw


def json_inputs():
    seeds = fuzzlib.seeds("json")
    return st.one_of(json_mutated(seeds), st.sampled_from(seeds), mutated(seeds, max_ops=2),
                     st.binary(max_size=512))
