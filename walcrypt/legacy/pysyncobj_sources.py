"""The pysyncobj files a store was imported from: recorded in its stable store at the import, and
removed afterwards only while each is still byte-identical to what was imported."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat

from .. import layout, opening
from .. import meta as M
from ..keys import KeyEncryptionKey
from ..vfs import open_regular

STABLE_SOURCES = b"pysyncobj/imported-sources"          # what was imported (path, size, SHA-256)


def has_recorded_sources(data_dir: str) -> bool:
    """Whether the store records imported pysyncobj files (read without a key: the stable store's
    keys are not secret, its values are)."""
    meta_dir = os.path.join(data_dir, layout.META_DIR)
    if not os.path.isdir(meta_dir):
        return False
    m = M.Meta(meta_dir, readonly=True)
    try:
        with m.read() as r:
            return r.raw(M.DB_STABLE, STABLE_SOURCES) is not None   # presence only; read with the key
    finally:
        m.close()


def remove_sources(data_dir: str, kek: KeyEncryptionKey | None, *, apply: bool = True) -> dict:
    """Delete the pysyncobj files the store at ``data_dir`` was imported from, each only while it is
    still a regular file byte-identical (size and SHA-256) to what was imported.
    -> {"removed": [path, ...], "kept": [{"path", "reason"}, ...]}"""
    with opening.open(data_dir, kek=kek, read_only=True) as st:
        raw = st.stable_get(STABLE_SOURCES)
    out: dict = {"removed": [], "kept": []}
    if raw is None:
        return out
    for s in json.loads(raw)["sources"]:
        path, reason = s["path"], None
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            out["kept"].append({"path": path, "reason": "already gone"})
            continue
        if not stat.S_ISREG(lst.st_mode):
            reason = "is no longer a regular file (a link or something else now)"
        elif lst.st_size != s["size"] or _sha256(path) != s["sha256"]:
            reason = "changed since it was imported (not byte-identical): left alone"
        if reason is not None:
            out["kept"].append({"path": path, "reason": reason})
            continue
        if apply:
            os.unlink(path)
        out["removed"].append(path)
    return out


def _sha256(path: str) -> str:
    fd = open_regular(path)
    h = hashlib.sha256()
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    finally:
        os.close(fd)


def removal_command(data_dir: str) -> str:
    return f"walcrypt migrate {shlex.quote(data_dir)} --to encrypted --remove-source --key-file KEK"

