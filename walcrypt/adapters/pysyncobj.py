"""A durable, encrypted journal and snapshot store for pysyncobj.

The whole user-facing surface::

    from pysyncobj import SyncObj
    from walcrypt.adapters.pysyncobj import walcrypt_conf

    conf = walcrypt_conf("/var/lib/node1", kek=walcrypt.KeyFile("/secure/kek"), password="cluster-secret")
    node = SyncObj("127.0.0.1:4321", ["127.0.0.1:4322", "127.0.0.1:4323"], consumers=[...], conf=conf)
    conf.walcrypt.rotate_dek()          # optional: rotate the data key under load

How it is wired (all of it lives in :func:`_install`, applied once, and acts only on
SyncObj instances whose conf came from :func:`walcrypt_conf`):

* A conf's :class:`WalcryptNode` is bound to the SyncObj built with it (``SyncObj.__init__``),
  one running SyncObj at a time; every hook finds its node through that SyncObj (its journal,
  its serializer's bound methods), never through a process-wide table keyed by path.
* ``createJournal`` (under every name pysyncobj exports it: ``pysyncobj``,
  ``pysyncobj.syncobj``, ``pysyncobj.journal``) returns a :class:`WalcryptJournal` for the
  SyncObj being built from our conf, and refuses, like ``FileJournal`` itself, to put
  pysyncobj's plaintext journal into a walcrypt data directory.  ``add()`` queues entries;
  they become durable in one ``save()`` (one fdatasync for every entry of a tick: group commit)
  *before* the node answers the leader (``SyncObj.__sendNextNodeIdx``) and at the end of every
  tick, so a leader counts only durable entries of its own toward the commit index.
  ``setCurrentTerm`` is durable at once (the stable store).
* Log compaction uses pysyncobj's custom serializer hooks: the state of the
  SyncObj and its consumers is written as a walcrypt snapshot (encrypted under
  this node's DEK); ``fullDumpFile`` is only a small marker file without
  secrets.
* Snapshots sent to lagging followers: ``Serializer.getTransmissionData`` streams
  the *decrypted* snapshot over pysyncobj's transport (encrypted only when the conf has a
  ``password``; without one a warning, :class:`InsecureTransportWarning`, is given at start),
  and the receiver's ``setTransmissionData`` spools it under an ephemeral in-memory key, then
  re-encrypts it under its own DEK as a walcrypt snapshot.  No node ever receives ciphertext
  that needs another node's key.
* DEK rotation is wired to pysyncobj's forced log compaction: ``rotate_dek()``
  starts a rotation on the tick thread and forces compactions until a snapshot
  at or above the rotation point completes it.

Lifecycle (the store is closed exactly once, whatever ends the node):

* ``SyncObj.destroy()`` returns once the store is closed (with ``autoTick``, it waits, at most
  :data:`CLOSE_WAIT_S`, for the tick thread to close it), so a new SyncObj on the same data
  directory can start right away in the same process.  Called from the tick thread itself
  (a callback), it cannot wait: the store closes when that tick ends.
* The store is also closed when the tick thread ends any other way (a failed bind, an
  exception in ``_doDestroy``, the end of the thread that built the SyncObj), and when
  ``SyncObj.__init__`` fails after the journal was opened.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import struct
import threading
import time
import warnings
import weakref

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

try:
    import pysyncobj as _pkg
    import pysyncobj.journal as _pj
    import pysyncobj.syncobj as _ps
    from pysyncobj import SyncObjConf
    from pysyncobj.journal import Journal
    from pysyncobj.serializer import Serializer
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("walcrypt.adapters.pysyncobj needs pysyncobj: pip install 'walcrypt[pysyncobj]'") from exc

from ..errors import LockedError, UsageError
from ..layout import LOCK_NAME, META_DIR
from ..storage import Store
from ..types import Entry, HardState, SnapshotMeta
from ..vfs import DEFAULT_VFS, open_private, refuse_link

DUMP_MAGIC = b"WCPSO1"
MARKER_NAME = "pysyncobj-snapshot.marker"
_STABLE_TERM_VOTE = b"pysyncobj/term-vote"
_STABLE_TERM_OFFSET = b"pysyncobj/term-offset"
CLOSE_WAIT_S = 10.0        # how long destroy() waits for the tick thread to close the store
_INSTALLED = False
_LOCK = threading.Lock()
_CONF_PATHS: set[str] = set()        # data directories given to walcrypt_conf (real paths): refused to FileJournal
_BUILDING = threading.local()        # .nodes: the nodes whose SyncObj.__init__ runs in this thread
log = logging.getLogger(__name__)


class LegacyFilesWarning(UserWarning):
    """pysyncobj files of this node's earlier life: imported on this first start and left in place
    (plaintext) until removed with the command the warning names, or found beside a new store
    without ``import_journal=`` and not imported."""


class InsecureTransportWarning(UserWarning):
    """A pysyncobj node on a walcrypt store starts without ``password``: pysyncobj's TCP traffic,
    log entries and decrypted snapshots included, is neither encrypted nor authenticated.
    Filter it (``warnings.filterwarnings("ignore", category=...)``) where that is intended, or
    escalate it to an error (``"error"``) to refuse such starts."""


def walcrypt_conf(path, *, kek=None, encrypted: bool = True, store_options: dict | None = None,
                  import_journal=None, import_dump=None, **syncobj_options) -> SyncObjConf:
    """A ``SyncObjConf`` whose journal and snapshots live in a walcrypt store at ``path``.

    ``kek`` is this node's own key-encryption key.  Any SyncObjConf option may be given;
    ``password=`` is the one to give: without it pysyncobj sends every entry and every snapshot
    (decrypted) in clear and accepts messages from anyone who can reach its port (an
    :class:`InsecureTransportWarning` at start says so).  ``store_options`` go to
    :func:`walcrypt.open` (``sync``, ``segment_size``, ...).

    The conf serves one running SyncObj at a time; once that one is destroyed it can start
    another (a restart), as can a new conf for the same path.

    Adopting a node that ran on pysyncobj's own ``FileJournal``: ``import_journal`` (the old
    ``journalFile``; its ``.meta`` beside it is read too) and ``import_dump`` (the old
    ``fullDumpFile``) are imported into the store on the first start, when ``path`` holds no store
    yet (:func:`walcrypt.legacy.pysyncobj_files.import_pysyncobj`); later starts ignore them.
    ``import_journal="auto"`` takes ``<path>.journal`` and ``<path>.dump`` when they exist and are
    pysyncobj's files, and nothing when they do not.  The originals are left as they are and a
    :class:`LegacyFilesWarning` says so once, with the command that removes them.  Files found at
    ``<path>.journal``/``<path>.dump`` are never imported without ``import_journal`` (walcrypt never
    adopts plaintext data implicitly): a first start without it only warns."""
    if import_dump is not None and import_journal is None:
        raise UsageError("import_dump needs import_journal (the journal the dump belongs to), or 'auto'")
    for forbidden in ("journalFile", "fullDumpFile", "serializer", "deserializer"):
        if forbidden in syncobj_options:
            raise UsageError(f"walcrypt_conf manages {forbidden}; do not pass it")
    path = os.path.abspath(os.fspath(path))
    _install()
    with _LOCK:
        _CONF_PATHS.add(os.path.realpath(path))
    node = WalcryptNode(path, kek=kek, encrypted=encrypted, store_options=store_options or {})
    node.import_journal = None if import_journal is None else (
        "auto" if import_journal == "auto" else os.path.abspath(os.fspath(import_journal)))
    node.import_dump = None if import_dump is None else os.path.abspath(os.fspath(import_dump))
    syncobj_options.setdefault("useFork", False)
    conf = SyncObjConf(journalFile=path, fullDumpFile=node.marker, serializer=node.serialize,
                       deserializer=node.deserialize, **syncobj_options)
    conf.walcrypt = node
    return conf


class WalcryptNode:
    """Per-node context: the store, the journal, and the SyncObj it serves (one at a time)."""

    def __init__(self, path: str, *, kek, encrypted: bool, store_options: dict):
        self.path = path
        self.kek = kek
        self.encrypted = encrypted
        self.store_options = dict(store_options)
        self.store_options.setdefault("sync", "batch")
        self.marker = os.path.join(path, MARKER_NAME)
        self.term_offset = 0
        self.store: Store | None = None
        self.journal: WalcryptJournal | None = None
        self._syncobj = None            # a weak reference once bound (a test stand-in is held as is)
        self._rotate_requested = False
        self._last_force = 0.0
        self.snapshots_saved = 0
        self.snapshots_received = 0
        self.import_journal = None
        self.import_dump = None
        self.import_report: dict | None = None

    @property
    def syncobj(self):
        """The SyncObj this node serves.  Held weakly: a conf that outlives its SyncObj (kept for a
        restart) does not keep the destroyed node, its consumers and their state alive."""
        ref = self._syncobj
        return ref() if isinstance(ref, weakref.ref) else ref

    @syncobj.setter
    def syncobj(self, value) -> None:
        self._syncobj = value

    # -- lifecycle ------------------------------------------------------------
    def check_conf(self, conf) -> None:
        """UsageError when an option walcrypt_conf manages was changed on ``conf`` afterwards."""
        managed = (("journalFile", self.path), ("fullDumpFile", self.marker),
                   ("serializer", self.serialize), ("deserializer", self.deserialize))
        for name, value in managed:
            if getattr(conf, name, None) != value:
                raise UsageError(f"conf.{name} was changed after walcrypt_conf; walcrypt_conf manages it "
                                 f"(make a new conf with walcrypt_conf({self.path!r}, ...))")

    def bind(self, syncobj) -> None:
        """Serve ``syncobj`` (called by ``SyncObj.__init__`` before it opens the journal).

        A node serves one running SyncObj at a time: while the previous one still has its
        journal open this is a UsageError, unless it is being destroyed, in which case this
        waits, at most CLOSE_WAIT_S, for its tick thread to close the store."""
        j = self.journal
        if j is not None and not j.closed:
            old = self.syncobj
            if old is not None and not getattr(old, "_SyncObj__destroying", False):
                raise UsageError(f"this walcrypt_conf already serves a running SyncObj (store {self.path}): "
                                 "destroy() that one first, or make a conf per SyncObj")
            if not j.wait_closed(CLOSE_WAIT_S):
                raise LockedError(f"{self.path} is still open: the previous SyncObj's tick thread did not close it "
                                  f"within {CLOSE_WAIT_S:.0f} s of destroy()")
        self._syncobj = weakref.ref(syncobj)

    def unbind(self, syncobj) -> None:
        """``SyncObj.__init__`` failed: close the journal it opened (if any) and forget it."""
        j = self.journal
        if j is not None and not j.closed:
            thread = syncobj.__dict__.get("_SyncObj__thread")
            if thread is not None and thread.is_alive():
                syncobj._SyncObj__destroying = True      # its tick thread closes the store on the way out
            else:
                j.close_quietly()
        if self.syncobj is syncobj:
            self._syncobj = None

    def open_journal(self) -> "WalcryptJournal":
        """Open the store and a journal on it (one per SyncObj start); the store closes with the journal."""
        from .. import opening
        if self.journal is not None and not self.journal.closed:
            raise UsageError(f"this walcrypt_conf already serves an open journal (store {self.path})")
        self._adopt_legacy_files()
        try:
            store = opening.open(self.path, kek=self.kek, encrypted=self.encrypted, **self.store_options)
        except LockedError as exc:
            raise LockedError(f"{exc}. If another SyncObj in this process serves {self.path}, destroy() it first "
                              f"(destroy() waits up to {CLOSE_WAIT_S:.0f} s for its tick thread to close the "
                              "store); a second one cannot share it") from None
        try:
            self.store = store
            self.term_offset = _term_offset(store)
            journal = WalcryptJournal(self)
            self._sync_marker()
        except BaseException:
            store.close()
            raise
        self.journal = journal
        return journal

    def _adopt_legacy_files(self) -> None:
        """First start only (no store at ``path`` yet): import the pysyncobj files given to
        walcrypt_conf, or warn about ones found beside the data directory."""
        from ..layout import looks_like_store
        from ..legacy import pysyncobj_files as legacy
        if looks_like_store(self.path):
            return
        journal, dump = self.import_journal, self.import_dump
        if journal == "auto" or journal is None:
            found_j, found_d = legacy.sibling_files(self.path)
            if journal is None:
                if found_j or found_d:
                    _warn_legacy(f"pysyncobj files beside the new walcrypt store {self.path} were NOT imported: "
                                 f"{', '.join(p for p in (found_j, found_d) if p)}. To start this node from them, "
                                 "pass import_journal='auto' (or the paths) to walcrypt_conf, or run "
                                 "'walcrypt import pysyncobj'; walcrypt never adopts them implicitly")
                return
            journal, dump = found_j, dump or found_d
            if journal is None:
                if dump is not None:
                    _warn_legacy(f"{dump} beside the new walcrypt store {self.path} was NOT imported: there is no "
                                 f"{self.path}.journal to go with it; give import_journal= the node's journal")
                return                  # "auto" and nothing there: a new node
        for p in (journal, dump):
            if p is not None and not os.path.isfile(p):
                raise UsageError(f"walcrypt_conf(import_journal/import_dump): {p} does not exist (and {self.path} "
                                 "holds no store yet); give the files this node used with FileJournal, or drop "
                                 "the option to start an empty node")
        rep = legacy.import_pysyncobj(self.path, journal=journal, dump=dump, kek=self.kek, encrypted=self.encrypted,
                                      **self.store_options)
        self.import_report = rep
        cut = rep.get("cut")
        _warn_legacy(f"imported pysyncobj's files into the walcrypt store {self.path}: "
                     f"{', '.join(s['path'] for s in rep['sources'])} ({rep['entries']} entries"
                     + (f", snapshot at index {rep['snapshot_index']}" if rep.get("snapshot_index") else "")
                     + (f"; a torn journal tail of {cut['bytes']} bytes at offset {cut['offset']} was cut: "
                        f"{cut['reason']}" if cut else "")
                     + "). The originals were not changed and still hold this node's data in clear; once the node "
                     f"runs well, remove them with: {legacy.removal_command(self.path)}")

    def _sync_marker(self) -> None:
        """The marker file exists exactly when a snapshot does (pysyncobj loads it at start)."""
        if self.store.snapshot() is not None:
            refuse_link(self.marker)
            if not os.path.exists(self.marker):
                _write_marker(self.marker + ".tmp", self.store.snapshot().meta.index)
                DEFAULT_VFS.rename(self.marker + ".tmp", self.marker)
        elif os.path.lexists(self.marker):
            os.unlink(self.marker)          # a link is removed itself, never followed

    def rotate_dek(self) -> None:
        """Rotate this node's data key (runs on the tick thread; completes at the next compaction)."""
        self._rotate_requested = True

    def export_snapshot(self, out_path, *, embed_kek: bool = False) -> dict:
        """Back up the newest snapshot with its wrapped keys to ``out_path`` while the node runs
        (Store.export_snapshot; ``walcrypt snapshot export`` does the same from another process)."""
        if self.store is None or self.store.closed:
            raise UsageError("the node's store is not open (the SyncObj has not started, or was destroyed)")
        return self.store.export_snapshot(out_path, embed_kek=embed_kek)

    @property
    def rotation_done(self) -> bool:
        return not self._rotate_requested and self.store is not None and not self.store.needs_snapshot

    def after_tick(self, syncobj) -> None:
        j = self.journal
        if j is None or j.closed:
            return
        j.flush()
        st = self.store
        if self._rotate_requested:
            self._rotate_requested = False
            st.rotate_dek()
        if st.needs_snapshot and time.monotonic() - self._last_force > 0.5:
            self._last_force = time.monotonic()
            syncobj.forceLogCompaction()

    # -- state capture ----------------------------------------------------------
    def _consumers(self, so) -> list:
        return list(getattr(so, "_SyncObj__consumers", None) or [])

    def _state(self):
        so = self.syncobj
        props = getattr(so, "_SyncObj__properies", set())
        self_data = {k: v for k, v in so.__dict__.items() if k not in props}
        return [self_data] + [c._serialize() for c in self._consumers(so)]

    def _restore(self, state) -> None:
        so = self.syncobj
        for k, v in state[0].items():
            so.__dict__[k] = v
        for consumer, data in zip(self._consumers(so), state[1:]):
            consumer._deserialize(data)

    # -- pysyncobj serializer hooks -------------------------------------------------
    def serialize(self, tmp_file: str, data) -> None:
        """pysyncobj's custom serializer: ``data`` is (last entry, previous entry, cluster).
        pysyncobj swallows a failure here (it logs only "Failed to store full dump"), so the
        cause is logged before it is raised."""
        try:
            last, prev, cluster = data
            refuse_link(self.marker)                   # pysyncobj renames tmp_file onto it
            self.journal.flush()                       # the snapshot never runs ahead of the durable log
            blob = encode_dump(last, prev, cluster, self._state())
            self.store.save_snapshot(SnapshotMeta(last[1], last[2] + self.term_offset), io.BytesIO(blob))
            self.snapshots_saved += 1
            _write_marker(tmp_file, last[1])
        except Exception:
            log.exception("saving a pysyncobj snapshot into the walcrypt store at %s failed", self.path)
            raise

    def deserialize(self, _file_name: str):
        """pysyncobj's custom deserializer: restore the state; return (last, prev, cluster)."""
        snap = self.store.snapshot()
        if snap is None:
            raise FileNotFoundError("no walcrypt snapshot")
        with snap.open() as f:
            last, prev, cluster, state = decode_dump(f)
        self._restore(state)
        return last, prev, cluster


def _term_offset(store: Store) -> int:
    """pysyncobj's first entry (the NO_OP at index 1) has term 0, but walcrypt requires entry (and
    snapshot) terms >= 1 (FORMAT.md, section 13).  Stores this adapter creates keep pysyncobj's
    term t as t + 1, recorded in the stable store; a store written before that keeps terms as they
    are (offset 0)."""
    raw = store.stable_get(_STABLE_TERM_OFFSET)
    if raw is not None:
        return int(raw)
    if store.last_index() == 0 and store.snapshot() is None:
        store.stable_set(_STABLE_TERM_OFFSET, b"1")
        return 1
    return 0


def encode_dump(last, prev, cluster, state) -> bytes:
    head = pickle.dumps((tuple(last), tuple(prev), cluster), protocol=4)
    return DUMP_MAGIC + struct.pack("<I", len(head)) + head + pickle.dumps(state, protocol=4)


def _read_head(f):
    magic = f.read(len(DUMP_MAGIC))
    if magic != DUMP_MAGIC:
        raise ValueError("not a walcrypt pysyncobj snapshot")
    (n,) = struct.unpack("<I", f.read(4))
    last, prev, cluster = pickle.loads(f.read(n))
    return last, prev, cluster


def decode_dump(f):
    last, prev, cluster = _read_head(f)
    return last, prev, cluster, pickle.loads(f.read())


def _write_marker(path: str, index: int) -> None:
    """Write the marker (a temporary name: the caller renames it into place), never through a link."""
    fd = open_private(path, replace_stale=True)
    with os.fdopen(fd, "w") as f:
        json.dump({"walcrypt_snapshot_index": index, "note": "the snapshot lives in the walcrypt store"}, f)


class WalcryptJournal(Journal):
    """pysyncobj's Journal on a walcrypt store.  Used from the SyncObj tick thread only (or the
    thread calling ``doTick`` without autoTick); ``_destroy`` may come from any thread, any
    number of times.

    Positions (pysyncobj's ``deleteEntriesFrom/To`` arguments) index an in-memory mirror
    of (command, index, term) tuples; the store holds the durable copy."""

    def __init__(self, node: WalcryptNode):
        self._node = node
        self._store = store = node.store
        self._destroy_lock = threading.RLock()
        self._destroyed = False
        self._closed = threading.Event()
        self._pending: list[Entry] = []
        self._truncate_from: int | None = None    # a deleteEntriesFrom not yet made durable
        self._entries: list[tuple] = []
        self._off = off = node.term_offset
        snap = store.snapshot()
        first, last = store.first_index(), store.last_index()
        if snap is not None and first > snap.meta.index - 1:
            with snap.open() as f:
                s_last, s_prev, _cluster = _read_head(f)
            self._entries = [tuple(e) for e in (s_prev, s_last) if e[1] < first]
        for lo in range(first, last + 1, 4096):
            self._entries.extend((e.data, e.index, e.term - off) for e in store.entries(lo, min(last + 1, lo + 4096)))
        hs, _cs = store.initial_state()
        self._commit = hs.commit or 1
        self._saved_commit = self._commit
        raw = store.stable_get(_STABLE_TERM_VOTE)
        tv = json.loads(raw) if raw else {"term": 0, "vote": None}
        self._term, self._vote = tv["term"], tv["vote"]

    # -- durability ------------------------------------------------------------------
    def flush(self) -> None:
        """Make every queued entry (and a pending suffix deletion) durable: one save, one fdatasync."""
        cut = self._truncate_from
        if cut is not None:
            self._truncate_from = None
            if not self._pending or self._pending[0].index > cut:
                self._store.truncate(cut)        # nothing will replace the suffix: drop it durably
        if self._pending:
            pending, self._pending = self._pending, []
            self._store.save(hard_state=HardState(self._term, 0, self._commit), entries=pending)
            self._saved_commit = self._commit

    # -- Journal interface -----------------------------------------------------------------
    def add(self, command, idx, term):
        command = bytes(command)
        self._entries.append((command, idx, term))
        if self._pending and idx != self._pending[-1].index + 1:
            self.flush()
        self._pending.append(Entry(idx, term + self._off, command))

    def clear(self):
        self._entries = []
        self._pending = []
        self._truncate_from = None

    def deleteEntriesFrom(self, entryFrom):
        if entryFrom >= len(self._entries):
            return
        idx = self._entries[entryFrom][1]
        del self._entries[entryFrom:]
        self._pending = [e for e in self._pending if e.index < idx]
        if idx <= self._store.last_index():
            self._truncate_from = min(idx, self._truncate_from or idx)

    def deleteEntriesTo(self, entryTo):
        self.flush()
        self._entries = self._entries[entryTo:]
        if self._entries:
            keep = self._entries[0][1]
            st = self._store
            target = min(keep - 1, st.last_index())
            if target > st.first_index() - 1:
                st.compact(target)

    def __getitem__(self, item):
        return self._entries[item]

    def __len__(self):
        return len(self._entries)

    def _destroy(self):
        """Make the queued entries and the commit index durable, then close the store.  Idempotent:
        pysyncobj calls it from ``_doDestroy`` (twice when ``destroy()`` is called twice without
        autoTick) and the adapter calls it again whenever a tick thread ends."""
        with self._destroy_lock:
            if self._destroyed:
                self._store.close()           # finishes a close that was interrupted; else nothing
                return
            self._destroyed = True
            try:
                if not self._store.closed:
                    self.flush()
                    if self._commit != self._saved_commit:
                        self._store.save(hard_state=HardState(self._term, 0, self._commit))
                        self._saved_commit = self._commit
            finally:
                try:
                    self._store.close()
                finally:
                    self._closed.set()

    def close_quietly(self) -> None:
        """``_destroy``, logging instead of raising (for paths that are already handling an error)."""
        try:
            self._destroy()
        except Exception:
            log.exception("closing the walcrypt store at %s failed", self._node.path)

    @property
    def closed(self) -> bool:
        return self._closed.is_set() or self._store.closed

    def wait_closed(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) for another thread to close this journal's store."""
        return self._closed.wait(timeout) or self._store.closed

    def setRaftCommitIndex(self, raftCommitIndex):
        self._commit = raftCommitIndex

    def getRaftCommitIndex(self):
        return self._commit

    def setCurrentTerm(self, term, votedForNodeId):
        # Raft: term and vote are durable before any message reflecting them is sent.
        self._term, self._vote = term, votedForNodeId
        self._store.stable_set(_STABLE_TERM_VOTE, json.dumps({"term": term, "vote": votedForNodeId}).encode())

    def getCurrentTerm(self):
        return self._term

    def getVotedForNodeId(self):
        return self._vote

    def onOneSecondTimer(self):
        if self._commit != self._saved_commit and not self._pending:
            self._store.save(hard_state=HardState(self._term, 0, self._commit))
            self._saved_commit = self._commit


class _Spool:
    """Incoming snapshot bytes, sealed under a key that lives only in memory (no plaintext on disk)."""

    def __init__(self, directory: str):
        self.key = AESGCM(os.urandom(32))
        self.path = os.path.join(directory, ".incoming-snapshot.spool")
        fd = open_private(self.path, os.O_RDWR, replace_stale=True)   # a link there is refused, not followed
        try:
            os.unlink(self.path)        # nameless from now on: nothing to clean up, nothing to swap
        except BaseException:
            os.close(fd)
            raise
        self.f = os.fdopen(fd, "w+b")
        self.n = 0

    def write(self, data: bytes) -> None:
        ct = self.key.encrypt(self.n.to_bytes(12, "big"), data, None)
        self.f.write(struct.pack("<I", len(ct)) + ct)
        self.n += 1

    def reader(self):
        self.f.flush()
        self.f.seek(0)
        for k in range(self.n):
            (n,) = struct.unpack("<I", self.f.read(4))
            yield self.key.decrypt(k.to_bytes(12, "big"), self.f.read(n), None)

    def close(self) -> None:
        self.f.close()


class _ChunkStream(io.RawIOBase):
    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._buf = b""

    def readable(self):
        return True

    def readinto(self, b):
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _node_for_serializer(ser) -> WalcryptNode | None:
    """The node whose conf built this Serializer: its serializer hook is that node's bound method."""
    node = getattr(getattr(ser, "_Serializer__serializer", None), "__self__", None)
    return node if isinstance(node, WalcryptNode) else None


def _store_dir_of(path) -> str | None:
    """The walcrypt data directory that ``path`` is or lies in (one on disk, or one given to
    walcrypt_conf in this process and perhaps not created yet), else None."""
    d = os.path.realpath(os.fsdecode(path))
    while True:
        if d in _CONF_PATHS or (os.path.isfile(os.path.join(d, LOCK_NAME))
                                and os.path.isdir(os.path.join(d, META_DIR))):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _refuse_plaintext_journal(journal_file) -> None:
    """UsageError when pysyncobj's FileJournal (plaintext, never fsynced) would write at or into a
    walcrypt data directory: its files (the journal and ``.meta``) would sit beside the encrypted
    store, in clear."""
    if journal_file is None:
        return
    store_dir = _store_dir_of(journal_file)
    if store_dir is not None:
        raise UsageError(f"{os.fsdecode(journal_file)} is in the walcrypt data directory {store_dir}: pysyncobj's "
                         "FileJournal would write the log there in plaintext. Build the SyncObj with "
                         f"conf=walcrypt_conf({store_dir!r}, kek=...) instead")


def _building_node() -> WalcryptNode | None:
    nodes = getattr(_BUILDING, "nodes", None)
    return nodes[-1] if nodes else None


def _warn_cleartext(node: WalcryptNode, self_node) -> None:
    msg = (f"pysyncobj node {self_node} on the walcrypt store {node.path} starts without password=: pysyncobj's "
           "TCP traffic is neither encrypted nor authenticated, so every log entry and every snapshot sent to a "
           "lagging follower (decrypted from the store) crosses the network in clear, and anyone who can reach "
           "the port can send the node messages (pickles, which pysyncobj unpickles). Give walcrypt_conf a "
           "password= (see the README: what pysyncobj's transport protects)")
    log.warning("%s", msg)
    warnings.warn(msg, InsecureTransportWarning, stacklevel=3)   # the SyncObj(...) call


def _warn_legacy(msg: str) -> None:
    log.warning("%s", msg)
    warnings.warn(msg, LegacyFilesWarning, stacklevel=2)


def _install() -> None:
    """Wire pysyncobj to walcrypt.  Idempotent; affects only SyncObjs built from walcrypt_conf."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        _INSTALLED = True

    # createJournal under every name pysyncobj exports it (SyncObj.__init__ calls the one in
    # pysyncobj.syncobj), and FileJournal itself for callers that kept an earlier reference.
    def wrap_create_journal(previous):
        def create_journal(journalFile=None):
            node = _building_node()
            if node is not None and journalFile is not None and os.path.abspath(os.fspath(journalFile)) == node.path:
                return node.open_journal()
            _refuse_plaintext_journal(journalFile)
            return previous(journalFile)
        return create_journal

    for module in (_ps, _pkg, _pj):
        module.createJournal = wrap_create_journal(module.createJournal)

    orig_file_journal_init = _pj.FileJournal.__init__

    def file_journal_init(self, journalFile, *args, **kwargs):
        _refuse_plaintext_journal(journalFile)
        orig_file_journal_init(self, journalFile, *args, **kwargs)

    _pj.FileJournal.__init__ = file_journal_init

    orig_init = _ps.SyncObj.__init__

    def init(self, selfNode, otherNodes, conf=None, consumers=None, *args, **kwargs):
        node = getattr(conf, "walcrypt", None)
        if not isinstance(node, WalcryptNode):
            return orig_init(self, selfNode, otherNodes, conf, consumers, *args, **kwargs)
        node.check_conf(conf)
        if conf.password is None:
            _warn_cleartext(node, selfNode)   # first: escalated to an error, it stops the start here
        node.bind(self)                       # before the tick thread can ask for the state
        self._walcrypt_node = node            # set before pysyncobj lists its own attributes: never in a snapshot
        building = _BUILDING.__dict__.setdefault("nodes", [])
        building.append(node)
        try:
            orig_init(self, selfNode, otherNodes, conf, consumers, *args, **kwargs)
        except BaseException:
            node.unbind(self)                 # the journal may be open already: close it
            raise
        finally:
            building.pop()

    _ps.SyncObj.__init__ = init

    orig_destroy = _ps.SyncObj.destroy

    def destroy(self):
        orig_destroy(self)
        journal = self.__dict__.get("_SyncObj__raftLog")
        if not isinstance(journal, WalcryptJournal) or journal.closed:
            return
        thread = self.__dict__.get("_SyncObj__thread")
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return                            # no tick thread to wait for (or we are it)
        if not journal.wait_closed(CLOSE_WAIT_S):
            log.warning("SyncObj.destroy(): the tick thread has not closed the walcrypt store at %s within %.0f s; "
                        "it stays locked until it does", journal._node.path, CLOSE_WAIT_S)

    _ps.SyncObj.destroy = destroy

    orig_do_destroy = _ps.SyncObj._doDestroy

    def do_destroy(self):
        try:
            orig_do_destroy(self)             # transport, consumers, then the journal
        except BaseException:
            journal = self.__dict__.get("_SyncObj__raftLog")
            if isinstance(journal, WalcryptJournal):
                journal.close_quietly()       # a transport or consumer failure must not leave the store open
            raise

    _ps.SyncObj._doDestroy = do_destroy

    orig_tick_thread = _ps.SyncObj._autoTickThread

    def auto_tick_thread(self):              # ``self`` is a weakref.proxy of the SyncObj
        try:
            journal = self._SyncObj__raftLog
        except ReferenceError:
            journal = None
        try:
            return orig_tick_thread(self)
        finally:
            # However the thread ends (destroy, a failed bind, an exception, the thread that built
            # the SyncObj gone) the store it served is closed; after a destroy, a no-op.
            if isinstance(journal, WalcryptJournal):
                journal.close_quietly()

    _ps.SyncObj._autoTickThread = auto_tick_thread

    orig_send_next = _ps.SyncObj._SyncObj__sendNextNodeIdx

    def send_next_node_idx(self, *args, **kwargs):
        journal = self.__dict__.get("_SyncObj__raftLog")
        if isinstance(journal, WalcryptJournal) and not journal.closed:
            journal.flush()                   # entries are durable before the leader hears of them
        return orig_send_next(self, *args, **kwargs)

    _ps.SyncObj._SyncObj__sendNextNodeIdx = send_next_node_idx

    orig_tick = _ps.SyncObj._onTick

    def on_tick(self, timeToWait=0.0):
        try:
            return orig_tick(self, timeToWait)
        finally:
            node = self.__dict__.get("_walcrypt_node")
            if node is not None and not getattr(self, "_SyncObj__destroying", False):
                node.after_tick(self)

    _ps.SyncObj._onTick = on_tick

    orig_get = Serializer.getTransmissionData

    def get_transmission_data(self, transmissionID):
        node = _node_for_serializer(self)
        if node is None:
            return orig_get(self, transmissionID)
        if self._Serializer__pid != 0:
            return None
        trans = self._Serializer__transmissions
        t = trans.get(transmissionID)
        if t is None:
            snap = node.store.snapshot()
            if snap is None:
                return None
            t = trans[transmissionID] = {"file": snap.open(), "transmitted": 0}
        is_first = t["transmitted"] == 0
        data = t["file"].read(self._Serializer__transmissionBatchSize)
        t["transmitted"] += len(data)
        is_last = not data
        if is_last:
            t["file"].close()
            trans.pop(transmissionID, None)
        return data, is_first, is_last

    Serializer.getTransmissionData = get_transmission_data

    orig_set = Serializer.setTransmissionData

    def set_transmission_data(self, data):
        node = _node_for_serializer(self)
        if node is None:
            return orig_set(self, data)
        if data is None:
            return False
        chunk, is_first, is_last = data
        spool = getattr(self, "_walcrypt_spool", None)
        if is_first:
            if spool is not None:
                spool.close()
            spool = self._walcrypt_spool = _Spool(node.path)
        elif spool is None:
            return False
        if chunk:
            spool.write(bytes(chunk))
        if not is_last:
            return False
        self._walcrypt_spool = None
        try:
            head = _ChunkStream(spool.reader())
            last, _prev, _cluster = _read_head(head)
            stream = _ChunkStream(spool.reader())
            node.journal.flush()
            node.store.save_snapshot(SnapshotMeta(last[1], last[2] + node.term_offset), stream)  # under our DEK
            node.snapshots_received += 1
            _write_marker(node.marker + ".tmp", last[1])
            DEFAULT_VFS.rename(node.marker + ".tmp", node.marker)      # refuses a link at the marker
        finally:
            spool.close()
        return True

    Serializer.setTransmissionData = set_transmission_data
