"""Data the workloads feed to the stores, and the plain-file operations they are compared with.

* :class:`PatternStream` -- a readable binary stream of ``size`` bytes made by
  repeating one random block: a snapshot "state" of any size that costs no
  memory to hold and the same (tiny) CPU time for every variant reading it.
* :func:`raw_write_fsync` / :func:`raw_read` -- the disk limit for snapshots:
  ``os.write`` of the same bytes in the same chunk size, then one ``os.fsync``;
  reading a file back in chunks.
* :func:`size_name` -- ``1<<30 -> "1g"``, ``256<<20 -> "256m"``, ``50_000 -> "50k"``
  for case names.
"""

from __future__ import annotations

import io
import os
import random

CHUNK = 1 << 20


class PatternStream(io.RawIOBase):
    """``size`` bytes of a repeated random block (seeded, so every variant reads the same bytes)."""

    def __init__(self, size: int, block: int = CHUNK, seed: int = 5):
        super().__init__()
        self.size = int(size)
        self.pos = 0
        pattern = random.Random(seed).randbytes(block)
        # twice over, so any window of ``block`` bytes is one slice
        self._double = memoryview(pattern + pattern)
        self._block = block

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        mv = memoryview(b).cast("B")
        done = 0
        while done < n:
            start = (self.pos + done) % self._block
            k = min(n - done, self._block)
            mv[done:done + k] = self._double[start:start + k]
            done += k
        self.pos += n
        return n


def raw_write_fsync(path: str, stream, chunk: int = CHUNK) -> int:
    """Copy ``stream`` to a new file at ``path`` with os.write, then os.fsync.  Returns the size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    total = 0
    try:
        while True:
            block = stream.read(chunk)
            if not block:
                break
            mv = memoryview(block)
            while len(mv):
                n = os.write(fd, mv)
                mv = mv[n:]
            total += len(block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def raw_read(path: str, chunk: int = CHUNK) -> int:
    """Read a file in ``chunk``-byte reads; returns the size."""
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            total += len(block)
    return total


def size_name(n: int) -> str:
    """Short names for sizes (binary: 1g, 256m, 4k) and counts (decimal: 1m, 50k)."""
    for shift, suffix in ((30, "g"), (20, "m"), (10, "k")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    for mult, suffix in ((1_000_000, "m"), (1_000, "k")):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)
