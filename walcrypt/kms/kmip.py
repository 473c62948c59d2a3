"""The ``kmip`` KMS plug-in: a symmetric AES key on a KMIP server (PyKMIP encodes the messages).

Options (strings are accepted, as they arrive from ``--kms-option K=V``):

* ``host`` - the server's name or address; ``port`` - default 5696;
* ``key_id`` - the KMIP Unique Identifier of an Active AES key (256 bits recommended) whose
  Cryptographic Usage Mask allows Encrypt and Decrypt;
* ``client_cert``, ``client_key`` - PEM files of this node's TLS client certificate and key (the
  server authenticates the node by them; PyKMIP's server requires the clientAuth extended key
  usage and takes the certificate's common name as the owner of the objects it creates);
* ``ca_cert`` - PEM file of the CA(s) that signed the server's certificate;
* ``timeout`` - seconds for connecting, the TLS handshake and each answer (default 5);
* ``verify_hostname`` - ``true`` (default): the server's certificate must name ``host``.

Mechanism. The KEK never leaves the server: ``wrap`` asks the server to encrypt the data key with
AES-256-GCM (KMIP Encrypt, Block Cipher Mode GCM, Tag Length 16) under a 96-bit nonce this node
draws from ``os.urandom``, with the Authenticated Encryption Additional Data ``DOMAIN || format byte
|| context``; ``unwrap`` sends nonce, ciphertext, tag and the same additional data back (KMIP
Decrypt). The additional data and the tag are KMIP 1.4 fields, so every request is a KMIP 1.4
message; PyKMIP's server (tested: 0.11) implements them, and fails a Decrypt whose tag does not
verify. (Its Encrypt/Decrypt also offer CBC, ECB, CTR, CFB and OFB, all unauthenticated; GCM with
additional data is the mode that binds the context, so it is required: a server without it is
refused at the first wrap, never silently given a weaker mode.) GCM authenticates the ciphertext and
the context together: a blob moved to another store, key ID or purpose, a flipped bit anywhere
(nonce, ciphertext, tag) or a blob made under another KMIP key fails the tag check on the server and
becomes :class:`WrongKeyError`. The blob is ``format (1) || nonce (12) || tag (16) || ciphertext``.
The nonce is chosen here so that its quality does not depend on the server; a KEK wraps few keys
(one per DEK rotation), far below the 2**32 random nonces GCM allows under one key.

Identity: ``{"key_id": ...}`` only - the same key may be served by several replicas under other
host names, so the host does not name the key.  KMIP keys have no versions (a KMIP ReKey makes a
new object with a new identifier, i.e. a new ``key_id``): there is no ``key_version``/``rewrap``;
moving a store to a re-keyed object is ``walcrypt rotate-kek``.

Errors (the contract of :mod:`walcrypt.kms`): refused or reset connections, timeouts (connect,
TLS handshake, answer) and other socket errors are :class:`KeyProviderUnavailableError` (retried
by walcrypt); a server certificate that does not verify, a client certificate the server rejects,
an unknown key, a key that is not Active or not allowed to this client, and a server that does not
do AES-GCM are :class:`KeyProviderError`; a Decrypt that fails on the blob is
:class:`WrongKeyError`.  PyKMIP's server reports a failed GCM tag check as a General Failure,
which a broken server could also return, so such a failure is checked by an encrypt/decrypt round
trip of a random probe: if the server can do that, the blob is at fault (WrongKeyError), otherwise
the server is (KeyProviderUnavailableError).  No message carries key bytes; the client key is
only a file path.
"""

from __future__ import annotations

import hmac
import os
import socket
import ssl
import struct

from ..errors import KeyProviderError, KeyProviderUnavailableError, WrongKeyError

try:
    from kmip.core import enums
    from kmip.core.attributes import CryptographicParameters
    from kmip.core.messages import contents, messages, payloads
    from kmip.core.utils import BytearrayStream
except ImportError as exc:       # pragma: no cover - the extra is not installed
    raise ImportError("the kmip KMS plug-in needs PyKMIP: pip install 'walcrypt[kmip]'") from exc

__all__ = ["KmipKey"]

DOMAIN = b"walcrypt/kms/kmip/v1\0"
FORMAT = 1
NONCE = 12
TAG = 16
MAX_PLAINTEXT = 1024
MAX_RESPONSE = 1 << 16          # a response frame larger than this is not an answer to our requests
KMIP_VERSION = enums.KMIPVersion.KMIP_1_4

_REQUIRED = ("host", "key_id", "client_cert", "client_key", "ca_cert")
_OPTIONAL = ("port", "timeout", "verify_hostname")

# Result reasons that say "this key / this client cannot do this" rather than "not now".
_REFUSALS = {
    enums.ResultReason.ITEM_NOT_FOUND: "the key was not found (or is not visible to this client certificate)",
    enums.ResultReason.PERMISSION_DENIED: "permission denied (the key is not Active, not allowed to this "
                                          "client, or its usage mask lacks Encrypt/Decrypt)",
    enums.ResultReason.AUTHENTICATION_NOT_SUCCESSFUL: "the server did not accept this client's certificate",
    enums.ResultReason.OPERATION_NOT_SUPPORTED: "the server does not support this operation",
    enums.ResultReason.INVALID_FIELD: "the server rejected the request's parameters (it may not support "
                                      "AES-GCM with additional data, KMIP 1.4)",
    enums.ResultReason.FEATURE_NOT_SUPPORTED: "the server does not support AES-GCM with additional data",
    enums.ResultReason.KEY_VALUE_NOT_PRESENT: "the key has no value",
    enums.ResultReason.WRONG_KEY_LIFECYCLE_STATE: "the key is not Active",
    enums.ResultReason.INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK: "the key's usage mask lacks Encrypt/Decrypt",
    enums.ResultReason.INVALID_MESSAGE: "the server could not parse the request (does it speak KMIP 1.4?)",
    enums.ResultReason.UNSUPPORTED_PROTOCOL_VERSION: "the server does not speak KMIP 1.4",
}

# TLS alerts and verification failures that mean wrong credentials, not an outage.
_TLS_REFUSALS = ("CERTIFICATE_VERIFY_FAILED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                 "CERTIFICATE_REQUIRED", "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE",
                 "ACCESS_DENIED", "HANDSHAKE_FAILURE", "NO_SHARED_CIPHER", "WRONG_VERSION_NUMBER",
                 "UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION")


class _OperationFailed(Exception):
    def __init__(self, reason, message: str):
        super().__init__(message)
        self.reason = reason


def _bool_option(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise KeyProviderError(f"kmip option {name!r} is true or false, not {value!r}")


class KmipKey:
    """A KEK held by a KMIP server (see the module's documentation)."""

    def __init__(self, host=None, port=5696, key_id=None, client_cert=None, client_key=None, ca_cert=None,
                 timeout=5, verify_hostname=True, **unknown):
        if unknown:
            raise KeyProviderError(f"unknown kmip option(s): {', '.join(sorted(unknown))} (known: "
                                   f"{', '.join(_REQUIRED + _OPTIONAL)})")
        given = {"host": host, "key_id": key_id, "client_cert": client_cert, "client_key": client_key,
                 "ca_cert": ca_cert}
        missing = [k for k in _REQUIRED if given[k] in (None, "")]
        if missing:
            raise KeyProviderError(f"the kmip plug-in needs the option(s) {', '.join(missing)} "
                                   "(--kms-option NAME=VALUE)")
        self.host = str(host)
        self.key_id = str(key_id)
        try:
            self.port = int(port)
            if not 0 < self.port < 65536:
                raise ValueError
        except (TypeError, ValueError):
            raise KeyProviderError(f"kmip option 'port' is a TCP port number, not {port!r}") from None
        try:
            self.timeout = float(timeout)
            if not 0 < self.timeout <= 600:
                raise ValueError
        except (TypeError, ValueError):
            raise KeyProviderError(f"kmip option 'timeout' is a number of seconds (0 .. 600], not {timeout!r}") \
                from None
        self.verify_hostname = _bool_option("verify_hostname", verify_hostname)
        self._ssl = self._tls_context(str(client_cert), str(client_key), str(ca_cert))

    def _tls_context(self, cert: str, key: str, ca: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.verify_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise KeyProviderError(f"kmip: cannot load the CA certificate file {ca!r} ({type(exc).__name__})") \
                from None
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            # never the key's content; the paths are configuration, not secrets
            raise KeyProviderError(f"kmip: cannot load the client certificate {cert!r} with its key {key!r} "
                                   f"({type(exc).__name__})") from None
        return ctx

    def __repr__(self) -> str:
        return f"<KmipKey key_id={self.key_id!r} at {self.host}:{self.port}>"

    __str__ = __repr__

    # -- the plug-in interface ------------------------------------------------------------------

    def identity(self) -> dict:
        return {"key_id": self.key_id}

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        plaintext = bytes(plaintext)
        if not 0 < len(plaintext) <= MAX_PLAINTEXT:
            raise KeyProviderError(f"kmip: can wrap 1 .. {MAX_PLAINTEXT} bytes, not {len(plaintext)}")
        nonce = os.urandom(NONCE)
        try:
            answer = self._request(enums.Operation.ENCRYPT, payloads.EncryptRequestPayload(
                unique_identifier=self.key_id, cryptographic_parameters=self._params(), data=plaintext,
                iv_counter_nonce=nonce, auth_additional_data=self._aad(context)))
        except _OperationFailed as exc:
            raise self._refusal("encrypt", exc, unavailable=exc.reason == enums.ResultReason.GENERAL_FAILURE) \
                from None
        ct, tag = answer.data, answer.auth_tag
        if (answer.unique_identifier not in (None, self.key_id) or ct is None or len(ct) != len(plaintext)
                or tag is None or len(tag) != TAG or answer.iv_counter_nonce not in (None, nonce)):
            raise KeyProviderError("kmip: the server's Encrypt answer is not AES-GCM under the requested key, "
                                   "nonce and tag length; this server cannot hold walcrypt's KEK")
        return bytes([FORMAT]) + nonce + tag + ct

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        blob = bytes(blob)
        if len(blob) <= 1 + NONCE + TAG or len(blob) > 1 + NONCE + TAG + MAX_PLAINTEXT or blob[0] != FORMAT:
            raise WrongKeyError("kmip: this is not a data key wrapped by the kmip plug-in")
        try:
            return self._decrypt(blob, context)
        except _OperationFailed as exc:
            if exc.reason in (enums.ResultReason.GENERAL_FAILURE, enums.ResultReason.CRYPTOGRAPHIC_FAILURE):
                self._probe()       # the server works, so the tag did not verify: the blob is at fault
                raise WrongKeyError(f"kmip: key {self.key_id!r} does not open this data key under this "
                                    "context (another key, another store, or a damaged blob)") from None
            raise self._refusal("decrypt", exc) from None

    def close(self) -> None:
        """Nothing to release: every call uses its own connection."""

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _params() -> CryptographicParameters:
        return CryptographicParameters(cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
                                       block_cipher_mode=enums.BlockCipherMode.GCM, tag_length=TAG)

    @staticmethod
    def _aad(context: bytes) -> bytes:
        return DOMAIN + bytes([FORMAT]) + bytes(context)

    def _decrypt(self, blob: bytes, context: bytes) -> bytes:
        nonce, tag, ct = blob[1:1 + NONCE], blob[1 + NONCE:1 + NONCE + TAG], blob[1 + NONCE + TAG:]
        answer = self._request(enums.Operation.DECRYPT, payloads.DecryptRequestPayload(
            unique_identifier=self.key_id, cryptographic_parameters=self._params(), data=ct,
            iv_counter_nonce=nonce, auth_additional_data=self._aad(context), auth_tag=tag))
        out = answer.data
        if out is None or len(out) != len(ct) or answer.unique_identifier not in (None, self.key_id):
            raise KeyProviderError("kmip: the server's Decrypt answer does not fit the request")
        return bytes(out)

    def _probe(self) -> None:
        """An encrypt/decrypt round trip of a random value under a probe context.  Returns when the
        server can do it (so a failed Decrypt was the blob's fault); raises
        KeyProviderUnavailableError when it cannot (then the failure said nothing about the blob)."""
        value, context = os.urandom(32), b"walcrypt/kms/kmip/probe"
        blob = self.wrap(value, context)            # its own failures are already mapped
        try:
            back = self._decrypt(blob, context)
        except _OperationFailed as exc:
            raise KeyProviderUnavailableError(
                f"kmip: the server at {self.host}:{self.port} failed to decrypt, also a test value it had "
                f"just encrypted ({_reason_name(exc.reason)}): a server-side failure") from None
        if not hmac.compare_digest(back, value):
            raise KeyProviderUnavailableError("kmip: the server returned a wrong test decryption")

    def _refusal(self, what: str, exc: _OperationFailed, unavailable: bool = False) -> KeyProviderError:
        reason = exc.reason
        if reason in _REFUSALS and not unavailable:
            return KeyProviderError(f"kmip: the server refused to {what} with key {self.key_id!r}: "
                                    f"{_REFUSALS[reason]} ({_reason_name(reason)})")
        if unavailable or reason in (enums.ResultReason.GENERAL_FAILURE, None):
            return KeyProviderUnavailableError(f"kmip: the server at {self.host}:{self.port} failed to {what} "
                                               f"({_reason_name(reason)}: {str(exc)[:200]})")
        return KeyProviderError(f"kmip: the server refused to {what} with key {self.key_id!r} "
                                f"({_reason_name(reason)}: {str(exc)[:200]})")

    def _request(self, operation, payload):
        """One KMIP 1.4 request over its own TLS connection; the response payload.  Raises
        _OperationFailed for a KMIP failure, the contract's errors for transport problems."""
        header = messages.RequestHeader(protocol_version=contents.ProtocolVersion(1, 4),
                                        batch_count=contents.BatchCount(1))
        item = messages.RequestBatchItem(operation=contents.Operation(operation), request_payload=payload)
        out = BytearrayStream()
        messages.RequestMessage(request_header=header, batch_items=[item]).write(out, kmip_version=KMIP_VERSION)
        data = self._exchange(bytes(out.buffer))
        response = messages.ResponseMessage()
        try:
            response.read(BytearrayStream(data), kmip_version=KMIP_VERSION)
        except Exception as exc:          # noqa: BLE001 - any parse failure is a bad answer
            raise KeyProviderError(f"kmip: the server's answer is not a KMIP 1.4 response "
                                   f"({type(exc).__name__})") from None
        items = response.batch_items or []
        if len(items) != 1:
            raise KeyProviderError("kmip: the server answered with an unexpected number of results")
        item = items[0]
        status = item.result_status.value if item.result_status else None
        if status != enums.ResultStatus.SUCCESS:
            reason = item.result_reason.value if item.result_reason else None
            message = item.result_message.value if item.result_message else ""
            raise _OperationFailed(reason, message)
        if item.operation is not None and item.operation.value != operation:
            raise KeyProviderError("kmip: the server answered another operation")
        if item.response_payload is None:
            raise KeyProviderError("kmip: the server's answer has no payload")
        return item.response_payload

    def _exchange(self, request: bytes) -> bytes:
        where = f"{self.host}:{self.port}"
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as raw:
                with self._ssl.wrap_socket(raw, server_hostname=self.host) as tls:
                    tls.settimeout(self.timeout)
                    tls.sendall(request)
                    head = _recv_exact(tls, 8)
                    length = struct.unpack("!I", head[4:])[0]
                    if length > MAX_RESPONSE:
                        raise KeyProviderError(f"kmip: the server at {where} sent a {length}-byte answer")
                    return head + _recv_exact(tls, length)
        except KeyProviderError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise KeyProviderError(f"kmip: the certificate of the server at {where} does not verify against "
                                   f"ca_cert ({exc.verify_message or exc.reason})") from None
        except ssl.SSLError as exc:
            text = f"{exc.reason or ''} {exc}".upper()
            if any(t in text for t in _TLS_REFUSALS):
                raise KeyProviderError(f"kmip: the TLS handshake with {where} was refused ({exc.reason}); check "
                                       "client_cert/client_key (signed by a CA the server trusts, with the "
                                       "clientAuth usage) and ca_cert") from None
            raise KeyProviderUnavailableError(f"kmip: TLS with {where} failed ({exc.reason or type(exc).__name__})") \
                from None
        except (socket.timeout, TimeoutError):
            raise KeyProviderUnavailableError(f"kmip: the server at {where} did not answer within "
                                              f"{self.timeout:g} s") from None
        except OSError as exc:
            raise KeyProviderUnavailableError(f"kmip: cannot reach the server at {where} "
                                              f"({type(exc).__name__}: {exc.strerror or exc})") from None


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:                 # bounded: each recv returns >= 1 byte or ends the loop
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("the server closed the connection before answering")
        buf += chunk
    return bytes(buf)


def _reason_name(reason) -> str:
    return getattr(reason, "name", None) or "no reason given"
