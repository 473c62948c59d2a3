"""Backup, verify and inspect on a running store (issue 11, items 1 and 2).

A real child process (tests/_online_child.py) writes the store the whole time: it appends,
replaces log suffixes, saves snapshots with keep_snapshots=2 (retention deletes the older
ones), compacts (purging segments), rotates its data key and rolls 16 KiB segments.  Against
it, without any lock:

* ``walcrypt snapshot export`` succeeds every round, and every export restores into a fresh
  directory holding exactly the snapshot data its index and term call for;
* ``walcrypt verify`` finds nothing (notes about what the writer was changing are allowed,
  errors and warnings are not);
* keyless ``walcrypt inspect`` reports no error and no warning but the two that state facts
  (the process holding the store, a DEK rotation in flight);
* a byte flipped in a sealed segment while the writer runs makes ``verify`` exit 1 naming it;
* a file the writer removes between a reader's metadata read and its opening of the file is
  not a finding (export takes the newer snapshot), a file deleted behind the writer's back is;
* a reader never takes over LMDB's lock file from the writer (its transaction IDs only grow);
* in the writer's own process, ``Store.export_snapshot`` (the pysyncobj node's export) races
  snapshot retention safely.

Most rounds run the commands in this process (click's CliRunner, the same code as the command
line); a few go through real ``python -m walcrypt.cli`` processes.  No timing is asserted; every
loop is bounded.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner

import walcrypt
from walcrypt import ConfState, Entry, HardState, SnapshotMeta, backup
from walcrypt import format as fmt
from walcrypt import layout
from walcrypt import meta as M
from walcrypt.check import check
from walcrypt.cli import main as cli_main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _online_child import CONF, snapshot_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(REPO, "tests", "_online_child.py")
ROUNDS = 200
SUBPROCESS_ROUNDS = 3
FACTS = ("in use by process", "DEK rotation is in flight")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _readline(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the writer did not answer in time"
    line = proc.stdout.readline()
    assert line, "the writer exited: " + proc.stderr.read()
    return line.strip()


@pytest.fixture
def live_store(tmp_path):
    """(data directory, key file, the writer process) - the writer is killed by its PID at the end."""
    key = str(tmp_path / "kek")
    walcrypt.keys.generate_key_file(key)
    root = str(tmp_path / "node")
    with walcrypt.open(root, kek=walcrypt.KeyFile(key)):
        pass
    proc = subprocess.Popen([sys.executable, CHILD, root, key], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    try:
        assert _readline(proc) == "READY"
        yield root, key, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def _cli(runner: CliRunner, *args: str):
    return runner.invoke(cli_main, list(args), catch_exceptions=False)


def _wc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "walcrypt.cli", *args], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=300)


def _check_export(out: str, key: str, restore_dir: str) -> int:
    """The export restores; the restored snapshot holds the data its index and term call for."""
    kek = walcrypt.KeyFile(key)
    res = backup.restore_export(out, restore_dir, kek=kek)
    with walcrypt.open(restore_dir, kek=kek) as s:
        snap = s.snapshot()
        assert (snap.meta.index, snap.meta.term) == (res["index"], res["term"])
        assert snap.meta.conf_state == CONF
        assert snap.data == snapshot_data(snap.meta.index, snap.meta.term)
        assert s.first_index() == snap.meta.index + 1
    return res["index"]


def _check_verify(doc: dict, where: str) -> None:
    bad = [f for f in doc["findings"] if f["severity"] != "note"]
    assert doc["ok"] and not bad, f"{where}: verify reported {json.dumps(bad, indent=1)}"
    assert doc["segments"] >= 1 and doc["snapshots"] >= 1, doc


def _check_inspect(doc: dict, where: str) -> None:
    assert doc["errors"] == [], f"{where}: inspect reported errors {doc['errors']}"
    odd = [w for w in doc["warnings"] if not any(f in w for f in FACTS)]
    assert odd == [], f"{where}: inspect warned {odd}"
    for row in doc["segments"]:
        assert not row.get("missing"), row
    for row in doc["snapshots"]:
        assert not row.get("missing"), row


def test_export_verify_inspect_against_a_running_writer(tmp_path, live_store):
    root, key, proc = live_store
    runner = CliRunner()
    exported = []
    for r in range(ROUNDS):
        out = str(tmp_path / f"export-{r}.wcx")
        if r < SUBPROCESS_ROUNDS:
            res = _wc("snapshot", "export", root, out, "--key-file", key)
            assert res.returncode == 0, res.stderr
            v = _wc("verify", root, "--key-file", key, "--json")
            assert v.returncode == 0, v.stdout + v.stderr
            i = _wc("inspect", root, "--json")
            assert i.returncode == 0, i.stdout + i.stderr
            vdoc, idoc = json.loads(v.stdout), json.loads(i.stdout)
        else:
            res = _cli(runner, "snapshot", "export", root, out, "--key-file", key)
            assert res.exit_code == 0, res.output
            v = _cli(runner, "verify", root, "--key-file", key, "--json")
            assert v.exit_code == 0, v.output
            i = _cli(runner, "inspect", root, "--json")
            assert i.exit_code == 0, i.output
            vdoc, idoc = json.loads(v.stdout), json.loads(i.stdout)
        _check_verify(vdoc, f"round {r}")
        _check_inspect(idoc, f"round {r}")
        exported.append(_check_export(out, key, str(tmp_path / f"restored-{r}")))
        os.unlink(out)
        assert proc.poll() is None, "the writer stopped: " + proc.stderr.read()
    # The writer made progress during the rounds: the exports are of many different snapshots.
    assert len(set(exported)) > 1, exported
    # With a key, inspect says what it read (or that the store changed under it), never an error.
    for _ in range(3):
        i = _cli(runner, "inspect", root, "--json", "--key-file", key)
        assert i.exit_code == 0, i.output
        doc = json.loads(i.stdout)
        _check_inspect(doc, "keyed inspect")
        if doc["authenticated"]:
            assert all(row["checked"] in ("index frame", "every record", None) for row in doc["segments"])


def _sealed_segment(root: str) -> str | None:
    """A segment the manifest calls sealed (holding a few entries), read as a reader would."""
    m = M.Meta(os.path.join(root, layout.META_DIR), readonly=True)
    try:
        with m.read() as r:
            rows = r.items(M.DB_SEGMENTS, verify=False)
    finally:
        m.close()
    from walcrypt.segment_codec import segment_file_name
    for k, v in sorted(rows, reverse=True):
        rec = M.decode_manifest(v, m.path)
        if rec["state"] == fmt.SEG_SEALED and rec["last_index"] >= rec["base_index"] + 3:
            return os.path.join(root, layout.WAL_ENCRYPTED, segment_file_name(int.from_bytes(k, "big"),
                                                                              rec["base_index"]))
    return None


def _entries_frame_payload_offset(path: str) -> int:
    """An offset inside the ciphertext of an ENTRIES frame in the middle of a segment."""
    with open(path, "rb") as f:
        d = f.read()
    off, frames = fmt.SEGMENT_HEADER_SIZE, []
    while off + fmt.FRAME_HEADER_SIZE <= len(d) and d[off] != fmt.FRAME_UNWRITTEN:
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(d, off)
        if h[0] == fmt.FRAME_INDEX:
            break
        if h[0] == fmt.FRAME_ENTRIES:
            frames.append((off, h[4]))
        off = fmt.align_up(off + fmt.FRAME_HEADER_SIZE + h[4])
    off, length = frames[len(frames) // 2]
    return off + fmt.FRAME_HEADER_SIZE + length // 2


def test_verify_finds_a_byte_flipped_in_a_sealed_segment_of_a_running_store(tmp_path, live_store):
    root, key, proc = live_store
    proc.stdin.write("quiet\n")              # no more compaction: the sealed segment stays
    proc.stdin.flush()
    assert _readline(proc) == "QUIET"
    runner = CliRunner()
    v = _cli(runner, "verify", root, "--key-file", key, "--json")
    assert v.exit_code == 0, v.output
    victim = None
    for _ in range(1200):                    # the writer rolls a segment within a second or so (bounded)
        victim = _sealed_segment(root)
        if victim is not None:
            break
        threading.Event().wait(0.05)
    assert victim is not None, "the writer sealed no segment"
    at = _entries_frame_payload_offset(victim)
    with open(victim, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))
    assert proc.poll() is None
    for res in (_cli(runner, "verify", root, "--key-file", key, "--json"),
                _wc("verify", root, "--key-file", key, "--json")):
        code = res.exit_code if hasattr(res, "exit_code") else res.returncode
        assert code == 1, res.stdout
        doc = json.loads(res.stdout)
        errors = [f for f in doc["findings"] if f["severity"] == "error"]
        assert errors and all(f["path"] == victim for f in errors), errors
        assert any(f["offset"] is not None and f["offset"] <= at for f in errors), errors
    text = _cli(runner, "verify", root, "--key-file", key)
    assert text.exit_code == 1 and os.path.relpath(victim, root) in text.stdout, text.stdout
    assert proc.poll() is None, "the writer stopped: " + proc.stderr.read()


def test_in_process_export_while_another_thread_saves_snapshots(tmp_path):
    """Store.export_snapshot (what the pysyncobj adapter's export calls) while a thread of the same
    process saves snapshots with keep_snapshots=1: retention deletes the file of the snapshot an
    export has just picked; the export takes the newer one, and each export restores."""
    key = walcrypt.RawKey(bytes(range(32)))
    root = str(tmp_path / "node")
    s = walcrypt.open(root, kek=key, keep_snapshots=1, segment_size=16 << 10, snapshot_chunk_size=512)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(1, 100_000):                # bounded; stopped by the event long before
                if stop.is_set():
                    return
                s.save(hard_state=HardState(1, 1, i), entries=[Entry(i, 1, b"e%d" % i)])
                s.save_snapshot(SnapshotMeta(i, 1, CONF), snapshot_data(i, 1))
                if i > 2:
                    s.compact(i - 1)
        except BaseException as exc:                    # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(3000):                           # until the first snapshot exists (bounded)
            if s.snapshot() is not None or not t.is_alive():
                break
            stop.wait(0.01)
        seen = set()
        for r in range(60):
            out = str(tmp_path / f"x{r}.wcx")
            info = s.export_snapshot(out)
            seen.add(info["index"])
            res = backup.restore_export(out, str(tmp_path / f"r{r}"), kek=key)
            with walcrypt.open(str(tmp_path / f"r{r}"), kek=key) as restored:
                snap = restored.snapshot()
                assert snap.data == snapshot_data(snap.meta.index, snap.meta.term) and snap.meta.index == res["index"]
            os.unlink(out)
    finally:
        stop.set()
        t.join(timeout=120)
        s.close()
    assert not errors, errors
    assert len(seen) > 1, seen


def test_pysyncobj_node_exports_its_newest_snapshot(tmp_path):
    pytest.importorskip("pysyncobj")
    from walcrypt.adapters.pysyncobj import walcrypt_conf
    key = walcrypt.RawKey(bytes(range(32)))
    conf = walcrypt_conf(str(tmp_path / "node"), kek=key)
    node = conf.walcrypt
    with pytest.raises(walcrypt.UsageError):
        node.export_snapshot(str(tmp_path / "early.wcx"))       # the SyncObj has not opened the store
    node.open_journal()
    try:
        node.store.save(hard_state=HardState(1, 1, 2), entries=[Entry(1, 1, b"a"), Entry(2, 1, b"b")])
        node.store.save_snapshot(SnapshotMeta(2, 1, CONF), snapshot_data(2, 1))
        info = node.export_snapshot(str(tmp_path / "n.wcx"))
        assert info["index"] == 2
    finally:
        node.store.close()
    res = backup.restore_export(str(tmp_path / "n.wcx"), str(tmp_path / "restored"), kek=key)
    assert res["index"] == 2 and res["data_bytes"] == len(snapshot_data(2, 1))


def _posix_lock_pids(path: str) -> set[int] | None:
    """PIDs holding a POSIX record lock on ``path`` (from /proc/locks), None without it."""
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ino = os.stat(path).st_ino
    pids = set()
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "POSIX":
            continue
        if int(parts[5].rsplit(":", 1)[1]) == ino:
            pids.add(int(parts[4]))
    return pids


def test_readers_never_take_over_the_lmdb_lock_file_of_a_running_writer(tmp_path, live_store):
    """LMDB tells whether other processes use lock.mdb by POSIX record locks, which a process loses
    when it closes *any* descriptor of the file.  The writer keeps its locks for as long as its
    environment is open (the pinned descriptors are closed after the environment), so a reader
    opening the environment with its lock file never takes the writer for gone and never
    re-initialises the lock file under it: the writer's transaction IDs only grow, and the reader
    shows up in the reader table while it reads."""
    root, key, proc = live_store
    lock = os.path.join(root, layout.META_DIR, "lock.mdb")
    holders = _posix_lock_pids(lock)
    if holders is None:
        pytest.skip("no /proc/locks")
    assert proc.pid in holders, holders
    seen = []
    for r in range(40):
        m = M.Meta(os.path.join(root, layout.META_DIR), readonly=True)
        try:
            assert m.locked
            with m.env.begin() as txn:
                seen.append(txn.id())
                assert str(os.getpid()) in m.env.readers()
            assert os.getpid() in _posix_lock_pids(lock)
        finally:
            m.close()
        if r % 10 == 9:
            assert check(root, kek=walcrypt.KeyFile(key)).ok
        assert proc.pid in _posix_lock_pids(lock)
    assert seen == sorted(seen) and seen[-1] > seen[0], seen
    assert proc.poll() is None


def _ask(proc: subprocess.Popen, command: str, answer: str) -> None:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    line = _readline(proc)                  # the writer prints nothing but its answers
    assert line == answer, (command, line)


def test_export_takes_the_newer_snapshot_when_retention_deleted_the_one_it_picked(tmp_path, live_store,
                                                                                   monkeypatch):
    """Deterministically: between the metadata read and the opening of the newest snapshot's file,
    the writer saves two more snapshots (retention, keep 2, deletes the one picked).  The export
    finds the file gone, a fresh read without its record, and exports the newer snapshot."""
    from walcrypt import online
    root, key, proc = live_store
    _ask(proc, "quiet", "QUIET")
    real_pin = online.PinnedVFS.pin
    picked = []

    def pin(self, path):
        if path.endswith(".snap") and not picked:
            picked.append(path)
            _ask(proc, "snapshots 2", "DONE")
            assert not os.path.exists(path)
        return real_pin(self, path)

    monkeypatch.setattr(online.PinnedVFS, "pin", pin)
    out = str(tmp_path / "x.wcx")
    info = backup.export_store(root, out, kek=walcrypt.KeyFile(key))
    assert picked and not os.path.exists(picked[0]), picked
    assert _check_export(out, key, str(tmp_path / "restored")) == info["index"]
    assert int(os.path.basename(picked[0])[17:33], 16) < info["index"]


def test_verify_tells_removed_meanwhile_from_missing(tmp_path, live_store, monkeypatch):
    """A segment the writer purges between verify's metadata read and its opening of the file is
    not a finding (its manifest record is gone too); a sealed segment file deleted behind the
    writer's back (its record still there) is reported missing."""
    from walcrypt import online
    root, key, proc = live_store
    _ask(proc, "quiet", "QUIET")
    real_pin = online.PinnedVFS.pin
    purged = []

    def pin(self, path):
        if path.endswith(".wal") and not purged:
            purged.append(path)
            _ask(proc, "snapshots 3", "DONE")     # compaction up to the newest snapshot purges this one
        return real_pin(self, path)

    for _ in range(1200):                    # until the oldest segment is sealed (bounded)
        if _sealed_segment(root) is not None:
            break
        threading.Event().wait(0.05)
    monkeypatch.setattr(online.PinnedVFS, "pin", pin)
    report = check(root, kek=walcrypt.KeyFile(key))
    assert purged and not os.path.exists(purged[0])
    assert report.ok and not [f for f in report.findings if f.severity != "note"], report.to_dict()
    monkeypatch.setattr(online.PinnedVFS, "pin", real_pin)

    victim = None
    for _ in range(1200):                    # the writer seals a segment within a second or so (bounded)
        victim = _sealed_segment(root)
        if victim is not None:
            break
        threading.Event().wait(0.05)
    assert victim is not None
    os.unlink(victim)
    res = _cli(CliRunner(), "verify", root, "--key-file", key, "--json")
    assert res.exit_code == 1, res.output
    errors = [f for f in json.loads(res.stdout)["findings"] if f["severity"] == "error"]
    assert any(f["path"] == victim and "missing" in f["detail"] for f in errors), errors
    assert proc.poll() is None
