"""Drivers: one small interface over the engine and every adapter, so that the same
Storage-contract cases (tests/conformance/test_contract.py) run against all of them.

Every driver speaks etcd raft ``Storage`` semantics, mapped onto the target's own API the
way its host would use it:

* ``append(entries)``            entries = [(index, term, data)], contiguous, starting at last+1
* ``entries(lo, hi)``            [(index, term, data)] for [lo, hi)
* ``term(i)``                    valid for [first-1, last] where the target can answer it
* ``first_index()`` / ``last_index()``   etcd view: an empty log is first = last + 1
* ``compact(i)``                 discard entries <= i (first becomes i + 1)
* ``replace_from(entries)``      Raft suffix replacement: entries[0].index <= last + 1
* ``save_snapshot(i, t, data)`` / ``snapshot()`` -> (index, term, data) or None
* ``reopen()``                   close, then open again from disk (a clean restart)
* ``crash()``                    drop the driver's in-memory adapter state *without* the
                                 adapter's shutdown hooks, then open again (the process died
                                 after its last durable point; engine durability under SIGKILL
                                 is covered by tests/test_sigkill.py)
* ``close()``

Out-of-range reads raise ``driver.compacted_error`` (below first) and
``driver.unavailable_error`` (above last): the engine's CompactedError / UnavailableError,
hashicorp's ErrLogNotFound for both, IndexError for the pysyncobj journal (positions).

``driver.na`` maps a feature name to the reason it does not apply to that target;
cases call ``need(driver, feature)`` and are skipped with that reason.
"""

from __future__ import annotations

import io
import os
import sys
import types

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import walcrypt  # noqa: E402
from walcrypt import CompactedError, Entry, SnapshotMeta, UnavailableError  # noqa: E402

import wctest  # noqa: E402

SEGMENT_SIZE = 4096                 # the engine's minimum: many segment boundaries per case
SNAPSHOT_CHUNK = 4096               # several stream chunks per snapshot
KEK = walcrypt.RawKey(wctest.KEK_BYTES)


def store_options(**extra) -> dict:
    opts = dict(segment_size=SEGMENT_SIZE, sync="always", snapshot_chunk_size=SNAPSHOT_CHUNK)
    opts.update(extra)
    return opts


class Driver:
    name = "?"
    encrypted = True
    compacted_error: type = Exception
    unavailable_error: type = Exception
    na: dict[str, str] = {}

    def __init__(self, path: str, **options):
        self.path = path
        self.options = store_options(**options)
        self.store = None
        self._open()

    # -- lifecycle ----------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def reopen(self) -> None:
        self._close()
        self._open()

    def crash(self) -> None:
        self.store.close()
        self._open()

    def close(self) -> None:
        if self.store is not None and not self.store.closed:
            self._close()

    # -- helpers ---------------------------------------------------------------------
    def segment_files(self) -> list[str]:
        return wctest.segment_files(self.path, self.encrypted)

    def __repr__(self) -> str:
        return f"<{self.name} driver at {self.path}>"


# ---------------------------------------------------------------------------------------
# (1) the engine
# ---------------------------------------------------------------------------------------


class EngineDriver(Driver):
    """walcrypt.Store, as an etcd-raft host drives it (save on each Ready)."""

    name = "engine-encrypted"
    compacted_error = CompactedError
    unavailable_error = UnavailableError
    na: dict[str, str] = {}

    def _open(self) -> None:
        if self.encrypted:
            self.store = walcrypt.open(self.path, kek=KEK, **self.options)
        else:
            self.store = walcrypt.open(self.path, encrypted=False, **self.options)

    def _close(self) -> None:
        self.store.close()

    def append(self, entries) -> None:
        self.store.save(entries=[Entry(*e) for e in entries])

    def replace_from(self, entries) -> None:
        self.store.save(entries=[Entry(*e) for e in entries])

    def entries(self, lo: int, hi: int):
        return [tuple(e) for e in self.store.entries(lo, hi)]

    def term(self, i: int) -> int:
        return self.store.term(i)

    def first_index(self) -> int:
        return self.store.first_index()

    def last_index(self) -> int:
        return self.store.last_index()

    def compact(self, i: int) -> None:
        self.store.compact(i)

    def save_snapshot(self, index: int, term: int, data: bytes) -> None:
        self.store.save_snapshot(SnapshotMeta(index, term), io.BytesIO(data))

    def snapshot(self):
        s = self.store.snapshot()
        return None if s is None else (s.meta.index, s.meta.term, s.data)


class PlainEngineDriver(EngineDriver):
    name = "engine-plaintext"
    encrypted = False


# ---------------------------------------------------------------------------------------
# (2) hashicorp LogStore + StableStore + SnapshotStore
# ---------------------------------------------------------------------------------------


class HashicorpDriver(Driver):
    """The hashicorp adapters, used the way hashicorp/raft uses its stores:

    * the etcd view of the log is hashicorp raft's: lastIndex = max(LogStore.LastIndex,
      newest snapshot index); an empty LogStore (0/0) has first = last + 1;
    * term(i) is GetLog(i).Term, or the newest snapshot's term for its own index
      (raft keeps lastSnapshotTerm from the SnapshotStore);
    * compact(i) is compactLogs: DeleteRange(FirstIndex(), i);
    * replace_from is appendEntries' conflict path: DeleteRange(conflict, LastIndex())
      then StoreLogs(new entries);
    * snapshots go through SnapshotStore.Create -> sink.write -> sink.close, and
      snapshot() is Open(List()[0].ID)."""

    name = "hashicorp"
    na: dict[str, str] = {}

    def _open(self) -> None:
        from walcrypt.adapters import hashicorp as hc
        self.hc = hc
        self.compacted_error = self.unavailable_error = hc.LogNotFoundError
        self.store = walcrypt.open(self.path, kek=KEK, **self.options)
        self.logs = hc.LogStore(self.store)
        self.stable = hc.StableStore(self.store)
        self.snaps = hc.SnapshotStore(self.store)

    def _close(self) -> None:
        self.store.close()

    def _newest_snapshot(self):
        lst = self.snaps.list()
        return lst[0] if lst else None

    def append(self, entries) -> None:
        self.logs.store_logs([self.hc.Log(i, t, data=d) for i, t, d in entries])

    def replace_from(self, entries) -> None:
        lo = entries[0][0]
        last = self.logs.last_index()
        if last and lo <= last:
            self.logs.delete_range(lo, last)
        self.append(entries)

    def entries(self, lo: int, hi: int):
        out = []
        for i in range(lo, hi):
            log = self.logs.get_log(i)
            assert log.index == i and log.type == 0
            out.append((log.index, log.term, bytes(log.data)))
        return out

    def term(self, i: int) -> int:
        try:
            return self.logs.get_log(i).term
        except self.hc.LogNotFoundError:
            snap = self._newest_snapshot()
            if snap is not None and snap.index == i:
                return snap.term
            raise

    def last_index(self) -> int:
        snap = self._newest_snapshot()
        return max(self.logs.last_index(), snap.index if snap else 0)

    def first_index(self) -> int:
        f = self.logs.first_index()
        return f if f else self.last_index() + 1

    def compact(self, i: int) -> None:
        self.logs.delete_range(self.logs.first_index(), i)

    def save_snapshot(self, index: int, term: int, data: bytes) -> None:
        sink = self.snaps.create(1, index, term, b"cfg@%d" % index, index)
        for k in range(0, len(data), 3000):
            sink.write(data[k:k + 3000])
        sink.close()

    def snapshot(self):
        snap = self._newest_snapshot()
        if snap is None:
            return None
        info, reader = self.snaps.open(snap.id)
        try:
            data = reader.read()
        finally:
            reader.close()
        assert info == snap
        return info.index, info.term, data


# ---------------------------------------------------------------------------------------
# (3) the pysyncobj journal
# ---------------------------------------------------------------------------------------


class PysyncobjDriver(Driver):
    """WalcryptJournal driven directly, without a SyncObj, the way SyncObj drives it:

    * positions, not indexes: pos(i) = i - journal[0].idx;
    * append: add() per entry, then flush() (pysyncobj's wiring flushes before the
      follower answers the leader and at the end of every tick);
    * replace_from: deleteEntriesFrom(pos(first new)) then add() + flush()
      (SyncObj.__deleteEntriesFrom in the AppendEntries handler);
    * compact(i): deleteEntriesTo(pos(i) + 1), so journal[0] becomes entry i + 1;
    * entries/term read journal[pos]; below journal[0] the driver raises IndexError
      itself (pysyncobj guards every read with ``diff < 0``; a negative position would
      wrap around in Python), past the end the journal raises IndexError;
    * snapshots: the node's pysyncobj serializer hooks (``serialize`` into the marker's
      .tmp then an atomic replace, ``deserialize`` when the marker exists), with a stand-in
      SyncObj whose ``payload`` attribute is the snapshot data;
    * reopen: journal._destroy(), then a fresh walcrypt_conf + open_journal (a new process);
      crash: the store is closed without _destroy()."""

    name = "pysyncobj"
    compacted_error = IndexError
    unavailable_error = IndexError
    na = {
        "term_before_first": "pysyncobj never asks for the term before journal[0]: after a compaction it keeps "
                             "the snapshot's (prev, last) entries in the journal itself",
        "snapshot_ahead": "a snapshot ahead of the log reaches the journal only through Serializer."
                          "setTransmissionData + SyncObj.__loadDumpFile (clear + add prev/last); covered by "
                          "test_pysyncobj_snapshot_install_resets_the_journal",
        "snapshot_conflict": "pysyncobj only serializes its own applied entries; a conflicting snapshot arrives "
                             "through the install path (test_pysyncobj_snapshot_install_resets_the_journal)",
        "compact_all": "SyncObj never empties its journal (it keeps the snapshot's two entries); "
                       "deleteEntriesTo(len) is not a call pysyncobj makes",
        "snapshot_then_compact": "pysyncobj compacts with deleteEntriesTo(pos(prev)) after serializing at the last "
                                 "applied entry; covered by test_pysyncobj_compaction_flow",
        "gap": "SyncObj never adds an entry that does not follow journal[-1]",
        "empty_store_term": "an empty journal has no entries to take a term from (SyncObj adds a no-op at index 1 "
                            "before anything reads it)",
    }

    def _open(self) -> None:
        from walcrypt.adapters import pysyncobj as ps
        self.ps = ps
        self.conf = ps.walcrypt_conf(self.path, kek=KEK, store_options=dict(self.options))
        self.node = self.conf.walcrypt
        self.node.syncobj = types.SimpleNamespace()        # what serialize() captures as the SyncObj state
        self.j = self.node.open_journal()
        self.store = self.node.store

    def _close(self) -> None:
        self.j._destroy()

    def crash(self) -> None:
        # No flush, no final commit-index save: only what is already durable survives.
        self.store.close()
        self._open()

    # -- positions -----------------------------------------------------------------
    def _first(self) -> int:
        return self.j[0][1] if len(self.j) else 1

    def _pos(self, i: int) -> int:
        p = i - self._first()
        if p < 0:
            raise IndexError(f"index {i} is before journal[0] (pysyncobj's diff < 0 guard)")
        return p

    def append(self, entries) -> None:
        for i, t, d in entries:
            self.j.add(d, i, t)
        self.j.flush()

    def replace_from(self, entries) -> None:
        if len(self.j):
            self.j.deleteEntriesFrom(self._pos(entries[0][0]))
        self.append(entries)

    def entries(self, lo: int, hi: int):
        out = []
        for i in range(lo, hi):
            cmd, idx, term = self.j[self._pos(i)]
            assert idx == i
            out.append((idx, term, bytes(cmd)))
        if lo < hi:
            sliced = [(idx, term, bytes(cmd)) for cmd, idx, term in self.j[self._pos(lo):self._pos(hi)]]
            assert sliced == out, "journal slice differs from per-position reads"
        return out

    def term(self, i: int) -> int:
        return self.j[self._pos(i)][2]

    def first_index(self) -> int:
        return self._first()

    def last_index(self) -> int:
        return self.j[-1][1] if len(self.j) else 0

    def compact(self, i: int) -> None:
        self.j.deleteEntriesTo(self._pos(i) + 1)

    def save_snapshot(self, index: int, term: int, data: bytes) -> None:
        # SyncObj serializes lastAppliedEntries = __getEntries(lastApplied - 1, 2): two journal entries.
        assert index > self._first(), "pysyncobj snapshots need the (prev, last) pair from the journal"
        last = tuple(self.j[self._pos(index)])
        assert last[2] == term, "the serializer path snapshots the journal's own entry"
        prev = tuple(self.j[self._pos(index) - 1])
        self.node.syncobj.payload = data
        tmp = self.node.marker + ".tmp"
        self.node.serialize(tmp, (last, prev, {"node-a", "node-b"}))
        os.replace(tmp, self.node.marker)                # pysyncobj's atomicReplace

    def snapshot(self):
        if not os.path.exists(self.node.marker):          # pysyncobj loads a dump only when the file exists
            return None
        self.node.syncobj = types.SimpleNamespace()
        last, _prev, _cluster = self.node.deserialize(self.node.marker)
        return last[1], last[2], self.node.syncobj.payload


DRIVERS = {d.name: d for d in (EngineDriver, PlainEngineDriver, HashicorpDriver, PysyncobjDriver)}
