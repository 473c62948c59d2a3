"""The cluster's third journal: :class:`NaiveDurableJournal`, a pysyncobj ``Journal`` that seals
every entry with AES-256-GCM and fsyncs after every ``add`` -- the durable encrypted journal a user
would write by hand -- and :func:`use_naive_journal`, which points a ``journalFile`` at it.
"""

from __future__ import annotations

import os
import struct
from typing import List, Tuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .baselines import BENCH_KEY, NONCE_LEN
from .baselines import fsync_dir as _fsync_dir

try:
    from pysyncobj.journal import Journal as _PysyncobjJournal
except ImportError:  # pragma: no cover - pysyncobj is a benchmark/test dependency
    _PysyncobjJournal = object  # type: ignore[assignment,misc]


class NaiveDurableJournal(_PysyncobjJournal):  # type: ignore[misc,valid-type]
    """The durable encrypted journal a user would write by hand: the cluster baseline.

    Every ``add`` seals the command with AES-256-GCM (random nonce, index and
    term as AAD), appends ``<u32 len><u64 idx><u64 term><nonce||ct>`` to an
    append-only file and calls ``os.fsync`` -- one fsync per entry, no group
    commit.  Term and vote live in a small JSON file replaced atomically
    (write, fsync, rename, directory fsync).  ``deleteEntriesFrom`` truncates
    and fsyncs; ``deleteEntriesTo`` rewrites the file (rare: compaction).
    """

    _REC = struct.Struct("<IQQ")

    def __init__(self, path: str):
        self.path = path
        self.term_path = path + ".term"
        self.dir = os.path.dirname(os.path.abspath(path)) or "."
        self.aead = AESGCM(BENCH_KEY)
        self.entries: List[Tuple[bytes, int, int]] = []
        self.offsets: List[int] = []
        self.commit = 1
        self.term, self.vote = 0, None
        if os.path.exists(self.term_path):
            import json

            with open(self.term_path) as f:
                tv = json.load(f)
            self.term, self.vote = tv["term"], tv["vote"]
        existed = os.path.exists(path)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not existed:
            _fsync_dir(self.dir)
        size = os.fstat(self.fd).st_size
        buf = os.pread(self.fd, size, 0) if size else b""
        pos, rec = 0, self._REC
        while pos + rec.size <= size:
            length, idx, term = rec.unpack_from(buf, pos)
            if pos + rec.size + length > size:
                break
            value = buf[pos + rec.size:pos + rec.size + length]
            aad = rec.pack(length, idx, term)
            command = self.aead.decrypt(value[:NONCE_LEN], value[NONCE_LEN:], aad)
            self.offsets.append(pos)
            self.entries.append((command, idx, term))
            pos += rec.size + length
        if pos != size:                       # a torn tail: drop it
            os.ftruncate(self.fd, pos)
            os.fsync(self.fd)
        self.end = pos

    def _record(self, command: bytes, idx: int, term: int) -> bytes:
        length = NONCE_LEN + len(command) + 16
        head = self._REC.pack(length, idx, term)
        nonce = os.urandom(NONCE_LEN)
        return head + nonce + self.aead.encrypt(nonce, bytes(command), head)

    def add(self, command, idx, term):
        rec = self._record(command, idx, term)
        os.pwrite(self.fd, rec, self.end)
        os.fsync(self.fd)
        self.offsets.append(self.end)
        self.end += len(rec)
        self.entries.append((command, idx, term))

    def clear(self):
        self.entries, self.offsets = [], []
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self.end = 0

    def deleteEntriesFrom(self, entryFrom):
        if entryFrom >= len(self.entries):
            return
        self.end = self.offsets[entryFrom]
        del self.entries[entryFrom:]
        del self.offsets[entryFrom:]
        os.ftruncate(self.fd, self.end)
        os.fsync(self.fd)

    def deleteEntriesTo(self, entryTo):
        keep = self.entries[entryTo:]
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        offsets, pos, parts = [], 0, []
        for command, idx, term in keep:
            rec = self._record(command, idx, term)
            offsets.append(pos)
            parts.append(rec)
            pos += len(rec)
        os.write(fd, b"".join(parts))
        os.fsync(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.dir)
        os.close(self.fd)
        self.fd, self.end = fd, pos
        self.entries, self.offsets = keep, offsets

    def __getitem__(self, item):
        return self.entries[item]

    def __len__(self):
        return len(self.entries)

    def _destroy(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def setRaftCommitIndex(self, raftCommitIndex):
        self.commit = raftCommitIndex

    def getRaftCommitIndex(self):
        return self.commit

    def setCurrentTerm(self, term, votedForNodeId):
        import json

        self.term, self.vote = term, votedForNodeId
        tmp = self.term_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"term": term, "vote": votedForNodeId}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.term_path)
        _fsync_dir(self.dir)

    def getCurrentTerm(self):
        return self.term

    def getVotedForNodeId(self):
        return self.vote


_NAIVE_PATHS: set = set()
_NAIVE_INSTALLED = False


def use_naive_journal(journal_file: str) -> str:
    """Make SyncObjs whose ``journalFile`` is ``journal_file`` use :class:`NaiveDurableJournal`.

    pysyncobj calls ``pysyncobj.syncobj.createJournal``; it is wrapped once (the wrapper
    hands every other path to whatever was installed before, e.g. walcrypt's adapter)."""
    global _NAIVE_INSTALLED
    import pysyncobj.syncobj as ps

    path = os.path.abspath(journal_file)
    _NAIVE_PATHS.add(path)
    if not _NAIVE_INSTALLED:
        _NAIVE_INSTALLED = True
        previous = ps.createJournal

        def create_journal(journal_file=None):
            if journal_file and os.path.abspath(journal_file) in _NAIVE_PATHS:
                return NaiveDurableJournal(journal_file)
            return previous(journal_file)

        ps.createJournal = create_journal
    return path


def forget_naive_journal(journal_file: str) -> None:
    _NAIVE_PATHS.discard(os.path.abspath(journal_file))
