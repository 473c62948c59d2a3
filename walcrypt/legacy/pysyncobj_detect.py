"""Finding pysyncobj's journal and full-dump files (for ``walcrypt inspect`` and the adapter's first
start), from at most a few hundred bytes of each file."""

from __future__ import annotations

import os
import shlex
import zlib

from ..errors import WalcryptError
from ..vfs import open_regular
from .pysyncobj_read import HEADER_SIZE, NAME, NAME_SIZE

MAX_SCAN = 1000          # directory entries looked at by detect()


def sniff(path: str) -> str | None:
    """"journal", "dump" or None, from at most a few hundred bytes of ``path`` (a regular file)."""
    try:
        fd = open_regular(path)
    except (OSError, ValueError, WalcryptError):  # unreadable, special, ...: not ours to report
        return None
    try:
        head = os.read(fd, 512)
    finally:
        os.close(fd)
    if head[:NAME_SIZE] == NAME + bytes(NAME_SIZE - len(NAME)) and len(head) >= HEADER_SIZE:
        return "journal"
    if head[:2] == b"\x1f\x8b":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            start = d.decompress(head, 16)
        except zlib.error:
            return None
        if start[:3] == b"\x80\x02(":             # protocol 2, MARK: pysyncobj's (state, last, prev, cluster)
            return "dump"
    return None


def detect(path: str) -> list[dict]:
    """pysyncobj journal and dump files at ``path`` (a file, or a directory's own entries)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        names = []
        with os.scandir(path) as it:
            for k, e in enumerate(it):
                if k >= MAX_SCAN:
                    break
                if e.is_file(follow_symlinks=False) and not e.name.endswith((".meta", ".tmp")):
                    names.append(e.path)
        files = sorted(names)
    elif os.path.isfile(path):
        files = [path]
    else:
        return []
    kinds = {f: sniff(f) for f in files}
    journals = [f for f, k in kinds.items() if k == "journal"]
    dumps = [f for f, k in kinds.items() if k == "dump"]
    findings = []
    pair = dumps[0] if len(dumps) == 1 else None
    for j in journals:
        paths = [j] + ([j + ".meta"] if os.path.isfile(j + ".meta") else []) + ([pair] if pair else [])
        cmd = f"walcrypt import pysyncobj NEW_DATA_DIR --journal {shlex.quote(j)}"
        cmd += f" --dump {shlex.quote(pair)}" if pair else (" --dump DUMP_FILE" if dumps else "")
        findings.append({"kind": "pysyncobj", "paths": paths, "command": cmd + " --key-file KEK",
                         "detail": "pysyncobj FileJournal" + (" with its .meta file" if len(paths) > 1 and
                                                               paths[1].endswith(".meta") else "")
                         + (" and full-dump file" if pair else "")})
    for d in dumps:
        if d == pair and journals:
            continue
        findings.append({"kind": "pysyncobj", "paths": [d], "detail": "pysyncobj full-dump file",
                         "command": f"walcrypt import pysyncobj NEW_DATA_DIR --journal JOURNAL_FILE --dump "
                                    f"{shlex.quote(d)} --key-file KEK"})
    return findings


def sibling_files(data_dir: str) -> tuple[str | None, str | None]:
    """The adapter's rule for files beside a data directory D: ``D.journal`` (with ``D.journal.meta``)
    and ``D.dump``, each only when its content is pysyncobj's."""
    j, d = data_dir + ".journal", data_dir + ".dump"
    return (j if os.path.isfile(j) and sniff(j) == "journal" else None,
            d if os.path.isfile(d) and sniff(d) == "dump" else None)
