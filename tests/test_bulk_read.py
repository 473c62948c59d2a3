"""Store.iter_batches / Store.iter_entries, the bulk read of a host replaying its log.

* Over generated logs (many small segments, suffix replacement, truncation, compaction, log
  resets by snapshot and by reset_log, reopens, crashes with and without a torn tail, read windows
  from smaller than one frame to many records) they hand out exactly what ``entries()`` returns and
  what the model holds, for the whole log and for random ranges.
* A damaged or tampered record in the middle of the log raises what ``entries()`` raises (the same
  class, file and offset), and no entry after it is ever delivered; every entry before it is.
* The range is checked when the call is made; a closed store is not read; a range compacted away
  while it is read raises CompactedError; what is handed out is never shared with the read cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import walcrypt
from walcrypt import (
    AuthenticationError,
    CompactedError,
    ConfState,
    CorruptionError,
    Entry,
    EntryBatch,
    SnapshotMeta,
    UnavailableError,
    UsageError,
)
from walcrypt import format as fmt
from walcrypt import segment

import wctest

KEK = walcrypt.RawKey(wctest.KEK_BYTES)
OPTS = dict(segment_size=16384, sync="none")
# Crashes are copies of the directory, so the disk's durability plays no part in the generated runs:
# they run on tmpfs where there is one (fsyncs then cost nothing).
SHM = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _data(index: int, term: int, size: int) -> bytes:
    head = b"%d/%d|" % (index, term)
    return (head * (size // len(head) + 1))[:size]


def _consume(it) -> tuple[list, BaseException | None]:
    """What an iterator delivered before it ended or raised, and what it raised."""
    got = []
    try:
        for x in it:
            got.append(x)
    except walcrypt.WalcryptError as exc:
        return got, exc
    return got, None


def _bulk(store, lo: int, hi: int) -> list[tuple]:
    """The range through iter_entries, checked against iter_batches and EntryBatch's accessors."""
    got = list(store.iter_entries(lo, hi))
    via_batches = []
    nxt = lo
    for b in store.iter_batches(lo, hi):
        assert isinstance(b, EntryBatch) and len(b) >= 1
        assert b.first == nxt and b.last == nxt + len(b) - 1
        assert len(b.offsets) == len(b) + 1
        ents = b.entries()
        assert all(type(e) is Entry for e in ents)
        assert [e.data for e in ents] == b.datas() == [b.data(k) for k in range(len(b))]
        assert [b.size(k) for k in range(len(b))] == [len(e.data) for e in ents]
        assert list(b.tuples()) == [tuple(e) for e in ents]
        via_batches.extend(tuple(e) for e in ents)
        nxt = b.last + 1
    assert via_batches == got
    return got


class BulkReadMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="walcrypt-bulk-read-", dir=SHM)
        self.generation = 0
        self.path = self._next_path()
        self.store = walcrypt.open(self.path, kek=KEK, **OPTS)
        self.first = 1                  # the model: the log's first index and its (index, term, data)
        self.log: list[tuple[int, int, bytes]] = []
        self.term = 1
        self.tearable: tuple[int, list] | None = None    # (first, log) before an append a crash may tear
        self.saved_window = segment.READ_WINDOW

    def _next_path(self) -> str:
        self.generation += 1
        return os.path.join(self.root, f"store{self.generation}")

    @property
    def last(self) -> int:
        return self.first - 1 + len(self.log)

    def _save(self, lo: int, sizes: list[int]) -> None:
        ents = [Entry(lo + k, self.term, _data(lo + k, self.term, size)) for k, size in enumerate(sizes)]
        self.store.save(entries=ents)
        self.log = self.log[:lo - self.first] + [tuple(e) for e in ents]

    # ------------------------------------------------------------------ rules
    @rule(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=20))
    def append(self, sizes):
        before = (self.first, list(self.log))
        active = self.store.wal.active
        self._save(self.last + 1, sizes)
        # A crash may tear this unit only if it went into a segment that already held committed units.
        self.tearable = before if active is not None and self.store.wal.active is active else None

    @rule(saves=st.integers(2, 30), per_save=st.integers(1, 40), size=st.integers(0, 1200))
    def grow(self, saves, per_save, size):
        """Many saves: the log spans several segments."""
        for k in range(saves):
            self._save(self.last + 1, [(size * (j + k + 1)) % 1201 for j in range(per_save)])
        self.tearable = None

    @rule(back=st.integers(1, 50), sizes=st.lists(st.integers(0, 1500), min_size=1, max_size=10))
    def replace_suffix(self, back, sizes):
        lo = max(self.first, self.last - back + 1)
        if lo > self.last:
            return
        self.term += 1
        self._save(lo, sizes)
        self.tearable = None

    @rule(back=st.integers(1, 50))
    def truncate(self, back):
        index = max(self.first, self.last - back + 1)
        if index > self.last:
            return
        self.store.truncate(index)
        self.log = self.log[:index - self.first]
        self.tearable = None

    @rule(k=st.integers(1, 200))
    def compact(self, k):
        index = self.first - 1 + k
        if index > self.last:
            return
        self.store.compact(index)
        self.log = self.log[index - self.first + 1:]
        self.first = index + 1
        self.tearable = None

    @rule(ahead=st.integers(0, 5), by_snapshot=st.booleans())
    def reset(self, ahead, by_snapshot):
        index = self.last + ahead + (1 if by_snapshot else 0)
        self.term += 1
        if by_snapshot:
            self.store.save_snapshot(SnapshotMeta(index, self.term, ConfState(voters=(1,))), b"state %d" % index)
        else:
            self.store.reset_log(index, self.term)
        self.first, self.log = index + 1, []
        self.tearable = None

    @rule()
    def reopen(self):
        self.store.close()
        self.store = walcrypt.open(self.path, kek=KEK, **OPTS)
        self.tearable = None

    @rule(tear=st.booleans())
    def crash(self, tear):
        """The data directory as a crash leaves it (copied while the store is open); with ``tear``,
        the COMMIT frame of the last append never reached the disk, so recovery drops that unit."""
        path = self._next_path()
        shutil.copytree(self.path, path)
        self.store.close()
        if tear and self.tearable is not None:
            newest = wctest.segment_files(path)[-1]
            data = bytearray(wctest.read(newest))
            commit = [f for f in wctest.parse_frames(bytes(data)) if f.type == fmt.FRAME_COMMIT][-1]
            data[commit.offset:commit.next] = bytes(commit.next - commit.offset)
            wctest.write(newest, bytes(data))
            self.first, self.log = self.tearable
            event("a crash tore the last unit")
        self.path = path
        self.store = walcrypt.open(self.path, kek=KEK, **OPTS)
        self.tearable = None

    @rule(window=st.sampled_from([64, 5000, 40_000, 1 << 20]))
    def read_window(self, window):
        segment.READ_WINDOW = window

    @rule(data=st.data())
    def read_range(self, data):
        lo = data.draw(st.integers(self.first, self.last + 1))
        hi = data.draw(st.integers(lo, self.last + 1))
        want = self.log[lo - self.first:hi - self.first]
        assert [tuple(e) for e in self.store.entries(lo, hi)] == want
        assert _bulk(self.store, lo, hi) == want

    # ------------------------------------------------------------------ invariants
    @invariant()
    def whole_log_reads_the_same(self):
        s = self.store
        event(f"segments in the log: {min(len(s.wal.view_seg), 4)}{'+' if len(s.wal.view_seg) >= 4 else ''}")
        assert (s.first_index(), s.last_index()) == (self.first, self.last)
        want = [tuple(e) for e in s.entries(self.first, self.last + 1)]
        assert want == self.log
        assert _bulk(s, self.first, self.last + 1) == want

    def teardown(self):
        segment.READ_WINDOW = self.saved_window
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


BulkReadMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_bulk_read_matches_entries_and_the_model = BulkReadMachine.TestCase


# ---------------------------------------------------------------------- tampering

BATCH, LENGTH, BATCHES = 10, 100, 300


@pytest.fixture(scope="module")
def sealed_store(tmp_path_factory) -> tuple[str, list[tuple]]:
    """A closed store of several sealed segments, and its log."""
    path = str(tmp_path_factory.mktemp("bulk-tamper") / "store")
    log = []
    with wctest.open_store(path) as s:
        for b in range(BATCHES):
            ents = wctest.make_entries(1 + b * BATCH, 1 + (b + 1) * BATCH, length=LENGTH)
            s.save(entries=ents)
            log.extend(tuple(e) for e in ents)
    assert len(wctest.segment_files(path)) >= 4
    return path, log


def _middle_entries_frame(path: str) -> tuple[str, wctest.Frame]:
    segs = wctest.segment_files(path)
    seg = segs[len(segs) // 2]
    frames = [f for f in wctest.parse_frames(wctest.read(seg)) if f.type == fmt.FRAME_ENTRIES]
    return seg, frames[len(frames) // 2]


def _flip_payload(data: bytearray, f) -> None:
    wctest.flip_bit(data, wctest.frame_field_flip_position(f, "payload"))


def _flip_payload_fix_crc(data: bytearray, f) -> None:
    _flip_payload(data, f)
    wctest.fix_frame_crc(data, f.offset)


def _flip_tag_fix_crc(data: bytearray, f) -> None:
    wctest.flip_bit(data, wctest.frame_field_flip_position(f, "tag"))
    wctest.fix_frame_crc(data, f.offset)


def _index_field_fix_crc(data: bytearray, f) -> None:
    o, size = wctest.FRAME_FIELDS["index"]
    data[f.offset + o:f.offset + o + size] = (f.index + 1).to_bytes(size, "little")
    wctest.fix_frame_crc(data, f.offset)


def _length_field(data: bytearray, f) -> None:
    o, size = wctest.FRAME_FIELDS["length"]
    data[f.offset + o:f.offset + o + size] = (fmt.MAX_RECORD_PAYLOAD + 1).to_bytes(size, "little")


TAMPERS = {
    "payload bit (CRC fixed)": (_flip_payload_fix_crc, AuthenticationError),
    "tag bit (CRC fixed)": (_flip_tag_fix_crc, AuthenticationError),
    "index field (CRC fixed)": (_index_field_fix_crc, AuthenticationError),
    "payload bit": (_flip_payload, CorruptionError),
    "length field": (_length_field, CorruptionError),
}


@pytest.mark.parametrize("window", [64, 4096, None])
@pytest.mark.parametrize("name", list(TAMPERS))
def test_a_tampered_record_raises_before_anything_after_it(sealed_store, tmp_path, monkeypatch, name, window):
    src, log = sealed_store
    path = wctest.copy_store(src, str(tmp_path / "store"))
    seg, f = _middle_entries_frame(path)
    tamper, kind = TAMPERS[name]
    data = bytearray(wctest.read(seg))
    tamper(data, f)
    wctest.write(seg, bytes(data))
    if window is not None:
        monkeypatch.setattr(segment, "READ_WINDOW", window)
    with wctest.open_store(path) as s:
        lo, hi = s.first_index(), s.last_index() + 1
        with pytest.raises(CorruptionError) as want:
            s.entries(lo, hi)
        assert type(want.value) is kind
        assert (want.value.path, want.value.offset) == (seg, f.offset)
        before = log[:f.index - lo]                      # every entry of the records before the bad one
        for it in (s.iter_entries(lo, hi), (e for b in s.iter_batches(lo, hi) for e in b.tuples())):
            got, exc = _consume(it)
            assert type(exc) is kind and (exc.path, exc.offset, exc.detail) == (
                want.value.path, want.value.offset, want.value.detail)
            assert got == before
        # A range starting after the bad record never touches it; one starting inside it raises first.
        assert list(s.iter_entries(f.index + f.count, hi)) == log[f.index + f.count - lo:]
        got, exc = _consume(s.iter_entries(f.index + 1, hi))
        assert got == [] and type(exc) is kind


def test_a_record_tampered_under_an_open_store(tmp_path):
    """The active segment, modified behind the writer's back: the read path authenticates it too."""
    path = str(tmp_path / "store")
    with wctest.open_store(path, segment_size=1 << 20) as s:
        log = []
        for b in range(40):
            ents = wctest.make_entries(1 + b * BATCH, 1 + (b + 1) * BATCH, length=LENGTH)
            s.save(entries=ents)
            log.extend(tuple(e) for e in ents)
        (seg,) = wctest.segment_files(path)
        frames = [f for f in wctest.parse_frames(wctest.read(seg)) if f.type == fmt.FRAME_ENTRIES]
        f = frames[len(frames) // 2]
        data = bytearray(wctest.read(seg))
        _flip_payload_fix_crc(data, f)
        with open(seg, "r+b") as fh:
            fh.seek(f.offset)
            fh.write(data[f.offset:f.next])
        got, exc = _consume(s.iter_entries(1, s.last_index() + 1))
        assert type(exc) is AuthenticationError and (exc.path, exc.offset) == (seg, f.offset)
        assert got == log[:f.index - 1]
        with pytest.raises(AuthenticationError):
            s.entries(1, s.last_index() + 1)


# ---------------------------------------------------------------------- the API's edges

def test_range_errors_are_raised_by_the_call(tmp_path):
    with wctest.open_store(str(tmp_path / "store")) as s:
        s.save(entries=wctest.make_entries(1, 101))
        s.compact(10)
        for call in (s.iter_entries, s.iter_batches):
            with pytest.raises(CompactedError):
                call(10, 20)
            with pytest.raises(UnavailableError):
                call(50, 102)
            with pytest.raises(UsageError):
                call(20, 19)
            with pytest.raises(UsageError):
                call(-1, 5)
            assert list(call(20, 20)) == []
        assert list(s.iter_entries(101, 101)) == []


def test_a_closed_store_is_not_read(tmp_path):
    s = wctest.open_store(str(tmp_path / "store"), segment_size=1 << 20)
    for b in range(100):
        s.save(entries=wctest.make_entries(1 + b * 50, 1 + (b + 1) * 50, length=1000))
    it = s.iter_entries(1, s.last_index() + 1)
    first = next(it)
    assert first[0] == 1
    s.close()
    with pytest.raises(UsageError):
        list(it)                # the records already read may be handed out; no read after the close
    with pytest.raises(UsageError):
        s.iter_entries(1, 2)


def test_a_range_compacted_while_it_is_read(tmp_path):
    path = str(tmp_path / "store")
    with wctest.open_store(path, segment_size=16384) as s:
        log = []
        for b in range(100):
            ents = wctest.make_entries(1 + b * BATCH, 1 + (b + 1) * BATCH, length=LENGTH)
            s.save(entries=ents)
            log.extend(tuple(e) for e in ents)
        nsegs = len(wctest.segment_files(path))
        assert nsegs >= 8
        it = s.iter_entries(1, s.last_index() + 1)
        got = [next(it)]
        s.compact(700)          # the segments below are deleted while the iterator is in the first one
        assert len(wctest.segment_files(path)) <= nsegs - 4
        more, exc = _consume(it)
        got += more
        assert got == log[:len(got)]            # what was read before the purge, nothing invented
        assert type(exc) is CompactedError and len(got) < 700
        assert list(s.iter_entries(701, s.last_index() + 1)) == log[700:]


def test_batches_are_not_shared_with_the_read_cache(tmp_path):
    with wctest.open_store(str(tmp_path / "store")) as s:
        s.save(entries=wctest.make_entries(1, 41))
        assert [tuple(e) for e in s.entries(3, 5)] == [tuple(e) for e in wctest.make_entries(3, 5)]  # cached
        for b in s.iter_batches(3, 5):
            b.terms[0] = 99
            b.offsets[0] = 0
        assert s.entries(3, 5) == wctest.make_entries(3, 5)


def test_large_entries_across_windows(tmp_path, monkeypatch):
    """Entries larger than the read window, and records straddling window boundaries."""
    monkeypatch.setattr(segment, "READ_WINDOW", 4096)
    with wctest.open_store(str(tmp_path / "store"), segment_size=1 << 20) as s:
        ents = [Entry(i, 1, _data(i, 1, (i * 7919) % 20000)) for i in range(1, 200)]
        for k in range(0, len(ents), 7):
            s.save(entries=ents[k:k + 7])
        want = [tuple(e) for e in ents]
        assert _bulk(s, 1, 200) == want
        s.close()
        with wctest.open_store(str(tmp_path / "store")) as s2:
            assert _bulk(s2, 1, 200) == want
            assert _bulk(s2, 50, 150) == want[49:149]
