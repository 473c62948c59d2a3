"""The snapshot and leftover half of the verification walk (a mixin of walcrypt.check_walk.Walk):
every registered snapshot authenticated chunk by chunk, and files the metadata does not list
(segments, snapshots, data of the other mode) told apart as the open would treat them."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from . import layout, online, snapinfo
from . import meta as M
from .errors import (
    CorruptionError,
    StorageError,
    WalcryptError,
)
from .findings import METADATA, SEGMENT, Finding, Removed, WalkHost
from .snapinfo import SNAP_NAME, decode_info
from .snapshot import SnapshotFile
from .snapstore import bind_to_registry

if TYPE_CHECKING:
    from typing import Literal

    from .findings import LEFTOVER


class LeftoverChecks(WalkHost):
    """Checking snapshots and unlisted files (see the module docstring)."""

    # Host contract: provided by Walk (check_walk.py), beyond findings.WalkHost.
    _migration_recorded: bool

    if TYPE_CHECKING:
        def warn(self, path: str | None, detail: str, hint: str | None = None, kind: str = LEFTOVER) -> None: ...

    def _fresh_if_live(self) -> "online.FrozenMeta | None":
        """While a writer holds the store: a fresh copy of the metadata, taken after a directory was
        listed, to tell the writer's files in progress from leftovers (None otherwise)."""
        return self.fresh() if self.is_live() else None

    def leftover_segments(self, known: set[int]) -> None:
        """Files of the segment directory the manifest does not list, each with what a read-write open
        really does with it (Store.orphan_fate: the engine's own rule, told without acting)."""
        d = os.path.join(self.path, layout.pair_for(self.encrypted).wal)
        if not os.path.isdir(d):
            return
        names = sorted(os.listdir(d))
        fresh = self._fresh_if_live()
        rules = None
        for name in names:
            p = os.path.join(d, name)
            m = layout.SEGMENT_NAME.match(name)
            if name.endswith(".broken") or re.search(r"\.broken\.\d+$", name):
                self.warn(p, "copy of a segment kept by an earlier repair (a torn tail cut, or a damaged segment "
                             "set aside)",
                          "keep it for analysis or remove it; the store does not read it")
            elif name.endswith(".unlisted"):
                self.warn(p, "file kept aside by an earlier open: it was not in the manifest and not known to be "
                             "a leftover; the store does not read it", "inspect it, then remove it")
            elif m and int(m.group(1), 16) not in known:
                if fresh is not None and self._writers_segment(int(m.group(1), 16), p, fresh):
                    continue
                if rules is None:
                    try:
                        with self.meta.read() as r:
                            self.st.load_orphan_rules(r)
                        rules = True
                    except StorageError:
                        rules = False
                if not rules:
                    self.warn(p, "segment file not listed in the manifest; the metadata that decides what becomes "
                                 "of it is damaged (see the errors above), so no open gets as far as it")
                    continue
                try:
                    fate, why, hint = self.st.orphan_fate(p, int(m.group(1), 16), int(m.group(2), 16))
                except WalcryptError as exc:
                    self.error(exc, SEGMENT)
                    continue
                if fate == "refuse":
                    self.report.findings.append(Finding("error", p, None, f"{why}; every open refuses this store",
                                                        kind=METADATA, hint=hint))
                elif fate == "delete":
                    self.warn(p, f"segment file not listed in the manifest: {why}; the next read-write open "
                                 "deletes it")
                else:
                    self.warn(p, f"segment file not listed in the manifest: {why}; the next read-write open keeps "
                                 f"it aside as {name}.unlisted and deletes nothing", hint)
            elif not m:
                self.warn(p, "unexpected file in the segment directory; the store neither reads nor removes it")

    def _writers_segment(self, seg_id: int, path: str, fresh) -> bool:
        """A segment file the running writer is creating, has registered or is removing since the copy."""
        staging = sorted(fresh.state_ids(M.K_STAGING))
        return (seg_id in fresh.ids(M.DB_SEGMENTS) or seg_id in fresh.state_ids(M.K_CREATING)
                or seg_id in fresh.state_ids(M.K_PURGED) or (len(staging) == 2 and staging[0] <= seg_id < staging[1])
                or seg_id >= (self.meta.counter(M.K_NEXT_SEGMENT) or 0) or not os.path.lexists(path))

    def snapshot_infos(self, rows) -> list:
        snap_dir = os.path.join(self.path, layout.pair_for(self.encrypted).snap)
        infos = []
        for k, raw in rows:
            sid = int.from_bytes(k, "big")
            try:
                infos.append(decode_info(sid, self.meta.open_value(M.DB_SNAPSHOTS, k, raw), snap_dir, self.meta.path))
            except StorageError as exc:
                f = self.error(exc, METADATA)
                f.detail = f"registry record of snapshot {sid}: {f.detail}"
        return sorted(infos, key=lambda i: i.snapshot_id)

    def check_snapshot(self, info) -> int:
        """Authenticate one registered snapshot end to end; returns its data size (Removed when the
        writer removed it meanwhile)."""
        st = self.st
        if not self.vfs.pinned(info.path) and not os.path.lexists(info.path):
            if self.removed_meanwhile(M.DB_SNAPSHOTS, info.snapshot_id):
                raise Removed
            raise CorruptionError(info.path, None, "registered snapshot file is missing")
        fsize = self.fsize(info.path)
        counted = 0
        try:
            f = bind_to_registry(st, st.vfs, info)
            total = 0
            for chunk in f.chunks():
                total += len(chunk)
                step = min(len(chunk), fsize - counted)
                counted += step
                self.advance(step)
            if total != info.size:
                raise CorruptionError(info.path, None, f"snapshot holds {total} bytes, the registry says {info.size}")
            return total
        finally:
            self.advance(fsize - counted)

    def leftover_snapshots(self, known: set[str], in_log: set[int]) -> None:
        """Files of the snapshot directory the registry does not list, each with what a read-write open
        really does with it (snapinfo.orphan_fate, the rule Snapshots._remove_orphans acts on)."""
        d = os.path.join(self.path, layout.pair_for(self.encrypted).snap)
        if not os.path.isdir(d):
            return
        names = sorted(os.listdir(d))
        fresh = self._fresh_if_live()
        rules: tuple[set[int], set[int] | None, int] | Literal[False] | None = None   # False: unreadable
        for name in names:
            p = os.path.join(d, name)
            m = SNAP_NAME.match(name)
            if fresh is not None and (name.startswith(".tmp-") or (m and name not in known and self._writers_snapshot(
                    int(name[:16], 16), p, fresh))):
                continue                # a save in progress, or registered or dropped since the copy
            if name.endswith(".broken"):
                self.warn(p, "snapshot quarantined because it failed its checks",
                          "keep it for analysis or remove it; the store does not read it")
            elif name.startswith(".tmp-"):
                self.warn(p, "partly written snapshot (its save never returned); the next read-write open deletes it")
            elif SNAP_NAME.match(name) and name not in known:
                snap_id = int(name[:16], 16)
                if rules is None:
                    try:
                        with self.meta.read() as r:
                            nxt = r.get(M.DB_STATE, M.K_NEXT_SNAPSHOT)
                            creating = r.get(M.DB_STATE, M.K_SNAP_CREATING)
                            purged = set(M.decode_ids(r.get(M.DB_STATE, M.K_SNAP_PURGED), self.meta.path))
                        rules = (purged, None if creating is None else set(M.decode_ids(creating, self.meta.path)),
                                 int.from_bytes(nxt, "little") if nxt else 1)
                    except StorageError:
                        rules = False
                if not rules:
                    self.warn(p, "snapshot file not in the registry; the metadata that decides what becomes of it "
                                 "is damaged (see the errors above), so no open gets as far as it")
                    continue
                purged, intents, next_id = rules
                fate = snapinfo.orphan_fate(snap_id, purged=purged, intents=intents, next_id=next_id,
                                             in_log=lambda snap_id=snap_id: snap_id in in_log)
                if fate == snapinfo.REGISTER:
                    self.warn(p, "snapshot saved and tied to the log (its SNAPSHOT record) but not registered: its "
                                 "registration did not commit; the next read-write open registers it (or sets it "
                                 "aside as .broken if it fails its checks)")
                elif fate == snapinfo.DELETE:
                    why = ("the latest retention removed it from the registry" if snap_id in purged else
                           "its save never got past its commit point (no SNAPSHOT record in the log)")
                    self.warn(p, f"snapshot file not in the registry: {why}; the next read-write open deletes it")
                else:
                    try:
                        ours = SnapshotFile(self.st.vfs, p).header.store_id == self.st.store_id
                    except StorageError:
                        ours = False
                    if ours:
                        exc = snapinfo.unaccounted_snapshot(p, snap_id, next_id)
                        self.report.findings.append(Finding(
                            "error", p, None, f"{exc.detail}; a read-write open refuses this store", kind=METADATA,
                            hint=exc.hint))
                    else:
                        self.warn(p, "file named like a snapshot but not a snapshot of this store; opening leaves "
                                     "it in place and the store does not read it", "inspect it, then remove it")
            elif not SNAP_NAME.match(name):
                self.warn(p, "unexpected file in the snapshot directory; the store neither reads nor removes it")

    def _writers_snapshot(self, snap_id: int, path: str, fresh) -> bool:
        """A snapshot file the running writer is saving, has registered or is dropping since the copy."""
        return (snap_id in fresh.ids(M.DB_SNAPSHOTS) or snap_id in fresh.state_ids(M.K_SNAP_CREATING)
                or snap_id in fresh.state_ids(M.K_SNAP_PURGED)
                or snap_id >= (self.meta.counter(M.K_NEXT_SNAPSHOT) or 1) or not os.path.lexists(path))

    def other_mode(self) -> None:
        other = layout.pair_for(not self.encrypted)
        if layout.has_data(self.path, other):
            what = "legacy plaintext" if self.encrypted else "encrypted"
            self.warn(os.path.join(self.path, other.wal),
                      f"{what} data of an earlier mode is still present in {other.wal}/ and {other.snap}/",
                      "'walcrypt migrate DIR --to {} --remove-source' removes it".format(
                          "encrypted" if self.encrypted else "plaintext"))
        for name in (".migrate-wal", ".migrate-snap"):
            p = os.path.join(self.path, name)
            if os.path.isdir(p):
                if self._migration_recorded:
                    self.warn(p, "temporary directory of an interrupted migration",
                              "the next read-write open removes it; run 'walcrypt migrate' again")
                else:
                    self.warn(p, "temporary directory of an interrupted migration, but no migration is recorded: "
                                 "opening the store leaves it alone", "the next 'walcrypt migrate' replaces it; "
                                 "otherwise remove it")
