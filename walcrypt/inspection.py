"""What ``walcrypt inspect`` shows: a store's metadata without any key, and more with one.

Without a key nothing is authenticated: the LMDB environment is opened read-only (registered
in its reader table, so a running writer never reuses a page being read; see walcrypt.meta)
and read in one short transaction, the ``LOCK`` flock is not taken, segment and
snapshot headers are parsed with ``walcrypt.segment_codec.decode_header`` and
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

import json
import os
import time

from . import format as fmt
from . import keys as K
from . import layout, online
from . import meta as M
from .errors import (
    KeyProviderError,
    StorageError,
    UsageError,
    WalcryptError,
    WrongKeyError,
)
from .inspection_files import DIRECTORIES, alg_name, dir_summary, find_exports, scan_frame_headers  # noqa: F401
from .inspection_render import ns_iso
from .segment_codec import decode_header, segment_file_name
from .snapinfo import decode_info
from .snapshot import SnapshotFile, snapshot_file_name
from .storedir import lock_holders, open_meta, require_store, store_record
from .vfs import DEFAULT_VFS

ROTATION_STUCK_AFTER_S = 3600
_MAX_STATE_JSON = 64 << 10          # a rotation or migration record is a few hundred bytes
PURPOSES = {K.PURPOSE_DEK: "dek", K.PURPOSE_META: "metadata"}


# ---------------------------------------------------------------------------
# Keyless reading
# ---------------------------------------------------------------------------

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
        "directories": dir_summary(root),
    })
    if version is None or len(version) != 1 or version[0] not in fmt.META_FORMAT_VERSIONS_READ:
        errors.append(f"metadata format version {version[0] if version else '?'} is not one this walcrypt reads "
                      f"({', '.join(map(str, fmt.META_FORMAT_VERSIONS_READ))}); upgrade walcrypt")
    if holders:
        warnings.append(f"the store is in use by process {', '.join(map(str, holders))}: what follows is the "
                        "store as of one moment (one read of its metadata), and it changes as the process runs")

    c_index: int | None
    c_term: int | None
    reset: int | None
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
                        f"{ns_iso(rep['migration'].get('started_ns')) or '?'}); the next read-write open undoes "
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
    for p, embedded in find_exports(root):
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
    since = ns_iso(doc.get("requested_ns")) or "?"
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

