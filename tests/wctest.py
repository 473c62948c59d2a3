"""Shared helpers of the engine test suite (imported by conftest.py, the tests and the child script).

Nothing here imports engine internals beyond ``walcrypt.format`` (the normative layout):
frame and header parsing, CRC fixing and tampering are done independently of the engine's
own code paths, so the tests check the format rather than reuse the code under test.
"""

from __future__ import annotations

import dis
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass

from crc32c import crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import walcrypt
from walcrypt import Entry, HardState
from walcrypt import format as fmt
from walcrypt.vfs import VFS

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
CHILD = os.path.join(TESTS_DIR, "_wal_child.py")

ENC_DIR = "wal-v1-encrypted"
PLAIN_DIR = "wal-v1"
SEG_SIZE = 64 * 1024
KEK_BYTES = bytes.fromhex("8f1e3a5c7b9d0f2e4a6c8e0b1d3f5a7c9e1b3d5f7a9c0e2b4d6f8a1c3e5b7d9f")

# ---------------------------------------------------------------------------
# Deterministic payloads
# ---------------------------------------------------------------------------


def entry_data(index: int, length: int | None = None) -> bytes:
    """Deterministic bytes for entry ``index`` (length 8..71 unless given)."""
    if length is None:
        length = 8 + index % 64
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=32).digest()
    reps = length // 32 + 1
    return (seed * reps)[:length]


def entry_term(index: int, per_term: int = 1000) -> int:
    return 1 + index // per_term


def make_entries(lo: int, hi: int, *, length: int | None = None, per_term: int = 1000) -> list[Entry]:
    return [Entry(i, entry_term(i, per_term), entry_data(i, length)) for i in range(lo, hi)]


# ---------------------------------------------------------------------------
# Layout, parsed from walcrypt.format's construct declarations
# ---------------------------------------------------------------------------


def _field_offsets(struct) -> dict[str, tuple[int, int]]:
    out, off = {}, 0
    for sub in struct.subcons:
        size = sub.sizeof()
        out[sub.name] = (off, size)
        off += size
    return out


FRAME_FIELDS = _field_offsets(fmt.FrameHeader)


def frame_field_flip_position(f, field: str) -> int:
    """The byte to flip for ``field`` of frame ``f`` (a header field, "payload" or "tag"): the
    field's middle for the long fields, its first byte otherwise."""
    if field == "payload":
        o, size = FRAME_HEADER_SIZE, f.length - fmt.TAG_SIZE
    elif field == "tag":
        o, size = FRAME_HEADER_SIZE + f.length - fmt.TAG_SIZE, fmt.TAG_SIZE
    else:
        o, size = FRAME_FIELDS[field]
    return f.offset + o + (size // 2 if field in ("payload", "tag", "nonce", "key_id", "prev_chain") else 0)
HEADER_FIELDS = _field_offsets(fmt.SegmentHeader)
FRAME_HEADER_SIZE = sum(s for _, s in FRAME_FIELDS.values())
SEGMENT_HEADER_SIZE = sum(s for _, s in HEADER_FIELDS.values())
assert FRAME_HEADER_SIZE == fmt.FRAME_HEADER_SIZE
assert SEGMENT_HEADER_SIZE == fmt.SEGMENT_HEADER_SIZE


def align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass
class Frame:
    offset: int
    type: int
    length: int
    seq: int
    index: int
    count: int

    @property
    def end(self) -> int:          # one past the payload
        return self.offset + FRAME_HEADER_SIZE + self.length

    @property
    def next(self) -> int:         # start of the next frame (8-byte aligned)
        return align8(self.end)


def _u(data: bytes, off: int, name: str) -> int:
    o, s = FRAME_FIELDS[name]
    return int.from_bytes(data[off + o:off + o + s], "little")


def parse_frames(data: bytes) -> list[Frame]:
    """Frames of a segment file, stopping at unwritten space, the INDEX frame or the end."""
    frames = []
    off = SEGMENT_HEADER_SIZE
    while off + FRAME_HEADER_SIZE <= len(data):       # bounded by the file size
        ftype = data[off]
        if ftype == fmt.FRAME_UNWRITTEN:
            break
        length = _u(data, off, "length")
        f = Frame(off, ftype, length, _u(data, off, "seq"), _u(data, off, "index"), _u(data, off, "count"))
        frames.append(f)
        if ftype == fmt.FRAME_INDEX or f.end > len(data):
            break
        off = f.next
    return frames


def batches(frames: list[Frame]) -> list[list[Frame]]:
    """Frames grouped into write units, each ending with its COMMIT frame."""
    out, cur = [], []
    for f in frames:
        if f.type == fmt.FRAME_INDEX:
            break
        cur.append(f)
        if f.type == fmt.FRAME_COMMIT:
            out.append(cur)
            cur = []
    return out


def frame_crc(data: bytes | bytearray, f: Frame) -> int:
    o = f.offset
    co, _ = FRAME_FIELDS["crc"]
    header = bytes(data[o:o + FRAME_HEADER_SIZE])
    return crc32c(header[:co] + header[co + 4:] + bytes(data[o + FRAME_HEADER_SIZE:o + FRAME_HEADER_SIZE + f.length]))


def fix_frame_crc(data: bytearray, offset: int) -> None:
    """Recompute the CRC32C of the frame at ``offset`` after its bytes were changed (an attacker can)."""
    length = _u(data, offset, "length")
    f = Frame(offset, data[offset], length, 0, 0, 0)
    co, _ = FRAME_FIELDS["crc"]
    data[offset + co:offset + co + 4] = frame_crc(data, f).to_bytes(4, "little")


def fix_header_crc(data: bytearray) -> None:
    co, _ = HEADER_FIELDS["crc"]
    data[co:co + 4] = crc32c(bytes(data[:co])).to_bytes(4, "little")


def flip_bit(data: bytearray, offset: int, bit: int = 0) -> None:
    data[offset] ^= 1 << bit


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))


def wal_dir(data_dir: str, encrypted: bool = True) -> str:
    return os.path.join(data_dir, ENC_DIR if encrypted else PLAIN_DIR)


def segment_files(data_dir: str, encrypted: bool = True) -> list[str]:
    d = wal_dir(data_dir, encrypted)
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".wal")]


def all_files(root: str) -> list[str]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            out.append(os.path.join(dirpath, n))
    return sorted(out)


def tree_hashes(root: str, exclude=("lock.mdb",)) -> dict[str, str]:
    return {os.path.relpath(p, root): hashlib.sha256(read(p)).hexdigest()
            for p in all_files(root) if os.path.basename(p) not in exclude}


def copy_store(src: str, dst: str) -> str:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------------
# Store helpers
# ---------------------------------------------------------------------------


def open_store(path, *, kek=None, encrypted: bool = True, **opts):
    opts.setdefault("segment_size", SEG_SIZE)
    opts.setdefault("sync", "always")
    if encrypted:
        return walcrypt.open(path, kek=kek if kek is not None else walcrypt.RawKey(KEK_BYTES), **opts)
    return walcrypt.open(path, encrypted=False, **opts)


def read_everything(store) -> tuple[list[Entry], HardState]:
    """Every entry (and its term via term()) plus the hard state; raises what the engine raises."""
    hs, _cs = store.initial_state()
    first, last = store.first_index(), store.last_index()
    entries = store.entries(first, last + 1) if last >= first else []
    for e in entries:
        assert store.term(e.index) == e.term
    return entries, hs


def open_and_read_all(path, **kw) -> tuple[list[Entry], HardState]:
    with open_store(path, **kw) as s:
        return read_everything(s)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/_wal_child.py to completion (bounded by ``timeout``; killed by PID on expiry)."""
    proc = subprocess.Popen([sys.executable, CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(), cwd=REPO_ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
    if check and res.returncode != 0:
        raise AssertionError(f"child {args} failed with {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def spawn_child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CHILD, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), cwd=REPO_ROOT)


def read_lines_until(proc, lines: list[str], pred, deadline: float) -> None:
    """Read a child's stdout lines into ``lines`` until pred(lines) or the deadline (bounded);
    an unterminated last line is kept as "PARTIAL <text>"."""
    import select
    import time
    buf = b""
    while not pred(lines) and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        *done, buf = buf.split(b"\n")
        lines.extend(x.decode() for x in done)
    if buf:
        lines.append("PARTIAL " + buf.decode(errors="replace"))


def rewrite_meta_as(data_dir: str, mac_key: bytes | None, version: int) -> None:
    """A store's meta/ as an older release laid it out (FORMAT.md 9.1, 17): every MAC'd value re-MAC'd
    under that version's MAC domain (``mac_key`` None: keyless); version 1 also has the 24-byte
    compaction record and none of the intent or purge records."""
    import lmdb

    from walcrypt import meta as M
    v2_state_keys = (M.K_CREATING, M.K_SNAP_CREATING, M.K_PURGED, M.K_SNAP_PURGED, M.K_STAGING)
    env = lmdb.open(os.path.join(data_dir, "meta"), max_dbs=8)
    try:
        dbs = {name: env.open_db(name) for name in (M.DB_STORE,) + M.CATALOG_DBS}
        with env.begin(write=True) as txn:
            for db in M.CATALOG_DBS:
                for k, stored in list(txn.cursor(db=dbs[db])):
                    k, value = bytes(k), bytes(stored)[:-M.MAC_SIZE]
                    if version == 1 and db == M.DB_STATE and k in v2_state_keys:
                        txn.delete(k, db=dbs[db])
                        continue
                    if version == 1 and db == M.DB_STATE and k == M.K_COMPACTED:
                        value = value[:24]
                    mac = (M.keyless_mac(db, k, value, version=version) if mac_key is None
                           else M.keyed_mac(mac_key, db, k, value, version=version))
                    txn.put(k, value + mac, db=dbs[db])
            if version == 2:     # a version 2 store sealed its catalog under the old domain
                raw = bytes(txn.get(M.K_COMPACTED, db=dbs[M.DB_STATE]))[:-M.MAC_SIZE]
                assert len(raw) == 24 + M.CATALOG_SIZE
            txn.put(M.K_FORMAT_VERSION, bytes([version]), db=dbs[M.DB_STORE])
    finally:
        env.close()


SNAP_DIR = "snap-v1-encrypted"


def term_entries(lo: int, hi: int, term: int, tag: bytes = b"") -> list[Entry]:
    """Entries [lo, hi) of one term, each naming its index and term (after ``tag``)."""
    return [Entry(i, term, tag + b"entry %d term %d" % (i, term)) for i in range(lo, hi)]


def snap_files(data_dir: str) -> list[str]:
    """The names in an encrypted store's snapshot directory (.broken and .tmp- files included), sorted."""
    d = os.path.join(data_dir, SNAP_DIR)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def flip_byte_near_end(path: str, back: int = 20) -> None:
    """Bit rot: flip one bit ``back`` bytes before the end of a file (inside a snapshot's last chunk)."""
    with open(path, "r+b") as f:
        f.seek(-back, os.SEEK_END)
        b = f.read(1)
        f.seek(-back, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))


def tree_bytes(root: str) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, LMDB's lock file excepted (an open that then fails
    still writes its reader slot there): what "no file changed" compares."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            if n != "lock.mdb":
                p = os.path.join(dirpath, n)
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = f.read()
    return out


def store_with_a_damaged_older_snapshot(data_dir: str, kek) -> str:
    """A store with entries 1..20 and snapshots at 5 and 10 (keep_snapshots=2) whose older snapshot has
    bit rot in its last chunk (open verifies only the newest, so it opens); -> the older file's path."""
    from walcrypt import ConfState, SnapshotMeta
    with walcrypt.open(data_dir, kek=kek, keep_snapshots=2) as s:
        s.save(HardState(1, 1, 20), term_entries(1, 21, 1))
        s.save_snapshot(SnapshotMeta(5, 1, ConfState(voters=(1, 2, 3))), b"A" * 5000)
        s.save_snapshot(SnapshotMeta(10, 1, ConfState(voters=(1, 2, 3))), b"B" * 5000)
        older = s.snapshots.infos[0].path
    flip_byte_near_end(older)
    return older


def files_containing(root: str, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (a plaintext left on disk)."""
    hits = []
    for d, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                if needle in f.read():
                    hits.append(os.path.join(d, name))
    return hits


class GateVFS(VFS):
    """Once armed (``arm()``), the next pwrite waits until ``gate`` is set: a leader held inside its
    write unit while other threads queue; ``entered`` tells that it got there."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def arm(self):
        self.entered.clear()
        self.gate.clear()
        self.armed = True

    def pwrite(self, fd, data, offset):
        if self.armed:
            self.armed = False
            self.entered.set()
            self.gate.wait(10)
        return super().pwrite(fd, data, offset)


# ---------------------------------------------------------------------------
# A key service in process
# ---------------------------------------------------------------------------

class FlakyService:
    """A key service holding one AES-256 key; ``up`` False makes every call fail as a network would."""

    def __init__(self, key: bytes | None = None, name: str = "k1"):
        self._aead = AESGCM(key or os.urandom(32))
        self.name = name
        self.up = True
        self.calls = 0
        self.fail_with: BaseException | None = None

    def _gate(self):
        self.calls += 1
        if not self.up:
            raise ConnectionRefusedError(111, "Connection refused")
        if self.fail_with is not None:
            raise self.fail_with

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        self._gate()
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, plaintext, context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        self._gate()
        try:
            return self._aead.decrypt(blob[:12], blob[12:], context)
        except InvalidTag:
            raise walcrypt.WrongKeyError("the service's key does not open this blob") from None

    def identity(self) -> dict:
        return {"key": self.name}


def flaky_kms(service: FlakyService, attempts: int = 2) -> walcrypt.Kms:
    """A KMS key-encryption key served by ``service`` in process (instead of an entry point), with
    ``attempts`` tries per call and no delay between them."""
    k = walcrypt.Kms("flaky", retry=walcrypt.Retry(attempts=attempts, delay=0.0))
    k._plugin = service
    return k


def in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run ``fn()`` in a daemon thread: (the thread, {"ok": result} or {"error": exception})."""
    out: dict = {}

    def go():
        try:
            out["ok"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            out["error"] = exc
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


# ---------------------------------------------------------------------------
# Interruptions where CPython delivers a signal handler's exception
# ---------------------------------------------------------------------------

def after_call_to(code, name: str) -> int:
    """Offset of the instruction that follows the call of method ``name`` in ``code`` (where CPython
    delivers a pending signal's exception once the call returned: tests/test_exception_injection.py,
    LineInjector)."""
    ins = list(dis.get_instructions(code))
    for k, x in enumerate(ins):
        if x.argval == name and x.opname in ("LOAD_METHOD", "LOAD_ATTR"):
            for j in range(k + 1, len(ins)):
                if ins[j].opname in ("CALL", "CALL_FUNCTION_EX", "CALL_METHOD"):
                    return ins[j + 1].offset
    raise AssertionError(f"no call of {name} in {code.co_name}")


class InterruptAfter:
    """Raises KeyboardInterrupt once, at the instruction after the call of ``name`` in ``code`` (an
    opcode trace event, as the suite's LineInjector raises it), in the thread that enters."""

    def __init__(self, code, name: str):
        self.code, self.name, self.offset, self.fired = code, name, after_call_to(code, name), False

    def _call(self, frame, event, arg):
        if frame.f_code is self.code and not self.fired:
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
            return self._opcode
        return None

    def _opcode(self, frame, event, arg):
        if event == "opcode" and not self.fired and frame.f_lasti == self.offset:
            self.fired = True
            raise KeyboardInterrupt(f"injected after {frame.f_code.co_name}'s {self.name}()")
        return self._opcode

    def __enter__(self):
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)
        return False
