"""Key-encryption keys (KEKs), data-encryption keys (DEKs) and the keyring.

A KEK never lives in the data directory.  It only wraps DEKs (and the metadata
MAC key); the wrapped blobs live in the LMDB keyring and travel inside every
snapshot.  KEK providers:

* :class:`RawKey` - 32 bytes held by the caller.
* :class:`KeyFile` - a file holding the key (32 raw bytes, 64 hex digits or
  base64); refused when group- or world-accessible.
* :class:`Passphrase` - scrypt over a passphrase; the salt and cost parameters
  are stored in the store (they are not secret).
* :class:`EnvKey` - an environment variable holding the key as hex or base64.
* :class:`Kms` - an external key service through the entry-point group
  ``walcrypt.kms`` (see :class:`KmsPlugin` for the interface).

Local KEKs are never used raw: HKDF derives a wrapping key and a 16-byte check
value from them, so a wrong KEK is reported as :class:`WrongKeyError` before
anything is decrypted or modified.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import crypto
from .errors import AuthenticationError, KeyProviderError, SymlinkError, UsageError, WrongKeyError

KEY_SIZE = 32

# Key states (FORMAT.md, "Keyring").
PENDING = 1
ACTIVE = 2
RETIRING = 3
INACTIVE = 4
DESTROYED = 5
STATE_NAMES = {PENDING: "pending", ACTIVE: "active", RETIRING: "retiring",
               INACTIVE: "inactive", DESTROYED: "destroyed"}

PURPOSE_DEK = 1
PURPOSE_META = 2

WRAP_VERSION_LOCAL = 1
WRAP_VERSION_KMS = 2


def wrap_context(store_id: bytes, key_id: bytes, purpose: int) -> bytes:
    """Associated data of a wrapped key: names the store, the key and its purpose."""
    return b"walcrypt/v1/wrap" + store_id + key_id + bytes([purpose])


# ---------------------------------------------------------------------------
# Wrappers: what a bound KEK can do
# ---------------------------------------------------------------------------

class Wrapper(Protocol):
    def wrap(self, secret: bytes, context: bytes) -> bytes: ...
    def unwrap(self, blob: bytes, context: bytes) -> bytes: ...
    def check_value(self) -> bytes | None: ...


class _LocalWrapper:
    """AES-256-GCM under an HKDF subkey of a local KEK; blob = version || nonce || ct+tag."""

    __slots__ = ("_aead", "_check")

    def __init__(self, kek: bytes):
        self._aead = AESGCM(crypto.hkdf(kek, salt=None, info=b"walcrypt/v1/kek-wrap", length=32))
        self._check = crypto.hkdf(kek, salt=None, info=b"walcrypt/v1/kek-check", length=16)

    def __repr__(self) -> str:
        return "<local KEK wrapper>"

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return bytes([WRAP_VERSION_LOCAL]) + nonce + self._aead.encrypt(nonce, secret, context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        if len(blob) < 1 + 12 + 16 or blob[0] != WRAP_VERSION_LOCAL:
            raise AuthenticationError(None, None, "wrapped key is malformed",
                                      "the keyring was damaged; restore it from a snapshot export")
        try:
            return self._aead.decrypt(blob[1:13], blob[13:], context)
        except InvalidTag:
            raise WrongKeyError(
                "the key-encryption key cannot unwrap this data key: wrong KEK, or a keyring "
                "entry copied from another store") from None

    def check_value(self) -> bytes:
        return self._check


class KeyEncryptionKey:
    """Base of KEK providers.  Subclasses never expose key bytes in repr or messages."""

    kind = "abstract"

    def new_params(self) -> dict:
        """Non-secret parameters to store with a new store (scrypt salt, ...)."""
        return {"kind": self.kind}

    def wrapper(self, params: dict | None) -> Wrapper:
        raise NotImplementedError

    def material(self, params: dict | None) -> bytes:
        """The 32 effective KEK bytes, for an explicitly requested embedded-KEK export only."""
        raise UsageError(f"a KEK held by {self.describe()} cannot be embedded in an export")

    def describe(self) -> str:
        return self.kind

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def _check_key_length(key: bytes, source: str) -> bytes:
    if len(key) != KEY_SIZE:
        raise KeyProviderError(
            f"{source} holds {len(key)} bytes; a KEK is exactly {KEY_SIZE} bytes "
            "(create one with 'walcrypt keygen PATH')")
    return bytes(key)


def decode_key_text(raw: bytes, source: str) -> bytes:
    """Accept 32 raw bytes, 64 hex digits or base64 of 32 bytes (surrounding whitespace ignored)."""
    if len(raw) == KEY_SIZE:
        return bytes(raw)
    text = raw.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            pass
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == KEY_SIZE:
        return decoded
    raise KeyProviderError(
        f"{source} does not hold a {KEY_SIZE}-byte key (expected 32 raw bytes, 64 hex digits or "
        "base64); create one with 'walcrypt keygen PATH'")


class RawKey(KeyEncryptionKey):
    kind = "raw"

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise UsageError("RawKey takes bytes")
        self._key = _check_key_length(bytes(key), "RawKey")

    def wrapper(self, params: dict | None) -> Wrapper:
        return _LocalWrapper(self._key)

    def material(self, params: dict | None) -> bytes:
        return self._key

    def describe(self) -> str:
        return "raw key"


class KeyFile(KeyEncryptionKey):
    kind = "file"

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def read(self) -> bytes:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise KeyProviderError(
                f"key file {self.path} does not exist; create one with 'walcrypt keygen {self.path}'") from None
        except PermissionError:
            raise KeyProviderError(f"no permission to read key file {self.path}") from None
        if not stat.S_ISREG(st.st_mode):
            raise KeyProviderError(f"key file {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyProviderError(
                f"key file {self.path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run 'chmod 600 {self.path}'")
        try:
            with open(self.path, "rb") as f:
                raw = f.read(4096)
        except PermissionError:
            raise KeyProviderError(f"no permission to read key file {self.path}") from None
        return decode_key_text(raw, f"key file {self.path}")

    def wrapper(self, params: dict | None) -> Wrapper:
        return _LocalWrapper(self.read())

    def material(self, params: dict | None) -> bytes:
        return self.read()

    def describe(self) -> str:
        return f"key file {self.path}"


def generate_key_file(path: str | os.PathLike) -> str:
    """Write a new random 32-byte KEK (base64 text) to ``path``, mode 0600.  Never overwrites."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if os.path.islink(path):
            raise SymlinkError(path, f"{path} is a symbolic link; walcrypt does not write a key file through a "
                                     "link; remove it or choose another path") from None
        raise UsageError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise KeyProviderError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(os.urandom(KEY_SIZE)) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    parent = os.path.dirname(os.path.abspath(path))
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


class EnvKey(KeyEncryptionKey):
    kind = "env"

    def __init__(self, name: str):
        self.name = name

    def material(self, params: dict | None) -> bytes:
        value = os.environ.get(self.name)
        if not value:
            raise KeyProviderError(
                f"environment variable {self.name} is not set; set it to a 32-byte key in hex or base64")
        return decode_key_text(value.encode(), f"environment variable {self.name}")

    def wrapper(self, params: dict | None) -> Wrapper:
        return _LocalWrapper(self.material(params))

    def describe(self) -> str:
        return f"environment variable {self.name}"


class Passphrase(KeyEncryptionKey):
    """scrypt(passphrase, salt, n, r, p) -> 32-byte KEK.  The salt and costs are stored in the store."""

    kind = "passphrase"

    def __init__(self, passphrase: str | bytes, *, n: int = 1 << 15, r: int = 8, p: int = 1):
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not passphrase:
            raise UsageError("an empty passphrase is not a key")
        self._passphrase = bytes(passphrase)
        self._n, self._r, self._p = n, r, p

    def new_params(self) -> dict:
        return {"kind": self.kind, "kdf": "scrypt", "salt": os.urandom(16).hex(),
                "n": self._n, "r": self._r, "p": self._p}

    def wrapper(self, params: dict | None) -> Wrapper:
        return _LocalWrapper(self.material(params))

    def material(self, params: dict | None) -> bytes:
        if not params or params.get("kdf") != "scrypt":
            raise WrongKeyError("this store was not created with a passphrase KEK; use the KEK it was created with")
        n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
        if not (2 <= n <= 1 << 22 and 1 <= r <= 32 and 1 <= p <= 16):
            raise AuthenticationError(None, None, f"implausible stored scrypt parameters n={n} r={r} p={p}")
        return Scrypt(salt=bytes.fromhex(params["salt"]), length=KEY_SIZE, n=n, r=r, p=p).derive(self._passphrase)

    def describe(self) -> str:
        return "passphrase"


class KmsPlugin(Protocol):
    """Interface of an external key service registered in the entry-point group ``walcrypt.kms``.

    The entry point names a callable ``factory(**options) -> KmsPlugin``.  ``wrap``
    must return an opaque blob that ``unwrap`` turns back into the same bytes for
    the same ``context`` (the associated data: store ID, key ID, purpose) and must
    fail (raise anything) otherwise.  walcrypt maps failures of ``unwrap`` to
    :class:`WrongKeyError` and failures of ``wrap`` to :class:`KeyProviderError`.
    """

    def wrap(self, plaintext: bytes, context: bytes) -> bytes: ...
    def unwrap(self, blob: bytes, context: bytes) -> bytes: ...


class _KmsWrapper:
    def __init__(self, name: str, plugin: KmsPlugin):
        self._name = name
        self._plugin = plugin

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        try:
            blob = self._plugin.wrap(secret, context)
        except Exception as exc:
            raise KeyProviderError(f"KMS plug-in {self._name!r} failed to wrap a key: {type(exc).__name__}") from None
        return bytes([WRAP_VERSION_KMS]) + bytes(blob)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        if not blob or blob[0] != WRAP_VERSION_KMS:
            raise WrongKeyError("this data key was not wrapped by a KMS plug-in; open the store with its own KEK")
        try:
            secret = self._plugin.unwrap(blob[1:], context)
        except Exception as exc:
            raise WrongKeyError(
                f"KMS plug-in {self._name!r} could not unwrap a data key ({type(exc).__name__}): "
                "wrong KMS key or a keyring from another store") from None
        return bytes(secret)

    def check_value(self) -> None:
        return None


class Kms(KeyEncryptionKey):
    kind = "kms"

    def __init__(self, name: str, **options):
        self.name = name
        self.options = options

    def load(self) -> KmsPlugin:
        eps = [ep for ep in metadata.entry_points(group="walcrypt.kms") if ep.name == self.name]
        if not eps:
            raise KeyProviderError(
                f"no KMS plug-in named {self.name!r} is installed (entry-point group 'walcrypt.kms')")
        try:
            return eps[0].load()(**self.options)
        except Exception as exc:
            raise KeyProviderError(f"KMS plug-in {self.name!r} failed to start: {type(exc).__name__}: {exc}") from None

    def new_params(self) -> dict:
        return {"kind": self.kind, "plugin": self.name}

    def wrapper(self, params: dict | None) -> Wrapper:
        return _KmsWrapper(self.name, self.load())

    def describe(self) -> str:
        return f"KMS plug-in {self.name}"


# ---------------------------------------------------------------------------
# The keyring
# ---------------------------------------------------------------------------

class SecretKey:
    """32 secret bytes that never show up in repr or str."""

    __slots__ = ("_b",)

    def __init__(self, b: bytes):
        self._b = b

    def __repr__(self) -> str:
        return "<SecretKey redacted>"

    __str__ = __repr__

    @property
    def material(self) -> bytes:
        return self._b


@dataclass
class KeyEntry:
    key_id: bytes
    state: int
    algorithm: int
    purpose: int
    created_ns: int
    state_changed_ns: int
    wrapped: bytes = field(repr=False)

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, f"unknown({self.state})")


def new_key_entry(wrapper: Wrapper, store_id: bytes, *, algorithm: int, purpose: int,
                  state: int) -> tuple[KeyEntry, SecretKey]:
    key_id = os.urandom(16)
    secret = os.urandom(KEY_SIZE)
    now = time.time_ns()
    wrapped = wrapper.wrap(secret, wrap_context(store_id, key_id, purpose))
    return KeyEntry(key_id, state, algorithm, purpose, now, now, wrapped), SecretKey(secret)


def unwrap_entry(wrapper: Wrapper, store_id: bytes, entry: KeyEntry) -> SecretKey:
    if entry.state == DESTROYED:
        from .errors import KeyNotFoundError
        raise KeyNotFoundError(f"key {entry.key_id.hex()} was destroyed; data under it cannot be read")
    secret = wrapper.unwrap(entry.wrapped, wrap_context(store_id, entry.key_id, entry.purpose))
    if len(secret) != KEY_SIZE:
        raise AuthenticationError(None, None, f"key {entry.key_id.hex()} unwrapped to {len(secret)} bytes")
    return SecretKey(secret)
