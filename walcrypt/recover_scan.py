"""Reading what a data directory holds without its metadata, for walcrypt.recover: snapshot and
segment files authenticated under keys the KEK unwraps from snapshot bundles (others set aside),
and the log assembled from them - only entries above the newest snapshot, with what is lost
described - into a Plan that walcrypt.recover applies."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

from . import crypto, layout
from . import format as fmt
from . import keys as K
from . import meta as M
from .bounded import FileSource
from .errors import WIPE_NOTE, CorruptionError, KeyNotFoundError, StorageError, UsageError, WalcryptError, WrongKeyError
from .segment import Segment
from .segment_codec import SegmentIdentity, decode_header
from .snapshot import SnapshotFile, snapshot_keys
from .storage import Store
from .vfs import DEFAULT_VFS
from .wal import Wal

log = logging.getLogger("walcrypt")


SNAP_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
TMP_META = ".recover-meta"
ASIDE = ".unlisted"

RAFT_NOTE = (
    "The stable store lived only in meta/ and is lost: a host that keeps its Raft term and vote there "
    "(hashicorp's CurrentTerm/LastVoteTerm/LastVoteCand, the pysyncobj adapter) has forgotten its vote, and a "
    "node that forgot its vote can vote twice in one term. Treat the node like a wiped one (" + WIPE_NOTE + "). "
    "pysyncobj also loses the adapter's term offset (pysyncobj/term-offset): do not start a pysyncobj node on "
    "the rebuilt store as it is; use it to read the state, or rejoin the node empty. Hosts that keep term and "
    "vote in the WAL's hard state (etcd-style save(hard_state=...)) keep them.")


@dataclass
class _Snap:
    path: str
    snapshot_id: int
    index: int
    term: int
    key_id: bytes
    digest: bytes
    size: int
    store_id: bytes
    bundle: dict
    dek: bytes


@dataclass
class Plan:
    """What a rebuild would do; ``report()`` is its JSON form."""
    path: str
    meta_status: str = "missing"
    store_id: bytes | None = None
    snapshots: list = field(default_factory=list)          # adopted _Snap, by ID
    segments: list = field(default_factory=list)           # adopted Segment, by ID
    keys: dict = field(default_factory=dict)               # key ID -> (secret, bundle entry)
    kek_params: dict | None = None
    aside: list = field(default_factory=list)              # (path, reason): renamed .unlisted by apply
    ignored: list = field(default_factory=list)            # (path, reason): left as they are
    compacted: tuple = (0, 0, 0)                           # (index, term, reset segment)
    first_index: int = 1
    last_index: int = 0
    hard_state: tuple | None = None
    next_segment: int = 1
    next_snapshot: int = 1
    lost: list = field(default_factory=list)
    blocking: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.blocking and self.store_id is not None

    def report(self) -> dict:
        active = active_key(self)
        return {
            "path": self.path, "meta": self.meta_status, "can_apply": self.ok,
            "store_id": self.store_id.hex() if self.store_id else None,
            "snapshots": [{"id": s.snapshot_id, "index": s.index, "term": s.term, "key_id": s.key_id.hex(),
                           "size": s.size, "file": os.path.basename(s.path)} for s in self.snapshots],
            "segments": [{"id": s.seg_id, "first_index": s.base_index, "last_index": s.last_index,
                          "key_id": s.ident.key_id.hex(), "sealed": s.sealed, "file": os.path.basename(s.path)}
                         for s in self.segments],
            "keys": [{"key_id": kid.hex(), "state": "active" if kid == active else "retiring"}
                     for kid in sorted(self.keys)],
            "compacted_to": self.compacted[0], "log": {"first_index": self.first_index, "last_index": self.last_index},
            "hard_state": (dict(zip(("term", "vote", "commit"), self.hard_state)) if self.hard_state else None),
            "set_aside": [{"file": p, "reason": r} for p, r in self.aside],
            "ignored": [{"file": p, "reason": r} for p, r in self.ignored],
            "lost": list(self.lost), "refused": list(self.blocking), "notes": list(self.notes),
        }




# ---------------------------------------------------------------------------
# Planning: authenticate what is there
# ---------------------------------------------------------------------------

def _meta_status(path: str, kek) -> str:
    """'missing', 'intact', or 'damaged: <why>' for the current meta/ (opened read-only, keys and
    catalog checked; nothing written)."""
    meta_dir = os.path.join(path, layout.META_DIR)
    if not os.path.lexists(meta_dir):
        return "missing"
    try:
        meta = M.Meta(meta_dir, readonly=True)
    except (StorageError, UsageError, OSError) as exc:
        return f"damaged: {' '.join(str(exc).split())}"
    try:
        Store.keys_only(path, kek, True, meta)
        with meta.read() as r:
            for _k, v in r.items(M.DB_SEGMENTS):
                M.decode_manifest(v, meta.path)
            M.decode_compacted(r.get(M.DB_STATE, M.K_COMPACTED), meta.path)
    except (WalcryptError, ValueError) as exc:
        return f"damaged: {type(exc).__name__}: {' '.join(str(exc).split())}"
    finally:
        meta.close()
    return "intact"


def make_plan(path: str, kek, want_store: bytes | None, force: bool) -> Plan:
    plan = Plan(path)
    plan.meta_status = _meta_status(path, kek)
    if plan.meta_status == "intact" and not force:
        raise UsageError(f"{path}: meta/ opens and authenticates with this key, so there is nothing to recover; "
                         "'walcrypt verify' and 'walcrypt repair' look at the rest (--force rebuilds it anyway)")
    vfs = DEFAULT_VFS
    snap_dir = os.path.join(path, layout.SNAP_ENCRYPTED)
    wal_dir = os.path.join(path, layout.WAL_ENCRYPTED)
    for other in (layout.WAL_PLAIN, layout.SNAP_PLAIN, ".migrate-wal", ".migrate-snap"):
        if os.path.lexists(os.path.join(path, other)):
            plan.notes.append(f"{other}/ is left as it is (plaintext or migration data is not recovered)")
    if os.path.lexists(os.path.join(wal_dir, ".walcrypt-migration")):
        plan.notes.append(f"{layout.WAL_ENCRYPTED}/ carries the marker of a migration that may not have finished")

    # -- snapshots: the keys ------------------------------------------------------------------
    found: list[_Snap] = []
    wrappers: dict[str, object] = {}
    max_snap = 0
    for name in _names(vfs, snap_dir):
        m = SNAP_NAME.match(name)
        if not m:
            continue
        p = os.path.join(snap_dir, name)
        max_snap = max(max_snap, int(m.group(1), 16))
        try:
            found.append(_read_snapshot(vfs, p, m, kek, wrappers))
        except (StorageError, WrongKeyError, KeyNotFoundError) as exc:
            plan.aside.append((p, _why(exc)))
    plan.next_snapshot = max_snap + 1
    stores = sorted({s.store_id for s in found})
    if want_store is not None:
        for s in [s for s in found if s.store_id != want_store]:
            plan.aside.append((s.path, f"a snapshot of store {s.store_id.hex()}, not of {want_store.hex()}"))
        found = [s for s in found if s.store_id == want_store]
    elif len(stores) > 1:
        plan.blocking.append("snapshots of several stores authenticate with this KEK (" +
                             ", ".join(s.hex() for s in stores) + "): choose one with --store-id")
        return plan
    if not found:
        plan.lost.append("no snapshot file authenticates with this KEK, so no data key is known and no segment "
                         "can be read (if the KEK was rotated after the snapshots were written, run recover with "
                         "the earlier KEK, then 'walcrypt rotate-kek')")
        plan.blocking.append("no snapshot file authenticates with this KEK")
        _list_segments_unread(vfs, wal_dir, plan)
        return plan
    found.sort(key=lambda s: s.snapshot_id)
    plan.store_id = found[0].store_id
    plan.snapshots = found
    plan.kek_params = found[-1].bundle.get("kek_params")
    for s in found:
        entry = next(k for k in s.bundle["keys"] if bytes.fromhex(k["id"]) == s.key_id)
        plan.keys.setdefault(s.key_id, (s.dek, entry))

    # -- segments ------------------------------------------------------------------------------
    adopted: dict[int, _Recorded] = {}
    barriers: dict[int, int] = {}          # this store's segments (header authenticated), unreadable: ID -> base
    unread: dict[int, int] = {}            # every segment file not adopted and not another store's: ID -> base
    max_seg = 0
    for name in _names(vfs, wal_dir):
        m = layout.SEGMENT_NAME.match(name)
        if not m:
            continue
        p = os.path.join(wal_dir, name)
        seg_id, base = int(m.group(1), 16), int(m.group(2), 16)
        max_seg = max(max_seg, seg_id)
        try:
            seg = _read_segment(vfs, p, seg_id, base, plan)
        except _Foreign as exc:
            plan.aside.append((p, str(exc)))
            continue
        except (StorageError, KeyNotFoundError) as exc:
            plan.aside.append((p, _why(exc)))
            unread[seg_id] = base
            if getattr(exc, "walcrypt_header_authenticated", False):
                barriers[seg_id] = base
            continue
        adopted[seg_id] = seg
    plan.next_segment = max(max_seg + 1, 1)
    _assemble(plan, adopted, barriers)
    _describe_losses(plan, adopted, barriers, unread)
    return plan


class _Recorded(Segment):
    """A Segment whose scan also notes the committed frames in order: (type, offset, snapshot ID)."""

    # Set by _read_segment once the scan is done.
    file_size: int
    torn: tuple[int, str] | None

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.frames: list[tuple[int, int, int | None]] = []

    def _apply_scanned(self, p, on_entries) -> None:
        super()._apply_scanned(p, on_entries)
        ftype, off, _h, _plain = p
        sid = self.snapshot_records[-1][0] if ftype == fmt.FRAME_SNAPSHOT else None
        self.frames.append((ftype, off, sid))


class _Foreign(Exception):
    """A segment file that is provably not this store's (its header authenticates nothing of ours)."""


def _names(vfs, directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(vfs.listdir(directory))


def _why(exc: BaseException) -> str:
    if isinstance(exc, CorruptionError):
        return " ".join(exc.detail.split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _read_snapshot(vfs, p: str, m, kek, wrappers: dict) -> _Snap:
    """Authenticate one snapshot file end to end with the DEK its own bundle carries."""
    sf = SnapshotFile(vfs, p)
    h = sf.header
    if (h.snapshot_id, h.index, h.term) != (int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)):
        raise CorruptionError(p, 0, "the snapshot header does not match its file name (renamed or replaced)")
    if h.algorithm == fmt.ALG_NONE:
        raise CorruptionError(p, 12, "a plaintext snapshot (algorithm NONE) in the encrypted snapshot directory: "
                              "nothing in it is authenticated by a key")
    doc = sf.bundle_doc()                  # bounded and checked field by field before use
    if not doc:
        raise CorruptionError(p, 128, "the snapshot carries no keyring bundle")
    bundle_store = bytes.fromhex(doc["store_id"])
    if bundle_store != h.store_id:
        raise CorruptionError(p, 128, "the keyring bundle names another store than the snapshot header")
    entry = next((k for k in doc["keys"] if bytes.fromhex(k["id"]) == h.key_id and k["purpose"] == K.PURPOSE_DEK),
                 None)
    if entry is None:
        raise CorruptionError(p, 128, "the keyring bundle lacks the snapshot's data key")
    params = doc.get("kek_params")
    cache = json.dumps(params, sort_keys=True)
    wrapper = wrappers.get(cache)
    if wrapper is None:
        wrapper = wrappers[cache] = kek.wrapper(params)
    check = doc.get("kek_check")
    cv = wrapper.check_value()
    if check and cv is not None and not crypto.constant_time_equal(cv, bytes.fromhex(check)):
        raise WrongKeyError("its data key is wrapped under another KEK (another store's, or an earlier KEK of "
                            "this one)")
    dek = wrapper.unwrap(bytes.fromhex(entry["wrapped"]), K.wrap_context(h.store_id, h.key_id, K.PURPOSE_DEK))
    if len(dek) != K.KEY_SIZE:
        raise CorruptionError(p, 128, "the snapshot's data key unwrapped to a wrong size")
    key, commitment = snapshot_keys(dek, h)
    sf.unlock(crypto.suite(h.algorithm).new(key), commitment)     # authenticates header and bundle
    if entry["algorithm"] != h.algorithm:
        raise CorruptionError(p, 128, "the keyring bundle names another cipher suite for the data key")
    size = sf.verify()                                            # every chunk
    return _Snap(p, h.snapshot_id, h.index, h.term, h.key_id, sf.digest, size, h.store_id, doc, dek)


def _read_segment(vfs, p: str, seg_id: int, base: int, plan: Plan) -> _Recorded:
    """Authenticate one segment file completely (header, key commitment, every frame)."""
    fd = vfs.open(p, os.O_RDONLY)
    try:
        src = FileSource(vfs, fd)
        try:
            found = decode_header(src.read(0, fmt.SEGMENT_HEADER_SIZE), p)
        except StorageError as exc:
            raise CorruptionError(p, 0, f"unreadable header ({_why(exc)}); it may be this store's") from None
        if found.store_id != plan.store_id:
            raise _Foreign(f"a segment of another store ({found.store_id.hex()})")
        if (found.segment_id, found.base_index) != (seg_id, base):
            raise CorruptionError(p, 32, f"the header says segment {found.segment_id} at index {found.base_index}: "
                                  "renamed or replaced")
        if found.algorithm == fmt.ALG_NONE:
            raise CorruptionError(p, 12, "a plaintext segment (algorithm NONE) in the encrypted segment directory")
        known = plan.keys.get(found.key_id)
        if known is None:
            raise KeyNotFoundError(f"written under data key {found.key_id.hex()}, which no readable snapshot "
                                   "carries: it cannot be read")
        ident = SegmentIdentity(plan.store_id, seg_id, base, found.algorithm, found.key_id, found.salt,
                                found.commitment)
        key, commitment = crypto.segment_keys(known[0], found.salt, plan.store_id, seg_id, found.algorithm)
        cipher = crypto.FrameCipher(found.algorithm, crypto.suite(found.algorithm).new(key), found.key_id,
                                    plan.store_id, seg_id)
        seg = _Recorded(vfs, p, ident, cipher)
        seg.check_identity(found, commitment)
        nbytes = [0]

        def count(r):
            nbytes[0] += len(r.payload)

        try:
            committed_end, torn = seg.scan(src, on_entries=count)
        except StorageError as exc:
            # The header authenticated (its commitment needs the DEK): this is this store's segment,
            # damaged.  It still supersedes older segments from its base on (_assemble).  A tag no
            # exception class declares, read back with getattr by make_plan: set as the dynamic
            # attribute it is.
            setattr(exc, "walcrypt_header_authenticated", True)     # noqa: B010
            raise
        seg.bytes_written = nbytes[0]
        seg.file_size = src.size
        seg.torn = torn
        if torn is not None:
            plan.notes.append(f"{os.path.basename(p)}: torn tail at offset {torn[0]} ({torn[1]}); the first open "
                              f"cuts it at {committed_end} and keeps a .broken copy")
        return seg
    finally:
        vfs.close(fd)


def _list_segments_unread(vfs, wal_dir: str, plan: Plan) -> None:
    for name in _names(vfs, wal_dir):
        if layout.SEGMENT_NAME.match(name):
            plan.ignored.append((os.path.join(wal_dir, name), "cannot be read without a data key"))


# ---------------------------------------------------------------------------
# Planning: the log
# ---------------------------------------------------------------------------

def _pieces(segs: list, reset: int) -> list[tuple[int, int, Segment]]:
    """The entries each segment contributes (FORMAT.md 11.7), newest first, as the engine assembles them."""
    out, limit = [], None
    for seg in reversed(segs):
        if seg.seg_id >= reset:
            top = seg.last_index if limit is None else min(seg.last_index, limit)
            if top >= seg.base_index:
                out.append((seg.base_index, top, seg))
        limit = seg.base_index - 1 if limit is None else min(limit, seg.base_index - 1)
    return out


def _term_at(pieces, index: int) -> int | None:
    for lo, hi, seg in pieces:
        if lo <= index <= hi:
            term = None
            for start, t in seg.runs:
                if start > index:
                    break
                term = t
            return term
    return None


def _assemble(plan: Plan, adopted: dict[int, _Recorded], barriers: dict[int, int]) -> None:
    # An unreadable file of this store supersedes older segments from its base on: an older segment
    # it would cut is not adopted (it would otherwise serve entries that file replaced).
    for seg_id in sorted(adopted, reverse=True):       # newest first: a segment set aside cuts older ones too
        seg = adopted[seg_id]
        cut = [b for i, b in barriers.items() if i > seg_id and b <= seg.last_index]
        if cut:
            plan.aside.append((seg.path, f"a newer segment that cannot be read replaced its entries from index "
                                         f"{min(cut)} on"))
            barriers[seg_id] = seg.base_index
            del adopted[seg_id]
    segs = [adopted[i] for i in sorted(adopted)]
    snap = plan.snapshots[-1]
    s, t = snap.index, snap.term
    reset = 0
    p0 = _pieces(segs, 0)
    for sg in segs:
        for sid, index, term, digest in sg.snapshot_records:
            if sid == snap.snapshot_id and (index, term, digest) != (s, t, snap.digest):
                plan.blocking.append(f"snapshot {sid} differs from the SNAPSHOT record the log holds for it "
                                     "(replaced file)")
    ts = _term_at(p0, s)
    holders = [sg for sg in segs if any(r[0] == snap.snapshot_id for r in sg.snapshot_records)]
    recorder = max(holders, key=lambda sg: sg.seg_id) if holders else None
    if ts is None and recorder is not None:
        # The log does not hold index s (a purge took the segment that did, or the snapshot was ahead of
        # the log).  The entry after it comes from a segment written before the snapshot's record: if
        # saving the snapshot reset the log, that suffix was replaced; if not, it is live.  Writes after
        # the record in the same segment, or a newer segment not based at s + 1 (the first segment after
        # a reset is), show there was no reset.
        after = next((sg for lo, hi, sg in p0 if lo <= s + 1 <= hi), None)
        newer = [b for i, b in [(sg.seg_id, sg.base_index) for sg in segs] + list(barriers.items())
                 if i > recorder.seg_id]
        if after is not None and after.seg_id <= recorder.seg_id and not newer \
                and not _written_after(recorder, snap.snapshot_id):
            plan.blocking.append(
                f"the log does not hold index {s}, and segment {recorder.seg_id}, which holds entries from {s + 1}, "
                f"records the snapshot at index {s} as its last write: whether saving the snapshot reset the log "
                "(installed from a leader: those entries are a replaced suffix) or not (the node's own snapshot: "
                "they are live) cannot be told without meta/. Restore the node from the snapshot alone instead "
                "('walcrypt snapshot restore DATA/snap-v1-encrypted/FILE.snap NEW_DIR --key-file K'); Raft "
                "catches it up from the leader")
    if ts is not None and ts != t:
        # The log holds the snapshot's index with another term: saving the snapshot reset the log (10.6),
        # and every segment written before that holds a suffix the cluster replaced.  Those written after
        # it are newer than the segment that recorded the snapshot, the first based at s + 1.
        holder = next(sg for lo, hi, sg in p0 if lo <= s <= hi)
        floor = recorder.seg_id if recorder is not None else holder.seg_id
        later = [(i, b) for i, b in [(sg.seg_id, sg.base_index) for sg in segs] + list(barriers.items()) if i > floor]
        firsts = [i for i, b in later if b == s + 1]
        if firsts:
            reset = min(firsts)
        elif later:
            plan.blocking.append(f"the snapshot at index {s} reset the log, but no segment written after it starts at "
                                 f"index {s + 1}: the first one is missing, so the log after the reset cannot be "
                                 "told from the one before it")
        else:
            reset = plan.next_segment          # nothing was written after the reset
        plan.notes.append(f"the snapshot at index {s} reset the log (the log held index {s} with term {ts}): "
                          f"segments before {reset} are no part of it")
    wal = Wal(None)
    try:
        wal.load(segs, s, t, reset)
    except CorruptionError as exc:
        plan.blocking.append(f"{exc.detail} - the log above the snapshot at index {s} has a hole, so it cannot be "
                             "rebuilt as the node acknowledged it")
        return
    plan.segments = segs
    plan.compacted = (s, t, reset)
    plan.first_index, plan.last_index = wal.first_index(), wal.last_index()
    plan.hard_state = tuple(wal.hardstate) if segs else None
    # A newer snapshot the log names that could not be read: harmless when the log agrees with it.
    newest = plan.snapshots[-1].snapshot_id
    for sg in segs:
        for sid, index, term, _digest in sg.snapshot_records:
            if sid <= newest:
                continue
            if index <= wal.last_index() and index > s and wal.term(index) == term:
                plan.lost.append(f"snapshot {sid} at index {index} (named in the log) cannot be read; the log still "
                                 "holds every entry up to it, so nothing is lost")
            else:
                plan.blocking.append(f"snapshot {sid} at index {index} (named in the log) cannot be read, and the log "
                                     "does not agree with it: it reset the log, so the state it holds is gone")


def _written_after(seg: "_Recorded", snapshot_id: int) -> bool:
    """Whether ``seg`` holds an ENTRIES or HARDSTATE record written after its SNAPSHOT record of
    ``snapshot_id`` (a reset seals the segment right after that record)."""
    at = next((off for ftype, off, ident in seg.frames if ftype == fmt.FRAME_SNAPSHOT and ident == snapshot_id), None)
    return at is not None and any(off > at for ftype, off, _i in seg.frames
                                  if ftype in (fmt.FRAME_ENTRIES, fmt.FRAME_HARDSTATE))


def _describe_losses(plan: Plan, adopted: dict[int, _Recorded], barriers: dict[int, int],
                     unread: dict[int, int]) -> None:
    s = plan.snapshots[-1].index if plan.snapshots else 0
    plan.lost.append("the stable store (Raft term and vote of hosts that keep them there, the pysyncobj adapter's "
                     "records): it lived only in meta/")
    plan.lost.append("a DEK rotation or migration in flight, and key states: the data key of the newest segment "
                     "becomes the active one, other keys found come back as retiring")
    if s:
        plan.lost.append(f"entries at or below index {s}: the snapshot there covers them (without meta/ nothing "
                         "proves an older segment file still belongs to the log)")
    newest = max(adopted) if adopted else 0
    if barriers and max(barriers) > newest:
        plan.lost.append(f"segment {max(barriers)} of this store is newer than every readable segment and damaged: "
                         "entries and the hard state written in it are lost; the hard state comes from an older "
                         "segment and may be behind the node's last vote")
    elif unread and max(unread) > newest:
        plan.lost.append(f"segment file {max(unread)} is newer than every readable segment and does not authenticate: "
                         "if it was this store's, entries and a hard state written in it are lost (the hard state "
                         "may be behind the node's last vote)")
    if not adopted:
        plan.lost.append("no segment could be read: the log is empty above the snapshot and there is no hard state")
    plan.notes.append(RAFT_NOTE)


def active_key(plan: Plan) -> bytes | None:
    if plan.segments:
        return plan.segments[-1].ident.key_id
    if plan.snapshots:
        return plan.snapshots[-1].key_id
    return None
