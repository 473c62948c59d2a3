"""Final review of 1275fe7..3f1e718 (queued DEK rotations started in the completing commit, segment
pinning and the re-reads of wal_reads.REREADS).  Each test is a break found there; it failed on the
reviewed code and passes since its fix: a long read that meets a released segment goes on in the
new segments only when no truncation or log reset replaced part of the log meanwhile
(LogReads.replacements), else it ends with CompactedError as before the re-reads."""

from __future__ import annotations

import wctest

from walcrypt import CompactedError, Entry, HardState


def test_iter_batches_across_a_truncation_and_purge_never_mixes_two_logs(tmp_path):
    s = wctest.open_store(str(tmp_path / "data"), sync="batch", segment_size=4096)
    try:
        for i in range(1, 41):
            s.save(HardState(1, 0, i), [Entry(i, 1, b"x%d-" % i + b"x" * 100)])
        assert len(s.wal.segments) >= 5                     # 7 records a segment
        got: list[tuple[int, int]] = []
        err = None
        try:
            for b in s.iter_batches(1, 41):                  # bounded: 40 entries
                got += [(i, t) for i, t, _d in b.tuples()]
                if got[-1][0] == 10 and len(got) == 10:
                    # the host's other thread, as a new leader's AppendEntries lands: entries from
                    # 12 replaced by term 2, then a compaction (any purge) removes superseded segments
                    s.save(HardState(2, 0, 12), [Entry(i, 2, b"new%d" % i) for i in range(12, 45)])
                    s.compact(2)
        except CompactedError as exc:
            err = exc
        if err is None:
            terms = dict(got)
            # either the log as it was (all term 1) or as it is now (term 2 from 12): never both
            old = all(terms[i] == 1 for i in range(1, 41))
            new = all(terms[i] == (1 if i < 12 else 2) for i in range(1, 41))
            assert old or new, f"a mix of two logs was handed out: {got[10:16]}"
    finally:
        s.close()
