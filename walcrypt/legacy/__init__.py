"""Adopting data a Raft library wrote before walcrypt, and handing it back.

* :mod:`walcrypt.legacy.pysyncobj_files` - pysyncobj's ``FileJournal`` file and full-dump file,
  imported into an encrypted store the pysyncobj adapter resumes from.
* :mod:`walcrypt.legacy.etcd` - etcd v3 member directories (``member/wal``, ``member/snap``):
  imported into an encrypted store, and exported back to a member directory etcd boots from.

Everything read from those files is untrusted input: parsed with bounds, checked with the
format's own checksums, and refused with a typed error naming the file and offset.  The sources
are never modified.  Optional libraries (pysyncobj, protobuf) are loaded only when a parser needs them.
"""

from __future__ import annotations

from . import etcd, pysyncobj_detect


def detect(path: str) -> list[dict]:
    """What legacy Raft data ``path`` holds (for ``walcrypt inspect``): one dict per finding, with
    ``kind``, ``paths``, ``detail`` and ``command`` (the import command that adopts it)."""
    return pysyncobj_detect.detect(path) + etcd.detect(path)
