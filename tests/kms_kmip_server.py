"""A throw-away PyKMIP server for the ``kmip`` KMS plug-in's tests.

``make_pki(dir)`` writes a test CA, a server certificate for 127.0.0.1 and client certificates
(one trusted, one from a foreign CA, one without the clientAuth extended key usage) with
``cryptography``.  ``KmipTestServer`` runs PyKMIP's own ``KmipServer`` in a subprocess on
127.0.0.1 with a free port, a temporary SQLite database, an empty policy directory and a log
file in the same temporary directory, and stops it by its process id (SIGINT first, then SIGKILL
of the process group it was started in - the server's multiprocessing helpers live there too).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOST = "127.0.0.1"

_SERVER_SCRIPT = r"""
import sys
from kmip.services.server import KmipServer
host, port, cert, key, ca, log, policy, db = sys.argv[1:9]
server = KmipServer(hostname=host, port=int(port), certificate_path=cert, key_path=key, ca_path=ca,
                    auth_suite="TLS1.2", config_path=None, log_path=log, policy_path=policy,
                    enable_tls_client_auth=True, logging_level="INFO", database_path=db)
server.start()
print("serving", flush=True)
try:
    server.serve()
except KeyboardInterrupt:
    pass
"""


@dataclass
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    foreign_cert: str       # a client certificate from a CA the server does not trust
    foreign_key: str
    foreign_ca: str         # a CA that did not sign the server's certificate
    noauth_cert: str        # signed by the right CA, but without the clientAuth extended key usage
    noauth_key: str
    misnamed_cert: str      # a server certificate from the right CA for another host name
    misnamed_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> str:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    return str(path)


def _write_cert(path: Path, cert) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert, cn: str, usages, san=None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_pki(directory) -> Pki:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("walcrypt test KMIP CA")
    other_key, other_cert = _ca("some other CA")
    s_key, s_cert = _leaf(ca_key, ca_cert, "127.0.0.1", [ExtendedKeyUsageOID.SERVER_AUTH],
                          san=[x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")])
    m_key, m_cert = _leaf(ca_key, ca_cert, "kmip.example", [ExtendedKeyUsageOID.SERVER_AUTH],
                          san=[x509.DNSName("kmip.example")])
    c_key, c_cert = _leaf(ca_key, ca_cert, "walcrypt-node", [ExtendedKeyUsageOID.CLIENT_AUTH])
    f_key, f_cert = _leaf(other_key, other_cert, "walcrypt-node", [ExtendedKeyUsageOID.CLIENT_AUTH])
    n_key, n_cert = _leaf(ca_key, ca_cert, "walcrypt-node", [ExtendedKeyUsageOID.SERVER_AUTH])
    return Pki(ca=_write_cert(d / "ca.pem", ca_cert),
               server_cert=_write_cert(d / "server.pem", s_cert), server_key=_write_key(d / "server.key", s_key),
               client_cert=_write_cert(d / "client.pem", c_cert), client_key=_write_key(d / "client.key", c_key),
               foreign_cert=_write_cert(d / "foreign.pem", f_cert), foreign_key=_write_key(d / "foreign.key", f_key),
               foreign_ca=_write_cert(d / "foreign-ca.pem", other_cert),
               noauth_cert=_write_cert(d / "noauth.pem", n_cert), noauth_key=_write_key(d / "noauth.key", n_key),
               misnamed_cert=_write_cert(d / "misnamed.pem", m_cert),
               misnamed_key=_write_key(d / "misnamed.key", m_key))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class KmipTestServer:
    """PyKMIP's server in a subprocess; ``start()`` waits (bounded) until it accepts connections."""

    def __init__(self, directory, pki: Pki, port: int | None = None, misnamed: bool = False):
        self.dir = Path(directory)
        self.cert, self.key = ((pki.misnamed_cert, pki.misnamed_key) if misnamed
                               else (pki.server_cert, pki.server_key))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = port or free_port()
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "KmipTestServer":
        policy = self.dir / "policies"
        policy.mkdir(exist_ok=True)
        args = [sys.executable, "-c", _SERVER_SCRIPT, HOST, str(self.port), self.cert, self.key, self.pki.ca, str(self.log), str(policy), str(self.dir / "kmip.db")]
        out = open(self.dir / "server.out", "ab")
        try:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the PyKMIP server exited ({self.proc.returncode}): {self.output()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the PyKMIP server did not listen on {HOST}:{self.port} within {timeout} s")

    def output(self) -> str:
        try:
            return (self.dir / "server.out").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            if proc is not None:
                self._kill_group(proc.pid)
            return
        try:
            proc.send_signal(signal.SIGINT)     # the server's accept loop stops on KeyboardInterrupt
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        finally:
            self._kill_group(proc.pid)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        # the group was created for this server (start_new_session): its multiprocessing helpers
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def client(server: KmipTestServer):
    """PyKMIP's own client, logged in with the trusted client certificate (to create test keys)."""
    from kmip.pie.client import ProxyKmipClient
    pki = server.pki
    with warnings.catch_warnings():         # PyKMIP's client still asks for ssl.PROTOCOL_TLS
        warnings.simplefilter("ignore", DeprecationWarning)
        with ProxyKmipClient(hostname=HOST, port=server.port, cert=pki.client_cert, key=pki.client_key,
                             ca=pki.ca, config_file=os.devnull) as c:
            yield c


def create_key(server: KmipTestServer, activate: bool = True) -> str:
    """A new AES-256 key for Encrypt/Decrypt on the server; its unique identifier."""
    from kmip import enums
    with client(server) as c:
        uid = c.create(enums.CryptographicAlgorithm.AES, 256,
                       cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT,
                                                 enums.CryptographicUsageMask.DECRYPT])
        if activate:
            c.activate(uid)
    return uid


def revoke_key(server: KmipTestServer, uid: str) -> None:
    from kmip import enums
    with client(server) as c:
        c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
