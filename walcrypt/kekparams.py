"""The KEK parameters a store keeps (``store/kek_params``, FORMAT.md 8.1) - their bounds, parsed and
checked before they size or steer anything, since they are read before anything can be
authenticated - and the fingerprints that name a KEK to operators: a local KEK's from its check
value, a key service's key from its identity.  Re-exported by walcrypt.keys."""

from __future__ import annotations

import hashlib
import json
import re

from .errors import (
    WIPE_ADVICE,
    CorruptionError,
    UnsupportedFormatError,
)

# Bounds of the stored KEK parameters (FORMAT.md 8.1).  Everything read from ``store/kek_params`` or from
# a keyring bundle is checked against them before it sizes or steers anything.
KEK_KINDS = ("raw", "file", "env", "passphrase", "kms")
MAX_KEK_PARAMS_BYTES = 4096           # the JSON text of store/kek_params
SCRYPT_MAX_N = 1 << 22                # format range of the cost parameters
SCRYPT_MAX_R = 32
SCRYPT_MAX_P = 16
SCRYPT_MIN_SALT = 16                  # salt bytes (the writer uses 16)
SCRYPT_MAX_SALT = 64
SCRYPT_WORK_FACTOR = 4               # 128 * n * r * p <= 4 * the memory cap: bounds the CPU time of p lanes
SCRYPT_MAX_MEMORY = 256 << 20         # 128 * n * r bytes: n <= 2^18 at r = 8 (the default n = 2^15 needs 32 MiB)
MAX_PLUGIN_NAME = 128
_PLUGIN_NAME = re.compile(r"[^\s=\[\x00-\x1f\x7f][^=\x00-\x1f\x7f]*(?<!\s)")   # an entry-point name
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")

# ---------------------------------------------------------------------------
# Stored KEK parameters: parsed and bounded before anything uses them
# ---------------------------------------------------------------------------

_PARAMS_HINT = ("the store's KEK parameters (store/kek_params) were damaged or edited; restore the node from a "
                "snapshot export ('walcrypt snapshot restore'), rebuild meta/ ('walcrypt recover'), or "
                + WIPE_ADVICE)


def is_uint(v, limit: int = 1 << 64) -> bool:
    """A JSON integer in [0, limit) (bool is not an integer here)."""
    return type(v) is int and 0 <= v < limit


def hex_bytes(v, *, min_len: int, max_len: int) -> bytes | None:
    """``v`` decoded from hex when it is a string of ``min_len`` .. ``max_len`` bytes, else None."""
    if not isinstance(v, str) or not 2 * min_len <= len(v) <= 2 * max_len or not _HEX.fullmatch(v):
        return None
    return bytes.fromhex(v)


def valid_plugin_name(name) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= MAX_PLUGIN_NAME and name.isprintable()
            and bool(_PLUGIN_NAME.fullmatch(name)))


def scrypt_memory(n: int, r: int) -> int:
    """Bytes scrypt allocates for cost ``n`` and block size ``r`` (the p lanes run one after another)."""
    return 128 * n * r


def check_scrypt_costs(n, r, p, *, max_memory: int = SCRYPT_MAX_MEMORY) -> str | None:
    """What is wrong with scrypt costs (None when they are within the bounds of FORMAT.md 8.1)."""
    for name, v, _hi in (("n", n, SCRYPT_MAX_N), ("r", r, SCRYPT_MAX_R), ("p", p, SCRYPT_MAX_P)):
        if type(v) is not int:
            return f"scrypt {name} is {type(v).__name__}, not an integer"
    if not 2 <= n <= SCRYPT_MAX_N or n & (n - 1):
        return f"scrypt n={n} is not a power of two between 2 and 2^22"
    if not 1 <= r <= SCRYPT_MAX_R:
        return f"scrypt r={r} is outside 1 .. {SCRYPT_MAX_R}"
    if not 1 <= p <= SCRYPT_MAX_P:
        return f"scrypt p={p} is outside 1 .. {SCRYPT_MAX_P}"
    if scrypt_memory(n, r) > max_memory:
        return (f"scrypt n={n} r={r} needs {scrypt_memory(n, r) >> 20} MiB, more than the "
                f"{max_memory >> 20} MiB allowed")
    if scrypt_memory(n, r) * p > SCRYPT_WORK_FACTOR * max_memory:
        # The p lanes run one after another: memory is bounded above, CPU time here.
        return (f"scrypt n={n} r={r} p={p} costs {p} passes over {scrypt_memory(n, r) >> 20} MiB, more than "
                f"{SCRYPT_WORK_FACTOR} passes over the {max_memory >> 20} MiB allowed (seconds of CPU at every open)")
    return None


def validate_kek_params(doc, path: str | None, *, offset: int | None = None, what: str = "store/kek_params",
                        hint: str = _PARAMS_HINT) -> dict | None:
    """The KEK parameters (FORMAT.md 8.1) as read from disk, checked field by field; ``None`` stays None.

    Malformed values are a CorruptionError, a well-formed kind or KDF this version does not know an
    UnsupportedFormatError.  Unknown extra fields are kept (and ignored).  The scrypt costs are held to
    the format's range here; the memory they need is checked again, against the cap of the passphrase
    given, before anything is derived (:meth:`Passphrase.material`)."""
    if doc is None:
        return None

    def bad(detail: str) -> CorruptionError:
        return CorruptionError(path, offset, f"{what}: {detail}", hint)

    if not isinstance(doc, dict):
        raise bad(f"a JSON {type(doc).__name__} where an object was expected")
    kind = doc.get("kind")
    if not isinstance(kind, str) or not 0 < len(kind) <= 32:
        raise bad("the KEK kind is missing or not a short string")
    if kind not in KEK_KINDS:
        raise UnsupportedFormatError(f"{path or '<data>'}: {what}: unknown KEK kind {kind[:32]!r} (written by a "
                                     "newer walcrypt? upgrade walcrypt to read it)")
    if kind == "kms":
        if not valid_plugin_name(doc.get("plugin")):
            raise bad(f"the KMS plug-in name is missing or malformed (at most {MAX_PLUGIN_NAME} printable "
                      "characters, no '=')")
        if "key" in doc:
            problem = kms_identity_problem(doc["key"])
            if problem:
                raise bad(f"the KMS key's identity: {problem}")
        if "version" in doc and not is_uint(doc["version"]):
            raise bad("the KMS key version is not an unsigned 64-bit integer")
    if kind == "passphrase":
        kdf = doc.get("kdf")
        if not isinstance(kdf, str) or not 0 < len(kdf) <= 32:
            raise bad("the key derivation function is missing or not a short string")
        if kdf != "scrypt":
            raise UnsupportedFormatError(f"{path or '<data>'}: {what}: unknown key derivation function "
                                         f"{kdf!r} (written by a newer walcrypt? upgrade walcrypt to read it)")
        if hex_bytes(doc.get("salt"), min_len=SCRYPT_MIN_SALT, max_len=SCRYPT_MAX_SALT) is None:
            raise bad(f"the scrypt salt is not {SCRYPT_MIN_SALT} .. {SCRYPT_MAX_SALT} bytes of hex")
        problem = check_scrypt_costs(doc.get("n"), doc.get("r"), doc.get("p"), max_memory=1 << 64)
        if problem:
            raise bad(problem)
    return doc


def load_json_object(raw: bytes, max_bytes: int, bad) -> dict:
    """A JSON object read from disk, bounded before it is parsed: ``bad(detail)`` makes the error to raise
    for an oversized record, text that is not JSON (or nests too deep), or a JSON value that is not an object."""
    if len(raw) > max_bytes:
        raise bad(f"{len(raw)} bytes, more than {max_bytes}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        raise bad("not valid JSON") from None
    if not isinstance(doc, dict):
        raise bad(f"a JSON {type(doc).__name__} where an object was expected")
    return doc


def parse_kek_params(raw: bytes | None, path: str | None) -> dict | None:
    """``store/kek_params`` (UTF-8 JSON, at most MAX_KEK_PARAMS_BYTES) parsed and validated; None if absent."""
    if raw is None:
        return None
    doc = load_json_object(raw, MAX_KEK_PARAMS_BYTES,
                           lambda detail: CorruptionError(path, None, f"store/kek_params: {detail}", _PARAMS_HINT))
    return validate_kek_params(doc, path)



# The KEK fingerprint (FORMAT.md 8.1): a short, stable, non-secret name for a local KEK, computed from the
# check value alone.  Whoever can compute it from a candidate key can compute the check value too, so it
# helps a guesser no more than store/kek_check does (and for a passphrase each guess still costs scrypt
# under the store's salt); it never changes stored bytes.
FINGERPRINT_DOMAIN = b"walcrypt/v1/kek-fingerprint"
FINGERPRINT_SIZE = 8


def kek_fingerprint(check_value: bytes | None) -> str | None:
    """16 hex digits: SHA-256(domain || check value), cut to 8 bytes.  None when there is no check value
    (a KMS-held KEK)."""
    if not check_value:
        return None
    return hashlib.sha256(FINGERPRINT_DOMAIN + bytes(check_value)).digest()[:FINGERPRINT_SIZE].hex()


def fingerprint_of(kek, params: dict | None = None) -> str | None:
    """The fingerprint of the KEK a provider yields (a passphrase needs the store's ``params``: its salt)."""
    return kek.fingerprint(params)


# A KMS-held key has no check value: its fingerprint names the key instead - the plug-in and the
# identity it reports (FORMAT.md 8.1), less its version, so a new version of the same key keeps it.
KMS_FINGERPRINT_DOMAIN = b"walcrypt/v1/kms-key-fingerprint"
MAX_IDENTITY_FIELDS = 16
MAX_IDENTITY_TEXT = 256
VOLATILE_IDENTITY_FIELDS = ("version",)


def kms_identity_problem(ident) -> str | None:
    """Why ``ident`` is not a valid KMS key identity (a flat JSON object of at most 16 fields, each a
    short string or an unsigned integer), or None."""
    if not isinstance(ident, dict):
        return f"a JSON {type(ident).__name__} where an object was expected"
    if len(ident) > MAX_IDENTITY_FIELDS:
        return f"{len(ident)} fields, more than {MAX_IDENTITY_FIELDS}"
    for k, v in ident.items():
        if not isinstance(k, str) or not 0 < len(k) <= 32 or not k.isprintable():
            return "a field name that is not a short printable string"
        if isinstance(v, str):
            # printable only: no C0 or C1 control character, no DEL (inspect prints these values to a
            # terminal, and they are read from disk unauthenticated)
            if len(v) > MAX_IDENTITY_TEXT or not v.isprintable():
                return f"field {k!r} is longer than {MAX_IDENTITY_TEXT} characters or holds unprintable characters"
        elif not is_uint(v):
            return f"field {k!r} is neither a short string nor an unsigned integer"
    return None


def stable_identity(ident: dict | None) -> dict:
    """The fields of a KMS identity that name the key (not its version)."""
    return {k: v for k, v in (ident or {}).items() if k not in VOLATILE_IDENTITY_FIELDS}


def describe_identity(ident: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(stable_identity(ident).items())) or "(unnamed)"


def kms_fingerprint(plugin: str, ident: dict | None) -> str | None:
    """16 hex digits naming a KMS-held key: SHA-256(domain || plug-in || 0 || canonical identity JSON)."""
    if ident is None:
        return None
    text = json.dumps(stable_identity(ident), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(KMS_FINGERPRINT_DOMAIN + plugin.encode() + b"\0" + text.encode()).digest()[:8].hex()


def params_fingerprint(params: dict | None, check: bytes | None) -> str | None:
    """The fingerprint of the KEK a store or file needs, from what it stores (never a secret)."""
    if params and params.get("kind") == "kms":
        return kms_fingerprint(params.get("plugin", ""), params.get("key")) if "key" in params else None
    return kek_fingerprint(check)
