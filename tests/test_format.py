"""The on-disk format v1: struct codecs vs construct declarations, golden vectors, versioning.

* (i)   every ``*_STRUCT`` codec in ``walcrypt.format`` packs exactly what its construct
        declaration builds, and both parse each other's output back;
* (ii)  every golden segment and snapshot in ``formats/vectors/`` decodes two ways -- with the
        construct declarations plus an independent reading of FORMAT.md (own HKDF, AEAD, CRC,
        chain checks), and with the engine's reader (``Segment.scan`` / ``load_sealed``,
        ``SnapshotFile``); the damaged segments give the outcome the recovery rule prescribes;
        key wrapping, stable values and metadata MACs match their vectors;
* (iii) ``formats/make_vectors.py`` regenerates the vectors byte for byte;
* (iv)  FORMAT_VERSION is 1 and the vectors carry it.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import random
import struct

import construct as c
import pytest
from crc32c import crc32c
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from walcrypt import crypto, keys
from walcrypt import format as fmt
from walcrypt import meta as M
from walcrypt.errors import AuthenticationError, CorruptionError, UnsupportedFormatError
from walcrypt.segment import Segment
from walcrypt.segment_codec import SegmentIdentity, decode_entries_payload, decode_header, encode_entries_payload, encode_header
from walcrypt.types import Entry, HardState
from walcrypt.vfs import VFS

try:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
except ImportError:  # pragma: no cover
    AESGCMSIV = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "formats", "vectors")
SCRIPT = os.path.join(ROOT, "formats", "make_vectors.py")


def _siv_available() -> bool:
    try:
        crypto.suite(fmt.ALG_AES_256_GCM_SIV).new(bytes(32))
        return True
    except UnsupportedFormatError:
        return False


@pytest.fixture(scope="module")
def doc() -> dict:
    with open(os.path.join(VECTORS, "vectors.json"), encoding="utf-8") as f:
        return json.load(f)


def _read(name: str) -> bytes:
    with open(os.path.join(VECTORS, name), "rb") as f:
        return f.read()


# ===========================================================================
# (i) struct codecs == construct declarations
# ===========================================================================

def _fields(decl: c.Struct, n: int | None = None):
    """(name, kind, arg) of the first n fixed-size fields of a declaration."""
    out = []
    for sc in decl.subcons[:n]:
        sub = sc.subcon
        if isinstance(sub, c.Const):
            out.append((sc.name, "const", sub.value))
        elif isinstance(sub, c.FormatField):
            out.append((sc.name, "int", 8 * sub.sizeof()))
        elif isinstance(sub, c.Bytes) and isinstance(sub.length, int):
            out.append((sc.name, "bytes", sub.length))
        else:
            raise AssertionError(f"{decl}: field {sc.name} is not fixed-size")
    return out


def _sample(fields, rng: random.Random, mode: str) -> dict:
    vals = {}
    for name, kind, arg in fields:
        if kind == "const":
            vals[name] = arg
        elif kind == "int":
            vals[name] = {"min": 0, "max": (1 << arg) - 1}.get(mode, rng.getrandbits(arg))
        else:
            vals[name] = {"min": bytes(arg), "max": b"\xff" * arg}.get(mode, rng.randbytes(arg))
    return vals


MODES = ["min", "max"] + [f"random{k}" for k in range(20)]

# codec -> (declaration, number of leading declaration fields the codec covers; None = all)
CODECS = {
    "SEGMENT_HEADER_STRUCT": (fmt.SegmentHeader, None),
    "FRAME_HEADER_STRUCT": (fmt.FrameHeader, None),
    "HARDSTATE_STRUCT": (fmt.HardStatePayload, None),
    "COMMIT_STRUCT": (fmt.CommitPayload, None),
    "INDEX_RECORD_STRUCT": (fmt.IndexRecordEntry, None),
    "TERM_RUN_STRUCT": (fmt.TermRun, None),
    "MANIFEST_STRUCT": (fmt.SegmentManifestRecord, None),
    "SNAPSHOT_RECORD_STRUCT": (fmt.SnapshotRecordPayload, None),
    "SNAPSHOT_MANIFEST_STRUCT": (fmt.SnapshotManifestRecord, None),
    "ENTRIES_PREFIX_STRUCT": (fmt.EntriesPayload, 2),     # count, reserved
    "INDEX_PREFIX_STRUCT": (fmt.IndexPayload, 4),         # record_count, run_count, end_offset, hardstate_offset
    "KEYRING_PREFIX_STRUCT": (fmt.KeyringRecord, 7),      # ... wrapped_len
}


def test_every_struct_codec_is_checked():
    codecs = {n for n in dir(fmt) if n.endswith("_STRUCT") and isinstance(getattr(fmt, n), struct.Struct)}
    assert codecs == set(CODECS)


@pytest.mark.parametrize("name", sorted(n for n, (_d, k) in CODECS.items() if k is None))
@pytest.mark.parametrize("mode", MODES)
def test_fixed_codec_matches_declaration(name, mode):
    codec = getattr(fmt, name)
    decl = CODECS[name][0]
    fields = _fields(decl)
    assert decl.sizeof() == codec.size
    vals = _sample(fields, random.Random(f"{name}/{mode}"), mode)
    packed = codec.pack(*vals.values())
    assert packed == decl.build(vals)
    parsed = decl.parse(packed)
    assert {k: parsed[k] for k in vals} == vals
    assert codec.unpack(decl.build(vals)) == tuple(vals.values())


def _variable_tail(name: str, prefix: dict, rng: random.Random):
    """Choose the counts of a variable declaration and the parts that follow its prefix."""
    if name == "ENTRIES_PREFIX_STRUCT":
        n = rng.randrange(0, 5)
        prefix["count"] = n
        lengths = [rng.randrange(0, 40) for _ in range(n)]
        rest = {"terms": [rng.getrandbits(64) for _ in range(n)], "lengths": lengths,
                "data": rng.randbytes(sum(lengths))}
        tail = struct.pack(f"<{n}Q", *rest["terms"]) + struct.pack(f"<{n}I", *lengths) + rest["data"]
    elif name == "INDEX_PREFIX_STRUCT":
        n, m = rng.randrange(0, 4), rng.randrange(0, 4)
        prefix["record_count"], prefix["run_count"] = n, m
        recs = [_sample(_fields(fmt.IndexRecordEntry), rng, "random") for _ in range(n)]
        runs = [_sample(_fields(fmt.TermRun), rng, "random") for _ in range(m)]
        rest = {"records": recs, "runs": runs}
        tail = b"".join(fmt.INDEX_RECORD_STRUCT.pack(*r.values()) for r in recs) + \
            b"".join(fmt.TERM_RUN_STRUCT.pack(*r.values()) for r in runs)
    else:  # KEYRING_PREFIX_STRUCT
        w = rng.randrange(0, 80)
        prefix["wrapped_len"] = w
        rest = {"wrapped": rng.randbytes(w)}
        tail = rest["wrapped"]
    return rest, tail


@pytest.mark.parametrize("name", sorted(n for n, (_d, k) in CODECS.items() if k is not None))
@pytest.mark.parametrize("mode", MODES)
def test_prefix_codec_matches_declaration(name, mode):
    codec = getattr(fmt, name)
    decl, k = CODECS[name]
    rng = random.Random(f"{name}/{mode}")
    prefix = _sample(_fields(decl, k), rng, mode)
    rest, tail = _variable_tail(name, prefix, rng)
    built = decl.build(dict(prefix, **rest))
    assert built == codec.pack(*prefix.values()) + tail
    parsed = decl.parse(built)
    assert codec.unpack_from(built) == tuple(parsed[f] for f in prefix)


def test_fixed_offsets():
    """The offsets FORMAT.md and the hot paths rely on."""
    def offset_of(decl, field):
        off = 0
        for sc in decl.subcons:
            if sc.name == field:
                return off
            off += sc.sizeof()
        raise KeyError(field)

    assert fmt.SegmentHeader.sizeof() == fmt.SEGMENT_HEADER_SIZE == 128
    assert fmt.FrameHeader.sizeof() == fmt.FRAME_HEADER_SIZE == 88
    assert offset_of(fmt.SegmentHeader, "crc") == 124
    assert offset_of(fmt.SegmentHeader, "key_id") == 48
    assert offset_of(fmt.FrameHeader, "crc") == fmt.FRAME_CRC_OFFSET == 36
    assert offset_of(fmt.FrameHeader, "nonce") == 40
    assert offset_of(fmt.FrameHeader, "key_id") == 56
    assert offset_of(fmt.FrameHeader, "prev_chain") == 72
    assert fmt.MANIFEST_STRUCT.size == 72 and fmt.KEYRING_PREFIX_STRUCT.size == 24


@pytest.mark.parametrize("alg", [fmt.ALG_NONE, fmt.ALG_AES_256_GCM, fmt.ALG_CHACHA20_POLY1305,
                                 fmt.ALG_AES_256_GCM_SIV])
def test_segment_header_encoder(alg):
    rng = random.Random(alg)
    ident = SegmentIdentity(rng.randbytes(16), rng.getrandbits(64), rng.getrandbits(64), alg, rng.randbytes(16),
                            rng.randbytes(32), rng.randbytes(24))
    raw = encode_header(ident)
    vals = {"magic": fmt.SEGMENT_MAGIC, "version": fmt.FORMAT_VERSION, "header_size": 128, "algorithm": alg,
            "flags": 0, "reserved0": 0, "store_id": ident.store_id, "segment_id": ident.segment_id,
            "base_index": ident.base_index, "key_id": ident.key_id, "salt": ident.salt,
            "commitment": ident.commitment, "reserved1": 0, "crc": 0}
    vals["crc"] = crc32c(fmt.SegmentHeader.build(vals)[:124])
    assert raw == fmt.SegmentHeader.build(vals)
    assert decode_header(raw, "x") == ident


def test_entries_payload_encoder():
    rng = random.Random(7)
    entries = [Entry(10 + k, 3 + k // 2, rng.randbytes(rng.randrange(0, 300))) for k in range(9)]
    for a, b in [(0, 1), (0, 9), (3, 7)]:
        chunk = entries[a:b]
        payload = encode_entries_payload(entries, a, b)
        assert payload == fmt.EntriesPayload.build({
            "count": len(chunk), "reserved": 0, "terms": [e.term for e in chunk],
            "lengths": [len(e.data) for e in chunk], "data": b"".join(e.data for e in chunk)})
        rec = decode_entries_payload(payload, chunk[0].index, len(chunk), path="x", offset=0)
        assert list(rec.terms) == [e.term for e in chunk] and rec.datas() == [e.data for e in chunk]


def test_index_payload_encoder():
    seg = Segment(VFS(), "x", SegmentIdentity(bytes(16), 1, 5, 1, bytes(16), bytes(32), bytes(24)), None)
    seg.write_offset, seg.hardstate_offset = 4096, 3000
    for off, idx, cnt, terms in [(200, 5, 3, [1, 1, 2]), (900, 8, 1, [2]), (1500, 9, 2, [4, 4])]:
        seg._index_entries(off, idx, cnt, terms)
    built = fmt.IndexPayload.build({
        "record_count": 3, "run_count": 3, "end_offset": 4096, "hardstate_offset": 3000,
        "records": [{"offset": o, "index": i, "count": n, "reserved": 0}
                    for o, i, n in [(200, 5, 3), (900, 8, 1), (1500, 9, 2)]],
        "runs": [{"index": 5, "term": 1}, {"index": 7, "term": 2}, {"index": 9, "term": 4}]})
    assert seg.encode_index() == built


def test_manifest_and_keyring_encoders():
    rec = {"state": fmt.SEG_SEALED, "algorithm": 3, "dir_code": fmt.DIR_CODE_ENCRYPTED, "base_index": 77,
           "key_id": bytes(range(16)), "index_offset": 1 << 33, "end_offset": (1 << 33) + 200,
           "last_index": 1000, "records": 55, "bytes": 1 << 40}
    raw = M.encode_manifest(rec)
    assert raw == fmt.SegmentManifestRecord.build(dict(rec, version=1, reserved=0))
    assert M.decode_manifest(raw, "x") == rec
    entry = keys.KeyEntry(bytes(range(16)), keys.RETIRING, 2, keys.PURPOSE_DEK, 123, 456, b"\x01" * 61)
    raw = M.encode_keyring(entry)
    assert raw == fmt.KeyringRecord.build({"version": 1, "state": keys.RETIRING, "algorithm": 2,
                                           "purpose": keys.PURPOSE_DEK, "created_ns": 123,
                                           "state_changed_ns": 456, "wrapped_len": 61, "wrapped": b"\x01" * 61})
    assert M.decode_keyring(entry.key_id, raw, "x") == entry


# ===========================================================================
# (ii) golden segments, two readers
# ===========================================================================

def _aead_open(alg: int, key: bytes | None):
    if alg == fmt.ALG_NONE:
        def open_none(nonce, ct, aad):
            body, tag = ct[:-16], ct[-16:]
            assert hashlib.blake2b(aad + body, digest_size=16).digest() == tag
            return body
        return open_none
    cls = {fmt.ALG_AES_256_GCM: AESGCM, fmt.ALG_CHACHA20_POLY1305: ChaCha20Poly1305,
           fmt.ALG_AES_256_GCM_SIV: AESGCMSIV}[alg]
    return cls(key).decrypt


def _segment_key(dek: bytes, hdr) -> tuple[bytes, bytes]:
    info = b"walcrypt/v1/segment" + hdr.store_id + struct.pack("<Q", hdr.segment_id) + bytes([hdr.algorithm])
    okm = HKDF(hashes.SHA256(), 56, salt=hdr.salt, info=info).derive(dek)
    return okm[:32], okm[32:]


def decode_by_spec(data: bytes, dek: bytes) -> dict:
    """An independent reader written from FORMAT.md: construct declarations, own crypto and checks."""
    hdr = fmt.SegmentHeader.parse(data[:128])
    assert hdr.version == 1 and hdr.header_size == 128 and hdr.flags == 0
    assert hdr.reserved0 == 0 and hdr.reserved1 == 0
    assert crc32c(data[:124]) == hdr.crc
    if hdr.algorithm == fmt.ALG_NONE:
        key = None
        assert hdr.key_id == bytes(16) and hdr.salt == bytes(32) and hdr.commitment == bytes(24)
    else:
        key, commitment = _segment_key(dek, hdr)
        assert commitment == hdr.commitment
    aead_open = _aead_open(hdr.algorithm, key)
    ad_prefix = hdr.store_id + struct.pack("<Q", hdr.segment_id)
    out = {"entries": [], "hard_state": None, "snapshots": [], "frames": [], "index": None, "committed_end": 128}
    off, seq, chain, pending = 128, 0, bytes(16), []
    last_hs_offset = 0
    while off + 88 <= len(data):
        raw = data[off:off + 88]
        fh = fmt.FrameHeader.parse(raw)
        if fh.type == fmt.FRAME_UNWRITTEN:
            assert not any(data[off:]), "bytes after the clean end"
            break
        end = off + 88 + fh.length
        ct = data[off + 88:end]
        assert crc32c(raw[:36] + raw[40:] + ct) == fh.crc
        assert (fh.seq, fh.algorithm, fh.key_id, fh.prev_chain) == (seq, hdr.algorithm, hdr.key_id, chain)
        assert fh.nonce == bytes(4) + seq.to_bytes(8, "big")
        assert fh.flags == fh.reserved0 == fh.reserved1 == 0
        plain = aead_open(fh.nonce, ct, ad_prefix + raw[:36] + raw[40:])
        next_off = (end + 7) & ~7
        assert not any(data[end:next_off]), "padding is zero"
        out["frames"].append((off, fh.type))
        chain, seq = ct[-16:], seq + 1
        if fh.type == fmt.FRAME_ENTRIES:
            p = fmt.EntriesPayload.parse(plain)
            assert p.count == fh.count >= 1 and p.terms[0] == fh.term and len(p.data) == sum(p.lengths)
            pos, ents = 0, []
            for k in range(p.count):
                ents.append((fh.index + k, p.terms[k], p.data[pos:pos + p.lengths[k]]))
                pos += p.lengths[k]
            pending.append(("entries", off, fh.index, fh.count, ents))
        elif fh.type == fmt.FRAME_HARDSTATE:
            assert fh.index == 0 and fh.count == 0
            p = fmt.HardStatePayload.parse(plain)
            assert p.term == fh.term
            pending.append(("hs", off, (p.term, p.vote, p.commit)))
        elif fh.type == fmt.FRAME_SNAPSHOT:
            p = fmt.SnapshotRecordPayload.parse(plain)
            assert (fh.index, fh.term, fh.count) == (p.index, p.term, 0)
            pending.append(("snap", off, (p.snapshot_id, p.index, p.term, p.digest)))
        elif fh.type == fmt.FRAME_COMMIT:
            p = fmt.CommitPayload.parse(plain)
            assert p.records == fh.count == len(pending) and p.reserved == 0
            for rec in pending:
                if rec[0] == "entries":
                    out["entries"].extend(rec[4])
                elif rec[0] == "snap":
                    out["snapshots"].append(rec[2])
                else:
                    out["hard_state"], last_hs_offset = rec[2], rec[1]
            pending = []
            out["committed_end"] = next_off
        elif fh.type == fmt.FRAME_INDEX:
            assert not pending
            p = fmt.IndexPayload.parse(plain)
            assert p.end_offset == off and p.hardstate_offset == last_hs_offset
            assert fh.count == p.record_count
            out["index"] = {"offset": off, "end": next_off,
                            "records": [(r.offset, r.index, r.count) for r in p.records],
                            "runs": [(r.index, r.term) for r in p.runs]}
            assert not any(data[next_off:])
            break
        else:
            raise AssertionError(f"unknown frame type {fh.type}")
        off = next_off
    return out


def _expected_entries(doc) -> list[tuple]:
    return [(e["index"], e["term"], bytes.fromhex(e["data"])) for e in doc["entries"]]


def _expected_snapshot_records(doc, name: str) -> list[tuple]:
    """The SNAPSHOT record(s) the vector segment holds: they name the snapshot vector of its kind."""
    snap = doc["snapshots"]["snapshot-none.snap" if "none" in name else "snapshot-aes256gcm.snap"]
    return [(snap["snapshot_id"], snap["index"], snap["term"], bytes.fromhex(snap["digest"]))]


def test_vectors_present(doc):
    names = set(doc["segments"])
    assert {"segment-aes256gcm.wal", "segment-chacha20poly1305.wal", "segment-none.wal"} <= names
    for name in names:
        assert os.path.exists(os.path.join(VECTORS, name)), name
        assert hashlib.sha256(_read(name)).hexdigest() == doc["segments"][name]["sha256"]


@pytest.mark.parametrize("name", ["segment-aes256gcm.wal", "segment-chacha20poly1305.wal",
                                  "segment-aes256gcmsiv.wal", "segment-none.wal"])
def test_sealed_vector_by_spec(doc, name):
    if name == "segment-aes256gcmsiv.wal" and AESGCMSIV is None:
        pytest.skip("AES-GCM-SIV is not in this cryptography build")
    vec = doc["segments"][name]
    data = _read(name)
    got = decode_by_spec(data, bytes.fromhex(doc["inputs"]["dek"]))
    assert got["entries"] == _expected_entries(doc)
    assert list(got["hard_state"]) == doc["hard_state"]
    assert got["snapshots"] == _expected_snapshot_records(doc, name)
    assert got["index"]["offset"] == vec["index_offset"] and got["index"]["end"] == vec["end_offset"] == len(data)
    entries_frames = [(f["offset"], f["index"], f["count"]) for f in vec["frames"] if f["type"] == fmt.FRAME_ENTRIES]
    assert got["index"]["records"] == entries_frames
    runs, prev = [], None
    for i, t, _d in got["entries"]:
        if t != prev:
            runs.append((i, t))
            prev = t
    assert got["index"]["runs"] == runs
    assert [(f["offset"], f["type"]) for f in vec["frames"]] == got["frames"]


@pytest.mark.parametrize("name", ["segment-aes256gcm.wal", "segment-chacha20poly1305.wal",
                                  "segment-aes256gcmsiv.wal", "segment-none.wal"])
def test_first_record_derivation(doc, name):
    """Nonce, associated data and ciphertext of the first records, recomputed from the fixed inputs."""
    if name == "segment-aes256gcmsiv.wal" and AESGCMSIV is None:
        pytest.skip("AES-GCM-SIV is not in this cryptography build")
    vec = doc["segments"][name]
    data = _read(name)
    hdr = fmt.SegmentHeader.parse(data[:128])
    assert data[:128].hex() == vec["header"]
    if hdr.algorithm != fmt.ALG_NONE:
        key, commitment = _segment_key(bytes.fromhex(doc["inputs"]["dek"]), hdr)
        assert (key.hex(), commitment.hex()) == (vec["segment_key"], vec["commitment"])
        assert vec["hkdf_info"] == (b"walcrypt/v1/segment" + hdr.store_id + struct.pack("<Q", hdr.segment_id)
                                    + bytes([hdr.algorithm])).hex()
    for rec in (vec["first_record"], vec["first_entries_record"]):
        off = rec["offset"]
        header = data[off:off + 88]
        assert header.hex() == rec["header"]
        assert rec["nonce"] == (bytes(4) + rec["seq"].to_bytes(8, "big")).hex()
        aad = hdr.store_id + struct.pack("<Q", hdr.segment_id) + header[:36] + header[40:]
        assert aad.hex() == rec["aad"] and len(aad) == 108
        plain = bytes.fromhex(rec["plaintext"])
        if hdr.algorithm == fmt.ALG_NONE:
            sealed = plain + hashlib.blake2b(aad + plain, digest_size=16).digest()
        else:
            cls = {2: AESGCM, 3: ChaCha20Poly1305, 4: AESGCMSIV}[hdr.algorithm]
            sealed = cls(key).encrypt(bytes.fromhex(rec["nonce"]), plain, aad)
        assert sealed.hex() == rec["ciphertext_and_tag"]
        assert data[off + 88:off + 88 + len(sealed)] == sealed
    assert vec["first_record"]["prev_chain"] == "00" * 16


def _record_entries(rec) -> list[tuple]:
    """(index, term, data) of a decoded ENTRIES record (segment_codec.EntriesRecord)."""
    return [(rec.first + k, rec.terms[k], bytes(d)) for k, d in enumerate(rec.datas())]


def _engine_segment(doc, name: str, data: bytes) -> Segment:
    """Open a vector the way storage.Store._open_segment does, with the identity from vectors.json."""
    vec = doc["segments"][name]
    vec = doc["segments"].get(vec.get("derived_from"), vec)
    path = os.path.join(VECTORS, name)
    found = decode_header(data[:128], path)
    ident = SegmentIdentity(bytes.fromhex(vec["store_id"]), vec["segment_id"], vec["base_index"],
                            vec["algorithm"], bytes.fromhex(vec["key_id"]), found.salt, found.commitment)
    if ident.algorithm == fmt.ALG_NONE:
        aead, commitment = crypto.suite(fmt.ALG_NONE).new(b""), bytes(24)
    else:
        key, commitment = crypto.segment_keys(bytes.fromhex(doc["inputs"]["dek"]), found.salt, ident.store_id,
                                              ident.segment_id, ident.algorithm)
        aead = crypto.suite(ident.algorithm).new(key)
    seg = Segment(VFS(), path, ident, crypto.FrameCipher(ident.algorithm, aead, ident.key_id, ident.store_id,
                                                         ident.segment_id))
    seg.check_identity(found, commitment)
    return seg


@pytest.mark.parametrize("name", ["segment-aes256gcm.wal", "segment-chacha20poly1305.wal",
                                  "segment-aes256gcmsiv.wal", "segment-none.wal"])
def test_sealed_vector_by_engine(doc, name):
    if name == "segment-aes256gcmsiv.wal" and not _siv_available():
        pytest.skip("AES-GCM-SIV is not in this cryptography build")
    vec = doc["segments"][name]
    data = _read(name)
    expected = _expected_entries(doc)

    seg = _engine_segment(doc, name, data)
    seen = []
    committed_end, torn = seg.scan(data, on_entries=lambda rec: seen.extend(_record_entries(rec)))
    assert torn is None and seg.sealed and committed_end == vec["committed_end"]
    assert (seg.index_offset, seg.end_offset) == (vec["index_offset"], vec["end_offset"])
    assert seen == expected and list(seg.hardstate) == doc["hard_state"]
    assert [tuple(r) for r in seg.snapshot_records] == _expected_snapshot_records(doc, name)
    assert seg.encode_index().hex() == vec["index_payload"]

    seg = _engine_segment(doc, name, data)
    try:
        seg.load_sealed(vec["index_offset"], vec["end_offset"])
        got = []
        for r in range(len(seg.rec_offset)):
            got.extend(_record_entries(seg.read_entries_record(r)))
        assert got == expected
        assert list(seg.hardstate) == doc["hard_state"] and seg.last_index == vec["last_index"]
        assert seg.hardstate_offset == vec["hard_state_offset"]
    finally:
        seg.close()


def test_open_vector_clean_end(doc):
    name = "segment-aes256gcm-open.wal"
    vec = doc["segments"][name]
    data = _read(name)
    assert len(data) == doc["inputs"]["segment_size"] and not any(data[vec["committed_end"]:])
    got = decode_by_spec(data, bytes.fromhex(doc["inputs"]["dek"]))
    assert got["entries"] == _expected_entries(doc) and got["index"] is None
    assert got["snapshots"] == _expected_snapshot_records(doc, name)
    assert got["committed_end"] == vec["expect"]["committed_end"]
    seg = _engine_segment(doc, name, data)
    assert seg.scan(data) == (vec["expect"]["committed_end"], None)
    assert not seg.sealed and list(seg.hardstate) == doc["hard_state"]


def test_torn_vector(doc):
    name = "segment-aes256gcm-torn.wal"
    exp = doc["segments"][name]["expect"]
    data = _read(name)
    seg = _engine_segment(doc, name, data)
    assert seg.scan(data) == (exp["committed_end"], (exp["offset"], exp["detail"]))
    assert seg.last_index == exp["last_index"]


@pytest.mark.parametrize("name,error", [("segment-aes256gcm-corrupt.wal", CorruptionError),
                                        ("segment-aes256gcm-tampered.wal", AuthenticationError)])
def test_damaged_vectors(doc, name, error):
    exp = doc["segments"][name]["expect"]
    assert exp["error"] == error.__name__
    data = _read(name)
    seg = _engine_segment(doc, name, data)
    with pytest.raises(CorruptionError) as info:
        seg.scan(data)
    assert type(info.value) is error and info.value.offset == exp["offset"]


def test_engine_written_store_decodes_by_spec(tmp_path):
    """Whatever encoder the WAL uses, a store it writes reads back with the spec reader, and its
    ENTRIES records follow the writer's split rule (FORMAT.md, "One record per save() batch")."""
    import walcrypt

    rng = random.Random(5)
    saves = [[Entry(1, 1, b"")],
             [Entry(2 + k, 1, rng.randbytes(rng.randrange(0, 3000))) for k in range(40)],
             [Entry(42 + k, 2, b"x") for k in range(fmt.RECORD_MAX_ENTRIES + 3)]]
    saves.append([Entry(saves[-1][-1].index + 1, 2, rng.randbytes(fmt.RECORD_TARGET_BYTES + 5))])
    store = walcrypt.open(str(tmp_path / "s"), kek=walcrypt.RawKey(b"k" * 32), segment_size=1 << 22)
    try:
        for k, batch in enumerate(saves):
            store.save(HardState(1 + k // 2, 1, batch[0].index), batch)
        dek = store.secret(store.active_key_id())      # the unwrapped DEK, to read by the spec
        paths = [s.path for s in store.wal.segments]
    finally:
        store.close()
    assert len(paths) == 1
    with open(paths[0], "rb") as f:
        data = f.read()
    got = decode_by_spec(data, dek)
    assert got["entries"] == [(e.index, e.term, e.data) for batch in saves for e in batch]
    assert got["index"] is not None and got["index"]["end"] == len(data)
    counts = [n for _o, _i, n in got["index"]["records"]]
    expected = []
    for batch in saves:
        n, start = len(batch), 0
        while start < n:
            stop, size = start + 1, len(batch[start].data)
            while stop < min(n, start + fmt.RECORD_MAX_ENTRIES) and size < fmt.RECORD_TARGET_BYTES:
                size += len(batch[stop].data)
                stop += 1
            expected.append(stop - start)
            start = stop
    assert counts == expected


# ---------------------------------------------------------------------------
# Snapshot files.  format.py has no construct declaration for their header yet (the codecs live in
# walcrypt/snapshot.py); these two are written from FORMAT.md, section 10.
# ---------------------------------------------------------------------------

SnapshotHeaderSpec = c.Struct(
    "magic" / c.Const(b"WCRYPSNP"),
    "version" / c.Int16ul,
    "header_size" / c.Int16ul,
    "algorithm" / c.Int8ul,
    "flags" / c.Int8ul,
    "reserved0" / c.Int16ul,
    "snapshot_id" / c.Int64ul,
    "index" / c.Int64ul,
    "term" / c.Int64ul,
    "chunk_size" / c.Int32ul,
    "bundle_len" / c.Int32ul,
    "store_id" / c.Bytes(16),
    "key_id" / c.Bytes(16),
    "salt" / c.Bytes(16),
    "commitment" / c.Bytes(24),
    "reserved1" / c.Int32ul,
    "crc" / c.Int32ul,
)
ChunkHeaderSpec = c.Struct("length" / c.Int32ul, "flags" / c.Int32ul)


@pytest.mark.parametrize("mode", MODES)
def test_snapshot_codecs_match_spec(mode):
    from walcrypt import snapshot as S

    rng = random.Random(f"snap/{mode}")
    for codec, decl in [(S.SNAPSHOT_HEADER_STRUCT, SnapshotHeaderSpec), (S.CHUNK_HEADER_STRUCT, ChunkHeaderSpec)]:
        vals = _sample(_fields(decl), rng, mode)
        assert codec.size == decl.sizeof()
        assert codec.pack(*vals.values()) == decl.build(vals)
    h = S.SnapshotHeader(2, 0, rng.randbytes(16), rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(64),
                         1 + rng.getrandbits(20), rng.getrandbits(20), rng.randbytes(16), rng.randbytes(16),
                         rng.randbytes(24))
    raw = h.encode()
    vals = {"magic": b"WCRYPSNP", "version": 1, "header_size": 128, "algorithm": 2, "flags": 0, "reserved0": 0,
            "snapshot_id": h.snapshot_id, "index": h.index, "term": h.term, "chunk_size": h.chunk_size,
            "bundle_len": h.bundle_len, "store_id": h.store_id, "key_id": h.key_id, "salt": h.salt,
            "commitment": h.commitment, "reserved1": 0, "crc": 0}
    vals["crc"] = crc32c(SnapshotHeaderSpec.build(vals)[:124])
    assert raw == SnapshotHeaderSpec.build(vals)
    assert S.SnapshotHeader.decode(raw, "x") == h


def decode_snapshot_by_spec(data: bytes, dek: bytes):
    """An independent reader of a snapshot file written from FORMAT.md."""
    hdr = SnapshotHeaderSpec.parse(data[:128])
    assert (hdr.version, hdr.header_size, hdr.flags, hdr.reserved0, hdr.reserved1) == (1, 128, 0, 0, 0)
    assert crc32c(data[:124]) == hdr.crc
    bundle = data[128:128 + hdr.bundle_len]
    if hdr.algorithm == fmt.ALG_NONE:
        key = None
        assert hdr.key_id == bytes(16) and hdr.salt == bytes(16) and hdr.commitment == bytes(24)
    else:
        info = (b"walcrypt/v1/snapshot" + hdr.store_id + struct.pack("<QQQ", hdr.snapshot_id, hdr.index, hdr.term)
                + bytes([hdr.algorithm]))
        okm = HKDF(hashes.SHA256(), 56, salt=hdr.salt, info=info).derive(dek)
        key = okm[:32]
        assert okm[32:] == hdr.commitment
    aead_open = _aead_open(hdr.algorithm, key)
    off = 128 + hdr.bundle_len
    head = ChunkHeaderSpec.parse(data[off:off + 8])
    assert head.flags == 0
    meta = aead_open(bytes(12), data[off + 8:off + 8 + head.length], data[:128] + hashlib.sha256(bundle).digest())
    off += 8 + head.length
    chunks, counter = [], 1
    while True:
        head = ChunkHeaderSpec.parse(data[off:off + 8])
        assert head.flags in (0, 1) and 16 <= head.length <= hdr.chunk_size + 16
        ct = data[off + 8:off + 8 + head.length]
        chunks.append(aead_open(bytes(4) + counter.to_bytes(8, "big"), ct,
                                struct.pack("<QII", counter, head.flags, head.length)))
        off += 8 + head.length
        if head.flags & 1:
            assert off == len(data)
            break
        assert len(chunks[-1]) == hdr.chunk_size
        counter += 1
    return hdr, json.loads(meta), bundle, b"".join(chunks)


@pytest.mark.parametrize("name", ["snapshot-aes256gcm.snap", "snapshot-none.snap"])
def test_snapshot_vector(doc, name):
    from walcrypt.snapshot import SnapshotFile, snapshot_keys

    vec = doc["snapshots"][name]
    data = _read(name)
    assert hashlib.sha256(data).hexdigest() == vec["sha256"]
    dek = bytes.fromhex(doc["inputs"]["dek"])
    expected_meta = doc["snapshot_meta"]
    hdr, meta, bundle, payload = decode_snapshot_by_spec(data, dek)
    assert payload.hex() == vec["data"] and bundle.decode() == vec["bundle"]
    assert (meta["index"], meta["term"]) == (hdr.index, hdr.term) == (expected_meta["index"], expected_meta["term"])
    assert meta["conf_state"] == {"voters": expected_meta["voters"], "learners": expected_meta["learners"]}
    assert hashlib.sha256(data[:128]).digest()[:16].hex() == vec["digest"]
    assert doc["keyring"]["kek"] not in data.hex(), "a snapshot must never carry the KEK"
    if hdr.algorithm != fmt.ALG_NONE:
        b = json.loads(bundle)
        assert b["keys"][0]["wrapped"] == doc["keyring"]["wrapped_dek"] and b["store_id"] == hdr.store_id.hex()

    f = SnapshotFile(VFS(), os.path.join(VECTORS, name))
    assert f.digest.hex() == vec["digest"]
    if f.header.algorithm == fmt.ALG_NONE:
        aead, commitment = crypto.suite(fmt.ALG_NONE).new(b""), bytes(24)
    else:
        key, commitment = snapshot_keys(dek, f.header)
        assert (key.hex(), commitment.hex()) == (vec["snapshot_key"], vec["commitment"])
        aead = crypto.suite(f.header.algorithm).new(key)
    m = f.unlock(aead, commitment)
    assert (m.index, m.term, list(m.conf_state.voters)) == (hdr.index, hdr.term, expected_meta["voters"])
    assert b"".join(f.chunks()).hex() == vec["data"]


def test_keyring_vectors(doc):
    k = doc["keyring"]
    kek, store_id = bytes.fromhex(k["kek"]), bytes.fromhex(doc["inputs"]["store_id"])
    check = HKDF(hashes.SHA256(), 16, salt=None, info=b"walcrypt/v1/kek-check").derive(kek)
    wrap_key = HKDF(hashes.SHA256(), 32, salt=None, info=b"walcrypt/v1/kek-wrap").derive(kek)
    assert (check.hex(), wrap_key.hex()) == (k["check_value"], k["wrap_key"])
    for secret, key_id, purpose, ctx, nonce, blob in [
            ("dek", "dek_key_id", keys.PURPOSE_DEK, "dek_wrap_context", "dek_wrap_nonce", "wrapped_dek"),
            ("meta_key", "meta_key_id", keys.PURPOSE_META, "meta_wrap_context", "meta_wrap_nonce",
             "wrapped_meta_key")]:
        context = b"walcrypt/v1/wrap" + store_id + bytes.fromhex(k[key_id]) + bytes([purpose])
        assert context.hex() == k[ctx]
        wrapped = bytes.fromhex(k[blob])
        assert len(wrapped) == 61 and wrapped[0] == 1 and wrapped[1:13].hex() == k[nonce]
        assert AESGCM(wrap_key).decrypt(wrapped[1:13], wrapped[13:], context).hex() == k[secret]
        assert keys.RawKey(kek).wrapper(None).unwrap(wrapped, context).hex() == k[secret]
    rec = k["keyring_record"]
    parsed = fmt.KeyringRecord.parse(bytes.fromhex(rec["value"]))
    assert (parsed.version, parsed.state, parsed.purpose, parsed.wrapped.hex()) == \
        (1, keys.ACTIVE, keys.PURPOSE_DEK, k["wrapped_dek"])
    pw = k["passphrase"]
    p = pw["params"]
    pkek = Scrypt(salt=bytes.fromhex(p["salt"]), length=32, n=p["n"], r=p["r"], p=p["p"]).derive(
        pw["passphrase"].encode())
    assert HKDF(hashes.SHA256(), 16, salt=None, info=b"walcrypt/v1/kek-check").derive(pkek).hex() == \
        pw["check_value"]


def test_stable_value_vector(doc):
    v = doc["stable"]
    store_id, dek = bytes.fromhex(doc["inputs"]["store_id"]), bytes.fromhex(doc["inputs"]["dek"])
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"walcrypt/v1/stable" + store_id).derive(dek)
    assert key.hex() == v["stable_key"]
    sealed = bytes.fromhex(v["sealed"])
    assert sealed[0] == 1 and sealed[1:17].hex() == doc["inputs"]["dek_key_id"] and sealed[17:29].hex() == v["nonce"]
    aad = store_id + b"stable" + bytes.fromhex(v["key"])
    assert aad.hex() == v["aad"]
    assert AESGCM(key).decrypt(sealed[17:29], sealed[29:], aad).hex() == v["value"]
    assert v["plaintext_store_form"] == "01" + "00" * 28 + v["value"]


@pytest.mark.parametrize("block,domain", [("metadata_macs", b""), ("metadata_macs_v3", b"walcrypt/v3/meta-mac")],
                         ids=["versions-1-and-2", "version-3"])
def test_metadata_mac_vectors(doc, block, domain):
    k, macs = doc["keyring"], doc["keyring"][block]
    mac_key = bytes.fromhex(k["meta_key"])
    assert macs.get("domain", "").encode() == domain

    def framed(*parts):
        return b"".join(len(p).to_bytes(4, "little") + p for p in ((domain,) if domain else ()) + parts)

    cases = [(M.DB_SEGMENTS, bytes.fromhex(macs["segment_manifest_key"]),
              bytes.fromhex(doc["segment_manifest_record"]["value"]), macs["segment_manifest_stored"]),
             (M.DB_KEYRING, bytes.fromhex(k["dek_key_id"]), bytes.fromhex(k["keyring_record"]["value"]),
              macs["keyring_record_stored"]),
             (M.DB_SNAPSHOTS, bytes.fromhex(doc["snapshot_registry_record"]["key"]),
              bytes.fromhex(doc["snapshot_registry_record"]["value"]), macs["snapshot_registry_stored"]),
             (M.DB_STABLE, bytes.fromhex(doc["stable"]["key"]), bytes.fromhex(doc["stable"]["sealed"]),
              macs["stable_stored"]),
             (M.DB_STATE, b"compacted", bytes.fromhex(macs["compacted_value"]), macs["compacted_stored"]),
             (M.DB_STATE, b"next_segment", bytes.fromhex(macs["next_segment_value"]), macs["next_segment_stored"])]
    for db, key, value, stored in cases:
        tag = hmac.new(mac_key, framed(db, key, value), hashlib.sha256).digest()[:16]
        assert (value + tag).hex() == stored
    keyless = hashlib.blake2b(framed(b"state", b"next_segment", bytes.fromhex(macs["next_segment_value"])),
                              digest_size=16).digest()
    assert (bytes.fromhex(macs["next_segment_value"]) + keyless).hex() == macs["keyless_next_segment_stored"]
    man = M.decode_manifest(bytes.fromhex(doc["segment_manifest_record"]["value"]), "x")
    sealed = doc["segments"]["segment-aes256gcm.wal"]
    assert (man["state"], man["index_offset"], man["end_offset"], man["last_index"]) == \
        (fmt.SEG_SEALED, sealed["index_offset"], sealed["end_offset"], sealed["last_index"])
    assert macs["segment_manifest_key"] == struct.pack(">Q", doc["inputs"]["segment_id"]).hex()
    assert M.decode_compacted(bytes.fromhex(macs["compacted_value"]), "x") == \
        (doc["snapshot_meta"]["index"], doc["snapshot_meta"]["term"], doc["inputs"]["segment_id"] + 1)
    reg = fmt.SnapshotManifestRecord.parse(bytes.fromhex(doc["snapshot_registry_record"]["value"]))
    snap = doc["snapshots"]["snapshot-aes256gcm.snap"]
    assert (reg.version, reg.index, reg.term, reg.digest.hex(), reg.size) == \
        (1, snap["index"], snap["term"], snap["digest"], len(bytes.fromhex(snap["data"])))


# ===========================================================================
# (iii) regeneration is byte-identical
# ===========================================================================

def _load_script():
    spec = importlib.util.spec_from_file_location("walcrypt_make_vectors", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_regenerate_vectors_byte_for_byte(tmp_path):
    if not _siv_available():
        pytest.skip("AES-GCM-SIV is not available: the committed vectors include it")
    names = _load_script().generate(str(tmp_path))
    committed = sorted(n for n in os.listdir(VECTORS) if n != "README.md" and not n.startswith("."))
    assert sorted(names) == committed
    assert sorted(os.listdir(tmp_path)) == committed, "the script left scratch files behind"
    for name in names:
        assert (tmp_path / name).read_bytes() == _read(name), f"{name} differs from the committed vector"


def test_generation_restores_urandom(tmp_path):
    real = os.urandom
    _load_script().generate(str(tmp_path))
    assert os.urandom is real


# ===========================================================================
# (iv) versioning
# ===========================================================================

def test_format_version_is_pinned(doc):
    assert fmt.FORMAT_VERSION == 1
    assert doc["format_version"] == fmt.FORMAT_VERSION
    for name in doc["segments"]:
        hdr = fmt.SegmentHeader.parse(_read(name)[:128])
        assert (hdr.magic, hdr.version, hdr.header_size) == (b"WCRYPSEG", 1, 128)


def test_unknown_version_is_unsupported(doc):
    data = bytearray(_read("segment-aes256gcm.wal")[:128])
    data[8:10] = (2).to_bytes(2, "little")
    data[124:128] = crc32c(bytes(data[:124])).to_bytes(4, "little")
    with pytest.raises(UnsupportedFormatError):
        decode_header(bytes(data), "x")
