"""Backups that need more than an open store: exporting the newest snapshot of a store that is not
opened (its writer may be running), and restoring an export or a snapshot file into a new store.

The export file format, exporting from an open store (``Store.export_snapshot``), and inspecting
and redacting exports are walcrypt.exports; its names are re-exported here.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

from . import format as fmt
from . import keys as K
from . import layout, online
from . import meta as M
from .errors import CorruptionError, StorageError, UsageError
from .exports import (  # noqa: F401  (re-exported: the export format's public names)
    EXPORT_HEADER,
    EXPORT_HEADER_SIZE,
    EXPORT_MAGIC,
    FLAG_KEK_EMBEDDED,
    ExportFile,
    FdReader,
    SnapshotSource,
    authenticated,
    export_from,
    export_snapshot,
    inspect_export,
    open_backup,
    own_snapshot,
    redact_export,
    refuse_existing,
    refuse_plaintext,
    unlock_export,
)
from .snapinfo import decode_info
from .storage import Store
from .types import HardState
from .vfs import DEFAULT_VFS


def export_store(root: str, out_path: str, *, kek: K.KeyEncryptionKey | None = None, encrypted: bool = True,
                 embed_kek: bool = False) -> dict:
    """Export the newest snapshot of the store at ``root`` to ``out_path`` without opening the store:
    no lock is taken, so its writer may be running (appending, snapshotting, compacting).

    The metadata is read in one short read transaction (walcrypt.online.FrozenMeta): the keyring,
    the snapshot registry and the store's identity of one committed state.  The newest registered
    snapshot file is opened at once and authenticated end to end under the copy's keys, then copied
    from that same descriptor, so retention deleting it meanwhile changes nothing.  A file already
    gone when it is opened is looked up in a fresh copy: when its record is gone too, retention
    removed it and the newer snapshot is taken (bounded); when not, it is missing (CorruptionError)."""
    root = os.path.abspath(os.fspath(root))
    if embed_kek and not encrypted:
        raise UsageError("a plaintext store has no KEK to embed")
    hold = layout.ReadOnlyHold(root)
    try:
        live, copy = online.frozen(os.path.join(root, layout.META_DIR))
        try:
            frozen: online.FrozenMeta = copy
            st = Store.keys_only(root, kek, encrypted, frozen)
            kek_bytes = st.kek_material() if embed_kek else b""
            snap_dir = os.path.join(root, layout.pair_for(encrypted).snap)
            for _attempt in range(online.ATTEMPTS):
                with st.meta.read() as r:
                    rows = r.raw_items(M.DB_SNAPSHOTS)
                if not rows:
                    raise UsageError("the store has no snapshot to export; save one first")
                k, raw = max(rows)
                sid = int.from_bytes(k, "big")
                info = decode_info(sid, st.meta.open_value(M.DB_SNAPSHOTS, k, raw), snap_dir, st.meta.path)
                vfs = online.PinnedVFS()
                try:
                    if vfs.pin(info.path):
                        snap = authenticated(st, vfs, info)
                        sfd = vfs.open(info.path, os.O_RDONLY)
                        try:
                            snap_len = own_snapshot(sfd, info.path).st_size
                            return export_from(st, snap, FdReader(vfs, sfd), snap_len, out_path, kek_bytes)
                        finally:
                            vfs.close(sfd)
                finally:
                    vfs.release()
                fresh = frozen.fresh()
                if sid in fresh.ids(M.DB_SNAPSHOTS):
                    raise CorruptionError(info.path, None, "registered snapshot file is missing",
                                          "run 'walcrypt verify' on the store")
                st.meta = frozen = fresh
                st.keys = {}
                st.load_keyring()
            raise StorageError(f"retention removed the newest snapshot {online.ATTEMPTS} times while it was being "
                               "exported; export again")
        finally:
            live.close()
    finally:
        hold.release()




def restore_export(path: str, data_dir: str, *, kek: K.KeyEncryptionKey | None = None, plaintext: bool = False,
                   new_kek: K.KeyEncryptionKey | None = None, **options) -> dict:
    """Restore an export, or a raw snapshot file from a data directory, into an empty data directory:
    a new store (its own store ID and data key) holding the snapshot, authenticated end to end first.

    ``kek`` unlocks the source (an export's KEK, or the KEK of the store a ``.snap`` file came from;
    an export's embedded KEK when absent).  The new store's data key is wrapped by ``new_kek`` when
    given (restoring onto another node under that node's own KEK, in one step), else by the same KEK.
    A plaintext source is restored only with ``plaintext=True`` (nothing in it is authenticated): as a
    plaintext store, or as an encrypted one under ``new_kek``."""
    if new_kek is not None and not isinstance(new_kek, K.KeyEncryptionKey):
        raise UsageError(f"new_kek must be a key-encryption key (RawKey, KeyFile, Passphrase, EnvKey, Kms), not "
                         f"{type(new_kek).__name__}")
    if os.path.exists(data_dir) and os.listdir(data_dir):
        raise UsageError(f"{data_dir} is not empty; restore only into an empty or new directory")
    src = open_backup(path)
    sf = unlock_export(src, kek, plaintext=plaintext)
    if new_kek is not None:
        store_kek = new_kek
    elif sf.header.algorithm != fmt.ALG_NONE:
        store_kek = kek or K.RawKey(src.kek)
    else:
        store_kek = None
    # Built in a private directory beside the target and renamed into place at the end: a failure
    # removes only that directory, never the target (a node may have created a store there while
    # the restore ran), and a target filled meanwhile makes the rename fail instead of being merged.
    parent = os.path.dirname(os.path.abspath(data_dir))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} does not exist; create it first")
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(data_dir)) + ".restore-", dir=parent)
    try:
        with Store(staging, kek=store_kek, encrypted=store_kek is not None, **options) as s:
            meta = sf.meta
            assert meta is not None          # unlock_export returns the file unlocked: its metadata decoded
            with sf.stream() as stream:
                s.save_snapshot(meta, stream)
            s.save(hard_state=HardState(term=meta.term, vote=0, commit=meta.index))
            saved = s.snapshot()
            assert saved is not None         # the snapshot just saved
            result = {"data_dir": data_dir, "index": meta.index, "term": meta.term,
                      "data_bytes": saved.size, "encrypted": store_kek is not None,
                      "source": "export" if isinstance(src, ExportFile) else "snapshot"}
        try:
            os.rename(staging, data_dir)       # onto a missing or empty directory only (rename(2))
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise UsageError(f"{data_dir} was created and filled while the restore ran; nothing there was "
                                 "changed and the restored store was discarded: restore into a new or empty "
                                 "directory") from None
            raise
        DEFAULT_VFS.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
