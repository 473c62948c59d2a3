"""A real etcd (Debian's etcd-server, 3.4) on 127.0.0.1 for the etcd import/export tests.

``EtcdServer(data_dir)`` runs one single-member etcd on free client and peer ports; ``put`` and
``get_all`` go through the real ``etcdctl`` (API v3).  Every process is started by this module and
stopped by its PID (SIGTERM, then SIGKILL after a bounded wait), also when a test fails.  Nothing
here knows walcrypt: it only makes and reads etcd data directories.

``python tests/etcd_server.py make-fixture OUT.tar.gz`` regenerates the committed fixture
``tests/fixtures/etcd-member.tar.gz`` (see ``make_fixture`` for what it holds).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

ETCD = shutil.which("etcd")
ETCDCTL = shutil.which("etcdctl")
SKIP_REASON = ("Debian's etcd-server and etcd-client (etcd, etcdctl 3.4) are not installed: "
               "apt-get install etcd-server etcd-client")


def available() -> bool:
    return ETCD is not None and ETCDCTL is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd member on ``data_dir`` (its member directory is ``data_dir/member``)."""

    def __init__(self, data_dir: str, *, name: str = "node1", snapshot_count: int = 100,
                 extra_args: tuple = (), log_path: str | None = None):
        self.data_dir = data_dir
        self.name = name
        self.snapshot_count = snapshot_count
        self.extra_args = tuple(extra_args)
        self.log_path = log_path or data_dir.rstrip("/") + ".etcd.log"
        self.proc: subprocess.Popen | None = None
        self.client_url = self.peer_url = None

    # -- process ------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "EtcdServer":
        if self.proc is not None:
            raise RuntimeError("this etcd is already running; stop() it first")
        client, peer = free_port(), free_port()
        while peer == client:
            peer = free_port()
        self.client_url = f"http://127.0.0.1:{client}"
        self.peer_url = f"http://127.0.0.1:{peer}"
        args = [ETCD, "--name", self.name, "--data-dir", self.data_dir,
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"{self.name}={self.peer_url}",
                "--initial-cluster-state", "new", "--initial-cluster-token", "walcrypt-test",
                "--snapshot-count", str(self.snapshot_count), *self.extra_args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:                           # bounded: the deadline, or etcd exiting
            try:
                healthy = self.ctl("endpoint", "health", check=False, timeout=10).returncode == 0
            except subprocess.TimeoutExpired:
                healthy = False
            if healthy and self.proc.poll() is None:
                return self
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"etcd exited with {code} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not become healthy in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; by PID only."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
            except ProcessLookupError:
                pass
        self._log.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- etcdctl ------------------------------------------------------------------------------
    def ctl(self, *args, stdin: bytes | None = None, check: bool = True, timeout: float = 60):
        env = dict(os.environ, ETCDCTL_API="3")
        res = subprocess.run([ETCDCTL, "--endpoints", self.client_url, "--dial-timeout", "5s",
                              "--command-timeout", "30s", *args],
                             input=stdin, capture_output=True, env=env, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed ({res.returncode}): "
                               f"{res.stderr.decode(errors='replace')}\n{self.log_tail()}")
        return res

    def put(self, key: str, value: bytes) -> None:
        """``etcdctl put KEY`` with the value on stdin (any bytes, no argument-length limit)."""
        self.ctl("put", key, stdin=value)

    def get_all(self) -> dict[bytes, bytes]:
        """Every key and value, read back with ``etcdctl get "" --prefix -w json``."""
        res = self.ctl("get", "", "--prefix", "-w", "json", timeout=120)
        doc = json.loads(res.stdout)
        return {base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", ""))
                for kv in doc.get("kvs", [])}

    def status(self) -> dict:
        res = self.ctl("endpoint", "status", "-w", "json")
        return json.loads(res.stdout)[0]["Status"]


def snap_files(member_dir: str) -> list[str]:
    d = os.path.join(member_dir, "snap")
    return sorted(n for n in os.listdir(d) if n.endswith(".snap")) if os.path.isdir(d) else []


def wal_files(member_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(member_dir, "wal")) if n.endswith(".wal"))


def small_value(i: int) -> bytes:
    return b"value-%06d-" % i + bytes(range(256))[i % 7:(i % 7) + 24]


def big_value(i: int, size: int = 1_000_000) -> bytes:
    """Compressible (the fixture is a few hundred KB) but distinct per key."""
    head = b"big-%04d:" % i
    return head + bytes([0x41 + i % 26]) * (size - len(head))


def write_workload(srv: EtcdServer, *, several_files: bool, max_small: int = 600) -> dict[bytes, bytes]:
    """Small puts until etcd has written two snapshots, then (``several_files``) about 66 MB of 1 MB
    values so that the WAL is cut into a second 64 MB segment (etcd 3.4 has no flag for the segment
    size) - fewer entries than ``--snapshot-count`` after the snapshot, so that the snapshot recorded
    in the first WAL file is the newest and the import reads across both files.  Ends with a few
    small puts, an overwrite and a delete.  Returns what etcd should hold."""
    expect: dict[bytes, bytes] = {}
    member = os.path.join(srv.data_dir, "member")
    i = 0
    while len(snap_files(member)) < 2:
        if i >= max_small:
            raise RuntimeError(f"etcd wrote no snapshot after {i} puts (snapshot-count {srv.snapshot_count})")
        key, val = f"/small/{i:05d}", small_value(i)
        srv.put(key, val)
        expect[key.encode()] = val
        i += 1
    if several_files:
        for j in range(70):
            key, val = f"/big/{j:03d}", big_value(j)
            srv.put(key, val)
            expect[key.encode()] = val
    for k in range(5):
        key, val = f"/tail/{k}", small_value(10_000 + k)
        srv.put(key, val)
        expect[key.encode()] = val
    srv.put("/small/00000", b"overwritten")
    expect[b"/small/00000"] = b"overwritten"
    srv.ctl("del", "/small/00001")
    expect.pop(b"/small/00001", None)
    return expect


def describe_value(v: bytes) -> dict:
    """How keys.json records a value: its length, SHA-256 and first 32 bytes (base64)."""
    import hashlib
    return {"len": len(v), "sha256": hashlib.sha256(v).hexdigest(), "head": base64.b64encode(v[:32]).decode()}


def make_fixture(out: str) -> None:
    """A real etcd 3.4 member directory: snapshots (snapshot-count 100), two WAL files, then the
    keys as ``etcdctl get`` read them (``keys.json``: each
    value's length, SHA-256 and first bytes; see ``describe_value``).  The v3 backend (member/snap/db) is left out (the import
    does not read it).  Stored as a tar.gz: the WAL files are 64 MB each, mostly zero-filled
    preallocation and repetitive values, which compress to a few hundred KB."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "etcd-data")
        srv = EtcdServer(data, snapshot_count=100, log_path=os.path.join(tmp, "etcd.log"))
        try:
            srv.start()
            expect = write_workload(srv, several_files=True)
            got = srv.get_all()
        finally:
            srv.stop()
        assert got == expect, "etcd does not hold what was written"
        keys = {base64.b64encode(k).decode(): describe_value(v) for k, v in sorted(got.items())}
        member = os.path.join(data, "member")
        with tarfile.open(out, "w:gz", compresslevel=9) as tar:
            for sub in ("wal", "snap"):
                for name in sorted(os.listdir(os.path.join(member, sub))):
                    if sub == "snap" and not name.endswith(".snap"):
                        continue            # the bbolt backend (db) is not part of the fixture
                    tar.add(os.path.join(member, sub, name), arcname=f"member/{sub}/{name}")
            blob = json.dumps({"etcd": subprocess.run([ETCD, "--version"], capture_output=True,
                                                      text=True).stdout.splitlines()[0],
                               "keys": keys}, indent=1).encode()
            info = tarfile.TarInfo("keys.json")
            info.size = len(blob)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(blob))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-fixture":
        make_fixture(sys.argv[2])
    else:
        sys.exit("usage: python tests/etcd_server.py make-fixture OUT.tar.gz")
