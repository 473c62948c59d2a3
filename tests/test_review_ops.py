"""Adversarial review of the operations work: online readers, verify/repair, recover, salvage,
backup/restore and the command surface.  Each test here pins a break: it is marked xfail(strict)
and fails on the current code for the reason given.

Real files, real LMDB, real subprocesses (the writer is a child process stopped by its PID).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap

import pytest

import walcrypt
from walcrypt import format as fmt
from walcrypt import layout
from walcrypt import meta as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _wc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walcrypt.cli", *args], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=timeout)


def _readline(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the child did not answer in time"
    line = proc.stdout.readline()
    assert line, "the child exited: " + proc.stderr.read()
    return line.strip()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def _keyfile(tmp_path) -> str:
    key = str(tmp_path / "kek")
    walcrypt.keys.generate_key_file(key)
    return key


# A writer that writes a fixed history, then holds the store open, idle, until it is killed.
IDLE_WRITER = textwrap.dedent("""
    import sys, select
    import walcrypt
    from walcrypt import Entry, HardState
    root, key, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = walcrypt.open(root, kek=walcrypt.KeyFile(key), segment_size=1 << 20, sync="always")
    for i in range(1, n + 1):
        s.save(hard_state=HardState(2, 1, i), entries=[Entry(i, 2, b"acknowledged entry %d " % i + b"z" * 200)])
    print("READY", flush=True)
    select.select([sys.stdin], [], [], 600)
""")


def _frames(path: str) -> list[tuple[int, int, int]]:
    """(offset, type, length) of every frame of a segment file, up to the first unwritten one."""
    with open(path, "rb") as f:
        d = f.read()
    off, out = fmt.SEGMENT_HEADER_SIZE, []
    while off + fmt.FRAME_HEADER_SIZE <= len(d) and d[off] != fmt.FRAME_UNWRITTEN:
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(d, off)
        out.append((off, h[0], h[4]))
        off = fmt.align_up(off + fmt.FRAME_HEADER_SIZE + h[4])
    return out


def _segments(root: str) -> list[str]:
    d = os.path.join(root, layout.WAL_ENCRYPTED)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".wal"))


# ---------------------------------------------------------------------------
# Online verify
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("last_byte", ["as-written", "zero"])
def test_online_verify_finds_damage_in_the_last_committed_unit_of_the_open_segment(tmp_path, last_byte):
    key = _keyfile(tmp_path)
    root = str(tmp_path / "node")
    proc = subprocess.Popen([sys.executable, "-c", IDLE_WRITER, root, key, "40"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        assert _readline(proc) == "READY"
        seg = _segments(root)[-1]
        frames = _frames(seg)
        # The last ENTRIES frame: acknowledged (save() returned after its COMMIT was synced).
        off, ftype, length = [f for f in frames if f[1] == fmt.FRAME_ENTRIES][-1]
        assert any(f[1] == fmt.FRAME_COMMIT and f[0] > off for f in frames)
        at = off + fmt.FRAME_HEADER_SIZE + length // 2
        with open(seg, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x01]))
            if last_byte == "zero":        # as one tag in 256 ends: no sign of an unfinished write
                f.seek(off + fmt.FRAME_HEADER_SIZE + length - 1)
                f.write(b"\0")
        assert proc.poll() is None
        online = _wc("verify", root, "--key-file", key, "--json")
    finally:
        _stop(proc)
    offline = _wc("verify", root, "--key-file", key, "--json")
    assert offline.returncode == 1, offline.stdout + offline.stderr      # the damage is real
    assert online.returncode == 1, online.stdout + online.stderr


# ---------------------------------------------------------------------------
# snapshot restore
# ---------------------------------------------------------------------------

def test_failed_restore_never_removes_a_store_created_meanwhile(tmp_path):
    from walcrypt import ConfState, Entry, HardState, SnapshotMeta
    key = _keyfile(tmp_path)
    src = str(tmp_path / "src")
    with walcrypt.open(src, kek=walcrypt.KeyFile(key)) as s:
        s.save(hard_state=HardState(1, 1, 1), entries=[Entry(1, 1, b"e")])
        s.save_snapshot(SnapshotMeta(1, 1, ConfState((1,))), os.urandom(1 << 20) * 48)    # ~48 MiB
    out = str(tmp_path / "node.wcx")
    assert _wc("snapshot", "export", src, out, "--key-file", key).returncode == 0
    target = str(tmp_path / "node3")
    proc = subprocess.Popen([sys.executable, "-m", "walcrypt.cli", "--progress", "snapshot", "restore", out, target,
                             "--key-file", key], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), cwd=REPO)
    try:
        seen = b""
        while b"verifying the snapshot" not in seen:        # the spinner: the target was found new
            ready, _, _ = select.select([proc.stderr], [], [], 120)
            assert ready, "restore did not start verifying"
            block = os.read(proc.stderr.fileno(), 4096)
            assert block, "restore exited early: " + seen.decode(errors="replace")
            seen += block
        os.kill(proc.pid, signal.SIGSTOP)                  # hold it inside the verification, deterministically
        assert not os.path.exists(target), "the restore got past its verification: make the snapshot larger"
        # Meanwhile the node (started by its service manager) creates its store there and acknowledges entries.
        node = walcrypt.open(target, kek=walcrypt.KeyFile(key), sync="always")
        node.save(hard_state=HardState(7, 2, 3), entries=[Entry(i, 7, b"acknowledged %d" % i) for i in (1, 2, 3)])
        os.kill(proc.pid, signal.SIGCONT)
        proc.wait(timeout=300)
        node.close()
    finally:
        _stop(proc)
    assert proc.returncode != 0                      # the restore is refused (the directory is no longer empty) ...
    assert os.path.isdir(os.path.join(target, "meta")), "the node's data directory was deleted"
    with walcrypt.open(target, kek=walcrypt.KeyFile(key)) as s:     # ... and the node's store is untouched
        assert s.last_index() == 3 and s.entries(1, 4)[2].data == b"acknowledged 3"


# ---------------------------------------------------------------------------
# Command surface
# ---------------------------------------------------------------------------

def test_dump_refuses_a_reversed_range(tmp_path):
    from walcrypt import Entry, HardState
    key = _keyfile(tmp_path)
    root = str(tmp_path / "node")
    with walcrypt.open(root, kek=walcrypt.KeyFile(key)) as s:
        s.save(hard_state=HardState(1, 1, 5), entries=[Entry(i, 1, b"e%d" % i) for i in range(1, 6)])
    res = _wc("dump", root, "--from", "4", "--to", "2", "--key-file", key, "--json")
    assert res.returncode == 2, res.stdout
    assert json.loads(res.stdout)["error"]["kind"] == "usage"
