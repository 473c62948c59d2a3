"""Migration between encrypted (``wal-v1-encrypted/``, ``snap-v1-encrypted/``) and legacy
plaintext (``wal-v1/``, ``snap-v1/``) data.

Procedure (each step durable before the next; FORMAT.md, "Migration"):

A. one LMDB commit records the migration (``state/migration``) and, towards
   encryption, creates the KEK parameters, the metadata key and a DEK;
B. every retained entry, the hard state and the newest snapshot are rewritten
   into hidden temporary directories (``.migrate-wal``, ``.migrate-snap``) in
   the target format, fsynced; each carries a marker file naming the migration;
C. a target-mode directory already in the way (left by an earlier life of the
   store in that mode, or planted: the metadata does not vouch for it) is set
   aside as ``<name>.replaced-<migration id>``, never deleted; the temporary
   directories are renamed to their final names, and the data directory fsynced;
D. one LMDB commit switches the store: the mode flag, the manifest, the snapshot
   registry and every MAC (keyless BLAKE2b for plaintext, HMAC under the
   metadata key for encrypted), and clears the migration record.

A crash before D leaves the store in its source mode: the next open removes
the temporary directories and a target directory carrying this migration's
marker, puts back what was set aside, and clears the record; the migration is
redone when the caller asks for it again (``migrate=True``: never implicitly).  The source
directories are kept after D (so a downgrade stays possible) until removed on
purpose with :func:`remove_source`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

from . import crypto, layout, stable
from . import format as fmt
from . import keys as K
from . import meta as M
from .errors import CorruptionError, KeyProviderError, UsageError
from .segment import Segment
from .segment_codec import SegmentIdentity
from .snapinfo import SnapshotInfo, encode_info
from .snapshot import SNAP_SALT_SIZE, SnapshotHeader, SnapshotWriter, snapshot_keys
from .vfs import DEFAULT_VFS

log = logging.getLogger("walcrypt")

TMP_WAL = ".migrate-wal"
TMP_SNAP = ".migrate-snap"
MARKER = ".walcrypt-migration"          # names the migration that wrote a directory
ASIDE_SUFFIX = ".replaced-"             # a target-mode directory found in the way is kept under this name

Progress = Callable[[str, int, int], None]


def _marker_id(directory: str) -> str | None:
    """The migration ID in a directory's marker file, or None (no marker: not written by a migration)."""
    p = os.path.join(directory, MARKER)
    if os.path.islink(directory) or os.path.islink(p) or not os.path.isfile(p):
        return None
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)


def cleanup_interrupted(store) -> bool:
    """Run at open in the source mode: undo an interrupted migration (steps A-C).  True if one was found.

    Only what the interrupted migration wrote is removed: its temporary directories and a target
    directory carrying its marker.  A directory it had set aside is put back."""
    with store.meta.read() as r:
        raw = r.get(M.DB_STATE, M.K_MIGRATION)
    if raw is None:
        return False
    try:
        record = json.loads(raw)
        target = layout.pair_for(record["to"] == "encrypted")
        mig_id = str(record.get("id", ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CorruptionError(store.meta.path, None, "the migration record is malformed") from None
    for d in (TMP_WAL, TMP_SNAP):
        store.vfs.rmtree(os.path.join(store.path, d))
    if target.encrypted != store.encrypted:        # never touch the directories the store lives in
        for d in (target.wal, target.snap):
            p = os.path.join(store.path, d)
            if mig_id and _marker_id(p) == mig_id:
                store.vfs.rmtree(p)
            aside = p + ASIDE_SUFFIX + mig_id
            if mig_id and not os.path.lexists(p) and os.path.isdir(aside) and not os.path.islink(aside):
                store.vfs.rename(aside, p)
    store.vfs.fsync_dir(store.path)
    with store.meta.write() as tx:
        tx.delete(M.DB_STATE, M.K_MIGRATION)
    return True


def migrate(store, *, to_encrypted: bool, kek: K.KeyEncryptionKey | None, algorithm: str = "aes-256-gcm",
            progress: Progress | None = None) -> None:
    """Migrate an open store (in its source mode) to the other mode.  The caller reopens it afterwards."""
    if store.encrypted == to_encrypted:
        raise UsageError("the store is already in the requested mode")
    if store.encrypted and store.rotation.state:
        raise UsageError("a DEK rotation is in flight; let it finish (save a snapshot) before migrating")
    if to_encrypted and kek is None:
        raise KeyProviderError("migrating to encrypted needs a key-encryption key (kek=...)")
    say = progress or (lambda stage, done, total: None)
    root = store.path
    target = layout.pair_for(to_encrypted)

    # A. record the migration; create the target keys
    ctx = _TargetKeys.create(store, to_encrypted, kek, algorithm)
    # B. rewrite into temporary directories
    tmp_wal, tmp_snap = os.path.join(root, TMP_WAL), os.path.join(root, TMP_SNAP)
    for d in (tmp_wal, tmp_snap):
        store.vfs.rmtree(d)
        store.vfs.makedirs(d)
        _write_marker(store.vfs, d, ctx.mig_id)
    store.vfs.fsync_dir(root)
    segments = _rewrite_log(store, ctx, tmp_wal, say)
    snap = _rewrite_snapshot(store, ctx, tmp_snap, say)
    store.vfs.fsync_dir(tmp_wal)
    store.vfs.fsync_dir(tmp_snap)
    # C. put the directories in place
    for tmp, final in ((tmp_wal, target.wal), (tmp_snap, target.snap)):
        dest = os.path.join(root, final)
        if os.path.lexists(dest):
            # A directory of the target mode is in the way: left by an earlier life of the store in
            # that mode, or planted.  The metadata does not vouch for it, so it is neither used nor
            # deleted: it is set aside (and put back if this migration is interrupted).
            aside = dest + ASIDE_SUFFIX + ctx.mig_id
            store.vfs.rename(dest, aside)
            log.warning("%s was in the way of the migration; kept as %s - remove it once you know you do "
                        "not need it", dest, aside)
        store.vfs.rename(tmp, dest)
    store.vfs.fsync_dir(root)
    for seg in segments:
        seg.path = os.path.join(root, target.wal, os.path.basename(seg.path))
    if snap is not None:
        snap.path = os.path.join(root, target.snap, os.path.basename(snap.path))
    # D. switch in one commit
    _switch(store, ctx, segments, snap)
    for final in (target.wal, target.snap):       # the markers only matter before the switch
        try:
            store.vfs.unlink(os.path.join(root, final, MARKER))
        except OSError as exc:
            log.warning("could not remove the migration marker in %s: %s", final, exc)
    say("done", 1, 1)


def _write_marker(vfs, directory: str, mig_id: str) -> None:
    fd = vfs.open(os.path.join(directory, MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        vfs.pwrite(fd, mig_id.encode("ascii") + b"\n", 0)
        vfs.fsync(fd)
    finally:
        vfs.close(fd)
    vfs.fsync_dir(directory)


class _TargetKeys:
    """The key material of the target mode."""

    # Set by create(): the migration's ID, and towards encryption the new DEK's keyring entry and the
    # new KEK parameters.
    mig_id: str
    entry: K.KeyEntry
    params: dict

    def __init__(self, encrypted: bool, algorithm: int, key_id: bytes, dek: bytes | None, mac_key: bytes | None):
        self.encrypted = encrypted
        self.algorithm = algorithm
        self.key_id = key_id
        self.dek = dek
        self.mac_key = mac_key

    @classmethod
    def create(cls, store, to_encrypted: bool, kek, algorithm: str) -> "_TargetKeys":
        mig_id = os.urandom(8).hex()
        state = json.dumps({"to": "encrypted" if to_encrypted else "plaintext", "started_ns": time.time_ns(),
                            "id": mig_id})
        if not to_encrypted:
            with store.meta.write() as tx:
                tx.put(M.DB_STATE, M.K_MIGRATION, state.encode())
            ctx = cls(False, fmt.ALG_NONE, crypto.ZERO_KEY_ID, None, None)
            ctx.mig_id = mig_id
            return ctx
        alg = crypto.suite_by_name(algorithm).alg_id
        params = kek.new_params()
        wrapper = kek.wrapper(params)
        meta_entry, meta_secret = K.new_key_entry(wrapper, store.store_id, algorithm=0, purpose=K.PURPOSE_META,
                                                  state=K.ACTIVE)
        dek, secret = K.new_key_entry(wrapper, store.store_id, algorithm=alg, purpose=K.PURPOSE_DEK, state=K.ACTIVE)
        with store.meta.write() as tx:
            tx.put_raw(M.DB_STORE, M.K_KEK_PARAMS, json.dumps(params).encode())
            cv = wrapper.check_value()
            if cv is not None:
                tx.put_raw(M.DB_STORE, M.K_KEK_CHECK, cv)
            tx.put_raw(M.DB_STORE, M.K_META_KEY_ID, meta_entry.key_id)
            tx.put_raw(M.DB_STORE, M.K_META_KEY, meta_entry.wrapped)
            tx.put(M.DB_STATE, M.K_MIGRATION, state.encode())
        ctx = cls(True, alg, dek.key_id, secret.material, meta_secret.material)
        ctx.mig_id = mig_id
        ctx.entry = dek
        ctx.params = params
        return ctx

    def aead(self, key: bytes):
        return crypto.suite(self.algorithm).new(key)


def _rewrite_log(store, ctx: _TargetKeys, directory: str, say: Progress) -> list[Segment]:
    next_id = [store.next_segment]

    def new_segment(base: int) -> Segment:
        seg_id = next_id[0]
        next_id[0] += 1
        salt = os.urandom(fmt.SALT_SIZE) if ctx.encrypted else bytes(fmt.SALT_SIZE)
        ident = SegmentIdentity(store.store_id, seg_id, base, ctx.algorithm, ctx.key_id, salt, b"")
        if ctx.encrypted:
            assert ctx.dek is not None          # an encrypted target has its DEK (create)
            key, commitment = crypto.segment_keys(ctx.dek, salt, store.store_id, seg_id, ctx.algorithm)
        else:
            key, commitment = b"", bytes(fmt.COMMITMENT_SIZE)
        ident.commitment = commitment
        cipher = crypto.FrameCipher(ctx.algorithm, ctx.aead(key), ctx.key_id, store.store_id, seg_id)
        return Segment.create(store.vfs, directory, ident, cipher, store.wal.segment_size, store.wal.hardstate)

    return store.copy_log(new_segment, progress=lambda done, total: say("log", done, total))


def _rewrite_snapshot(store, ctx: _TargetKeys, directory: str, say: Progress) -> SnapshotInfo | None:
    cur = store.snapshots.current
    if cur is None:
        return None
    snap_id = store.next_snapshot_id()
    salt = os.urandom(SNAP_SALT_SIZE) if ctx.encrypted else bytes(SNAP_SALT_SIZE)
    bundle = _target_bundle(store, ctx)
    h = SnapshotHeader(ctx.algorithm, 0, store.store_id, snap_id, cur.meta.index, cur.meta.term,
                       store.snapshots.chunk_size, len(bundle), ctx.key_id, salt, b"")
    if ctx.encrypted:
        assert ctx.dek is not None              # an encrypted target has its DEK (create)
        key, h.commitment = snapshot_keys(ctx.dek, h)
    else:
        key, h.commitment = b"", bytes(fmt.COMMITMENT_SIZE)
    w = SnapshotWriter(store.vfs, directory, h, ctx.aead(key), bundle, cur.meta)
    try:
        with cur.open() as stream:
            while True:
                block = stream.read(h.chunk_size)
                if not block:
                    break
                w.write(block)
                say("snapshot", w.data_bytes, cur.size)
        path = w.publish()
    except BaseException:
        w.abort()
        raise
    return SnapshotInfo(snap_id, cur.meta.index, cur.meta.term, ctx.key_id, w.digest, w.data_bytes, path)


def _target_bundle(store, ctx: _TargetKeys) -> bytes:
    if not ctx.encrypted:
        return b""
    saved = (store.encrypted, store.kek_params, dict(store.keys))
    store.encrypted, store.kek_params = True, ctx.params
    store.keys = {ctx.key_id: ctx.entry}
    try:
        return store.keyring_bundle()
    finally:
        store.encrypted, store.kek_params, store.keys = saved


def _switch(store, ctx: _TargetKeys, segments: list[Segment], snap: SnapshotInfo | None) -> None:
    """Step D: one LMDB commit flips the mode, replaces the manifests and re-MACs every record."""
    meta = store.meta
    with meta.read() as r:
        carried = {db: r.items(db) for db in (M.DB_KEYRING, M.DB_STABLE, M.DB_STATE)}
        old_segments = [k for k, _ in r.raw_items(M.DB_SEGMENTS)]
        old_snaps = [k for k, _ in r.raw_items(M.DB_SNAPSHOTS)]
    carried[M.DB_STABLE] = [
        (k, stable.seal_with(store.store_id, k, stable.open_value(store, k, blob), key_id=ctx.key_id,
                             dek=ctx.dek, algorithm=ctx.algorithm))
        for k, blob in carried[M.DB_STABLE]]
    old_mac = meta.mac_key
    meta.set_mac_key(ctx.mac_key)
    try:
        with meta.write() as tx:
            tx.put_raw(M.DB_STORE, M.K_ENCRYPTED, b"\x01" if ctx.encrypted else b"\x00")
            tx.put_raw(M.DB_STORE, M.K_ALGORITHM, bytes([ctx.algorithm]))
            for db, items in carried.items():
                for k, v in items:
                    if db == M.DB_STATE and k in (M.K_MIGRATION, M.K_ROTATION):
                        continue
                    if db == M.DB_KEYRING:
                        if ctx.encrypted:
                            tx.delete(db, k)   # stale keys from an earlier encrypted life
                            continue
                        entry = M.decode_keyring(k, v, meta.path)
                        if entry.state in (K.PENDING, K.ACTIVE, K.RETIRING):
                            entry.state, entry.state_changed_ns = K.INACTIVE, time.time_ns()
                        v = M.encode_keyring(entry)
                    tx.put(db, k, v)
            tx.delete(M.DB_STATE, M.K_MIGRATION)
            if ctx.encrypted:
                tx.put(M.DB_KEYRING, ctx.key_id, M.encode_keyring(ctx.entry))
            for k in old_segments:
                tx.delete(M.DB_SEGMENTS, k)
            for k in old_snaps:
                tx.delete(M.DB_SNAPSHOTS, k)
            dir_code = fmt.DIR_CODE_ENCRYPTED if ctx.encrypted else fmt.DIR_CODE_PLAIN
            for seg in segments:
                rec = {"state": fmt.SEG_SEALED, "algorithm": ctx.algorithm, "dir_code": dir_code,
                       "base_index": seg.base_index, "key_id": ctx.key_id, "index_offset": seg.index_offset,
                       "end_offset": seg.end_offset, "last_index": seg.last_index,
                       "records": seg.records_written, "bytes": seg.bytes_written}
                tx.put(M.DB_SEGMENTS, M.u64(seg.seg_id), M.encode_manifest(rec))
            tx.put(M.DB_STATE, M.K_NEXT_SEGMENT, (segments[-1].seg_id + 1).to_bytes(8, "little"))
            if snap is not None:
                tx.put(M.DB_SNAPSHOTS, M.u64(snap.snapshot_id), encode_info(snap))
                tx.put(M.DB_STATE, M.K_NEXT_SNAPSHOT, (snap.snapshot_id + 1).to_bytes(8, "little"))
            wal = store.wal
            tx.put(M.DB_STATE, M.K_COMPACTED, M.encode_compacted(wal.compacted_index, wal.compacted_term))
    except BaseException:
        meta.set_mac_key(old_mac)
        raise


def remove_source(path: str) -> list[str]:
    """Remove the directories of the mode a store is no longer in (after a migration).  Returns them."""
    m = M.Meta(os.path.join(path, layout.META_DIR), readonly=True)
    try:
        with m.read() as r:
            enc = r.raw(M.DB_STORE, M.K_ENCRYPTED) == b"\x01"
    finally:
        m.close()
    other = layout.pair_for(not enc)
    removed = []
    for d in (other.wal, other.snap):
        p = os.path.join(path, d)
        if DEFAULT_VFS.rmtree(p):
            removed.append(p)
    return removed
