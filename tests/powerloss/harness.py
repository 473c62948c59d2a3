"""Start, drive and stop tests/powerloss/lazyfs.py from a test (or by hand).

    m = LazyFSMount.start(backing_dir, mount_dir)   # raises FuseUnavailable with the reason
    ... use m.mountpoint ...
    m.crash()        # power cut: drop every unsynced write and directory entry
    m.stats()        # counters (writes, fsyncs, sync_points, dirty_files, ...)
    m.sync()         # make everything durable (sync(1))
    m.arm(n)         # power cut just before the n-th durability point from now, then freeze
    m.thaw()         # leave the frozen state after an armed power cut
    m.stop()         # fusermount3 -u, then stop the server process by its PID

Every process started here is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LAZYFS = os.path.join(HERE, "lazyfs.py")
sys.path.insert(0, HERE)

from lazyfs import LazyFSClient  # noqa: E402


class FuseUnavailable(Exception):
    """FUSE cannot be used here; the message says why."""


def fuse_unavailable_reason() -> str | None:
    """Why a FUSE filesystem cannot be mounted here, or None when it looks possible."""
    if not sys.platform.startswith("linux"):
        return f"FUSE power-loss tests need Linux, not {sys.platform}"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError/EnvironmentError when libfuse is missing
        return f"the FUSE binding mfusepy cannot be imported ({type(exc).__name__}: {exc}); " \
               "pip install mfusepy and apt-get install libfuse3-3"
    return None


def is_mounted(mountpoint: str) -> bool:
    """True while mountpoint is in the mount table (also when its server died: then stat() fails)."""
    mp = os.path.abspath(mountpoint)
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1].replace("\\040", " ") == mp for line in f if len(line.split()) > 1)
    except OSError:
        return os.path.ismount(mp)


def _unmount(mountpoint: str, lazy: bool = False) -> bool:
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    try:
        r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


class LazyFSMount:
    def __init__(self, backing: str, mountpoint: str, control: str, proc: subprocess.Popen, log_path: str):
        self.backing = backing
        self.mountpoint = mountpoint
        self.control = control
        self.proc = proc
        self.log_path = log_path
        self.client: LazyFSClient | None = None

    @classmethod
    def start(cls, backing: str, mountpoint: str, *, control: str | None = None, timeout: float = 20.0,
              log_path: str | None = None, fallocate: bool = True) -> "LazyFSMount":
        reason = fuse_unavailable_reason()
        if reason:
            raise FuseUnavailable(reason)
        os.makedirs(backing, exist_ok=True)
        os.makedirs(mountpoint, exist_ok=True)
        parent = os.path.dirname(os.path.abspath(mountpoint))
        control = control or os.path.join(parent, "lazyfs.sock")
        log_path = log_path or os.path.join(parent, "lazyfs.log")
        log = open(log_path, "wb")
        proc = subprocess.Popen([sys.executable, LAZYFS, backing, mountpoint, "--control", control]
                                + ([] if fallocate else ["--no-fallocate"]),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        m = cls(backing, mountpoint, control, proc, log_path)
        deadline = time.monotonic() + timeout
        try:
            while True:                                  # bounded by the deadline
                if proc.poll() is not None:
                    raise FuseUnavailable(f"lazyfs exited with {proc.returncode} before mounting: {m.log_tail()}")
                if os.path.exists(control):
                    try:
                        if m.client is None:
                            m.client = LazyFSClient(control)
                        if m.client.call("ping")["mounted"] and is_mounted(mountpoint):
                            return m
                    except OSError:
                        m.client = None
                if time.monotonic() > deadline:
                    raise FuseUnavailable(f"lazyfs did not mount {mountpoint} within {timeout:.0f} s: {m.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            m.stop()
            raise

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- control ----------------------------------------------------------------
    def call(self, line: str) -> dict:
        assert self.client is not None, "lazyfs is not running"
        return self.client.call(line)

    def crash(self, torn_seed: int | None = None) -> dict:
        return self.call("crash" if torn_seed is None else f"crash torn {torn_seed}")

    def stats(self) -> dict:
        return self.call("stats")

    def sync(self) -> dict:
        return self.call("sync")

    def arm(self, n: int, torn_seed: int | None = None) -> dict:
        return self.call(f"arm {n}" if torn_seed is None else f"arm {n} torn {torn_seed}")

    def thaw(self) -> dict:
        return self.call("thaw")

    # -- teardown ---------------------------------------------------------------
    def stop(self) -> None:
        """Unmount (a clean shutdown: lazyfs makes everything durable) and stop the server by its PID."""
        if self.client is not None:
            try:
                self.client.close()
            except OSError:
                pass
            self.client = None
        if is_mounted(self.mountpoint):
            for _ in range(50):                          # bounded: a busy mount clears once its users exit
                if _unmount(self.mountpoint):
                    break
                time.sleep(0.1)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if is_mounted(self.mountpoint):
            _unmount(self.mountpoint, lazy=True)
        if os.path.exists(self.control):
            os.unlink(self.control)


# ------------------------------------------------------------------------------------------ children

CHILD = os.path.join(HERE, "_child.py")


class ChildRunner:
    """A zygote (tests/powerloss/_child.py zygote) that forks one engine child per round.

    run(args) starts a child and returns its progress file; lines() reads it; kill() has the zygote
    SIGKILL the child (it is not reaped before that, so the PID is still the child's); wait() returns
    the child's status (-9 after SIGKILL).  stop() ends the zygote by its PID.
    """

    def __init__(self, workdir: str, env: dict | None = None):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, CHILD, "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, env=env, cwd=workdir)
        self.n = 0
        self.out: str | None = None
        self.pid: int | None = None
        self._buf = b""

    def _readline(self, timeout: float) -> str:
        import select
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:                    # bounded by the deadline
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("the zygote did not answer in time")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the zygote exited ({self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def run(self, args: dict) -> str:
        import json
        assert self.pid is None, "the previous child was not waited for"
        self.n += 1
        self.out = os.path.join(self.workdir, f"child-{self.n}.out")
        self._send("RUN " + json.dumps(dict(args, out=self.out)))
        word, pid = self._readline(30).split()
        assert word == "PID"
        self.pid = int(pid)
        return self.out

    def lines(self) -> list[str]:
        try:
            with open(self.out, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        return [x.decode() for x in data.split(b"\n")[:-1]]

    def errors(self) -> str:
        try:
            with open(self.out + ".err", "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def wait_for(self, pred, timeout: float) -> bool:
        """Poll the progress lines until pred(lines) or the child ended or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:               # bounded by the deadline
            ls = self.lines()
            if pred(ls) or (ls and ls[-1].startswith(("ERROR", "CLOSED"))):
                return pred(ls)
            time.sleep(0.002)
        return False

    def kill(self) -> None:
        self._send("KILL")

    def wait(self, timeout: float = 60) -> int:
        try:
            line = self._readline(timeout)
        except TimeoutError:
            self.kill()
            line = self._readline(30)
        word, status = line.split()
        assert word == "EXIT", line
        self.pid = None
        return int(status)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()                  # the zygote kills a running child and exits
            except OSError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
