"""A save's request, made ready in the caller's thread before it is queued for a write unit: its
entries validated (indexes contiguous, terms and sizes in bounds, types exact) and encoded into
ENTRIES record payloads (FORMAT.md 12).  A bad request fails in its own thread only, and with group
commit the next batch is prepared while the leader waits on fdatasync (see walcrypt.wal)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from itertools import accumulate
from typing import Sequence

from . import format as fmt
from .errors import UsageError
from .segment_codec import encode_entries, join_entries_payloads
from .types import Entry
from .values import (
    BYTES_TYPE,
    INT_TYPE,
    MAX_ENTRY_INDEX,
    THREE,
    U64_MAX,
    check_u64,
    checked_entries,
)

_INDEXABLE = frozenset({Entry, tuple, list})   # kept as given by the fast paths of prepare_entries


class Request:
    """One save(): validated, its entries and hard state already encoded as record payloads (by
    the calling thread)."""

    __slots__ = ("entries", "first", "records", "hardstate", "hs_record", "extra", "done", "error", "event")

    def __init__(self, entries, first: int, records: list, hardstate, hs_record):
        self.entries = entries
        self.first = first            # first entry index, 0 when there are no entries
        self.records = records
        self.hardstate = hardstate
        self.hs_record = hs_record
        self.extra: list = []
        self.done = False
        self.error: BaseException | None = None
        # Set when the request is settled or its thread is named the next leader (group commit: a
        # waiting requester sleeps on it instead of on the write lock).  None for the thread that
        # leads from the start, which never waits.
        self.event: threading.Event | None = None

    def finish(self, error: BaseException | None = None) -> None:
        """Settled: written durably (no error) or refused or failed (``error``).  Wakes its thread."""
        if error is not None:
            self.error = error
        self.done = True
        if self.event is not None:
            self.event.set()



def prepare_entries(entries, max_entry_size: int) -> tuple:
    """Validate a save's entries and encode them into ENTRIES record payloads.
    -> (entries, normalised where needed, records)

    Runs in the caller's thread, outside the write lock, so that with group commit
    the next batch is prepared while the leader waits on fdatasync, and so that a bad
    request fails in its own thread only."""
    if type(entries) is not list and type(entries) is not tuple:
        if isinstance(entries, (str, bytes, bytearray, memoryview, dict, Entry)):
            raise UsageError(f"entries must be a sequence of Entry, not {type(entries).__name__}")
        try:
            entries = list(entries)        # any iterable, read once (a dict or a set is refused above / below)
        except TypeError:
            raise UsageError(f"entries must be a sequence of Entry, not {type(entries).__name__}") from None
    n = len(entries)
    if not n:
        return entries, []
    if n == 1:                                 # the common Raft case, without the list machinery
        try:
            index, term, data = entries[0]
        except (TypeError, ValueError):
            index = term = data = None
        if not (type(entries[0]) in _INDEXABLE and type(index) is int and type(term) is int and type(data) is bytes
                and 0 < index <= MAX_ENTRY_INDEX and 0 < term <= U64_MAX):
            entries = checked_entries(entries)
            index, term, data = entries[0]
        size = len(data)
        if size > max_entry_size:
            raise UsageError(f"entry {index} is {size} bytes; the maximum entry size is "
                             f"{max_entry_size} (raise max_entry_size= when opening)")
        return entries, [(fmt.FRAME_ENTRIES, index, term, 1, encode_entries((term,), (size,), (data,)), (term,))]
    try:
        # Entries that can be indexed (the request keeps them and reads them by position) and have
        # three fields (zip stops at the shortest), taken apart into three columns in one C-level
        # pass; anything else is normalised by checked_entries.
        ok = set(map(type, entries)) <= _INDEXABLE and set(map(len, entries)) == THREE
        if ok:
            indexes, terms, datas = zip(*entries)
            ok = (set(map(type, indexes)) == INT_TYPE and set(map(type, terms)) == INT_TYPE
                  and set(map(type, datas)) == BYTES_TYPE)
    except (TypeError, IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        entries = checked_entries(entries)
        indexes, terms, datas = zip(*entries)
    first = indexes[0]
    if indexes != tuple(range(first, first + n)):
        k = next(k for k in range(n) if indexes[k] != first + k)
        raise UsageError(f"entries are not contiguous: index {indexes[k]} at position {k}, expected {first + k}")
    if first < 1:
        check_u64(first, "entries[0].index", 1, MAX_ENTRY_INDEX)              # raises
    if indexes[-1] > MAX_ENTRY_INDEX:
        check_u64(indexes[-1], f"entries[{n - 1}].index", 1, MAX_ENTRY_INDEX)  # raises
    if min(terms) < 1 or max(terms) > U64_MAX:
        k = next(k for k in range(n) if not 1 <= terms[k] <= U64_MAX)
        check_u64(terms[k], f"entry {first + k}: term", 1, U64_MAX)  # raises
    lengths = list(map(len, datas))
    if max(lengths) > max_entry_size:
        k = next(k for k in range(n) if lengths[k] > max_entry_size)
        raise UsageError(f"entry {first + k} is {lengths[k]} bytes; the maximum entry size is "
                         f"{max_entry_size} (raise max_entry_size= when opening)")
    return entries, split_records(first, terms, lengths, datas)

def encode_stored(entries) -> list:
    """ENTRIES records for entries read back from this store (a re-key or a migration rewrites
    them): no validation, they were accepted when they were saved."""
    return split_records(entries[0][0], [e[1] for e in entries], [len(e[2]) for e in entries],
                         [e[2] for e in entries])

def split_records(first: int, terms: Sequence[int], lengths: Sequence[int], datas: Sequence[bytes]) -> list:
    """Split entries into ENTRIES records (FORMAT.md 12): a record is closed once its data reaches
    RECORD_TARGET_BYTES or it holds RECORD_MAX_ENTRIES entries, and before an entry that would take
    its sealed payload beyond MAX_RECORD_PAYLOAD (the readers' bound, read at call time); such an
    entry starts the next record, where it fits alone (max_entry_size is capped at open)."""
    n = len(terms)
    records = []
    start = 0
    row = fmt.ENTRIES_ROW_SIZE
    room = fmt.MAX_RECORD_PAYLOAD - fmt.ENTRIES_RECORD_OVERHEAD - row   # data + rows beyond the first
    ends = list(accumulate(lengths, initial=0))      # ends[k]: the data of entries [0, k)
    if ends[n] + row * n <= room:
        # No record can reach the payload bound: a record ends at the first entry that brings its
        # data to the target (found by bisection over the running sums), or at the entry cap.
        target, cap = fmt.RECORD_TARGET_BYTES, fmt.RECORD_MAX_ENTRIES
        while start < n:
            stop = min(bisect_left(ends, ends[start] + target, start + 1), n, start + cap)
            t = terms[start:stop]
            records.append((fmt.FRAME_ENTRIES, first + start, terms[start], stop - start,
                            encode_entries(t, lengths[start:stop], datas[start:stop]), t))
            start = stop
        return records
    while start < n:
        stop = start + 1
        size = lengths[start]
        used = size
        limit = min(n, start + fmt.RECORD_MAX_ENTRIES)
        while stop < limit and size < fmt.RECORD_TARGET_BYTES:
            used += lengths[stop] + row
            if used > room:
                break
            size += lengths[stop]
            stop += 1
        t = terms[start:stop]
        payload = encode_entries(t, lengths[start:stop], datas[start:stop])
        records.append((fmt.FRAME_ENTRIES, first + start, terms[start], stop - start, payload, t))
        start = stop
    return records


def coalesce_records(records: list) -> list:
    """One write unit's records with adjacent small ENTRIES records merged, as split_records would
    have made them had the entries come in one save: a record is closed once its data reaches
    RECORD_TARGET_BYTES or it holds RECORD_MAX_ENTRIES entries, and never grows beyond
    MAX_RECORD_PAYLOAD.  Group commit gathers many one-entry saves into a unit; one record for them
    is one seal, one frame header and one index row instead of one per save.  Only records whose
    indexes follow each other are merged; any other record (a snapshot record, the hard state)
    ends a run and keeps its place.  Every record was validated when its save was prepared."""
    out: list = []
    run: list = []
    count = data = size = 0
    target, max_entries = fmt.RECORD_TARGET_BYTES, fmt.RECORD_MAX_ENTRIES
    limit = fmt.MAX_RECORD_PAYLOAD - fmt.TAG_SIZE
    prefix, row = fmt.ENTRIES_PREFIX_STRUCT.size, fmt.ENTRIES_ROW_SIZE
    for rec in records:
        if rec[0] == fmt.FRAME_ENTRIES:
            n, p = rec[3], len(rec[4])
            if (run and data < target and count + n <= max_entries and size + p - prefix <= limit
                    and run[-1][1] + run[-1][3] == rec[1]):
                run.append(rec)
                count, data, size = count + n, data + p - prefix - row * n, size + p - prefix
                continue
            if run:
                out.append(_merged(run, count))
            run, count, data, size = [rec], n, p - prefix - row * n, p
            continue
        if run:
            out.append(_merged(run, count))
            run = []
        out.append(rec)
    if run:
        out.append(_merged(run, count))
    return out


def _merged(run: list, count: int) -> tuple:
    """The ENTRIES record holding the entries of the records ``run`` (FORMAT.md 4.4: count,
    reserved, every term, every length, every entry's data)."""
    if len(run) == 1:
        return run[0]
    payload = join_entries_payloads([rec[4] for rec in run], [rec[3] for rec in run], count)
    terms = tuple(t for rec in run for t in rec[5])
    return (fmt.FRAME_ENTRIES, run[0][1], run[0][2], count, payload, terms)
