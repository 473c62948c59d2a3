"""A local pysyncobj cluster of walcrypt nodes, one subprocess per node (demo and tests).

Every node listens on 127.0.0.1 only, has its own data directory and its own KEK,
and is stopped by its PID when the cluster is torn down.  Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO

from .keys import generate_key_file


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class NodeError(RuntimeError):
    pass


@dataclass
class Node:
    name: str
    addr: str
    data_dir: str
    key_file: str
    proc: subprocess.Popen[str] | None = None
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, req: dict, timeout: float = 30.0) -> dict:
        proc = self.proc
        if proc is None or proc.poll() is not None:     # not alive
            raise NodeError(f"{self.name} is not running")
        stdin, stdout = _pipes(proc)
        stdin.write(json.dumps(req) + "\n")
        stdin.flush()
        line = _readline(stdout, timeout)
        if not line:
            raise NodeError(f"{self.name} did not answer {req.get('op')!r} (exit code {proc.poll()})")
        resp = json.loads(line)
        if "error" in resp:
            raise NodeError(f"{self.name}: {resp['error']}")
        return resp


def _pipes(proc: subprocess.Popen[str]) -> tuple[IO[str], IO[str]]:
    """A node process's stdin and stdout (Cluster.start opens both as pipes)."""
    assert proc.stdin is not None and proc.stdout is not None
    return proc.stdin, proc.stdout


def _readline(stdout: IO[str], timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return stdout.readline()
    finally:
        sel.close()


@dataclass
class Cluster:
    root: str
    size: int = 3
    password: str | None = "walcrypt-demo-transport"
    compaction_entries: int = 2000
    segment_size: int = 4 << 20
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        keys = os.path.join(self.root, "keys")
        os.makedirs(keys, mode=0o700, exist_ok=True)
        ports = free_ports(self.size)
        for i, port in enumerate(ports):
            kf = os.path.join(keys, f"node{i}.kek")
            if not os.path.exists(kf):
                generate_key_file(kf)
            self.nodes.append(Node(f"node{i}", f"127.0.0.1:{port}", os.path.join(self.root, f"node{i}"), kf))

    # -- processes -----------------------------------------------------------------------
    def start(self, node: Node) -> None:
        peers = [p.addr for p in self.nodes if p is not node]
        cmd = [sys.executable, "-m", "walcrypt.cluster_node", "--dir", node.data_dir, "--key-file", node.key_file,
               "--self", node.addr, "--compaction-entries", str(self.compaction_entries),
               "--segment-size", str(self.segment_size)]
        for p in peers:
            cmd += ["--peer", p]
        if self.password:
            cmd += ["--password", self.password]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
        node.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)

    def start_all(self) -> None:
        for n in self.nodes:
            self.start(n)

    def kill(self, node: Node) -> None:
        """SIGKILL by PID: no chance to flush or close anything."""
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
            node.proc.wait(timeout=10)

    def restart(self, node: Node) -> None:
        self.kill(node)
        node.restarts += 1
        self.start(node)

    def stop(self, node: Node, timeout: float = 15.0) -> None:
        proc = node.proc
        if proc is None or proc.poll() is not None:     # not alive
            return
        try:
            node.request({"op": "stop"}, timeout=timeout)
            proc.wait(timeout=timeout)
        except (NodeError, subprocess.TimeoutExpired, OSError, ValueError):
            self.kill(node)

    def stop_all(self) -> None:
        for n in self.nodes:
            self.stop(n)

    def teardown(self) -> None:
        """Stop every process this cluster started, by PID."""
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is None:
                try:
                    os.kill(n.proc.pid, signal.SIGKILL)
                    n.proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            for stream in (n.proc.stdin, n.proc.stdout) if n.proc else ():
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass

    def wipe(self, node: Node) -> None:
        self.kill(node)
        shutil.rmtree(node.data_dir, ignore_errors=True)

    # -- queries -------------------------------------------------------------------------
    def statuses(self) -> dict[str, dict]:
        out = {}
        for n in self.nodes:
            if n.alive:
                try:
                    out[n.name] = n.request({"op": "status"}, timeout=10)
                except NodeError:
                    pass
        return out

    def leader(self, timeout: float = 30.0) -> Node:
        """The one leader, once every running node that answers knows it: a follower that has not
        heard from it yet would refuse a write at once (pysyncobj's MISSING_LEADER)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.statuses()
            leaders = [n for n in self.nodes if st.get(n.name, {}).get("leader")]
            if len(leaders) == 1 and all(s.get("leader_addr") == leaders[0].addr for s in st.values()):
                return leaders[0]
            time.sleep(0.1)
        raise NodeError(f"no leader elected and known to every node within {timeout:.0f} s")

    def write(self, node: Node, items: list[tuple[str, str]], timeout: float = 20.0) -> list[str]:
        return node.request({"op": "set", "items": [list(i) for i in items], "timeout": timeout},
                            timeout=timeout + 15)["acked"]

    def wait_converged(self, expected: dict[str, str], timeout: float = 30.0) -> dict[str, dict]:
        """Wait until every running node has applied every expected key; returns each node's dump."""
        deadline = time.monotonic() + timeout
        dumps: dict[str, dict] = {}
        while time.monotonic() < deadline:
            dumps = {n.name: n.request({"op": "dump"}, timeout=20)["items"] for n in self.nodes if n.alive}
            if all(all(d.get(k) == v for k, v in expected.items()) for d in dumps.values()):
                return dumps
            time.sleep(0.2)
        return dumps

    def wait_for(self, predicate, timeout: float = 30.0, interval: float = 0.2) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.statuses()):
                return True
            time.sleep(interval)
        return False
