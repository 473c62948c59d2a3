"""The ``pkcs11`` KMS plug-in: a non-extractable AES-256 key on a PKCS#11 token (an HSM).

Each data key is encrypted on the token with CKM_AES_GCM: a random 12-byte IV from the host's
CSPRNG, the wrap context (store ID, key ID, purpose) as the associated data, a 128-bit tag.
The blob is ``version (1) || IV (12) || ciphertext || tag (16)``; unwrapping under another
context, with another key, or after any change to the blob fails the tag check.  Random 96-bit
IVs stay far inside GCM's bound for one key (2**32 encryptions): a store wraps a handful of keys.

Options (strings from the command line): ``module`` (the PKCS#11 library; default: the
environment variable ``PKCS11_MODULE``), ``token_label``, ``key_label`` or ``key_id`` (hex of
CKA_ID), and exactly one PIN source: ``pin``, ``pin_env`` (the name of a variable holding it) or
``pin_file``.

Trust and errors (the contract of :mod:`walcrypt.kms`):

* The PIN is held in memory only, never in a message, ``repr`` or log line.  A PIN the token
  refused is not presented again by the same object (tokens lock after a few wrong PINs).
* Only a key that is AES-256, sensitive and non-extractable, and the only secret key with its
  label (or ID) on the token, is used: anything else is a :class:`KeyProviderError`.
* Configuration problems (the module missing or not a PKCS#11 library, no such token or key, a
  wrong or locked PIN) are :class:`KeyProviderError`; a token that cannot answer now (removed,
  device error, lost session, CKR_GENERAL_ERROR from the token) is
  :class:`KeyProviderUnavailableError`, and the session is opened again on the next call; a blob
  that does not open is :class:`WrongKeyError`.  SoftHSM2 reports a GCM tag mismatch as
  CKR_GENERAL_ERROR, so a decryption failing that way is followed by a self-test of the key: if
  the key still encrypts and decrypts, the blob was wrong; otherwise the token is unavailable.

PKCS#11 logs in per application and token, not per session: a second login in the process is
refused (CKR_USER_ALREADY_LOGGED_IN, whatever the PIN) and a logout ends every session's login.
So all :class:`Pkcs11Key` objects of a process that use the same module and token share one
logged-in session (serialised by a lock); a later object's PIN is checked against a salted
digest of the PIN the token accepted.  The session is closed when the last of them is closed.
Other code of the process must not log in to the same token.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import sys
import threading

try:
    import pkcs11 as P
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11 import exceptions as PE
except ImportError as exc:          # Kms() turns this into a KeyProviderError naming the extra
    raise ImportError(f"python-pkcs11 is not installed ({exc}); pip install 'walcrypt[pkcs11]'") from None

from ..errors import KeyProviderError, KeyProviderUnavailableError, WrongKeyError

__all__ = ["Pkcs11Key", "create_key"]

BLOB_VERSION = 1
IV_SIZE = 12
TAG_BITS = 128
KEY_BYTES = 32
_MIN_BLOB = 1 + IV_SIZE + TAG_BITS // 8

# The token could not answer now: retried by walcrypt, the session is dropped and reopened.
_UNAVAILABLE = (PE.DeviceError, PE.DeviceMemory, PE.DeviceRemoved, PE.TokenNotPresent, PE.SessionHandleInvalid,
                PE.SessionClosed, PE.SessionCount, PE.GeneralError, PE.FunctionFailed)
# The key's handle (or the login behind it) went away: look the key up again, once.
_HANDLE_GONE = (PE.ObjectHandleInvalid, PE.KeyHandleInvalid, PE.UserNotLoggedIn)
_PIN_REFUSED = (PE.PinIncorrect, PE.PinInvalid, PE.PinLenRange)
_PIN_UNUSABLE = (PE.PinLocked, PE.PinExpired, PE.UserPinNotInitialized)
_OPTIONS = "module, token_label, key_label or key_id, and one of pin, pin_env, pin_file"


class _Pin:
    """The PIN, kept out of reprs, messages and tracebacks' locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<PIN hidden>"

    __str__ = __repr__


def _name(exc: BaseException) -> str:
    return type(exc).__name__


# ---------------------------------------------------------------------------
# One logged-in session per (module, token) in the process
# ---------------------------------------------------------------------------

_PIN_SALT = os.urandom(32)
_registry_lock = threading.Lock()
_logins: dict[tuple[str, str], "_Login"] = {}


def _pin_tag(pin: _Pin) -> bytes:
    return hmac.new(_PIN_SALT, pin.reveal().encode("utf-8"), hashlib.sha256).digest()


def _load_module(module: str):
    try:
        return P.lib(module)
    except PE.PKCS11Error as exc:
        if type(exc) is PE.PKCS11Error:      # dlopen / C_GetFunctionList failed
            raise KeyProviderError(f"cannot load the PKCS#11 module {module!r}: the file is missing or not a "
                                   f"PKCS#11 library ({str(exc).splitlines()[0][-200:]})") from None
        raise KeyProviderError(f"the PKCS#11 module {module!r} failed to initialise ({_name(exc)}); check its "
                               "configuration (SoftHSM2: the file named by SOFTHSM2_CONF)") from None


def _find_token(lib, label: str):
    """The one token labelled ``label``; a slot that cannot be read makes a missing label an outage."""
    found, broken, labels = [], None, []
    try:
        slots = lib.get_slots()
    except _UNAVAILABLE as exc:
        raise KeyProviderUnavailableError(f"the PKCS#11 module cannot list its slots ({_name(exc)})") from None
    for slot in slots:
        try:
            token = slot.get_token()
        except (PE.TokenNotPresent, PE.TokenNotRecognised):
            continue
        except _UNAVAILABLE as exc:
            broken = exc
            continue
        labels.append(token.label)
        if token.label == label:
            found.append(token)
    if len(found) > 1:
        raise KeyProviderError(f"{len(found)} PKCS#11 tokens are labelled {label!r}; give each token its own label")
    if found:
        return found[0]
    if broken is not None:
        raise KeyProviderUnavailableError(f"no readable PKCS#11 token is labelled {label!r} and a slot did not answer "
                                          f"({_name(broken)}): the token may be removed or failing")
    shown = ", ".join(repr(x) for x in labels if x) or "none"
    raise KeyProviderError(f"no PKCS#11 token is labelled {label!r} (tokens present: {shown})")


class _Login:
    """The process's logged-in session on one token; ``lock`` serialises every call on it."""

    def __init__(self, module: str, token_label: str):
        self.module, self.token_label = module, token_label
        self.lock = threading.RLock()
        self.session = None
        self.pin_tag: bytes | None = None
        self.generation = 0
        self.users = 0

    def open(self, pin: _Pin):
        """The session (opened and logged in if needed) and its generation; call with ``lock`` held."""
        if self.session is not None:
            if not hmac.compare_digest(self.pin_tag, _pin_tag(pin)):
                raise KeyProviderError(f"the PIN for PKCS#11 token {self.token_label!r} is incorrect (it differs "
                                       "from the PIN this process logged in with)")
            return self.session, self.generation
        token = _find_token(_load_module(self.module), self.token_label)
        try:
            session = token.open(user_pin=pin.reveal())
        except _PIN_REFUSED:
            raise _PinRefused(f"the PIN for PKCS#11 token {self.token_label!r} is incorrect (CKR_PIN_INCORRECT)") \
                from None
        except _PIN_UNUSABLE as exc:
            raise KeyProviderError(f"the user PIN of PKCS#11 token {self.token_label!r} cannot be used "
                                   f"({_name(exc)}); the token's security officer must reset it") from None
        except PE.UserAlreadyLoggedIn:
            raise KeyProviderError(f"PKCS#11 token {self.token_label!r} is already logged in by other code of this "
                                   "process; walcrypt needs its own login to check the PIN") from None
        except _UNAVAILABLE as exc:
            raise KeyProviderUnavailableError(f"PKCS#11 token {self.token_label!r} did not answer "
                                              f"({_name(exc)})") from None
        self.session, self.pin_tag = session, _pin_tag(pin)
        self.generation += 1
        return session, self.generation

    def reset(self) -> None:
        """Drop the session (after a device error, or when the last user closes); best effort."""
        session, self.session, self.pin_tag = self.session, None, None
        if session is not None:
            try:
                session.close()          # logs out, then closes
            except Exception:            # noqa: BLE001 - a dead session cannot be closed cleanly
                pass


class _PinRefused(KeyProviderError):
    pass


# ---------------------------------------------------------------------------
# The plug-in
# ---------------------------------------------------------------------------

class Pkcs11Key:
    """A KEK on a PKCS#11 token (the ``pkcs11`` plug-in of ``walcrypt.Kms``); see the module docstring."""

    def __init__(self, *, module: str | None = None, token_label: str | None = None, key_label: str | None = None,
                 key_id: str | None = None, pin: str | None = None, pin_env: str | None = None,
                 pin_file: str | None = None, **unknown):
        if unknown:
            raise KeyProviderError(f"unknown pkcs11 option(s) {', '.join(sorted(unknown))}; the options are {_OPTIONS}")
        module = module or os.environ.get("PKCS11_MODULE")
        if not module:
            raise KeyProviderError("pkcs11 needs the option module (the PKCS#11 library's path) or PKCS11_MODULE")
        if not os.path.isfile(module):
            raise KeyProviderError(f"the PKCS#11 module {module!r} does not exist or is not a file")
        if not token_label:
            raise KeyProviderError("pkcs11 needs the option token_label (the token's label)")
        if (key_label is None) == (key_id is None) or key_label == "" or key_id == "":
            raise KeyProviderError("pkcs11 needs exactly one of the options key_label and key_id (hex of CKA_ID)")
        self._key_id: bytes | None
        if key_id is not None:
            text = key_id[2:] if key_id.lower().startswith("0x") else key_id
            try:
                self._key_id = bytes.fromhex(text)
            except ValueError:
                raise KeyProviderError(f"pkcs11 option key_id must be hex digits, not {key_id!r}") from None
            if not self._key_id:
                raise KeyProviderError("pkcs11 option key_id is empty")
        else:
            self._key_id = None
        self.module = os.path.realpath(module)      # one loaded library per file, however it is named
        self.token_label = str(token_label)
        self.key_label = key_label
        self._pin = _read_pin(pin, pin_env, pin_file)
        self._pin_refused = False
        self._lock = threading.Lock()
        self._login: _Login | None = None
        self._key = None
        self._key_generation = -1

    # -- naming ---------------------------------------------------------------
    def _key_name(self) -> str:
        return f"label {self.key_label!r}" if self._key_id is None else f"ID {self._key_id.hex()}"

    def identity(self) -> dict:
        """Names the token and the key, from the options alone (no token access, nothing secret)."""
        if self._key_id is None:
            return {"token": self.token_label, "key": self.key_label}
        return {"token": self.token_label, "key_id": self._key_id.hex()}

    def __repr__(self) -> str:
        return f"<Pkcs11Key token={self.token_label!r} key {self._key_name()}>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Pkcs11Key holds a PIN and is not pickled")

    # -- session and key ------------------------------------------------------
    def _acquire(self) -> _Login:
        with self._lock:
            if self._login is None:
                with _registry_lock:
                    login = _logins.setdefault((self.module, self.token_label), _Login(self.module, self.token_label))
                    login.users += 1
                self._login = login
            return self._login

    def _find_key(self, session):
        attrs = {Attribute.CLASS: ObjectClass.SECRET_KEY}
        attrs[Attribute.LABEL if self._key_id is None else Attribute.ID] = \
            self.key_label if self._key_id is None else self._key_id
        keys = list(session.get_objects(attrs))
        where = f"on PKCS#11 token {self.token_label!r}"
        if not keys:
            session.token.slot.get_token()      # a token that stopped answering raises (an outage), not "no key"
            raise KeyProviderError(f"no secret key with {self._key_name()} {where}; create it first "
                                   "(python -m walcrypt.kms.pkcs11 --help)")
        if len(keys) > 1:
            raise KeyProviderError(f"{len(keys)} secret keys have {self._key_name()} {where}; the KEK must be "
                                   "named unambiguously")
        key = keys[0]
        try:
            facts = {a: key[a] for a in (Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.EXTRACTABLE,
                                         Attribute.SENSITIVE, Attribute.ENCRYPT, Attribute.DECRYPT)}
        except (PE.AttributeTypeInvalid, PE.AttributeSensitive) as exc:
            raise KeyProviderError(f"the key with {self._key_name()} {where} does not describe itself "
                                   f"({_name(exc)})") from None
        if facts[Attribute.KEY_TYPE] != KeyType.AES or facts[Attribute.VALUE_LEN] != KEY_BYTES:
            raise KeyProviderError(f"the key with {self._key_name()} {where} is not an AES-256 key")
        if facts[Attribute.EXTRACTABLE] or not facts[Attribute.SENSITIVE]:
            raise KeyProviderError(f"the key with {self._key_name()} {where} is extractable or not sensitive; a KEK "
                                   "must never leave the token (CKA_EXTRACTABLE false, CKA_SENSITIVE true)")
        if not (facts[Attribute.ENCRYPT] and facts[Attribute.DECRYPT]):
            raise KeyProviderError(f"the key with {self._key_name()} {where} may not encrypt and decrypt "
                                   "(CKA_ENCRYPT, CKA_DECRYPT)")
        return key

    def _with_key(self, op):
        """Run ``op(key)`` on the token: the session opened lazily, the key looked up again once if its
        handle went away, the session dropped on an outage (reopened by the next call)."""
        if self._pin_refused:
            raise KeyProviderError(f"the token refused this PIN for {self.token_label!r} before; it is not "
                                   "presented again (fix the PIN option)")
        login = self._acquire()
        with login.lock:
            for attempt in range(2):
                try:
                    session, generation = login.open(self._pin)
                    if self._key is None or self._key_generation != generation:
                        self._key, self._key_generation = self._find_key(session), generation
                    return op(self._key)
                except _PinRefused:
                    self._pin_refused = True
                    raise
                except _HANDLE_GONE as exc:
                    self._key = None
                    if isinstance(exc, PE.UserNotLoggedIn):
                        login.reset()
                    if attempt:
                        raise KeyProviderUnavailableError(f"PKCS#11 token {self.token_label!r} lost the key's "
                                                          f"handle twice ({_name(exc)})") from None
                except _UNAVAILABLE as exc:
                    self._key = None
                    login.reset()
                    raise KeyProviderUnavailableError(f"PKCS#11 token {self.token_label!r} did not answer "
                                                      f"({_name(exc)}); the session will be reopened") from None
                except KeyProviderUnavailableError:
                    self._key = None
                    login.reset()
                    raise
                except (KeyProviderError, WrongKeyError):
                    raise
                except PE.PKCS11Error as exc:
                    raise KeyProviderError(f"PKCS#11 token {self.token_label!r} refused the call "
                                           f"({_name(exc)})") from None
        raise AssertionError("unreachable")

    # -- the plug-in protocol -------------------------------------------------
    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        iv = os.urandom(IV_SIZE)
        param = P.GCMParams(iv, bytes(context), TAG_BITS)
        sealed = self._with_key(lambda key: key.encrypt(bytes(plaintext), mechanism=Mechanism.AES_GCM,
                                                        mechanism_param=param))
        return bytes([BLOB_VERSION]) + iv + bytes(sealed)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        blob = bytes(blob)
        if len(blob) < _MIN_BLOB or blob[0] != BLOB_VERSION:
            raise WrongKeyError("this blob was not wrapped by the pkcs11 plug-in (wrong version byte or length)")
        param = P.GCMParams(blob[1:1 + IV_SIZE], bytes(context), TAG_BITS)

        def open_blob(key):
            try:
                return key.decrypt(blob[1 + IV_SIZE:], mechanism=Mechanism.AES_GCM, mechanism_param=param)
            except (PE.EncryptedDataInvalid, PE.EncryptedDataLenRange):
                raise WrongKeyError(self._wrong()) from None
            except (PE.GeneralError, PE.FunctionFailed):
                _self_test(key)          # raises an outage error if the key itself no longer works
                raise WrongKeyError(self._wrong()) from None

        return bytes(self._with_key(open_blob))

    def _wrong(self) -> str:
        return (f"the PKCS#11 key with {self._key_name()} on token {self.token_label!r} does not open this data "
                "key (another key, another store's keyring, or a damaged blob)")

    def close(self) -> None:
        """Release this object's share of the token's session (the last one closes it)."""
        with self._lock:
            login, self._login, self._key = self._login, None, None
        if login is None:
            return
        with _registry_lock:          # held while the last user logs out: a new login waits for it
            login.users -= 1
            if login.users == 0:
                if _logins.get((login.module, login.token_label)) is login:
                    del _logins[(login.module, login.token_label)]
                with login.lock:
                    login.reset()


def _self_test(key) -> None:
    """Encrypt and decrypt a random block under ``key``: an exception here means the token, not the blob."""
    iv, probe = os.urandom(IV_SIZE), os.urandom(KEY_BYTES)
    param = P.GCMParams(iv, b"walcrypt/pkcs11/self-test", TAG_BITS)
    sealed = key.encrypt(probe, mechanism=Mechanism.AES_GCM, mechanism_param=param)
    if bytes(key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=param)) != probe:
        raise PE.DeviceError("the key's self-test returned other bytes")


def _read_pin(pin, pin_env, pin_file) -> _Pin:
    given = [n for n, v in (("pin", pin), ("pin_env", pin_env), ("pin_file", pin_file)) if v is not None]
    if len(given) != 1:
        raise KeyProviderError(f"pkcs11 needs exactly one of the options pin, pin_env (a variable's name) and "
                               f"pin_file; {'none' if not given else ' and '.join(given)} given")
    if pin_env is not None:
        value = os.environ.get(pin_env)
        if value is None:
            raise KeyProviderError(f"pkcs11 option pin_env names the environment variable {pin_env!r}, "
                                   "which is not set")
    elif pin_file is not None:
        try:
            with open(pin_file, encoding="utf-8") as f:
                value = f.read(4096)
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyProviderError(f"cannot read the pkcs11 pin_file {pin_file!r} ({_name(exc)})") from None
        value = value.rstrip("\r\n")
    else:
        value = str(pin)
    if not value:
        raise KeyProviderError(f"the PIN given by the pkcs11 option {given[0]} is empty")
    return _Pin(value)


# ---------------------------------------------------------------------------
# Creating the KEK on a token (setup)
# ---------------------------------------------------------------------------

def create_key(module: str, token_label: str, key_label: str, pin: str, key_id: bytes | None = None) -> None:
    """Generate the KEK on the token: an AES-256 token object, private, sensitive, non-extractable,
    not modifiable, allowed to encrypt and decrypt only.  Refuses if a key with the label exists.
    Do not call it while a :class:`Pkcs11Key` of this process is logged in to the same token."""
    token = _find_token(_load_module(os.path.realpath(module)), token_label)
    try:
        session = token.open(rw=True, user_pin=pin)
    except _PIN_REFUSED:
        raise KeyProviderError(f"the PIN for PKCS#11 token {token_label!r} is incorrect") from None
    try:
        if list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: key_label})):
            raise KeyProviderError(f"token {token_label!r} already holds a secret key labelled {key_label!r}")
        session.generate_key(KeyType.AES, 256, label=key_label, id=key_id, store=True, template={
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.MODIFIABLE: False, Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True, Attribute.WRAP: False, Attribute.UNWRAP: False,
            Attribute.SIGN: False, Attribute.VERIFY: False, Attribute.DERIVE: False})
    finally:
        session.close()


def main(argv=None) -> int:
    """``python -m walcrypt.kms.pkcs11``: create the KEK (the PIN comes from an environment variable)."""
    ap = argparse.ArgumentParser(prog="python -m walcrypt.kms.pkcs11",
                                 description="Generate a non-extractable AES-256 KEK on a PKCS#11 token.")
    ap.add_argument("--module", default=os.environ.get("PKCS11_MODULE"), help="the PKCS#11 library")
    ap.add_argument("--token-label", required=True)
    ap.add_argument("--key-label", required=True)
    ap.add_argument("--key-id", help="hex of CKA_ID (optional)")
    ap.add_argument("--pin-env", required=True, metavar="NAME", help="environment variable holding the user PIN")
    a = ap.parse_args(argv)
    pin = os.environ.get(a.pin_env)
    if not a.module or not pin:
        ap.error("--module (or PKCS11_MODULE) and a set --pin-env variable are needed")
    try:
        create_key(a.module, a.token_label, a.key_label, pin, bytes.fromhex(a.key_id) if a.key_id else None)
    except (KeyProviderError, KeyProviderUnavailableError, PE.PKCS11Error, ValueError) as exc:
        print(f"error: {str(exc) or _name(exc)}", file=sys.stderr)
        return 1
    print(f"created AES-256 key {a.key_label!r} on token {a.token_label!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
