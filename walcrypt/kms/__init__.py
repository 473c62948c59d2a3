"""Key-encryption keys held by a key service: the ``walcrypt.kms`` plug-in interface.

A KMS-held KEK never reaches walcrypt.  The service wraps each data key (and the metadata MAC key)
and unwraps it again at open; walcrypt keeps the unwrapped keys in memory while the store is open,
so reads and writes never wait on the service.  Plug-ins are found by name in the entry-point group
``walcrypt.kms``; walcrypt ships three (FORMAT.md 8.1, README "Key services"):

* ``vault-transit`` (:mod:`walcrypt.kms.vault`) - a HashiCorp Vault or OpenBao Transit key;
* ``pkcs11`` (:mod:`walcrypt.kms.pkcs11`) - a non-extractable AES key on a PKCS#11 token (an HSM);
* ``kmip`` (:mod:`walcrypt.kms.kmip`) - a symmetric key on a KMIP server.

Trust and failure contract (what :class:`KmsWrapper` enforces around every plug-in call):

* A plug-in raises :class:`KeyProviderUnavailableError` when the service cannot be reached or
  cannot answer now (refused, timed out, sealed, a server-side error); walcrypt retries such a call
  with bounded exponential backoff (:class:`Retry`) and then raises it to the caller - an outage is
  never reported as a wrong key or as damage.  ``ConnectionError`` and ``TimeoutError`` count as
  unavailability too.
* ``unwrap`` raises :class:`WrongKeyError` when the blob does not open under this key and context
  (another key, another store, a tampered blob).  Any other exception from ``unwrap`` is taken as
  a wrong key, from ``wrap`` or the factory as a :class:`KeyProviderError` (configuration,
  permission): neither is retried.
* Messages carry no secret: no token, PIN or key bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterator, Protocol, TypeVar, runtime_checkable

from .. import keys as K
from ..errors import KeyProviderError, KeyProviderUnavailableError, UsageError, WalcryptError, WrongKeyError

log = logging.getLogger("walcrypt")

_T = TypeVar("_T")

__all__ = ["Kms", "KmsPlugin", "Retry", "KmsWrapper"]


@runtime_checkable
class KmsPlugin(Protocol):
    """What a plug-in's factory (``factory(**options)``) returns.

    Required: ``wrap(plaintext, context) -> blob`` and ``unwrap(blob, context) -> plaintext``.  The
    ``context`` (store ID, key ID and purpose, FORMAT.md 8.2) must be bound to the blob: unwrapping
    under another context fails.

    Optional, used when present:

    * ``identity() -> dict`` - what names the key, without secrets and without asking the service
      (e.g. ``{"mount": "transit", "key": "node1"}``): stored in ``store/kek_params``, compared at
      open (a different key is a :class:`WrongKeyError` before the service is asked), shown by
      ``inspect`` and hashed into the KEK fingerprint.  At most 16 fields of short strings or
      integers (:func:`walcrypt.keys.validate_kms_identity`).
    * ``key_version() -> int`` - the version new wraps are made under (may ask the service);
      recorded with the identity when a store is created or its KEK rotated.
    * ``rewrap(blob, context) -> blob`` - the same plaintext wrapped under the key's newest
      version, without the plaintext leaving the service (Vault Transit's rewrap).  A KEK
      rotation to the same key of the same plug-in uses it instead of unwrap + wrap.
    * ``close()`` - release sessions and connections.
    """

    def wrap(self, plaintext: bytes, context: bytes) -> bytes: ...
    def unwrap(self, blob: bytes, context: bytes) -> bytes: ...


@dataclass(frozen=True)
class Retry:
    """Bounded exponential backoff for calls a key service could not answer: up to ``attempts``
    calls in all, sleeping ``delay`` seconds after the first failure, doubling up to ``max_delay``."""

    attempts: int = 5
    delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if type(self.attempts) is not int or not 1 <= self.attempts <= 100:
            raise UsageError("Retry.attempts is a whole number of calls from 1 to 100")
        for name in ("delay", "max_delay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
                raise UsageError(f"Retry.{name} is a number of seconds from 0 to 3600")

    def delays(self) -> Iterator[float]:
        """The sleeps between the attempts (attempts - 1 of them)."""
        d = float(self.delay)
        for _ in range(self.attempts - 1):
            yield min(d, self.max_delay)
            d *= 2



NO_RETRY = Retry(attempts=1)


class KmsWrapper:
    """A loaded plug-in as walcrypt's key wrapper: error mapping, retries, the KMS wrap-format byte."""

    remote = True          # its calls leave the process: unwrapped keys are kept while the store is open

    def __init__(self, name: str, plugin: KmsPlugin, retry: Retry, identity: dict | None) -> None:
        self.name = name
        self._plugin = plugin
        self.retry = retry
        self.identity = identity

    def __repr__(self) -> str:
        return f"<KMS wrapper {self.name}>"

    def once(self) -> "KmsWrapper":
        """The same service, asked once with no retries (for a retry that must not wait)."""
        return KmsWrapper(self.name, self._plugin, NO_RETRY, self.identity)

    def _call(self, what: str, fn: Callable[..., _T], *args: Any, retry: Retry | None = None,
              unwrapping: bool = False) -> _T:
        return _call_service(self.name, retry or self.retry, what, fn, *args, unwrapping=unwrapping)

    def wrap(self, secret: bytes, context: bytes) -> bytes:
        blob = self._call("wrap a key", self._plugin.wrap, secret, context)
        return bytes([K.WRAP_VERSION_KMS]) + bytes(blob)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        if not blob or blob[0] != K.WRAP_VERSION_KMS:
            raise WrongKeyError("this data key was not wrapped by a KMS plug-in; open the store with its own KEK")
        return bytes(self._call("unwrap a key", self._plugin.unwrap, bytes(blob[1:]), context, unwrapping=True))

    def can_rewrap(self, old: object) -> bool:
        """Whether keys wrapped by ``old`` can be re-wrapped by this service without unwrapping them."""
        return (isinstance(old, KmsWrapper) and old.name == self.name and hasattr(self._plugin, "rewrap")
                and old.identity is not None and K.stable_identity(old.identity) == K.stable_identity(self.identity))

    def rewrap(self, blob: bytes, context: bytes) -> bytes:
        if not blob or blob[0] != K.WRAP_VERSION_KMS:
            raise WrongKeyError("this data key was not wrapped by a KMS plug-in")
        rewrap: Callable[[bytes, bytes], bytes] | None = getattr(self._plugin, "rewrap", None)
        if rewrap is None:                 # optional: callers ask can_rewrap first
            raise AttributeError(f"KMS plug-in {self.name!r} has no rewrap")
        out = self._call("re-wrap a key", rewrap, bytes(blob[1:]), context, unwrapping=True)
        return bytes([K.WRAP_VERSION_KMS]) + bytes(out)

    def check_value(self) -> None:
        return None

    def close(self) -> None:
        close = getattr(self._plugin, "close", None)
        if close is not None:
            try:
                close()
            except Exception as exc:        # noqa: BLE001 - closing is best effort, and says so
                log.warning("KMS plug-in %s failed to close: %s", self.name, type(exc).__name__)


def _call_service(name: str, retry: Retry, what: str, fn: Callable[..., _T], *args: Any,
                  unwrapping: bool = False) -> _T:
    """``fn(*args)``, a call to the key service ``name``, under the contract of this module: retried
    per ``retry`` while the service is unavailable, then KeyProviderUnavailableError; any other
    failure a WrongKeyError when ``unwrapping``, else a KeyProviderError."""
    last: BaseException | None = None
    delays = list(retry.delays())
    for attempt in range(len(delays) + 1):
        try:
            return fn(*args)
        except (KeyProviderUnavailableError, ConnectionError, TimeoutError) as exc:
            last = exc
        except WalcryptError:
            raise
        except Exception as exc:
            if unwrapping:
                raise WrongKeyError(
                    f"KMS plug-in {name!r} could not unwrap a data key ({type(exc).__name__}): "
                    "wrong KMS key or a keyring from another store") from None
            raise KeyProviderError(f"KMS plug-in {name!r} failed to {what}: "
                                   f"{type(exc).__name__}: {_first_line(exc)}") from None
        if attempt < len(delays):
            log.warning("KMS %s could not %s (%s); retrying in %.1f s", name, what,
                        _first_line(last), delays[attempt])
            time.sleep(delays[attempt])
    raise unavailable(name, what, last, len(delays) + 1)


def unavailable(name: str, what: str, exc: BaseException | None, attempts: int) -> KeyProviderUnavailableError:
    return KeyProviderUnavailableError(
        f"KMS {name!r} could not {what}: unreachable after {attempts} attempt(s) ({_first_line(exc)}). "
        "Nothing was changed; check that the key service is running and reachable from this host "
        "(address, TLS, network), then retry - or raise the retries (Kms(..., retry=Retry(...)), "
        "--kms-retries)")


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    text = str(exc).strip().splitlines()
    return (text[0][:300] if text else type(exc).__name__)


class Kms(K.KeyEncryptionKey):
    """A KEK held by a key service, through the plug-in ``name`` of the entry-point group
    ``walcrypt.kms`` (``vault-transit``, ``pkcs11``, ``kmip`` ship with walcrypt); ``options`` go to
    the plug-in's factory.  ``retry``: how often, and how patiently, a call the service could not
    answer is repeated before :class:`KeyProviderUnavailableError` is raised."""

    kind = "kms"

    def __init__(self, name: str, *, retry: Retry | None = None, **options: Any) -> None:
        if not K.valid_plugin_name(name):
            raise UsageError(f"a KMS plug-in name is 1 .. {K.MAX_PLUGIN_NAME} printable characters without '=' "
                             "(an entry-point name of the group walcrypt.kms)")
        if retry is not None and not isinstance(retry, Retry):
            raise UsageError(f"retry must be a walcrypt.Retry, not {type(retry).__name__}")
        self.name = name
        self.options = options
        self.retry = retry or Retry()
        self._plugin: KmsPlugin | None = None

    def load(self) -> KmsPlugin:
        """The plug-in, started once (its factory may authenticate to the service: retried)."""
        if self._plugin is None:
            eps = [ep for ep in metadata.entry_points(group="walcrypt.kms") if ep.name == self.name]
            if not eps:
                raise KeyProviderError(
                    f"no KMS plug-in named {self.name!r} is installed (entry-point group 'walcrypt.kms'); "
                    "the plug-ins that ship with walcrypt need their extra: pip install 'walcrypt[vault]', "
                    "'walcrypt[pkcs11]' or 'walcrypt[kmip]'")
            try:
                factory = eps[0].load()
            except ImportError as exc:
                raise KeyProviderError(f"KMS plug-in {self.name!r} cannot be loaded ({exc}); install what it "
                                       "needs (for those shipped with walcrypt: its extra, e.g. "
                                       "pip install 'walcrypt[vault]')") from None
            except Exception as exc:
                raise KeyProviderError(f"KMS plug-in {self.name!r} cannot be loaded: {type(exc).__name__}") from None
            # the factory's call, with the error mapping and retries of every plug-in call
            self._plugin = _call_service(self.name, self.retry, "start", lambda: factory(**self.options))
        return self._plugin

    def identity(self) -> dict | None:
        plugin = self.load()
        get = getattr(plugin, "identity", None)
        if get is None:
            return None
        ident = get()
        problem = K.kms_identity_problem(ident)
        if problem:
            raise KeyProviderError(f"KMS plug-in {self.name!r} describes its key badly: {problem}")
        return dict(ident)

    def new_params(self) -> dict:
        params: dict = {"kind": self.kind, "plugin": self.name}
        ident = self.identity()
        if ident is not None:
            params["key"] = ident
            version = getattr(self.load(), "key_version", None)
            if version is not None:
                w = KmsWrapper(self.name, self.load(), self.retry, ident)
                v = w._call("read the key's version", version)
                if K.is_uint(v):
                    params["version"] = v
        return params

    def wrapper(self, params: dict | None) -> KmsWrapper:
        ident = self.identity()
        if params is not None:
            if params.get("plugin") != self.name:
                raise WrongKeyError(f"the store's KEK is held by KMS plug-in {params.get('plugin')!r}, not "
                                    f"{self.name!r}; open it with the KEK it was created or last re-keyed with")
            stored = params.get("key")
            if stored is not None and ident is not None and K.stable_identity(stored) != K.stable_identity(ident):
                raise WrongKeyError(f"the store's KEK is the KMS key {K.describe_identity(stored)}, not "
                                    f"{K.describe_identity(ident)}; open it with the key it was created or last "
                                    "re-keyed with")
        return KmsWrapper(self.name, self.load(), self.retry, ident)

    def fingerprint(self, params: dict | None = None) -> str | None:
        ident = self.identity()
        return K.kms_fingerprint(self.name, ident) if ident is not None else None

    def describe(self) -> str:
        return f"KMS plug-in {self.name}"
