"""The files of a data directory as ``walcrypt inspect`` reads them without a key: what each directory
holds, the clear frame headers of a segment (index, term, type and CRC are readable without the key),
export files lying in the directory, and the names of the cipher suites.  Nothing is authenticated
here and nothing is written."""

from __future__ import annotations

import os
import stat

from crc32c import crc32c

from . import bounded, crypto, layout
from . import format as fmt
from .errors import WalcryptError
from .exports import EXPORT_MAGIC, ExportFile
from .vfs import DEFAULT_VFS

DIRECTORIES = (
    (layout.META_DIR, "metadata (LMDB)"),
    (layout.WAL_ENCRYPTED, "encrypted segments"),
    (layout.SNAP_ENCRYPTED, "encrypted snapshots"),
    (layout.WAL_PLAIN, "legacy plaintext segments"),
    (layout.SNAP_PLAIN, "legacy plaintext snapshots"),
    (".migrate-wal", "migration in progress (temporary)"),
    (".migrate-snap", "migration in progress (temporary)"),
)


def alg_name(alg: int) -> str:
    try:
        return crypto.suite(alg).name
    except WalcryptError:
        return f"unknown({alg})"


def dir_summary(root: str) -> list[dict]:
    out = []
    for name, role in DIRECTORIES:
        p = os.path.join(root, name)
        if not os.path.isdir(p):
            if not name.startswith("."):
                out.append({"name": name, "role": role, "exists": False, "files": 0, "bytes": 0})
            continue
        sizes = []
        for n in os.listdir(p):
            try:                             # a running writer may remove a file meanwhile
                st = os.stat(os.path.join(p, n))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                sizes.append(st.st_size)
        out.append({"name": name, "role": role, "exists": True, "files": len(sizes), "bytes": sum(sizes)})
    return out


def scan_frame_headers(path: str, *, window: int = bounded.WINDOW) -> dict:
    """Walk the clear frame headers of a segment (CRC-checked, not authenticated), a window at a time.

    -> {"last_index", "committed_end", "sealed", "tail"} where tail says what follows the
    last COMMIT frame ("clean", or a description of uncommitted bytes)."""
    fd = DEFAULT_VFS.open(path, os.O_RDONLY)
    try:
        return scan_headers_in(bounded.FileSource(DEFAULT_VFS, fd), window)
    finally:
        DEFAULT_VFS.close(fd)


def scan_headers_in(src: bounded.Source, window: int) -> dict:
    size = src.size
    hsize = fmt.FRAME_HEADER_SIZE
    off = fmt.SEGMENT_HEADER_SIZE
    head = src.read(0, 48)
    base = int.from_bytes(head[40:48], "little") if len(head) >= 48 else 0
    last = base - 1
    pending_last = None
    committed_end = off
    sealed = False
    tail = "clean"
    buf, start = b"", 0              # bytes [start, start + len(buf)) of the file
    while off + hsize <= size:
        if not start <= off or off + hsize > start + len(buf):
            buf, start = src.read(off, window), off
            if len(buf) < hsize:
                break
        h = fmt.FRAME_HEADER_STRUCT.unpack_from(buf, off - start)
        ftype, length = h[0], h[4]
        if ftype == fmt.FRAME_UNWRITTEN:
            break
        end = off + hsize + length
        header = buf[off - start:off - start + hsize]
        crc = crc32c(header[fmt.FRAME_CRC_OFFSET + 4:], crc32c(header[:fmt.FRAME_CRC_OFFSET]))
        if ftype not in fmt.FRAME_TYPES or length < fmt.TAG_SIZE or end > size or \
                bounded.crc_range(src, off + hsize, end, crc, window) != h[9]:
            tail = f"unreadable or uncommitted bytes from offset {off}"
            break
        if ftype == fmt.FRAME_ENTRIES:
            pending_last = h[6] + h[8] - 1
        elif ftype == fmt.FRAME_COMMIT:
            if pending_last is not None:
                last = pending_last
            pending_last = None
            committed_end = fmt.align_up(end)
        elif ftype == fmt.FRAME_INDEX:
            sealed = True
            break
        off = fmt.align_up(end)
    else:
        if off < size and not bounded.all_zero(src, off, size, window):
            tail = f"unreadable or uncommitted bytes from offset {off}"
    if tail == "clean" and pending_last is not None:
        tail = f"uncommitted records after offset {committed_end}"
    return {"last_index": last, "committed_end": committed_end, "sealed": sealed, "tail": tail}


def find_exports(root: str) -> list[tuple[str, bool]]:
    """Export files (WCRYPEXP) anywhere under the data directory: (path, KEK embedded)."""
    found = []
    lmdb_files = {os.path.join(root, layout.META_DIR, n) for n in ("data.mdb", "lock.mdb")}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = os.path.join(dirpath, n)
            if p in lmdb_files:
                continue             # LMDB's own (and closing a descriptor of lock.mdb drops LMDB's locks)
            try:
                with open(p, "rb") as f:
                    if f.read(8) != EXPORT_MAGIC:
                        continue
            except OSError:
                continue
            try:
                found.append((p, ExportFile(p).kek_embedded))
            except WalcryptError:
                found.append((p, True))      # damaged header: assume the worst
    return found
