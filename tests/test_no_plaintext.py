"""No plaintext reaches the disk: entry data and hard state are sealed in every file, LMDB included.

The same workload against a plaintext store (encrypted=False) must show the marker, so the
scanner itself is known to work and these tests can fail.
"""

from __future__ import annotations

import base64
import os

import pytest

import walcrypt
from walcrypt import Entry, HardState

import wctest


def _encodings(marker: bytes) -> dict[str, bytes]:
    out = {
        "raw": marker,
        "utf-16-le": marker.decode().encode("utf-16-le"),
        "hex": marker.hex().encode(),
        "HEX": marker.hex().upper().encode(),
    }
    # base64 of the marker at each of the three alignments (inner, alignment-independent part)
    for shift in range(3):
        b64 = base64.b64encode(b"\x00" * shift + marker)
        out[f"base64+{shift}"] = b64[4:-4]
    return out


def _int_markers(marker: bytes) -> tuple[int, int]:
    """Two 63-bit integers carved from the marker, for the hard state's vote and commit."""
    v = int.from_bytes(marker[:8], "little") & (2**63 - 1)
    c = int.from_bytes(marker[8:16], "little") & (2**63 - 1)
    return v, c


def _write_workload(store, marker: bytes, segment_count_hint: int = 4) -> None:
    vote, commit = _int_markers(marker)
    long_marker = marker * 4000                              # ~120 KiB: larger than a segment
    idx = 1
    for r in range(120):
        data = b"prefix-" + marker + b"-%d-" % r + marker
        ents = [Entry(idx + k, 3, data) for k in range(20)]
        store.save(hard_state=HardState(3, vote, commit), entries=ents)
        idx += 20
    store.save(entries=[Entry(idx, 3, long_marker)])
    idx += 1
    store.save(entries=[Entry(idx, 4, marker)])            # a one-entry record of just the marker
    store.save(hard_state=HardState(4, vote, commit))        # a hard-state-only record
    # suffix replacement and compaction leave the marker in new places too
    store.save(entries=[Entry(idx - 5, 5, marker + b"-replaced")])
    store.compact(100)


def _hits(root: str, needles: dict[str, bytes]) -> list[tuple[str, str]]:
    hits = []
    for path in wctest.all_files(root):
        blob = wctest.read(path)
        for name, needle in needles.items():
            if needle in blob:
                hits.append((os.path.relpath(path, root), name))
    return hits


@pytest.fixture
def marker_bytes(marker) -> bytes:
    return marker.encode()


def test_encrypted_store_holds_no_plaintext(data_dir, marker_bytes, kek):
    s = wctest.open_store(data_dir, kek=kek)
    _write_workload(s, marker_bytes)
    s.close()
    files = wctest.all_files(data_dir)
    assert any("meta" in f for f in files), "LMDB files must be part of the scan"
    assert len(wctest.segment_files(data_dir)) >= 3
    needles = _encodings(marker_bytes)
    vote, commit = _int_markers(marker_bytes)
    needles["vote-le"] = vote.to_bytes(8, "little")
    needles["commit-le"] = commit.to_bytes(8, "little")
    assert _hits(data_dir, needles) == []


def test_encrypted_store_holds_no_plaintext_when_not_closed(data_dir, marker_bytes):
    """The same check on an unsealed store left by a process that exited without close()."""
    res = wctest.run_child("write", data_dir, "--batches", "40", "--batch-size", "30", "--end", "exit")
    assert res.stdout.startswith("LAST")
    s = wctest.open_store(data_dir)
    nxt = s.last_index() + 1
    vote, commit = _int_markers(marker_bytes)
    s.save(hard_state=HardState(99, vote, commit), entries=[Entry(nxt, 99, marker_bytes * 3)])
    # leave this process's segment unsealed too: copy the directory while the store is open
    snapshot = wctest.copy_store(data_dir, data_dir + "-copy")
    s.close()
    needles = _encodings(marker_bytes)
    needles["vote-le"] = vote.to_bytes(8, "little")
    for root in (data_dir, snapshot):
        assert _hits(root, needles) == []


def test_kek_never_reaches_the_data_directory(data_dir, marker_bytes, kek_bytes):
    s = wctest.open_store(data_dir, kek=walcrypt.RawKey(kek_bytes))
    _write_workload(s, marker_bytes)
    s.close()
    needles = {"kek-raw": kek_bytes, "kek-hex": kek_bytes.hex().encode(),
               "kek-b64": base64.b64encode(kek_bytes)[:40], "kek-half": kek_bytes[:16]}
    assert _hits(data_dir, needles) == []


def test_plaintext_store_does_show_the_marker(data_dir, marker_bytes):
    """Sanity check of the scanner: the legacy plaintext format keeps entry data in clear."""
    s = wctest.open_store(data_dir, encrypted=False)
    _write_workload(s, marker_bytes)
    s.close()
    hits = _hits(data_dir, _encodings(marker_bytes))
    assert any(name == "raw" and path.startswith(wctest.PLAIN_DIR) for path, name in hits), hits
