"""The stable key/value store (hashicorp's StableStore shape), kept in LMDB and sealed under the DEK.

Value encoding (FORMAT.md, "Stable store"): version (1 byte, 1) || key ID (16) ||
nonce (12, random) || AEAD(value) under an HKDF subkey of that DEK, with the store
ID, the purpose and the user key as associated data.  Plaintext stores keep the
value in clear behind a zero key ID.  Writes are durable LMDB commits (rare in
Raft: term and vote); DEK rotation re-seals every value under the new DEK.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag

from . import crypto
from . import format as fmt
from .errors import AuthenticationError, CorruptionError

VERSION = 1
_PREFIX = 1 + fmt.KEY_ID_SIZE + 12


def _aead(store_id: bytes, dek: bytes, algorithm: int):
    sub = crypto.hkdf(dek, salt=None, info=b"walcrypt/v1/stable" + store_id, length=32)
    return crypto.suite(algorithm).new(sub)


def seal_with(store_id: bytes, key: bytes, value: bytes, *, key_id: bytes, dek: bytes | None,
              algorithm: int) -> bytes:
    """Seal under an explicit DEK (None: the plaintext encoding)."""
    if dek is None:
        return bytes([VERSION]) + crypto.ZERO_KEY_ID + bytes(12) + value
    nonce = os.urandom(12)
    return bytes([VERSION]) + key_id + nonce + _aead(store_id, dek, algorithm).encrypt(
        nonce, value, store_id + b"stable" + key)


def seal(store, key: bytes, value: bytes, key_id: bytes | None = None) -> bytes:
    if not store.encrypted:
        return seal_with(store.store_id, key, value, key_id=crypto.ZERO_KEY_ID, dek=None, algorithm=fmt.ALG_NONE)
    if store.algorithm == fmt.ALG_NONE:     # an encrypted store never writes a value in clear
        raise AuthenticationError(store.meta.path, None, "refusing to seal a stable value with algorithm NONE "
                                  "in an encrypted store", "the store's metadata was tampered with; reopen it")
    key_id = key_id or store.write_key_id()
    return seal_with(store.store_id, key, value, key_id=key_id, dek=store.secret(key_id), algorithm=store.algorithm)


def open_value(store, key: bytes, blob: bytes) -> bytes:
    if len(blob) < _PREFIX or blob[0] != VERSION:
        raise CorruptionError(store.meta.path, None, f"stable value for key {key!r} is malformed")
    key_id, nonce, body = blob[1:17], blob[17:29], blob[29:]
    if not store.encrypted:
        return body
    try:
        return _aead(store.store_id, store.secret(key_id), store.algorithm).decrypt(
            nonce, body, store.store_id + b"stable" + key)
    except InvalidTag:
        raise AuthenticationError(store.meta.path, None, f"stable value for key {key!r} failed authentication",
                                  "the metadata database was edited or damaged") from None


def key_id_of(blob: bytes) -> bytes:
    return blob[1:17]
