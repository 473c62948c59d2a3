"""Group commit merges the small ENTRIES records of the saves it writes in one unit
(walcrypt.wal_requests.coalesce_records).  Generated: any sequence of saves' records, merged, must
hold exactly the same entries in the same order, keep every other record in its place, respect
the record limits (RECORD_TARGET_BYTES, RECORD_MAX_ENTRIES, MAX_RECORD_PAYLOAD) and never merge
records whose indexes do not follow each other.  End to end: many threads' one-entry saves are
written as few records and read back byte for byte after a reopen and by ``verify``."""

from __future__ import annotations

import threading

import wctest
from hypothesis import given, settings
from hypothesis import strategies as st

from walcrypt import Entry, HardState, RawKey
from walcrypt import format as fmt
from walcrypt.check import check
from walcrypt.segment_codec import decode_entries_payload
from walcrypt.wal_requests import coalesce_records, prepare_entries

OTHER = (fmt.FRAME_SNAPSHOT, 0, 0, 0, b"a snapshot record", None)


def _entries_of(records: list) -> list[tuple[int, int, bytes]]:
    out = []
    for ftype, index, term, count, payload, terms in records:
        if ftype != fmt.FRAME_ENTRIES:
            continue
        batch = decode_entries_payload(payload, index, count, path="unit", offset=0)
        assert list(batch.terms) == list(terms)
        assert term == terms[0]
        out.extend((index + k, batch.terms[k], batch.data(k)) for k in range(count))
    return out


saves = st.lists(
    st.one_of(
        st.just("snapshot"),
        st.tuples(st.integers(1, 70), st.integers(0, 2),
                  st.lists(st.integers(0, 3000), min_size=1, max_size=40)),   # (gap?, new term?, sizes)
    ),
    min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(saves, st.sampled_from([None, 4096, 1 << 20]), st.sampled_from([None, 7]))
def test_coalesced_records_hold_the_same_entries_within_the_limits(plan, target, max_entries):
    with _Limits(target, max_entries):
        records = []
        index, term = 1, 1
        for save in plan:
            if save == "snapshot":
                records.append(OTHER)
                continue
            gap, bump, sizes = save
            if gap == 1:
                index += 5                       # not contiguous: must not be merged with the previous
            term += bump
            entries = [Entry(index + k, term, bytes([k % 251]) * n) for k, n in enumerate(sizes)]
            records.extend(prepare_entries(entries, fmt.MAX_ENTRY_SIZE_DEFAULT)[1])
            index += len(sizes)
        merged = coalesce_records(records)
        assert _entries_of(merged) == _entries_of(records)
        assert [r for r in merged if r[0] != fmt.FRAME_ENTRIES] == [r for r in records if r[0] != fmt.FRAME_ENTRIES]
        # every other record keeps its place between the same entries
        assert [(r[0], i) for i, r in enumerate(_positions(merged)) if r[0] != fmt.FRAME_ENTRIES] == \
               [(r[0], i) for i, r in enumerate(_positions(records)) if r[0] != fmt.FRAME_ENTRIES]
        by_first = {r[1]: r for r in records if r[0] == fmt.FRAME_ENTRIES}
        for r in merged:
            if r[0] != fmt.FRAME_ENTRIES or r[1] in by_first and by_first[r[1]] is r:
                continue
            assert r[3] <= fmt.RECORD_MAX_ENTRIES
            assert len(r[4]) + fmt.TAG_SIZE <= fmt.MAX_RECORD_PAYLOAD
            parts = [by_first[i] for i in range(r[1], r[1] + r[3]) if i in by_first]
            assert sum(p[3] for p in parts) == r[3]          # made of whole records
            before_last = sum(len(p[4]) - 8 - 12 * p[3] for p in parts[:-1])
            assert before_last < fmt.RECORD_TARGET_BYTES, "grown after reaching the target"
        # nothing merged across a gap
        for r in merged:
            if r[0] == fmt.FRAME_ENTRIES:
                idx = [e[0] for e in _entries_of([r])]
                assert idx == list(range(r[1], r[1] + r[3]))


def _positions(records: list) -> list:
    """Each record once per entry it holds (others once): where other records sit among entries."""
    out = []
    for r in records:
        out.extend([r] * r[3] if r[0] == fmt.FRAME_ENTRIES else [r])
    return out


class _Limits:
    def __init__(self, target, max_entries):
        self.saved = (fmt.RECORD_TARGET_BYTES, fmt.RECORD_MAX_ENTRIES)
        self.target, self.max_entries = target, max_entries

    def __enter__(self):
        if self.target is not None:
            fmt.RECORD_TARGET_BYTES = self.target
        if self.max_entries is not None:
            fmt.RECORD_MAX_ENTRIES = self.max_entries

    def __exit__(self, *exc):
        fmt.RECORD_TARGET_BYTES, fmt.RECORD_MAX_ENTRIES = self.saved


def test_many_writers_one_entry_saves_share_records(tmp_path):
    d = str(tmp_path / "data")
    s = wctest.open_store(d, sync="batch")
    seq = threading.Lock()
    nxt = [1]
    written: dict[int, bytes] = {}
    errors: list = []

    def writer(w: int):
        try:
            for k in range(150):
                with seq:
                    i = nxt[0]
                    nxt[0] += 1
                    data = b"w%d k%d " % (w, k) * 30
                    written[i] = data
                for _ in range(1000):
                    try:
                        s.save(HardState(1, 0, 0), [Entry(i, 1, data)])
                        break
                    except Exception as exc:  # noqa: BLE001 - a gap is resubmitted, anything else reported
                        if "gap" not in str(exc):
                            raise
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()
    assert not errors, errors
    n = len(written)
    records = sum(len(seg.rec_index) for seg in s.wal.segments)
    saves_per_sync = n / s.fsync_count
    s.close()
    assert records < n, "no two saves of a unit shared a record"
    if saves_per_sync > 1.5:
        assert records < n / 1.2
    with wctest.open_store(d, sync="batch") as s2:
        assert s2.entries(1, n + 1) == [Entry(i, 1, written[i]) for i in range(1, n + 1)]
    report = check(d, kek=RawKey(wctest.KEK_BYTES))
    assert report.ok, report.findings


def _model_split(sizes: list[int]) -> list[int]:
    """The counts of the records a save of entries of ``sizes`` must become (FORMAT.md 12), entry by
    entry: a record ends after the entry that brings its data to RECORD_TARGET_BYTES, at
    RECORD_MAX_ENTRIES, or before an entry that would take its sealed payload (8-byte prefix, 12
    bytes per entry, data, 16-byte tag) beyond MAX_RECORD_PAYLOAD."""
    counts: list[int] = []
    cur: list[int] = []
    for n in sizes:
        if cur and (sum(cur) >= fmt.RECORD_TARGET_BYTES or len(cur) >= fmt.RECORD_MAX_ENTRIES
                    or 8 + 12 * (len(cur) + 1) + sum(cur) + n + 16 > fmt.MAX_RECORD_PAYLOAD):
            counts.append(len(cur))
            cur = []
        cur.append(n)
    return counts + [len(cur)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=120),
       st.sampled_from([None, 100, 4096]), st.sampled_from([None, 3, 50]), st.sampled_from([None, 6000, 60000]))
def test_a_save_is_split_into_records_by_the_format_rule(sizes, target, max_entries, max_payload):
    saved = fmt.MAX_RECORD_PAYLOAD
    try:
        with _Limits(target, max_entries):
            if max_payload is not None:
                fmt.MAX_RECORD_PAYLOAD = max_payload
            entries = [Entry(7 + k, 2, bytes([k % 256]) * n) for k, n in enumerate(sizes)]
            records = prepare_entries(entries, min(max(sizes), fmt.max_entry_size_bound()))[1] \
                if max(sizes) <= fmt.max_entry_size_bound() else None
            if records is None:
                return                              # an entry too large for any record: refused elsewhere
            assert [r[3] for r in records] == _model_split(sizes)
            assert _entries_of(records) == [(e.index, e.term, e.data) for e in entries]
    finally:
        fmt.MAX_RECORD_PAYLOAD = saved
