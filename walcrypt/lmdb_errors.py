"""LMDB's errors as walcrypt errors that say what happened to the metadata database and what to do."""

from __future__ import annotations

import os

import lmdb

from .errors import WIPE_ADVICE, CorruptionError, LockedError, StorageError, UnsupportedFormatError, WalcryptError

MAP_SIZE = 1 << 30          # the LMDB map of meta/: walcrypt's own records stay far below it


DAMAGED_HINT = ("keep a copy of the data directory for analysis, then rebuild meta/ from the snapshot and segment "
                "files with the KEK ('walcrypt recover DIR --key-file K'), restore the node from a backup export "
                "('walcrypt snapshot restore EXPORT NEW_DIR'), or " + WIPE_ADVICE)


def lmdb_error(exc: "lmdb.Error", path: str, doing: str) -> WalcryptError:
    """The walcrypt error, saying what to do, for an LMDB error met while ``doing`` (e.g. "opening") the
    metadata database in ``path``.  Raise it ``from exc``: the LMDB error stays the cause."""
    data = os.path.join(path, "data.mdb")
    reason = getattr(exc, "reason", None) or str(exc)
    if isinstance(exc, lmdb.InvalidError):
        return CorruptionError(data, None, f"{doing} the metadata database failed: the file is not an LMDB "
                               "database (truncated, overwritten or replaced)", DAMAGED_HINT)
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadChecksumError, lmdb.PanicError,
                        lmdb.IncompatibleError, lmdb.BadValsizeError)):
        return CorruptionError(data, None, f"{doing} the metadata database failed: it is damaged "
                               f"(LMDB: {reason})", DAMAGED_HINT)
    if isinstance(exc, lmdb.VersionMismatchError):
        return UnsupportedFormatError(f"{data}: the metadata database was written by an LMDB library of another "
                                      "on-disk version; open it with the walcrypt installation (and py-lmdb build) "
                                      "that wrote it")
    if isinstance(exc, (lmdb.MapFullError, lmdb.TxnFullError)):
        return StorageError(f"{doing} the metadata database {path} failed: it is full (walcrypt maps at most "
                            f"{MAP_SIZE} bytes); nothing was committed. walcrypt's "
                            "own records stay far below this size: look for what filled it (large stable-store "
                            "values?); to carry the node on, export its newest snapshot ('walcrypt snapshot "
                            "export') and restore it into a new directory ('walcrypt snapshot restore')")
    if isinstance(exc, lmdb.ReadonlyError):
        return StorageError(f"{doing} the metadata database {path} failed: no permission to write it (or its "
                            "file system is mounted read-only); run as the user that owns the store, or remount "
                            "the file system read-write")
    if isinstance(exc, lmdb.DiskError):
        return StorageError(f"{doing} the metadata database {path} failed: no space left on the device; nothing "
                            "was committed - free space and run it again")
    if isinstance(exc, lmdb.LockError):
        return LockedError(f"{doing} the metadata database {path} failed: another process holds its lock; "
                           "stop it first")
    if isinstance(exc, (lmdb.ReadersFullError, lmdb.TlsFullError)):
        return StorageError(f"{doing} the metadata database {path} failed: too many readers at once (LMDB: "
                            f"{reason}); close other processes reading the store and try again")
    if isinstance(exc, lmdb.MemoryError):
        return StorageError(f"{doing} the metadata database {path} failed: out of memory or address space "
                            f"(walcrypt maps {MAP_SIZE} bytes); free memory, or raise the process's "
                            "address-space limit (ulimit -v)")
    if isinstance(exc, lmdb.InvalidParameterError):
        return StorageError(f"{doing} the metadata database {path} failed: LMDB refused it (EINVAL); the file "
                            "system may not support memory-mapped files (some network file systems do not): "
                            "keep the data directory on a local file system")
    return StorageError(f"{doing} the metadata database {path} failed: LMDB: {exc}")
