"""Cipher suites, key derivation, nonces, associated data and frame sealing.

Contracts (see FORMAT.md, "Cryptography"):

* Every segment has its own AEAD key: HKDF-SHA256 over the DEK with a random
  32-byte salt from the segment header and an info string naming the store,
  the segment and the algorithm.  The same HKDF output yields a 24-byte key
  commitment stored in the header and checked before anything is decrypted.
* Nonces are counters: 4 zero bytes then the record's sequence number
  (big-endian u64).  A segment is written by one process lifetime only and its
  salt is fresh, so a (key, nonce) pair is never reused, even across crashes.
* The associated data of a record is the segment context (store ID, segment
  ID) followed by the whole frame header except its CRC field; the header holds
  type, algorithm, length, sequence, Raft index, term, count, nonce, key ID and
  the previous record's tag (the chain value).
* Algorithm NONE (legacy plaintext) keeps the framing and replaces the tag by a
  keyless BLAKE2b-128 over associated data and payload: it detects accidents
  and chain breaks, not an adversary.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Callable

from crc32c import crc32c
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import format as fmt
from .errors import WIPE_ADVICE, AuthenticationError, UnsupportedFormatError, UsageError

try:  # AES-GCM-SIV needs OpenSSL >= 3.2
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
except ImportError:  # pragma: no cover - depends on the cryptography build
    AESGCMSIV = None  # type: ignore[assignment,misc]

NONCE_PREFIX = b"\x00\x00\x00\x00"
ZERO_CHAIN = bytes(fmt.CHAIN_SIZE)
ZERO_KEY_ID = bytes(fmt.KEY_ID_SIZE)


class _NoneAEAD:
    """Keyless integrity 'AEAD' for the plaintext format: payload || BLAKE2b-128(aad || payload)."""

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        h = hashlib.blake2b(aad, digest_size=16)
        h.update(data)
        return bytes(data) + h.digest()

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        if len(data) < 16:
            raise InvalidTag()
        body = data[:-16]
        h = hashlib.blake2b(aad, digest_size=16)
        h.update(body)
        if not hmac.compare_digest(h.digest(), data[-16:]):
            raise InvalidTag()
        return bytes(body)


@dataclass(frozen=True)
class CipherSuite:
    alg_id: int
    name: str
    factory: object  # callable(key: bytes) -> object with encrypt/decrypt

    def new(self, key: bytes):
        return self.factory(key)  # type: ignore[operator]


def _siv_factory(key: bytes):
    if AESGCMSIV is None:
        raise UnsupportedFormatError(
            "AES-256-GCM-SIV is not available in this cryptography build "
            "(it needs OpenSSL >= 3.2; install the cryptography wheel from PyPI)")
    try:
        return AESGCMSIV(key)
    except UnsupportedAlgorithm:
        raise UnsupportedFormatError(
            "AES-256-GCM-SIV is not supported by the OpenSSL linked into cryptography "
            "(needs OpenSSL >= 3.2); choose algorithm='aes-256-gcm' or 'chacha20-poly1305'") from None


SUITES: dict[int, CipherSuite] = {
    fmt.ALG_NONE: CipherSuite(fmt.ALG_NONE, "none", lambda key: _NoneAEAD()),
    fmt.ALG_AES_256_GCM: CipherSuite(fmt.ALG_AES_256_GCM, "aes-256-gcm", AESGCM),
    fmt.ALG_CHACHA20_POLY1305: CipherSuite(fmt.ALG_CHACHA20_POLY1305, "chacha20-poly1305", ChaCha20Poly1305),
    fmt.ALG_AES_256_GCM_SIV: CipherSuite(fmt.ALG_AES_256_GCM_SIV, "aes-256-gcm-siv", _siv_factory),
}
SUITES_BY_NAME = {s.name: s for s in SUITES.values()}


def suite(alg_id: int) -> CipherSuite:
    try:
        return SUITES[alg_id]
    except KeyError:
        raise UnsupportedFormatError(f"unknown algorithm ID {alg_id}; upgrade walcrypt") from None


def suite_by_name(name: str) -> CipherSuite:
    try:
        s = SUITES_BY_NAME[name.lower()]
    except KeyError:
        raise UsageError(
            f"unknown algorithm {name!r}; choose one of "
            + ", ".join(n for n in SUITES_BY_NAME if n != "none")) from None
    if s.alg_id == fmt.ALG_AES_256_GCM_SIV:
        s.new(bytes(32))  # raises a clear error where the OpenSSL build lacks it
    return s


def hkdf(key: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def segment_keys(dek: bytes, salt: bytes, store_id: bytes, segment_id: int, alg_id: int) -> tuple[bytes, bytes]:
    """(AEAD key, commitment) for one segment."""
    info = b"walcrypt/v1/segment" + store_id + segment_id.to_bytes(8, "little") + bytes([alg_id])
    okm = hkdf(dek, salt=salt, info=info, length=32 + fmt.COMMITMENT_SIZE)
    return okm[:32], okm[32:]


_PADDING = tuple(bytes(n) for n in range(fmt.ALIGN))     # the zero padding after a frame, by length
# The frame layout's constants, bound once for FrameCipher.seal (it runs for every frame written).
_pack_header = fmt.FRAME_HEADER_STRUCT.pack
_CRC_AT = fmt.FRAME_CRC_OFFSET
_TAG = fmt.TAG_SIZE
_PAD_MASK = fmt.ALIGN - 1


def nonce_for(seq: int) -> bytes:
    return NONCE_PREFIX + seq.to_bytes(8, "big")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


class FrameCipher:
    """Seals and opens the frames of one segment.  One AEAD object per segment key.

    Not thread-safe by itself: the WAL serialises writers.  Opening (reads) uses
    only immutable state and is safe from any thread.
    """

    __slots__ = ("alg_id", "key_id", "ad_prefix", "_aead")

    def __init__(self, alg_id: int, aead, key_id: bytes, store_id: bytes, segment_id: int):
        self.alg_id = alg_id
        self.key_id = key_id
        self.ad_prefix = store_id + segment_id.to_bytes(8, "little")
        self._aead = aead

    def seal(self, ftype: int, seq: int, index: int, term: int, count: int,
             payload: bytes, prev_chain: bytes) -> tuple[bytes, bytes]:
        """Build one frame (header, ciphertext, tag, zero padding).  Returns (frame, tag)."""
        parts, tag = self.seal_parts(ftype, seq, index, term, count, payload, prev_chain)
        return b"".join(parts), tag

    def seal_parts(self, ftype: int, seq: int, index: int, term: int, count: int,
                   payload: bytes, prev_chain: bytes) -> tuple[tuple[bytes, ...], bytes]:
        """``seal`` as the frame's pieces in order (for a writer that joins a whole unit at once: one
        copy of the ciphertext instead of two).  Returns (pieces, tag)."""
        nonce = NONCE_PREFIX + seq.to_bytes(8, "big")
        length = len(payload) + _TAG
        hdr = _pack_header(ftype, self.alg_id, 0, 0, length, seq, index, term, count, 0,
                           nonce, 0, self.key_id, prev_chain)
        # The header without its CRC field is both the associated data (after the segment's
        # prefix) and, followed by the ciphertext, what the CRC covers (FORMAT.md 7.2).
        head, tail = hdr[:_CRC_AT], hdr[_CRC_AT + 4:]
        covered = head + tail
        ct = self._aead.encrypt(nonce, payload, self.ad_prefix + covered)
        crc = crc32c(ct, crc32c(covered))
        return (head, crc.to_bytes(4, "little"), tail, ct, _PADDING[-length & _PAD_MASK]), ct[-_TAG:]

    def open(self, header: bytes, ct: bytes | memoryview, *, path: str, offset: int) -> bytes:
        """Authenticate and decrypt one frame whose header and CRC were already checked."""
        return self.open_parts(header[40:52], ct, header[:fmt.FRAME_CRC_OFFSET]
                               + header[fmt.FRAME_CRC_OFFSET + 4:fmt.FRAME_HEADER_SIZE], path=path, offset=offset)

    def open_parts(self, nonce: bytes, ct: bytes | memoryview, fields: bytes, *, path: str, offset: int) -> bytes:
        """``open`` given the frame's nonce and its header without the CRC field."""
        try:
            return self._aead.decrypt(nonce, ct, self.ad_prefix + fields)
        except InvalidTag:
            raise authentication_failure(path, offset) from None

    @property
    def decrypt(self) -> Callable[[bytes, bytes | memoryview, bytes], bytes]:
        """The AEAD's own decrypt(nonce, ciphertext and tag, associated data), for a reader that opens
        many frames in one loop: it builds the associated data as ``open_parts`` does and turns
        InvalidTag into :func:`authentication_failure`."""
        return self._aead.decrypt


def authentication_failure(path: str, offset: int) -> AuthenticationError:
    """The error of a frame whose tag does not verify."""
    return AuthenticationError(
        path, offset,
        "record failed authentication (tampered, moved from another position, segment or store, "
        "or encrypted under another key)",
        "do not trust this segment; run 'walcrypt verify' and restore the node from a snapshot "
        "or " + WIPE_ADVICE)


def frame_crc(header: bytes, payload: memoryview | bytes) -> int:
    return crc32c(payload, crc32c(header[fmt.FRAME_CRC_OFFSET + 4:fmt.FRAME_HEADER_SIZE],
                                  crc32c(header[:fmt.FRAME_CRC_OFFSET])))


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def mac16(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()[:16]
