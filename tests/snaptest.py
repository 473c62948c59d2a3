"""Helpers shared by the snapshot, rotation, migration and backup tests.

Snapshot files are parsed here from their documented layout (walcrypt/snapshot.py):
128-byte header, keyring bundle, META frame, then chunk frames of
``<length u32><flags u32><ciphertext+tag>``; only the header codecs of the engine are reused
(``SnapshotHeader.decode`` and ``segment_codec.decode_header``), so the frame walking is independent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass

from walcrypt import ConfState, Entry, HardState, SnapshotMeta
from walcrypt.segment_codec import decode_header
from walcrypt.snapshot import SnapshotHeader

import wctest

SEG_SIZE = 8 * 1024          # small segments: many of them, cheaply
CHUNK = 4096                 # small snapshot chunks: many of them, cheaply
SNAP_HEADER = 128
CHUNK_HEAD = struct.Struct("<II")
ENC_WAL, ENC_SNAP = "wal-v1-encrypted", "snap-v1-encrypted"
PLAIN_WAL, PLAIN_SNAP = "wal-v1", "snap-v1"


def open_store(path, kek=None, **opts):
    opts.setdefault("segment_size", SEG_SIZE)
    opts.setdefault("snapshot_chunk_size", CHUNK)
    return wctest.open_store(path, kek=kek, **opts)


def entries(lo: int, hi: int, length: int | None = None) -> list[Entry]:
    return wctest.make_entries(lo, hi, length=length)


def snap_data(index: int, size: int = 3 * CHUNK + 1234) -> bytes:
    """Deterministic snapshot payload for a snapshot at ``index`` (several chunks by default)."""
    seed = hashlib.sha256(b"snapshot-%d" % index).digest()
    out = bytearray()
    block = seed
    while len(out) < size:                      # bounded by size
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def snap_meta(store, index: int | None = None, conf=ConfState(voters=(1, 2, 3))) -> SnapshotMeta:
    index = store.last_index() if index is None else index
    return SnapshotMeta(index, store.term(index), conf)


def save_snap(store, index: int | None = None, size: int = 3 * CHUNK + 1234, conf=ConfState(voters=(1, 2, 3))):
    meta = snap_meta(store, index, conf)
    store.save_snapshot(meta, snap_data(meta.index, size))
    return meta


def fill(store, lo: int, hi: int, length: int | None = None) -> None:
    """Save entries [lo, hi) in batches of 10 with a hard state committing each batch."""
    for a in range(lo, hi, 10):
        b = min(hi, a + 10)
        ents = entries(a, b, length)
        store.save(hard_state=HardState(ents[-1].term, 1, ents[-1].index), entries=ents)


read = wctest.read        # one copy of the file helpers (tests/wctest.py)
write = wctest.write


def sha256_file(path: str) -> str:
    return hashlib.sha256(read(path)).hexdigest()


def files_in(root: str, suffixes=None) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            if suffixes is None or n.endswith(tuple(suffixes)):
                out.append(os.path.join(dirpath, n))
    return sorted(out)


def snap_files(data_dir: str, encrypted: bool = True) -> list[str]:
    d = os.path.join(data_dir, ENC_SNAP if encrypted else PLAIN_SNAP)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".snap")) if os.path.isdir(d) else []


def seg_files(data_dir: str, encrypted: bool = True) -> list[str]:
    d = os.path.join(data_dir, ENC_WAL if encrypted else PLAIN_WAL)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".wal")) if os.path.isdir(d) else []


# ---------------------------------------------------------------------------------------- snapshot layout

@dataclass
class Chunk:
    offset: int      # of the 8-byte chunk header
    length: int      # ciphertext + tag
    flags: int

    @property
    def end(self) -> int:
        return self.offset + 8 + self.length


@dataclass
class SnapLayout:
    header: SnapshotHeader
    bundle: bytes
    meta_offset: int
    data_offset: int
    chunks: list[Chunk]


def parse_snapshot(raw: bytes, path: str = "<snapshot>", base: int = 0) -> SnapLayout:
    """Walk a snapshot file's frames (stops at the final chunk or at the end of the bytes)."""
    h = SnapshotHeader.decode(raw[base:base + SNAP_HEADER], path)
    bundle = raw[base + SNAP_HEADER:base + SNAP_HEADER + h.bundle_len]
    meta_off = base + SNAP_HEADER + h.bundle_len
    mlen, _mflags = CHUNK_HEAD.unpack_from(raw, meta_off)
    off = data_off = meta_off + 8 + mlen
    chunks = []
    while off + 8 <= len(raw):                      # bounded by the file size
        length, flags = CHUNK_HEAD.unpack_from(raw, off)
        c = Chunk(off, length, flags)
        chunks.append(c)
        off = c.end
        if flags & 1:
            break
    return SnapLayout(h, bundle, meta_off, data_off, chunks)


def bundle_doc(path: str) -> dict:
    lay = parse_snapshot(read(path), path)
    return json.loads(lay.bundle) if lay.bundle else {}


# ---------------------------------------------------------------------------------------- key references

def header_key_ids(data_dir: str) -> dict[str, bytes]:
    """key ID named in the header of every segment / snapshot file (and .broken copy) under data_dir."""
    out = {}
    for p in files_in(data_dir):
        name = os.path.basename(p)
        if name.endswith((".wal", ".wal.broken")) or ".wal." in name:
            with open(p, "rb") as f:
                out[p] = decode_header(f.read(128), p).key_id
        elif name.endswith((".snap", ".snap.broken")) or ".snap." in name:
            with open(p, "rb") as f:
                out[p] = SnapshotHeader.decode(f.read(128), p).key_id
    return out


def key_states(store) -> dict[bytes, str]:
    return {bytes.fromhex(k["key_id"]): k["state"] for k in store.key_info()["keys"]}


def active_key(store) -> bytes:
    act = [k for k, st in key_states(store).items() if st == "active"]
    assert len(act) == 1, key_states(store)
    return act[0]


def kek_encodings(kek_bytes: bytes) -> list[bytes]:
    """Ways a leaked KEK could appear in a file."""
    return [kek_bytes, kek_bytes.hex().encode(), kek_bytes.hex().upper().encode(),
            base64.b64encode(kek_bytes), base64.urlsafe_b64encode(kek_bytes)]


def assert_no_kek(path: str, kek_bytes: bytes) -> None:
    raw = read(path)
    for enc in kek_encodings(kek_bytes):
        assert enc not in raw, f"{path} contains the KEK ({enc[:8]!r}...)"


def unwrapped_by(data_dir: str, kek, params) -> list[tuple[str, str]]:
    """(file, key ID) of every key in a snapshot file's keyring bundle that ``kek`` (with the KEK
    parameters ``params``) unwraps: after a KEK rotation, the old KEK must unwrap none."""
    from walcrypt import keys as K
    from walcrypt.errors import WrongKeyError
    from walcrypt.snapshot import SnapshotFile
    from walcrypt.vfs import DEFAULT_VFS
    wrapper = kek.wrapper(params)
    found = []
    for name in wctest.snap_files(data_dir):
        if not name.endswith(".snap"):
            continue
        doc = json.loads(SnapshotFile(DEFAULT_VFS, os.path.join(data_dir, wctest.SNAP_DIR, name)).bundle)
        for k in doc["keys"]:
            try:
                wrapper.unwrap(bytes.fromhex(k["wrapped"]),
                               K.wrap_context(bytes.fromhex(doc["store_id"]), bytes.fromhex(k["id"]), k["purpose"]))
            except WrongKeyError:
                continue
            found.append((name, k["id"]))
    return found
