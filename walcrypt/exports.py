"""Export files: the single-file export of a store's newest snapshot, written from an open store,
and the reading, inspection and redaction of export and snapshot files.  Exporting from a store that
is not opened, and restoring, are walcrypt.backup.

Export file layout (FORMAT.md, "Export files"):

    header (64 bytes, CRC32C)        magic WCRYPEXP, version, flags (bit 0: KEK embedded),
                                     KEK section length, snapshot length, creation time,
                                     store ID, CRC32C of the KEK section
    KEK section (optional)           the 32-byte KEK, present only when asked for explicitly
    snapshot file                    byte for byte, with its keyring bundle of wrapped keys

A snapshot file carries the wrapped keys it needs, so an export plus the KEK
is enough to restore; Nomad's outages (#16640, #23665) came from backups and
keys travelling separately.  An embedded KEK makes the export alone enough, and
makes it as secret as the KEK: ``inspect`` warns loudly, ``redact`` removes it.
Restoring re-encrypts the snapshot into a new store with its own store ID and
data key, wrapped by the same KEK or by the target node's own (``new_kek``); a raw
``.snap`` file from a data directory restores the same way with the KEK of its store.
"""

from __future__ import annotations

import base64
import os
import struct
import time

from crc32c import crc32c

from . import crypto
from . import format as fmt
from . import keys as K
from .errors import (
    AuthenticationError,
    CorruptionError,
    KeyProviderError,
    StorageError,
    SymlinkError,
    UnsupportedFormatError,
    UsageError,
    WrongKeyError,
)
from .layout import ATTEMPTS
from .snapinfo import Snapshot
from .snapshot import MAX_KEYRING_BUNDLE, SnapshotFile, parse_bundle, snapshot_keys
from .snapstore import bind_to_registry
from .vfs import DEFAULT_VFS, open_private, open_regular, own_file

EXPORT_MAGIC = b"WCRYPEXP"
EXPORT_HEADER = struct.Struct("<8sHHIQQ16sIII")
assert EXPORT_HEADER.size == 60
EXPORT_HEADER_SIZE = 64
FLAG_KEK_EMBEDDED = 1
_COPY = 1 << 20


def _copy(inp, out) -> None:
    while True:
        block = inp.read(_COPY)
        if not block:
            return
        out.write(block)


def _copy_exact(inp, out, length: int, path: str) -> None:
    """Copy exactly ``length`` bytes (the length the header announces)."""
    left = length
    while left:
        block = inp.read(min(_COPY, left))
        if not block:
            raise CorruptionError(path, length - left, f"snapshot file shrank while it was exported "
                                                       f"({length} bytes expected)")
        out.write(block)
        left -= len(block)


def _link_detail(path: str) -> str:
    return (f"{path} is a symbolic link; walcrypt does not write through links (the file it points to is left "
            "alone); remove it or choose another path")


def refuse_existing(path: str) -> None:
    """Exports are never overwritten, and never written through a link."""
    if os.path.islink(path):
        raise SymlinkError(path, _link_detail(path))
    if os.path.exists(path):
        raise UsageError(f"{path} already exists; refusing to overwrite it")


def _header(flags: int, kek_len: int, snap_len: int, store_id: bytes, kek_crc: int, bundle: bytes) -> bytes:
    body = EXPORT_HEADER.pack(EXPORT_MAGIC, fmt.FORMAT_VERSION, flags, kek_len, snap_len, time.time_ns(),
                              store_id, kek_crc, len(bundle), crc32c(bundle))
    return body + crc32c(body).to_bytes(4, "little")


class ExportFile:
    """A parsed export: header fields, optional embedded KEK, and the offset of its snapshot file."""

    def __init__(self, path: str):
        self.path = path
        try:
            fd = open_regular(path)               # never blocks on a FIFO; only a regular file
            size = os.fstat(fd).st_size
            with os.fdopen(fd, "rb") as f:
                raw = f.read(EXPORT_HEADER_SIZE)
                if len(raw) < EXPORT_HEADER_SIZE:
                    raise CorruptionError(path, 0, "export header is truncated")
                magic, version, flags, kek_len, snap_len, created, store_id, kek_crc, bundle_len, bundle_crc = \
                    EXPORT_HEADER.unpack_from(raw)
                if magic != EXPORT_MAGIC:
                    raise CorruptionError(path, 0, "not a walcrypt export (bad magic)")
                if crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise CorruptionError(path, 0, "export header fails its CRC32C")
                if version != fmt.FORMAT_VERSION:
                    raise UnsupportedFormatError(f"{path}: export format version {version}; upgrade walcrypt")
                if kek_len not in (0, K.KEY_SIZE) or bool(flags & FLAG_KEK_EMBEDDED) != bool(kek_len) \
                        or flags & ~FLAG_KEK_EMBEDDED:
                    raise CorruptionError(path, 0, "export header flags and KEK section disagree")
                if EXPORT_HEADER_SIZE + kek_len + bundle_len + snap_len != size or bundle_len > MAX_KEYRING_BUNDLE:
                    raise CorruptionError(path, 0, f"export is {size} bytes, its header announces "
                                                   f"{EXPORT_HEADER_SIZE + kek_len + bundle_len + snap_len}")
                self.kek = f.read(kek_len) if kek_len else None
                if self.kek is not None and crc32c(self.kek) != kek_crc:
                    raise CorruptionError(path, EXPORT_HEADER_SIZE, "embedded KEK fails its CRC32C")
                self.bundle = f.read(bundle_len)
                if crc32c(self.bundle) != bundle_crc:
                    raise CorruptionError(path, EXPORT_HEADER_SIZE + kek_len, "export keyring fails its CRC32C")
        except FileNotFoundError:
            raise UsageError(f"{path} does not exist") from None
        self.flags, self.created_ns, self.store_id = flags, created, store_id
        self.snapshot_offset = EXPORT_HEADER_SIZE + kek_len + bundle_len
        self.snapshot_length = snap_len

    @property
    def kek_embedded(self) -> bool:
        return self.kek is not None

    def bundle_doc(self) -> dict:
        return parse_bundle(self.bundle, self.path, EXPORT_HEADER_SIZE)

    def snapshot_file(self) -> SnapshotFile:
        return SnapshotFile(DEFAULT_VFS, self.path, offset=self.snapshot_offset)


def export_snapshot(store, out_path: str, *, embed_kek: bool = False) -> dict:
    """Write the store's newest snapshot (with its wrapped keys) to ``out_path`` (0600, never overwritten).

    Safe while another thread of the process saves snapshots: retention may delete the file of the
    snapshot read as the newest before it is opened; then the newer one is taken (bounded)."""
    store.check_open()
    kek = b""
    if embed_kek:
        if not store.encrypted:
            raise UsageError("a plaintext store has no KEK to embed")
        kek = store.kek_material()
    vfs = getattr(store, "vfs", DEFAULT_VFS)
    for _attempt in range(ATTEMPTS):
        cur = store.snapshots.current
        if cur is None:
            raise UsageError("the store has no snapshot to export; save one first")
        src = cur.info.path
        # Through the store's VFS (below its data directory no link is followed, no FIFO blocks), and the
        # length from that descriptor: a name swapped in after open is refused or not used.
        try:
            sfd = vfs.open(src, os.O_RDONLY)
        except FileNotFoundError:
            if store.snapshots.current is cur:
                raise
            continue                  # retention removed it: a newer snapshot is current now
        try:
            snap_len = own_snapshot(sfd, src).st_size
            return export_from(store, cur, FdReader(vfs, sfd), snap_len, out_path, kek)
        finally:
            vfs.close(sfd)
    raise StorageError(f"a newer snapshot replaced the newest one {ATTEMPTS} times while it was being exported; "
                       "export again")


def own_snapshot(fd: int, path: str) -> os.stat_result:
    """A snapshot file has one name - or none, once retention unlinked it after it was opened (the
    open descriptor still reads it whole)."""
    st = own_file(fd, path, exclusive=False)
    if st.st_nlink > 1:
        own_file(fd, path, exclusive=True)            # raises, naming the hard link
    return st


def authenticated(st, vfs, info):
    """The registered snapshot ``info``, read through ``vfs`` and authenticated end to end (as the
    engine's open authenticates the newest snapshot)."""
    f = bind_to_registry(st, vfs, info)
    size = f.verify()
    if size != info.size:
        raise CorruptionError(info.path, None, f"snapshot holds {size} bytes, the registry says {info.size}")
    return Snapshot(info, f)


class FdReader:
    """``read(n)`` over a VFS descriptor, from offset 0 on."""

    def __init__(self, vfs, fd: int):
        self.vfs, self.fd, self.offset = vfs, fd, 0

    def read(self, n: int) -> bytes:
        block = self.vfs.pread(self.fd, n, self.offset)
        self.offset += len(block)
        return block


def export_from(store, cur, inp, snap_len: int, out_path: str, kek: bytes) -> dict:
    bundle = store.keyring_bundle({cur.info.key_id})   # wrapped under the current KEK
    flags = FLAG_KEK_EMBEDDED if kek else 0
    refuse_existing(out_path)
    tmp = out_path + ".tmp"
    try:
        fd = open_private(tmp, detail=_link_detail(tmp))
    except FileExistsError:
        raise UsageError(f"{tmp} exists (an interrupted export?); remove it first") from None
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"the directory of {out_path} does not exist; create it or choose another path") from None
    except PermissionError:
        raise UsageError(f"no permission to write {tmp}; choose a directory you can write") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_header(flags, len(kek), snap_len, store.store_id, crc32c(kek) if kek else 0, bundle))
            out.write(kek)
            out.write(bundle)
            _copy_exact(inp, out, snap_len, cur.info.path)
            out.flush()
            os.fsync(out.fileno())
        refuse_existing(out_path)
        DEFAULT_VFS.rename(tmp, out_path)
    except BaseException:
        try:
            os.unlink(tmp)                    # ours: created above with O_EXCL
        except FileNotFoundError:
            pass
        raise
    DEFAULT_VFS.fsync_dir(os.path.dirname(os.path.abspath(out_path)))
    return {"path": out_path, "index": cur.meta.index, "term": cur.meta.term, "kek_embedded": bool(kek),
            "size": os.path.getsize(out_path)}


def refuse_plaintext(path: str, plaintext: bool, why: str) -> None:
    if not plaintext:
        raise AuthenticationError(
            path, 0, f"this is a plaintext export (algorithm NONE): nothing in it is authenticated by a key, so "
            f"anyone who can write files could have made it; {why}",
            "pass plaintext=True (--plaintext on the command line) if you exported a plaintext store on purpose; "
            "otherwise do not use this file")


def inspect_export(path: str, kek: K.KeyEncryptionKey | None = None, *, plaintext: bool = False) -> dict:
    """Metadata without any key; with one (or an embedded KEK), the snapshot is authenticated too.

    A plaintext export cannot be authenticated: with a KEK given it is refused unless
    ``plaintext=True`` says a plaintext export is what the caller expects."""
    ex = ExportFile(path)
    sf = ex.snapshot_file()
    h = sf.header
    bundle = ex.bundle_doc() or sf.bundle_doc()
    info = {
        "path": path,
        "format_version": fmt.FORMAT_VERSION,
        "kek_embedded": ex.kek_embedded,
        "store_id": h.store_id.hex(),
        "index": h.index,
        "term": h.term,
        "algorithm": crypto.suite(h.algorithm).name,
        "key_id": h.key_id.hex(),
        "snapshot_bytes": ex.snapshot_length,
        "created_ns": ex.created_ns,
        "keys": [{"key_id": k["id"], "state": K.STATE_NAMES.get(k["state"], "?")} for k in bundle.get("keys", [])],
        "warnings": [],
        "verified": False,
    }
    if ex.kek_embedded:
        info["warnings"].append("this export embeds the key-encryption key: anyone holding the file can read "
                                "everything in it; run 'walcrypt snapshot redact' before storing or sending it")
    info["plaintext"] = h.algorithm == fmt.ALG_NONE
    if info["plaintext"] and kek is not None:
        refuse_plaintext(path, plaintext, "a KEK was given, so an encrypted export was expected")
    if kek is not None or ex.kek_embedded or (info["plaintext"] and plaintext):
        f = unlock_export(ex, kek, plaintext=plaintext)
        assert f.meta is not None            # unlock_export returns the file unlocked: its metadata decoded
        info["conf_state"] = {"voters": list(f.meta.conf_state.voters), "learners": list(f.meta.conf_state.learners)}
        info["data_bytes"] = f.verify()
        info["verified"] = True
    return info


def unlock_export(ex: ExportFile | SnapshotSource, kek: K.KeyEncryptionKey | None, *,
                  plaintext: bool = False) -> SnapshotFile:
    sf = ex.snapshot_file()
    h = sf.header
    if h.algorithm == fmt.ALG_NONE:
        refuse_plaintext(ex.path, plaintext, "it is used only when asked for explicitly")
        sf.unlock(crypto.suite(fmt.ALG_NONE).new(b""), bytes(fmt.COMMITMENT_SIZE))
        return sf
    if kek is None:
        if ex.kek is None:
            raise KeyProviderError(f"{ex.path} is encrypted and embeds no KEK: give the KEK it was made with")
        kek = K.RawKey(ex.kek)
    # The export's keyring is wrapped under the newest KEK.  parse_bundle checked every field (hex
    # lengths, numbers, the KEK parameters) before anything here uses them.
    doc = ex.bundle_doc() or sf.bundle_doc()
    entry = next((k for k in doc.get("keys", ()) if bytes.fromhex(k["id"]) == h.key_id), None)
    if entry is None:
        raise CorruptionError(ex.path, ex.snapshot_offset, "the export's keyring lacks the snapshot's data key",
                              "use another export, or the snapshot file of the store it was made from")
    store_id = bytes.fromhex(doc["store_id"])
    check = bytes.fromhex(doc["kek_check"]) if doc.get("kek_check") else None
    wrapped, purpose = bytes.fromhex(entry["wrapped"]), entry["purpose"]
    params = doc.get("kek_params")
    wrapper = kek.wrapper(params)
    cv = wrapper.check_value()
    if check is not None and cv is not None and not crypto.constant_time_equal(cv, check):
        raise WrongKeyError(f"the KEK given is not the one {ex.path} was exported under")
    dek = wrapper.unwrap(wrapped, K.wrap_context(store_id, h.key_id, purpose))
    key, commitment = snapshot_keys(dek, h)
    sf.unlock(crypto.suite(h.algorithm).new(key), commitment)
    return sf


def redact_export(path: str, *, out_path: str | None = None, kek_out: str | None = None) -> dict:
    """Remove an embedded KEK (optionally saving it to ``kek_out``, 0600).  In place unless ``out_path``."""
    ex = ExportFile(path)
    if not ex.kek_embedded:
        return {"path": out_path or path, "redacted": False}
    dest = out_path or path
    if os.path.islink(dest):
        raise SymlinkError(dest, f"{dest} is a symbolic link; redacting it would replace the link and leave the "
                                 f"KEK in the file it points to: redact {os.path.realpath(dest)} itself")
    # In place, the export must have no other name: the new file replaces this name only, and the KEK
    # would survive under the other one while redaction reports success.
    ifd = open_regular(path, exclusive=(os.path.abspath(dest) == os.path.abspath(path)))
    with os.fdopen(ifd, "rb") as inp:
        return _redact_into(ex, inp, dest, kek_out)


def _redact_into(ex: "ExportFile", inp, dest: str, kek_out: str | None) -> dict:
    assert ex.kek is not None                # redact_export returns early when no KEK is embedded
    if kek_out:
        try:
            fd = open_private(kek_out, detail=_link_detail(kek_out))
        except FileExistsError:
            raise UsageError(f"{kek_out} already exists; refusing to overwrite it") from None
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(ex.kek) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        DEFAULT_VFS.fsync_dir(os.path.dirname(os.path.abspath(kek_out)))
    tmp = dest + ".tmp"
    fd = open_private(tmp, replace_stale=True, detail=_link_detail(tmp))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(_header(0, 0, ex.snapshot_length, ex.store_id, 0, ex.bundle))
            out.write(ex.bundle)
            inp.seek(ex.snapshot_offset)
            _copy(inp, out)
            out.flush()
            os.fsync(out.fileno())
        DEFAULT_VFS.rename(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    DEFAULT_VFS.fsync_dir(os.path.dirname(os.path.abspath(dest)))
    return {"path": dest, "redacted": True, "kek_saved_to": kek_out}


class SnapshotSource:
    """A raw snapshot file (``.snap``, from a data directory) presented the way an export is: no
    embedded KEK and no export keyring, so its own keyring bundle supplies the wrapped data key (which
    the KEK of the store it came from unwraps; FORMAT.md 10.5)."""

    kek = None
    bundle = b""
    snapshot_offset = 0

    def __init__(self, path: str):
        self.path = path
        fd = open_regular(path)              # never blocks on a FIFO; only a regular file
        with os.fdopen(fd, "rb") as f:
            magic = f.read(len(fmt.SNAPSHOT_MAGIC))
        if magic != fmt.SNAPSHOT_MAGIC:
            raise CorruptionError(path, 0, "not a walcrypt snapshot file (bad magic)")

    @property
    def kek_embedded(self) -> bool:
        return False

    def bundle_doc(self) -> dict:
        return {}

    def snapshot_file(self) -> SnapshotFile:
        return SnapshotFile(DEFAULT_VFS, self.path)


def open_backup(path: str):
    """An export (ExportFile) or a raw snapshot file (SnapshotSource), told apart by their magic."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    with os.fdopen(fd, "rb") as f:
        magic = f.read(8)
    if magic == EXPORT_MAGIC:
        return ExportFile(path)
    if magic == fmt.SNAPSHOT_MAGIC:
        return SnapshotSource(path)
    raise UsageError(f"{path} is not a walcrypt snapshot export or snapshot file")
