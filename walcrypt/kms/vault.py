"""``vault-transit``: a KEK held as a HashiCorp Vault or OpenBao Transit key (through ``hvac``).

Options (keyword arguments; values may be strings, as ``--kms-option K=V`` gives them):

* ``key`` - the Transit key's name (required); ``mount`` - the Transit engine's path (``transit``);
* ``addr`` - the server's URL (else ``VAULT_ADDR``, then ``BAO_ADDR``);
* ``token`` (else ``VAULT_TOKEN``, then ``BAO_TOKEN``), or AppRole: ``role_id`` with ``secret_id``
  (or ``secret_id_env``, the name of an environment variable holding it) and ``approle_mount``
  (``approle``); AppRole is used when ``role_id`` is given;
* ``namespace`` (else ``VAULT_NAMESPACE``), ``ca_cert`` - a CA bundle for TLS (else ``VAULT_CACERT``),
  ``timeout`` - seconds per HTTP request (5).

Wrapping is Transit ``encrypt``, unwrapping ``decrypt``; the blob is Vault's ciphertext string
(``vault:vN:...``) as ASCII bytes.  Nothing talks to the server before the first wrap, unwrap or
version read, so :meth:`VaultTransit.identity` (``mount``, ``key``, ``namespace`` when set) is
local.  :meth:`key_version` reads the key's ``latest_version`` (the policy needs ``read`` on
``MOUNT/keys/KEY``); :meth:`rewrap` is Transit ``rewrap`` to the newest version, which never
returns the plaintext.

Binding the context (store ID, key ID, purpose).  The plaintext sent to ``encrypt`` is
``SHA-256(domain || context) || key``: 32 bytes naming the context, then the data key.  Transit's
AES-GCM seals both, so nobody without the Transit key can change the tag; ``unwrap`` compares it
(in constant time) with the tag of the context it was asked for and raises :class:`WrongKeyError`
on a mismatch.  The same tag also goes as Transit's ``context``: it selects the derived key when
the Transit key was created with ``derived=true`` and is ignored otherwise.  Transit's
``associated_data`` (which OpenBao 2.x accepts on encrypt and decrypt for AEAD key types such as
aes256-gcm96) is deliberately not used: ``rewrap`` has no such parameter, so a blob sealed with
associated data cannot be re-wrapped on the server, and binding the context in the plaintext keeps
key rotation without any plaintext leaving the service.

Errors (the contract of :mod:`walcrypt.kms`): an unreachable server, a timeout, 5xx, a sealed or
standby server, 429, or any other unexpected HTTP status (412 from a standby that has not caught up)
-> :class:`KeyProviderUnavailableError` (retried by walcrypt, boundedly); 401/403 ->
:class:`KeyProviderError` (an AppRole login is renewed once first: its token may have expired); a
missing key or mount -> :class:`KeyProviderError` saying how to create it; a blob that does not
authenticate (``message authentication failed``, ``invalid ciphertext``, a wrong tag) ->
:class:`WrongKeyError`.  No message or repr carries the token or the secret ID.

Caution: Transit's ``encrypt`` creates a missing key when the token may ``create`` on
``MOUNT/encrypt/KEY``.  Grant only ``update`` there (the README's policy) so a misspelled key name is
refused instead of quietly becoming a new key; walcrypt also reads the key's version (``read`` on
``MOUNT/keys/KEY``) when a store is created or re-keyed, which fails for a missing key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import threading

from ..errors import KeyProviderError, KeyProviderUnavailableError, WrongKeyError

try:
    import hvac
    import hvac.exceptions as hx
    import requests
except ImportError as exc:                 # reported by walcrypt.Kms as "install the extra"
    raise ImportError(f"the vault-transit KMS plug-in needs hvac ({exc}); pip install 'walcrypt[vault]'") from exc

__all__ = ["VaultTransit", "TAG_DOMAIN"]

TAG_DOMAIN = b"walcrypt/v1/vault-transit-context\0"
TAG_SIZE = 32
DEFAULT_TIMEOUT = 5.0
MAX_BLOB = 64 * 1024


_HTTP_STATUS = {hx.InvalidRequest: "HTTP 400", hx.Unauthorized: "HTTP 401", hx.Forbidden: "HTTP 403",
                hx.InvalidPath: "HTTP 404 (not found)", hx.RateLimitExceeded: "HTTP 429",
                hx.InternalServerError: "HTTP 500", hx.VaultNotInitialized: "HTTP 501 (not initialised)",
                hx.BadGateway: "HTTP 502", hx.VaultDown: "HTTP 503"}


def context_tag(context: bytes) -> bytes:
    """The 32 bytes that bind a wrapped key to its context."""
    return hashlib.sha256(TAG_DOMAIN + bytes(context)).digest()


def _text(value, name: str, *, required: bool = False) -> str | None:
    if value is None or value == "":
        if required:
            raise KeyProviderError(f"vault-transit needs the option {name!r}")
        return None
    if not isinstance(value, str):
        raise KeyProviderError(f"vault-transit option {name!r} must be a string, not {type(value).__name__}")
    if any(ord(c) < 32 for c in value) or len(value) > 1024:
        raise KeyProviderError(f"vault-transit option {name!r} holds control characters or is too long")
    return value


def _env(*names: str) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


class VaultTransit:
    """A Transit key as a walcrypt KEK (see the module docstring for options, binding and errors)."""

    def __init__(self, *, key=None, mount="transit", addr=None, token=None, namespace=None, ca_cert=None,
                 role_id=None, secret_id=None, secret_id_env=None, approle_mount="approle",
                 timeout=DEFAULT_TIMEOUT):
        self.key = _text(key, "key", required=True)
        self.mount = (_text(mount, "mount") or "transit").strip("/")
        if not self.mount or "/" in self.key:
            raise KeyProviderError("vault-transit: 'mount' must be a path and 'key' a key name without '/'")
        self.addr = _text(addr, "addr") or _env("VAULT_ADDR", "BAO_ADDR")
        if not self.addr:
            raise KeyProviderError("vault-transit needs the server's address: the option 'addr' "
                                   "(--kms-option addr=https://HOST:8200) or the environment variable VAULT_ADDR")
        if not self.addr.startswith(("http://", "https://")):
            raise KeyProviderError("vault-transit: 'addr' must be an http:// or https:// URL")
        self.namespace = _text(namespace, "namespace") or _env("VAULT_NAMESPACE", "BAO_NAMESPACE")
        self.ca_cert = _text(ca_cert, "ca_cert") or _env("VAULT_CACERT", "BAO_CACERT")
        if self.ca_cert is not None and not os.path.exists(self.ca_cert):
            raise KeyProviderError(f"vault-transit: the CA bundle {self.ca_cert!r} (ca_cert / VAULT_CACERT) "
                                   "does not exist")
        try:
            self.timeout = float(timeout)
        except (TypeError, ValueError):
            raise KeyProviderError("vault-transit: 'timeout' is a number of seconds") from None
        if not 0 < self.timeout <= 600:
            raise KeyProviderError("vault-transit: 'timeout' is a number of seconds from 0 to 600")
        self.approle_mount = (_text(approle_mount, "approle_mount") or "approle").strip("/")
        self._role_id = _text(role_id, "role_id")
        secret_id = _text(secret_id, "secret_id")
        env_name = _text(secret_id_env, "secret_id_env")
        if self._role_id is not None:
            if secret_id is None and env_name is not None:
                secret_id = os.environ.get(env_name) or None
                if secret_id is None:
                    raise KeyProviderError(f"vault-transit: the environment variable {env_name!r} "
                                           "(secret_id_env) is not set or empty")
            if secret_id is None:
                raise KeyProviderError("vault-transit: AppRole needs a secret ID: the option 'secret_id' or "
                                       "'secret_id_env' (the name of an environment variable holding it)")
            self._secret_id = secret_id
            self._token = None
        else:
            if secret_id is not None or env_name is not None:
                raise KeyProviderError("vault-transit: 'secret_id' needs 'role_id' (AppRole)")
            self._secret_id = None
            self._token = _text(token, "token") or _env("VAULT_TOKEN", "BAO_TOKEN")
            if not self._token:
                raise KeyProviderError("vault-transit needs credentials: the option 'token' or the environment "
                                       "variable VAULT_TOKEN, or AppRole's 'role_id' and 'secret_id' "
                                       "(or 'secret_id_env')")
        self._lock = threading.RLock()          # one request at a time on the shared HTTP session
        self._client = None

    # ------------------------------------------------------------------ description, never secrets
    def __repr__(self) -> str:
        auth = "approle" if self._role_id is not None else "token"
        return f"<VaultTransit {self.mount}/keys/{self.key} at {self.addr} ({auth})>"

    __str__ = __repr__

    def identity(self) -> dict:
        ident = {"mount": self.mount, "key": self.key}
        if self.namespace:
            ident["namespace"] = self.namespace
        return ident

    # ------------------------------------------------------------------ the connection
    def _connect(self):
        if self._client is None:
            client = hvac.Client(url=self.addr, token=self._token or "", namespace=self.namespace,
                                 verify=self.ca_cert if self.ca_cert else True, timeout=self.timeout)
            if self._role_id is not None:
                self._login(client)
            self._client = client
        return self._client

    def _login(self, client) -> None:
        try:
            client.auth.approle.login(role_id=self._role_id, secret_id=self._secret_id,
                                      mount_point=self.approle_mount)
        except Exception as exc:
            raise self._mapped(exc, "log in with AppRole", login=True) from None

    def _request(self, what: str, fn, *, unwrapping: bool = False):
        """Run ``fn(client)`` under the lock, mapping every failure to walcrypt's error contract."""
        with self._lock:
            relogged = False
            while True:
                try:
                    return fn(self._connect())
                except KeyProviderError:
                    raise
                except (hx.Forbidden, hx.Unauthorized) as exc:
                    # An AppRole token can expire while a store is open: log in again, once.
                    if self._role_id is not None and not relogged and self._client is not None:
                        relogged = True
                        self._login(self._client)
                        continue
                    raise self._mapped(exc, what, unwrapping=unwrapping) from None
                except Exception as exc:
                    raise self._mapped(exc, what, unwrapping=unwrapping) from None

    def _mapped(self, exc: BaseException, what: str, *, unwrapping: bool = False, login: bool = False):
        where = f"{self.mount}/keys/{self.key}"
        detail = self._clean(exc)
        if isinstance(exc, requests.exceptions.SSLError):
            return KeyProviderError(f"vault-transit could not {what}: TLS to {self.addr} failed ({detail}); "
                                    "give the server's CA bundle with ca_cert= or VAULT_CACERT")
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                            TimeoutError, hx.VaultDown, hx.InternalServerError, hx.BadGateway,
                            hx.RateLimitExceeded, hx.VaultNotInitialized, hx.PreconditionFailed)):
            if isinstance(exc, hx.VaultDown):
                detail = f"sealed or in standby: {detail}"
            return KeyProviderUnavailableError(f"vault-transit could not {what} at {self.addr}: {detail}")
        if isinstance(exc, (hx.UnexpectedError, requests.exceptions.RequestException, json.JSONDecodeError)):
            # an unexpected status, a connection broken part-way through the answer, an answer that
            # is not JSON (a proxy's page): the service did not answer, which is not a wrong key
            return KeyProviderUnavailableError(f"vault-transit could not {what} at {self.addr}: {detail}")
        if isinstance(exc, (hx.Forbidden, hx.Unauthorized)):
            who = (f"the AppRole login at auth/{self.approle_mount} (check role_id and secret_id)" if login or
                   self._role_id is not None else "the token (token= or VAULT_TOKEN)")
            return KeyProviderError(f"vault-transit could not {what}: permission denied for {who}; its policy "
                                    f"needs update on {self.mount}/encrypt/{self.key}, {self.mount}/decrypt/"
                                    f"{self.key}, {self.mount}/rewrap/{self.key} and read on {where} ({detail})")
        if login:
            return KeyProviderError(f"vault-transit could not {what} at auth/{self.approle_mount}: {detail}")
        low = detail.lower()
        if isinstance(exc, hx.InvalidPath) or "key not found" in low or "no handler for route" in low:
            return KeyProviderError(f"vault-transit could not {what}: no Transit key {where} ({detail}); create "
                                    f"it with 'bao write -f {self.mount}/keys/{self.key}' (vault write ...), after "
                                    f"'bao secrets enable -path={self.mount} transit' if the engine is not mounted")
        if isinstance(exc, hx.InvalidRequest) and (unwrapping or "authentication failed" in low
                                                    or "invalid ciphertext" in low or "decrypt" in low):
            return WrongKeyError(f"vault-transit: the wrapped key does not open under Transit key {where} "
                                 f"({detail}): another key, or a blob of another store or tampered with")
        if isinstance(exc, hx.VaultError):
            return KeyProviderError(f"vault-transit could not {what} with {where}: {detail}")
        if unwrapping:
            return WrongKeyError(f"vault-transit could not {what} with {where}: {type(exc).__name__}")
        return KeyProviderError(f"vault-transit could not {what} with {where}: {type(exc).__name__}: {detail}")

    def _clean(self, exc: BaseException) -> str:
        """The error's first line, without the server's URL noise and never a secret."""
        if isinstance(exc, hx.VaultError):
            text = ", ".join(map(str, exc.errors)) if exc.errors else (exc.args[0] if exc.args else None)
            text = str(text) if text else _HTTP_STATUS.get(type(exc), type(exc).__name__)
        elif isinstance(exc, requests.exceptions.Timeout):
            text = f"no answer within {self.timeout:g} s ({type(exc).__name__})"
        elif isinstance(exc, requests.exceptions.ConnectionError):
            found = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
            text = f"cannot connect ({found.group(0).strip() if found else type(exc).__name__})"
        else:
            text = str(exc) or type(exc).__name__
        text = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
        for secret in (self._token, self._secret_id):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text

    # ------------------------------------------------------------------ the plug-in interface
    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        tag = context_tag(context)
        sealed = base64.b64encode(tag + bytes(plaintext)).decode()
        res = self._request("wrap a key", lambda c: c.secrets.transit.encrypt_data(
            self.key, plaintext=sealed, context=base64.b64encode(tag).decode(), mount_point=self.mount))
        return self._ciphertext(res, "encrypt")

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        text = self._blob_text(blob)
        tag = context_tag(context)
        res = self._request("unwrap a key", lambda c: c.secrets.transit.decrypt_data(
            self.key, ciphertext=text, context=base64.b64encode(tag).decode(), mount_point=self.mount),
            unwrapping=True)
        try:
            opened = base64.b64decode(res["data"]["plaintext"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise KeyProviderUnavailableError(f"vault-transit: the answer from {self.addr} to decrypt is not a "
                                              "Transit answer (no plaintext field): a proxy or another service "
                                              "answered") from None
        if len(opened) < TAG_SIZE or not hmac.compare_digest(opened[:TAG_SIZE], tag):
            raise WrongKeyError(f"vault-transit: the wrapped key opened under {self.mount}/keys/{self.key} but "
                                "belongs to another context (another store, key or purpose)")
        return opened[TAG_SIZE:]

    def rewrap(self, blob: bytes, context: bytes) -> bytes:
        text = self._blob_text(blob)
        tag = context_tag(context)
        res = self._request("re-wrap a key", lambda c: c.secrets.transit.rewrap_data(
            self.key, ciphertext=text, context=base64.b64encode(tag).decode(), mount_point=self.mount),
            unwrapping=True)
        return self._ciphertext(res, "rewrap")

    def key_version(self) -> int:
        res = self._request("read the key's version", lambda c: c.secrets.transit.read_key(
            self.key, mount_point=self.mount))
        try:
            version = res["data"]["latest_version"]
        except (KeyError, TypeError):
            version = None
        if type(version) is not int or version < 1:
            raise KeyProviderError(f"vault-transit: reading {self.mount}/keys/{self.key} gave no latest_version")
        return version

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
            if client is not None:
                client.adapter.close()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _blob_text(blob: bytes) -> str:
        blob = bytes(blob)
        if len(blob) > MAX_BLOB or not blob.startswith(b"vault:v"):
            raise WrongKeyError("vault-transit: this wrapped key is not a Transit ciphertext (vault:vN:...)")
        try:
            return blob.decode("ascii")
        except UnicodeDecodeError:
            raise WrongKeyError("vault-transit: this wrapped key is not a Transit ciphertext") from None

    def _ciphertext(self, res, op: str) -> bytes:
        try:
            text = res["data"]["ciphertext"]
        except (KeyError, TypeError):
            text = None
        if not isinstance(text, str) or not text.startswith("vault:v"):
            raise KeyProviderUnavailableError(f"vault-transit: the answer from {self.addr} to {op} holds no "
                                              "ciphertext: a proxy or another service answered")
        return text.encode("ascii")
