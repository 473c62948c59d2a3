"""The public surface of walcrypt is exactly ``__all__``; every name in it resolves."""

from __future__ import annotations

import importlib

import walcrypt

EXPECTED_ALL = [
    "AuthenticationError",
    "CompactedError",
    "ConfState",
    "CorruptionError",
    "Entry",
    "EntryBatch",
    "EnvKey",
    "HardState",
    "KeyEncryptionKey",
    "KeyFile",
    "KeyNotFoundError",
    "KeyProviderError",
    "KeyProviderUnavailableError",
    "Kms",
    "KmsPlugin",
    "LockedError",
    "Passphrase",
    "RawKey",
    "Retry",
    "SnapshotMeta",
    "StorageError",
    "Store",
    "StoreFailedError",
    "UnavailableError",
    "UnsupportedFormatError",
    "UsageError",
    "WalcryptError",
    "WalcryptKeyError",
    "WrongKeyError",
    "__version__",
    "generate_key_file",
    "open",
]


def test_all_is_pinned():
    assert sorted(walcrypt.__all__) == EXPECTED_ALL
    assert len(walcrypt.__all__) == len(set(walcrypt.__all__)), "duplicate names in __all__"


def test_every_name_resolves():
    mod = importlib.import_module("walcrypt")
    for name in EXPECTED_ALL:
        assert hasattr(mod, name), name
        assert getattr(mod, name) is not None, name


def test_star_import_matches_all():
    ns: dict = {}
    exec("from walcrypt import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == EXPECTED_ALL


def test_error_hierarchy():
    W = walcrypt
    for cls in (W.UsageError, W.CompactedError, W.UnavailableError, W.WalcryptKeyError, W.StorageError,
                W.LockedError, W.StoreFailedError):
        assert issubclass(cls, W.WalcryptError)
    for cls in (W.KeyNotFoundError, W.WrongKeyError, W.KeyProviderError):
        assert issubclass(cls, W.WalcryptKeyError)
    assert issubclass(W.CorruptionError, W.StorageError)
    assert issubclass(W.AuthenticationError, W.CorruptionError)
    assert issubclass(W.UnsupportedFormatError, W.StorageError)
    assert not issubclass(W.UsageError, W.StorageError)
    assert not issubclass(W.WalcryptKeyError, KeyError), "must not shadow the builtin KeyError"


def test_version_is_a_string():
    assert isinstance(walcrypt.__version__, str) and walcrypt.__version__
