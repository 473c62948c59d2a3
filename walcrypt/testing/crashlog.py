"""What :class:`walcrypt.testing.CrashVFS` records until a sync makes it durable: per file (an
inode, wherever its name is) an undo log of writes and size changes, and the directory operations
whose parents were not yet fsynced.  Per the durability contract of :mod:`walcrypt.vfs`."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Union

from ..vfs import SECTOR_SIZE

__all__ = ["HOLD_PREFIX", "Write", "Resize", "Node", "DirOp", "full_path", "release_all", "sectors"]

HOLD_PREFIX = ".crashvfs-holding-"


@dataclass(eq=False)
class Write:
    offset: int
    data: bytes
    old: bytes  # previous bytes of [offset, min(offset+len(data), old_size))
    old_size: int


@dataclass(eq=False)
class Resize:
    length: int
    old: bytes  # bytes cut off by a shrink: previous [length, old_size)
    old_size: int
    grow_only: bool  # preallocate: size becomes max(size, length)


@dataclass(eq=False)
class Node:
    """One tracked regular file (an inode), wherever its name currently is."""
    key: tuple[int, int]
    path: str | None  # current location (a holding path once unlinked; None once gone)
    helper: int  # our own fd on the inode, for reading old bytes and undoing
    writable: bool = True
    users: int = 0
    undo: list[Union[Write, Resize]] = field(default_factory=list)


@dataclass(eq=False)
class DirOp:
    kind: str  # "create" | "mkdir" | "rename" | "unlink"
    path: str  # the name created/removed; for rename the source
    dst: str | None = None
    held: str | None = None  # where the unlinked file / overwritten destination waits
    unsynced: set[str] = field(default_factory=set)  # parents still to fsync_dir

    def names(self) -> set[str]:
        return {self.path} if self.dst is None else {self.path, self.dst}


def full_path(path: str) -> str:
    return os.path.abspath(os.fspath(path))


def release_all(nodes: dict[tuple[int, int], Node], holding: dict[int, str]) -> None:
    """Close the helper fds and remove the holding directories (contents are gone for good)."""
    for node in nodes.values():
        os.close(node.helper)
    nodes.clear()
    for hdir in holding.values():
        shutil.rmtree(hdir, ignore_errors=True)
    holding.clear()


def sectors(offset: int, length: int) -> list[tuple[int, int]]:
    """The pieces of [offset, offset+length) split on SECTOR_SIZE boundaries."""
    pieces, pos, end = [], offset, offset + length
    while pos < end:
        nxt = min(end, (pos // SECTOR_SIZE + 1) * SECTOR_SIZE)
        pieces.append((pos, nxt))
        pos = nxt
    return pieces
