"""Reading pysyncobj's ``FileJournal`` file and its ``.meta`` file as untrusted input.

The byte layout is in :mod:`walcrypt.legacy.pysyncobj_files` (and formats/LEGACY.md, "pysyncobj").
Lengths are checked against the file before anything is allocated; the sources are opened
read-only, hashed as they are read, and never changed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator

from ..adapters.pysyncobj_format import TERM_OFFSET
from ..errors import CorruptionError, UsageError
from ..vfs import open_regular
from . import _pickles

NAME = b"PYSYNCOBJ"
NAME_SIZE, VERSION_SIZE = 24, 8
HEADER_SIZE = NAME_SIZE + VERSION_SIZE + 4 + 4          # records start here
FORMAT_VERSION = 1
RECORD_MIN = 16                                         # u64 index + u64 term (an empty command)
MAX_META_BYTES = 1 << 20
MAX_INDEX = (1 << 64) - 2                               # walcrypt's largest entry index; terms get +1


def corrupt(path: str, offset: int | None, detail: str, hint: str | None = None) -> CorruptionError:
    return CorruptionError(path, offset, detail, hint or "this is not a pysyncobj file this importer can adopt; "
                           "the source was not changed and nothing was written")


class Source:
    """A source file opened read-only (a regular file; links followed, as the operator named it),
    hashed as it is read.  ``finish()`` reads the rest, checks the file did not change meanwhile and
    returns its record (role, path, size, SHA-256)."""

    def __init__(self, path: str, role: str):
        self.path = os.path.abspath(os.fspath(path))
        self.role = role
        try:
            fd = open_regular(self.path)
        except FileNotFoundError:
            raise UsageError(f"{self.path} does not exist (the pysyncobj {role} file to import)") from None
        st = os.fstat(fd)
        self.f = os.fdopen(fd, "rb", buffering=1 << 20)
        self.size, self._stamp = st.st_size, (st.st_size, st.st_mtime_ns, st.st_ino)
        self.pos = 0
        self.h = hashlib.sha256()

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self.size - self.pos))     # never more than the file holds: no oversized buffer
        out = self.f.read(n)
        self.pos += len(out)
        self.h.update(out)
        return out

    def finish(self) -> dict:
        while self.read(1 << 20):
            pass
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self._stamp or self.pos != self.size:
            raise UsageError(f"{self.path} changed while it was imported: stop the pysyncobj node that writes it, "
                             "then import again")
        return {"role": self.role, "path": self.path, "size": self.size, "sha256": self.h.hexdigest()}

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------
# The journal
# ---------------------------------------------------------------------------------------------

def _check_header(path: str, head: bytes, size: int) -> tuple[str, int]:
    """(pysyncobj version, recorded end) of a journal header; CorruptionError if it is not one."""
    if len(head) < HEADER_SIZE:
        raise corrupt(path, 0, f"{size} bytes is too short for a pysyncobj journal header ({HEADER_SIZE} bytes)")
    if head[:NAME_SIZE] != NAME + bytes(NAME_SIZE - len(NAME)):
        raise corrupt(path, 0, "not a pysyncobj journal (no PYSYNCOBJ header)")
    version = head[NAME_SIZE:NAME_SIZE + VERSION_SIZE].rstrip(b"\0")
    if not version or not all(0x20 < c < 0x7f for c in version):
        raise corrupt(path, NAME_SIZE, "the journal header's version field is not a version string")
    fmt_version, end = struct.unpack_from("<II", head, NAME_SIZE + VERSION_SIZE)
    if fmt_version != FORMAT_VERSION:
        raise corrupt(path, NAME_SIZE + VERSION_SIZE, f"journal format version {fmt_version} (this importer "
                       f"reads version {FORMAT_VERSION})")
    if end < HEADER_SIZE:
        raise corrupt(path, LAST_OFFSET_AT, f"the recorded end of the journal ({end}) lies inside its header")
    return version.decode(), end


LAST_OFFSET_AT = NAME_SIZE + VERSION_SIZE + 4


def read_journal(src: Source, report: dict) -> Iterator[tuple[int, int, bytes]]:
    """Yield the journal's entries (index, term, command) up to its last complete record.

    A torn tail - the file ends before the recorded end, a zero length field (a region the lost
    write left zero-filled), or a record whose closing length does not match its opening one (not
    completely written) - ends the import there and is recorded in ``report["cut"]``.  A record
    that cannot be a lost write (a length too small for a record, one running past the recorded end
    of a file that is long enough, an index that does not follow, a falling term) is corruption."""
    path = src.path
    version, end = _check_header(path, src.read(HEADER_SIZE), src.size)
    report.update(pysyncobj_version=version, recorded_end=end, file_size=src.size)
    limit = min(end, src.size)
    off, prev_index, prev_term, count = HEADER_SIZE, None, None, 0

    def cut(reason: str) -> None:
        report["cut"] = {"offset": off, "bytes": end - off, "reason": reason}

    while off < end:
        if off + 4 > limit:
            if end > src.size:
                cut(f"the file ends {src.size - off} bytes into a record (it is shorter than its recorded end {end})")
                break
            raise corrupt(path, off, f"a record's length field runs past the recorded end of the journal ({end})")
        (n,) = struct.unpack("<I", src.read(4))
        if n == 0:
            cut("a zero-filled region where the next record should be (a write that never reached the disk)")
            break
        if n < RECORD_MIN:
            raise corrupt(path, off, f"record length {n} is shorter than a record's index and term ({RECORD_MIN})")
        rec_end = off + 4 + n + 4
        if rec_end > end or rec_end > src.size:
            if end > src.size and rec_end > src.size:
                cut(f"the file ends inside a {n}-byte record (it is shorter than its recorded end {end})")
                break
            raise corrupt(path, off, f"record length {n} runs past the recorded end of the journal ({end})")
        body = src.read(n)
        (closing,) = struct.unpack("<I", src.read(4))
        if closing != n:
            cut(f"the record's closing length ({closing}) differs from its opening length ({n}): "
                "not completely written")
            break
        index, term = struct.unpack_from("<QQ", body)
        if prev_index is None:
            if not 1 <= index <= MAX_INDEX:
                raise corrupt(path, off, f"the first record has index {index}")
        elif index != prev_index + 1:
            raise corrupt(path, off, f"record index {index} does not follow {prev_index}")
        if term >= (1 << 64) - TERM_OFFSET or (prev_term is not None and term < prev_term):
            raise corrupt(path, off, f"record {index} has term {term} after term {prev_term}")
        if prev_index is None:
            report["first_index"] = index
        yield index, term, body[16:]
        prev_index, prev_term, count = index, term, count + 1
        report.update(last_index=index, last_term=term, entries=count)
        off = rec_end


def read_meta(path: str, report: dict) -> dict:
    """Term, vote and commit index from ``<journal>.meta`` (pysyncobj's defaults when it is missing
    or empty, as pysyncobj itself reads it; anything unreadable is corruption: a silently lost vote
    could let this node vote twice in one term)."""
    values = {"currentTerm": 0, "votedForNodeId": None, "raftCommitIndex": 1}
    if not os.path.lexists(path):
        report["meta"] = "missing: pysyncobj's defaults (term 0, no vote, commit index 1)"
        return values
    src = Source(path, "meta")
    try:
        if src.size > MAX_META_BYTES:
            raise corrupt(path, 0, f"{src.size} bytes is too large for pysyncobj's journal meta file")
        data = src.read(src.size)
        report["sources"].append(src.finish())
    finally:
        src.close()
    if not data:
        report["meta"] = "empty (its last write never reached the disk): pysyncobj's defaults"
        return values
    try:
        _pickles.check(data)
        loaded, _ = _pickles.safe_load(data, strict=True)
    except _pickles.PickleRefused as exc:
        raise corrupt(path, exc.offset, f"the journal meta file is not a plain pickled dict: {exc.detail}") from None
    if not isinstance(loaded, dict):
        raise corrupt(path, None, f"the journal meta file holds a {type(loaded).__name__}, not a dict")
    values.update({k: v for k, v in loaded.items() if k in values})
    term, vote, commit = values["currentTerm"], values["votedForNodeId"], values["raftCommitIndex"]
    if type(term) is not int or not 0 <= term < (1 << 63) or type(commit) is not int or not 0 <= commit <= MAX_INDEX:
        raise corrupt(path, None, f"the journal meta file holds term {term!r} and commit index {commit!r}")
    if vote is not None and not isinstance(vote, (str, int)):
        raise corrupt(path, None, f"the journal meta file's vote is a {type(vote).__name__}")
    if isinstance(vote, int) and not -(1 << 63) <= vote < (1 << 64) or isinstance(vote, str) and len(vote) > 4096:
        raise corrupt(path, None, "the journal meta file's vote is not a node ID (an integer beyond 64 bits, or "
                                   "text of more than 4096 characters)")
    report["meta"] = "read"
    return values

