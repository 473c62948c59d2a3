"""walcrypt: an encrypted, crash-safe write-ahead log and snapshot store for Raft.

The public surface is exactly ``__all__`` (pinned by tests/test_public_api.py).
"""

from .errors import (AuthenticationError, CompactedError, CorruptionError, KeyNotFoundError,
                     KeyProviderError, LockedError, StorageError, StoreFailedError, UnavailableError,
                     UnsupportedFormatError, UsageError, WalcryptError, WalcryptKeyError, WrongKeyError)
from .keys import EnvKey, KeyEncryptionKey, KeyFile, Kms, KmsPlugin, Passphrase, RawKey, generate_key_file
from .storage import Store, open
from .types import ConfState, Entry, HardState, SnapshotMeta

__version__ = "0.1.0"

__all__ = [
    "open", "Store",
    "Entry", "HardState", "ConfState", "SnapshotMeta",
    "KeyEncryptionKey", "RawKey", "KeyFile", "Passphrase", "EnvKey", "Kms", "KmsPlugin", "generate_key_file",
    "WalcryptError", "UsageError", "CompactedError", "UnavailableError",
    "WalcryptKeyError", "KeyNotFoundError", "WrongKeyError", "KeyProviderError",
    "StorageError", "CorruptionError", "AuthenticationError", "UnsupportedFormatError",
    "LockedError", "StoreFailedError",
    "__version__",
]
