"""The operator command line, run as real subprocesses against real stores.

Every command is run through ``python -m walcrypt.cli`` (and once through the ``walcrypt``
console script).  Stores are built with the public API in this process and closed before
any command touches them.  Read-only commands and every bad input are checked to leave the
store byte for byte unchanged: every file's mode and SHA-256 and every directory entry,
before and after.  Frame offsets are found with ``walcrypt.format``'s struct codecs, the
normative layout, not with the engine's reader.

Golden output: ``tests/golden/inspect.json`` holds ``inspect --json`` of a fixed store with
and without a key, volatile fields (random IDs, timestamps, paths, LMDB page counts)
normalised.  Regenerate it with ``WALCRYPT_UPDATE_GOLDEN=1 python -m pytest tests/test_cli.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import lmdb
import pytest

import walcrypt
from walcrypt import ConfState, Entry, HardState, KeyFile, SnapshotMeta
from walcrypt import format as fmt

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
GOLDEN = os.path.join(TESTS, "golden", "inspect.json")
SEG = 4096
CHUNK = 4096
ENC_WAL, ENC_SNAP = "wal-v1-encrypted", "snap-v1-encrypted"


# ---------------------------------------------------------------------------
# Running the command
# ---------------------------------------------------------------------------

def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WALCRYPT_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def wc(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """Run ``python -m walcrypt.cli ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "walcrypt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=_env(env), timeout=timeout)


def ok(res: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert res.returncode == code, f"exit {res.returncode}, expected {code}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    return res


def one_line_error(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Bad input: exit ``code``, exactly one line on stderr starting 'walcrypt: error:', no traceback."""
    ok(res, code)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("walcrypt: error: "), res.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def tree(root: str) -> dict:
    """Every directory entry under root, with type, mode and (for files) the SHA-256 of the content.

    LMDB's lock file is listed without its content: a reader writes its slot in the reader table
    there (meta.Meta), which is how a read of a running store stays safe."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode) and n == "lock.mdb" and os.path.basename(dirpath) == "meta":
                out[rel] = ("file", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, hashlib.sha256(f.read()).hexdigest())
            else:
                out[rel] = ("dir" if stat.S_ISDIR(st.st_mode) else "other", stat.S_IMODE(st.st_mode))
    return out


class Unchanged:
    """``with Unchanged(path): ...`` asserts that nothing under path (or the file path) changed."""

    def __init__(self, path: str):
        self.path = path

    def _snap(self):
        if os.path.isdir(self.path):
            return tree(self.path)
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    def __enter__(self):
        self.before = self._snap()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            after = self._snap()
            assert after == self.before, f"{self.path} was modified"


# ---------------------------------------------------------------------------
# Building stores (public API, closed before any command runs)
# ---------------------------------------------------------------------------

def data(i: int) -> bytes:
    return b"entry-%05d-" % i + b"v" * 28        # fixed 40 bytes of UTF-8: equal-size records


def snap_bytes(size: int = 3 * CHUNK + 100) -> bytes:
    out, block = bytearray(), b"snapshot"
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def build(path: str, kek_file: str | None, *, batches: int = 30, snapshot_at: int | None = 150,
          binary_at: int | None = None) -> str:
    opts = dict(segment_size=SEG, snapshot_chunk_size=CHUNK, sync="always")
    s = (walcrypt.open(path, kek=KeyFile(kek_file), **opts) if kek_file
         else walcrypt.open(path, encrypted=False, **opts))
    try:
        for b in range(batches):
            lo = b * 10 + 1
            ents = [Entry(i, 1 + i // 100, data(i) if i != binary_at else b"\xff\x00\xfe") for i in range(lo, lo + 10)]
            s.save(hard_state=HardState(ents[-1].term, 1, ents[-1].index), entries=ents)
        if snapshot_at:
            s.save_snapshot(SnapshotMeta(snapshot_at, s.term(snapshot_at), ConfState((1, 2, 3))), snap_bytes())
        s.stable_set(b"CurrentTerm", b"\x03" + bytes(7))
    finally:
        s.close()
    return path


WRITER = textwrap.dedent(r"""
    import os, sys, walcrypt
    from walcrypt import Entry, HardState, KeyFile
    path, key, batches, end = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    s = walcrypt.open(path, kek=KeyFile(key), segment_size=1 << 16, sync="always")
    for _ in range(batches):
        lo = s.last_index() + 1
        s.save(hard_state=HardState(1, 1, lo + 9), entries=[Entry(i, 1, b"entry-%05d" % i) for i in range(lo, lo + 10)])
    print("READY", flush=True)
    if end == "hold":
        sys.stdin.readline()
    os._exit(0)          # no close(): the last segment stays unsealed, as after a crash
""")


def spawn_writer(path: str, key: str, batches: int, end: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, path, key, str(batches), end], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    line = p.stdout.readline()
    assert line.strip() == "READY", p.stderr.read() if p.poll() is not None else line
    return p


def unsealed_store(path: str, key: str, batches: int = 10) -> str:
    p = spawn_writer(path, key, batches, "exit")
    p.wait(timeout=60)
    return path


def frames(seg_path: str) -> list[tuple[int, int, int, int]]:
    """(offset, type, length, index) of each frame, from walcrypt.format's header codec."""
    with open(seg_path, "rb") as f:
        d = f.read()
    out, off = [], fmt.SEGMENT_HEADER_SIZE
    while off + fmt.FRAME_HEADER_SIZE <= len(d) and d[off] != fmt.FRAME_UNWRITTEN:
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(d, off)
        out.append((off, h[0], h[4], h[6]))
        if h[0] == fmt.FRAME_INDEX:
            break
        off = fmt.align_up(off + fmt.FRAME_HEADER_SIZE + h[4])
    return out


def segments(root: str, wal: str = ENC_WAL) -> list[str]:
    d = os.path.join(root, wal)
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".wal")]


def snapshot_files(root: str, snap: str = ENC_SNAP) -> list[str]:
    d = os.path.join(root, snap)
    return [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".snap")]


def edit(path: str, fn) -> None:
    with open(path, "rb") as f:
        d = bytearray(f.read())
    fn(d)
    with open(path, "r+b") as f:
        f.write(d)
        f.truncate(len(d))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("kek", "kek2"):
        p = str(d / name)
        ok(wc("keygen", p))
        out[name] = p
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, keys) -> str:
    """30 batches of 10 entries over several sealed 4 KiB segments, a 3-chunk snapshot at 150, a stable value."""
    root = str(tmp_path_factory.mktemp("pristine") / "store")
    build(root, keys["kek"])
    assert len(segments(root)) >= 5
    return root


@pytest.fixture
def store(pristine, tmp_path) -> str:
    dst = str(tmp_path / "store")
    shutil.copytree(pristine, dst)
    return dst


# ---------------------------------------------------------------------------
# Help, exit codes, the console script
# ---------------------------------------------------------------------------

def test_help_documents_commands_and_exit_codes():
    res = ok(wc("--help"))
    for cmd in ("keygen", "init", "inspect", "verify", "repair", "dump", "rotate-dek", "rotate-kek", "migrate",
                "snapshot", "demo", "bench"):
        assert cmd in res.stdout, cmd
    assert "Exit codes" in res.stdout and "0  ok" in res.stdout and "2  usage errors" in res.stdout
    sub = ok(wc("snapshot", "restore", "--help"))
    assert "Exit codes" in sub.stdout and "--key-file" in sub.stdout


def test_console_script_and_python_m(store, keys):
    script = shutil.which("walcrypt")
    if script is None:
        pytest.skip("the walcrypt console script is not installed")
    res = subprocess.run([script, "verify", store, "--key-file", keys["kek"]], capture_output=True, text=True,
                         env=_env())
    ok(res)
    assert res.stdout.rstrip().endswith("OK")
    res = subprocess.run([sys.executable, "-m", "walcrypt", "--version"], capture_output=True, text=True, env=_env())
    ok(res)
    assert walcrypt.__version__ in res.stdout


# ---------------------------------------------------------------------------
# keygen, init
# ---------------------------------------------------------------------------

def test_keygen_refuses_to_overwrite(tmp_path, keys):
    p = str(tmp_path / "k")
    ok(wc("keygen", p))
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    with Unchanged(p):
        one_line_error(wc("keygen", p), 2, "already exists")
    one_line_error(wc("keygen", tmp_path / "no" / "k"), 2, "does not exist")


def test_init_encrypted_and_plaintext(tmp_path, keys):
    enc, plain = str(tmp_path / "enc"), str(tmp_path / "plain")
    ok(wc("init", enc, "--key-file", keys["kek"]))
    ok(wc("init", plain, "--plaintext"))
    assert stat.S_IMODE(os.stat(enc).st_mode) == 0o700
    with Unchanged(enc):
        one_line_error(wc("init", enc, "--key-file", keys["kek"]), 2, "not empty")
    one_line_error(wc("init", tmp_path / "nokey"), 2, "needs a key")
    assert not os.path.exists(tmp_path / "nokey")
    rep = json.loads(ok(wc("inspect", enc, "--key-file", keys["kek"], "--json")).stdout)
    assert rep["mode"] == "encrypted" and rep["segments"] == [] and rep["log"]["last_index"] == 0
    rep = json.loads(ok(wc("inspect", plain, "--json")).stdout)
    assert rep["mode"] == "plaintext" and rep["authenticated"] is True


def test_key_env_and_passphrase_env(store, keys, tmp_path):
    with open(keys["kek"]) as f:
        key_text = f.read().strip()
    ok(wc("verify", store, "--key-env", "WALCRYPT_TEST_KEK", env={"WALCRYPT_TEST_KEK": key_text}))
    ok(wc("verify", store, env={"WALCRYPT_KEY_FILE": keys["kek"]}))        # --key-file's environment variable
    d = str(tmp_path / "pass")
    ok(wc("init", d, "--passphrase-env", "WALCRYPT_TEST_PASS", env={"WALCRYPT_TEST_PASS": "correct horse"}))
    ok(wc("verify", d, "--passphrase-env", "WALCRYPT_TEST_PASS", env={"WALCRYPT_TEST_PASS": "correct horse"}))
    with Unchanged(d):
        one_line_error(wc("verify", d, "--passphrase-env", "WALCRYPT_TEST_PASS",
                          env={"WALCRYPT_TEST_PASS": "wrong horse"}), 2, "not the one")


def test_kms_plugin(tmp_path):
    """--kms NAME loads a plug-in from the entry-point group walcrypt.kms (here a tiny fake on PYTHONPATH)."""
    site = tmp_path / "site"
    dist = site / "fakekms-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakekms\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[walcrypt.kms]\nfake = fakekms:factory\n")
    (site / "fakekms.py").write_text(textwrap.dedent("""
        import os
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        class _Fake:
            def __init__(self, secret):
                self.aead = AESGCM(bytes.fromhex(secret))
            def wrap(self, plaintext, context):
                n = os.urandom(12)
                return n + self.aead.encrypt(n, plaintext, context)
            def unwrap(self, blob, context):
                return self.aead.decrypt(blob[:12], blob[12:], context)
        def factory(secret="11" * 32):
            return _Fake(secret)
    """))
    env = {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    d = str(tmp_path / "kms-store")
    ok(wc("init", d, "--kms", "fake", env=env))
    ok(wc("verify", d, "--kms", "fake", env=env))
    one_line_error(wc("verify", d, "--kms", "fake", "--kms-option", "secret=" + "22" * 32, env=env), 2, "kms")
    one_line_error(wc("verify", d, "--kms", "nosuch", env=env), 2, "no KMS plug-in named 'nosuch'")


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------

def test_inspect_without_key_is_read_only_and_shows_no_key_material(store, keys):
    with Unchanged(store):
        res = ok(wc("inspect", store))
        rep = json.loads(ok(wc("inspect", store, "--json")).stdout)
    assert "segments (" in res.stdout and "snapshots (1)" in res.stdout and "keyring (2)" in res.stdout
    assert "authenticated  no" in res.stdout
    assert rep["authenticated"] is False and rep["log"]["hard_state"] is None
    assert [s["id"] for s in rep["segments"]] == sorted(s["id"] for s in rep["segments"])
    assert all(s["sealed"] for s in rep["segments"]) and rep["log"]["last_index"] == 300
    assert rep["snapshots"][0]["index"] == 150 and rep["snapshots"][0]["kek_embedded"] is False
    assert {k["purpose"] for k in rep["keyring"]} == {"metadata", "dek"}
    # no key material: neither the KEK nor any wrapped key appears
    env = lmdb.open(os.path.join(store, "meta"), readonly=True, lock=False, max_dbs=8)
    with env.begin() as t:
        wrapped = [bytes(v) for _k, v in t.cursor(db=env.open_db(b"keyring", txn=t, create=False))]
        wrapped.append(bytes(t.get(b"meta_key", db=env.open_db(b"store", txn=t, create=False))))
    env.close()
    with open(keys["kek"], "rb") as f:
        kek_text = f.read().strip().decode()
    for text in (res.stdout, json.dumps(rep)):
        assert kek_text not in text
        for w in wrapped:
            assert w[-48:-16].hex() not in text


def test_inspect_with_key_authenticates(store, keys):
    with Unchanged(store):
        res = ok(wc("inspect", store, "--key-file", keys["kek"]))
        rep = json.loads(ok(wc("inspect", store, "--key-file", keys["kek"], "--json")).stdout)
    assert "authenticated  yes" in res.stdout and "hard state     term=4 vote=1 commit=300" in res.stdout
    assert rep["authenticated"] and rep["log"]["first_index"] == 1 and rep["log"]["last_index"] == 300
    assert rep["log"]["conf_state"] == {"voters": [1, 2, 3], "learners": []}
    dek = [k for k in rep["keyring"] if k["purpose"] == "dek"]
    assert dek[0]["records"] > 0
    one_line_error(wc("inspect", store, "--key-file", keys["kek2"]), 2, "not the one")


def _normalise(obj, root: str):
    ids: dict[str, str] = {}

    def hexid(m):
        return ids.setdefault(m.group(0), f"<id{len(ids) + 1}>")

    def walk(x, key=None):
        if isinstance(x, dict):
            return {k: walk(v, k) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if key == "fingerprint" and isinstance(x, str) and re.fullmatch(r"[0-9a-f]{16}", x):
            return "<fingerprint>"              # of the module's random key (the derivation is pinned elsewhere)
        if isinstance(x, str):
            x = x.replace(root, "<DIR>")
            x = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", x)
            return re.sub(r"\b[0-9a-f]{32}\b", hexid, x)
        if isinstance(x, int) and not isinstance(x, bool) and key and key.endswith("_ns"):
            return "<ns>"
        return x

    out = walk(obj)
    for d in out["directories"]:
        if d["name"] == "meta":
            d["bytes"] = "<lmdb>"             # LMDB page allocation is not part of the contract
    return out


def test_inspect_golden(tmp_path, keys):
    """inspect --json of a fixed store (sealed segments, a compacted prefix, a snapshot, a stable value
    and a DEK rotation waiting for its snapshot) matches tests/golden/inspect.json."""
    root = str(tmp_path / "golden")
    opts = dict(segment_size=SEG, snapshot_chunk_size=CHUNK, sync="always")
    with walcrypt.open(root, kek=KeyFile(keys["kek"]), **opts) as s:
        for b in range(12):
            lo = b * 10 + 1
            s.save(hard_state=HardState(2, 1, lo + 9), entries=[Entry(i, 2, data(i)) for i in range(lo, lo + 10)])
        s.save_snapshot(SnapshotMeta(60, 2, ConfState((1, 2, 3), (4,))), snap_bytes())
        s.compact(40)
        s.stable_set(b"CurrentTerm", b"\x02" + bytes(7))
        s.rotate_dek()                       # no snapshot source: the rotation waits for a snapshot
        s.save(hard_state=HardState(3, 2, 125), entries=[Entry(i, 3, data(i)) for i in range(121, 126)])
    got = {}
    with Unchanged(root):
        for label, extra in (("without_key", []), ("with_key", ["--key-file", keys["kek"]])):
            got[label] = _normalise(json.loads(ok(wc("inspect", root, "--json", *extra)).stdout), root)
    if os.environ.get("WALCRYPT_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=2, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        want = json.load(f)
    assert got == want, "inspect --json differs from tests/golden/inspect.json (WALCRYPT_UPDATE_GOLDEN=1 regenerates)"
    assert got["with_key"]["rotation"]["snapshot_index_needed"] == 120
    assert any("DEK rotation is in flight" in w for w in got["without_key"]["warnings"])


def test_inspect_warnings(tmp_path, keys):
    """Legacy plaintext data, an interrupted migration, .broken files and an export with an embedded KEK
    inside the data directory are all called out."""
    root = str(tmp_path / "s")
    build(root, None, batches=5, snapshot_at=None)
    ok(wc("migrate", root, "--to", "encrypted", "--key-file", keys["kek"]))
    src = build(str(tmp_path / "src"), keys["kek"], batches=5, snapshot_at=20)
    ok(wc("snapshot", "export", src, tmp_path / "exp", "--key-file", keys["kek"], "--embed-kek"))
    shutil.copy(tmp_path / "exp", os.path.join(root, "stray-export"))
    os.mkdir(os.path.join(root, ".migrate-wal"))
    seg = segments(root)[0]
    shutil.copy(seg, seg + ".broken")
    with Unchanged(root):
        rep = json.loads(ok(wc("inspect", root, "--json")).stdout)
    text = "\n".join(rep["warnings"])
    assert "legacy plaintext data" in text
    assert "interrupted migration" in text
    assert ".broken file(s) present" in text
    assert "EMBEDDED KEK" in text and "stray-export" in text


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------

def test_verify_clean_store_is_read_only(store, keys):
    with Unchanged(store):
        res = ok(wc("verify", store, "--key-file", keys["kek"]))
        rep = json.loads(ok(wc("verify", store, "--key-file", keys["kek"], "--json")).stdout)
    assert res.stdout.rstrip().endswith("OK")
    assert rep["ok"] and rep["entries"] == 300 and rep["snapshots"] == 1 and rep["findings"] == []
    assert rep["snapshot_bytes"] == len(snap_bytes())


def test_verify_progress_bar(store, keys):
    res = ok(wc("--progress", "verify", store, "--key-file", keys["kek"]))
    assert "verifying" in res.stderr and "100%" in res.stderr


def _flip_sealed_frame(root):
    seg = segments(root)[-2]          # above the snapshot at 150: damage below it is repairable (FORMAT 11.10)
    off = [f for f in frames(seg) if f[1] == fmt.FRAME_ENTRIES][1][0]
    edit(seg, lambda d: d.__setitem__(off + fmt.FRAME_HEADER_SIZE + 30, d[off + fmt.FRAME_HEADER_SIZE + 30] ^ 0x04))
    return os.path.basename(seg)


def _swap_records(root):
    seg = segments(root)[-2]
    ents = [f for f in frames(seg) if f[1] == fmt.FRAME_ENTRIES]
    (a, la), (b, lb) = ents[0][::2], ents[1][::2]
    assert la == lb
    n = fmt.align_up(fmt.FRAME_HEADER_SIZE + la)

    def swap(d):
        d[a:a + n], d[b:b + n] = d[b:b + n], d[a:a + n]
    edit(seg, swap)
    return os.path.basename(seg)


def _delete_middle_segment(root):
    segs = segments(root)
    victim = segs[len(segs) // 2]
    os.unlink(victim)
    return os.path.basename(victim)


def _edit_manifest(root):
    env = lmdb.open(os.path.join(root, "meta"), max_dbs=8, subdir=True)
    db = env.open_db(b"segments", create=False)
    with env.begin(write=True) as t:
        rows = [(bytes(k), bytearray(v)) for k, v in t.cursor(db=db)]
        k, v = rows[len(rows) // 2]
        v[fmt.MANIFEST_STRUCT.size - 8] ^= 0x01          # the `bytes` counter; the MAC stays as it was
        t.put(k, bytes(v), db=db)
    env.close()
    return "meta"


def _corrupt_snapshot_chunk(root):
    snap = snapshot_files(root)[0]
    size = os.path.getsize(snap)
    edit(snap, lambda d: d.__setitem__(size - 2 * CHUNK, d[size - 2 * CHUNK] ^ 0x80))
    return os.path.basename(snap)


TAMPER = {
    "flip-bit-in-sealed-frame": _flip_sealed_frame,
    "swap-two-records": _swap_records,
    "delete-middle-segment": _delete_middle_segment,
    "edit-lmdb-manifest-value": _edit_manifest,
    "corrupt-snapshot-chunk": _corrupt_snapshot_chunk,
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_verify_finds_tampering(store, keys, case):
    named = TAMPER[case](store)
    with Unchanged(store):
        res = ok(wc("verify", store, "--key-file", keys["kek"]), 1)
        rep = json.loads(ok(wc("verify", store, "--key-file", keys["kek"], "--json"), 1).stdout)
    assert named in res.stdout, res.stdout
    assert res.stdout.rstrip().splitlines()[-1].startswith("FAILED")
    errors = [f for f in rep["findings"] if f["severity"] == "error"]
    assert errors and any(named in (f["path"] or "") for f in errors), errors
    assert not any(f["repairable"] for f in errors)
    if case in ("flip-bit-in-sealed-frame", "swap-two-records"):
        assert any(f["offset"] is not None and f["index"] is not None for f in errors), errors
    if case == "corrupt-snapshot-chunk":
        assert any(f["kind"] == "snapshot" and f["index"] == 150 for f in errors)


# ---------------------------------------------------------------------------
# repair
# ---------------------------------------------------------------------------

def test_repair_truncates_a_torn_tail(tmp_path, keys):
    root = unsealed_store(str(tmp_path / "s"), keys["kek"])
    seg = segments(root)[-1]
    commit = [f for f in frames(seg) if f[1] == fmt.FRAME_COMMIT][-1]
    end = commit[0] + fmt.FRAME_HEADER_SIZE + commit[2]
    edit(seg, lambda d: d.__setitem__(slice(end - 20, end), bytes(20)))   # the last unit's end never reached disk
    with Unchanged(root):
        res = ok(wc("verify", root, "--key-file", keys["kek"]), 1)
    assert "torn tail" in res.stdout and "walcrypt repair" in res.stdout
    res = ok(wc("repair", root, "--key-file", keys["kek"]))
    assert "REPAIRED" in res.stdout and ".broken" in res.stdout and res.stdout.rstrip().endswith("OK")
    assert os.path.exists(seg + ".broken")
    rep = json.loads(ok(wc("verify", root, "--key-file", keys["kek"], "--json")).stdout)
    assert rep["ok"] and rep["last_index"] == 90           # the torn tenth batch was never acknowledged
    dumped = json.loads(ok(wc("dump", root, "--key-file", keys["kek"], "--json")).stdout)
    assert [e["index"] for e in dumped["entries"]] == list(range(1, 91))


def test_repair_refuses_mid_log_corruption(tmp_path, keys):
    root = unsealed_store(str(tmp_path / "s"), keys["kek"])
    seg = segments(root)[-1]
    off = [f for f in frames(seg) if f[1] == fmt.FRAME_ENTRIES][3][0]
    edit(seg, lambda d: d.__setitem__(off + 100, d[off + 100] ^ 0x01))    # later batches were committed after it
    with Unchanged(root):
        res = ok(wc("repair", root, "--key-file", keys["kek"]), 1)
    assert "REFUSED" in res.stdout and "nothing was modified" in res.stdout
    assert "restore the node from a backup export" in res.stdout and "re-replicate" in res.stdout
    assert os.path.basename(seg) in res.stdout and f"offset {off}" in res.stdout


def test_repair_snapshot_fallback_and_refusal(tmp_path, keys):
    """A broken newest snapshot is renamed .broken when an older one can take over; a broken only
    snapshot is refused."""
    two = str(tmp_path / "two")
    opts = dict(segment_size=SEG, snapshot_chunk_size=CHUNK, sync="always")
    with walcrypt.open(two, kek=KeyFile(keys["kek"]), **opts) as s:
        for b in range(20):
            lo = b * 10 + 1
            s.save(hard_state=HardState(1, 1, lo + 9), entries=[Entry(i, 1, data(i)) for i in range(lo, lo + 10)])
            if b == 9:
                s.save_snapshot(SnapshotMeta(100, 1, ConfState((1,))), snap_bytes())
        s.save_snapshot(SnapshotMeta(180, 1, ConfState((1,))), snap_bytes())
    one = str(tmp_path / "one")
    build(one, keys["kek"], batches=10, snapshot_at=50)
    for root in (two, one):
        _corrupt_snapshot_chunk_newest(root)
    with Unchanged(one):
        res = ok(wc("repair", one, "--key-file", keys["kek"]), 1)
    assert "REFUSED" in res.stdout and "snapshot chunk" in res.stdout
    newest = snapshot_files(two)[-1]
    res = ok(wc("repair", two, "--key-file", keys["kek"]))
    assert "REPAIRED" in res.stdout and os.path.exists(newest + ".broken") and not os.path.exists(newest)
    rep = json.loads(ok(wc("inspect", two, "--key-file", keys["kek"], "--json")).stdout)
    assert [s["index"] for s in rep["snapshots"]] == [100] and rep["log"]["last_index"] == 200


def _corrupt_snapshot_chunk_newest(root):
    snap = snapshot_files(root)[-1]
    size = os.path.getsize(snap)
    edit(snap, lambda d: d.__setitem__(size - 100, d[size - 100] ^ 0x01))


def test_repair_with_nothing_to_repair_writes_nothing(store, keys):
    with Unchanged(store):
        res = ok(wc("repair", store, "--key-file", keys["kek"]))
    assert "nothing to repair" in res.stdout


# ---------------------------------------------------------------------------
# dump
# ---------------------------------------------------------------------------

def test_dump_text_json_ranges_and_binary(tmp_path, keys):
    root = build(str(tmp_path / "s"), keys["kek"], batches=5, snapshot_at=None, binary_at=7)
    with Unchanged(root):
        res = ok(wc("dump", root, "--key-file", keys["kek"], "--from", 6, "--to", 8))
        full = json.loads(ok(wc("dump", root, "--key-file", keys["kek"], "--json")).stdout)
        one_line_error(wc("dump", root, "--key-file", keys["kek"], "--to", 51), 2, "beyond the last index 50")
    assert "hard state: term=1 vote=1 commit=50" in res.stdout
    lines = [ln.split("\t") for ln in res.stdout.splitlines() if ln[:1].isdigit()]
    assert [ln[0] for ln in lines] == ["6", "7", "8"]
    assert lines[1][3] == "base64:/wD+" and lines[0][3] == json.dumps(data(6).decode())
    assert full["hard_state"] == {"term": 1, "vote": 1, "commit": 50}
    assert [e["index"] for e in full["entries"]] == list(range(1, 51))
    assert full["entries"][6] == {"index": 7, "term": 1, "base64": "/wD+"}
    assert full["entries"][0] == {"index": 1, "term": 1, "text": data(1).decode()}


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------

def test_rotate_dek_reencrypts_everything(store, keys):
    before = json.loads(ok(wc("dump", store, "--key-file", keys["kek"], "--json")).stdout)
    old = {k["key_id"] for k in json.loads(ok(wc("inspect", store, "--json")).stdout)["keyring"]
           if k["purpose"] == "dek"}
    res = json.loads(ok(wc("rotate-dek", store, "--key-file", keys["kek"], "--json")).stdout)
    assert res["active_key_id"] not in old and set(res["retired_key_ids"]) == old
    rep = json.loads(ok(wc("inspect", store, "--key-file", keys["kek"], "--json")).stdout)
    assert {s["key_id"] for s in rep["segments"]} == {res["active_key_id"]}
    assert {s["key_id"] for s in rep["snapshots"]} == {res["active_key_id"]}
    assert {k["state"] for k in rep["keyring"] if k["key_id"] in old} == {"destroyed"}
    assert json.loads(ok(wc("dump", store, "--key-file", keys["kek"], "--json")).stdout) == before
    ok(wc("verify", store, "--key-file", keys["kek"]))


def test_rotate_kek(store, keys, tmp_path):
    one_line_error(wc("rotate-kek", store, "--key-file", keys["kek"]), 2, "--new-key-file")
    with Unchanged(store):
        one_line_error(wc("rotate-kek", store, "--key-file", keys["kek"], "--new-key-file", keys["kek"]), 2, "same")
        one_line_error(wc("rotate-kek", store, "--key-file", keys["kek"], "--new-key-file", tmp_path / "none"), 2,
                       "does not exist")
    ok(wc("rotate-kek", store, "--key-file", keys["kek"], "--new-key-file", keys["kek2"]))
    ok(wc("verify", store, "--key-file", keys["kek2"]))
    with Unchanged(store):
        one_line_error(wc("verify", store, "--key-file", keys["kek"]), 2, "not the one")


# ---------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------

def test_migrate_both_ways(tmp_path, keys):
    root = build(str(tmp_path / "s"), None, batches=8, snapshot_at=40)
    plain = json.loads(ok(wc("dump", root, "--json")).stdout)
    res = ok(wc("--progress", "migrate", root, "--to", "encrypted", "--key-file", keys["kek"], "--remove-source"))
    assert "migrating to encrypted" in res.stderr and "removed wal-v1/, snap-v1/" in res.stdout
    assert not os.path.exists(os.path.join(root, "wal-v1"))
    assert json.loads(ok(wc("dump", root, "--key-file", keys["kek"], "--json")).stdout) == plain
    ok(wc("verify", root, "--key-file", keys["kek"]))
    with Unchanged(root):
        one_line_error(wc("migrate", root, "--to", "plaintext", "--key-file", keys["kek"]), 2, "--yes")
        one_line_error(wc("migrate", root, "--to", "plaintext", "--yes"), 2, "give its key")
    ok(wc("migrate", root, "--to", "plaintext", "--key-file", keys["kek"], "--yes"))
    assert os.path.isdir(os.path.join(root, ENC_WAL))            # kept: downgrade stays possible
    assert json.loads(ok(wc("dump", root, "--json")).stdout) == plain
    ok(wc("migrate", root, "--to", "plaintext", "--remove-source"))
    assert not os.path.exists(os.path.join(root, ENC_WAL))


# ---------------------------------------------------------------------------
# snapshots: export, inspect, redact, restore
# ---------------------------------------------------------------------------

def test_snapshot_backup_flow(store, keys, tmp_path):
    exp, emb = str(tmp_path / "node.wcx"), str(tmp_path / "node-kek.wcx")
    with Unchanged(store):
        ok(wc("snapshot", "export", store, exp, "--key-file", keys["kek"]))
        res = ok(wc("snapshot", "export", store, emb, "--key-file", keys["kek"], "--embed-kek"))
        one_line_error(wc("snapshot", "export", store, exp, "--key-file", keys["kek"]), 2, "already exists")
    assert "WARNING" in res.stderr and "embeds the KEK" in res.stderr
    assert stat.S_IMODE(os.stat(exp).st_mode) == 0o600

    with Unchanged(exp):
        plain = ok(wc("snapshot", "inspect", exp))
        info = json.loads(ok(wc("snapshot", "inspect", exp, "--key-file", keys["kek"], "--json")).stdout)
    assert "KEK embedded   no" in plain.stdout and "WARNING" not in plain.stderr
    assert info["verified"] and info["index"] == 150 and info["data_bytes"] == len(snap_bytes())

    with Unchanged(emb):
        warned = ok(wc("snapshot", "inspect", emb))
        info = json.loads(ok(wc("snapshot", "inspect", emb, "--json")).stdout)
    assert "WARNING" in warned.stderr and "embeds the key-encryption key" in warned.stderr
    assert "KEK embedded   YES" in warned.stdout
    assert info["kek_embedded"] and info["verified"] and info["warnings"]

    kek_out = str(tmp_path / "saved-kek")
    ok(wc("snapshot", "redact", emb, "--kek-out", kek_out))
    assert stat.S_IMODE(os.stat(kek_out).st_mode) == 0o600
    after = ok(wc("snapshot", "inspect", emb))
    assert "WARNING" not in after.stderr and "KEK embedded   no" in after.stdout
    assert "nothing to redact" in ok(wc("snapshot", "redact", emb)).stdout

    new = str(tmp_path / "restored")
    res = ok(wc("snapshot", "restore", exp, new, "--key-file", kek_out))     # the saved KEK is the same KEK
    assert "restored the snapshot at index 150" in res.stdout
    rep = json.loads(ok(wc("inspect", new, "--key-file", keys["kek"], "--json")).stdout)
    assert rep["snapshots"][0]["index"] == 150 and rep["log"]["first_index"] == 151
    ok(wc("verify", new, "--key-file", keys["kek"]))
    with Unchanged(new):
        one_line_error(wc("snapshot", "restore", exp, new, "--key-file", keys["kek"]), 2, "not empty")


def test_snapshot_inspect_raw_snapshot_file(store, keys):
    snap = snapshot_files(store)[0]
    with Unchanged(store):
        bare = json.loads(ok(wc("snapshot", "inspect", snap, "--json")).stdout)
        full = json.loads(ok(wc("snapshot", "inspect", snap, "--key-file", keys["kek"], "--json")).stdout)
        one_line_error(wc("snapshot", "inspect", snap, "--key-file", keys["kek2"]), 2, "not the one")
    assert bare["kind"] == "snapshot" and not bare["verified"] and not bare["kek_embedded"]
    assert full["verified"] and full["data_bytes"] == len(snap_bytes()) and full["index"] == 150


def test_snapshot_restore_failure_leaves_nothing(store, keys, tmp_path):
    exp = str(tmp_path / "node.wcx")
    ok(wc("snapshot", "export", store, exp, "--key-file", keys["kek"]))
    size = os.path.getsize(exp)
    edit(exp, lambda d: d.__setitem__(size - 100, d[size - 100] ^ 1))
    with Unchanged(str(tmp_path)):
        one_line_error(wc("snapshot", "restore", exp, tmp_path / "new", "--key-file", keys["kek"]), 1, exp)
        one_line_error(wc("snapshot", "restore", exp, tmp_path / "new2", "--key-file", keys["kek2"]), 2, "not the one")
        one_line_error(wc("snapshot", "restore", exp, tmp_path / "new3"), 2, "embeds no KEK")
    assert not os.path.exists(tmp_path / "new")


# ---------------------------------------------------------------------------
# Bad input: one line, the right exit code, nothing modified
# ---------------------------------------------------------------------------

def _garbage_lmdb(root):
    with open(os.path.join(root, "meta", "data.mdb"), "r+b") as f:
        f.seek(0)
        f.write(os.urandom(8192))


def _truncate_segment_header(root):
    seg = segments(root)[0]
    with open(seg, "r+b") as f:
        f.truncate(60)


BAD = [
    # name, prepare(root) -> argv after the command, expected exit code, words in the message
    ("missing-directory", lambda r, k: ["verify", r + "-nope", "--key-file", k["kek"]], 2, ["does not exist"]),
    ("file-not-a-store", lambda r, k: ["inspect", os.path.join(r, "LOCK")], 2, ["not a directory"]),
    ("directory-not-a-store", lambda r, k: ["dump", os.path.join(r, ENC_WAL), "--key-file", k["kek"]], 2,
     ["not a walcrypt data directory"]),
    ("missing-key", lambda r, k: ["dump", r], 2, ["encrypted", "--key-file"]),
    ("wrong-key", lambda r, k: ["dump", r, "--key-file", k["kek2"]], 2, ["not the one"]),
    ("two-keys", lambda r, k: ["verify", r, "--key-file", k["kek"], "--key-env", "X"], 2, ["only one"]),
    ("missing-key-file", lambda r, k: ["verify", r, "--key-file", r + ".kek"], 2, ["does not exist", "keygen"]),
    ("key-env-unset", lambda r, k: ["verify", r, "--key-env", "WALCRYPT_TEST_UNSET"], 2, ["not set"]),
    ("damaged-lmdb", lambda r, k: (_garbage_lmdb(r), ["verify", r, "--key-file", k["kek"]])[1], 1,
     ["metadata", "restore"]),
    ("damaged-lmdb-rotate", lambda r, k: (_garbage_lmdb(r), ["rotate-dek", r, "--key-file", k["kek"]])[1], 1,
     ["metadata"]),
    ("truncated-segment-dump", lambda r, k: (_truncate_segment_header(r), ["dump", r, "--key-file", k["kek"]])[1],
     1, ["segment header is truncated"]),
    ("truncated-segment-rotate", lambda r, k: (_truncate_segment_header(r),
                                               ["rotate-dek", r, "--key-file", k["kek"]])[1], 1, ["truncated"]),
    ("wrong-key-rotate-dek", lambda r, k: ["rotate-dek", r, "--key-file", k["kek2"]], 2, ["not the one"]),
    ("wrong-key-rotate-kek", lambda r, k: ["rotate-kek", r, "--key-file", k["kek2"], "--new-key-file", k["kek"]], 2,
     ["not the one"]),
    ("wrong-key-migrate", lambda r, k: ["migrate", r, "--to", "plaintext", "--yes", "--key-file", k["kek2"]], 2,
     ["not the one"]),
    ("dump-below-first", lambda r, k: ["dump", r, "--key-file", k["kek"], "--from", 1, "--to", 0], 0, []),
    ("snapshot-inspect-not-a-snapshot", lambda r, k: ["snapshot", "inspect", os.path.join(r, "LOCK")], 2,
     ["not a walcrypt snapshot"]),
    ("migrate-to-plaintext-without-yes", lambda r, k: ["migrate", r, "--to", "plaintext", "--key-file", k["kek"]],
     2, ["--yes"]),
    ("init-existing-store", lambda r, k: ["init", r, "--key-file", k["kek"]], 2, ["not empty"]),
]


@pytest.mark.parametrize("name,prepare,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(store, keys, name, prepare, code, words):
    argv = prepare(store, keys)
    with Unchanged(store):
        res = wc(*argv)
        if code == 0:
            ok(res)
        else:
            one_line_error(res, code, *words)


def test_bad_key_file_mode(store, keys, tmp_path):
    loose = str(tmp_path / "loose")
    shutil.copy(keys["kek"], loose)
    os.chmod(loose, 0o644)
    with Unchanged(store):
        one_line_error(wc("verify", store, "--key-file", loose), 2, "chmod 600")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything; permissions cannot be denied")
def test_no_permission(store, keys):
    os.chmod(store, 0o000)
    try:
        for cmd in (["inspect", store], ["verify", store, "--key-file", keys["kek"]]):
            one_line_error(wc(*cmd), 2, "no permission")
    finally:
        os.chmod(store, 0o700)


def test_debug_shows_a_traceback(tmp_path):
    res = wc("--debug", "verify", tmp_path / "nope")
    assert res.returncode == 2 and "Traceback" in res.stderr and "walcrypt: error:" in res.stderr


def test_store_locked_by_a_running_process(tmp_path, keys):
    root = unsealed_store(str(tmp_path / "s"), keys["kek"], batches=3)
    holder = spawn_writer(root, keys["kek"], 1, "hold")
    try:
        with Unchanged(root):
            for argv in (["repair", root], ["dump", root], ["rotate-dek", root],
                         ["migrate", root, "--to", "plaintext", "--yes"]):
                line = one_line_error(wc(*argv, "--key-file", keys["kek"]), 2, "in use by process", "stop it first")
                assert str(holder.pid) in line
            # verify and export read a running store (tests/test_online.py runs them against a busy writer)
            res = ok(wc("verify", root, "--key-file", keys["kek"]))
            assert res.stdout.splitlines()[-1] == "OK", res.stdout
            one_line_error(wc("snapshot", "export", root, str(tmp_path / "x.wcx"), "--key-file", keys["kek"]), 2,
                           "no snapshot to export")
            rep = json.loads(ok(wc("inspect", root, "--json")).stdout)
        assert rep["lock"] == {"held": True, "pids": [holder.pid]}
        assert any(f"in use by process {holder.pid}" in w for w in rep["warnings"])
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdin.close()
        holder.stdout.close()
        holder.stderr.close()


# ---------------------------------------------------------------------------
# demo, bench
# ---------------------------------------------------------------------------

def test_demo(tmp_path):
    res = ok(wc("demo", "--entries", 300, "--json", "--dir", tmp_path / "demo"))
    assert json.loads(res.stdout)["ok"] is True


def test_bench_runs_the_quick_suite_from_a_checkout(tmp_path):
    res = ok(wc("bench", "--", "--tiny", "--no-save", "--only", "entry=1k", cwd=str(tmp_path)))
    assert "cases measured" in res.stdout and "0 errors" in res.stdout


def test_bench_without_a_checkout_exits_2(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(REPO, "walcrypt"), pkg / "walcrypt")
    (tmp_path / "cwd").mkdir()
    res = subprocess.run([sys.executable, "-m", "walcrypt.cli", "bench"], capture_output=True, text=True,
                         cwd=str(tmp_path / "cwd"), env=_env({"PYTHONPATH": str(pkg)}))
    one_line_error(res, 2, "source checkout")


def test_readme_documents_every_command_with_an_example():
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Command line"):]
    section = section[:section.index("\n## ", 3)]
    examples = "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S))
    listed = set(re.findall(r"^  ([a-z][a-z-]*)  ", ok(wc("--help")).stdout.split("Commands:")[1], re.M))
    assert {"keygen", "init", "inspect", "verify", "repair", "dump", "rotate-dek", "rotate-kek", "migrate",
            "snapshot", "demo", "bench"} <= listed, listed
    for cmd in sorted(listed - {"snapshot"}) + ["snapshot export", "snapshot inspect", "snapshot redact",
                                                 "snapshot restore"]:
        assert f"walcrypt {cmd} " in examples or f"walcrypt {cmd}\n" in examples, f"no README example for {cmd}"
    for code in ("| 0 |", "| 1 |", "| 2 |"):
        assert code in section
