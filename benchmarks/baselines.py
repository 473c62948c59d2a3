"""Baseline log stores that walcrypt is measured against.

Every baseline has the same small interface (the one the workloads drive):

* ``open(dir)``                      -- open or create the store in the directory ``dir``;
* ``append_batch(batch)``            -- ``batch`` is a list of ``(index, term, data)``;
  with ``sync=True`` the batch is durable when the call returns (one sync per batch);
* ``scan() -> int``                  -- read every entry back (and decrypt it); returns the count;
* ``get(index) -> bytes``            -- optional: one entry's payload (random reads);
* ``close()``.

Class attributes tell the workloads what a baseline can do: ``supports_sync``
(can it make a batch durable at all), ``supports_get`` and ``supports_scan``.

The encrypted stores (LMDB, SQLite, pysyncobj) all use the same scheme, which is
about the cheapest correct one a user would write by hand: AES-256-GCM with a
fresh 12-byte random nonce per entry, the 8-byte big-endian index as AAD, and
``nonce || ciphertext||tag`` as the stored value.

The cluster's hand-written durable journal is in :mod:`benchmarks.journal`; the
concurrent writers' stores are in :mod:`benchmarks.concurrent`.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from typing import Iterable, List, Sequence, Tuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

Batch = Sequence[Tuple[int, int, bytes]]

#: One key for every encrypted baseline (the value does not matter for speed).
BENCH_KEY = bytes(range(32))

_KEY = struct.Struct(">Q")  # 8-byte big-endian index: LMDB key and AAD
NONCE_LEN = 12


def _seal(aead: AESGCM, index: int, data: bytes) -> bytes:
    key = _KEY.pack(index)
    nonce = os.urandom(NONCE_LEN)
    return nonce + aead.encrypt(nonce, data, key)


def _open_sealed(aead: AESGCM, index: int, value: bytes) -> bytes:
    value = bytes(value)
    return aead.decrypt(value[:NONCE_LEN], value[NONCE_LEN:], _KEY.pack(index))


class Baseline:
    """Common base: name, sync flag, capability flags."""

    name = "baseline"
    supports_sync = True
    supports_scan = True
    supports_get = False
    encrypted = True

    def __init__(self, sync: bool = True):
        self.sync = bool(sync)

    def prepare(self, batches: List[Batch]) -> List[Batch]:
        """Untimed conversion of the workload's batches to this store's input form."""
        return batches

    def open(self, dir: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def append_batch(self, batch: Batch) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def scan(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, index: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------- raw


class RawFileBaseline(Baseline):
    """The O_APPEND disk baseline: one ``os.write`` of the whole batch to a file opened
    ``O_APPEND``, then ``os.fdatasync``.  Every append grows the file, so every fdatasync
    also flushes the new size (a metadata write); :class:`RawPreallocBaseline` is the floor
    without it.

    Record layout: ``<u32 length><u64 index><u64 term><data>``.  No checksums, no
    crypto.  ``get`` uses ``os.pread`` with an in-memory offset table (built while
    appending, or by walking the file at ``open``).
    """

    name = "raw"
    encrypted = False
    supports_get = True
    _HDR = struct.Struct("<IQQ")
    FILE = "raw.log"

    def open(self, dir: str) -> None:
        self.path = os.path.join(dir, self.FILE)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.offsets: dict[int, Tuple[int, int]] = {}
        self.end = self._walk(os.fstat(self.fd).st_size)

    def _walk(self, size: int) -> int:
        """Fill the offset table from the file's first ``size`` bytes; the end of the last record.
        A header of index 0 is the end (preallocated zeros: an index is never 0)."""
        if not size:
            return 0
        buf = os.pread(self.fd, size, 0)
        pos = 0
        hdr = self._HDR
        while pos + hdr.size <= size:
            length, index, _term = hdr.unpack_from(buf, pos)
            if index == 0:
                break
            self.offsets[index] = (pos + hdr.size, length)
            pos += hdr.size + length
        return pos

    def _records(self, batch: Batch) -> bytes:
        """The batch's records as one buffer, their offsets noted (``self.end`` is not moved)."""
        pack = self._HDR.pack
        hsize = self._HDR.size
        parts = []
        pos = self.end
        offsets = self.offsets
        for index, term, data in batch:
            parts.append(pack(len(data), index, term))
            parts.append(data)
            offsets[index] = (pos + hsize, len(data))
            pos += hsize + len(data)
        return b"".join(parts)

    def append_batch(self, batch: Batch) -> None:
        buf = self._records(batch)
        os.write(self.fd, buf)
        self.end += len(buf)
        if self.sync:
            os.fdatasync(self.fd)

    def scan(self) -> int:
        size = self.end
        buf = os.pread(self.fd, size, 0)
        pos = 0
        count = 0
        hdr = self._HDR
        mv = memoryview(buf)
        while pos + hdr.size <= size:
            length, _index, _term = hdr.unpack_from(buf, pos)
            _data = bytes(mv[pos + hdr.size : pos + hdr.size + length])
            pos += hdr.size + length
            count += 1
        return count

    def get(self, index: int) -> bytes:
        off, length = self.offsets[index]
        return os.pread(self.fd, length, off)

    def close(self) -> None:
        os.close(self.fd)


def preallocate(fd: int, offset: int, length: int) -> None:
    """Reserve ``[offset, offset + length)`` with posix_fallocate (fallocate(2) where the file
    system has it, as walcrypt's segments are reserved; glibc writes the blocks where it has not)."""
    os.posix_fallocate(fd, offset, length)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RawPreallocBaseline(RawFileBaseline):
    """The disk's floor: the same records as :class:`RawFileBaseline`, written with one
    ``os.pwrite`` per batch at a tracked offset into a preallocated file, then ``os.fdatasync``.

    ``open`` (untimed) reserves :attr:`CHUNK` bytes -- 64 MiB, walcrypt's segment size -- and
    makes the new size durable (fsync of the file and of its directory), so that an append in the
    steady state never changes the file's size and its fdatasync has no size to flush.  A write
    that would pass the reservation first reserves the next chunk (rare: at most once per 64 MiB,
    as walcrypt cuts a segment).  The reserved blocks are unwritten extents (ext4, XFS), which the
    writes convert, as walcrypt's writes into its preallocated segments do.
    """

    name = "raw-prealloc"
    FILE = "raw-prealloc.log"
    CHUNK = 64 << 20

    def open(self, dir: str) -> None:
        self.path = os.path.join(dir, self.FILE)
        created = not os.path.exists(self.path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.offsets = {}
        self.allocated = os.fstat(self.fd).st_size
        self.end = self._walk(self.allocated)
        if self.allocated < self.end + self.CHUNK // 2:
            preallocate(self.fd, self.allocated, self.CHUNK)
            self.allocated += self.CHUNK
            os.fsync(self.fd)
        if created:
            fsync_dir(dir)

    def append_batch(self, batch: Batch) -> None:
        buf = self._records(batch)
        end = self.end + len(buf)
        if end > self.allocated:
            grow = max(self.CHUNK, end - self.allocated)
            preallocate(self.fd, self.allocated, grow)
            self.allocated += grow
        os.pwrite(self.fd, buf, self.end)
        self.end = end
        if self.sync:
            os.fdatasync(self.fd)


# ------------------------------------------------------------------------ cipher


class CipherLimitBaseline(Baseline):
    """The cipher limit: AES-256-GCM over each entry in one loop, no I/O at all.

    Uses a counter nonce (random 4-byte prefix + 8-byte counter), the cheapest
    correct nonce, and the index as AAD.  ``scan`` decrypts what was encrypted.
    """

    name = "cipher"
    supports_sync = False  # no I/O: sync does not apply ("sync=na" in case names)

    def open(self, dir: str) -> None:
        self.aead = AESGCM(BENCH_KEY)
        self.prefix = os.urandom(4)
        self.counter = 0
        self.sealed: List[Tuple[int, bytes, bytes]] = []

    def append_batch(self, batch: Batch) -> None:
        enc = self.aead.encrypt
        prefix = self.prefix
        kpack = _KEY.pack
        out = self.sealed
        c = self.counter
        for index, _term, data in batch:
            c += 1
            nonce = prefix + kpack(c)
            out.append((index, nonce, enc(nonce, data, kpack(index))))
        self.counter = c

    def scan(self) -> int:
        dec = self.aead.decrypt
        kpack = _KEY.pack
        n = 0
        for index, nonce, ct in self.sealed:
            dec(nonce, ct, kpack(index))
            n += 1
        return n

    def close(self) -> None:
        self.sealed = []


# -------------------------------------------------------------------------- LMDB


class LmdbBaseline(Baseline):
    """LMDB log store: key = 8-byte BE index, value = nonce + AES-GCM ciphertext.

    One write transaction per batch; ``sync=True`` opens the environment with
    ``sync=True`` (fsync at every commit), ``sync=False`` with ``sync=False``.
    """

    name = "lmdb"
    supports_get = True
    MAP_SIZE = 8 << 30

    def open(self, dir: str) -> None:
        import lmdb

        self.aead = AESGCM(BENCH_KEY)
        self.env = lmdb.open(
            os.path.join(dir, "lmdb"),
            map_size=self.MAP_SIZE,
            sync=self.sync,
            subdir=True,
        )

    def append_batch(self, batch: Batch) -> None:
        aead = self.aead
        kpack = _KEY.pack
        with self.env.begin(write=True) as txn:
            put = txn.put
            for index, _term, data in batch:
                put(kpack(index), _seal(aead, index, data), append=True)

    def scan(self) -> int:
        aead = self.aead
        dec = aead.decrypt
        n = 0
        with self.env.begin(buffers=False) as txn:
            for key, value in txn.cursor():
                dec(value[:NONCE_LEN], value[NONCE_LEN:], key)
                n += 1
        return n

    def get(self, index: int) -> bytes:
        with self.env.begin() as txn:
            value = txn.get(_KEY.pack(index))
        return _open_sealed(self.aead, index, value)

    def close(self) -> None:
        self.env.close()


# ------------------------------------------------------------------------ SQLite


class SqliteBaseline(Baseline):
    """SQLite log store: WAL mode, ``synchronous=FULL`` (``OFF`` without sync).

    Table ``log(idx INTEGER PRIMARY KEY, term INTEGER, data BLOB)``, values
    encrypted as for LMDB; one transaction (``executemany``) per batch.
    """

    name = "sqlite"
    supports_get = True
    #: False where one connection is shared by threads that take turns (benchmarks.concurrent)
    check_same_thread = True

    def open(self, dir: str) -> None:
        self.aead = AESGCM(BENCH_KEY)
        self.db = sqlite3.connect(os.path.join(dir, "log.sqlite"), isolation_level=None,
                                  check_same_thread=self.check_same_thread)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=%s" % ("FULL" if self.sync else "OFF"))
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, term INTEGER, data BLOB)"
        )

    def append_batch(self, batch: Batch) -> None:
        aead = self.aead
        rows = [(index, term, _seal(aead, index, data)) for index, term, data in batch]
        db = self.db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO log (idx, term, data) VALUES (?, ?, ?)", rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def scan(self) -> int:
        aead = self.aead
        dec = aead.decrypt
        kpack = _KEY.pack
        n = 0
        for index, _term, value in self.db.execute("SELECT idx, term, data FROM log ORDER BY idx"):
            dec(value[:NONCE_LEN], value[NONCE_LEN:], kpack(index))
            n += 1
        return n

    def get(self, index: int) -> bytes:
        row = self.db.execute("SELECT data FROM log WHERE idx = ?", (index,)).fetchone()
        return _open_sealed(self.aead, index, row[0])

    def close(self) -> None:
        self.db.close()


# --------------------------------------------------------------------- pysyncobj


class PysyncobjBaseline(Baseline):
    """pysyncobj's ``FileJournal`` (an mmap'd append file), values encrypted as above.

    It has no way to make a write durable, so it runs only in ``sync=off`` cases.
    Opening it parses the whole file into memory, so ``open`` + ``scan`` is the
    replay cost; random reads are not measured (they would be list look-ups).
    """

    name = "pysyncobj"
    supports_sync = False

    def open(self, dir: str) -> None:
        from pysyncobj.journal import createJournal

        self.aead = AESGCM(BENCH_KEY)
        self.journal = createJournal(os.path.join(dir, "journal.bin"))

    def append_batch(self, batch: Batch) -> None:
        aead = self.aead
        add = self.journal.add
        for index, term, data in batch:
            add(_seal(aead, index, data), index, term)

    def scan(self) -> int:
        aead = self.aead
        dec = aead.decrypt
        kpack = _KEY.pack
        j = self.journal
        n = 0
        for i in range(len(j)):
            value, index, _term = j[i]
            dec(value[:NONCE_LEN], value[NONCE_LEN:], kpack(index))
            n += 1
        return n

    def close(self) -> None:
        self.journal._destroy()


#: name -> class, in the order the workloads interleave them.
BASELINES = {
    cls.name: cls
    for cls in (
        RawFileBaseline,
        RawPreallocBaseline,
        CipherLimitBaseline,
        LmdbBaseline,
        SqliteBaseline,
        PysyncobjBaseline,
    )
}


def make(name: str, sync: bool) -> Baseline:
    return BASELINES[name](sync=sync)


def names() -> Iterable[str]:
    return list(BASELINES)
