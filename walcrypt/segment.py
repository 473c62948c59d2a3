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
   incomplete write (runs past the end of the file, its last byte and the 31
   after it are zero with a CRC that the zero end can complete, or it holds
   an all-zero run of 32 bytes at its start or at a 512-byte sector
   boundary), else CorruptionError naming file and offset.

Recovery never holds the file whole: the scan and this classification read it a window at a time
(:mod:`walcrypt.bounded`), so a preallocated or sparsely extended file costs no memory.

A torn tail is truncated to C after a ``.broken`` copy of the file is kept.
A CRC-valid frame that fails authentication, sequence, nonce, key or chain
checks is always an :class:`AuthenticationError`.
"""

from __future__ import annotations

import os
import sys
import threading
from array import array
from bisect import bisect_right
from itertools import chain
from typing import Callable, Iterator

from . import crypto
from . import format as fmt
from .errors import AuthenticationError, CorruptionError, StoreFailedError, UsageError
from .segment_codec import RECOVERY_SEQ_JUMP, SegmentIdentity, decode_entries_payload, encode_header, segment_file_name
from .segment_scan import SegmentScan
from .types import EntryBatch, HardState
from .vfs import VFS


class SegmentReleased(UsageError):
    """A read reached a segment the WAL released (purged by compaction, or the store closed) after
    the read had located it.  Internal: the WAL's readers raise CompactedError or UsageError
    ("the store is closed") instead."""

    def __init__(self, path: str):
        super().__init__(f"{path} was released while it was being read (compaction removed it, or the store "
                         "was closed)")


_READ_AHEAD = 4096
# A bulk read's pread (read_entries_records): every record in 1 MiB at once.  Larger reads measured
# slower (each buffer is fresh memory to fault in, and no longer stays in the CPU's caches until its
# records are opened).
READ_WINDOW = 1 << 20
_FD_HANDOVER = threading.Lock()     # a segment's descriptor: opening, pinning, taking it to close it


class Segment(SegmentScan):
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
        self.released = False                   # see release()
        self.readers = 0                        # reads holding the descriptor (pin / unpin)
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
        parts: list = []
        placed = []
        seal = self.cipher.seal_parts
        for ftype, index, term, count, payload, terms in records:
            pieces, chain = seal(ftype, seq, index, term, count, payload, chain)
            parts += pieces
            placed.append((ftype, offset, index, count, terms, payload))
            offset += sum(map(len, pieces))
            seq += 1
        last_index = self.last_index
        for r in reversed(records):
            if r[0] == fmt.FRAME_ENTRIES:
                last_index = r[1] + r[3] - 1
                break
        pieces, chain = seal(fmt.FRAME_COMMIT, seq, last_index, records[-1][2], len(records),
                             fmt.COMMIT_STRUCT.pack(len(records), 0), chain)
        parts += pieces
        seq += 1
        buf = b"".join(parts)
        return buf, (placed, seq, chain, sum([len(r[4]) for r in records]))

    def apply_batch(self, buf: bytes, pending) -> list:
        """Record a batch that was written (and synced as the policy requires) in the index.

        Returns the term runs (first index, term) that the batch started."""
        placed, seq, chain, nbytes = pending
        first_new_run = len(self.runs)
        for ftype, offset, index, count, terms, payload in placed:
            if ftype == fmt.FRAME_ENTRIES:
                self._index_entries(offset, index, count, terms)
            elif ftype == fmt.FRAME_HARDSTATE:
                self.hardstate = HardState(*fmt.HARDSTATE_STRUCT.unpack(payload))
                self.hardstate_offset = offset
        self.write_offset += len(buf)
        self.seq = seq
        self.chain = chain
        self.records_written += len(placed) + 1
        self.bytes_written += nbytes
        self.writable = True                     # the writer state accounts for every frame written
        return self.runs[first_new_run:]

    def _index_entries(self, offset: int, index: int, count: int, terms) -> None:
        """Index one ENTRIES record (and the term runs it starts)."""
        if index <= self.last_index:  # records of a segment never overlap
            raise CorruptionError(self.path, offset, f"entries record at index {index} overlaps earlier records")
        self.rec_offset.append(offset)
        self.rec_index.append(index)
        self.rec_count.append(count)
        self.last_index = index + count - 1
        runs = self.runs
        if terms[0] == terms[-1]:   # the common case: one term (Raft terms never decrease)
            if not runs or runs[-1][1] != terms[0]:
                runs.append((index, terms[0]))
        else:
            for k, t in enumerate(terms):
                if not runs or runs[-1][1] != t:
                    runs.append((index + k, t))

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
        assert self.fd is not None          # a writable segment holds its file open (create, apply_batch)
        self.vfs.pwrite(self.fd, buf, off)
        return off

    def sync(self) -> None:
        assert self.fd is not None          # synced after a write, through the descriptor it was written with
        self.vfs.fdatasync(self.fd)

    # ------------------------------------------------------------------ seal
    def encode_index(self) -> bytes:
        n = len(self.rec_offset)
        # The record table built as columns, in C: (offset u64, index u64, count u32, reserved u32 = 0)
        # per record is three u64 per record, the count in the low half of the third.
        cols = array("Q", bytes(8)) * (3 * n)
        cols[0::3] = self.rec_offset
        cols[1::3] = self.rec_index
        cols[2::3] = array("Q", self.rec_count)
        runs = array("Q", chain.from_iterable(self.runs))
        if sys.byteorder != "little":
            cols.byteswap()
            runs.byteswap()
        return b"".join((fmt.INDEX_PREFIX_STRUCT.pack(n, len(self.runs), self.write_offset, self.hardstate_offset),
                         cols.tobytes(), runs.tobytes()))

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
        assert self.fd is not None          # its writer, or recovery (_seal_recovered), holds it open read-write
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
        """The segment's descriptor, opened when needed (at open, by the one thread using it)."""
        fd = self.fd
        if fd is not None:
            return fd
        with _FD_HANDOVER:              # two threads opening it at once: one descriptor, none leaked
            return self._descriptor()

    def _descriptor(self) -> int:
        """The segment's descriptor, opened if it is not; SegmentReleased once released.  Caller
        holds _FD_HANDOVER."""
        if self.released:
            raise SegmentReleased(self.path)
        if self.fd is None:
            self.fd = self._open_for_read()
        return self.fd

    # Concurrency contract of the reads of a live store: a read pins the descriptor for as long as it
    # reads through it.  A release (compaction purged the segment, or the store closed) meanwhile does
    # not close the descriptor under it - the last reader does - so a read never uses a number that
    # was closed, or given to another file since; a read that starts after the release gets
    # SegmentReleased (the WAL's readers turn it into CompactedError or "the store is closed").
    # ``held`` is the reader's own one-item list: the count and it change in one statement, so an
    # interruption (KeyboardInterrupt) never leaves a pin the reader does not know to take back.
    def pin(self, held: list) -> int:
        with _FD_HANDOVER:
            fd = self._descriptor()
            self.readers, held[0] = self.readers + 1, True
            return fd

    def unpin(self, held: list) -> None:
        with _FD_HANDOVER:
            if not held[0]:
                return
            self.readers, held[0] = self.readers - 1, False
            if self.readers or not self.released:
                return
            fd, self.fd = self.fd, None
        if fd is not None:
            self.vfs.close(fd)

    def _open_for_read(self) -> int:
        try:
            return self.vfs.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptionError(self.path, None, "segment file is missing",
                                  "a segment listed in the manifest was deleted; restore from a snapshot") from None

    def close(self) -> None:
        # Taken before it is closed (an interrupted close never closes it twice) and under a lock (two
        # threads closing the same segment at once do not both take it).
        with _FD_HANDOVER:
            fd, self.fd = self.fd, None
        if fd is not None:
            self.vfs.close(fd)

    def release(self) -> None:
        """Close for good: the WAL no longer holds this segment (the store closed, or it was purged).
        A later read raises SegmentReleased instead of opening the file again; a read in progress
        keeps the descriptor until it ends (see pin)."""
        with _FD_HANDOVER:
            self.released = True
            if self.readers:
                return
            fd, self.fd = self.fd, None
        if fd is not None:
            self.vfs.close(fd)

    def read_frame(self, offset: int, expect_type: int, size_hint: int = 0) -> tuple[tuple, bytes]:
        """Read, check and open the frame at ``offset`` (one read when ``size_hint`` covers it).
        Returns (header tuple, plaintext)."""
        held = [False]
        try:
            fd = self.pin(held)
            raw = self.vfs.pread(fd, max(size_hint, fmt.FRAME_HEADER_SIZE + _READ_AHEAD), offset)
            h = self._frame_head(raw, 0, offset)
            need = fmt.FRAME_HEADER_SIZE + h[4]
            if len(raw) < need:
                self._check_frame_fits(fd, offset, h[4])     # before allocating the declared length
                raw += self.vfs.pread(fd, need - len(raw), offset + len(raw))
                if len(raw) < need:
                    raise CorruptionError(self.path, offset, "frame is cut off by the end of the file")
        finally:
            self.unpin(held)
        return h, self._open_frame(h, raw, memoryview(raw), 0, offset, expect_type)

    # The steps of reading one frame, shared by read_frame and read_entries_records (which reads many
    # frames per pread): the same checks, whoever reads.
    def _frame_head(self, raw: bytes, rel: int, offset: int) -> tuple:
        """The header of the frame at ``raw[rel:]`` (file offset ``offset``), its length bounded."""
        if len(raw) - rel < fmt.FRAME_HEADER_SIZE:
            raise CorruptionError(self.path, offset, "frame header is cut off by the end of the file")
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(raw, rel)
        length = h[4]
        if length < fmt.TAG_SIZE or length > fmt.MAX_RECORD_PAYLOAD:
            raise CorruptionError(self.path, offset, f"frame length {length} is out of bounds")
        return h

    def _check_frame_fits(self, fd: int, offset: int, length: int) -> None:
        if offset + fmt.FRAME_HEADER_SIZE + length > self.vfs.fstat_size(fd):
            raise CorruptionError(self.path, offset, f"frame length {length} runs past the end of the file")

    def _open_frame(self, h: tuple, raw: bytes, view: memoryview, rel: int, offset: int, expect_type: int) -> bytes:
        """Check the CRC and fields of the frame whose header ``h`` starts at ``raw[rel:]`` (all of it
        there) and authenticate and decrypt it: its plaintext."""
        hsize = fmt.FRAME_HEADER_SIZE
        header = raw[rel:rel + hsize]
        ct = view[rel + hsize:rel + hsize + h[4]]
        if crypto.frame_crc(header, ct) != h[9]:
            raise CorruptionError(self.path, offset, "frame fails its CRC32C")
        if (h[0] != expect_type or h[1] != self.ident.algorithm or h[2] or h[3] or h[11]
                or h[12] != self.ident.key_id or h[10] != crypto.nonce_for(h[5])):
            self._check_frame_fields(h, offset, expect_type=expect_type)   # raises, naming what is wrong
        return self.cipher.open(header, ct, path=self.path, offset=offset)

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

    def read_entries_record(self, r: int) -> EntryBatch:
        """ENTRIES record r, fully checked."""
        offset = self.rec_offset[r]
        # The next record's offset bounds this frame (commit frames may sit between them).
        hint = self.rec_offset[r + 1] - offset if r + 1 < len(self.rec_offset) else 0
        h, payload = self.read_frame(offset, fmt.FRAME_ENTRIES, min(hint, 8 << 20))
        return self._entries_record(r, h, payload, offset)

    def _entries_record(self, r: int, h: tuple, payload: bytes, offset: int) -> EntryBatch:
        if h[6] != self.rec_index[r] or h[8] != self.rec_count[r]:
            raise AuthenticationError(self.path, offset,
                                      f"record holds index {h[6]} x{h[8]} where the index expects "
                                      f"{self.rec_index[r]} x{self.rec_count[r]} (records swapped or moved)")
        return decode_entries_payload(payload, h[6], h[8], path=self.path, offset=offset)

    def read_entries_records(self, r: int, last: int, window: int | None = None,
                             before_read: Callable[[], None] | None = None,
                             own_fd: bool = False) -> Iterator[EntryBatch]:
        """ENTRIES records r..last in order, each checked exactly as :meth:`read_entries_record` checks
        it and handed out only then, read sequentially a window of about ``window`` bytes (default
        READ_WINDOW) at a time: one pread for every record the window holds; a frame larger than the
        window is read alone, once the file was found to hold it.  ``before_read()`` is called before
        every read (it may raise).  With ``own_fd`` (a reader that lives across calls) the file is read
        through a descriptor of the reader's own, which nobody else closes (or reuses) under it,
        closed when the reader ends; otherwise through the segment's (``ensure_open``)."""
        window = READ_WINDOW if window is None else window
        offs = self.rec_offset
        hsize = fmt.FRAME_HEADER_SIZE
        # Records r..last lie before the next record's offset (commit frames may sit between them).
        stop = offs[last + 1] if last + 1 < len(offs) else offs[last] + hsize + _READ_AHEAD
        buf = b""
        view = memoryview(buf)
        base = 0
        fd = None
        held = [False]                 # pinned (the segment's own descriptor; see pin)
        try:
            while r <= last:
                off = offs[r]
                rel = off - base
                if rel < 0 or rel + hsize > len(buf):
                    if before_read is not None:
                        before_read()
                    if fd is None:
                        fd = self._open_for_read() if own_fd else self.pin(held)
                    buf = self.vfs.pread(fd, max(min(window, stop - off), hsize + _READ_AHEAD), off)
                    view, base, rel = memoryview(buf), off, 0
                h = self._frame_head(buf, rel, off)
                need = hsize + h[4]
                if rel + need > len(buf):
                    if before_read is not None:
                        before_read()
                    if fd is None:
                        fd = self._open_for_read() if own_fd else self.pin(held)
                    if need > window:
                        self._check_frame_fits(fd, off, h[4])     # before allocating the declared length
                    buf = self.vfs.pread(fd, max(need, min(window, stop - off)), off)
                    view, base, rel = memoryview(buf), off, 0
                    if len(buf) < need:
                        self._check_frame_fits(fd, off, h[4])
                        raise CorruptionError(self.path, off, "frame is cut off by the end of the file")
                payload = self._open_frame(h, buf, view, rel, off, fmt.FRAME_ENTRIES)
                yield self._entries_record(r, h, payload, off)
                r += 1
        finally:
            if own_fd:
                if fd is not None:
                    self.vfs.close(fd)
            else:
                self.unpin(held)
