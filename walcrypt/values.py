"""Range checks of what callers pass in (indexes, terms, hard states, entry data), made in the
caller's thread before anything is queued (FORMAT.md 13): a bad argument fails its own call with a
UsageError and never another caller's save."""

from __future__ import annotations

import operator
import struct

from . import format as fmt
from .errors import (
    UsageError,
)
from .types import Entry, HardState

U64_MAX = (1 << 64) - 1


# The index after an entry must fit the u64 base index of the segment that follows it.
MAX_ENTRY_INDEX = U64_MAX - 1


INT_TYPE = {int}


BYTES_TYPE = {bytes}


THREE = {3}


def check_u64(value, what: str, lo: int, hi: int) -> int:
    """``value`` as a plain int in [lo, hi] (anything ``operator.index`` accepts), or a UsageError
    naming ``what``."""
    try:
        v = operator.index(value)
    except TypeError:
        raise UsageError(f"{what} must be an integer, not {type(value).__name__}") from None
    if not lo <= v <= hi:
        if v == 0 and lo == 1 and "term" in what:
            raise UsageError(f"{what} is 0; entry terms start at 1 (FORMAT.md, section 13)")
        raise UsageError(f"{what} is {v}; it must be between {lo} and {hi}")
    return v


def as_bytes(data, what: str) -> bytes:
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        raise UsageError(f"{what} must be bytes-like, not str (encode it first)")
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise UsageError(f"{what} must be bytes-like, not {type(data).__name__}") from None


def checked_entries(entries) -> list[Entry]:
    """The slow path of validation: every entry checked and normalised (plain ints, bytes)."""
    out = []
    for k, e in enumerate(entries):
        try:
            index, term, data = e
        except (TypeError, ValueError):
            raise UsageError(f"entries[{k}] is not an Entry(index, term, data)") from None
        index = check_u64(index, f"entries[{k}].index", 1, MAX_ENTRY_INDEX)
        term = check_u64(term, f"entry {index}: term", 1, U64_MAX)
        out.append(Entry(index, term, as_bytes(data, f"entry {index}: data")))
    return out


def hardstate_record(hardstate) -> tuple:
    """(normalised HardState, its HARDSTATE record), validated; raises UsageError naming the field."""
    try:
        payload = fmt.HARDSTATE_STRUCT.pack(*hardstate)
    except (struct.error, TypeError):
        try:
            fields = tuple(hardstate)
        except TypeError:
            fields = ()
        if len(fields) != 3:
            raise UsageError("hard_state must be a HardState(term, vote, commit)") from None
        for name, v in zip(HardState._fields, fields):
            check_u64(v, f"hard_state.{name}", 0, U64_MAX)
        raise UsageError(f"hard_state {hardstate!r} cannot be encoded") from None
    hs = hardstate
    if not (type(hs) is HardState and type(hs[0]) is int and type(hs[1]) is int and type(hs[2]) is int):
        hs = new_tuple(HardState, fmt.HARDSTATE_STRUCT.unpack(payload))    # plain ints from here on
    return hs, (fmt.FRAME_HARDSTATE, 0, hs[0], 0, payload, None)


new_tuple = tuple.__new__      # builds an Entry without NamedTuple's Python-level __new__ (hot read path)


def describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
