"""Child processes of tests/test_powerloss.py: the engine (LMDB included) running on a lazyfs mount.

Started as a *zygote* (``python tests/powerloss/_child.py zygote``) that imports walcrypt once and
then forks one real child process per round, so a round costs a fork instead of an interpreter
start.  Protocol on the zygote's stdin/stdout, one line each:

    RUN {"mode": ..., "out": FILE, ...}  ->  PID <pid>      fork a child running ``mode``
    KILL                                 ->  (nothing)      SIGKILL the running child (not yet reaped,
                                                            so its PID cannot have been reused)
    (the child ends)                     ->  EXIT <status>  waitpid status: -signal or exit code

A child writes its progress lines to FILE (O_APPEND, one os.write per line) and its traceback, if
any, to FILE.err.  Lines: ``TRY <hi>`` before a save and ``ACK <hi>`` after it returned;
``STRY/SACK <k>`` for stable-store values; ``SNAPTRY/SNAPACK <index>`` for snapshots;
``ROTTRY/ROTACK <n>`` for DEK rotations; ``DONE`` when a single operation returned.

Entry data and term are functions of the index (tests/wctest.py); snapshot data is a function of
its index (tests/snaptest.py); stable values are functions of their number.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import threading
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # tests/
sys.path.insert(0, HERE)

import walcrypt  # noqa: E402
from walcrypt import ConfState, Entry, HardState, SnapshotMeta  # noqa: E402

import snaptest  # noqa: E402
import wctest  # noqa: E402

PER_TERM = 500
KEK1 = wctest.KEK_BYTES
KEK2 = bytes(range(32))
CS = ConfState(voters=(1, 2, 3))

_out_fd = 1
_emit_lock = threading.Lock()


def emit(line: str) -> None:
    with _emit_lock:
        os.write(_out_fd, (line + "\n").encode())


def entry_len(index: int) -> int:
    """20..419 bytes: a 4 KiB segment fills after about a dozen entries."""
    return 20 + (index * 37) % 400


def entries(lo: int, hi: int) -> list[Entry]:
    """Entries lo..hi-1: data and term are functions of the index."""
    return [Entry(i, term_of(i), wctest.entry_data(i, entry_len(i))) for i in range(lo, hi)]


def replaced_entries(lo: int, hi: int) -> list[Entry]:
    """A new leader's entries lo..hi-1 that replace a conflicting suffix (next term, other data)."""
    return [Entry(i, term_of(i) + 1, wctest.entry_data(i + 1_000_000, entry_len(i))) for i in range(lo, hi)]


def term_of(index: int) -> int:
    return wctest.entry_term(index, PER_TERM)


def stable_value(k: int) -> bytes:
    return wctest.entry_data(1_000_000 + k, 40 + k % 200)


def snap_data(index: int) -> bytes:
    return snaptest.snap_data(index, size=2 * snaptest.CHUNK + 321)


def snapshot_source(store):
    idx = store.last_index()
    return SnapshotMeta(idx, store.term(idx), CS), snap_data(idx)


def open_store(a: dict, **extra):
    kek = walcrypt.RawKey(bytes.fromhex(a.get("kek", KEK1.hex())))
    opts = dict(segment_size=a.get("seg_size", 8192), sync=a.get("sync", "always"),
                snapshot_chunk_size=snaptest.CHUNK)
    opts.update(extra)
    if a.get("plain"):
        return walcrypt.open(a["path"], encrypted=False, **opts)
    return walcrypt.open(a["path"], kek=kek, **opts)


# ------------------------------------------------------------------------------------------ modes

def mode_append(a: dict) -> None:
    """Save batches forever (bounded); with stable=True a second thread sets stable values."""
    rng = random.Random(a.get("seed", 0))
    s = open_store(a)
    nxt = s.last_index() + 1
    emit(f"START {nxt - 1}")
    if a.get("stable"):
        def stable_loop(k0: int) -> None:
            for k in range(k0, k0 + 100_000):          # bounded; the parent kills us long before
                emit(f"STRY {k}")
                s.stable_set(b"key-%d" % k, stable_value(k))
                emit(f"SACK {k}")
        threading.Thread(target=stable_loop, args=(a.get("stable_base", 0),), daemon=True).start()
    for _ in range(1_000_000):                         # bounded; the parent kills us long before
        n = rng.randint(1, 12)
        ents = entries(nxt, nxt + n)
        hi = nxt + n - 1
        emit(f"TRY {hi}")
        s.save(hard_state=HardState(term_of(hi), 1, hi), entries=ents)
        emit(f"ACK {hi}")
        nxt = hi + 1
    s.close()


def save_batches(s, nxt: int, batches: int, rng) -> int:
    """Save ``batches`` batches of 1-12 entries from ``nxt``, announcing TRY/ACK; returns the next index."""
    for _ in range(batches):
        hi = nxt + rng.randint(1, 12) - 1
        emit(f"TRY {hi}")
        s.save(hard_state=HardState(term_of(hi), 1, hi), entries=entries(nxt, hi + 1))
        emit(f"ACK {hi}")
        nxt = hi + 1
    return nxt


def mode_snapshots(a: dict) -> None:
    """Save batches and, every few batches, a snapshot with data: mostly at the last index, sometimes
    ahead of the log (a snapshot from the leader: the log is reset to start after it)."""
    rng = random.Random(a.get("seed", 0))
    s = open_store(a)
    cur = s.snapshot()
    snap_idx = cur.meta.index if cur is not None else 0
    nxt = s.last_index() + 1
    emit(f"START {nxt - 1}")
    for _ in range(100_000):                           # bounded; the parent kills us long before
        nxt = save_batches(s, nxt, rng.randint(1, 4), rng)
        last = nxt - 1
        idx = last + rng.randint(1, 5) if rng.random() < 0.25 else last
        if idx <= snap_idx:
            continue
        emit(f"SNAPTRY {idx}")
        s.save_snapshot(SnapshotMeta(idx, term_of(idx), CS), snap_data(idx))
        emit(f"SNAPACK {idx}")
        snap_idx = idx
        nxt = max(nxt, idx + 1)
        if idx == last and rng.random() < 0.3:         # (a snapshot ahead of the log already compacted it)
            s.compact(idx)
            emit(f"COMPACTED {idx}")


def mode_rotate(a: dict) -> None:
    """Cycles of: open (a crash-interrupted rotation resumes through the snapshot source), save a
    few batches, rotate_dek(), close."""
    rng = random.Random(a.get("seed", 0))
    for cycle in range(100_000):                       # bounded; the parent kills us long before
        s = open_store(a, snapshot_source=snapshot_source)
        emit(f"OPEN {s.first_index()} {s.last_index()}")
        nxt = s.last_index() + 1
        nxt = save_batches(s, nxt, rng.randint(1, 5), rng)
        emit(f"ROTTRY {cycle}")
        s.rotate_dek()
        emit(f"ROTACK {cycle} {s.last_index()}")
        s.close()
        emit("CLOSED")


def mode_op(a: dict) -> None:
    """One operation on an existing store, then DONE (and CLOSED after close)."""
    what = a["op"]
    if what == "migrate":
        s = open_store(a, migrate=True)                # a plaintext store opened with a KEK: migration
        emit("DONE")
        s.close()
        emit("CLOSED")
        return
    s = open_store(a, snapshot_source=snapshot_source)
    emit("OPENED")
    if what == "reopen":                               # recovery only (done by the open)
        pass
    elif what == "rotate_dek":
        s.rotate_dek()
    elif what == "rekey":
        s.rekey()
    elif what == "replace":                            # Raft suffix replacement
        start = s.last_index() - 15
        new = replaced_entries(start, start + 6)
        emit(f"TRY {start + 5}")
        s.save(hard_state=HardState(new[-1].term, 2, start + 5), entries=new)
        emit(f"ACK {start + 5}")
    elif what == "rotate_kek":
        s.rotate_kek(walcrypt.RawKey(KEK2))
    elif what == "snapshot":
        idx = s.last_index() + a.get("ahead", 0)
        s.save_snapshot(SnapshotMeta(idx, term_of(idx), CS), snap_data(idx))
    elif what == "append":
        nxt = s.last_index() + 1
        for _ in range(a.get("batches", 3)):
            hi = nxt + 9
            s.save(hard_state=HardState(term_of(hi), 1, hi), entries=entries(nxt, hi + 1))
            emit(f"ACK {hi}")
            nxt = hi + 1
    else:
        raise ValueError(f"unknown op {what!r}")
    emit("DONE")
    s.close()
    emit("CLOSED")


MODES = {"append": mode_append, "snapshots": mode_snapshots, "rotate": mode_rotate, "op": mode_op}


# ------------------------------------------------------------------------------------------ zygote

def _run_forked(a: dict) -> None:
    """In the forked child: run the mode, never return."""
    global _out_fd
    code = 0
    try:
        _out_fd = os.open(a["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(a["out"] + ".err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(err, 2)
        os.dup2(_out_fd, 1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        MODES[a["mode"]](a)
    except BaseException as exc:  # noqa: BLE001 - report anything, then exit non-zero
        try:
            typed = isinstance(exc, walcrypt.WalcryptError)
            emit(f"ERROR {type(exc).__module__}.{type(exc).__name__} {'typed' if typed else 'untyped'}")
            sys.stderr.write(traceback.format_exc())
            sys.stderr.flush()
        finally:
            code = 3
    os._exit(code)


class _Lines:
    """Unbuffered line reader on a file descriptor (select() on the fd sees every pending line)."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def ready(self, timeout: float) -> bool:
        return b"\n" in self.buf or bool(select.select([self.fd], [], [], timeout)[0])

    def readline(self) -> bytes | None:
        while b"\n" not in self.buf:                    # bounded by the writer's lines
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def zygote() -> None:
    stdin = _Lines(0)

    def say(line: str) -> None:
        os.write(1, (line + "\n").encode())

    while True:                                        # ends when the parent closes our stdin
        line = stdin.readline()
        if line is None:
            return
        cmd, _, rest = line.decode().strip().partition(" ")
        if cmd != "RUN":
            continue                                   # a KILL for a child that already ended
        a = json.loads(rest)
        pid = os.fork()
        if pid == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            _run_forked(a)
        say(f"PID {pid}")
        while True:                                    # until the child ends (the parent bounds it)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if stdin.ready(0.005):
                cmd = stdin.readline()
                if cmd is None:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return
                if cmd.strip() == b"KILL":
                    os.kill(pid, signal.SIGKILL)      # not reaped yet: the PID is still ours
        say(f"EXIT {-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        zygote()
    else:                                              # direct run, for debugging: _child.py '{"mode":..}'
        _run_forked(json.loads(sys.argv[1]))
