"""etcd v3's WAL files and snap files, byte level: reading them as untrusted input, writing them.

Format facts from etcd v3.4.23's ``wal`` package (``decoder.go``, ``encoder.go``, ``wal.go``,
``util.go``, ``repair.go``) and ``etcdserver/api/snap/snapshotter.go``, restated here (see
formats/LEGACY.md, "etcd"):

* A WAL directory holds files named ``%016x-%016x.wal`` (sequence number, index of the first entry
  the file may hold), sequence numbers consecutive.  A file is a stream of frames: an 8-byte
  little-endian length word, then a marshalled ``walpb.Record``, then zero padding to a multiple of
  8 bytes.  The low 56 bits of the word are the record's length; when the top bit is set, bits
  56..58 hold the padding length.  A zero word (or the end of the file) ends the file: etcd
  preallocates 64 MB (64,000,000 bytes) per file, and the unused tail reads as zeros.  etcd refuses a
  record of 10 MiB or more.
* Record types: 1 metadata (an ``etcdserverpb.Metadata``), 2 entry (a ``raftpb.Entry``), 3 state
  (a ``raftpb.HardState``), 4 crc, 5 snapshot (a ``walpb.Snapshot``).  Every file begins with a crc
  record holding the CRC with which the previous file ended (0 in the first file), then the
  metadata record.
* The ``crc`` of every other record is CRC-32C (Castagnoli) of its ``data``, continued from the CRC
  of the record before it (a rolling value across records and files).
* A damaged record in the last file is a torn write - cut, as etcd's repair does - when the file
  ends inside it, or when any 512-byte-sector-aligned piece of it is all zeros.  Anything else that
  fails (a CRC mismatch, a record that does not parse, a file ending early that is not the last) is
  corruption.
* A snap file ``%016x-%016x.snap`` (term, index) is a ``snappb.snapshot``: ``crc`` is CRC-32C of
  ``data`` from 0, and ``data`` is a marshalled ``raftpb.Snapshot``.

Every length is checked against what the file holds before anything is read or allocated; files
are opened read-only without following symbolic links and mapped, not read whole.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from typing import NamedTuple

from crc32c import crc32c

from ..errors import CorruptionError, UsageError
from . import etcdpb as pb

METADATA, ENTRY, STATE, CRC, SNAPSHOT = 1, 2, 3, 4, 5
TYPE_NAMES = {METADATA: "metadata", ENTRY: "entry", STATE: "state", CRC: "crc", SNAPSHOT: "snapshot"}
MAX_RECORD = 10 * 1024 * 1024             # etcd's maxWALEntrySizeLimit
SECTOR = 512                              # etcd's minSectorSize (torn-write detection)
SEGMENT_BYTES = 64 * 1000 * 1000          # etcd's SegmentSizeBytes (files are preallocated to it)
# etcd cuts a file once a Save leaves it past SEGMENT_BYTES, so a file is that plus one Save's batch
# of records; a file beyond this bound is refused before it is read into memory.
MAX_WAL_FILE_BYTES = 1 << 30
MAX_SNAP_FILE = 1 << 31                   # a .snap file is read whole: refuse absurd sizes first
_LEN_MASK = (1 << 56) - 1
WAL_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")
SNAP_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")


class Record(NamedTuple):
    file: str          # path of the WAL file
    offset: int | None  # of the frame's length word (None: data read back from a store, not from a WAL file)
    type: int
    data: bytes


class Torn(NamedTuple):
    file: str
    offset: int        # where the last complete record ends: everything from here is cut
    cut: int           # bytes from there to the end of the file (zero-filled preallocation included)
    reason: str


def wal_names(wal_dir: str) -> list[tuple[int, int, str]]:
    """(sequence, index, name) of the WAL files, in sequence order; names etcd ignores are skipped."""
    out = []
    for name in os.listdir(wal_dir):
        m = WAL_NAME.match(name)
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 16), name))
    out.sort()
    return out


def snap_names(snap_dir: str) -> list[str]:
    """The snap files, newest first (etcd sorts the names in reverse)."""
    if not os.path.isdir(snap_dir):
        return []
    return sorted((n for n in os.listdir(snap_dir) if SNAP_NAME.match(n)), reverse=True)


def open_source(path: str) -> int:
    """A read-only descriptor on a regular file (no symbolic link is followed, nothing blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}"
                         + (" (a symbolic link: give the file it points to)" if os.path.islink(path) else "")) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file")
    return fd


def _torn_piece(data, file_off: int) -> bool:
    """etcd's isTornEntry: does any sector-aligned piece of a record's bytes read as all zeros?"""
    pos = 0
    while pos < len(data):
        n = min(SECTOR - file_off % SECTOR, len(data) - pos)
        if not any(data[pos:pos + n]):
            return True
        pos += n
        file_off += n
    return False


def read_wal_file(path: str, crc: int, last: bool) -> tuple[list[Record], int, Torn | None]:
    """The records of one WAL file -> (records, the rolling CRC after them, torn tail or None).

    ``crc`` is the rolling CRC the previous file ended with (0 before the first file)."""
    # Read into memory, not mapped: a file truncated while it is read (an etcd starting on the same
    # directory repairs its tail) gives a short read - a torn tail or an error - never a SIGBUS.
    fd = open_source(path)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_WAL_FILE_BYTES:
            raise CorruptionError(path, None, f"WAL file of {size} bytes: etcd cuts a file once it passes "
                                              f"{SEGMENT_BYTES} bytes; one larger than {MAX_WAL_FILE_BYTES} is "
                                              "not a file etcd wrote")
        chunks, off = [], 0
        while off < size:
            chunk = os.pread(fd, min(1 << 20, size - off), off)
            if not chunk:
                break                       # the file shrank meanwhile: what was read is scanned
            chunks.append(chunk)
            off += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    return scan(data, path, crc, last)


def scan(m, path: str, crc: int, last: bool, limit: int | None = None) -> tuple[list[Record], int, Torn | None]:
    """The records in the bytes ``m`` of the WAL file ``path`` (at most ``limit`` of them)."""
    size = len(m)
    records: list[Record] = []
    off = 0

    def bad(detail: str, torn: bool = False):
        if last and torn:
            return records, crc, Torn(path, off, size - off, detail)
        raise CorruptionError(path, off, detail, "etcd itself refuses to start on this WAL; restore the member "
                              "from a backup, or remove it from its cluster and add it back empty")

    while off < size and (limit is None or len(records) < limit):
        if size - off < 8:
            return bad("the file ends inside a record's length word", torn=True)
        (word,) = struct.unpack_from("<Q", m, off)
        if word == 0:
            break                                         # preallocated zeros: the end of this file
        rec_len = word & _LEN_MASK
        pad = (word >> 56) & 0x7 if word >> 63 else 0
        if rec_len >= MAX_RECORD - pad:
            return bad(f"a record length of {rec_len} bytes (etcd refuses records of 10 MiB or more)")
        end = off + 8 + rec_len + pad
        if end > size:
            return bad(f"the file ends inside a record of {rec_len} bytes", torn=True)
        frame = m[off + 8:end]
        try:
            rec = pb.parse("walpb.Record", frame[:rec_len])
        except ValueError as exc:
            return bad(f"a record that does not parse ({exc})", torn=_torn_piece(frame, off + 8))
        if rec.type == CRC:
            if crc != 0 and rec.crc != crc:
                return bad(f"the crc record holds {rec.crc:#010x} but the records before it end with {crc:#010x}")
            new_crc = rec.crc
        else:
            new_crc = crc32c(rec.data, crc)
            if rec.crc != new_crc:
                return bad(f"CRC mismatch in a {TYPE_NAMES.get(rec.type, rec.type)} record: stored "
                           f"{rec.crc:#010x}, computed {new_crc:#010x}", torn=_torn_piece(frame, off + 8))
        crc = new_crc
        records.append(Record(path, off, rec.type, rec.data))
        off = end
    return records, crc, None


def read_snap_file(path: str):
    """A snap file -> (marshalled raftpb.Snapshot, parsed raftpb.Snapshot).  Raises CorruptionError
    naming what fails (etcd then sets the file aside as .broken and tries the next older one)."""
    fd = open_source(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CorruptionError(path, 0, "an empty snap file")
        if size > MAX_SNAP_FILE:
            raise CorruptionError(path, 0, f"a snap file of {size} bytes (more than {MAX_SNAP_FILE} is not read)")
        with os.fdopen(os.dup(fd), "rb") as f:
            blob = f.read(size + 1)
    finally:
        os.close(fd)
    try:
        outer = pb.parse("snappb.snapshot", blob)
    except ValueError as exc:
        raise CorruptionError(path, 0, str(exc)) from None
    if not outer.data or outer.crc == 0:
        raise CorruptionError(path, 0, "an empty snapshot (no data or no CRC)")
    if crc32c(outer.data) != outer.crc:
        raise CorruptionError(path, 0, f"CRC mismatch: stored {outer.crc:#010x}, computed {crc32c(outer.data):#010x}")
    try:
        return outer.data, pb.parse("raftpb.Snapshot", outer.data)
    except ValueError as exc:
        raise CorruptionError(path, 0, str(exc)) from None


# ------------------------------------------------------------------------------------------ writing
def frame(rec_type: int, data: bytes | None, crc: int) -> tuple[bytes, int]:
    """One WAL frame -> (bytes, the rolling CRC after it).  A crc record carries ``crc`` itself."""
    if rec_type != CRC:
        crc = crc32c(data or b"", crc)
    body = pb.marshal("walpb.Record", type=rec_type, crc=crc, data=data)
    pad = (8 - len(body) % 8) % 8
    word = len(body) | ((0x80 | pad) << 56 if pad else 0)
    return struct.pack("<Q", word) + body + b"\0" * pad, crc


def snap_file_bytes(raft_snapshot: bytes) -> bytes:
    """The contents of a .snap file holding a marshalled raftpb.Snapshot."""
    return pb.marshal("snappb.snapshot", crc=crc32c(raft_snapshot), data=raft_snapshot)


def wal_name(seq: int, index: int) -> str:
    return f"{seq:016x}-{index:016x}.wal"


def snap_name(term: int, index: int) -> str:
    return f"{term:016x}-{index:016x}.snap"
