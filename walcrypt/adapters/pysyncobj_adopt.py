"""A node's first start on walcrypt after it ran on pysyncobj's own ``FileJournal``: its files,
given to ``walcrypt_conf(import_journal=..., import_dump=...)``, imported into the new store, or a
warning about ones found beside the data directory (walcrypt never adopts them implicitly)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from ..errors import UsageError
from ..keys import KeyEncryptionKey
from ..layout import looks_like_store
from ..legacy.pysyncobj_detect import sibling_files
from ..legacy.pysyncobj_import import import_pysyncobj
from ..legacy.pysyncobj_sources import removal_command

log = logging.getLogger("walcrypt.adapters.pysyncobj")     # the adapter's one logger (named in the README)


class LegacyFilesWarning(UserWarning):
    """pysyncobj files of this node's earlier life: imported on this first start and left in place
    (plaintext) until removed with the command the warning names, or found beside a new store
    without ``import_journal=`` and not imported."""


def adopt_legacy_files(path: str, journal: str | None, dump: str | None, *, kek: KeyEncryptionKey | None,
                       encrypted: bool, store_options: dict[str, Any]) -> dict | None:
    """First start only (no store at ``path`` yet): import the pysyncobj files given to
    walcrypt_conf (``journal`` a path, ``"auto"`` or None; ``dump`` a path or None), or warn about
    ones found beside the data directory.  Returns the import's report (for :func:`warn_imported`),
    None when nothing was imported."""
    if looks_like_store(path):
        return None
    if journal == "auto" or journal is None:
        found_j, found_d = sibling_files(path)
        if journal is None:
            if found_j or found_d:
                _warn_legacy(f"pysyncobj files beside the new walcrypt store {path} were NOT imported: "
                             f"{', '.join(p for p in (found_j, found_d) if p)}. To start this node from them, "
                             "pass import_journal='auto' (or the paths) to walcrypt_conf, or run "
                             "'walcrypt import pysyncobj'; walcrypt never adopts them implicitly")
            return None
        journal, dump = found_j, dump or found_d
        if journal is None:
            if dump is not None:
                _warn_legacy(f"{dump} beside the new walcrypt store {path} was NOT imported: there is no "
                             f"{path}.journal to go with it; give import_journal= the node's journal")
            return None                 # "auto" and nothing there: a new node
    for p in (journal, dump):
        if p is not None and not os.path.isfile(p):
            raise UsageError(f"walcrypt_conf(import_journal/import_dump): {p} does not exist (and {path} "
                             "holds no store yet); give the files this node used with FileJournal, or drop "
                             "the option to start an empty node")
    return import_pysyncobj(path, journal=journal, dump=dump, kek=kek, encrypted=encrypted, **store_options)


def warn_imported(path: str, rep: dict) -> None:
    """The LegacyFilesWarning after an import: what was imported, and the command that removes it."""
    cut = rep.get("cut")
    _warn_legacy(f"imported pysyncobj's files into the walcrypt store {path}: "
                 f"{', '.join(s['path'] for s in rep['sources'])} ({rep['entries']} entries"
                 + (f", snapshot at index {rep['snapshot_index']}" if rep.get("snapshot_index") else "")
                 + (f"; a torn journal tail of {cut['bytes']} bytes at offset {cut['offset']} was cut: "
                    f"{cut['reason']}" if cut else "")
                 + "). The originals were not changed and still hold this node's data in clear; once the node "
                 f"runs well, remove them with: {removal_command(path)}")


def _warn_legacy(msg: str) -> None:
    log.warning("%s", msg)
    warnings.warn(msg, LegacyFilesWarning, stacklevel=2)
