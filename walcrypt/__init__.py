"""walcrypt: an encrypted, crash-safe write-ahead log and snapshot store for Raft.

The public surface is exactly ``__all__`` (pinned by tests/test_public_api.py).
"""

from .errors import (
                     AuthenticationError,
                     CompactedError,
                     CorruptionError,
                     KeyNotFoundError,
                     KeyProviderError,
                     KeyProviderUnavailableError,
                     LockedError,
                     StorageError,
                     StoreFailedError,
                     UnavailableError,
                     UnsupportedFormatError,
                     UsageError,
                     WalcryptError,
                     WalcryptKeyError,
                     WrongKeyError,
)
from .keys import EnvKey, KeyEncryptionKey, KeyFile, Passphrase, RawKey, generate_key_file
from .kms import Kms, KmsPlugin, Retry
from .opening import open
from .storage import Store
from .types import ConfState, Entry, EntryBatch, HardState, SnapshotMeta

__version__ = "0.1.0"

__all__ = [
    "open", "Store",
    "Entry", "EntryBatch", "HardState", "ConfState", "SnapshotMeta",
    "KeyEncryptionKey", "RawKey", "KeyFile", "Passphrase", "EnvKey", "Kms", "KmsPlugin", "Retry",
    "generate_key_file",
    "WalcryptError", "UsageError", "CompactedError", "UnavailableError",
    "WalcryptKeyError", "KeyNotFoundError", "WrongKeyError", "KeyProviderError",
    "KeyProviderUnavailableError",
    "StorageError", "CorruptionError", "AuthenticationError", "UnsupportedFormatError",
    "LockedError", "StoreFailedError",
    "__version__",
]
