"""``walcrypt.open``: open or create a data directory in the mode it was asked for, and migrate
between plaintext and encrypted only when that is asked for explicitly.

Whatever a call builds and does not hand to its caller (interrupted, or a migration's source store)
is closed here, so its directory lock and LMDB environment are released."""

from __future__ import annotations

import os
from typing import Any

from . import keys as K
from . import layout
from . import meta as M
from .errors import WIPE_ADVICE, KeyProviderError, StorageError, UsageError, os_error_advice
from .migrate import Progress
from .migrate import migrate as run_migration
from .storage import Store


def close_fully(closable: Store | M.Meta) -> None:
    """Close a store (or metadata environment) the caller never sees: if close() itself is
    interrupted (KeyboardInterrupt), it is called again to release what is left (the directory
    lock, the LMDB environment), then the interruption propagates."""
    try:
        closable.close()
    except BaseException:
        closable.close()
        raise


def stored_mode(path: str | os.PathLike[str]) -> bool | None:
    """True/False for an existing encrypted/plaintext store, None when there is none yet."""
    meta_dir = os.path.join(os.fspath(path), layout.META_DIR)
    if not os.path.isdir(meta_dir):
        return None
    m = M.Meta(meta_dir, readonly=True)
    try:
        with m.read() as r:
            v = r.raw(M.DB_STORE, M.K_ENCRYPTED)
    finally:
        try:
            m.close()
        except BaseException:                # interrupted: close again (LMDB allows one handle per process)
            m.close()
            raise
    return None if v is None else v == b"\x01"


def open(path: str | os.PathLike[str], *, kek: K.KeyEncryptionKey | None = None, encrypted: bool = True,
         migrate: bool = False, decrypt_existing: bool = False, migration_progress: Progress | None = None,
         **options: Any) -> Store:
    """Open (creating if needed) a walcrypt data directory.  Encrypted unless ``encrypted=False``.

    Migration between the modes is always an explicit act, never a side effect of the
    arguments: a plaintext store opened with ``encrypted=True`` and a KEK is migrated to
    encrypted only with ``migrate=True`` (otherwise it is a UsageError: anyone who can write
    the directory could have planted that plaintext store), and an encrypted store opened
    with ``encrypted=False`` is decrypted only with ``migrate=True`` (or its older spelling
    ``decrypt_existing=True``) and its KEK.  ``migration_progress(stage, done, total)``
    reports progress."""
    built: list[Store] = []                  # every store this call built, returned or not
    try:
        return _open(os.fspath(path), kek, encrypted, migrate or decrypt_existing, migration_progress, options, built)
    except BaseException as exc:
        # Interrupted (KeyboardInterrupt) after a store was built but before it reached the caller:
        # nobody else can close it, so its lock and files are released here.
        for st in built:
            close_fully(st)
        if isinstance(exc, OSError):         # a file error anywhere in open or migration: typed, with a hint
            raise StorageError(f"opening {path} failed: {exc} ({os_error_advice(exc)}; an interrupted migration "
                               "is redone)") from exc
        raise


def _open(path: str, kek: K.KeyEncryptionKey | None, encrypted: bool, migrate: bool,
          migration_progress: Progress | None, options: dict,
          built: list) -> Store:
    if options.get("read_only") or not layout.looks_like_store(path):
        return Store(path, kek=kek, encrypted=encrypted, _holder=built, **options)
    held: list = []                      # the lock, even if we are interrupted storing it
    try:
        lock = layout.DirLock(path, holder=held)     # before reading anything: no writer can be active
        have = stored_mode(path)
        if have is None or have == encrypted:
            if not encrypted and migrate:
                kek = None                   # already plaintext (a finished migration): nothing to decrypt
            return Store(path, kek=kek, encrypted=encrypted, _dirlock=lock, _holder=built, **options)
        if not encrypted and not migrate:
            raise UsageError(f"{path} is encrypted; opening it as plaintext would decrypt every record on disk. "
                             "Pass migrate=True (and its kek=) to migrate it, or open it with its kek=")
        if encrypted and kek is None:
            raise KeyProviderError(f"{path} is a plaintext store: open it with encrypted=False, or pass kek=... "
                                   "and migrate=True to encrypt it")
        if encrypted and not migrate:
            raise UsageError(
                f"{path} holds a plaintext store, but a KEK was given for an encrypted one. walcrypt never adopts "
                "plaintext data implicitly: if this node's store was encrypted, its metadata was replaced and "
                "must not be trusted (restore it from a backup, or " + WIPE_ADVICE + "); to encrypt a plaintext "
                "store on purpose, open it with migrate=True (or run 'walcrypt migrate DIR --to encrypted')")
        src = Store(path, kek=kek if have else None, encrypted=have, _dirlock=lock, _holder=built, **options)
        try:
            run_migration(src, to_encrypted=encrypted, kek=kek, algorithm=options.get("algorithm", "aes-256-gcm"),
                          progress=migration_progress)
        except BaseException as exc:
            src.wal.fail(exc)                # nothing more is written; the next open redoes the migration
            raise
        finally:
            close_fully(src)
        return Store(path, kek=kek if encrypted else None, encrypted=encrypted, _holder=built, **options)
    except BaseException:
        for held_lock in held:           # our lock, unless a store we built and lost is holding it
            held_lock.release()          # idempotent: a store it was handed to may have released it
        raise
