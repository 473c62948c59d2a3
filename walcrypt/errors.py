"""The typed exception hierarchy.

Two families never mix: a caller's mistake (:class:`UsageError`) and bad bytes on
disk (:class:`StorageError`).  Every message says what happened, where (file,
offset, index) and what to do next.  No message ever contains key material.
"""

from __future__ import annotations

import errno

__all__ = [
    "WalcryptError",
    "UsageError",
    "CompactedError",
    "UnavailableError",
    "WalcryptKeyError",
    "KeyNotFoundError",
    "WrongKeyError",
    "KeyProviderError",
    "KeyProviderUnavailableError",
    "StorageError",
    "CorruptionError",
    "AuthenticationError",
    "UnsupportedFormatError",
    "SymlinkError",
    "UnsafeFileError",
    "LockedError",
    "StoreFailedError",
]


# Advice that ends in wiping a node says what that does to Raft (README, "Wiping a node"): the node's
# term and vote are gone with its data, and a node that forgot its vote can vote twice in one term.
WIPE_NOTE = ("wiping erases the node's Raft term and vote: remove the node from the cluster before it restarts "
             "empty and add it back as a new member (as a learner or non-voter until it has caught up, where the "
             "Raft library has them), so it cannot vote twice in one term; pysyncobj: removeNodeFromCluster, "
             "then addNodeToCluster for its address, with dynamicMembershipChange=True")
WIPE_ADVICE = f"wipe it and let Raft re-replicate it ({WIPE_NOTE})"


class WalcryptError(Exception):
    """Base class of every error walcrypt raises on purpose."""


class UsageError(WalcryptError, ValueError):
    """The caller misused the API: closed store, non-contiguous entries, bad options."""


class CompactedError(WalcryptError):
    """The requested index lies before the first retained index (etcd ErrCompacted)."""


class UnavailableError(WalcryptError):
    """The requested index lies after the last index (etcd ErrUnavailable)."""


class WalcryptKeyError(WalcryptError):
    """Base of the key family (named so it does not shadow the builtin KeyError)."""



class KeyNotFoundError(WalcryptKeyError):
    """A key ID named on disk is not in the keyring (or was destroyed)."""


class WrongKeyError(WalcryptKeyError):
    """The key-encryption key given cannot unwrap this store's data keys."""


class KeyProviderError(WalcryptKeyError):
    """A KEK provider could not produce or use its key (missing file, bad mode, KMS failure)."""


class KeyProviderUnavailableError(KeyProviderError):
    """The key service holding the KEK could not be reached (connection refused, timed out, sealed,
    a server error) after the configured retries.  An outage, not a wrong key and not damage: nothing
    was changed, and the same call succeeds once the service is back."""


class StorageError(WalcryptError):
    """What is on disk is bad.  Fuzz invariant: parsers raise only this family on bad input."""


class CorruptionError(StorageError):
    """Bytes on disk fail their checks.  Carries the file, the offset and a detail."""

    def __init__(self, path: str | None, offset: int | None, detail: str, hint: str | None = None):
        self.path = path
        self.offset = offset
        self.detail = detail
        self.hint = hint
        where = ""
        if path is not None:
            where = f"{path}"
            if offset is not None:
                where += f" at offset {offset}"
            where += ": "
        message = where + detail
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class AuthenticationError(CorruptionError):
    """An AEAD tag, chain value or MAC failed: tampering, or data from elsewhere."""


class UnsupportedFormatError(StorageError):
    """An unknown format version or algorithm ID."""


class SymlinkError(StorageError):
    """A symbolic link where walcrypt expects a file or directory of its own.

    walcrypt never follows a link inside its data directory (nor when it writes an export, a key
    file or a temporary file): the link's target is not read, written, truncated or chmodded."""

    def __init__(self, path: str, detail: str | None = None):
        self.path = path
        super().__init__(detail or (f"{path} is a symbolic link; walcrypt never follows links inside its data "
                                    "directory; remove it"))


class UnsafeFileError(StorageError):
    """Not a file walcrypt can call its own where it expects one: a FIFO, device, socket or directory
    where a regular file should be, or a file that another name shares (a hard link) where walcrypt
    writes, truncates or chmods.

    walcrypt never opens such a name blocking and never writes through it: what it names is left
    untouched.  ``path`` names it; ``reason`` is ``"not-regular"`` or ``"hard-link"``."""

    def __init__(self, path: str, reason: str, detail: str):
        self.path = path
        self.reason = reason
        super().__init__(detail)


class LockedError(WalcryptError):
    """Another process (or another open store in this one) holds the data directory."""


class StoreFailedError(WalcryptError):
    """An earlier write or fsync failed; the store refuses writes until it is reopened."""


def os_error_advice(exc: OSError) -> str:
    """What to do about a file error met while opening or changing a store (for messages)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "the disk (or quota) is full: free space and run it again; nothing was lost"
    if code in (errno.EACCES, errno.EPERM):
        return "no permission: run as the user that owns the store"
    if code == errno.EROFS:
        return "the file system is mounted read-only: remount it read-write to run this"
    if code == errno.EIO:
        return "the disk reported an I/O error: check the device (kernel log) before anything else"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files: raise the limit (ulimit -n) and run it again"
    return "if the disk is full or failing, fix that and run it again; nothing was lost"
