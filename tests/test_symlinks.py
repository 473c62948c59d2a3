"""Planted symbolic links (audit finding 4): walcrypt never writes, truncates, chmods or unlinks
through a link where it expects a file or directory of its own.

The paths are generated, not listed by hand.  Each scenario is a walcrypt operation on a prepared
directory (a template, built once).  A recording run performs it on a copy of the template and
collects every path the operation touches:

* every path the VFS resolves below a data directory the process holds (reads included: below a
  held data directory nothing is followed),
* every file opened for writing, renamed, created as a directory, chmodded or removed outside the
  VFS (Python audit events with absolute paths: the LOCK file, exports, key files, the pysyncobj
  spool and marker),
* every entry that appears, changes or disappears in the directory tree (LMDB's own files),
* and every directory on the way to one of these.

Then, for each such path and each kind of link - to a sentinel file, to a sentinel directory (both
outside the tree), and a dangling one - the operation runs again on a fresh copy with the link
planted at that path.  It must either succeed, or fail with an error that says a symbolic link is
in the way (a StorageError for the API, the CLI's one-line error otherwise); a scenario may also
name a refusal that happens before anything is written (restoring into a directory that is not
empty).  In every case the sentinels keep their bytes, size, mode and ctime, the sentinel
directory its entries, and no dangling target is created.

The same class holds for other names that are not walcrypt's own file.  At every recorded path that
is a file (not a directory), the operation also runs with

* a hard link to a file outside the tree (holding the original file's bytes where there was one, so
  that reads succeed and the operation goes on to write): afterwards that file keeps its bytes, size,
  mode and mtime - nothing was written, truncated or chmodded through the second name;
* a FIFO: the operation must not block on it (it is given a generous time limit, then the FIFO is
  opened from both ends to set it free and the run is a failure).

Either may succeed or fail with a typed StorageError (the CLI's one-line error); an internal error
or a block is a failure.

The data directory itself (and the directory of an export or key file) is the operator's path
and may be a link; it is not planted.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pytest
from click.testing import CliRunner

import walcrypt
from walcrypt import Entry, HardState, SnapshotMeta, StorageError, UsageError
from walcrypt import vfs as vfs_mod
from walcrypt.cli import main as cli_main

import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
KEK2 = walcrypt.RawKey(bytes(range(32)))
SEG = 8192
OPTS = dict(segment_size=SEG, sync="always", snapshot_chunk_size=4096)

# ------------------------------------------------------------------------------ recording

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_RECORDING: list[set] = []


def _audit(event: str, args: tuple) -> None:
    if not _RECORDING:
        return
    rec = _RECORDING[-1]
    paths: list = []
    if event == "open":
        path, _mode, flags = args
        if isinstance(flags, int) and flags & _WRITE_FLAGS:
            paths = [path]
    elif event == "os.rename":                       # (src, dst, src_dir_fd, dst_dir_fd); -1: none
        src, dst, sfd, dfd = args
        paths = ([src] if sfd in (None, -1) else []) + ([dst] if dfd in (None, -1) else [])
    elif event in ("os.mkdir", "os.chmod", "os.remove", "shutil.rmtree"):
        if args[-1] in (None, -1):
            paths = [args[0]]
    elif event == "os.truncate":
        paths = [args[0]]
    for p in paths:
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if isinstance(p, str) and os.path.isabs(p):
            rec.add(os.path.normpath(p))


sys.addaudithook(_audit)


@contextlib.contextmanager
def recording(monkeypatch):
    """Collect the absolute paths walcrypt touches (see the module docstring)."""
    seen: set[str] = set()
    real_located = getattr(vfs_mod, "_located", None)
    real_makedirs = vfs_mod.VFS.makedirs

    @contextlib.contextmanager
    def located(path):
        with real_located(path) as where:
            if where[3]:
                seen.add(where[2])
            yield where

    def makedirs(self, path, mode=0o700):
        seen.add(os.path.abspath(path))
        return real_makedirs(self, path, mode)

    with monkeypatch.context() as m:
        if real_located is not None:
            m.setattr(vfs_mod, "_located", located)
        m.setattr(vfs_mod.VFS, "makedirs", makedirs)
        _RECORDING.append(seen)
        try:
            yield seen
        finally:
            _RECORDING.pop()


def tree_state(root: str) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns,
                                            st.st_ctime_ns)
    return out


# ------------------------------------------------------------------------------ sentinels

class Sentinels:
    """A file, a directory and dangling targets outside the tree under test."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(root)
        self.file = os.path.join(root, "sentinel-file")
        with open(self.file, "wb") as f:
            f.write(b"sentinel bytes that walcrypt must never touch\n" * 100)
        os.chmod(self.file, 0o644)
        self.dir = os.path.join(root, "sentinel-dir")
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "inside"), "wb") as f:
            f.write(b"inside the sentinel directory\n")
        os.chmod(self.dir, 0o755)
        self.n = 0
        self.state = self._state()

    def dangling(self) -> str:
        self.n += 1
        return os.path.join(self.root, f"missing-{self.n}")

    def _state(self) -> dict:
        out = {}
        for p in (self.file, self.dir, os.path.join(self.dir, "inside")):
            st = os.lstat(p)
            content = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else tuple(sorted(os.listdir(p)))
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, content)
        out["entries"] = tuple(sorted(os.listdir(self.root)))
        return out

    def check(self, what: str) -> None:
        now = self._state()
        for k in self.state:
            if k == "entries":
                continue
            assert now[k] == self.state[k], f"{what}: the link target {k} was touched"
        extra = set(now["entries"]) - set(self.state["entries"])
        assert not extra, f"{what}: created through a dangling link: {sorted(extra)}"


# ------------------------------------------------------------------------------ scenarios

@dataclass
class Ctx:
    """Paths of one copy of a scenario's tree."""
    top: str

    def __getattr__(self, name):                  # ctx.data, ctx.out, ... -> top/<name>
        return os.path.join(self.__dict__["top"], name)


@dataclass
class Scenario:
    name: str
    prepare: Callable[[Ctx], None]
    run: Callable[[Ctx], None]
    roots: tuple[str, ...] = ("data",)             # the operator's own paths: never planted
    refusals: tuple[str, ...] = ()                 # other clear refusals before anything is written
    expect: tuple[str, ...] = ("LOCK",)            # the recording must see paths ending so (a self-check)


class CliFailed(Exception):
    pass


class NothingToSend(Exception):
    """The scenario's own precondition is gone (walcrypt set the planted file aside as broken)."""


def cli(*args) -> str:
    res = CliRunner().invoke(cli_main, [str(a) for a in args], catch_exceptions=True)
    if res.exit_code != 0:
        raise CliFailed((res.output or "") + (repr(res.exception) if res.exception else ""))
    return res.output


def _entries(lo, hi, size=40):
    return [Entry(i, 1 + i // 50, (b"%06d" % i) * (size // 6)) for i in range(lo, hi)]


def _store(path, **kw):
    opts = dict(OPTS, **kw)
    if opts.pop("plain", False):
        return walcrypt.open(path, encrypted=False, **opts)
    return walcrypt.open(path, kek=KEK, **opts)


def _new_store(c, *, n=60, snap_at=(40,), plain=False, **kw):
    with _store(c.data, plain=plain, **kw) as s:
        s.save(hard_state=HardState(2, 1, n - 1), entries=_entries(1, n))
        for i in snap_at:
            s.save_snapshot(SnapshotMeta(index=i, term=s.term(i)), b"state at %d " % i * 200)


def _keyfile(c):
    os.makedirs(c.keys, exist_ok=True)
    walcrypt.generate_key_file(c.keys + "/kek")


def prep_nothing(c):
    os.makedirs(c.out, exist_ok=True)


def run_bootstrap(c):
    with _store(c.data) as s:
        s.save(hard_state=HardState(1, 1, 3), entries=_entries(1, 4))


def run_reopen(c):
    with _store(c.data) as s:
        s.save(entries=_entries(s.last_index() + 1, s.last_index() + 3))


def run_rollover(c):
    with _store(c.data) as s:
        nxt = s.last_index() + 1
        for k in range(6):
            s.save(entries=_entries(nxt + 20 * k, nxt + 20 * (k + 1), size=120))


def prep_torn(c):
    res = wctest.run_child("write", c.data, "--seg-size", str(SEG), "--batches", "20", "--batch-size", "3",
                           "--hs", "--end", "exit")
    assert res.stdout.strip().startswith("LAST")
    seg = wctest.segment_files(c.data)[-1]
    with open(seg, "ab") as f:
        f.write(b"\x5a" * 100)                      # an incomplete write after the last commit


def run_open(c):
    with _store(c.data):
        pass


def run_compact(c):
    with _store(c.data) as s:
        s.save_snapshot(SnapshotMeta(index=55, term=s.term(55)), b"newer state " * 300)
        s.compact(55)


def run_snapshot(c):
    with _store(c.data) as s:
        s.save_snapshot(SnapshotMeta(index=50, term=s.term(50)), io.BytesIO(b"streamed state " * 1000))


def run_rotate_dek(c):
    with _store(c.data) as s:
        s.rotate_dek()
        s.save(entries=_entries(s.last_index() + 1, s.last_index() + 5))
        last = s.last_index()
        s.save_snapshot(SnapshotMeta(index=last, term=s.term(last)), b"after rotation " * 300)


def run_rekey(c):
    with _store(c.data) as s:
        s.rekey()


def run_rotate_kek(c):
    with _store(c.data) as s:
        s.rotate_kek(KEK2)
    with walcrypt.open(c.data, kek=KEK2, **OPTS):
        pass


def prep_broken_snapshot(c):
    _new_store(c, snap_at=(30, 45))
    snaps = sorted(os.listdir(os.path.join(c.data, "snap-v1-encrypted")))
    newest = os.path.join(c.data, "snap-v1-encrypted", snaps[-1])
    data = bytearray(open(newest, "rb").read())
    data[-20] ^= 0x40                                 # a flipped bit in the last chunk
    open(newest, "wb").write(bytes(data))


def prep_unlisted(c):
    """A file with a segment name that is not this store's segment, under a free lower ID: kept and
    renamed .unlisted at open."""
    with _store(c.data) as s:
        for k in range(8):
            s.save(hard_state=HardState(2, 1, 20 * k + 19), entries=_entries(20 * k + 1, 20 * k + 21, size=120))
        s.compact(40)                                 # the first segments are purged: their IDs are free
        s.save_snapshot(SnapshotMeta(index=100, term=s.term(100)), b"state " * 100)
        s.compact(100)                                # (the latest purge record names only this purge's)
    with _store(c.data) as s:
        purged = s._purged                            # files with these IDs are known purge leftovers
    wal = os.path.join(c.data, "wal-v1-encrypted")
    names = sorted(os.listdir(wal))
    live = {int(n[:16], 16) for n in names}
    free = min(i for i in range(1, 1000) if i not in purged and i not in live)
    assert free < max(live), (purged, names)
    planted = os.path.join(wal, "%016x-%016x.wal" % (free, 150))
    shutil.copyfile(os.path.join(wal, names[-1]), planted)
    with open(planted, "r+b") as f:                   # not this store's segment (a copy of its own would
        f.write(b"NOT-OURS")                          # make the open refuse): kept aside as .unlisted


def prep_plain(c):
    _keyfile(c)
    _new_store(c, plain=True)


def prep_enc_with_key(c):
    _keyfile(c)
    with walcrypt.open(c.data, kek=walcrypt.KeyFile(c.keys + "/kek"), **OPTS) as s:
        s.save(hard_state=HardState(2, 1, 59), entries=_entries(1, 60))
        s.save_snapshot(SnapshotMeta(index=40, term=s.term(40)), b"exported state " * 500)
    os.makedirs(c.out, exist_ok=True)


def run_migrate_to_encrypted(c):
    cli("migrate", c.data, "--to", "encrypted", "--key-file", c.keys + "/kek", "--remove-source")


def run_migrate_to_plaintext(c):
    cli("migrate", c.data, "--to", "plaintext", "--key-file", c.keys + "/kek", "--yes", "--remove-source")


def run_export(c):
    cli("snapshot", "export", c.data, c.out + "/node.wcx", "--key-file", c.keys + "/kek")


def prep_export(c, *, embed=False):
    prep_enc_with_key(c)
    cli("snapshot", "export", c.data, c.out + "/node.wcx", "--key-file", c.keys + "/kek",
        *(["--embed-kek"] if embed else []))


def run_restore(c):
    cli("snapshot", "restore", c.out + "/node.wcx", c.restored, "--key-file", c.keys + "/kek")


def run_redact(c):
    cli("snapshot", "redact", c.out + "/node.wcx", "--kek-out", c.out + "/kek-from-export")


def prep_torn_with_key(c):
    _keyfile(c)
    prep_torn(c)
    with open(c.keys + "/kek", "w") as f:            # the child's store is under wctest's KEK
        import base64
        f.write(base64.b64encode(wctest.KEK_BYTES).decode() + "\n")


def run_repair(c):
    cli("repair", c.data, "--key-file", c.keys + "/kek")


def run_verify(c):
    cli("verify", c.data, "--key-file", c.keys + "/kek")


def run_keygen(c):
    cli("keygen", c.out + "/new.kek")


# -- the pysyncobj adapter: a follower receives a snapshot through Serializer's transmission hooks


def _ps_open(path):
    import types
    from walcrypt.adapters import pysyncobj as ps
    conf = ps.walcrypt_conf(path, kek=KEK, store_options=dict(OPTS))
    node = conf.walcrypt
    node.syncobj = types.SimpleNamespace()
    return conf, node, node.open_journal()


def _ps_serialize(node, last, prev):
    node.syncobj.payload = b"replicated state " * 2000
    tmp = node.marker + ".tmp"
    node.serialize(tmp, (tuple(last), tuple(prev), {"a", "b"}))
    os.replace(tmp, node.marker)                     # what pysyncobj's atomicReplace does


def prep_pysyncobj(c):
    for path, n in ((c.leader, 40), (c.data, 5)):
        conf, node, j = _ps_open(path)
        try:
            for i in range(1, n + 1):
                j.add(b"cmd-%d" % i, i, 1)
            j.flush()
            if path == c.leader:
                _ps_serialize(node, j[34], j[33])   # a snapshot at index 35
        finally:
            j._destroy()


def run_pysyncobj_install(c):
    """The follower receives the leader's snapshot (spool, snapshot, marker), then snapshots itself."""
    from pysyncobj.serializer import Serializer
    lconf, lnode, lj = _ps_open(c.leader)
    try:
        conf, node, j = _ps_open(c.data)
        try:
            src = Serializer(lconf.fullDumpFile, 4096, False, lconf.serializer, lconf.deserializer, None)
            dst = Serializer(conf.fullDumpFile, 4096, False, conf.serializer, conf.deserializer, None)
            done = False
            for _ in range(1000):
                chunk = src.getTransmissionData("t1")
                if chunk is None:                    # the leader set its planted snapshot aside: none to send
                    raise NothingToSend("the leader has no snapshot to send")
                done = dst.setTransmissionData(chunk)
                if chunk[2]:
                    break
            assert done
            _none, last, prev, _cluster = dst.deserialize()
            j.clear()                                # what SyncObj.__loadDumpFile does
            j.add(*prev)
            j.add(*last)
            j.add(b"after", 36, 1)
            j.flush()
            _ps_serialize(node, j[2], j[1])
        finally:
            j._destroy()
    finally:
        lj._destroy()


def prep_pysyncobj_without_marker(c):
    prep_pysyncobj(c)
    os.unlink(c.leader + "/pysyncobj-snapshot.marker")


def run_pysyncobj_reopen(c):
    conf, node, j = _ps_open(c.leader)              # rewrites the marker when it is missing
    j._destroy()


SCENARIOS = [
    Scenario("bootstrap", prep_nothing, run_bootstrap, refusals=("is not empty",),
             expect=("LOCK", "meta", "data.mdb", "lock.mdb", "wal-v1-encrypted", ".wal")),
    Scenario("reopen-and-save", _new_store, run_reopen),
    Scenario("save-with-rollover", _new_store, run_rollover, expect=("LOCK", "0000000000000004-000000000000008c.wal")),
    Scenario("torn-tail-repair", prep_torn, run_open, expect=("LOCK", ".wal.broken")),
    Scenario("compaction", _new_store, run_compact),
    Scenario("snapshot-save", _new_store, run_snapshot, expect=("LOCK", ".snap", "snap-v1-encrypted")),
    Scenario("broken-snapshot-quarantine", prep_broken_snapshot, run_open, expect=("LOCK", ".snap.broken")),
    Scenario("unlisted-segment", prep_unlisted, run_open, expect=("LOCK", ".wal.unlisted")),
    Scenario("dek-rotation", _new_store, run_rotate_dek),
    Scenario("re-key", _new_store, run_rekey),
    Scenario("kek-rotation", _new_store, run_rotate_kek),
    Scenario("migrate-to-encrypted", prep_plain, run_migrate_to_encrypted, roots=("data", "keys"),
             expect=("LOCK", ".migrate-wal", ".migrate-snap", "wal-v1", "snap-v1")),
    Scenario("migrate-to-plaintext", prep_enc_with_key, run_migrate_to_plaintext, roots=("data", "keys"),
             expect=("LOCK", ".migrate-wal", ".migrate-snap", "wal-v1-encrypted", "snap-v1-encrypted")),
    Scenario("snapshot-export", prep_enc_with_key, run_export, roots=("data", "keys", "out"),
             expect=("node.wcx", "node.wcx.tmp")),
    Scenario("snapshot-restore", prep_export, run_restore, roots=("data", "keys", "out", "restored"),
             refusals=("is not empty",), expect=("restored/LOCK", "restored/meta")),
    Scenario("snapshot-redact", lambda c: prep_export(c, embed=True), run_redact, roots=("data", "keys", "out"),
             expect=("node.wcx", "node.wcx.tmp", "kek-from-export")),
    Scenario("keygen", prep_nothing, run_keygen, roots=("out",), expect=("new.kek",)),
    Scenario("repair-cli", prep_torn_with_key, run_repair, roots=("data", "keys"), expect=("LOCK", ".wal.broken")),
    Scenario("verify-cli", prep_enc_with_key, run_verify, roots=("data", "keys", "out"), expect=(".wal", ".snap")),
    Scenario("pysyncobj-snapshot-install", prep_pysyncobj, run_pysyncobj_install, roots=("data", "leader"),
             expect=("LOCK", ".incoming-snapshot.spool", "marker", "marker.tmp", ".snap")),
    Scenario("pysyncobj-reopen-marker", prep_pysyncobj_without_marker, run_pysyncobj_reopen,
             roots=("data", "leader"), expect=("LOCK", "marker", "marker.tmp")),
]

# ------------------------------------------------------------------------------ the test

LINK_KINDS = ("file", "dir", "dangling")


def _plant(top: str, rel: str, kind: str, sent: Sentinels) -> None:
    p = os.path.join(top, rel)
    if os.path.islink(p) or (os.path.lexists(p) and not os.path.isdir(p)):
        os.unlink(p)
    elif os.path.isdir(p):
        shutil.rmtree(p)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    target = {"file": sent.file, "dir": sent.dir}.get(kind) or sent.dangling()
    os.symlink(target, p)


FILE_KINDS = ("hardlink", "fifo")
FIFO_WAIT = 20.0                                   # seconds; a run normally takes well under one


def _plant_file(top: str, rel: str, kind: str, template: str, victims: str, n: int) -> tuple | None:
    """Put a hard link to an outside file, or a FIFO, at ``rel``; return (victim path, its state)."""
    p = os.path.join(top, rel)
    if os.path.islink(p) or (os.path.lexists(p) and not os.path.isdir(p)):
        os.unlink(p)
    elif os.path.isdir(p):
        shutil.rmtree(p)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if kind == "fifo":
        os.mkfifo(p, 0o600)
        return None
    orig = os.path.join(template, rel)
    victim = os.path.join(victims, f"victim-{n}")
    with open(victim, "wb") as f:
        if os.path.isfile(orig) and not os.path.islink(orig):
            with open(orig, "rb") as o:
                f.write(o.read())                     # walcrypt's own bytes: reads succeed, writes come next
        else:
            f.write(b"an outside file that a hard link names\n" * 100)
    os.chmod(victim, 0o644)
    os.link(victim, p)
    return victim, _victim_state(victim)


def _victim_state(path: str) -> tuple:
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns


def _run_unblocked(run: Callable[[], None], fifo: str) -> tuple[BaseException | None, bool]:
    """Run ``run`` in a thread; (its exception, whether it blocked).  A blocked run is set free by
    opening the FIFO from both ends."""
    box: list[BaseException | None] = [None]
    done = threading.Event()

    def target():
        try:
            run()
        except Exception as e:  # noqa: BLE001 - classified by the caller
            box[0] = e
        finally:
            done.set()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    blocked = not done.wait(FIFO_WAIT)
    for _ in range(100):
        if done.is_set():
            break
        for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
            try:
                os.close(os.open(fifo, flags))
            except OSError as exc:
                if exc.errno not in (errno.ENXIO, errno.ENOENT, errno.ELOOP):
                    raise
        time.sleep(0.1)
    t.join(10)
    return box[0], blocked


def _file_outcome(exc: BaseException | None, sc: Scenario) -> str | None:
    """'ok', 'refused', or None: a hard link or FIFO may also be refused as bad bytes (any typed
    StorageError, or the CLI's one-line error), never with an internal error."""
    if exc is None or isinstance(exc, NothingToSend):
        return "ok"
    if isinstance(exc, StorageError):
        return "refused"
    if isinstance(exc, CliFailed) and "internal error" not in str(exc):
        return "refused"
    if isinstance(exc, (UsageError, CliFailed)) and any(r in str(exc) for r in sc.refusals):
        return "refused"
    return None


def _outcome(exc: BaseException | None, sc: Scenario) -> str | None:
    """'ok', 'refused', or None for an unacceptable outcome."""
    if exc is None:
        return "ok"
    text = str(exc)
    if isinstance(exc, (StorageError, CliFailed)) and "symbolic link" in text:
        return "refused"
    if isinstance(exc, (UsageError, CliFailed)) and any(r in text for r in sc.refusals):
        return "refused"
    return None


def _copy_template(template: str, top: str) -> Ctx:
    shutil.copytree(template, top, symlinks=True)
    return Ctx(top)


@pytest.fixture
def sentinels(tmp_path_factory):
    return Sentinels(str(tmp_path_factory.mktemp("sentinels") / "s"))


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_planted_symlinks(sc: Scenario, tmp_path, monkeypatch, sentinels):
    template = str(tmp_path / "template")
    os.makedirs(template)
    sc.prepare(Ctx(template))

    # 1. the recording run
    rec_top = str(tmp_path / "rec")
    c = _copy_template(template, rec_top)
    before = tree_state(rec_top)
    with recording(monkeypatch) as seen:
        sc.run(c)
    after = tree_state(rec_top)
    rels = {os.path.relpath(p, rec_top) for p in seen if p.startswith(rec_top + os.sep)}
    rels |= {r for r in set(before) | set(after) if before.get(r) != after.get(r)}
    rels |= {os.path.dirname(r) for r in rels} - {""}     # every directory on the way, too
    rels = sorted(r for r in rels if r not in sc.roots and not r.startswith(".."))
    missing = [e for e in sc.expect if not any(r.endswith(e) for r in rels)]
    assert not missing, f"the recording run did not see {missing} (it saw {rels})"
    shutil.rmtree(rec_top)

    # 2. one run per planted path and kind of link
    bad, outcomes = [], {"ok": 0, "refused": 0}
    for i, rel in enumerate(rels):
        for kind in LINK_KINDS:
            top = str(tmp_path / f"r{i}-{kind}")
            c = _copy_template(template, top)
            _plant(top, rel, kind, sentinels)
            exc = None
            try:
                sc.run(c)
            except Exception as e:  # noqa: BLE001 - classified below
                exc = e
            what = f"{sc.name}: link ({kind}) at {rel}"
            sentinels.check(what)
            verdict = _outcome(exc, sc)
            if verdict is None:
                bad.append(f"{what}: {type(exc).__name__}: {exc}")
            else:
                outcomes[verdict] += 1
            shutil.rmtree(top)
    print(f"\n{sc.name}: {len(rels)} paths x {len(LINK_KINDS)} links: {outcomes}; paths: {rels}")

    # 3. at every path that is a file: a hard link to an outside file, and a FIFO
    files = [r for r in rels if stat.S_IFDIR not in (before.get(r, (None,))[0], after.get(r, (None,))[0])
             and not any(o.startswith(r + os.sep) for o in rels)]
    victims = str(tmp_path / "victims")
    os.makedirs(victims)
    file_outcomes = {"ok": 0, "refused": 0}
    n = 0
    for i, rel in enumerate(files):
        for kind in FILE_KINDS:
            n += 1
            top = str(tmp_path / f"f{i}-{kind}")
            c = _copy_template(template, top)
            planted = _plant_file(top, rel, kind, template, victims, n)
            what = f"{sc.name}: {kind} at {rel}"
            exc, blocked = _run_unblocked(lambda: sc.run(c), os.path.join(top, rel))
            sentinels.check(what)
            if blocked:
                bad.append(f"{what}: blocked on it")
            if planted is not None:
                victim, state = planted
                if _victim_state(victim) != state:
                    bad.append(f"{what}: the file the hard link names was written, truncated or chmodded")
                os.unlink(victim)
            verdict = _file_outcome(exc, sc)
            if verdict is None:
                bad.append(f"{what}: {type(exc).__name__}: {exc}")
            elif not blocked:
                file_outcomes[verdict] += 1
            shutil.rmtree(top)
    print(f"{sc.name}: {len(files)} file paths x {len(FILE_KINDS)} kinds: {file_outcomes}")
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------------------ the audit's cases


def _target(tmp_path) -> tuple[str, bytes]:
    target = str(tmp_path / "elsewhere" / "precious")
    os.makedirs(os.path.dirname(target))
    payload = b"not walcrypt's file\n" * 50
    with open(target, "wb") as f:
        f.write(payload)
    os.chmod(target, 0o644)
    return target, payload


def _untouched(target: str, payload: bytes) -> None:
    with open(target, "rb") as f:
        assert f.read() == payload, "bytes were written through the link"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644, "the link target was chmodded"


def test_finding4_torn_tail_repair_never_writes_through_a_broken_link(tmp_path):
    """Audit finding 4: a link planted at <segment>.wal.broken made the torn-tail repair copy the
    segment into the link's target and chmod it 0600.  Now the open is refused with a message that
    names the link and says what to do, and the repair goes ahead once it is removed."""
    c = Ctx(str(tmp_path))
    prep_torn(c)
    seg = wctest.segment_files(c.data)[-1]
    target, payload = _target(tmp_path)
    os.symlink(target, seg + ".broken")
    with pytest.raises(StorageError) as ei:
        run_open(c)
    _untouched(target, payload)
    msg = str(ei.value)
    assert seg + ".broken" in msg and "is a symbolic link" in msg and "remove it" in msg
    os.unlink(seg + ".broken")
    run_open(c)
    assert os.path.getsize(seg + ".broken") > os.path.getsize(seg)
    _untouched(target, payload)


@pytest.mark.parametrize("name", [".incoming-snapshot.spool", "pysyncobj-snapshot.marker.tmp",
                                  "pysyncobj-snapshot.marker"])
def test_finding4_pysyncobj_spool_and_marker_never_write_through_a_link(tmp_path, name):
    """Audit finding 4: the pysyncobj adapter opened its incoming-snapshot spool and its marker
    file following links."""
    c = Ctx(str(tmp_path))
    prep_pysyncobj(c)
    target, payload = _target(tmp_path)
    if os.path.lexists(os.path.join(c.data, name)):
        os.unlink(os.path.join(c.data, name))
    os.symlink(target, os.path.join(c.data, name))
    with pytest.raises(StorageError, match="is a symbolic link"):
        run_pysyncobj_install(c)
    _untouched(target, payload)
