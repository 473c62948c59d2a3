"""One segment file: create, append durable batches, seal with an index, read, recover the tail.

Durability contract:

* A segment is created complete (header, an initial HARDSTATE record and its
  COMMIT, preallocated to its size), fsynced, and its directory fsynced before
  the engine registers it in the manifest.  Only then are batches acknowledged.
* A batch is one ``pwrite`` of its frames followed by a COMMIT frame; the batch
  is durable once the fdatasync that follows returns.  Anything after the last
  valid COMMIT frame was never acknowledged.
* A segment is written by one process lifetime only (fresh salt, fresh key,
  counter nonces from 0), so nonces never repeat.  After an open, a repair or a
  suffix truncation the engine writes into a new segment.
* Sealing writes an INDEX frame (the table of records and term runs), syncs,
  then truncates the unused preallocated space.

Torn tail vs corruption (FORMAT.md, "Recovery").  Let X be the offset of the
first frame of an unsealed segment that is incomplete or fails its CRC, and C
the end of the last valid COMMIT frame before it (everything after C was never
acknowledged).  Then:

1. a CRC-valid COMMIT frame after X that is followed by more written bytes
   proves a later write unit started after X was durable: CorruptionError;
2. otherwise, if the bytes at X are not the head of the frame this segment
   wrote next (none of its nonce, key ID and chain fields match: zeros,
   garbage, stale blocks), the tail is torn;
3. otherwise the frame is ours and damaged: torn when it looks like an
   incomplete write (runs past the end of the file, ends in zero bytes, or
   holds an all-zero run of 32 bytes at its start or at a 512-byte sector
   boundary), else CorruptionError naming file and offset.

Recovery never holds the file whole: the scan and this classification read it a window at a time
(:mod:`walcrypt.bounded`), so a preallocated or sparsely extended file costs no memory.

A torn tail is truncated to C after a ``.broken`` copy of the file is kept.
A CRC-valid frame that fails authentication, sequence, nonce, key or chain
checks is always an :class:`AuthenticationError`.
"""

from __future__ import annotations

import os
import struct
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from crc32c import crc32c

from . import bounded, crypto
from . import format as fmt
from .errors import WIPE_ADVICE, AuthenticationError, CorruptionError, StoreFailedError, UnsupportedFormatError
from .types import HardState
from .vfs import VFS

SECTOR = 512
ZERO_RUN = 32
_READ_AHEAD = 4096
# Sealing a segment that an earlier process lifetime wrote (after recovery) must not reuse the
# nonce of a torn frame that lifetime may have written past the last commit: the INDEX frame's
# sequence number skips ahead by this much, far beyond any count of records one segment can hold.
RECOVERY_SEQ_JUMP = 1 << 32
_COMMIT_LEN = fmt.COMMIT_STRUCT.size + fmt.TAG_SIZE


def segment_file_name(seg_id: int, base_index: int) -> str:
    return f"{seg_id:016x}-{base_index:016x}.wal"


@dataclass
class SegmentIdentity:
    """The fields of a segment header other than magic/version/size/crc."""

    store_id: bytes
    segment_id: int
    base_index: int
    algorithm: int
    key_id: bytes
    salt: bytes
    commitment: bytes


def encode_header(ident: SegmentIdentity) -> bytes:
    body = fmt.SEGMENT_HEADER_STRUCT.pack(
        fmt.SEGMENT_MAGIC, fmt.FORMAT_VERSION, fmt.SEGMENT_HEADER_SIZE, ident.algorithm, 0, 0,
        ident.store_id, ident.segment_id, ident.base_index, ident.key_id, ident.salt, ident.commitment, 0, 0)
    return body[:124] + crc32c(body[:124]).to_bytes(4, "little")


def decode_header(raw: bytes, path: str) -> SegmentIdentity:
    if len(raw) < fmt.SEGMENT_HEADER_SIZE:
        raise CorruptionError(path, 0, f"segment header is truncated ({len(raw)} bytes)",
                              "the file is not a complete walcrypt segment")
    (magic, version, hsize, alg, flags, _r0, store_id, seg_id, base, key_id, salt, commitment,
     _r1, crc) = fmt.SEGMENT_HEADER_STRUCT.unpack_from(raw)
    if magic != fmt.SEGMENT_MAGIC:
        raise CorruptionError(path, 0, "not a walcrypt segment (bad magic)")
    if crc32c(raw[:124]) != crc:
        raise CorruptionError(path, 0, "segment header fails its CRC32C")
    if version != fmt.FORMAT_VERSION or hsize != fmt.SEGMENT_HEADER_SIZE:
        raise UnsupportedFormatError(
            f"{path}: segment format version {version} (header {hsize} bytes) is not supported; upgrade walcrypt")
    if flags or _r0 or _r1:
        raise CorruptionError(path, 13, "segment header has reserved bits set")
    fmt.check_algorithm(alg, path=path, offset=12)
    return SegmentIdentity(store_id, seg_id, base, alg, key_id, salt, commitment)


_ONE_ENTRY_HEAD = struct.Struct("<IIQI")     # the whole table of a one-entry ENTRIES payload


def encode_entries(terms, lengths, datas) -> bytes:
    """The ENTRIES payload (FORMAT.md 4.4): count, reserved, terms, lengths, data."""
    n = len(terms)
    if n == 1:                                  # the common Raft case, one pack
        return _ONE_ENTRY_HEAD.pack(1, 0, terms[0], lengths[0]) + datas[0]
    return b"".join((fmt.ENTRIES_PREFIX_STRUCT.pack(n, 0), struct.pack(f"<{n}Q", *terms),
                     struct.pack(f"<{n}I", *lengths), *datas))


def encode_entries_payload(entries, start: int, stop: int) -> bytes:
    """The ENTRIES payload of ``entries[start:stop]`` (Entry-like (index, term, data) tuples)."""
    chunk = entries[start:stop]
    return encode_entries([e[1] for e in chunk], [len(e[2]) for e in chunk], [e[2] for e in chunk])


class EntriesRecord:
    """The decrypted payload of one ENTRIES record; entry data is sliced out only when asked for."""

    __slots__ = ("first", "terms", "ends", "payload")

    def __init__(self, first: int, terms: array, ends: array, payload: bytes):
        self.first = first
        self.terms = terms
        self.ends = ends        # ends[k] .. ends[k + 1] is entry k's data in payload
        self.payload = payload

    def __len__(self) -> int:
        return len(self.terms)

    def data(self, k: int) -> bytes:
        return self.payload[self.ends[k]:self.ends[k + 1]]

    def datas(self) -> list[bytes]:
        p, e = self.payload, self.ends
        return [p[e[k]:e[k + 1]] for k in range(len(self.terms))]

    def size(self, k: int) -> int:
        return self.ends[k + 1] - self.ends[k]


def decode_entries_payload(payload: bytes, first_index: int, count: int, *, path: str,
                           offset: int) -> EntriesRecord:
    """Check and index an ENTRIES payload.  Lengths are checked before anything is sliced."""
    n = len(payload)
    if n < 8:
        raise CorruptionError(path, offset, "entries record payload is truncated")
    pcount, _ = fmt.ENTRIES_PREFIX_STRUCT.unpack_from(payload)
    table_end = 8 + 12 * pcount
    if pcount != count or pcount == 0 or table_end > n:
        raise CorruptionError(path, offset, f"entries record table is inconsistent (count {pcount})")
    terms = array("Q")
    terms.frombytes(payload[8:8 + 8 * pcount])
    lengths = array("I")
    lengths.frombytes(payload[8 + 8 * pcount:table_end])
    ends = array("Q", accumulate(lengths, initial=table_end))
    if ends[-1] != n:
        raise CorruptionError(path, offset, "entries record lengths do not add up to its payload")
    return EntriesRecord(first_index, terms, ends, payload)


class Segment:
    """The in-memory index of one segment file plus, while active, its writer state.

    Index: ``rec_offset``/``rec_index``/``rec_count`` describe the ENTRIES records
    (20 bytes per record; no object per entry).  Terms live in the WAL's term runs.
    """

    def __init__(self, vfs: VFS, path: str, ident: SegmentIdentity, cipher: crypto.FrameCipher):
        self.vfs = vfs
        self.path = path
        self.ident = ident
        self.seg_id = ident.segment_id
        self.base_index = ident.base_index
        self.cipher = cipher
        self.rec_offset = array("Q")
        self.rec_index = array("Q")
        self.rec_count = array("I")
        self.last_index = ident.base_index - 1
        self.hardstate: HardState | None = None
        self.hardstate_offset = 0
        self.runs: list[tuple[int, int]] = []     # (first index, term) runs seen in this segment
        self.snapshot_records: list[tuple] = []   # SNAPSHOT records seen while scanning
        self.sealed = False
        self.fd: int | None = None
        # writer state
        self.write_offset = fmt.SEGMENT_HEADER_SIZE
        self.seq = 0
        self.chain = crypto.ZERO_CHAIN
        self.records_written = 0
        self.bytes_written = 0
        self.units_scanned = 0                    # committed write units seen by scan()
        # Set by a reader of a store whose writer is running (walcrypt.online): bytes after the last
        # commit that are not followed by a later committed unit may be a write in progress, so they
        # are a tail, never "damage that does not look like an incomplete write" (rule 3).
        self.tail_may_be_mid_write = False
        self.writable = False
        self.end_offset = 0

    # ------------------------------------------------------------------ create
    @classmethod
    def create(cls, vfs: VFS, directory: str, ident: SegmentIdentity, cipher: crypto.FrameCipher,
               size: int, hardstate: HardState, records=()) -> "Segment":
        """A new segment file, durable on return: header, then one write unit holding the hard
        state and ``records`` (a suffix replacement's entries travel in the segment that replaces
        the suffix, so the replacement is atomic)."""
        path = os.path.join(directory, segment_file_name(ident.segment_id, ident.base_index))
        seg = cls(vfs, path, ident, cipher)
        fd = vfs.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        seg.fd = fd
        seg.writable = True
        try:
            vfs.preallocate(fd, max(size, fmt.SEGMENT_HEADER_SIZE + 4096))
            buf, pending = seg.encode_batch([(fmt.FRAME_HARDSTATE, 0, hardstate.term, 0,
                                              fmt.HARDSTATE_STRUCT.pack(*hardstate), None), *records])
            vfs.pwrite(fd, encode_header(ident), 0)
            vfs.pwrite(fd, buf, seg.write_offset)
            vfs.fdatasync(fd)
            seg.apply_batch(buf, pending)
            vfs.fsync_dir(directory)
        except BaseException:
            vfs.close(fd)
            seg.fd = None
            raise
        return seg

    # ------------------------------------------------------------------ write
    def encode_batch(self, records):
        """Frames for ``records`` plus the COMMIT frame.  State is not changed (see apply_batch).

        records: list of (type, index, term, count, payload, entry terms or None).
        """
        seq = self.seq
        chain = self.chain
        offset = self.write_offset
        parts = []
        placed = []
        seal = self.cipher.seal
        for ftype, index, term, count, payload, terms in records:
            frame, chain = seal(ftype, seq, index, term, count, payload, chain)
            parts.append(frame)
            placed.append((ftype, offset, index, count, terms, payload))
            offset += len(frame)
            seq += 1
        last_entries = [r for r in records if r[0] == fmt.FRAME_ENTRIES]
        last_index = last_entries[-1][1] + last_entries[-1][3] - 1 if last_entries else self.last_index
        frame, chain = seal(fmt.FRAME_COMMIT, seq, last_index, records[-1][2], len(records),
                            fmt.COMMIT_STRUCT.pack(len(records), 0), chain)
        parts.append(frame)
        seq += 1
        buf = b"".join(parts)
        return buf, (placed, seq, chain, sum(len(r[4]) for r in records))

    def apply_batch(self, buf: bytes, pending) -> list:
        """Record a batch that was written (and synced as the policy requires) in the index.

        Returns the term runs (first index, term) that the batch started."""
        placed, seq, chain, nbytes = pending
        new_runs: list = []
        for ftype, offset, index, count, terms, payload in placed:
            if ftype == fmt.FRAME_ENTRIES:
                new_runs += self._index_entries(offset, index, count, terms)
            elif ftype == fmt.FRAME_HARDSTATE:
                self.hardstate = HardState(*fmt.HARDSTATE_STRUCT.unpack(payload))
                self.hardstate_offset = offset
        self.write_offset += len(buf)
        self.seq = seq
        self.chain = chain
        self.records_written += len(placed) + 1
        self.bytes_written += nbytes
        self.writable = True                     # the writer state accounts for every frame written
        return new_runs

    def _index_entries(self, offset: int, index: int, count: int, terms) -> list:
        """Index one ENTRIES record; returns the term runs it starts."""
        if index <= self.last_index:  # records of a segment never overlap
            raise CorruptionError(self.path, offset, f"entries record at index {index} overlaps earlier records")
        self.rec_offset.append(offset)
        self.rec_index.append(index)
        self.rec_count.append(count)
        self.last_index = index + count - 1
        runs = self.runs
        start = len(runs)
        if terms[0] == terms[-1]:   # the common case: one term (Raft terms never decrease)
            if not runs or runs[-1][1] != terms[0]:
                runs.append((index, terms[0]))
        else:
            for k, t in enumerate(terms):
                if not runs or runs[-1][1] != t:
                    runs.append((index + k, t))
        return runs[start:]

    def write(self, buf: bytes) -> int:
        """pwrite one encoded batch at the write offset; returns the offset written.

        The segment stays unwritable until ``apply_batch`` records the batch: if anything interrupts
        the unit in between (a failed write or sync, KeyboardInterrupt, MemoryError), its frames
        may be on disk under sequence numbers the writer state does not account for, so nothing
        may ever be written into this segment again (that would reuse their nonces)."""
        if not self.writable:
            raise StoreFailedError(f"{self.path} is not writable (sealed, or its last write is in doubt); "
                                   "reopen the store to recover")
        off = self.write_offset
        self.writable = False
        self.vfs.pwrite(self.fd, buf, off)
        return off

    def sync(self) -> None:
        self.vfs.fdatasync(self.fd)

    # ------------------------------------------------------------------ seal
    def encode_index(self) -> bytes:
        n = len(self.rec_offset)
        parts = [fmt.INDEX_PREFIX_STRUCT.pack(n, len(self.runs), self.write_offset, self.hardstate_offset)]
        rec = fmt.INDEX_RECORD_STRUCT.pack
        parts.extend(rec(self.rec_offset[k], self.rec_index[k], self.rec_count[k], 0) for k in range(n))
        run = fmt.TERM_RUN_STRUCT.pack
        parts.extend(run(i, t) for i, t in self.runs)
        return b"".join(parts)

    def seal(self, *, recovered: bool = False) -> None:
        """Write the INDEX frame, sync, truncate the preallocated tail, sync.  Manifest update is the caller's.

        ``recovered``: this process did not write the segment (see RECOVERY_SEQ_JUMP).  Otherwise the
        segment must be writable (its last unit complete): an INDEX frame after a unit in doubt would
        reuse that unit's nonces.  Sealing makes it unwritable first, so an interrupted seal is never
        followed by another frame in this lifetime."""
        if recovered:
            self.seq += RECOVERY_SEQ_JUMP
        elif not self.writable:
            raise StoreFailedError(f"refusing to seal {self.path}: its last write is in doubt or it is sealed; "
                                   "reopen the store to recover")
        self.writable = False
        frame, _tag = self.cipher.seal(fmt.FRAME_INDEX, self.seq, self.last_index, 0, len(self.rec_offset),
                                       self.encode_index(), self.chain)
        self.index_offset = self.write_offset
        self.vfs.pwrite(self.fd, frame, self.write_offset)
        end = self.write_offset + len(frame)
        self.vfs.fdatasync(self.fd)
        self.vfs.ftruncate(self.fd, end)
        self.vfs.fsync(self.fd)
        self.end_offset = end
        self.sealed = True
        self.writable = False

    # ------------------------------------------------------------------ read
    def ensure_open(self) -> int:
        if self.fd is None:
            try:
                self.fd = self.vfs.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                raise CorruptionError(self.path, None, "segment file is missing",
                                      "a segment listed in the manifest was deleted; restore from a snapshot") from None
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, None             # never closed twice, even if close() is interrupted
        if fd is not None:
            self.vfs.close(fd)

    def read_frame(self, offset: int, expect_type: int, size_hint: int = 0):
        """Read, check and open the frame at ``offset`` (one read when ``size_hint`` covers it).
        Returns (header tuple, plaintext)."""
        fd = self.ensure_open()
        raw = self.vfs.pread(fd, max(size_hint, fmt.FRAME_HEADER_SIZE + _READ_AHEAD), offset)
        if len(raw) < fmt.FRAME_HEADER_SIZE:
            raise CorruptionError(self.path, offset, "frame header is cut off by the end of the file")
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(raw)
        length = h[4]
        if length < fmt.TAG_SIZE or length > fmt.MAX_RECORD_PAYLOAD:
            raise CorruptionError(self.path, offset, f"frame length {length} is out of bounds")
        need = fmt.FRAME_HEADER_SIZE + length
        if len(raw) < need:
            if offset + need > self.vfs.fstat_size(fd):      # check before allocating the declared length
                raise CorruptionError(self.path, offset, f"frame length {length} runs past the end of the file")
            raw += self.vfs.pread(fd, need - len(raw), offset + len(raw))
            if len(raw) < need:
                raise CorruptionError(self.path, offset, "frame is cut off by the end of the file")
        header = raw[:fmt.FRAME_HEADER_SIZE]
        ct = memoryview(raw)[fmt.FRAME_HEADER_SIZE:need]
        if crypto.frame_crc(header, ct) != h[9]:
            raise CorruptionError(self.path, offset, "frame fails its CRC32C")
        if (h[0] != expect_type or h[1] != self.ident.algorithm or h[2] or h[3] or h[11]
                or h[12] != self.ident.key_id or h[10] != crypto.nonce_for(h[5])):
            self._check_frame_fields(h, offset, expect_type=expect_type)   # raises, naming what is wrong
        return h, self.cipher.open(header, ct, path=self.path, offset=offset)

    def _check_frame_fields(self, h, offset: int, *, expect_type: int | None = None, seq: int | None = None,
                            chain: bytes | None = None) -> None:
        ftype, alg, flags, r0, length, fseq, _index, _term, _count, _crc, nonce, r1, key_id, prev = h
        problems = []
        if expect_type is not None and ftype != expect_type:
            problems.append(f"type {ftype} where {fmt.FRAME_TYPES.get(expect_type)} was expected")
        if alg != self.ident.algorithm:
            problems.append(f"algorithm {alg} differs from the segment's {self.ident.algorithm}")
        if key_id != self.ident.key_id:
            problems.append("key ID differs from the segment's")
        if flags or r0 or r1:
            problems.append("reserved bits are set")
        if nonce != crypto.nonce_for(fseq):
            problems.append("nonce does not follow the counter schedule")
        if seq is not None and fseq != seq:
            problems.append(f"sequence {fseq} where {seq} was expected (records reordered, duplicated or deleted)")
        if chain is not None and prev != chain:
            problems.append("chain value does not match the previous record (records reordered or removed)")
        if problems:
            raise AuthenticationError(self.path, offset, "record " + "; ".join(problems),
                                      "do not trust this segment; restore the node from a snapshot")

    def locate(self, index: int) -> int:
        """Record number holding ``index`` (caller guarantees base <= index <= last)."""
        return bisect_right(self.rec_index, index) - 1

    def read_entries_record(self, r: int):
        """ENTRIES record number r, fully checked."""
        offset = self.rec_offset[r]
        # The next record's offset bounds this frame (commit frames may sit between them).
        hint = self.rec_offset[r + 1] - offset if r + 1 < len(self.rec_offset) else 0
        h, payload = self.read_frame(offset, fmt.FRAME_ENTRIES, min(hint, 8 << 20))
        if h[6] != self.rec_index[r] or h[8] != self.rec_count[r]:
            raise AuthenticationError(self.path, offset,
                                      f"record holds index {h[6]} x{h[8]} where the index expects "
                                      f"{self.rec_index[r]} x{self.rec_count[r]} (records swapped or moved)")
        return decode_entries_payload(payload, h[6], h[8], path=self.path, offset=offset)

    # ------------------------------------------------------------------ open
    def check_identity(self, found: SegmentIdentity, expected_commitment: bytes) -> None:
        exp = self.ident
        if found.store_id != exp.store_id:
            raise AuthenticationError(self.path, 0, "segment belongs to another store",
                                      "a segment file was copied in from elsewhere; remove it")
        if found.segment_id != exp.segment_id or found.base_index != exp.base_index:
            raise AuthenticationError(self.path, 0,
                                      f"segment header says segment {found.segment_id} at index {found.base_index}, "
                                      f"the manifest says {exp.segment_id} at {exp.base_index} (renamed or replaced)")
        if found.key_id != exp.key_id or found.algorithm != exp.algorithm:
            raise AuthenticationError(self.path, 0, "segment header key ID or algorithm differs from the manifest")
        if not crypto.constant_time_equal(found.commitment, expected_commitment):
            raise AuthenticationError(self.path, 0,
                                      "segment key commitment does not match its data key (tampered header or "
                                      "a segment from another store)")

    def load_sealed(self, index_offset: int, end_offset: int) -> None:
        """Build the index from the INDEX frame of a sealed segment (no scan)."""
        fd = self.ensure_open()
        size = self.vfs.fstat_size(fd)
        if size != end_offset:
            raise CorruptionError(self.path, min(size, end_offset),
                                  f"sealed segment is {size} bytes, the manifest says {end_offset} "
                                  "(truncated or extended)")
        h, payload = self.read_frame(index_offset, fmt.FRAME_INDEX)
        if len(payload) < fmt.INDEX_PREFIX_STRUCT.size:
            raise CorruptionError(self.path, index_offset, "index frame payload is truncated")
        nrec, nruns, end, hs_off = fmt.INDEX_PREFIX_STRUCT.unpack_from(payload)
        pos = fmt.INDEX_PREFIX_STRUCT.size
        if end != index_offset or pos + nrec * fmt.INDEX_RECORD_STRUCT.size + nruns * 16 != len(payload):
            raise CorruptionError(self.path, index_offset, "index frame table is inconsistent")
        for _k in range(nrec):
            off, idx, cnt, _ = fmt.INDEX_RECORD_STRUCT.unpack_from(payload, pos)
            pos += fmt.INDEX_RECORD_STRUCT.size
            self.rec_offset.append(off)
            self.rec_index.append(idx)
            self.rec_count.append(cnt)
        for _k in range(nruns):
            self.runs.append(fmt.TERM_RUN_STRUCT.unpack_from(payload, pos))
            pos += 16
        if nrec:
            self.last_index = self.rec_index[-1] + self.rec_count[-1] - 1
        if self.last_index != h[6]:
            raise CorruptionError(self.path, index_offset, "index frame's last index disagrees with its table")
        self.hardstate_offset = hs_off
        if hs_off:
            _h, hs_payload = self.read_frame(hs_off, fmt.FRAME_HARDSTATE)
            self.hardstate = HardState(*fmt.HARDSTATE_STRUCT.unpack(hs_payload))
        self.sealed = True
        self.end_offset = end_offset
        self.index_offset = index_offset

    def scan(self, data, *, on_entries=None, window: int = bounded.WINDOW):
        """Scan every frame of a segment, building the index.

        ``data`` is the whole file (bytes) or a :class:`walcrypt.bounded.Source` over it; a source
        is read in windows of ``window`` bytes, so memory stays bounded whatever the file size
        (FORMAT.md 11.3): a window, plus one frame when a frame is larger, plus the plaintexts of
        the write unit being scanned.  A frame larger than the window is read whole only once its
        CRC, computed window by window, matches.

        Returns (committed_end, torn) where torn is None for a clean end or a
        (offset, detail) pair for a torn tail after committed_end.  Raises for
        corruption.  ``on_entries(record)`` sees every committed
        entries record (used by verify and replay).
        """
        src = data if isinstance(data, bounded.Source) else bounded.BytesSource(data)
        window = max(window, fmt.FRAME_HEADER_SIZE)
        path = self.path
        size = src.size
        off = fmt.SEGMENT_HEADER_SIZE
        seq = 0
        chain = crypto.ZERO_CHAIN
        pending = []
        committed_end = off
        hsize = fmt.FRAME_HEADER_SIZE
        unpack = fmt.FRAME_HEADER_STRUCT.unpack_from
        buf = view = b""            # bytes [base, base + len(buf)) of the file
        base = 0
        while True:
            if off + hsize > size:
                return self._classify(src, committed_end, off, size, "frame header cut off by the end of the file",
                                      seq, chain, window)
            rel = off - base
            if rel < 0 or rel + hsize > len(buf):
                buf, base, rel = src.read(off, window), off, 0
                view = memoryview(buf)
                if len(buf) < hsize:
                    raise _changed(path, off)
            h = unpack(buf, rel)
            ftype, length = h[0], h[4]
            if ftype == fmt.FRAME_UNWRITTEN:
                return self._classify(src, committed_end, off, off + hsize, "unwritten space", seq, chain, window)
            end = off + hsize + length
            if ftype in fmt.FRAME_TYPES and length >= fmt.TAG_SIZE and end > size:
                # A length pointing past the end of the file is a torn write (etcd #14114), whatever its size.
                return self._classify(src, committed_end, off, end, "frame runs past the end of the file", seq, chain,
                                      window)
            if ftype not in fmt.FRAME_TYPES or length < fmt.TAG_SIZE or length > fmt.MAX_RECORD_PAYLOAD:
                return self._classify(src, committed_end, off, off + hsize, "malformed frame header", seq, chain,
                                      window)
            if rel + hsize + length > len(buf):
                if hsize + length > window:
                    # Bounded before it is allocated: the CRC decides whether this frame is read whole.
                    head = buf[rel:rel + hsize]
                    crc = crc32c(head[fmt.FRAME_CRC_OFFSET + 4:], crc32c(head[:fmt.FRAME_CRC_OFFSET]))
                    if bounded.crc_range(src, off + hsize, end, crc, window) != h[9]:
                        return self._classify(src, committed_end, off, end, "frame fails its CRC32C", seq, chain,
                                              window)
                buf, base, rel = src.read(off, max(hsize + length, window)), off, 0
                view = memoryview(buf)
                if len(buf) < hsize + length:
                    raise _changed(path, off)
            header = buf[rel:rel + hsize]
            ct = view[rel + hsize:rel + hsize + length]
            if crypto.frame_crc(header, ct) != h[9]:
                return self._classify(src, committed_end, off, end, "frame fails its CRC32C", seq, chain, window)
            # From here on the frame is intact: any failure is tampering or foreign data.
            if ftype == fmt.FRAME_INDEX and seq < h[5] < seq + RECOVERY_SEQ_JUMP + 1:
                seq = h[5]      # an index written by recovery skips ahead (see Segment.seal)
            self._check_frame_fields(h, off, seq=seq, chain=chain)
            plain = self.cipher.open(header, ct, path=path, offset=off)
            chain = bytes(ct[-fmt.TAG_SIZE:])
            seq += 1
            next_off = fmt.align_up(end)
            if ftype == fmt.FRAME_COMMIT:
                if len(plain) != fmt.COMMIT_STRUCT.size or fmt.COMMIT_STRUCT.unpack(plain)[0] != len(pending):
                    raise AuthenticationError(path, off, "commit frame does not close the records before it")
                for p in pending:
                    self._apply_scanned(p, on_entries)
                pending = []
                committed_end = next_off
                self.units_scanned += 1
                self.write_offset = next_off
                self.seq = seq
                self.chain = chain
            elif ftype == fmt.FRAME_INDEX:
                if pending:
                    raise AuthenticationError(path, off, "index frame follows uncommitted records")
                self.index_offset = off
                self.end_offset = next_off
                self.sealed = True
                if not bounded.all_zero(src, next_off, size, window):
                    raise CorruptionError(path, next_off, "bytes follow the index frame of a sealed segment")
                return committed_end, None
            else:
                pending.append((ftype, off, h, plain))
            off = next_off

    def _apply_scanned(self, p, on_entries) -> None:
        ftype, off, h, plain = p
        if ftype == fmt.FRAME_ENTRIES:
            rec = decode_entries_payload(plain, h[6], h[8], path=self.path, offset=off)
            if h[6] != self.last_index + 1:
                raise AuthenticationError(self.path, off,
                                          f"entries record starts at index {h[6]}, expected {self.last_index + 1}")
            self._index_entries(off, h[6], h[8], rec.terms)
            if on_entries is not None:
                on_entries(rec)
        elif ftype == fmt.FRAME_HARDSTATE:
            if len(plain) != fmt.HARDSTATE_STRUCT.size:
                raise CorruptionError(self.path, off, "hard state record has a bad size")
            self.hardstate = HardState(*fmt.HARDSTATE_STRUCT.unpack(plain))
            self.hardstate_offset = off
        elif ftype == fmt.FRAME_SNAPSHOT:
            if len(plain) != fmt.SNAPSHOT_RECORD_STRUCT.size:
                raise CorruptionError(self.path, off, "snapshot record has a bad size")
            self.snapshot_records.append(fmt.SNAPSHOT_RECORD_STRUCT.unpack(plain))
        else:
            raise AuthenticationError(self.path, off, f"unexpected frame type {ftype} inside a batch")

    def _classify(self, src: bounded.Source, committed_end: int, bad: int, extent_end: int, detail: str,
                  seq: int, chain: bytes, window: int = bounded.WINDOW):
        """Decide torn tail vs corruption for the first failing frame at ``bad`` (see module doc and
        FORMAT.md 11.4).  Reads the file in windows: nothing here holds more than a window."""
        size = src.size
        # Rule 0: one past the last nonzero byte of the file is at most committed_end.
        if bounded.all_zero(src, committed_end, size, window):
            return committed_end, None                # clean end: nothing but preallocated zeros
        # Rule 1: a CRC-valid COMMIT frame after ``bad`` that closes a write unit starting after the
        # sequence number ``bad`` should have had proves that ``bad`` lay in an earlier, durable unit.
        pattern = bytes([fmt.FRAME_COMMIT, self.ident.algorithm, 0, 0]) + _COMMIT_LEN.to_bytes(4, "little")
        hsize = fmt.FRAME_HEADER_SIZE
        for pos in bounded.find_aligned(src, pattern, bad + 1, size, fmt.ALIGN, window):
            if pos + hsize + _COMMIT_LEN > size:
                break                                  # later matches end even further out
            frame = src.read(pos, hsize + _COMMIT_LEN)
            if len(frame) < hsize + _COMMIT_LEN:
                break
            header = frame[:hsize]
            h = fmt.FRAME_HEADER_STRUCT.unpack_from(header)
            if crypto.frame_crc(header, frame[hsize:]) == h[9] and h[5] - h[8] > seq:
                raise CorruptionError(self.path, bad, f"{detail}, but a later write unit was committed after it",
                                      "mid-log corruption is not repaired automatically; restore the node "
                                      "from a snapshot or " + WIPE_ADVICE)
        if not self.tail_may_be_mid_write and self._is_our_frame(src, bad, seq, chain) \
                and not _looks_incomplete(src, bad, extent_end, window):
            raise CorruptionError(self.path, bad, f"{detail} in the last batch, and the damage does not look like "
                                  "an incomplete write", "run 'walcrypt verify'; restore from a snapshot if needed")
        return committed_end, (bad, detail)

    def _is_our_frame(self, src: bounded.Source, off: int, seq: int, chain: bytes) -> bool:
        """Whether the bytes at ``off`` are the head of the frame this segment wrote next: at least one
        of its nonce, key ID and chain value fields holds exactly the expected bytes.  One damaged
        field cannot hide the other two; zeros, garbage and stale blocks match none."""
        h = src.read(off, fmt.FRAME_HEADER_SIZE)
        if len(h) < fmt.FRAME_HEADER_SIZE:
            return False
        return (h[40:52] == crypto.nonce_for(seq) or h[56:72] == self.ident.key_id
                or h[72:88] == chain)


def _changed(path: str, offset: int) -> CorruptionError:
    return CorruptionError(path, offset, "the file became shorter while it was being read",
                           "another process is modifying the store; stop it and try again")


def _looks_incomplete(src: bounded.Source, lo: int, hi: int, window: int = bounded.WINDOW) -> bool:
    """A frame at ``lo`` with extent [lo, hi) looks like an incomplete write: it runs past the end of
    the file, it ends in zero bytes (a prefix reached the disk), its bytes up to the first sector
    boundary are all zero, or it holds an all-zero run of ZERO_RUN bytes starting at ``lo`` or at a
    sector boundary (a sector that never reached the disk).  Reads [lo, hi) a window at a time."""
    if hi > src.size:
        return True
    if hi > lo and src.read(hi - 1, 1) == b"\x00":
        return True
    first_boundary = (lo // SECTOR + 1) * SECTOR
    if bounded.all_zero(src, lo, min(hi, first_boundary), window):
        return True          # the part of the frame in its first sector never reached the disk
    need = min(ZERO_RUN, hi - lo)
    a = lo
    while a < hi:
        w_end = min(hi, a + window)
        block = src.read(a, min(hi, w_end + ZERO_RUN) - a)
        starts = ([a] if a == lo else []) + list(range(max(first_boundary, -(-a // SECTOR) * SECTOR), w_end, SECTOR))
        for s in starts:
            e = min(hi, s + ZERO_RUN)
            if e - s >= need and block.count(0, s - a, e - a) == e - s:
                return True
        a = w_end
    return False
