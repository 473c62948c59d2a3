"""Bounded reads of files whose size nothing vouches for.

A segment left unsealed by a crash is preallocated to its segment size, and anyone who can write
the data directory can extend any file sparsely (``truncate -s 4G`` costs no disk space).  Readers
therefore never load such a file whole: they walk it in windows of at most ``WINDOW`` bytes through
positioned reads, so the memory a scan or a verification needs does not depend on the file size
(FORMAT.md 11.3 and 13 state what it does depend on).

A :class:`Source` is a byte range of known size with positioned reads: :class:`FileSource` reads a
file through the VFS seam (so fault injection and crash simulation see every read), and
:class:`BytesSource` serves bytes already in memory (tests, fuzzers, golden vectors).  The functions
below answer the questions recovery asks of a file tail -- is this range all zeros, where does this
8-byte pattern occur, what is the CRC32C of this range -- one window at a time.
"""

from __future__ import annotations

from typing import Iterator

from crc32c import crc32c

WINDOW = 1 << 20


class Source:
    """``size`` bytes readable at any offset; ``read`` returns fewer bytes only past ``size``."""

    size: int

    def read(self, offset: int, n: int) -> bytes:
        raise NotImplementedError


class BytesSource(Source):
    """Bytes already in memory, read through the same interface as a file."""

    def __init__(self, data: bytes | bytearray | memoryview):
        self.data = data if isinstance(data, bytes) else bytes(data)
        self.size = len(self.data)

    def read(self, offset: int, n: int) -> bytes:
        return self.data[offset:offset + n] if n > 0 else b""


class FileSource(Source):
    """An open file descriptor read through ``vfs.pread``; its size is taken once, at construction."""

    def __init__(self, vfs, fd: int, size: int | None = None):
        self.vfs = vfs
        self.fd = fd
        self.size = vfs.fstat_size(fd) if size is None else size

    def read(self, offset: int, n: int) -> bytes:
        n = min(n, self.size - offset)
        if n <= 0:
            return b""
        return self.vfs.pread(self.fd, n, offset)


def all_zero(src: Source, lo: int, hi: int, window: int = WINDOW) -> bool:
    """Whether every byte of [lo, min(hi, size)) is zero (an empty range is)."""
    hi = min(hi, src.size)
    zeros = bytes(min(window, max(hi - lo, 0)))
    while lo < hi:
        block = src.read(lo, min(window, hi - lo))
        if not block:
            return True                       # the file shrank while it was read: nothing is there
        if block != (zeros if len(block) == len(zeros) else zeros[:len(block)]):
            return False
        lo += len(block)
    return True


def find_aligned(src: Source, pattern: bytes, lo: int, hi: int, align: int,
                 window: int = WINDOW) -> Iterator[int]:
    """Every offset p >= lo with p % align == 0 and p + len(pattern) <= min(hi, size) where
    ``pattern`` occurs, in increasing order (windows overlap by len(pattern) - 1 bytes)."""
    hi = min(hi, src.size)
    plen = len(pattern)
    a = lo
    while a + plen <= hi:
        block = src.read(a, min(hi, a + window + plen - 1) - a)
        starts = min(window, len(block) - plen + 1)       # offsets of this window: [a, a + starts)
        pos = block.find(pattern)
        while 0 <= pos < starts:
            if (a + pos) % align == 0:
                yield a + pos
            pos = block.find(pattern, pos + 1)
        if len(block) < plen:
            return
        a += window


def crc_range(src: Source, lo: int, hi: int, crc: int, window: int = WINDOW) -> int | None:
    """CRC32C of [lo, hi) continued from ``crc``; None when the file ends before ``hi``."""
    while lo < hi:
        block = src.read(lo, min(window, hi - lo))
        if not block:
            return None
        crc = crc32c(block, crc)
        lo += len(block)
    return crc
