"""pysyncobj's ``Journal`` on a walcrypt store: the Raft log, term and vote, and commit index of one
SyncObj, made durable in group commits (one ``save()``, one fdatasync, for every entry of a tick)."""

from __future__ import annotations

import logging
import threading
from itertools import chain, repeat
from operator import sub
from typing import Iterator, Protocol

from pysyncobj.journal import Journal

from ..errors import UsageError
from ..storage import Store
from ..types import Entry, HardState
from .pysyncobj_format import load_term_vote, read_head, save_term_vote

log = logging.getLogger("walcrypt.adapters.pysyncobj")     # the adapter's one logger (named in the README)


class JournalHost(Protocol):
    """What a journal takes from the node that opens it (:class:`~.pysyncobj_node.WalcryptNode`)."""

    path: str
    store: Store | None
    term_offset: int


def _journal_tuples(store: Store, lo: int, hi: int, off: int) -> Iterator[tuple[bytes, int, int]]:
    """pysyncobj's (command, index, term) for the entries [lo, hi), built in C from the store's bulk
    read (every record authenticated before any of its entries is used)."""
    return chain.from_iterable(
        zip(b.datas(), range(b.first, b.first + len(b)), map(sub, b.terms, repeat(off)) if off else b.terms)
        for b in store.iter_batches(lo, hi))


class WalcryptJournal(Journal):
    """pysyncobj's Journal on a walcrypt store.  Used from the SyncObj tick thread only (or the
    thread calling ``doTick`` without autoTick); ``_destroy`` may come from any thread, any
    number of times.

    Positions (pysyncobj's ``deleteEntriesFrom/To`` arguments) index an in-memory mirror
    of (command, index, term) tuples; the store holds the durable copy."""

    def __init__(self, node: JournalHost):
        store = node.store
        if store is None:
            raise UsageError(f"the store at {node.path} is not open: the node opens it before its journal")
        self.node = node
        self._store = store
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
                s_last, s_prev, _cluster = read_head(f)
            self._entries = [tuple(e) for e in (s_prev, s_last) if e[1] < first]
        self._entries.extend(_journal_tuples(store, first, last + 1, off))
        hs, _cs = store.initial_state()
        self._commit = hs.commit or 1
        self._saved_commit = self._commit
        self._term, self._vote = load_term_vote(store)

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
            log.exception("closing the walcrypt store at %s failed", self.node.path)

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
        save_term_vote(self._store, term, votedForNodeId)

    def getCurrentTerm(self):
        return self._term

    def getVotedForNodeId(self):
        return self._vote

    def onOneSecondTimer(self):
        if self._commit != self._saved_commit and not self._pending:
            self._store.save(hard_state=HardState(self._term, 0, self._commit))
            self._saved_commit = self._commit
