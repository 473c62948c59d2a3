"""pysyncobj's FileJournal and full-dump files (to be written)."""

from __future__ import annotations


def detect(path: str) -> list[dict]:
    return []
