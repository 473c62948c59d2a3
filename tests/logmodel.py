"""The log model shared by the crash-point and exception-injection enumerations: what a store holds
(first index, entries, hard state, newest snapshot), how each operation changes it, and how a real
store is observed in the same terms."""

from __future__ import annotations

from dataclasses import dataclass, replace

from walcrypt import Entry, HardState

import snaptest as T
import wctest


@dataclass(frozen=True)
class State:
    first: int
    entries: tuple = ()
    hs: HardState = HardState()
    snap: tuple | None = None          # (index, term)

    @property
    def last(self) -> int:
        return self.first - 1 + len(self.entries)

    def save(self, ents, hs=None) -> "State":
        keep = self.entries[:max(0, ents[0].index - self.first)] if ents else self.entries
        return replace(self, entries=tuple(keep) + tuple(ents), hs=hs if hs is not None else self.hs)

    def truncate(self, index: int) -> "State":
        return replace(self, entries=self.entries[:max(0, index - self.first)])

    def compact(self, index: int) -> "State":
        return replace(self, first=index + 1, entries=tuple(e for e in self.entries if e.index > index))

    def snapshot(self, index: int, term: int) -> "State":
        reset = index > self.last or (index >= self.first and self.entries[index - self.first].term != term)
        st = replace(self, snap=(index, term))
        return replace(st, first=index + 1, entries=()) if reset else st



def observe(s) -> State:
    first, last = s.first_index(), s.last_index()
    ents = tuple(s.entries(first, last + 1)) if last >= first else ()
    for e in ents:
        assert s.term(e.index) == e.term
    snap = s.snapshot()
    if snap is not None:
        assert snap.data == T.snap_data(snap.meta.index, 1500), "snapshot data differs"
    return State(first, ents, s.initial_state()[0], (snap.meta.index, snap.meta.term) if snap else None)


def ents(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(i, term, wctest.entry_data(i, 24 + i % 40)) for i in range(lo, hi)]
