#!/usr/bin/env python3
"""Generate the golden vectors of walcrypt on-disk format v1 (see FORMAT.md, "Golden vectors").

    python formats/make_vectors.py [OUTDIR]        # default: formats/vectors/

Every input is fixed below (keys, store ID, salt, segment ID, entries), and the
only randomness the engine draws while these files are made -- the 12-byte nonce
of a wrapped key -- comes from a fixed stream that replaces ``os.urandom`` for
the duration of that call.  Running the script twice gives identical bytes;
``tests/test_format.py`` regenerates the vectors into a temporary directory and
compares them byte for byte with the committed ones.

The segments are written by the engine's own code (``Segment.create``,
``encode_batch``/``write``/``sync``/``apply_batch``, ``seal``) and the snapshots by
its ``SnapshotWriter``, through ``walcrypt.vfs.VFS``.  The only bytes this script
lays out itself are the snapshot keyring bundle (shaped as
``storage.Store.keyring_bundle`` makes it) and the deliberate damage in the torn,
corrupt and tampered vectors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from crc32c import crc32c  # noqa: E402

from walcrypt import crypto, keys, stable  # noqa: E402
from walcrypt import format as fmt  # noqa: E402
from walcrypt import meta as M  # noqa: E402
from walcrypt.errors import UnsupportedFormatError  # noqa: E402
from walcrypt.segment import Segment  # noqa: E402
from walcrypt.segment_codec import SegmentIdentity, encode_entries_payload, encode_header  # noqa: E402
from walcrypt.snapshot import SnapshotHeader, SnapshotWriter, snapshot_keys  # noqa: E402
from walcrypt.types import ConfState, Entry, HardState, SnapshotMeta  # noqa: E402
from walcrypt.vfs import VFS  # noqa: E402

DEFAULT_OUTDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors")

# ---------------------------------------------------------------------------
# Fixed inputs (never change these without bumping FORMAT_VERSION)
# ---------------------------------------------------------------------------

STORE_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
DEK = bytes(range(0x00, 0x20))                      # 00 01 .. 1f
DEK_KEY_ID = bytes(range(0xa0, 0xb0))               # a0 a1 .. af
SALT = bytes(range(0xc0, 0xe0))                     # c0 c1 .. df
SEGMENT_ID = 7
BASE_INDEX = 1
SEGMENT_SIZE = 8192                                 # preallocated size before sealing

KEK = bytes(range(0x40, 0x60))                      # 40 41 .. 5f
META_KEY = bytes(range(0x60, 0x80))                 # the metadata MAC key (secret)
META_KEY_ID = bytes(range(0xb0, 0xc0))
WRAP_NONCE_DEK = bytes.fromhex("0f0e0d0c0b0a090807060504")
WRAP_NONCE_META = bytes.fromhex("1f1e1d1c1b1a191817161514")
CREATED_NS = 1_700_000_000_000_000_000
STABLE_KEY = b"CurrentTerm"
STABLE_VALUE = (3).to_bytes(8, "big")
STABLE_NONCE = bytes.fromhex("2f2e2d2c2b2a292827262524")
PASSPHRASE = "correct horse battery staple"
PASSPHRASE_PARAMS = {"kind": "passphrase", "kdf": "scrypt", "salt": "a5" * 16, "n": 1024, "r": 8, "p": 1}

HS_CREATE = HardState(term=1, vote=2, commit=0)

SNAP_ID = 1
SNAP_META = SnapshotMeta(index=5, term=2, conf_state=ConfState(voters=(1, 2, 3), learners=(4,)))
SNAP_SALT = bytes(range(0xe0, 0xf0))                # e0 e1 .. ef (snapshot salts are 16 bytes)
SNAP_CHUNK_SIZE = 64                                # tiny chunks, so the vector has several
SNAP_DATA_LEN = 200                                 # 3 full chunks + a final chunk of 8 bytes


def _pattern(n: int, seed: int) -> bytes:
    return bytes((seed + 31 * i + (i >> 8)) & 0xFF for i in range(n))


# Write units after the segment's creation unit (HARDSTATE + COMMIT).  Each unit is a
# list of ENTRIES records (one per save() call that group commit merged), an optional
# hard state and an optional SNAPSHOT record (the one save_snapshot writes); it becomes
# one pwrite ending in one COMMIT frame.
UNITS = [
    ([[Entry(1, 1, b""), Entry(2, 1, b"a"), Entry(3, 1, b"hello, walcrypt")]], HardState(1, 2, 1), False),
    ([[Entry(4, 2, _pattern(700, 1)), Entry(5, 2, _pattern(1500, 2))]], None, False),
    ([[Entry(6, 2, _pattern(16, 3)), Entry(7, 2, _pattern(33, 4))], [Entry(8, 3, b"\x00" * 40)]],
     HardState(3, 1, 7), False),
    ([], None, True),
]
FINAL_HARD_STATE = HardState(3, 1, 7)
# The unit that the torn vector leaves half-written.
TORN_UNIT = ([[Entry(9, 3, _pattern(600, 5)), Entry(10, 3, _pattern(600, 6))]], None, False)

# (file name, algorithm) of the sealed segment vectors
SEALED_SEGMENTS = [
    ("segment-aes256gcm.wal", fmt.ALG_AES_256_GCM),
    ("segment-chacha20poly1305.wal", fmt.ALG_CHACHA20_POLY1305),
    ("segment-aes256gcmsiv.wal", fmt.ALG_AES_256_GCM_SIV),
    ("segment-none.wal", fmt.ALG_NONE),
]
OPEN_NAME = "segment-aes256gcm-open.wal"
TORN_NAME = "segment-aes256gcm-torn.wal"
CORRUPT_NAME = "segment-aes256gcm-corrupt.wal"
TAMPERED_NAME = "segment-aes256gcm-tampered.wal"
SNAPSHOTS = [
    ("snapshot-aes256gcm.snap", fmt.ALG_AES_256_GCM),
    ("snapshot-none.snap", fmt.ALG_NONE),
]
JSON_NAME = "vectors.json"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def fixed_urandom(*chunks: bytes):
    """Replace os.urandom by a stream that hands out ``chunks`` in order (exact sizes required)."""
    queue = list(chunks)
    real = os.urandom

    def fake(n: int) -> bytes:
        if not queue or len(queue[0]) != n:
            raise AssertionError(f"unexpected os.urandom({n}) while generating vectors")
        return queue.pop(0)

    os.urandom = fake
    try:
        yield
    finally:
        os.urandom = real
    if queue:
        raise AssertionError("the engine drew less randomness than the vectors script expected")


def identity(alg: int) -> SegmentIdentity:
    """The segment identity the engine would build (storage.Store.create_segment)."""
    if alg == fmt.ALG_NONE:   # plaintext: zero key ID, zero salt, zero commitment
        return SegmentIdentity(STORE_ID, SEGMENT_ID, BASE_INDEX, alg, crypto.ZERO_KEY_ID,
                               bytes(fmt.SALT_SIZE), bytes(fmt.COMMITMENT_SIZE))
    _key, commitment = crypto.segment_keys(DEK, SALT, STORE_ID, SEGMENT_ID, alg)
    return SegmentIdentity(STORE_ID, SEGMENT_ID, BASE_INDEX, alg, DEK_KEY_ID, SALT, commitment)


def frame_cipher(ident: SegmentIdentity) -> crypto.FrameCipher:
    """The frame cipher the engine would build (storage.Store._cipher)."""
    if ident.algorithm == fmt.ALG_NONE:
        aead = crypto.suite(fmt.ALG_NONE).new(b"")
    else:
        key, _ = crypto.segment_keys(DEK, ident.salt, ident.store_id, ident.segment_id, ident.algorithm)
        aead = crypto.suite(ident.algorithm).new(key)
    return crypto.FrameCipher(ident.algorithm, aead, ident.key_id, ident.store_id, ident.segment_id)


def snapshot_record(digest: bytes):
    """The SNAPSHOT record snapstore.Snapshots.save writes for the snapshot vector."""
    return (fmt.FRAME_SNAPSHOT, SNAP_META.index, SNAP_META.term, 0,
            fmt.SNAPSHOT_RECORD_STRUCT.pack(SNAP_ID, SNAP_META.index, SNAP_META.term, digest), None)


def unit_records(unit, snap_digest: bytes = b""):
    """(type, index, term, count, payload, terms) records of one write unit, in the order wal.Wal
    places them: ENTRIES records, then SNAPSHOT records, then the hard state."""
    groups, hs, snap = unit
    records = []
    for entries in groups:
        payload = encode_entries_payload(entries, 0, len(entries))
        records.append((fmt.FRAME_ENTRIES, entries[0].index, entries[0].term, len(entries), payload,
                        [e.term for e in entries]))
    if snap:
        records.append(snapshot_record(snap_digest))
    if hs is not None:
        records.append((fmt.FRAME_HARDSTATE, 0, hs.term, 0, fmt.HARDSTATE_STRUCT.pack(*hs), None))
    return records


def write_unit(seg: Segment, unit, snap_digest: bytes) -> None:
    buf, pending = seg.encode_batch(unit_records(unit, snap_digest))
    seg.write(buf)
    seg.sync()
    seg.apply_batch(buf, pending)


def write_file(vfs: VFS, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, directory fsync)."""
    tmp = path + ".tmp"
    fd = vfs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        vfs.pwrite(fd, data, 0)
        vfs.fsync(fd)
    finally:
        vfs.close(fd)
    vfs.rename(tmp, path)
    vfs.fsync_dir(os.path.dirname(path))


def build_segment(vfs: VFS, workdir: str, alg: int, snap_digest: bytes, *, seal: bool) -> tuple[Segment, bytes]:
    """Create a segment with the fixed identity, write UNITS, optionally seal.  Returns (segment, file bytes)."""
    ident = identity(alg)
    subdir = os.path.join(workdir, f"alg{alg}-{'sealed' if seal else 'open'}")
    vfs.mkdir(subdir)
    seg = Segment.create(vfs, subdir, ident, frame_cipher(ident), SEGMENT_SIZE, HS_CREATE)
    try:
        for unit in UNITS:
            write_unit(seg, unit, snap_digest)
        if seal:
            seg.seal()
    finally:
        seg.close()
    return seg, vfs.read_file(seg.path)


def walk_frames(data: bytes) -> list[dict]:
    """Offsets and header fields of the frames of a well-formed segment (stops at type 0 or EOF)."""
    frames = []
    off = fmt.SEGMENT_HEADER_SIZE
    while off + fmt.FRAME_HEADER_SIZE <= len(data):
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(data, off)
        if h[0] == fmt.FRAME_UNWRITTEN:
            break
        frames.append({"offset": off, "type": h[0], "type_name": fmt.FRAME_TYPES[h[0]], "seq": h[5],
                       "index": h[6], "term": h[7], "count": h[8], "length": h[4], "crc32c": h[9]})
        off = fmt.align_up(off + fmt.FRAME_HEADER_SIZE + h[4])
    return frames


def record_detail(ident: SegmentIdentity, data: bytes, frame: dict) -> dict:
    """Everything needed to re-derive one sealed record by hand."""
    off = frame["offset"]
    header = data[off:off + fmt.FRAME_HEADER_SIZE]
    ct = data[off + fmt.FRAME_HEADER_SIZE:off + fmt.FRAME_HEADER_SIZE + frame["length"]]
    aad = (ident.store_id + ident.segment_id.to_bytes(8, "little")
           + header[:fmt.FRAME_CRC_OFFSET] + header[fmt.FRAME_CRC_OFFSET + 4:])
    plaintext = frame_cipher(ident).open(header, ct, path="<vector>", offset=off)
    return {
        "offset": off,
        "type": frame["type"],
        "seq": frame["seq"],
        "header": header.hex(),
        "nonce": header[40:52].hex(),
        "prev_chain": header[72:88].hex(),
        "aad": aad.hex(),
        "plaintext": plaintext.hex(),
        "ciphertext_and_tag": ct.hex(),
        "tag": ct[-fmt.TAG_SIZE:].hex(),
        "crc32c": crc32c(ct, crc32c(header[fmt.FRAME_CRC_OFFSET + 4:], crc32c(header[:fmt.FRAME_CRC_OFFSET]))),
        "padding": (-frame["length"]) % fmt.ALIGN,
    }


def keyring_bundle(alg: int, wrapped_dek: bytes, wrapped_meta: bytes, check: bytes) -> bytes:
    """The clear keyring bundle a snapshot carries, shaped as storage.Store.keyring_bundle makes it."""
    if alg == fmt.ALG_NONE:
        return b""
    doc = {"version": 1, "store_id": STORE_ID.hex(), "algorithm": alg, "kek_params": {"kind": "raw"},
           "kek_check": check.hex(), "meta_key": {"id": META_KEY_ID.hex(), "wrapped": wrapped_meta.hex()},
           "keys": [{"id": DEK_KEY_ID.hex(), "state": keys.ACTIVE, "algorithm": alg, "purpose": keys.PURPOSE_DEK,
                     "created_ns": CREATED_NS, "state_changed_ns": CREATED_NS, "wrapped": wrapped_dek.hex()}]}
    return json.dumps(doc, sort_keys=True).encode()


def snapshot_data() -> bytes:
    return _pattern(SNAP_DATA_LEN, 9)


def build_snapshot(vfs: VFS, workdir: str, alg: int, bundle: bytes) -> tuple[SnapshotHeader, bytes, bytes]:
    """Write the snapshot vector with the engine's SnapshotWriter.  -> (header, digest, file bytes)"""
    plain = alg == fmt.ALG_NONE
    h = SnapshotHeader(alg, 0, STORE_ID, SNAP_ID, SNAP_META.index, SNAP_META.term, SNAP_CHUNK_SIZE, len(bundle),
                       crypto.ZERO_KEY_ID if plain else DEK_KEY_ID, bytes(16) if plain else SNAP_SALT, b"")
    if plain:   # as snapstore.Snapshots._keys builds them
        aead, h.commitment = crypto.suite(fmt.ALG_NONE).new(b""), bytes(fmt.COMMITMENT_SIZE)
    else:
        key, h.commitment = snapshot_keys(DEK, h)
        aead = crypto.suite(alg).new(key)
    subdir = os.path.join(workdir, f"snap{alg}")
    vfs.mkdir(subdir)
    w = SnapshotWriter(vfs, subdir, h, aead, bundle, SNAP_META)
    w.write_from(snapshot_data())
    path = w.publish()
    return h, w.digest, vfs.read_file(path)


def snapshot_section(name: str, h: SnapshotHeader, digest: bytes, data: bytes, bundle: bytes) -> dict:
    out = {"file": name, "algorithm": h.algorithm, "snapshot_id": h.snapshot_id, "index": h.index,
           "term": h.term, "chunk_size": h.chunk_size, "key_id": h.key_id.hex(), "salt": h.salt.hex(),
           "header": data[:128].hex(), "digest": digest.hex(), "bundle": bundle.decode("ascii"),
           "data": snapshot_data().hex(), "file_size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if h.algorithm != fmt.ALG_NONE:
        info = (b"walcrypt/v1/snapshot" + h.store_id + h.snapshot_id.to_bytes(8, "little")
                + h.index.to_bytes(8, "little") + h.term.to_bytes(8, "little") + bytes([h.algorithm]))
        key, _ = snapshot_keys(DEK, h)
        out.update({"hkdf_info": info.hex(), "snapshot_key": key.hex()})
    out["commitment"] = h.commitment.hex()
    return out


def segment_section(name: str, seg: Segment, data: bytes) -> dict:
    ident = seg.ident
    out = {
        "file": name,
        "algorithm": ident.algorithm,
        "algorithm_name": crypto.suite(ident.algorithm).name,
        "store_id": ident.store_id.hex(),
        "segment_id": ident.segment_id,
        "base_index": ident.base_index,
        "key_id": ident.key_id.hex(),
        "salt": ident.salt.hex(),
        "header": encode_header(ident).hex(),
    }
    if ident.algorithm != fmt.ALG_NONE:
        info = b"walcrypt/v1/segment" + ident.store_id + ident.segment_id.to_bytes(8, "little") + \
            bytes([ident.algorithm])
        key, commitment = crypto.segment_keys(DEK, ident.salt, ident.store_id, ident.segment_id, ident.algorithm)
        out.update({"hkdf_info": info.hex(), "segment_key": key.hex()})
    else:
        commitment = bytes(fmt.COMMITMENT_SIZE)
    out["commitment"] = commitment.hex()
    frames = walk_frames(data)
    out.update({
        "sealed": seg.sealed,
        "file_size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "committed_end": seg.write_offset,
        "last_index": seg.last_index,
        "records_written": seg.records_written,
        "payload_bytes": seg.bytes_written,
        "hard_state_offset": seg.hardstate_offset,
        "frames": frames,
        "first_record": record_detail(ident, data, frames[0]),
        "first_entries_record": record_detail(
            ident, data, next(f for f in frames if f["type"] == fmt.FRAME_ENTRIES)),
    })
    if seg.sealed:
        out["index_offset"] = seg.index_offset
        out["end_offset"] = seg.end_offset
        out["index_payload"] = seg.encode_index().hex()
    return out


def keyring_section() -> dict:
    """KEK derivation, check value, wrapped keys and the keyring record."""
    wrapper = keys.RawKey(KEK).wrapper({"kind": "raw"})
    dek_ctx = keys.wrap_context(STORE_ID, DEK_KEY_ID, keys.PURPOSE_DEK)
    meta_ctx = keys.wrap_context(STORE_ID, META_KEY_ID, keys.PURPOSE_META)
    with fixed_urandom(WRAP_NONCE_DEK, WRAP_NONCE_META):
        wrapped_dek = wrapper.wrap(DEK, dek_ctx)
        wrapped_meta = wrapper.wrap(META_KEY, meta_ctx)
    if wrapper.unwrap(wrapped_dek, dek_ctx) != DEK or wrapper.unwrap(wrapped_meta, meta_ctx) != META_KEY:
        raise AssertionError("wrapped keys do not unwrap")
    entry = keys.KeyEntry(DEK_KEY_ID, keys.ACTIVE, fmt.ALG_AES_256_GCM, keys.PURPOSE_DEK, CREATED_NS, CREATED_NS,
                          wrapped_dek)
    keyring_value = M.encode_keyring(entry)

    pw = keys.Passphrase(PASSPHRASE, n=PASSPHRASE_PARAMS["n"], r=PASSPHRASE_PARAMS["r"], p=PASSPHRASE_PARAMS["p"])
    pw_check = pw.wrapper(dict(PASSPHRASE_PARAMS)).check_value()

    return {
        "kek": KEK.hex(),
        "kek_params_json": json.dumps({"kind": "raw"}),
        "wrap_key_info": b"walcrypt/v1/kek-wrap".hex(),
        "check_info": b"walcrypt/v1/kek-check".hex(),
        "wrap_key": crypto.hkdf(KEK, salt=None, info=b"walcrypt/v1/kek-wrap", length=32).hex(),
        "check_value": wrapper.check_value().hex(),
        "dek": DEK.hex(),
        "dek_key_id": DEK_KEY_ID.hex(),
        "dek_wrap_context": dek_ctx.hex(),
        "dek_wrap_nonce": WRAP_NONCE_DEK.hex(),
        "wrapped_dek": wrapped_dek.hex(),
        "meta_key": META_KEY.hex(),
        "meta_key_id": META_KEY_ID.hex(),
        "meta_wrap_context": meta_ctx.hex(),
        "meta_wrap_nonce": WRAP_NONCE_META.hex(),
        "wrapped_meta_key": wrapped_meta.hex(),
        "keyring_record": {"state": keys.ACTIVE, "algorithm": fmt.ALG_AES_256_GCM, "purpose": keys.PURPOSE_DEK,
                           "created_ns": CREATED_NS, "state_changed_ns": CREATED_NS,
                           "value": keyring_value.hex()},
        "passphrase": {"passphrase": PASSPHRASE, "params": PASSPHRASE_PARAMS, "check_value": pw_check.hex()},
        "metadata_macs": {},
    }


def stable_section() -> dict:
    """One stable-store value sealed under the DEK (stable.seal_with), and its plaintext-store form."""
    with fixed_urandom(STABLE_NONCE):
        sealed = stable.seal_with(STORE_ID, STABLE_KEY, STABLE_VALUE, key_id=DEK_KEY_ID, dek=DEK,
                                  algorithm=fmt.ALG_AES_256_GCM)
    plain = stable.seal_with(STORE_ID, STABLE_KEY, STABLE_VALUE, key_id=crypto.ZERO_KEY_ID, dek=None,
                             algorithm=fmt.ALG_NONE)
    return {"key": STABLE_KEY.hex(), "value": STABLE_VALUE.hex(), "algorithm": fmt.ALG_AES_256_GCM,
            "hkdf_info": (b"walcrypt/v1/stable" + STORE_ID).hex(),
            "stable_key": crypto.hkdf(DEK, salt=None, info=b"walcrypt/v1/stable" + STORE_ID, length=32).hex(),
            "nonce": STABLE_NONCE.hex(), "aad": (STORE_ID + b"stable" + STABLE_KEY).hex(),
            "sealed": sealed.hex(), "plaintext_store_form": plain.hex()}


def metadata_macs(workdir: str, manifest_value: bytes, registry_value: bytes, keyring_value: bytes,
                  stable_value: bytes, *, version: int) -> dict:
    """Stored (value || MAC) forms under metadata format ``version``'s MAC domain, computed by the
    engine's own Meta object over a scratch LMDB environment."""
    compacted_value = M.encode_compacted(SNAP_META.index, SNAP_META.term, SEGMENT_ID + 1)
    next_value = (SEGMENT_ID + 1).to_bytes(8, "little")
    meta = M.Meta(os.path.join(workdir, f"meta-v{version}"))
    try:
        meta.set_mac_key(META_KEY, version=version)
        macs = {
            "segment_manifest_key": M.u64(SEGMENT_ID).hex(),
            "segment_manifest_stored": meta.seal_value(M.DB_SEGMENTS, M.u64(SEGMENT_ID), manifest_value).hex(),
            "snapshot_registry_stored": meta.seal_value(M.DB_SNAPSHOTS, M.u64(SNAP_ID), registry_value).hex(),
            "keyring_record_stored": meta.seal_value(M.DB_KEYRING, DEK_KEY_ID, keyring_value).hex(),
            "stable_stored": meta.seal_value(M.DB_STABLE, STABLE_KEY, stable_value).hex(),
            "compacted_value": compacted_value.hex(),
            "compacted_stored": meta.seal_value(M.DB_STATE, M.K_COMPACTED, compacted_value).hex(),
            "next_segment_value": next_value.hex(),
            "next_segment_stored": meta.seal_value(M.DB_STATE, M.K_NEXT_SEGMENT, next_value).hex(),
        }
        meta.set_mac_key(None)
        macs["keyless_next_segment_stored"] = meta.seal_value(M.DB_STATE, M.K_NEXT_SEGMENT, next_value).hex()
        if version >= M.FIRST_DOMAIN_TAGGED_VERSION:
            macs["domain"] = M.MAC_DOMAIN_V3.decode()
    finally:
        meta.close()
    return macs


def _flip(data: bytes, pos: int) -> bytearray:
    b = bytearray(data)
    b[pos] ^= 0x01
    return b


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------

def generate(outdir: str = DEFAULT_OUTDIR) -> list[str]:
    """Write every vector into ``outdir``; return the names written (vectors.json last)."""
    vfs = VFS()
    outdir = os.path.abspath(outdir)
    vfs.makedirs(outdir)
    written: list[str] = []
    doc: dict = {
        "format_version": fmt.FORMAT_VERSION,
        "generator": "formats/make_vectors.py",
        "inputs": {
            "store_id": STORE_ID.hex(), "dek": DEK.hex(), "dek_key_id": DEK_KEY_ID.hex(), "salt": SALT.hex(),
            "segment_id": SEGMENT_ID, "base_index": BASE_INDEX, "segment_size": SEGMENT_SIZE,
            "initial_hard_state": list(HS_CREATE),
        },
        "entries": [{"index": e.index, "term": e.term, "data": e.data.hex()}
                    for groups, _hs, _snap in UNITS for grp in groups for e in grp],
        "hard_state": list(FINAL_HARD_STATE),
        "write_units": [{"records": [[e.index for e in grp] for grp in groups],
                         "hard_state": list(hs) if hs else None, "snapshot_record": snap}
                        for groups, hs, snap in UNITS],
        "snapshot_meta": {"snapshot_id": SNAP_ID, "index": SNAP_META.index, "term": SNAP_META.term,
                          "voters": list(SNAP_META.conf_state.voters),
                          "learners": list(SNAP_META.conf_state.learners)},
        "segments": {},
        "snapshots": {},
    }
    with tempfile.TemporaryDirectory(dir=outdir, prefix=".work-") as work:
        # key material first: snapshots carry the wrapped keys in their keyring bundle
        keyring = keyring_section()
        wrapped_dek, wrapped_meta = bytes.fromhex(keyring["wrapped_dek"]), bytes.fromhex(keyring["wrapped_meta_key"])
        check = bytes.fromhex(keyring["check_value"])
        digests = {}
        for name, alg in SNAPSHOTS:
            bundle = keyring_bundle(alg, wrapped_dek, wrapped_meta, check)
            h, digest, data = build_snapshot(vfs, work, alg, bundle)
            write_file(vfs, os.path.join(outdir, name), data)
            doc["snapshots"][name] = snapshot_section(name, h, digest, data, bundle)
            digests[alg] = digest
            written.append(name)

        # (a)-(c): sealed segments, one per cipher suite (GCM-SIV only where OpenSSL has it)
        for name, alg in SEALED_SEGMENTS:
            digest = digests[fmt.ALG_NONE if alg == fmt.ALG_NONE else fmt.ALG_AES_256_GCM]
            try:
                seg, data = build_segment(vfs, work, alg, digest, seal=True)
            except UnsupportedFormatError:
                if alg == fmt.ALG_AES_256_GCM_SIV:
                    print(f"skipping {name}: AES-256-GCM-SIV is not available here", file=sys.stderr)
                    continue
                raise
            write_file(vfs, os.path.join(outdir, name), data)
            doc["segments"][name] = segment_section(name, seg, data)
            written.append(name)

        # an unsealed segment: preallocated zeros after the last COMMIT read as a clean end
        seg, data = build_segment(vfs, work, fmt.ALG_AES_256_GCM, digests[fmt.ALG_AES_256_GCM], seal=False)
        write_file(vfs, os.path.join(outdir, OPEN_NAME), data)
        sec = segment_section(OPEN_NAME, seg, data)
        sec["expect"] = {"result": "clean", "committed_end": seg.write_offset}
        doc["segments"][OPEN_NAME] = sec
        written.append(OPEN_NAME)
        committed_end = seg.write_offset
        entries_frames = [f for f in sec["frames"] if f["type"] == fmt.FRAME_ENTRIES]

        # torn: the next unit reached the disk only up to the first sector boundary past its
        # first 200 bytes; the rest of its extent is still preallocated zeros.
        buf, _pending = seg.encode_batch(unit_records(TORN_UNIT))
        keep = ((committed_end + 200) // 512 + 1) * 512 - committed_end
        torn = bytearray(data)
        torn[committed_end:committed_end + keep] = buf[:keep]
        write_file(vfs, os.path.join(outdir, TORN_NAME), bytes(torn))
        doc["segments"][TORN_NAME] = {
            "file": TORN_NAME, "derived_from": OPEN_NAME,
            "how": f"the frames of one more write unit (entries 9-10) written at offset {committed_end}, "
                   f"but only its first {keep} bytes (up to a 512-byte sector boundary)",
            "sha256": hashlib.sha256(bytes(torn)).hexdigest(),
            "expect": {"result": "torn", "committed_end": committed_end, "offset": committed_end,
                       "detail": "frame fails its CRC32C", "last_index": seg.last_index},
        }
        written.append(TORN_NAME)

        # corrupt: one bit of the first ENTRIES record's ciphertext flipped; later write units follow
        target = entries_frames[0]["offset"]
        corrupt = _flip(data, target + fmt.FRAME_HEADER_SIZE + 10)
        write_file(vfs, os.path.join(outdir, CORRUPT_NAME), bytes(corrupt))
        doc["segments"][CORRUPT_NAME] = {
            "file": CORRUPT_NAME, "derived_from": OPEN_NAME,
            "how": f"bit 0 of byte {target + fmt.FRAME_HEADER_SIZE + 10} flipped (ciphertext of the first "
                   "ENTRIES record); its CRC32C no longer matches and durable write units follow it",
            "sha256": hashlib.sha256(bytes(corrupt)).hexdigest(),
            "expect": {"result": "error", "error": "CorruptionError", "offset": target},
        }
        written.append(CORRUPT_NAME)

        # tampered: the same flip with the frame CRC32C recomputed: only the AEAD tag catches it
        tampered = _flip(data, target + fmt.FRAME_HEADER_SIZE + 10)
        hdr = bytes(tampered[target:target + fmt.FRAME_HEADER_SIZE])
        ct = bytes(tampered[target + fmt.FRAME_HEADER_SIZE:
                            target + fmt.FRAME_HEADER_SIZE + entries_frames[0]["length"]])
        tampered[target + fmt.FRAME_CRC_OFFSET:target + fmt.FRAME_CRC_OFFSET + 4] = \
            crypto.frame_crc(hdr, ct).to_bytes(4, "little")
        write_file(vfs, os.path.join(outdir, TAMPERED_NAME), bytes(tampered))
        doc["segments"][TAMPERED_NAME] = {
            "file": TAMPERED_NAME, "derived_from": OPEN_NAME,
            "how": "as the corrupt vector, with the frame's CRC32C recomputed over the altered bytes",
            "sha256": hashlib.sha256(bytes(tampered)).hexdigest(),
            "expect": {"result": "error", "error": "AuthenticationError", "offset": target},
        }
        written.append(TAMPERED_NAME)

        # the manifest record the engine writes when it seals that segment (storage.Store.segment_sealed)
        sealed = doc["segments"]["segment-aes256gcm.wal"]
        manifest_value = M.encode_manifest({
            "state": fmt.SEG_SEALED, "algorithm": fmt.ALG_AES_256_GCM, "dir_code": fmt.DIR_CODE_ENCRYPTED,
            "base_index": BASE_INDEX, "key_id": DEK_KEY_ID, "index_offset": sealed["index_offset"],
            "end_offset": sealed["end_offset"], "last_index": sealed["last_index"],
            "records": sealed["records_written"], "bytes": sealed["payload_bytes"]})
        doc["segment_manifest_record"] = {"segment": "segment-aes256gcm.wal", "key": M.u64(SEGMENT_ID).hex(),
                                          "value": manifest_value.hex()}
        snap = doc["snapshots"]["snapshot-aes256gcm.snap"]
        registry_value = fmt.SNAPSHOT_MANIFEST_STRUCT.pack(1, bytes(7), SNAP_META.index, SNAP_META.term, DEK_KEY_ID,
                                                           bytes.fromhex(snap["digest"]), SNAP_DATA_LEN)
        doc["snapshot_registry_record"] = {"snapshot": "snapshot-aes256gcm.snap", "key": M.u64(SNAP_ID).hex(),
                                           "value": registry_value.hex()}
        doc["stable"] = stable_section()
        inputs = (manifest_value, registry_value, bytes.fromhex(keyring["keyring_record"]["value"]),
                  bytes.fromhex(doc["stable"]["sealed"]))
        # metadata format versions 1 and 2 (read, upgraded at the first read-write open), and 3
        keyring["metadata_macs"].update(metadata_macs(work, *inputs, version=1))
        keyring["metadata_macs_v3"] = metadata_macs(work, *inputs, version=3)
        doc["keyring"] = keyring

    text = json.dumps(doc, indent=2) + "\n"
    write_file(vfs, os.path.join(outdir, JSON_NAME), text.encode("utf-8"))
    written.append(JSON_NAME)
    return written


def main(argv: list[str]) -> int:
    outdir = argv[1] if len(argv) > 1 else DEFAULT_OUTDIR
    for name in generate(outdir):
        print(os.path.join(outdir, name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
