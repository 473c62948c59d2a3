"""Key-encryption keys (KEKs), data-encryption keys (DEKs) and the keyring.

A KEK never lives in the data directory.  It only wraps DEKs (and the metadata
MAC key); the wrapped blobs live in the LMDB keyring and travel inside every
snapshot.  KEK providers:

* :class:`RawKey` - 32 bytes held by the caller.
* :class:`KeyFile` - a file holding the key (32 raw bytes, 64 hex digits or
  base64); refused when group- or world-accessible, except a root-owned file its
  group may read (0640), PostgreSQL's rule for private key files.
* :class:`Passphrase` - scrypt over a passphrase; the salt and cost parameters
  are stored in the store (they are not secret).
* :class:`EnvKey` - an environment variable holding the key as hex or base64.
* :class:`walcrypt.kms.Kms` - a key service (Vault/OpenBao Transit, a PKCS#11
  token, a KMIP server, or any plug-in of the entry-point group ``walcrypt.kms``).

Local KEKs are never used raw: HKDF derives a wrapping key and a 16-byte check
value from them, so a wrong KEK is reported as :class:`WrongKeyError` before
anything is decrypted or modified.  The check value also names the key to
operators: :func:`kek_fingerprint` (FORMAT.md 8.1) is a short hash of it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import crypto
from .errors import (
    AuthenticationError,
    CorruptionError,
    KeyNotFoundError,
    KeyProviderError,
    SymlinkError,
    UsageError,
    WrongKeyError,
)
from .kekparams import (  # noqa: F401 - the KEK parameters and fingerprints, used as keys.<name>
    FINGERPRINT_DOMAIN,
    FINGERPRINT_SIZE,
    KEK_KINDS,
    KMS_FINGERPRINT_DOMAIN,
    MAX_IDENTITY_FIELDS,
    MAX_IDENTITY_TEXT,
    MAX_KEK_PARAMS_BYTES,
    MAX_PLUGIN_NAME,
    SCRYPT_MAX_MEMORY,
    SCRYPT_MAX_N,
    SCRYPT_MAX_P,
    SCRYPT_MAX_R,
    SCRYPT_MAX_SALT,
    SCRYPT_MIN_SALT,
    SCRYPT_WORK_FACTOR,
    VOLATILE_IDENTITY_FIELDS,
    check_scrypt_costs,
    describe_identity,
    fingerprint_of,
    hex_bytes,
    is_uint,
    kek_fingerprint,
    kms_fingerprint,
    kms_identity_problem,
    load_json_object,
    params_fingerprint,
    parse_kek_params,
    scrypt_memory,
    stable_identity,
    valid_plugin_name,
    validate_kek_params,
)

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
        if blob and blob[0] == WRAP_VERSION_KMS:
            raise WrongKeyError("this data key was wrapped by a key service (KMS); open the store with its KMS key "
                                "(walcrypt.Kms / --kms), not a local key")
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

    def fingerprint(self, params: dict | None = None) -> str | None:
        """The KEK fingerprint (FORMAT.md 8.1); a passphrase needs the store's ``params`` (its salt)."""
        return kek_fingerprint(self.wrapper(params).check_value())

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


def key_file_mode_problem(path: str, mode: int, uid: int) -> str | None:
    """Why a key file of this mode and owner is refused, or None: PostgreSQL's rule for private key files.

    A key file must not be accessible by anyone but its owner (mode 0600 or less), except that a file
    owned by root may also be read by its group (0640 or less: no group write or execute, nothing for
    others) - how a key is deployed for a service that runs under a group of its own.  The refusal
    says what the mode is and what to run."""
    mode = stat.S_IMODE(mode)
    if not mode & 0o077:
        return None
    if uid == 0 and not mode & 0o037:
        return None
    who = "root" if uid == 0 else f"uid {uid}"
    access = []
    if mode & 0o070:
        access.append("its group")
    if mode & 0o007:
        access.append("others")
    fix = f"run 'chmod 600 {path}'"
    if uid == 0:
        if not mode & 0o007 or mode & 0o040:
            fix += f" (or 'chmod 640 {path}' to keep read access for its group)"
        rule = "a root-owned key file may be read by its group at most (0640)"
    else:
        rule = "a key file not owned by root must be 0600 or less"
        if not mode & 0o037:
            fix += (f", or give it to root so its group may keep reading it ('chown root {path}'; a root-owned "
                    "key file may be 0640)")
    return (f"key file {path} is accessible by {' and '.join(access)} (mode {mode:04o}, owner {who}): {rule}; "
            f"{fix}")


class KeyFile(KeyEncryptionKey):
    kind = "file"

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def read(self) -> bytes:
        """The key, after the file's type and mode passed :func:`key_file_mode_problem`.  The checks
        are made on the descriptor that is then read (a name swapped in between is never read), and
        the open never blocks (a FIFO is refused, not waited on)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        except FileNotFoundError:
            raise KeyProviderError(
                f"key file {self.path} does not exist; create one with 'walcrypt keygen {self.path}'") from None
        except PermissionError:
            raise KeyProviderError(f"no permission to read key file {self.path}; run as its owner (or, for a "
                                   "root-owned file of mode 0640, as a member of its group)") from None
        except OSError as exc:
            raise KeyProviderError(f"cannot open key file {self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyProviderError(f"key file {self.path} is not a regular file")
            problem = key_file_mode_problem(self.path, st.st_mode, st.st_uid)
            if problem:
                raise KeyProviderError(problem)
            raw = b""
            while len(raw) < 4096:
                block = os.read(fd, 4096 - len(raw))
                if not block:
                    break
                raw += block
        except PermissionError:
            raise KeyProviderError(f"no permission to read key file {self.path}") from None
        finally:
            os.close(fd)
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

    def __init__(self, passphrase: str | bytes, *, n: int = 1 << 15, r: int = 8, p: int = 1,
                 max_memory: int = SCRYPT_MAX_MEMORY):
        """``n``, ``r``, ``p``: scrypt costs for a new store.  ``max_memory``: the most scrypt may allocate
        (128 * n * r bytes) for this passphrase, new or stored costs alike; raise it explicitly to open
        a store created with costs above the default cap."""
        if isinstance(passphrase, str):
            passphrase = passphrase.encode("utf-8")
        if not passphrase:
            raise UsageError("an empty passphrase is not a key")
        if type(max_memory) is not int or max_memory < 1:
            raise UsageError("max_memory is a positive number of bytes")
        problem = check_scrypt_costs(n, r, p, max_memory=max_memory)
        if problem:
            raise UsageError(f"{problem} (n is a power of two from 2 to 2^22, 1 <= r <= {SCRYPT_MAX_R}, "
                             f"1 <= p <= {SCRYPT_MAX_P}, 128*n*r <= max_memory)")
        self._passphrase = bytes(passphrase)
        self._n, self._r, self._p = n, r, p
        self._max_memory = max_memory

    def new_params(self) -> dict:
        return {"kind": self.kind, "kdf": "scrypt", "salt": os.urandom(16).hex(),
                "n": self._n, "r": self._r, "p": self._p}

    def wrapper(self, params: dict | None) -> Wrapper:
        return _LocalWrapper(self.material(params))

    def material(self, params: dict | None) -> bytes:
        # Callers pass parameters that parse_kek_params / validate_kek_params accepted; they are checked
        # again here because this is where they size an allocation.
        params = validate_kek_params(params, None, what="KEK parameters")
        if not params or params.get("kind") != "passphrase":
            raise WrongKeyError("this store was not created with a passphrase KEK; use the KEK it was created with")
        n, r, p = params["n"], params["r"], params["p"]
        problem = check_scrypt_costs(n, r, p, max_memory=self._max_memory)
        if problem:
            raise CorruptionError(None, None, f"refusing the stored KEK parameters (kek_params): {problem}",
                                  "costs this high come from damage or tampering; if the store was created "
                                  "with them deliberately, open it with Passphrase(..., max_memory=...) raised")
        return Scrypt(salt=bytes.fromhex(params["salt"]), length=KEY_SIZE, n=n, r=r, p=p).derive(self._passphrase)

    def describe(self) -> str:
        return "passphrase"


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
        raise KeyNotFoundError(f"key {entry.key_id.hex()} was destroyed; data under it cannot be read")
    secret = wrapper.unwrap(entry.wrapped, wrap_context(store_id, entry.key_id, entry.purpose))
    if len(secret) != KEY_SIZE:
        raise AuthenticationError(None, None, f"key {entry.key_id.hex()} unwrapped to {len(secret)} bytes")
    return SecretKey(secret)
