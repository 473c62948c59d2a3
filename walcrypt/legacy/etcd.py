"""etcd v3 member directories: import into an encrypted walcrypt store, export back to etcd.

``import_etcd(data_dir, member_dir=..., kek=...)`` reads ``member/wal/*.wal`` and ``member/snap/*.snap``
as etcd 3.4 does when it starts (the byte-level format is in :mod:`walcrypt.legacy.etcd_wal`, the
messages in :mod:`walcrypt.legacy.etcdpb`; the facts come from etcd v3.4.23's ``wal`` package,
``etcdserver/storage.go``, ``etcdserver/server.go`` and ``etcdserver/api/snap/snapshotter.go``;
formats/LEGACY.md, "etcd", states them) and applies etcd's own rules:

* the WAL files are read in sequence order with the rolling CRC checked across all of them; a torn
  tail at the end of the last file is cut (and reported), anything else that fails is a
  :class:`CorruptionError` naming the file and offset;
* the snapshot used is the newest ``.snap`` file whose CRC checks and parses *and* which the WAL
  records (a snapshot record with the same index and term, at or below the last hard state's
  commit index), as etcd 3.4.23's ``LoadNewestAvailable`` does; files failing that are skipped and
  reported (etcd renames them ``.broken``; the import never changes the source);
* the log is read from the last WAL file whose first index is at or below the snapshot's index:
  entries after the snapshot, a later entry with the same index replacing the earlier one and
  everything after it (a new leader's suffix); the last state record is the hard state; all
  metadata records must agree, and the snapshot must be recorded there (else etcd's
  ErrSnapshotNotFound / ErrSnapshotMismatch).

What the store holds (its "etcd flavour"; walcrypt's Entry has no type field and its ConfState no
joint configuration):

* each entry: ``Entry(index, term, data)`` where ``data`` is the WAL record's marshalled
  ``raftpb.Entry`` byte for byte (type, term, index and data inside);
* the hard state: ``HardState(term, vote, commit)`` as etcd's;
* the snapshot: ``SnapshotMeta(index, term, ConfState(voters, learners))`` with the data of etcd's
  ``raftpb.Snapshot`` (in etcd 3.4, the v2 store as JSON) and ``extra_meta["etcd"]``: the full
  ConfState (``voters_outgoing``, ``learners_next``, ``auto_leave``, and the marshalled bytes) and the
  name of the snap file it came from;
* stable values ``etcd/metadata`` (the WAL's marshalled ``etcdserverpb.Metadata``: NodeID,
  ClusterID) and ``etcd/import`` (JSON: what the store holds and where it came from).

etcd's v3 key-value database (``member/snap/db``, bbolt) is derived state, not imported: etcd
rebuilds it by replaying the WAL only when the log starts at index 1 (no snapshot).
``export_etcd`` therefore writes a member directory etcd starts from on its own when the store has
no snapshot; with one, etcd also needs the ``db`` file the snapshot belongs to (the export says so).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shlex
import shutil
import tempfile

from ..errors import CorruptionError, UsageError
from ..keys import KeyEncryptionKey
from ..storage import Store
from ..types import ConfState, Entry, HardState, SnapshotMeta
from . import etcd_wal as W
from . import etcdpb as pb

STABLE_METADATA = b"etcd/metadata"
STABLE_IMPORT = b"etcd/import"
FLAVOUR = "etcd-v3"
SAVE_BATCH_BYTES = 4 << 20


# ------------------------------------------------------------------------------------- reading
def member_paths(member_dir: str) -> tuple[str, str, str]:
    """(member dir, wal dir, snap dir) for an etcd member directory or the etcd data directory above it."""
    for cand in (os.path.join(member_dir, "member"), member_dir):
        if os.path.isdir(os.path.join(cand, "wal")):
            return cand, os.path.join(cand, "wal"), os.path.join(cand, "snap")
    raise UsageError(f"{member_dir} is not an etcd member directory: neither it nor {member_dir}/member has a "
                     "wal/ directory (give etcd's --data-dir or its member/ directory)")


def _entry_header(rec: W.Record) -> tuple[int, int, int]:
    try:
        e = pb.parse("raftpb.Entry", rec.data)
    except ValueError as exc:
        raise CorruptionError(rec.file, rec.offset, f"an entry record whose data is {exc}") from None
    return e.Index, e.Term, e.Type


def read_member(member_dir: str) -> dict:
    """Everything etcd 3.4 would start from, read from an etcd member directory (see the module doc)."""
    member, wal_dir, snap_dir = member_paths(member_dir)
    names = W.wal_names(wal_dir)
    if not names:
        raise UsageError(f"{wal_dir} holds no WAL files (%016x-%016x.wal)")
    for (s1, _i1, n1), (s2, _i2, n2) in zip(names, names[1:]):
        if s2 != s1 + 1:
            raise CorruptionError(os.path.join(wal_dir, n2), None, f"WAL file sequence numbers jump from {s1} ({n1}) "
                                  f"to {s2}: a WAL file is missing")
    records: list[W.Record] = []
    file_start: list[int] = []           # index into records where each file's records begin
    crc, torn = 0, None
    for k, (_seq, _index, name) in enumerate(names):
        file_start.append(len(records))
        recs, crc, torn = W.read_wal_file(os.path.join(wal_dir, name), crc, last=k == len(names) - 1)
        records.extend(recs)
    for rec in records:
        if rec.type not in W.TYPE_NAMES:
            raise CorruptionError(rec.file, rec.offset, f"a record of unknown type {rec.type}")

    # etcd's ValidSnapshotEntries: the snapshot records at or below the last hard state's commit.
    last_state = pb.cls("raftpb.HardState")()
    wal_snaps = []
    for rec in records:
        if rec.type == W.STATE:
            last_state = _parse(rec, "raftpb.HardState")
        elif rec.type == W.SNAPSHOT:
            s = _parse(rec, "walpb.Snapshot")
            wal_snaps.append((s.index, s.term))
    valid = {(i, t) for i, t in wal_snaps if i <= last_state.commit}

    snapshot, skipped = None, []
    for name in W.snap_names(snap_dir):
        path = os.path.join(snap_dir, name)
        try:
            raw, snap = W.read_snap_file(path)
        except CorruptionError as exc:
            skipped.append({"file": path, "reason": exc.detail})
            continue
        key = (snap.metadata.index, snap.metadata.term)
        if key not in valid:
            skipped.append({"file": path, "reason": f"index {key[0]} term {key[1]} is not a snapshot the WAL "
                                                    f"records at or below its commit index {last_state.commit}"})
            continue
        snapshot = {"file": path, "raw": raw, "msg": snap}
        break
    start_index, start_term = ((snapshot["msg"].metadata.index, snapshot["msg"].metadata.term) if snapshot
                               else (0, 0))

    # etcd's ReadAll, from the last file whose first index is at or below the snapshot's.
    first = max(k for k, (_s, idx, _n) in enumerate(names) if idx <= start_index) \
        if any(idx <= start_index for _s, idx, _n in names) else None
    if first is None:
        raise CorruptionError(os.path.join(wal_dir, names[0][2]), None, f"no WAL file starts at or below the "
                              f"snapshot index {start_index}: the WAL does not reach back to the snapshot")
    metadata, state, match = None, pb.cls("raftpb.HardState")(), False
    ents: list[tuple[int, int, int, bytes]] = []
    for rec in records[file_start[first]:]:
        if rec.type == W.ENTRY:
            index, term, etype = _entry_header(rec)
            if index > start_index:
                up = index - start_index - 1
                if up > len(ents):
                    raise CorruptionError(rec.file, rec.offset, f"entry {index} follows entry "
                                          f"{start_index + len(ents)}: a gap in the log")
                del ents[up:]
                ents.append((index, term, etype, rec.data))
        elif rec.type == W.STATE:
            state = _parse(rec, "raftpb.HardState")
        elif rec.type == W.METADATA:
            if metadata is not None and rec.data != metadata:
                raise CorruptionError(rec.file, rec.offset, "a metadata record that differs from the first one")
            metadata = rec.data
        elif rec.type == W.SNAPSHOT:
            s = _parse(rec, "walpb.Snapshot")
            if s.index == start_index:
                if s.term != start_term:
                    raise CorruptionError(rec.file, rec.offset, f"the WAL's snapshot record at index {s.index} has "
                                          f"term {s.term}, the snapshot term {start_term}")
                match = True
    if not match:
        raise CorruptionError(os.path.join(wal_dir, names[first][2]), None,
                              f"the WAL records no snapshot at index {start_index} term {start_term}")
    if metadata is None:
        raise CorruptionError(os.path.join(wal_dir, names[first][2]), None, "the WAL holds no metadata record")
    md = _parse(W.Record(os.path.join(wal_dir, names[first][2]), 0, W.METADATA, metadata), "etcdserverpb.Metadata")
    top = ents[-1][0] if ents else start_index
    if state.commit > top:
        # etcd's raft refuses to start on it ("tocommit is out of range"): a commit index can only
        # run past the log when entries were lost, which no torn tail explains (each Save writes its
        # entries before the hard state that commits them)
        raise CorruptionError(os.path.join(wal_dir, names[-1][2]), None,
                              f"the WAL's hard state commits index {state.commit}, but its log ends at {top}: "
                              "entries the cluster committed are missing",
                              "import a complete member directory (another member's, or a backup)")
    return {"member_dir": member, "wal_files": [os.path.join(wal_dir, n) for _s, _i, n in names],
            "read_from": os.path.join(wal_dir, names[first][2]), "metadata": metadata,
            "node_id": md.NodeID, "cluster_id": md.ClusterID, "hard_state": state, "entries": ents,
            "snapshot": snapshot, "skipped_snapshots": skipped, "torn": torn}


def _parse(rec: W.Record, name: str):
    try:
        return pb.parse(name, rec.data)
    except ValueError as exc:
        raise CorruptionError(rec.file, rec.offset, f"a {W.TYPE_NAMES[rec.type]} record whose data is {exc}") from None


def conf_state_doc(cs) -> dict:
    """A raftpb.ConfState as JSON-able values (with its marshalled bytes, base64)."""
    return {"voters": list(cs.voters), "learners": list(cs.learners), "voters_outgoing": list(cs.voters_outgoing),
            "learners_next": list(cs.learners_next), "auto_leave": bool(cs.auto_leave),
            "raw": base64.b64encode(cs.SerializeToString()).decode()}


# ------------------------------------------------------------------------------------- import
def _staging(target: str, what: str) -> tuple[str, str]:
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    if os.path.lexists(target) and (not os.path.isdir(target) or os.path.islink(target) or os.listdir(target)):
        raise UsageError(f"{target} exists and is not an empty directory; {what} only into a new or empty directory")
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} does not exist; create it first")
    return parent, tempfile.mkdtemp(prefix="." + os.path.basename(target) + f".{what}-", dir=parent)


def _publish(staging: str, target: str, parent: str, what: str) -> None:
    try:
        os.rename(staging, target)          # onto a missing or empty directory only (rename(2))
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise UsageError(f"{target} was created and filled while the {what} ran; nothing there was changed "
                             "and the result was discarded") from None
        raise
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def import_etcd(data_dir: str, *, member_dir: str, kek, **open_options) -> dict:
    """Import an etcd v3 member directory into a new encrypted store at ``data_dir`` (missing or
    empty).  Built in a private directory beside it and renamed into place: on any error nothing
    is left behind.  The source is only read.  Returns a report (dict)."""
    if not isinstance(kek, KeyEncryptionKey):
        raise UsageError("import_etcd needs kek= (RawKey, KeyFile, Passphrase, EnvKey, Kms): the store is encrypted")
    if open_options.get("encrypted") is False or open_options.get("read_only"):
        raise UsageError("import_etcd writes an encrypted store: encrypted=False and read_only are not accepted")
    src = read_member(member_dir)
    snap = src["snapshot"]
    hs = src["hard_state"]
    parent, staging = _staging(data_dir, "import")
    try:
        with Store(staging, kek=kek, **open_options) as st:
            if snap is not None:
                md = snap["msg"].metadata
                meta = SnapshotMeta(md.index, md.term, ConfState(tuple(md.conf_state.voters),
                                                                 tuple(md.conf_state.learners)))
                w = st.begin_snapshot(meta, extra_meta={"etcd": {
                    "conf_state": conf_state_doc(md.conf_state), "snap_file": os.path.basename(snap["file"])}})
                try:
                    w.write(snap["msg"].data)
                except BaseException:
                    w.abort()
                    raise
                w.commit()
            batch, size = [], 0
            for index, term, _t, data in src["entries"]:
                batch.append(Entry(index, term, data))
                size += len(data)
                if size >= SAVE_BATCH_BYTES:
                    st.save(entries=batch)
                    batch, size = [], 0
            st.save(hard_state=HardState(hs.term, hs.vote, hs.commit), entries=batch)
            st.stable_set(STABLE_METADATA, src["metadata"])
            st.stable_set(STABLE_IMPORT, json.dumps({
                "flavour": FLAVOUR, "entry_data": "raftpb.Entry", "snapshot_data": "raftpb.Snapshot.data",
                "node_id": src["node_id"], "cluster_id": src["cluster_id"], "source": src["member_dir"],
                "snap_file": os.path.basename(snap["file"]) if snap else None}).encode())
            report = _report(src, st)
        _publish(staging, os.path.abspath(data_dir), parent, "import")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report["data_dir"] = data_dir
    return report


def _report(src: dict, st) -> dict:
    ents, snap, hs = src["entries"], src["snapshot"], src["hard_state"]
    torn = src["torn"]
    return {
        "member_dir": src["member_dir"], "wal_files": len(src["wal_files"]), "read_from": src["read_from"],
        "node_id": f"{src['node_id']:x}", "cluster_id": f"{src['cluster_id']:x}",
        "entries": len(ents), "first_index": ents[0][0] if ents else None, "last_index": ents[-1][0] if ents else None,
        "conf_change_entries": sum(1 for e in ents if e[2] != 0),
        "hard_state": {"term": hs.term, "vote": hs.vote, "commit": hs.commit},
        "snapshot": None if snap is None else {"file": snap["file"], "index": snap["msg"].metadata.index,
                                               "term": snap["msg"].metadata.term, "bytes": len(snap["msg"].data)},
        "skipped_snapshots": src["skipped_snapshots"],
        "torn_tail": None if torn is None else {"file": torn.file, "offset": torn.offset, "bytes_cut": torn.cut,
                                                "reason": torn.reason},
        "not_imported": "member/snap/db (etcd's v3 key-value database; derived from the log)",
        "encrypted": True,
    }


# ------------------------------------------------------------------------------------- export
def export_etcd(data_dir: str, *, member_dir: str, kek) -> dict:
    """Write the store at ``data_dir`` (imported from etcd) as a new etcd v3 member directory
    ``member_dir`` (missing or empty; ``wal/`` and ``snap/`` inside; etcd's ``--data-dir`` is its
    parent when it is named ``member``).  The WAL is one file, ``0000000000000000-0000000000000000.wal``:
    crc, metadata, the empty snapshot record, the snapshot's record (if any), the entries, the hard
    state, with the rolling CRC.  The output is decrypted: plaintext, as etcd keeps it (files 0600)."""
    made_parent = None
    target = os.path.abspath(member_dir)
    if os.path.basename(target) == "member" and not os.path.lexists(os.path.dirname(target)) \
            and os.path.isdir(os.path.dirname(os.path.dirname(target))):
        made_parent = os.path.dirname(target)            # etcd's --data-dir: made here, removed on failure
        os.mkdir(made_parent, 0o700)
    try:
        parent, staging = _staging(member_dir, "export")
    except BaseException:
        if made_parent:
            os.rmdir(made_parent)
        raise
    try:
        with Store(data_dir, kek=kek, read_only=True) as st:
            marker = st.stable_get(STABLE_IMPORT)
            metadata = st.stable_get(STABLE_METADATA)
            if marker is None or metadata is None or json.loads(marker).get("flavour") != FLAVOUR:
                raise UsageError(f"{data_dir} was not imported from etcd (no etcd/import and etcd/metadata stable "
                                 "values): its entries are not etcd's raftpb.Entry records")
            hs, _cs = st.initial_state()
            snap = st.snapshot()
            first, last = st.first_index(), st.last_index()
            wal_dir, snap_dir = os.path.join(staging, "wal"), os.path.join(staging, "snap")
            os.mkdir(wal_dir, 0o700)
            os.mkdir(snap_dir, 0o700)
            crc, frames = 0, []
            for rec_type, data in ((W.CRC, None), (W.METADATA, metadata), (W.SNAPSHOT, pb.marshal("walpb.Snapshot"))):
                b, crc = W.frame(rec_type, data, crc)
                frames.append(b)
            snap_info = None
            if snap is not None:
                m = snap.meta
                if first != m.index + 1:
                    raise UsageError(f"the store's log starts at {first}, not right after its snapshot at {m.index}")
                raw = _snapshot_bytes(snap)
                name = W.snap_name(m.term, m.index)
                _write_new(os.path.join(snap_dir, name), [W.snap_file_bytes(raw)])
                b, crc = W.frame(W.SNAPSHOT, pb.marshal("walpb.Snapshot", index=m.index, term=m.term), crc)
                frames.append(b)
                snap_info = {"file": name, "index": m.index, "term": m.term, "bytes": snap.size}
            elif first != 1:
                raise UsageError(f"the store's log starts at {first} and it has no snapshot: etcd needs the log from 1 "
                                 "(save a snapshot in the store first, or export from a store that was not compacted)")
            top = last if last >= first else (snap.meta.index if snap is not None else 0)
            if hs.commit > top:
                raise UsageError(f"the store's hard state commits index {hs.commit} but its log ends at {top}: etcd "
                                 "would refuse to start on it")
            n = 0
            wal_path = os.path.join(wal_dir, W.wal_name(0, 0))
            with _NewFile(wal_path) as out:
                for b in frames:
                    out.write(b)
                lo = first
                while lo <= last:
                    batch = st.entries(lo, last + 1, max_size=SAVE_BATCH_BYTES)
                    for e in batch:
                        index, term, _t = _entry_header(W.Record(data_dir, None, W.ENTRY, e.data))
                        if (index, term) != (e.index, e.term):
                            raise UsageError(f"entry {e.index} (term {e.term}) of {data_dir} holds a raftpb.Entry "
                                             f"for index {index} term {term}: not written by an etcd import")
                        b, crc = W.frame(W.ENTRY, e.data, crc)
                        out.write(b)
                        n += 1
                    lo += len(batch)
                b, crc = W.frame(W.STATE, pb.marshal("raftpb.HardState", term=hs.term, vote=hs.vote,
                                                     commit=hs.commit), crc)
                out.write(b)
            md = pb.parse("etcdserverpb.Metadata", metadata)
        _fsync_dir(wal_dir)
        _fsync_dir(snap_dir)
        _fsync_dir(staging)
        _publish(staging, target, parent, "export")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made_parent:
            try:
                os.rmdir(made_parent)        # only if still empty: what appeared there meanwhile is not ours
            except OSError:
                pass
        raise
    return {"member_dir": member_dir, "wal_file": os.path.join(member_dir, "wal", W.wal_name(0, 0)), "entries": n,
            "first_index": first if n else None, "last_index": last if n else None,
            "hard_state": {"term": hs.term, "vote": hs.vote, "commit": hs.commit}, "snapshot": snap_info,
            "node_id": f"{md.NodeID:x}", "cluster_id": f"{md.ClusterID:x}",
            "etcd_data_dir": os.path.dirname(target) if os.path.basename(target) == "member" else None,
            "needs_backend_db": snap_info is not None,
            "plaintext": True}


def _snapshot_bytes(snap) -> bytes:
    """The marshalled raftpb.Snapshot for a store snapshot: its conf state from extra_meta["etcd"] (the
    marshalled bytes when they still say what walcrypt's ConfState says), else from the ConfState."""
    m = snap.meta
    doc = (snap.file.extra or {}).get("etcd") or {}
    cs_doc = doc.get("conf_state") or {}
    conf: bytes | dict[str, list[int]] | None = None
    if isinstance(cs_doc.get("raw"), str):
        try:
            raw = base64.b64decode(cs_doc["raw"], validate=True)
            cs = pb.parse("raftpb.ConfState", raw)
            if (tuple(cs.voters), tuple(cs.learners)) == (tuple(m.conf_state.voters), tuple(m.conf_state.learners)):
                conf = raw
        except ValueError:
            conf = None
    if conf is None:
        conf = {"voters": [int(v) for v in m.conf_state.voters], "learners": [int(v) for v in m.conf_state.learners]}
    return pb.marshal("raftpb.Snapshot", data=snap.data,
                      metadata={"conf_state": conf, "index": m.index, "term": m.term})


class _NewFile:
    """A file created in the export's own staging directory: exclusive, no link followed, 0600, fsynced."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                          | getattr(os, "O_CLOEXEC", 0), 0o600)

    def write(self, b: bytes) -> None:
        view = memoryview(b)
        while view:
            view = view[os.write(self.fd, view):]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is None:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _write_new(path: str, chunks) -> None:
    with _NewFile(path) as f:
        for c in chunks:
            f.write(c)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- detect
def detect(path: str) -> list[dict]:
    """An etcd data directory, member directory or WAL directory at ``path``: recognised by its file
    names and a bounded read of the first WAL file's first two records (crc, metadata)."""
    findings = []
    for member in (os.path.join(path, "member"), path):
        wal_dir = os.path.join(member, "wal")
        if not os.path.isdir(wal_dir):
            continue
        try:
            names = W.wal_names(wal_dir)
        except OSError:
            continue
        if not names:
            continue
        snaps = W.snap_names(os.path.join(member, "snap"))
        first = os.path.join(wal_dir, names[0][2])
        try:
            recs, _crc, _torn = _first_records(first)
            md = next((pb.parse("etcdserverpb.Metadata", r.data) for r in recs if r.type == W.METADATA), None)
            ids = (f"member ID {md.NodeID:x}, cluster ID {md.ClusterID:x}" if md is not None
                   else "no metadata record in its first WAL file")
        except Exception as exc:  # noqa: BLE001 - detection reports, it never fails
            ids = f"its first WAL record does not read ({exc})"
        findings.append({
            "kind": "etcd",
            "paths": [member],
            "detail": f"an etcd v3 member directory: {len(names)} WAL file(s), {len(snaps)} snap file(s); {ids}",
            "command": f"walcrypt import etcd NEW_DATA_DIR --member-dir {shlex.quote(member)} --key-file KEK",
        })
        break
    return findings


def _first_records(path: str):
    """The first two records of a WAL file, reading at most 64 KiB of it."""
    fd = W.open_source(path)
    try:
        head = os.pread(fd, 64 << 10, 0)
    finally:
        os.close(fd)
    return W.scan(head, path, 0, last=True, limit=2)
