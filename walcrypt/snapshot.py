"""Snapshot files: streaming encrypted write, atomic publish, verification and streaming read.

File layout (FORMAT.md, "Snapshot files"):

    header (128 bytes, CRC32C)
    keyring bundle (clear JSON: wrapped keys only, never a KEK; length in the header)
    META frame     AEAD(snapshot metadata), nonce counter 0,
                   associated data = header + SHA-256(keyring bundle)
    chunk frames   AEAD(chunk i), nonce counter i >= 1, associated data = counter,
                   flags (bit 0 = final chunk) and length; the last chunk is final

Each snapshot has its own subkey: HKDF over the DEK with a random 16-byte salt,
bound to the store, the snapshot ID, index and term; the header carries a key
commitment checked before anything is decrypted.  Truncation (no final chunk),
reordering and swapping chunks (counter in nonce and associated data) and
chunks from another snapshot (per-snapshot key) are all detected.

Durability: a snapshot is written to a ``.tmp-`` file, fsynced, renamed to its
final name and the directory fsynced, so a reader never sees a partial file.
Memory: one chunk at a time, whatever the snapshot size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable

from crc32c import crc32c
from cryptography.exceptions import InvalidTag

from . import crypto
from . import format as fmt
from . import keys as K
from .errors import AuthenticationError, CorruptionError, StorageError, UnsupportedFormatError
from .types import ConfState, SnapshotMeta
from .vfs import VFS, create_replacing

SNAPSHOT_HEADER_STRUCT = struct.Struct("<8sHHBBHQQQII16s16s16s24sII")
assert SNAPSHOT_HEADER_STRUCT.size == 128
CHUNK_HEADER_STRUCT = struct.Struct("<II")      # length (ciphertext + tag), flags
CHUNK_FINAL = 1
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = fmt.MAX_SNAPSHOT_CHUNK      # the bound readers apply to a header's chunk size
MAX_KEYRING_BUNDLE = 1 << 20
MAX_META = 1 << 20
MAX_BUNDLE_KEYS = 4096          # wrapped keys listed in one keyring bundle (a snapshot's lists one)
MAX_WRAPPED_KEY = 16 << 10      # bytes of one wrapped key (a local wrap is 61; KMS blobs are a few hundred)
FRAME_META = 0x10
SNAP_SALT_SIZE = 16


def snapshot_file_name(snap_id: int, index: int, term: int) -> str:
    return f"{snap_id:016x}-{index:016x}-{term:016x}.snap"


@dataclass
class SnapshotHeader:
    algorithm: int
    flags: int
    store_id: bytes
    snapshot_id: int
    index: int
    term: int
    chunk_size: int
    bundle_len: int
    key_id: bytes
    salt: bytes
    commitment: bytes

    def encode(self) -> bytes:
        body = SNAPSHOT_HEADER_STRUCT.pack(
            fmt.SNAPSHOT_MAGIC, fmt.FORMAT_VERSION, 128, self.algorithm, self.flags, 0, self.snapshot_id,
            self.index, self.term, self.chunk_size, self.bundle_len, self.store_id, self.key_id, self.salt,
            self.commitment, 0, 0)
        return body[:124] + crc32c(body[:124]).to_bytes(4, "little")

    @classmethod
    def decode(cls, raw: bytes, path: str) -> "SnapshotHeader":
        if len(raw) < 128:
            raise CorruptionError(path, 0, "snapshot header is truncated")
        (magic, version, hsize, alg, flags, _r0, snap_id, index, term, chunk_size, bundle_len, store_id,
         key_id, salt, commitment, _r1, crc) = SNAPSHOT_HEADER_STRUCT.unpack_from(raw)
        if magic != fmt.SNAPSHOT_MAGIC:
            raise CorruptionError(path, 0, "not a walcrypt snapshot (bad magic)")
        if crc32c(raw[:124]) != crc:
            raise CorruptionError(path, 0, "snapshot header fails its CRC32C")
        if version != fmt.FORMAT_VERSION or hsize != 128:
            raise UnsupportedFormatError(f"{path}: snapshot format version {version} is not supported; "
                                         "upgrade walcrypt")
        fmt.check_algorithm(alg, path=path, offset=12)
        if not 0 < chunk_size <= fmt.MAX_SNAPSHOT_CHUNK or bundle_len > MAX_KEYRING_BUNDLE:
            raise CorruptionError(path, 0, f"snapshot header sizes are out of bounds (chunk {chunk_size}, "
                                           f"keyring {bundle_len})")
        return cls(alg, flags, store_id, snap_id, index, term, chunk_size, bundle_len, key_id, salt, commitment)


def snapshot_keys(dek: bytes, h: SnapshotHeader) -> tuple[bytes, bytes]:
    info = (b"walcrypt/v1/snapshot" + h.store_id + struct.pack("<QQQ", h.snapshot_id, h.index, h.term)
            + bytes([h.algorithm]))
    okm = crypto.hkdf(dek, salt=h.salt, info=info, length=32 + fmt.COMMITMENT_SIZE)
    return okm[:32], okm[32:]


def encode_meta(meta: SnapshotMeta, extra: dict | None = None) -> bytes:
    doc = {"index": meta.index, "term": meta.term,
           "conf_state": {"voters": list(meta.conf_state.voters), "learners": list(meta.conf_state.learners)}}
    if extra:
        doc.update(extra)
    return json.dumps(doc, sort_keys=True).encode()


class MetaRuleError(ValueError):
    """Snapshot metadata breaks a rule of FORMAT.md 10.5; ``field`` names the offending field."""

    def __init__(self, field: str, detail: str):
        self.field = field
        super().__init__(f"{field} {detail}")


def _node_ids(v, field: str) -> tuple:
    if not isinstance(v, list):
        raise MetaRuleError(field, "is not a list of node IDs")
    for k, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, str)):
            raise MetaRuleError(f"{field}[{k}]", f"is a {type(x).__name__}; node IDs are integers or strings")
    return tuple(v)


def meta_from_doc(doc) -> SnapshotMeta:
    """The rules of the sealed metadata (FORMAT.md 10.5), applied to its decoded JSON document: an
    object with u64 ``index`` and ``term`` and a ``conf_state`` object whose ``voters`` and ``learners``
    are lists of node IDs (JSON integers or strings).  The one statement of these rules: the reader
    (:func:`decode_meta`) and the writer (:func:`check_meta`) both apply it.  Raises MetaRuleError."""
    if not isinstance(doc, dict):
        raise MetaRuleError("snapshot metadata", "is not a JSON object")
    for name in ("index", "term"):
        if not K.is_uint(doc.get(name)):
            raise MetaRuleError(name, "is not an unsigned 64-bit integer")
    cs = doc.get("conf_state")
    if not isinstance(cs, dict):
        raise MetaRuleError("conf_state", "is not an object")
    return SnapshotMeta(doc["index"], doc["term"], ConfState(_node_ids(cs.get("voters", []), "conf_state.voters"),
                                                             _node_ids(cs.get("learners", []), "conf_state.learners")))


def decode_meta(raw: bytes, path: str) -> tuple[SnapshotMeta, dict]:
    """The sealed metadata, checked with :func:`meta_from_doc`; anything else is a CorruptionError."""
    try:
        doc = json.loads(raw)
        meta = meta_from_doc(doc)
    except (ValueError, RecursionError):        # MetaRuleError is a ValueError, as are JSON errors
        raise CorruptionError(path, 128, "snapshot metadata is malformed") from None
    return meta, doc


# Nesting the writer allows in extra metadata.  The reader's JSON decoder recurses once per level and
# may run deeper in the stack than the writer did: the writer stays far below the recursion limit.
MAX_EXTRA_META_DEPTH = 64


def _depth(v, level: int = 0) -> int:
    if level > MAX_EXTRA_META_DEPTH:
        return level
    if isinstance(v, dict):
        return max((_depth(x, level + 1) for x in v.values()), default=level + 1)
    if isinstance(v, (list, tuple)):
        return max((_depth(x, level + 1) for x in v), default=level + 1)
    return level


def check_meta(meta: SnapshotMeta, extra: dict | None = None) -> tuple[SnapshotMeta, dict | None]:
    """The writer's side of :func:`meta_from_doc`: ``meta`` (already a SnapshotMeta of plain values)
    and ``extra`` are encoded as the writer will seal them, decoded as the reader will, and checked
    with the reader's rules; the metadata must come back unchanged (``extra`` may not override
    ``index``, ``term`` or ``conf_state`` with other values) and fit MAX_META sealed.  Returns the
    metadata and ``extra`` as the reader will see it.  Raises MetaRuleError naming the field."""
    if extra is not None:
        if not isinstance(extra, dict):
            raise MetaRuleError("extra_meta", f"must be a dict, not {type(extra).__name__}")
        if _depth(extra) > MAX_EXTRA_META_DEPTH:
            raise MetaRuleError("extra_meta", f"is nested more than {MAX_EXTRA_META_DEPTH} levels deep")
    try:
        raw = encode_meta(meta, extra)
    except (TypeError, ValueError, RecursionError) as exc:
        raise MetaRuleError("extra_meta" if extra else "meta", f"cannot be encoded as JSON: {exc}") from None
    if len(raw) + fmt.TAG_SIZE > MAX_META:
        raise MetaRuleError("extra_meta" if extra else "meta",
                            f"makes the metadata {len(raw) + fmt.TAG_SIZE} bytes sealed; at most {MAX_META} "
                            "are allowed")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MetaRuleError("extra_meta" if extra else "meta", f"does not decode as JSON: {exc}") from None
    back = meta_from_doc(doc)
    for name in ("index", "term", "conf_state"):
        if getattr(back, name) != getattr(meta, name):
            raise MetaRuleError(f"extra_meta[{name!r}]" if extra and name in extra else f"meta.{name}",
                                f"would be read back as {getattr(back, name)!r}, not {getattr(meta, name)!r}")
    if extra:
        extra = {k: v for k, v in doc.items() if k not in ("index", "term", "conf_state")}
    return meta, extra or None


_BUNDLE_HINT = "the keyring bundle was damaged or edited; use another snapshot or export"


def parse_bundle(raw: bytes, path: str, offset: int) -> dict:
    """A keyring bundle (FORMAT.md 10.5), checked field by field before anything uses it: {} when empty,
    else a dict whose hex fields decode to the right lengths, whose numbers are in range and whose
    ``kek_params`` pass :func:`walcrypt.keys.validate_kek_params`.  Anything else is a StorageError:
    a CorruptionError, or an UnsupportedFormatError for a bundle version or algorithm this walcrypt
    does not know."""
    if not raw:
        return {}

    def bad(detail: str) -> CorruptionError:
        return CorruptionError(path, offset, f"keyring bundle is malformed: {detail}", _BUNDLE_HINT)

    def wrapped_key(k, what: str) -> None:
        if not isinstance(k, dict):
            raise bad(f"{what} is not an object")
        if K.hex_bytes(k.get("id"), min_len=16, max_len=16) is None:
            raise bad(f"{what} has no 16-byte hex id")
        if K.hex_bytes(k.get("wrapped"), min_len=1, max_len=MAX_WRAPPED_KEY) is None:
            raise bad(f"{what} has no wrapped key of 1 .. {MAX_WRAPPED_KEY} bytes of hex")

    doc = K.load_json_object(raw, MAX_KEYRING_BUNDLE, bad)
    version = doc.get("version")
    if not K.is_uint(version):
        raise bad("no version number")
    if version != 1:
        raise UnsupportedFormatError(f"{path}: keyring bundle version {version} is not supported; upgrade walcrypt")
    if K.hex_bytes(doc.get("store_id"), min_len=16, max_len=16) is None:
        raise bad("store_id is not 16 bytes of hex")
    if not K.is_uint(doc.get("algorithm"), 256):
        raise bad("algorithm is not a one-byte number")
    fmt.check_algorithm(doc["algorithm"], path=path, offset=offset)
    if doc.get("kek_check") is not None and K.hex_bytes(doc["kek_check"], min_len=16, max_len=16) is None:
        raise bad("kek_check is not 16 bytes of hex")
    K.validate_kek_params(doc.get("kek_params"), path, offset=offset, what="keyring bundle kek_params",
                          hint=_BUNDLE_HINT)
    wrapped_key(doc.get("meta_key"), "meta_key")
    keys = doc.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_BUNDLE_KEYS:
        raise bad(f"keys is not a list of at most {MAX_BUNDLE_KEYS} entries")
    for n, k in enumerate(keys):
        wrapped_key(k, f"key {n}")
        if type(k.get("state")) is not int or k["state"] not in K.STATE_NAMES:
            raise bad(f"key {n} has no known state")
        if type(k.get("purpose")) is not int or k["purpose"] not in (K.PURPOSE_DEK, K.PURPOSE_META):
            raise bad(f"key {n} has no known purpose")
        if not K.is_uint(k.get("algorithm"), 256):
            raise bad(f"key {n} has no one-byte algorithm")
        if not K.is_uint(k.get("created_ns")) or not K.is_uint(k.get("state_changed_ns")):
            raise bad(f"key {n} has no creation or state-change time")
    return doc


def _chunk_aad(counter: int, flags: int, length: int) -> bytes:
    return struct.pack("<QII", counter, flags, length)


class SnapshotWriter:
    """Writes one snapshot to a temporary file; ``publish()`` makes it durable and visible."""

    def __init__(self, vfs: VFS, directory: str, header: SnapshotHeader, aead, bundle: bytes,
                 meta: SnapshotMeta, extra_meta: dict | None = None):
        self.vfs = vfs
        self.directory = directory
        self.header = header
        self.name = snapshot_file_name(header.snapshot_id, header.index, header.term)
        self.path = os.path.join(directory, self.name)
        self.tmp = os.path.join(directory, ".tmp-" + self.name)
        self._aead = aead
        self._counter = 1
        self._pending: bytes | None = None
        self.data_bytes = 0
        # Created anew: a stale temporary file (a crash) or a name planted here loses its name first,
        # so nothing that another name shares is ever written.
        self.fd: int | None = create_replacing(vfs, self.tmp, os.O_RDWR)
        self.offset = 0
        try:
            hdr = header.encode()
            meta_plain = encode_meta(meta, extra_meta)
            nonce = crypto.nonce_for(0)
            ct = aead.encrypt(nonce, meta_plain, hdr + hashlib.sha256(bundle).digest())
            self._put(hdr + bundle + CHUNK_HEADER_STRUCT.pack(len(ct), 0) + ct)
        except BaseException:
            self.abort()
            raise

    def _put(self, data: bytes) -> None:
        assert self.fd is not None          # open until publish() or abort(), after which nothing is written
        self.vfs.pwrite(self.fd, data, self.offset)
        self.offset += len(data)

    def _emit(self, chunk: bytes, final: bool) -> None:
        flags = CHUNK_FINAL if final else 0
        length = len(chunk) + fmt.TAG_SIZE
        ct = self._aead.encrypt(crypto.nonce_for(self._counter), chunk, _chunk_aad(self._counter, flags, length))
        self._put(CHUNK_HEADER_STRUCT.pack(length, flags) + ct)
        self._counter += 1

    def write(self, data: bytes) -> None:
        """Append data; chunks are sealed as they fill.  The last chunk is sealed by publish()."""
        size = self.header.chunk_size
        buf = memoryview(data)
        while len(buf):
            if self._pending is not None and len(self._pending) == size:
                self._emit(self._pending, False)
                self._pending = None
            room = size - (len(self._pending) if self._pending else 0)
            piece = bytes(buf[:room])
            self._pending = piece if self._pending is None else self._pending + piece
            buf = buf[room:]
            self.data_bytes += len(piece)

    def write_from(self, source: BinaryIO | bytes | bytearray | memoryview) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.write(bytes(source))
            return
        size = self.header.chunk_size
        while True:
            block = source.read(size)
            if not block:
                break
            self.write(block)

    def publish(self) -> str:
        """Seal the final chunk, fsync, rename into place, fsync the directory."""
        self._emit(self._pending or b"", True)
        self._pending = None
        assert self.fd is not None          # _emit wrote through it just now
        self.vfs.fsync(self.fd)
        fd, self.fd = self.fd, None              # never closed twice, even if close() is interrupted
        self.vfs.close(fd)
        self.vfs.rename(self.tmp, self.path)
        self.vfs.fsync_dir(self.directory)
        return self.path

    def abort(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            self.vfs.close(fd)
        try:
            self.vfs.unlink(self.tmp)
        except FileNotFoundError:
            pass

    @property
    def digest(self) -> bytes:
        """16 bytes naming this snapshot file: hash of its header (includes the random salt)."""
        return hashlib.sha256(self.header.encode()).digest()[:16]


class SnapshotFile:
    """A snapshot on disk: header, keyring bundle and metadata parsed; data read on demand."""

    def __init__(self, vfs: VFS, path: str, *, offset: int = 0):
        """``offset``: where the snapshot starts inside ``path`` (an export file embeds one)."""
        self.vfs = vfs
        self.path = path
        self.base = offset
        fd = vfs.open(path, os.O_RDONLY)          # through the VFS: below a data directory, no links
        try:
            raw = vfs.pread(fd, 128, offset)
            self.header = SnapshotHeader.decode(raw, path)
            self.bundle = vfs.pread(fd, self.header.bundle_len, offset + 128)
            if len(self.bundle) != self.header.bundle_len:
                raise CorruptionError(path, offset + 128, "snapshot keyring bundle is truncated")
            self.meta_offset = offset + 128 + self.header.bundle_len
            head = vfs.pread(fd, 8, self.meta_offset)
            if len(head) != 8:
                raise CorruptionError(path, self.meta_offset, "snapshot metadata frame is truncated")
            length, flags = CHUNK_HEADER_STRUCT.unpack(head)
            if length < fmt.TAG_SIZE or length > MAX_META or flags:
                raise CorruptionError(path, self.meta_offset, "snapshot metadata frame header is malformed")
            self.meta_ct = vfs.pread(fd, length, self.meta_offset + 8)
            if len(self.meta_ct) != length:
                raise CorruptionError(path, self.meta_offset, "snapshot metadata frame is truncated")
        finally:
            vfs.close(fd)
        self.data_offset = self.meta_offset + 8 + length
        self.header_bytes = raw[:128]
        self.meta: SnapshotMeta | None = None
        self.extra: dict = {}
        self._aead = None

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.header_bytes).digest()[:16]

    def bundle_doc(self) -> dict:
        return parse_bundle(self.bundle, self.path, self.base + 128)

    def unlock(self, aead, commitment: bytes) -> SnapshotMeta:
        """Check the key commitment, then authenticate and decode the metadata frame."""
        if not crypto.constant_time_equal(commitment, self.header.commitment):
            raise AuthenticationError(self.path, 96, "snapshot key commitment does not match its data key "
                                                     "(tampered header or a snapshot from another store)")
        try:
            plain = aead.decrypt(crypto.nonce_for(0), self.meta_ct,
                                 self.header_bytes + hashlib.sha256(self.bundle).digest())
        except InvalidTag:
            raise AuthenticationError(self.path, self.meta_offset,
                                      "snapshot metadata failed authentication (tampered header, keyring "
                                      "bundle or metadata)") from None
        self.meta, self.extra = decode_meta(plain, self.path)
        if self.meta.index != self.header.index or self.meta.term != self.header.term:
            raise AuthenticationError(self.path, self.meta_offset, "snapshot metadata disagrees with its header")
        self._aead = aead
        return self.meta

    def chunks(self):
        """Yield decrypted chunks in order; raises on any damage, including a missing final chunk."""
        if self._aead is None:
            raise RuntimeError("unlock() first")
        try:
            fd = self.vfs.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise StorageError(f"snapshot file {self.path} was removed since this handle was taken (retention, "
                               "or a KEK rotation replaced it by a copy): take the store's current snapshot "
                               "again") from None
        try:
            size = self.vfs.fstat_size(fd)
            off = self.data_offset
            counter = 1
            limit = self.header.chunk_size + fmt.TAG_SIZE
            while True:
                head = self.vfs.pread(fd, 8, off)
                if len(head) < 8:
                    raise AuthenticationError(self.path, off, "snapshot ends before its final chunk (truncated)")
                length, flags = CHUNK_HEADER_STRUCT.unpack(head)
                if length < fmt.TAG_SIZE or length > limit or flags & ~CHUNK_FINAL:
                    raise CorruptionError(self.path, off, f"snapshot chunk {counter} header is malformed")
                # pread allocates what it is asked for: a length past the end of the file is refused first
                ct = self.vfs.pread(fd, length, off + 8) if off + 8 + length <= size else b""
                if len(ct) < length:
                    raise AuthenticationError(self.path, off, "snapshot ends inside a chunk (truncated)")
                try:
                    plain = self._aead.decrypt(crypto.nonce_for(counter), ct, _chunk_aad(counter, flags, length))
                except InvalidTag:
                    raise AuthenticationError(self.path, off,
                                              f"snapshot chunk {counter} failed authentication (flipped, "
                                              "reordered, duplicated or from another snapshot)") from None
                off += 8 + length
                yield plain
                if flags & CHUNK_FINAL:
                    if off != size:
                        raise CorruptionError(self.path, off, "bytes follow the final snapshot chunk")
                    return
                counter += 1
        finally:
            self.vfs.close(fd)

    def verify(self, progress: Callable[[int], None] | None = None) -> int:
        """Authenticate every chunk without keeping it; returns the data size."""
        total = 0
        for c in self.chunks():
            total += len(c)
            if progress:
                progress(total)
        return total

    def stream(self) -> "SnapshotStream":
        return SnapshotStream(self.chunks())


class SnapshotStream(io.RawIOBase):
    """A read-only binary stream over a snapshot's decrypted data, one chunk in memory at a time."""

    def __init__(self, chunks):
        super().__init__()
        self._chunks = chunks
        self._buf = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._buf) and not self._eof:
            try:
                self._buf = memoryview(next(self._chunks))
            except StopIteration:
                self._eof = True
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._chunks.close()
        super().close()
