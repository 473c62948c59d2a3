"""etcd v3 member directories (to be written)."""

from __future__ import annotations


def detect(path: str) -> list[dict]:
    return []
