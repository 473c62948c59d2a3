"""One pysyncobj node on a walcrypt store: the SyncObj it serves (one at a time), the store and
journal it opens for each start, and pysyncobj's custom serializer hooks, which write the state of
the SyncObj and its consumers as a walcrypt snapshot (encrypted under this node's DEK)."""

from __future__ import annotations

import io
import logging
import os
import time
import weakref
from typing import Any

from .. import opening
from ..errors import LockedError, UsageError
from ..keys import KeyEncryptionKey
from ..storage import Store
from ..types import SnapshotMeta
from ..vfs import DEFAULT_VFS, refuse_link
from .pysyncobj_adopt import adopt_legacy_files, warn_imported
from .pysyncobj_format import MARKER_NAME, decode_dump, encode_dump, term_offset, write_marker
from .pysyncobj_journal import WalcryptJournal

CLOSE_WAIT_S = 10.0        # how long destroy() waits for the tick thread to close the store
log = logging.getLogger("walcrypt.adapters.pysyncobj")     # the adapter's one logger (named in the README)


class WalcryptNode:
    """Per-node context: the store, the journal, and the SyncObj it serves (one at a time)."""

    def __init__(self, path: str, *, kek: KeyEncryptionKey | None, encrypted: bool, store_options: dict[str, Any]):
        self.path = path
        self.kek = kek
        self.encrypted = encrypted
        self.store_options = dict(store_options)
        self.store_options.setdefault("sync", "batch")
        self.marker = os.path.join(path, MARKER_NAME)
        self.term_offset = 0
        self.store: Store | None = None
        self.journal: WalcryptJournal | None = None
        self._syncobj: Any = None       # a weak reference once bound (a test stand-in is held as is)
        self._rotate_requested = False
        self._last_force = 0.0
        self.snapshots_saved = 0
        self.snapshots_received = 0
        self.import_journal: str | None = None       # a path, "auto" or None (walcrypt_conf's import_journal)
        self.import_dump: str | None = None
        self.import_report: dict | None = None

    @property
    def syncobj(self) -> Any:
        """The SyncObj this node serves.  Held weakly: a conf that outlives its SyncObj (kept for a
        restart) does not keep the destroyed node, its consumers and their state alive."""
        ref = self._syncobj
        return ref() if isinstance(ref, weakref.ref) else ref

    @syncobj.setter
    def syncobj(self, value: Any) -> None:
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

    def open_journal(self) -> WalcryptJournal:
        """Open the store and a journal on it (one per SyncObj start); the store closes with the journal."""
        if self.journal is not None and not self.journal.closed:
            raise UsageError(f"this walcrypt_conf already serves an open journal (store {self.path})")
        rep = adopt_legacy_files(self.path, self.import_journal, self.import_dump, kek=self.kek,
                                 encrypted=self.encrypted, store_options=self.store_options)
        if rep is not None:
            self.import_report = rep
            warn_imported(self.path, rep)
        try:
            store = opening.open(self.path, kek=self.kek, encrypted=self.encrypted, **self.store_options)
        except LockedError as exc:
            raise LockedError(f"{exc}. If another SyncObj in this process serves {self.path}, destroy() it first "
                              f"(destroy() waits up to {CLOSE_WAIT_S:.0f} s for its tick thread to close the "
                              "store); a second one cannot share it") from None
        try:
            self.store = store
            self.term_offset = term_offset(store)
            journal = WalcryptJournal(self)
            self._sync_marker(store)
        except BaseException:
            store.close()
            raise
        self.journal = journal
        return journal

    def _sync_marker(self, store: Store) -> None:
        """The marker file exists exactly when a snapshot does (pysyncobj loads it at start)."""
        snap = store.snapshot()
        if snap is not None:
            refuse_link(self.marker)
            if not os.path.exists(self.marker):
                write_marker(self.marker + ".tmp", snap.meta.index)
                DEFAULT_VFS.rename(self.marker + ".tmp", self.marker)
        elif os.path.lexists(self.marker):
            os.unlink(self.marker)          # a link is removed itself, never followed

    def current_store(self) -> Store:
        """The store this node serves; UsageError when the SyncObj has not opened it yet."""
        if self.store is None:
            raise UsageError(f"the node's store is not open (the SyncObj has not started): {self.path}")
        return self.store

    def current_journal(self) -> WalcryptJournal:
        """The journal this node serves; UsageError when the SyncObj has not opened it yet."""
        if self.journal is None:
            raise UsageError(f"the node's journal is not open (the SyncObj has not started): {self.path}")
        return self.journal

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

    def after_tick(self, syncobj: Any) -> None:
        j, st = self.journal, self.store
        if j is None or j.closed or st is None:     # the store is open whenever the journal is
            return
        j.flush()
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
    def serialize(self, tmp_file: str, data: Any) -> None:
        """pysyncobj's custom serializer: ``data`` is (last entry, previous entry, cluster).
        pysyncobj swallows a failure here (it logs only "Failed to store full dump"), so the
        cause is logged before it is raised."""
        try:
            last, prev, cluster = data
            refuse_link(self.marker)                   # pysyncobj renames tmp_file onto it
            self.current_journal().flush()             # the snapshot never runs ahead of the durable log
            blob = encode_dump(last, prev, cluster, self._state())
            self.current_store().save_snapshot(SnapshotMeta(last[1], last[2] + self.term_offset), io.BytesIO(blob))
            self.snapshots_saved += 1
            write_marker(tmp_file, last[1])
        except Exception:
            log.exception("saving a pysyncobj snapshot into the walcrypt store at %s failed", self.path)
            raise

    def deserialize(self, _file_name: str) -> tuple[Any, Any, Any]:
        """pysyncobj's custom deserializer: restore the state; return (last, prev, cluster)."""
        snap = self.current_store().snapshot()
        if snap is None:
            raise FileNotFoundError("no walcrypt snapshot")
        with snap.open() as f:
            last, prev, cluster, state = decode_dump(f)
        self._restore(state)
        return last, prev, cluster
