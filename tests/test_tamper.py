"""Tampering is detected: a table of named tamper cases, each raising a typed error.

Every case runs against two stores built the same way:

* ``sealed``   - written in this process and closed: every segment is sealed (INDEX frame,
                 manifest entry SEALED).  Frame tampers hit a middle segment.
* ``unsealed`` - written by a child process that leaves through os._exit(0) without close():
                 the last segment is still open and recovery scans it.  Frame tampers hit a
                 batch in the middle of that last segment (later committed batches follow, so
                 nothing here may be mistaken for a torn tail).

Each case says which file the error must name; where a frame is involved the error must also
carry an offset (the frame's, when one frame is the target).  The frame layout is taken from
``walcrypt.format``'s construct declarations; the CRC32C is recomputed where an attacker would
(``+crc`` cases), so the check that fires is the authentication, not the checksum.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable

import lmdb
import pytest

import walcrypt
from walcrypt import AuthenticationError, CorruptionError, HardState
from walcrypt import format as fmt

import wctest
from wctest import FRAME_FIELDS, HEADER_FIELDS, Frame

BATCHES = 400
BATCH = 10
LENGTH = 24          # fixed-size entry data: every ENTRIES record of a full batch has the same size


def _build_sealed(path: str) -> None:
    s = wctest.open_store(path)
    nxt = 1
    for _ in range(BATCHES):
        ents = wctest.make_entries(nxt, nxt + BATCH, length=LENGTH)
        s.save(hard_state=HardState(ents[-1].term, 1, ents[-1].index), entries=ents)
        nxt += BATCH
    s.close()


def _build_unsealed(path: str) -> None:
    res = wctest.run_child("write", path, "--batches", str(BATCHES), "--batch-size", str(BATCH),
                           "--length", str(LENGTH), "--hs", "--end", "exit")
    assert res.stdout.strip() == f"LAST {BATCHES * BATCH}"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("tamper-pristine")
    out = {}
    for variant, build in (("sealed", _build_sealed), ("unsealed", _build_unsealed)):
        mine, other = str(root / f"{variant}-a"), str(root / f"{variant}-b")
        build(mine)
        build(other)                       # another store under the same KEK
        segs = wctest.segment_files(mine)
        assert len(segs) >= 4, "several segments expected"
        assert [os.path.basename(p) for p in segs] == [os.path.basename(p) for p in wctest.segment_files(other)]
        out[variant] = (mine, other)
    # the pristine stores read back in full (so every failure below is caused by the tamper)
    for variant, (mine, _other) in out.items():
        ents, _hs = wctest.open_and_read_all(wctest.copy_store(mine, str(root / f"check-{variant}")))
        assert len(ents) == BATCHES * BATCH
    return out


@dataclass
class Ctx:
    root: str
    other: str
    variant: str

    @property
    def segs(self) -> list[str]:
        return wctest.segment_files(self.root)

    @property
    def target(self) -> str:
        """The segment frame tampers hit: a sealed middle one, or the unsealed last one."""
        segs = self.segs
        return segs[len(segs) // 2] if self.variant == "sealed" else segs[-1]

    def frames(self, path: str | None = None) -> list[Frame]:
        return wctest.parse_frames(wctest.read(path or self.target))

    def entries_frames(self, path: str | None = None) -> list[Frame]:
        """Full-size ENTRIES frames that are followed by at least two more committed batches."""
        bs = wctest.batches(self.frames(path))
        out = []
        for b in bs[1:-2]:
            out.extend(f for f in b if f.type == fmt.FRAME_ENTRIES and f.count == BATCH)
        assert len(out) >= 4
        return out

    def middle_entries_frame(self) -> Frame:
        fs = self.entries_frames()
        return fs[len(fs) // 2]

    def edit(self, path: str, fn: Callable[[bytearray], None]) -> None:
        data = bytearray(wctest.read(path))
        fn(data)
        wctest.write(path, bytes(data))


@dataclass
class Expect:
    path: object               # str: exact; set: one of
    offset: object = None      # None: not checked; int: exact; set: one of; "any": must not be None


# ---------------------------------------------------------------------------
# The cases.  Each takes a Ctx, tampers, and returns what the error must say.
# ---------------------------------------------------------------------------


def flip_frame_field(field: str, fix_crc: bool, which: str = "entries"):
    bit = {"type": 1, "algorithm": 0}.get(field, 0)

    def case(ctx: Ctx) -> Expect:
        if which == "entries":
            f = ctx.middle_entries_frame()
        else:
            ftype = {"hardstate": fmt.FRAME_HARDSTATE, "hardstate-middle": fmt.FRAME_HARDSTATE, "commit": fmt.FRAME_COMMIT, "index": fmt.FRAME_INDEX}[which]
            cands = [x for x in ctx.frames() if x.type == ftype]
            assert cands
            if which == "hardstate-middle":
                cands = cands[1:-1]
            f = cands[-1] if which in ("index", "hardstate") and ctx.variant == "sealed" else cands[len(cands) // 2]
        pos = wctest.frame_field_flip_position(f, field)

        def tamper(data: bytearray) -> None:
            wctest.flip_bit(data, pos, bit)
            if fix_crc:
                wctest.fix_frame_crc(data, f.offset)

        ctx.edit(ctx.target, tamper)
        return Expect(ctx.target, f.offset)
    return case


def swap_records(ctx: Ctx) -> Expect:
    fs = ctx.entries_frames()
    a, b = fs[1], fs[-2]
    assert a.length == b.length

    def tamper(data: bytearray) -> None:
        ra, rb = bytes(data[a.offset:a.next]), bytes(data[b.offset:b.next])
        data[a.offset:a.next], data[b.offset:b.next] = rb, ra
    ctx.edit(ctx.target, tamper)
    return Expect(ctx.target, {a.offset, b.offset})


def swap_batches(ctx: Ctx) -> Expect:
    bs = [b for b in wctest.batches(ctx.frames()) if b[0].type == fmt.FRAME_ENTRIES and b[0].count == BATCH]
    x, y = bs[2], bs[3]
    lo_x, hi_x, lo_y, hi_y = x[0].offset, x[-1].next, y[0].offset, y[-1].next
    assert hi_x == lo_y and hi_x - lo_x == hi_y - lo_y

    def tamper(data: bytearray) -> None:
        data[lo_x:hi_y] = data[lo_y:hi_y] + data[lo_x:hi_x]
    ctx.edit(ctx.target, tamper)
    return Expect(ctx.target, {f.offset for f in x + y})


def copy_record_over_another(ctx: Ctx) -> Expect:
    fs = ctx.entries_frames()
    src, dst = fs[1], fs[3]

    def tamper(data: bytearray) -> None:
        data[dst.offset:dst.next] = data[src.offset:src.next]
    ctx.edit(ctx.target, tamper)
    return Expect(ctx.target, dst.offset)


def record_from_another_segment(ctx: Ctx) -> Expect:
    donor = ctx.segs[1] if ctx.target != ctx.segs[1] else ctx.segs[2]
    src = ctx.entries_frames(donor)[3]
    dst = ctx.middle_entries_frame()
    payload = wctest.read(donor)[src.offset:src.next]

    def tamper(data: bytearray) -> None:
        data[dst.offset:dst.next] = payload
    ctx.edit(ctx.target, tamper)
    return Expect(ctx.target, dst.offset)


def record_from_another_store(ctx: Ctx) -> Expect:
    donor = os.path.join(wctest.wal_dir(ctx.other), os.path.basename(ctx.target))
    dst = ctx.middle_entries_frame()
    payload = wctest.read(donor)[dst.offset:dst.next]
    assert payload != wctest.read(ctx.target)[dst.offset:dst.next]

    def tamper(data: bytearray) -> None:
        data[dst.offset:dst.next] = payload
    ctx.edit(ctx.target, tamper)
    return Expect(ctx.target, dst.offset)


def delete_a_batch(ctx: Ctx) -> Expect:
    bs = [b for b in wctest.batches(ctx.frames()) if b[0].type == fmt.FRAME_ENTRIES]
    victim = bs[len(bs) // 2]
    lo, hi = victim[0].offset, victim[-1].next

    def tamper(data: bytearray) -> None:
        del data[lo:hi]
    ctx.edit(ctx.target, tamper)
    return Expect(ctx.target)


def rename_over_previous_segment(ctx: Ctx) -> Expect:
    segs = ctx.segs
    k = segs.index(ctx.target)
    os.replace(segs[k], segs[k - 1])
    return Expect(segs[k - 1])


def swap_segment_names(ctx: Ctx) -> Expect:
    segs = ctx.segs
    k = segs.index(ctx.target)
    a, b = segs[k - 1], segs[k]
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    return Expect(a)


def segment_from_another_store(ctx: Ctx) -> Expect:
    donor = os.path.join(wctest.wal_dir(ctx.other), os.path.basename(ctx.target))
    shutil.copyfile(donor, ctx.target)
    return Expect(ctx.target)


def delete_segment(which: str):
    def case(ctx: Ctx) -> Expect:
        segs = ctx.segs
        victim = segs[len(segs) // 2] if which == "middle" else segs[-1]
        os.unlink(victim)
        return Expect(victim)
    return case


def header_field(field: str, fix_crc: bool, *, new_value: int | None = None):
    def case(ctx: Ctx) -> Expect:
        o, size = HEADER_FIELDS[field]

        def tamper(data: bytearray) -> None:
            if new_value is not None:
                data[o:o + size] = new_value.to_bytes(size, "little")
            else:
                wctest.flip_bit(data, o + size // 2, 0)
            if fix_crc:
                wctest.fix_header_crc(data)
        ctx.edit(ctx.target, tamper)
        return Expect(ctx.target)
    return case


def garbage_after_sealed_index(ctx: Ctx) -> Expect:
    with open(ctx.target, "ab") as f:
        f.write(os.urandom(100))
    return Expect(ctx.target)


def truncate_sealed_segment(ctx: Ctx) -> Expect:
    size = os.path.getsize(ctx.target)
    os.truncate(ctx.target, size - 8)
    return Expect(ctx.target)


def _lmdb_edit(ctx: Ctx, fn) -> Expect:
    meta = os.path.join(ctx.root, "meta")
    env = lmdb.open(meta, max_dbs=8, subdir=True)
    try:
        with env.begin(write=True) as txn:
            fn(txn, env)
    finally:
        env.close()
    return Expect(meta)


def manifest_value_edited(ctx: Ctx) -> Expect:
    def fn(txn, env):
        db = env.open_db(b"segments", txn=txn)
        keys = [bytes(k) for k, _v in txn.cursor(db=db)]
        key = keys[len(keys) // 2]
        v = bytearray(txn.get(key, db=db))
        v[8] ^= 0x01                                       # base_index, low byte
        txn.put(key, bytes(v), db=db)
    return _lmdb_edit(ctx, fn)


def manifest_values_swapped(ctx: Ctx) -> Expect:
    def fn(txn, env):
        db = env.open_db(b"segments", txn=txn)
        keys = [bytes(k) for k, _v in txn.cursor(db=db)]
        a, b = keys[1], keys[2]
        va, vb = bytes(txn.get(a, db=db)), bytes(txn.get(b, db=db))
        txn.put(a, vb, db=db)
        txn.put(b, va, db=db)
    return _lmdb_edit(ctx, fn)


def manifest_record_deleted(ctx: Ctx) -> Expect:
    """A whole manifest record removed (no MAC to break): the log would have a hole."""
    victim = {}

    def fn(txn, env):
        db = env.open_db(b"segments", txn=txn)
        keys = [bytes(k) for k, _v in txn.cursor(db=db)]
        victim["id"] = int.from_bytes(keys[len(keys) // 2], "big")
        assert txn.delete(keys[len(keys) // 2], db=db)
    meta = _lmdb_edit(ctx, fn).path
    ids = [int(os.path.basename(p)[:16], 16) for p in ctx.segs]
    k = ids.index(victim["id"])
    # naming the metadata, the forgotten segment or the segment after the hole are all fair
    return Expect({meta, ctx.segs[k], ctx.segs[k + 1]})


def state_value_edited(ctx: Ctx) -> Expect:
    def fn(txn, env):
        db = env.open_db(b"state", txn=txn)
        v = bytearray(txn.get(b"compacted", db=db))
        v[0] ^= 0x40                                       # pretend entries 1..64 were compacted
        txn.put(b"compacted", bytes(v), db=db)
    return _lmdb_edit(ctx, fn)


def keyring_value_edited(ctx: Ctx) -> Expect:
    def fn(txn, env):
        db = env.open_db(b"keyring", txn=txn)
        (k, v), = [(bytes(k), bytearray(v)) for k, v in txn.cursor(db=db)]
        v[1] ^= 0x01                                       # key state
        txn.put(k, bytes(v), db=db)
    return _lmdb_edit(ctx, fn)


A, C = AuthenticationError, CorruptionError

FRAME_FIELD_NAMES = [n for n in FRAME_FIELDS] + ["payload", "tag"]
assert FRAME_FIELD_NAMES == ["type", "algorithm", "flags", "reserved0", "length", "seq", "index", "term", "count",
                             "crc", "nonce", "reserved1", "key_id", "prev_chain", "payload", "tag"]

CASES: list[tuple[str, Callable[[Ctx], Expect], type, tuple[str, ...]]] = []
for _name in FRAME_FIELD_NAMES:
    CASES.append((f"frame-{_name}", flip_frame_field(_name, False), C, ("sealed", "unsealed")))
    if _name != "crc":
        CASES.append((f"frame-{_name}+crc", flip_frame_field(_name, True), A, ("sealed", "unsealed")))
for _which, _variants in (("hardstate", ("sealed", "unsealed")), ("commit", ("unsealed",)), ("index", ("sealed",))):
    for _name in ("index", "payload"):
        CASES.append((f"{_which}-frame-{_name}", flip_frame_field(_name, False, _which), C, _variants))
        CASES.append((f"{_which}-frame-{_name}+crc", flip_frame_field(_name, True, _which), A, _variants))
CASES += [
    ("swap-two-records", swap_records, A, ("sealed", "unsealed")),
    ("swap-two-batches", swap_batches, A, ("sealed", "unsealed")),
    ("copy-record-over-another", copy_record_over_another, A, ("sealed", "unsealed")),
    ("record-from-another-segment", record_from_another_segment, A, ("sealed", "unsealed")),
    ("record-from-another-store", record_from_another_store, A, ("sealed", "unsealed")),
    ("delete-a-batch", delete_a_batch, C, ("sealed", "unsealed")),
    ("rename-segment-over-previous", rename_over_previous_segment, A, ("sealed", "unsealed")),
    ("swap-segment-names", swap_segment_names, A, ("sealed", "unsealed")),
    ("segment-from-another-store", segment_from_another_store, A, ("sealed", "unsealed")),
    ("delete-middle-segment", delete_segment("middle"), C, ("sealed", "unsealed")),
    ("delete-last-segment", delete_segment("last"), C, ("sealed", "unsealed")),
    ("header-key-id+crc", header_field("key_id", True), A, ("sealed", "unsealed")),
    ("header-algorithm-chacha+crc", header_field("algorithm", True, new_value=fmt.ALG_CHACHA20_POLY1305), A,
     ("sealed", "unsealed")),
    ("header-algorithm-none+crc", header_field("algorithm", True, new_value=fmt.ALG_NONE), A,
     ("sealed", "unsealed")),
    ("garbage-after-sealed-index", garbage_after_sealed_index, C, ("sealed",)),
    ("sealed-segment-truncated", truncate_sealed_segment, C, ("sealed",)),
    ("lmdb-manifest-value-edited", manifest_value_edited, A, ("sealed", "unsealed")),
    ("lmdb-manifest-values-swapped", manifest_values_swapped, A, ("sealed", "unsealed")),
    ("lmdb-manifest-record-deleted", manifest_record_deleted, C, ("sealed", "unsealed")),
    ("lmdb-state-value-edited", state_value_edited, A, ("sealed", "unsealed")),
    ("lmdb-keyring-value-edited", keyring_value_edited, A, ("sealed", "unsealed")),
]
for _name in HEADER_FIELDS:
    if _name in ("version", "header_size", "crc"):
        continue                           # an unknown version is UnsupportedFormatError, tested elsewhere
    CASES.append((f"header-{_name}", header_field(_name, False), C, ("sealed", "unsealed")))
    if _name != "magic":
        CASES.append((f"header-{_name}+crc", header_field(_name, True), C, ("sealed", "unsealed")))

PARAMS = [pytest.param(variant, fn, exc, id=f"{variant}-{name}")
          for name, fn, exc, variants in CASES for variant in variants]


@pytest.mark.parametrize("variant,tamper,exc", PARAMS)
def test_tamper_is_detected(pristine, tmp_path, variant, tamper, exc):
    mine, other = pristine[variant]
    root = wctest.copy_store(mine, str(tmp_path / "data"))
    ctx = Ctx(root, other, variant)
    expect = tamper(ctx)
    with pytest.raises(exc) as info:
        wctest.open_and_read_all(root)
    err = info.value
    paths = expect.path if isinstance(expect.path, set) else {expect.path}
    assert os.path.abspath(err.path) in {os.path.abspath(p) for p in paths}, str(err)
    if isinstance(expect.offset, int):
        assert err.offset == expect.offset, str(err)
    elif isinstance(expect.offset, set):
        assert err.offset in expect.offset, str(err)
    elif expect.offset == "any":
        assert err.offset is not None, str(err)
    # the message names the file
    assert os.path.basename(err.path) in str(err)


@pytest.mark.parametrize("which", ["commit", "hardstate-middle"])
@pytest.mark.parametrize("fix_crc", [False, True], ids=["flip", "flip+crc"])
def test_sealed_segment_frames_the_reader_skips_are_found_by_verify(pristine, tmp_path, which, fix_crc):
    """A sealed segment's COMMIT frames and superseded HARDSTATE frames are never needed to serve
    reads: opening reads only the index frame (as hashicorp/raft-wal does), so a flipped bit there
    cannot reach the caller.  Reads still return exactly what was written, and the verification walk
    (``walcrypt verify``, check()) reports the damage with file and offset."""
    from walcrypt.check import check
    mine, other = pristine["sealed"]
    clean_entries, clean_hs = wctest.open_and_read_all(mine)
    root = wctest.copy_store(mine, str(tmp_path / "data"))
    ctx = Ctx(root, other, "sealed")
    expect = flip_frame_field("payload", fix_crc, which)(ctx)
    entries, hs = wctest.open_and_read_all(root)
    assert entries == clean_entries and hs == clean_hs, "a damaged frame changed what reads return"
    report = check(root, kek=walcrypt.RawKey(wctest.KEK_BYTES))
    assert not report.ok
    assert any(f.path and os.path.abspath(f.path) == os.path.abspath(expect.path) and f.offset == expect.offset
               for f in report.findings), report.findings


def test_unknown_segment_version_is_unsupported(pristine, tmp_path):
    mine, other = pristine["sealed"]
    root = wctest.copy_store(mine, str(tmp_path / "data"))
    ctx = Ctx(root, other, "sealed")
    header_field("version", True, new_value=fmt.FORMAT_VERSION + 1)(ctx)
    with pytest.raises(walcrypt.UnsupportedFormatError):
        wctest.open_and_read_all(root)


def test_tampered_store_is_not_modified_by_the_failed_open(pristine, tmp_path):
    """A detected tamper must not be 'repaired' away: the files stay as they were."""
    mine, other = pristine["unsealed"]
    root = wctest.copy_store(mine, str(tmp_path / "data"))
    ctx = Ctx(root, other, "unsealed")
    flip_frame_field("payload", False)(ctx)
    before = wctest.tree_hashes(root)
    for _ in range(2):
        with pytest.raises(CorruptionError):
            wctest.open_and_read_all(root)
    assert wctest.tree_hashes(root) == before
