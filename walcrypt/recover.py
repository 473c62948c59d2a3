"""Disaster recovery without ``meta/``: rebuild the metadata from the snapshot and segment files.

Snapshot files carry the wrapped data key they are encrypted under (FORMAT.md 10.5), so a data
directory whose ``meta/`` is lost, or damaged beyond use, can be rebuilt from its snapshot and
segment files plus the KEK.  ``recover(path, kek)`` plans the rebuild and writes nothing;
``recover(path, kek, apply=True)`` carries it out.  The rules (FORMAT.md 11.11):

Trust.  Every file in the directory is untrusted until it authenticates under a key the KEK
unwraps.  A snapshot's keyring bundle is parsed with its bounds, its DEK unwrapped (the wrap binds
store ID, key ID and purpose), then the snapshot is authenticated end to end (its META frame binds
the header and the bundle).  Only the DEKs of snapshots that pass are known.  A segment is adopted
only when its header names the store those snapshots belong to and a known DEK, its key commitment
matches and every frame authenticates (tags, chain, sequence numbers): a segment from another store,
one planted by someone without the key, or one under a DEK no readable snapshot carries is never
adopted (the last cannot be read at all; the report says so).  Snapshots of more than one store
(one KEK used for several stores) need ``store_id=`` to choose.

The log.  The compaction point is the newest adopted snapshot (index S, term T): without the
metadata's compaction record nothing proves that an entry at or below S in a segment file is not a
leftover a purge had already removed from the log, so only entries above S are served; the snapshot
stands for the rest.  The log is assembled as the engine assembles it (11.7), with one addition: a
segment of this store that is damaged (its header authenticates -- the key commitment needs the DEK
-- but a frame does not) still supersedes the older segments from its base on, so an older, stale
file never fills its place (an adopted segment it would cut is set aside instead).  A file whose
header does not authenticate counts for nothing: planting one cannot cut the log.  When the log
holds index S with another term, saving the snapshot reset the log (10.6): the segments written
before it (up to the one holding the snapshot's SNAPSHOT record) are no part of the log, the first
written after it is based at S + 1.  When the log does not hold S and the entry after it comes from
the segment holding that record, with nothing written after the record, a reset and a snapshot of
the node's own leave the same files: the rebuild refuses (the snapshot file alone restores the
node).  A hole above S, a reset whose first later segment is missing, a snapshot file that differs
from the log's record of it, or a newer snapshot named by the log that cannot be read and that the
log does not agree with (it reset the log) make the rebuild refuse too: it would serve a log that
may differ from what the node acknowledged.

What is lost.  Everything that lived only in ``meta/``: the stable store (hashicorp's CurrentTerm /
LastVoteTerm / LastVoteCand, the pysyncobj adapter's term, vote and term offset), a DEK rotation
or migration in flight, key states (other DEKs come back as retiring), the compaction point below
the snapshot.  The hard state in the WAL (term, vote, commit of etcd-style hosts) survives.

Apply.  Under the directory lock: a new LMDB environment is written in ``.recover-meta/`` (new
metadata key, the DEKs re-wrapped under the KEK, a manifest of the adopted segments, a registry
of the adopted snapshots, the compaction point, ID counters past every file present); the files
that were not adopted are renamed ``<name>.unlisted``; the old ``meta/`` is renamed
``meta.lost-<ns>`` (never deleted) and ``.recover-meta/`` becomes ``meta/`` (the commit point; a
crash before it leaves no ``meta/`` and recover can be run again).  The store is then opened
read-write once (which seals recovered segments and cuts a torn tail, keeping ``.broken``) and its
log compared with the plan.
"""

from __future__ import annotations

import json
import logging
import os
import time

from . import format as fmt
from . import keys as K
from . import layout
from . import meta as M
from .errors import CorruptionError, UsageError
from .recover_scan import ASIDE, TMP_META, Plan, active_key, make_plan
from .segment import Segment
from .snapinfo import SnapshotInfo, encode_info
from .storage import Store
from .storedir import SharedLock
from .vfs import DEFAULT_VFS

log = logging.getLogger("walcrypt")

# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def recover(path, kek: K.KeyEncryptionKey, *, apply: bool = False, store_id: bytes | None = None,
            force: bool = False) -> dict:
    """Plan (and with ``apply=True`` carry out) the rebuild of ``path``'s ``meta/``; returns the report.

    Raises UsageError when there is nothing to recover (``meta/`` authenticates with this KEK;
    ``force=True`` rebuilds anyway), and, with ``apply=True``, a CorruptionError when the plan
    refuses (the report's ``refused`` says why; nothing is modified).  Never deletes a file: what is
    not adopted is renamed aside."""
    rep = run(path, kek, apply=apply, store_id=store_id, force=force)
    if apply and not rep.get("applied"):
        raise CorruptionError(rep["path"], None, "the rebuild is refused: " + "; ".join(
            rep["refused"] or ["no snapshot authenticates with this KEK"]),
            "nothing was modified; run 'walcrypt recover' without --apply for the full report")
    return rep


def run(path, kek: K.KeyEncryptionKey, *, apply: bool = False, store_id: bytes | None = None,
        force: bool = False) -> dict:
    """recover() without the exception for a refused plan: its report has ``applied`` False."""
    if not isinstance(kek, K.KeyEncryptionKey):
        raise UsageError("recover needs the store's key-encryption key (kek=KeyFile(...), RawKey(...), ...)")
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise UsageError(f"{path} does not exist or is not a directory")
    layout.check_not_held(path)          # this process has it open: its meta/ is in use, not lost
    layout.refuse_links(path)
    if not os.path.isdir(os.path.join(path, layout.WAL_ENCRYPTED)) and \
            not os.path.isdir(os.path.join(path, layout.SNAP_ENCRYPTED)):
        raise UsageError(f"{path} holds no encrypted segment or snapshot directory "
                         f"({layout.WAL_ENCRYPTED}/, {layout.SNAP_ENCRYPTED}/): nothing to recover from")
    if not apply:
        with SharedLock(path):
            hold = layout.ReadOnlyHold(path)
            try:
                return make_plan(path, kek, store_id, force).report()
            finally:
                hold.release()
    held: list = []
    try:
        lock = layout.DirLock(path, holder=held)
        plan = make_plan(path, kek, store_id, force)
        if not plan.ok:
            return plan.report() | {"applied": False}
        _apply(plan, kek, lock)
        held.clear()                       # the store opened by _apply released the lock
    finally:
        for h in held:
            h.release()
    return plan.report() | {"applied": True}




# ---------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------

def _manifest_record(seg: Segment) -> dict:
    sealed = seg.sealed and getattr(seg, "file_size", None) == seg.end_offset
    rec = {"state": fmt.SEG_SEALED if sealed else fmt.SEG_OPEN, "algorithm": seg.ident.algorithm,
           "dir_code": fmt.DIR_CODE_ENCRYPTED, "base_index": seg.base_index, "key_id": seg.ident.key_id}
    if sealed:
        rec.update(index_offset=seg.index_offset, end_offset=seg.end_offset, last_index=seg.last_index,
                   records=seg.seq, bytes=seg.bytes_written)
    return rec


def _free(vfs, path: str) -> str:
    aside, n = path + ASIDE, 1
    while vfs.exists(aside):
        aside = f"{path}{ASIDE}.{n}"
        n += 1
    return aside


def _apply(plan: Plan, kek, lock) -> None:
    vfs = DEFAULT_VFS
    root = plan.path
    tmp = os.path.join(root, TMP_META)
    vfs.rmtree(tmp)                       # a rebuild a crash interrupted: it was never switched in
    wrapper = kek.wrapper(plan.kek_params)
    store_id = plan.store_id
    assert store_id is not None           # only a plan that is ok (Plan.ok: it names the store) is applied
    active = active_key(plan)
    now = time.time_ns()
    meta = M.Meta(tmp)
    try:
        meta_entry, meta_secret = K.new_key_entry(wrapper, store_id, algorithm=0, purpose=K.PURPOSE_META,
                                                  state=K.ACTIVE)
        meta.set_mac_key(meta_secret.material, version=fmt.META_FORMAT_VERSION)
        c_index, c_term, reset = plan.compacted
        with meta.write() as w:
            w.put_raw(M.DB_STORE, M.K_STORE_ID, store_id)
            w.put_raw(M.DB_STORE, M.K_FORMAT_VERSION, bytes([fmt.META_FORMAT_VERSION]))
            w.put_raw(M.DB_STORE, M.K_ENCRYPTED, b"\x01")
            w.put_raw(M.DB_STORE, M.K_KEK_PARAMS, json.dumps(plan.kek_params).encode())
            cv = wrapper.check_value()
            if cv is not None:
                w.put_raw(M.DB_STORE, M.K_KEK_CHECK, cv)
            w.put_raw(M.DB_STORE, M.K_META_KEY_ID, meta_entry.key_id)
            w.put_raw(M.DB_STORE, M.K_META_KEY, meta_entry.wrapped)
            w.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(c_index, c_term, reset))
            for kid, (secret, entry) in sorted(plan.keys.items()):
                state = K.ACTIVE if kid == active else K.RETIRING
                wrapped = wrapper.wrap(secret, K.wrap_context(store_id, kid, K.PURPOSE_DEK))
                w.put(M.DB_KEYRING, kid, M.encode_keyring(K.KeyEntry(kid, state, entry["algorithm"], K.PURPOSE_DEK,
                                                                     entry["created_ns"], now, wrapped)))
                if kid == active:
                    w.put_raw(M.DB_STORE, M.K_ALGORITHM, bytes([entry["algorithm"]]))
            for seg in plan.segments:
                w.put(M.DB_SEGMENTS, M.u64(seg.seg_id), M.encode_manifest(_manifest_record(seg)))
            for s in plan.snapshots:
                w.put(M.DB_SNAPSHOTS, M.u64(s.snapshot_id),
                      encode_info(SnapshotInfo(s.snapshot_id, s.index, s.term, s.key_id, s.digest, s.size, s.path)))
            w.put(M.DB_STATE, M.K_NEXT_SEGMENT, plan.next_segment.to_bytes(8, "little"))
            w.put(M.DB_STATE, M.K_NEXT_SNAPSHOT, plan.next_snapshot.to_bytes(8, "little"))
            w.put(M.DB_STATE, M.K_CREATING, b"")
            w.put(M.DB_STATE, M.K_SNAP_CREATING, b"")
    finally:
        meta.close()
    vfs.fsync_dir(tmp)
    for seg in plan.segments:
        seg.close()
    # Files that were not adopted are renamed aside (never deleted), then meta/ is switched.
    dirs = set()
    for p, _reason in plan.aside:
        if vfs.exists(p):
            vfs.rename(p, _free(vfs, p))
            dirs.add(os.path.dirname(p))
    for d in sorted(dirs):
        vfs.fsync_dir(d)
    old = os.path.join(root, layout.META_DIR)
    if os.path.lexists(old):
        aside = os.path.join(root, f"{layout.META_DIR}.lost-{time.time_ns()}")
        vfs.rename(old, aside)
        plan.notes.append(f"the old meta/ was renamed {os.path.basename(aside)} (nothing was deleted)")
    vfs.rename(tmp, old)
    vfs.fsync_dir(root)
    # One read-write open finishes the job (seals recovered segments, cuts torn tails) and checks it.
    with Store(root, kek=kek, _dirlock=lock) as st:
        got = (st.first_index(), st.last_index(), tuple(st.initial_state()[0]))
        cur = st.snapshot()
    want = (plan.first_index, plan.last_index, plan.hard_state or (0, 0, 0))
    if got[:2] != want[:2] or (plan.hard_state and got[2] != want[2]) or cur is None \
            or cur.meta.index != plan.snapshots[-1].index:
        raise CorruptionError(root, None, f"the rebuilt store opens to log {got[0]}..{got[1]}, hard state {got[2]}; "
                              f"the plan said {want[0]}..{want[1]}, {want[2]}",
                              "report this; the old meta/ was kept aside")
