"""What ``walcrypt inspect`` shows: a store's metadata without any key, and more with one.

Without a key nothing is authenticated: the LMDB environment is opened read-only (registered
in its reader table, so a running writer never reuses a page being read; see walcrypt.meta)
and read in one short transaction, the ``LOCK`` flock is not taken, segment and
snapshot headers are parsed with ``walcrypt.segment.decode_header`` and
``SnapshotHeader.decode``, and the clear frame headers of unsealed segments (index, term,
type and CRC are readable without a key) give their index range.  With a key (or for a
plaintext store, whose MACs are keyless) the store is also opened read-only through the
engine, which verifies every MAC, reads the sealed indexes, scans the unsealed tails and
yields the hard state and the first and last index; the report says per segment which of
these it did (``checked``).  Both work on a running store (walcrypt.online).

Nothing here writes to the data directory.  Key material is never read into the
report: the keyring shows IDs, purposes and states only.

The module is named ``inspection`` rather than ``inspect`` so that running a file from
inside the package directory can never shadow the standard library's ``inspect``.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import stat
import time

from crc32c import crc32c

from . import bounded, crypto, layout, online
from . import format as fmt
from . import keys as K
from . import meta as M
from .errors import (
    CorruptionError,
    KeyProviderError,
    LockedError,
    StorageError,
    UsageError,
    WalcryptError,
    WrongKeyError,
)
from .vfs import DEFAULT_VFS, own_file, refuse_link

ROTATION_STUCK_AFTER_S = 3600
_MAX_STATE_JSON = 64 << 10          # a rotation or migration record is a few hundred bytes
EXPORT_MAGIC = b"WCRYPEXP"
DIRECTORIES = (
    (layout.META_DIR, "metadata (LMDB)"),
    (layout.WAL_ENCRYPTED, "encrypted segments"),
    (layout.SNAP_ENCRYPTED, "encrypted snapshots"),
    (layout.WAL_PLAIN, "legacy plaintext segments"),
    (layout.SNAP_PLAIN, "legacy plaintext snapshots"),
    (".migrate-wal", "migration in progress (temporary)"),
    (".migrate-snap", "migration in progress (temporary)"),
)
PURPOSES = {K.PURPOSE_DEK: "dek", K.PURPOSE_META: "metadata"}


# ---------------------------------------------------------------------------
# Preconditions and the process lock
# ---------------------------------------------------------------------------

# Names walcrypt creates directly inside a data directory.  A directory holding none of them is not a data
# directory; one holding some of them but lacking its metadata is a damaged one.
WALCRYPT_NAMES = (layout.LOCK_NAME, layout.META_DIR, layout.WAL_ENCRYPTED, layout.SNAP_ENCRYPTED, layout.WAL_PLAIN,
                  layout.SNAP_PLAIN, ".migrate-wal", ".migrate-snap")

NEW_STORE_HINT = ("if it is a new store whose creation was interrupted, nothing was stored in it yet: remove the "
                  "directory and run 'walcrypt init' again (or let the node create it); if it held data, its files "
                  "were deleted: restore the node from a backup export or wipe it and let Raft re-replicate it")


def _what_is_here(path: str) -> str:
    """The walcrypt files present in a data directory, for messages ("8 segment files in wal-v1-encrypted/")."""
    parts = []
    for d, what in ((layout.WAL_ENCRYPTED, "segment"), (layout.SNAP_ENCRYPTED, "snapshot"),
                    (layout.WAL_PLAIN, "segment"), (layout.SNAP_PLAIN, "snapshot")):
        p = os.path.join(path, d)
        if os.path.isdir(p) and not os.path.islink(p):
            n = sum(1 for x in os.listdir(p) if not x.startswith("."))
            parts.append(f"{n} {what} file{'s' if n != 1 else ''} in {d}/")
    if not parts:
        parts = [n + ("/" if os.path.isdir(os.path.join(path, n)) else "") for n in WALCRYPT_NAMES
                 if os.path.lexists(os.path.join(path, n))]
    return ", ".join(parts)


def require_store(directory: str) -> str:
    """The absolute path of an existing store directory.

    A UsageError for what the operator named wrongly (no such directory, not a directory, no permission,
    a directory holding no walcrypt files at all); a CorruptionError for a walcrypt data directory whose
    metadata is missing (no meta/, no meta/data.mdb): that is damage, not a wrong argument."""
    path = os.path.abspath(os.fspath(directory))
    if not os.path.exists(path):
        raise UsageError(f"{directory} does not exist; give the data directory of a walcrypt store")
    if not os.path.isdir(path):
        raise UsageError(f"{directory} is not a directory; give the data directory of a walcrypt store")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"no permission to read {directory}; run as the user that owns the store")
    layout.refuse_links(path)
    names = os.listdir(path)
    if not any(n in WALCRYPT_NAMES for n in names):
        below = [n for n in names if n.endswith((".wal", ".snap"))]
        raise UsageError(f"{directory} is not a walcrypt data directory (it holds none of meta/, "
                         f"{layout.WAL_ENCRYPTED}/, {layout.SNAP_ENCRYPTED}/, {layout.WAL_PLAIN}/, {layout.SNAP_PLAIN}/"
                         ", LOCK)" + ("; it holds segment or snapshot files: give the data directory above it"
                                      if below else ""))
    meta = os.path.join(path, layout.META_DIR)
    if not os.path.isdir(meta):
        what = "a file stands where its metadata directory meta/ belongs" if os.path.lexists(meta) else \
            "its metadata directory meta/ is missing"
        if layout.data_files(path):
            raise layout.metadata_lost(meta, f"{directory} is a damaged walcrypt data directory: {what}",
                                _what_is_here(path))
        raise CorruptionError(meta, None, f"{directory} is a walcrypt data directory ({_what_is_here(path)}) but "
                              f"{what} and it holds no data", NEW_STORE_HINT)
    for n in sorted(os.listdir(meta)):
        refuse_link(os.path.join(meta, n))
    if not os.access(meta, os.R_OK | os.X_OK) or not all(
            os.access(os.path.join(meta, n), os.R_OK) for n in os.listdir(meta)):
        raise UsageError(f"no permission to read {meta}; run as the user that owns the store")
    if not os.path.isfile(os.path.join(meta, "data.mdb")):
        what = "its metadata database meta/data.mdb is missing"
        if layout.data_files(path):
            raise layout.metadata_lost(os.path.join(meta, "data.mdb"),
                                f"{directory} is a damaged walcrypt data directory: {what}", _what_is_here(path))
        raise CorruptionError(os.path.join(meta, "data.mdb"), None, f"{directory} is a walcrypt data directory "
                              f"but {what} and it holds no data", NEW_STORE_HINT)
    return path


def open_meta(root: str, directory: str) -> M.Meta:
    """The metadata database, read-only and without its lock file.  LMDB's errors arrive translated
    (meta.lmdb_error): a damaged database is a CorruptionError saying what to do."""
    return M.Meta(os.path.join(root, layout.META_DIR), readonly=True)


def store_record(r, root: str, directory: str) -> tuple[bytes, bool]:
    """(store ID, encrypted) from the store record, read without a key (it is not MAC'd).  A missing or
    damaged record is damage: beside existing data, meta/ was lost or replaced; without any, the
    store's creation never committed."""
    store_id = r.raw(M.DB_STORE, M.K_STORE_ID)
    enc = r.raw(M.DB_STORE, M.K_ENCRYPTED)
    meta_path = os.path.join(root, layout.META_DIR)
    if store_id is None and enc is None:
        if layout.pairs_with_data(root):
            raise layout.metadata_lost(meta_path, f"the metadata of {directory} holds no store record")
        raise CorruptionError(meta_path, None, f"the metadata of {directory} holds no store record and there is "
                              "no data: the store's creation did not commit", NEW_STORE_HINT)
    if store_id is None or len(store_id) != fmt.STORE_ID_SIZE or enc not in (b"\x00", b"\x01"):
        raise CorruptionError(meta_path, None, f"the store identity record of {directory} is damaged (store ID "
                              "or mode)", M.DAMAGED_HINT)
    return store_id, enc == b"\x01"


def read_mode(root: str, directory: str) -> bool:
    """True for an encrypted store, False for a plaintext one (CorruptionError when the record is missing)."""
    meta = open_meta(root, directory)
    try:
        with meta.read() as r:
            return store_record(r, root, directory)[1]
    finally:
        meta.close()


def lock_holders(root: str) -> list[int] | None:
    """PIDs holding a flock on ``root/LOCK`` according to /proc/locks (no lock is taken).

    [] when nobody holds it, None when it cannot be told (no /proc/locks)."""
    return layout.flock_holders(root)


def locked_message(root: str, pids: list[int] | None) -> str:
    who = f"process {', '.join(map(str, pids))}" if pids else "another process"
    return (f"{root} is in use by {who} (it holds {os.path.join(root, layout.LOCK_NAME)}); stop it first "
            "('walcrypt inspect' works on a running store)")


class SharedLock:
    """A shared flock on DATA/LOCK for read-only commands: refuses a store a writer holds, and keeps a
    writer from opening it meanwhile.  Writes nothing (and does not create LOCK when it is absent)."""

    def __init__(self, root: str, display: str | None = None):
        self.root = root
        self.display = display or root
        self.fd: int | None = None

    def __enter__(self) -> "SharedLock":
        path = os.path.join(self.root, layout.LOCK_NAME)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return self
        except PermissionError:
            raise UsageError(f"no permission to read {path}; run as the user that owns the store") from None
        except OSError:
            refuse_link(path)
            raise
        try:
            own_file(self.fd, path, exclusive=False)       # never a FIFO or device
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockedError(locked_message(self.display, lock_holders(self.root))) from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)       # closing the descriptor releases the flock
            self.fd = None


# ---------------------------------------------------------------------------
# Keyless reading
# ---------------------------------------------------------------------------

def alg_name(alg: int) -> str:
    try:
        return crypto.suite(alg).name
    except WalcryptError:
        return f"unknown({alg})"


def _ns_iso(ns: int | None) -> str | None:
    if not ns:
        return None
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dir_summary(root: str) -> list[dict]:
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
        return _scan_frame_headers(bounded.FileSource(DEFAULT_VFS, fd), window)
    finally:
        DEFAULT_VFS.close(fd)


def _scan_frame_headers(src: bounded.Source, window: int) -> dict:
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


def _find_exports(root: str) -> list[tuple[str, bool]]:
    """Export files (WCRYPEXP) anywhere under the data directory: (path, KEK embedded)."""
    from .backup import ExportFile
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


def inspect_store(directory: str, kek: K.KeyEncryptionKey | None = None, *,
                  key_file: str | None = None) -> dict:
    """The inspection report of a store (see the module doc).  Writes nothing (but the reader slot
    LMDB keeps in meta/lock.mdb).

    On a running store the metadata is read in one short transaction and the files it names are
    looked at right after; a file found gone is looked up in a fresh read: when its record is gone
    too, the writer removed it meanwhile and the store is read again (bounded), then it is left out
    with a note; when the record is still there, the file is missing (an error)."""
    root = require_store(directory)
    live = online.writer_active(root)
    for attempt in range(online.ATTEMPTS):
        rep, warnings, errors, gone, encrypted = _keyless(root, directory, key_file, live)
        if not gone:
            break
        named = _still_named(root, gone)
        if not named and attempt + 1 < online.ATTEMPTS:
            continue                     # removed by the running writer meanwhile: read the store again
        for kind, ident, path in gone:
            table = "segments" if kind == "segment" else "snapshots"
            if (kind, ident) in named:
                where = "the manifest" if kind == "segment" else "the registry"
                errors.append(f"{kind} {ident} listed in {where} is missing: {path}")
            else:
                rep[table] = [r for r in rep[table] if r["id"] != ident]
                rep["notes"].append(f"{kind} {ident} was removed by the running writer while the store was read; "
                                    "left out")
        break

    # -- with a key: the engine's authenticated view -------------------------------------
    if encrypted and kek is None:
        rep["note"] = ("metadata only, nothing authenticated: give a key (--key-file, --key-env, "
                       "--passphrase-env or --kms) to verify MACs and read the hard state")
    else:
        _authenticated(root, kek if encrypted else None, encrypted, rep, errors, live)

    rep["warnings"] = warnings
    rep["errors"] = errors
    return rep


def _still_named(root: str, gone: list[tuple[str, int, str]]) -> set[tuple[str, int]]:
    """Which of the ``gone`` files a fresh read of the metadata still names (unauthenticated, like
    everything inspect reads without a key)."""
    try:
        live, copy = online.frozen(os.path.join(root, layout.META_DIR))
    except WalcryptError:
        return {(kind, ident) for kind, ident, _p in gone}
    live.close()
    ids = {"segment": copy.ids(M.DB_SEGMENTS), "snapshot": copy.ids(M.DB_SNAPSHOTS)}
    return {(kind, ident) for kind, ident, _p in gone if ident in ids[kind]}


def _keyless(root: str, directory: str, key_file: str | None, live: bool):
    """The keyless part of the report -> (report, warnings, errors, gone, encrypted); ``gone`` lists the
    files the metadata names that were not there: (kind, ID, path)."""
    warnings: list[str] = []
    errors: list[str] = []
    gone: list[tuple[str, int, str]] = []
    holders = lock_holders(root)
    rep: dict = {"path": root, "notes": []}

    # -- keyless metadata ------------------------------------------------------
    meta = open_meta(root, directory)
    try:
        with meta.read() as r:
            store_id, encrypted = store_record(r, root, directory)
            version = r.raw(M.DB_STORE, M.K_FORMAT_VERSION)
            alg = r.raw(M.DB_STORE, M.K_ALGORITHM)
            raw_params = r.raw(M.DB_STORE, M.K_KEK_PARAMS)
            kek_check = r.raw(M.DB_STORE, M.K_KEK_CHECK)
            meta_key_id = r.raw(M.DB_STORE, M.K_META_KEY_ID)
            keyring = r.items(M.DB_KEYRING, verify=False)
            manifest = r.items(M.DB_SEGMENTS, verify=False)
            registry = r.items(M.DB_SNAPSHOTS, verify=False)
            state = {k: r.get(M.DB_STATE, k, verify=False)
                     for k in (M.K_COMPACTED, M.K_NEXT_SEGMENT, M.K_NEXT_SNAPSHOT, M.K_ROTATION, M.K_MIGRATION)}
            stable_keys = len(r.raw_items(M.DB_STABLE))
    finally:
        meta.close()

    params = None
    if encrypted:
        try:
            params = K.parse_kek_params(raw_params, meta.path)
        except StorageError as exc:
            errors.append(str(exc))
        if params and params["kind"] == "passphrase":
            problem = K.check_scrypt_costs(params["n"], params["r"], params["p"])
            if problem:
                warnings.append(f"store/kek_params: {problem}; a passphrase opens this store only with "
                                "Passphrase(..., max_memory=...) raised (were the parameters edited?)")
    rep.update({
        "format_version": version[0] if version else None,
        "store_id": store_id.hex(),
        "mode": "encrypted" if encrypted else "plaintext",
        "algorithm": alg_name(alg[0]) if alg else None,
        "kek": _kek_summary(params, kek_check) if encrypted else None,
        "lock": {"held": None if holders is None else bool(holders), "pids": holders or []},
        "authenticated": False,
        "directories": _dir_summary(root),
    })
    if version is None or len(version) != 1 or version[0] not in fmt.META_FORMAT_VERSIONS_READ:
        errors.append(f"metadata format version {version[0] if version else '?'} is not one this walcrypt reads "
                      f"({', '.join(map(str, fmt.META_FORMAT_VERSIONS_READ))}); upgrade walcrypt")
    if holders:
        warnings.append(f"the store is in use by process {', '.join(map(str, holders))}: what follows is the "
                        "store as of one moment (one read of its metadata), and it changes as the process runs")

    try:
        c_index, c_term, reset = M.decode_compacted(state[M.K_COMPACTED], meta.path)
    except StorageError:
        c_index = c_term = reset = None
        errors.append("the compaction point record is missing or damaged")
    next_seg = state[M.K_NEXT_SEGMENT]
    next_snap = state[M.K_NEXT_SNAPSHOT]
    rep["log"] = {
        "first_index": None if c_index is None else c_index + 1,
        "last_index": None,
        "compacted_index": c_index, "compacted_term": c_term, "reset_segment": reset or 0,
        "next_segment": int.from_bytes(next_seg, "little") if next_seg else None,
        "next_snapshot": int.from_bytes(next_snap, "little") if next_snap else 1,
        "hard_state": None, "conf_state": None, "stable_keys": stable_keys,
    }

    # -- segments ---------------------------------------------------------------
    segs = []
    from .segment import decode_header, segment_file_name
    newest = max((k for k, _v in manifest), default=None)          # the one a running writer appends to
    for k, v in manifest:
        seg_id = int.from_bytes(k, "big")
        try:
            rec = M.decode_manifest(v, meta.path)
        except StorageError as exc:
            errors.append(f"manifest record of segment {seg_id}: {exc}")
            continue
        d = layout.WAL_ENCRYPTED if rec["dir_code"] == fmt.DIR_CODE_ENCRYPTED else layout.WAL_PLAIN
        name = segment_file_name(seg_id, rec["base_index"])
        path = os.path.join(root, d, name)
        sealed = rec["state"] == fmt.SEG_SEALED
        row = {"id": seg_id, "file": f"{d}/{name}", "first_index": rec["base_index"],
               "last_index": rec["last_index"] if sealed else None, "key_id": rec["key_id"].hex(),
               "algorithm": alg_name(rec["algorithm"]), "sealed": sealed, "size": None, "tail": None}
        try:
            row["size"] = os.path.getsize(path)
            with open(path, "rb") as f:
                h = decode_header(f.read(fmt.SEGMENT_HEADER_SIZE), path)
            if (h.segment_id, h.base_index, h.key_id, h.store_id) != (seg_id, rec["base_index"], rec["key_id"],
                                                                        store_id):
                errors.append(f"{path}: the segment header disagrees with the manifest")
            if not sealed:
                scan = scan_frame_headers(path)
                row["last_index"] = scan["last_index"]
                row["tail"] = scan["tail"]
                if scan["tail"] != "clean" and live and k == newest:
                    rep["notes"].append(f"{row['file']}: the running writer appends to it; {scan['tail']} may be "
                                        f"a write in progress (its last commit ends at offset "
                                        f"{scan['committed_end']})")
                elif scan["tail"] != "clean":
                    warnings.append(f"{row['file']}: {scan['tail']} (a torn tail from a crash, or damage: "
                                    "'walcrypt verify' tells; 'walcrypt repair' truncates a torn tail)")
        except FileNotFoundError:
            gone.append(("segment", seg_id, path))
            row["missing"], row["size"] = True, None
        except (StorageError, OSError) as exc:
            errors.append(str(exc))
        segs.append(row)
    segs.sort(key=lambda s: s["id"])
    rep["segments"] = segs
    visible = [s["last_index"] for s in segs if s["last_index"] is not None]
    if visible or c_index is not None:
        rep["log"]["last_index"] = max(visible + [c_index or 0])

    # -- snapshots --------------------------------------------------------------
    from .snapinfo import decode_info
    from .snapshot import SnapshotFile, snapshot_file_name
    snaps = []
    snap_dir = os.path.join(root, layout.pair_for(encrypted).snap)
    for k, v in registry:
        sid = int.from_bytes(k, "big")
        try:
            info = decode_info(sid, v, snap_dir, meta.path)
        except StorageError as exc:
            errors.append(f"registry record of snapshot {sid}: {exc}")
            continue
        row = {"id": sid, "file": f"{os.path.basename(snap_dir)}/{snapshot_file_name(sid, info.index, info.term)}",
               "index": info.index, "term": info.term, "key_id": info.key_id.hex(), "size": info.size,
               "file_size": None, "kek_embedded": False}
        try:
            row["file_size"] = os.path.getsize(info.path)
            sf = SnapshotFile(DEFAULT_VFS, info.path)      # parses the header; reads only
            doc = sf.bundle_doc()
            # A data-directory snapshot carries wrapped keys only; a KEK field would be a bug or tampering.
            row["kek_embedded"] = any(k in doc for k in ("kek", "kek_material", "key_encryption_key"))
            if sf.header.snapshot_id != sid or sf.digest != info.digest:
                errors.append(f"{info.path}: the snapshot file does not match its registry record")
        except FileNotFoundError:
            gone.append(("snapshot", sid, info.path))
            row["missing"], row["file_size"] = True, None
        except (StorageError, OSError) as exc:
            errors.append(str(exc))
        snaps.append(row)
    snaps.sort(key=lambda s: s["id"])
    rep["snapshots"] = snaps

    # -- keyring, rotation, migration -----------------------------------------------
    keys = []
    if encrypted and meta_key_id:
        keys.append({"key_id": meta_key_id.hex(), "purpose": "metadata", "state": "active", "algorithm": None,
                     "created_ns": None, "state_changed_ns": None})
    for k, v in keyring:
        try:
            e = M.decode_keyring(k, v, meta.path)
        except StorageError as exc:
            errors.append(str(exc))
            continue
        keys.append({"key_id": k.hex(), "purpose": PURPOSES.get(e.purpose, str(e.purpose)), "state": e.state_name,
                     "algorithm": alg_name(e.algorithm), "created_ns": e.created_ns,
                     "state_changed_ns": e.state_changed_ns})
    keys.sort(key=lambda k: (k["created_ns"] or 0, k["key_id"]))     # creation order
    rep["keyring"] = keys
    rep["rotation"] = _rotation(state[M.K_ROTATION], warnings)
    rep["migration"] = _json(state[M.K_MIGRATION])
    if rep["migration"] is not None:
        warnings.append(f"a migration to {rep['migration'].get('to', '?')} was interrupted (started "
                        f"{_ns_iso(rep['migration'].get('started_ns')) or '?'}); the next read-write open undoes "
                        "it: run 'walcrypt migrate' again")

    # -- warnings from the directory ---------------------------------------------------
    for d in rep["directories"]:
        if d["name"].startswith(".migrate") and d["exists"]:
            warnings.append(f"{d['name']}/ is left by an interrupted migration; " + (
                "the next read-write open removes it" if rep["migration"] is not None else
                "no migration is recorded, so opening the store leaves it alone: the next 'walcrypt migrate' "
                "replaces it, or remove it"))
    other = layout.pair_for(not encrypted)
    if layout.has_data(root, other):
        what = "legacy plaintext data" if encrypted else "encrypted data of an earlier mode"
        warnings.append(f"{what} is present in {other.wal}/ and {other.snap}/ (the source of a migration); "
                        f"'walcrypt migrate DIR --to {'encrypted' if encrypted else 'plaintext'} --remove-source' "
                        "removes it")
    if not encrypted:
        warnings.append("this store is not encrypted (legacy plaintext format): 'walcrypt migrate DIR --to "
                        "encrypted --key-file F' encrypts it")
    broken = [os.path.relpath(os.path.join(dp, n), root) for dp, _d, fs in os.walk(root) for n in fs
              if n.endswith(".broken")]
    if broken:
        warnings.append(f"{len(broken)} .broken file(s) present (copies kept by repairs or quarantined "
                        f"snapshots): {', '.join(sorted(broken))}")
    for p, embedded in _find_exports(root):
        if embedded:
            warnings.append(f"{os.path.relpath(p, root)} is a snapshot export with an EMBEDDED KEK inside the "
                            "data directory: anyone who can read it can decrypt the store; move it away and run "
                            "'walcrypt snapshot redact' on it")
    if any(s.get("kek_embedded") for s in snaps):
        warnings.append("a snapshot in the data directory carries a KEK: this should never happen; rotate the "
                        "KEK ('walcrypt rotate-kek') and remove the snapshot")
    if key_file and os.path.realpath(key_file).startswith(os.path.realpath(root) + os.sep):
        warnings.append(f"the key file {key_file} lies inside the data directory: the KEK must never live "
                        "beside the data it protects; move it")
    return rep, warnings, errors, gone, encrypted


def _authenticated(root: str, kek, encrypted: bool, rep: dict, errors: list[str], live: bool = False) -> None:
    """The engine's read-only open (retried on a running store, walcrypt.online.engine_open), and
    exactly what it checked: the metadata MACs; per segment its header, key commitment and index
    frame when it is sealed (its records are not read), every committed record when it is open;
    the newest snapshot end to end.  Rows of segments and snapshots it did not read say so."""
    try:
        store = online.engine_open(root, kek, encrypted, live=live)
    except (KeyProviderError, WrongKeyError, UsageError):
        raise
    except online.ChangedMeanwhile as exc:
        rep["note"] = (f"the authenticated read did not complete ({exc}); what is shown is read without "
                       "authentication - 'walcrypt verify' authenticates a running store file by file")
        return
    except WalcryptError as exc:
        errors.append(f"authenticated open failed: {exc}")
        return
    try:
        rep["authenticated"] = True
        hs, cs = store.initial_state()
        rep["log"].update({
            "first_index": store.first_index(), "last_index": store.last_index(),
            "hard_state": {"term": hs.term, "vote": hs.vote, "commit": hs.commit},
            "conf_state": {"voters": list(cs.voters), "learners": list(cs.learners)},
        })
        by_id = {s.seg_id: s for s in store.wal.segments}
        for row in rep["segments"]:
            seg = by_id.get(row["id"])
            row["checked"] = None            # not read by the engine (changed since the metadata was read)
            if seg is not None:
                row["last_index"] = seg.last_index
                row["tail"] = None if seg.sealed else "clean"
                # scanned (open in the manifest): every committed record; else its index frame only
                row["checked"] = "every record" if seg.units_scanned else "index frame"
        cur = store.snapshot()
        for row in rep["snapshots"]:
            row["checked"] = "every chunk" if cur is not None and row["id"] == cur.info.snapshot_id else None
        if encrypted:
            usage = {k["key_id"]: k for k in store.key_info()["keys"]}
            for row in rep["keyring"]:
                u = usage.get(row["key_id"])
                if u is not None:
                    row["records"], row["bytes"] = u["records"], u["bytes"]
    finally:
        store.close()


def _kek_summary(params: dict | None, check: bytes | None = None) -> dict | None:
    """The KEK a store needs: its kind, parameters and fingerprint (FORMAT.md 8.1; None for a KMS-held key,
    which has no check value).  Read without a key, so not authenticated: open compares the key given
    with the same stored check value the fingerprint is computed from."""
    if not params:
        return None
    out = {"kind": params.get("kind"),
           "fingerprint": K.kek_fingerprint(check) if check and len(check) == 16 else None}
    if params.get("kind") == "passphrase":
        out.update({k: params[k] for k in ("kdf", "n", "r", "p") if k in params})
    if params.get("kind") == "kms":
        out["plugin"] = params.get("plugin")
        ident = params.get("key")
        if isinstance(ident, dict) and K.kms_identity_problem(ident) is None:
            out["key"] = ident
            out["fingerprint"] = K.kms_fingerprint(str(out["plugin"]), ident)
        if K.is_uint(params.get("version")):
            out["version"] = params["version"]
    return out


def _json(raw: bytes | None) -> dict | None:
    """A JSON object from the state table (read without checking its MAC): {"damaged": True} when it
    is not one."""
    if raw is None:
        return None
    try:
        doc = json.loads(raw) if len(raw) <= _MAX_STATE_JSON else None
    except (ValueError, RecursionError):
        doc = None
    return doc if isinstance(doc, dict) else {"damaged": True}


def _rotation(raw: bytes | None, warnings: list[str]) -> dict | None:
    doc = _json(raw)
    if doc is None:
        return None
    out = {"pending_key_id": doc.get("pending"), "first_index": doc.get("first_index"),
           "snapshot_index_needed": (doc["first_index"] - 1) if isinstance(doc.get("first_index"), int) else None,
           "queued": doc.get("queued", 0), "reason": doc.get("reason"), "full_rekey": bool(doc.get("rekey")),
           "requested_ns": doc.get("requested_ns")}
    age = (time.time_ns() - doc["requested_ns"]) / 1e9 if isinstance(doc.get("requested_ns"), int) else None
    since = _ns_iso(doc.get("requested_ns")) or "?"
    if out["full_rekey"]:
        warnings.append(f"a full re-key (started {since}) was interrupted; the next read-write open redoes it "
                        "(or run 'walcrypt rotate-dek')")
    else:
        stuck = age is not None and age > ROTATION_STUCK_AFTER_S
        warnings.append(f"a DEK rotation {'looks stuck' if stuck else 'is in flight'} (requested {since}): it waits "
                        f"for a snapshot at or above index {out['snapshot_index_needed']}; the node must save one "
                        "(Store.save_snapshot); a full re-key ('walcrypt rotate-dek') "
                        "is possible once it has completed")
    return out


# ---------------------------------------------------------------------------
# Tables for people
# ---------------------------------------------------------------------------

def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(headers: list[str], rows: list[list], indent: str = "  ") -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in cells:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _checked_summary(rep: dict) -> str:
    """What the authenticated read checked, exactly (the 'authenticated' line)."""
    segs = rep["segments"]
    index_only = sum(1 for r in segs if r.get("checked") == "index frame")
    every = sum(1 for r in segs if r.get("checked") == "every record")
    unread = sum(1 for r in segs if r.get("checked") is None)
    parts = ["metadata MACs verified"]
    if index_only:
        parts.append(f"{index_only} sealed segment(s): header and index frame authenticated, records not read")
    if every:
        parts.append(f"{every} open segment(s): every committed record authenticated")
    if unread:
        parts.append(f"{unread} segment(s) not read (written or removed after the metadata was read)")
    snap = next((r for r in rep["snapshots"] if r.get("checked")), None)
    if snap is not None:
        parts.append(f"snapshot {snap['id']} authenticated end to end")
    return "yes: " + "; ".join(parts) + " ('walcrypt verify' authenticates every record)"


def render(rep: dict) -> str:
    """The inspection report for people."""
    out = []
    log = rep["log"]
    kek = rep.get("kek") or {}
    mode = rep["mode"] + (f" ({rep['algorithm']})" if rep["mode"] == "encrypted" else "")
    lock = rep["lock"]
    lock_s = ("unknown" if lock["held"] is None else
              f"held by process {', '.join(map(str, lock['pids']))}" if lock["held"] else
              "free (no process has it open)")
    out.append(f"store          {rep['path']}")
    out.append(f"format         version {rep['format_version']}, {mode}")
    out.append(f"store ID       {rep['store_id']}")
    if kek:
        if kek.get("fingerprint"):
            how = "--kms NAME --kms-option ..." if kek.get("kind") == "kms" else "--key-file F"
            fp = f"fingerprint {kek['fingerprint']}" + (" (the key given matches)" if rep["authenticated"] else
                                                       f" ('walcrypt key fingerprint {how}' names a key)")
        elif kek.get("kind") == "kms":
            fp = "fingerprint none: a KMS-held key has no check value (the plug-in name identifies it)"
        else:
            fp = "fingerprint none: no check value is stored"
        kind = kek.get("kind") + (f" ({kek['plugin']})" if kek.get("plugin") else "")
        if kek.get("key"):
            kind += f" key {K.describe_identity(kek['key'])}" + (f" version {kek['version']}"
                                                              if kek.get("version") is not None else "")
        out.append(f"KEK            {kind}, {fp}")
    out.append(f"lock           {lock_s}")
    out.append("authenticated  " + (_checked_summary(rep) if rep["authenticated"]
                                    else "no - " + rep.get("note", "see errors below")))
    hs = log.get("hard_state")
    out.append(f"log            first index {log['first_index']}, last index {log['last_index']}"
               + ("" if rep["authenticated"] else " (unauthenticated)"))
    if hs is not None:
        out.append(f"hard state     term={hs['term']} vote={hs['vote']} commit={hs['commit']}")
    cs = log.get("conf_state")
    if cs and (cs["voters"] or cs["learners"]):
        out.append(f"conf state     voters={cs['voters']} learners={cs['learners']}")
    out.append(f"compacted      index {log['compacted_index']} term {log['compacted_term']}; next segment ID "
               f"{log['next_segment']}, next snapshot ID {log['next_snapshot']}; {log['stable_keys']} stable key(s)")
    out.append("")
    out.append("directories")
    out.append(format_table(["DIRECTORY", "ROLE", "FILES", "SIZE"],
                            [[d["name"] + "/", d["role"], d["files"] if d["exists"] else "absent",
                              human_size(d["bytes"]) if d["exists"] else ""] for d in rep["directories"]]))
    out.append("")
    out.append(f"segments ({len(rep['segments'])})")
    if rep["segments"]:
        out.append(format_table(
            ["ID", "FILE", "FIRST", "LAST", "KEY ID", "SEALED", "SIZE"],
            [[s["id"], s["file"], s["first_index"],
              s["last_index"] if s["last_index"] is None or s["last_index"] >= s["first_index"] else "(none)",
              s["key_id"] if rep["mode"] == "encrypted" else "-",
              "yes" if s["sealed"] else "no", "MISSING" if s.get("missing") else human_size(s["size"])]
             for s in rep["segments"]]))
    out.append("")
    out.append(f"snapshots ({len(rep['snapshots'])})")
    if rep["snapshots"]:
        out.append(format_table(
            ["ID", "INDEX", "TERM", "KEY ID", "DATA", "FILE SIZE", "KEK EMBEDDED"],
            [[s["id"], s["index"], s["term"], s["key_id"] if rep["mode"] == "encrypted" else "-",
              human_size(s["size"]), "MISSING" if s.get("missing") else human_size(s["file_size"]),
              "YES" if s["kek_embedded"] else "no"] for s in rep["snapshots"]]))
        out.append("  (snapshots in a data directory carry wrapped keys only, never the KEK)")
    out.append("")
    out.append(f"keyring ({len(rep['keyring'])})" + ("" if rep["keyring"] or rep["mode"] == "encrypted"
                                                     else " - a plaintext store has no keys"))
    if rep["keyring"]:
        has_usage = any("records" in k for k in rep["keyring"])
        headers = ["KEY ID", "PURPOSE", "STATE", "ALGORITHM", "CREATED"] + (["RECORDS", "BYTES"] if has_usage else [])
        out.append(format_table(headers, [
            [k["key_id"], k["purpose"], k["state"], k["algorithm"], _ns_iso(k["created_ns"])]
            + ([k.get("records"), human_size(k.get("bytes")) if "bytes" in k else None] if has_usage else [])
            for k in rep["keyring"]]))
        out.append("  (key IDs and states only; key material is never shown)")
    out.append("")
    rot = rep["rotation"]
    if rot is None:
        out.append("rotation       none in flight")
    else:
        out.append(f"rotation       {'full re-key' if rot['full_rekey'] else 'DEK rotation'} to key "
                   f"{rot['pending_key_id']}, requested {_ns_iso(rot['requested_ns'])} ({rot['reason']}); "
                   f"needs a snapshot at or above index {rot['snapshot_index_needed']}; {rot['queued']} queued")
    out.append("migration      " + ("none in progress" if rep["migration"] is None
                                    else f"to {rep['migration'].get('to')} interrupted"))
    if rep.get("notes"):
        out.append("")
        out.append(f"notes ({len(rep['notes'])})")
        out.extend(f"  - {n}" for n in rep["notes"])
    if rep["warnings"]:
        out.append("")
        out.append(f"warnings ({len(rep['warnings'])})")
        out.extend(f"  ! {w}" for w in rep["warnings"])
    if rep["errors"]:
        out.append("")
        out.append(f"errors ({len(rep['errors'])})")
        out.extend(f"  x {e}" for e in rep["errors"])
    return "\n".join(out)
