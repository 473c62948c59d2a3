"""Fixtures of the engine test suite.  Shared helpers live in tests/wctest.py."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import walcrypt  # noqa: E402

import wctest  # noqa: E402


@pytest.fixture
def data_dir(tmp_path) -> str:
    """A fresh, not yet existing data directory path."""
    return str(tmp_path / "data")


@pytest.fixture
def kek_bytes() -> bytes:
    return wctest.KEK_BYTES


@pytest.fixture
def kek(kek_bytes) -> walcrypt.RawKey:
    return walcrypt.RawKey(kek_bytes)


@pytest.fixture
def open_store(data_dir, kek):
    """open_store(path=data_dir, **opts) -> an open Store (closed at teardown if still open)."""
    opened = []

    def _open(path=None, **opts):
        opts.setdefault("kek", kek if opts.get("encrypted", True) else None)
        s = wctest.open_store(path or data_dir, **opts)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        try:
            s.close()
        except Exception:  # noqa: BLE001 - teardown of a store a test may have broken on purpose
            pass


@pytest.fixture
def marker() -> str:
    """A string that must never reach the disk in clear in an encrypted store."""
    return "WALCRYPT-SECRET-MARKER-7f3c9a1e"
