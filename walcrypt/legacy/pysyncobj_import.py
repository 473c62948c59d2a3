"""Importing a pysyncobj node's own files into a new walcrypt store, laid out as the pysyncobj
adapter writes its own (:mod:`walcrypt.adapters.pysyncobj_format`), so the adapter resumes from it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from .. import opening
from ..adapters.pysyncobj_format import TERM_OFFSET, record_term_offset, save_term_vote
from ..errors import UsageError
from ..keys import KeyEncryptionKey
from ..storage import Store
from ..types import Entry, HardState, SnapshotMeta
from ..vfs import DEFAULT_VFS
from . import _pickles
from .pysyncobj_dump import MAX_DUMP_BYTES, dump_blob, read_dump
from .pysyncobj_read import Source, read_journal, read_meta
from .pysyncobj_sources import STABLE_SOURCES

BATCH_BYTES = 16 << 20


def import_pysyncobj(data_dir: str | os.PathLike[str], *, journal: str | os.PathLike[str],
                     dump: str | os.PathLike[str] | None = None, kek: KeyEncryptionKey | None = None,
                     max_dump_bytes: int = MAX_DUMP_BYTES, **open_options: Any) -> dict:
    """Import a pysyncobj node's ``FileJournal`` file (with its ``.meta``) and full-dump file into a
    new walcrypt store at ``data_dir`` (missing or empty), laid out as the pysyncobj adapter
    (:func:`walcrypt.adapters.pysyncobj.walcrypt_conf`) writes its own: the entries with their
    commands, term and vote, the commit index, and the dump as the snapshot.  Returns a report.

    The store is built in a private directory beside ``data_dir`` and renamed into place at the end;
    on any error nothing is left behind.  The sources are only read; their paths, sizes and SHA-256
    are recorded in the store so that ``walcrypt migrate DATA --to encrypted --remove-source`` can
    delete them later, and only while they are still byte-identical to what was imported."""
    if not _pickles.node_classes():
        raise UsageError("importing pysyncobj files needs pysyncobj (its node classes make up a dump's cluster): "
                         "pip install 'walcrypt[pysyncobj]'")
    data_dir = os.path.abspath(os.fspath(data_dir))
    if os.path.lexists(data_dir) and (not os.path.isdir(data_dir) or os.path.islink(data_dir) or os.listdir(data_dir)):
        raise UsageError(f"{data_dir} exists and is not an empty directory; import only into a new or empty one")
    parent = os.path.dirname(data_dir)
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} does not exist; create it first")
    report: dict = {"data_dir": data_dir, "journal": os.path.abspath(os.fspath(journal)),
                    "dump": os.path.abspath(os.fspath(dump)) if dump is not None else None,
                    "entries": 0, "first_index": None, "last_index": None, "term": None, "vote": None,
                    "commit": None, "snapshot_index": None, "cut": None, "sources": []}
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(data_dir) + ".import-", dir=parent)
    try:
        meta = read_meta(report["journal"] + ".meta", report)
        snap = read_dump(report["dump"], max_dump_bytes, report) if dump is not None else None
        src = Source(report["journal"], "journal")
        try:
            with opening.open(staging, kek=kek, **open_options) as st:
                record_term_offset(st)
                _write_log(st, read_journal(src, report), snap, report)
                report["sources"].insert(0, src.finish())
                _finish(st, meta, snap, report)
        finally:
            src.close()
        try:
            os.rename(staging, data_dir)          # onto a missing or empty directory only
        except OSError:
            if os.path.lexists(data_dir):
                raise UsageError(f"{data_dir} was created and filled while the import ran; nothing there was "
                                 "changed and the imported store was discarded") from None
            raise
        DEFAULT_VFS.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write_log(st: Store, entries: Iterable[tuple[int, int, bytes]], snap: dict | None, report: dict) -> None:
    batch: list[Entry] = []
    size = 0
    first = True
    for index, term, command in entries:
        if first:
            first = False
            if index > 1:
                if snap is None:
                    raise UsageError(f"{report['journal']} starts at index {index} (pysyncobj compacted it after a "
                                     "dump): give its full-dump file too (--dump / dump=)")
                if snap["last"][1] < index - 1:
                    raise UsageError(f"the dump (index {snap['last'][1]}) is older than the journal's first entry "
                                     f"({index}): it is not the dump this journal was compacted with")
                # The log continues after index - 1; its term is not in the journal: the first entry's is
                # used (terms never fall, and nothing in pysyncobj asks for the term of a compacted entry).
                st.reset_log(index - 1, term + TERM_OFFSET)
        batch.append(Entry(index, term + TERM_OFFSET, command))
        size += len(command)
        if size >= BATCH_BYTES or len(batch) >= 4096:
            st.save(entries=batch)
            batch, size = [], 0
    if batch:
        st.save(entries=batch)


def _finish(st: Store, meta: dict, snap: dict | None, report: dict) -> None:
    if snap is not None:
        last = snap["last"]
        st.save_snapshot(SnapshotMeta(last[1], last[2] + TERM_OFFSET), dump_blob(snap))
        report["snapshot_index"] = last[1]
    top = max(st.last_index(), snap["last"][1] if snap is not None else 0)
    commit = meta["raftCommitIndex"]
    if commit > max(top, 1):
        report["commit_clamped_from"] = commit      # pysyncobj clamps it too when it loads a dump
        commit = top
    term, vote = meta["currentTerm"], meta["votedForNodeId"]
    save_term_vote(st, term, vote)
    record = {"version": 1, "imported_at": int(time.time()), "sources": report["sources"]}
    st.stable_set(STABLE_SOURCES, json.dumps(record).encode())
    st.save(hard_state=HardState(term, 0, max(commit, 1)))
    report.update(term=term, vote=vote, commit=max(commit, 1), store_first_index=st.first_index(),
                  store_last_index=st.last_index())
