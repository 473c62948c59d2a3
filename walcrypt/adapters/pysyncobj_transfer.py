"""Snapshots sent to lagging followers, over pysyncobj's transport.

The sender streams its newest snapshot *decrypted* (pysyncobj encrypts its traffic only when the
conf has a ``password``); the receiver spools the chunks under an ephemeral in-memory key, then
re-encrypts the snapshot under its own DEK as a walcrypt snapshot.  No node ever receives
ciphertext that needs another node's key, and no plaintext reaches the receiver's disk.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..types import SnapshotMeta
from ..vfs import DEFAULT_VFS, open_private
from .pysyncobj_format import read_head, write_marker
from .pysyncobj_node import WalcryptNode


class _Spool:
    """Incoming snapshot bytes, sealed under a key that lives only in memory (no plaintext on disk)."""

    def __init__(self, directory: str):
        self.key = AESGCM(os.urandom(32))
        self.path = os.path.join(directory, ".incoming-snapshot.spool")
        fd = open_private(self.path, os.O_RDWR, replace_stale=True)   # a link there is refused, not followed
        try:
            os.unlink(self.path)        # nameless from now on: nothing to clean up, nothing to swap
        except BaseException:
            os.close(fd)
            raise
        self.f = os.fdopen(fd, "w+b")
        self.n = 0

    def write(self, data: bytes) -> None:
        ct = self.key.encrypt(self.n.to_bytes(12, "big"), data, None)
        self.f.write(struct.pack("<I", len(ct)) + ct)
        self.n += 1

    def reader(self) -> Iterator[bytes]:
        self.f.flush()
        self.f.seek(0)
        for k in range(self.n):
            (n,) = struct.unpack("<I", self.f.read(4))
            yield self.key.decrypt(k.to_bytes(12, "big"), self.f.read(n), None)

    def close(self) -> None:
        self.f.close()


class _ChunkStream(io.RawIOBase):
    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def read(self, size: int = -1, /) -> bytes:
        data = super().read(size)
        assert data is not None         # None is "no data yet" of a non-blocking stream; this one blocks
        return data


def send_chunk(node: WalcryptNode, ser: Any, transmission_id: Any) -> tuple[bytes, bool, bool] | None:
    """``Serializer.getTransmissionData`` for a node's serializer: the next chunk of its newest
    snapshot, decrypted, as (data, is_first, is_last); None when there is nothing to send."""
    if ser._Serializer__pid != 0:
        return None
    trans = ser._Serializer__transmissions
    t = trans.get(transmission_id)
    if t is None:
        snap = node.current_store().snapshot()
        if snap is None:
            return None
        t = trans[transmission_id] = {"file": snap.open(), "transmitted": 0}
    is_first = t["transmitted"] == 0
    data = t["file"].read(ser._Serializer__transmissionBatchSize)
    t["transmitted"] += len(data)
    is_last = not data
    if is_last:
        t["file"].close()
        trans.pop(transmission_id, None)
    return data, is_first, is_last


def receive_chunk(node: WalcryptNode, ser: Any, data: Any) -> bool:
    """``Serializer.setTransmissionData`` for a node's serializer: spool one chunk; after the last,
    save the snapshot under this node's DEK.  True once a whole snapshot was saved."""
    if data is None:
        return False
    chunk, is_first, is_last = data
    spool = getattr(ser, "_walcrypt_spool", None)
    if is_first:
        if spool is not None:
            spool.close()
        spool = ser._walcrypt_spool = _Spool(node.path)
    elif spool is None:
        return False
    if chunk:
        spool.write(bytes(chunk))
    if not is_last:
        return False
    ser._walcrypt_spool = None
    try:
        head = _ChunkStream(spool.reader())
        last, _prev, _cluster = read_head(head)
        stream = _ChunkStream(spool.reader())
        node.current_journal().flush()
        node.current_store().save_snapshot(SnapshotMeta(last[1], last[2] + node.term_offset), stream)  # our DEK
        node.snapshots_received += 1
        write_marker(node.marker + ".tmp", last[1])
        DEFAULT_VFS.rename(node.marker + ".tmp", node.marker)      # refuses a link at the marker
    finally:
        spool.close()
    return True
