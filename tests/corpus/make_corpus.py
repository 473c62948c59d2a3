#!/usr/bin/env python3
"""Generate the corrupted-segment corpus (tests/corpus/): real stores, one damaged file per case.

    python tests/corpus/make_corpus.py [OUTDIR]        # default: tests/corpus/

What it writes
--------------
``stores/<name>/``   small real data directories (``meta/data.mdb`` and the segment / snapshot
                     files; no ``LOCK``, no ``lock.mdb``), made by the engine itself:

  * ``enc``        encrypted (AES-256-GCM), 26 saves of 3 entries (24-byte data, hard state
                   ``(1, 1, last)`` with each), segment size 4096, written by a child process that
                   leaves through ``os._exit(0)`` after its last save: segments 1-3 are SEALED and
                   segment 4 is OPEN (unsealed, preallocated) with 5 write units after its creation
                   unit -- the target of most cases;
  * ``enc-other``  the same writes in another store under the same KEK (donor of foreign records
                   and segments);
  * ``plain``      the same writes in a plaintext store (algorithm NONE);
  * ``snap``       encrypted, 60 entries, snapshots at 20 and 40 (256-byte chunks), closed.

``cases/``           one damaged file per corruption kind.  A case names a base store and the file
                     of that store it replaces (``target``; no ``file`` means the target is deleted).
``exports/``         export files of the ``snap`` store's newest snapshot and damaged versions.
``MANIFEST.json``    every case with its expected outcome, plus what a reader needs to check
                     results without opening a store (store IDs, data keys, segment identities,
                     the entries each segment holds): the fuzz harnesses seed from it.

Expected outcomes are derived here from the rules of formats/FORMAT.md (sections 3.3, 4, 11),
not by running the engine: ``tests/test_corpus.py`` checks the engine against them.  Outcomes:

  * ``{"outcome": "opens", "last_index": N, "repaired": bool, ...}``: the store opens read-write
    to exactly entries 1..N (``repaired``: a torn tail was cut and a ``.broken`` copy kept);
  * ``{"outcome": "error", "error": NAME, "path": TARGET, "offset": X, "when": "open"|"read"}``:
    opening (or reading every entry after opening) raises that error class, naming the file and
    the offset (``offset`` null: not checked);
  * snapshot cases: ``"snapshot_index"`` is the snapshot the store serves after its fallback;
  * export cases: ``{"outcome": "inspects", ...}`` or an error from ``backup.inspect_export``.

Determinism: every random value the engine draws (store IDs, key IDs, data keys, salts, wrap
nonces) comes from a SHA-256 counter stream that replaces ``os.urandom`` for the whole run, and
``time.time_ns`` is a counter (key creation times, export headers).  LMDB lays out its pages
deterministically for the same transactions.  Running the script twice gives identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fuzz.legacy_scan import end_never_written  # noqa: E402  (FORMAT.md 11.4 rule 3, the oracle's reading)

# ---------------------------------------------------------------------------------------------
# Fixed inputs
# ---------------------------------------------------------------------------------------------

SEG_SIZE = 4096
BATCHES = 26
BATCH = 3
LENGTH = 24
ROLLBACK_AFTER = 23               # the child keeps a copy of the open segment after this many saves
SNAP_ENTRIES = 60
SNAP_AT = (20, 40)
SNAP_CHUNK = 256
SNAP_LEN = 1000
SEEDS = {"enc": b"walcrypt-corpus/enc", "enc-other": b"walcrypt-corpus/enc-other",
         "plain": b"walcrypt-corpus/plain", "snap": b"walcrypt-corpus/snap"}
ENC_WAL, PLAIN_WAL, ENC_SNAP = "wal-v1-encrypted", "wal-v1", "snap-v1-encrypted"


class FixedRandom:
    """os.urandom replacement: SHA-256(seed || counter) blocks."""

    def __init__(self, seed: bytes):
        self.key = hashlib.sha256(seed).digest()
        self.ctr = 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:                         # bounded by n
            out += hashlib.sha256(self.key + self.ctr.to_bytes(8, "little")).digest()
            self.ctr += 1
        return out[:n]


def make_deterministic(seed: bytes) -> FixedRandom:
    """Patch os.urandom and time.time_ns for this process (never undone: generator processes only)."""
    rnd = FixedRandom(seed)
    os.urandom = rnd
    clock = [1_700_000_000_000_000_000]

    def time_ns() -> int:
        clock[0] += 1_000_000
        return clock[0]

    time.time_ns = time_ns
    return rnd


def garbage(tag: str, n: int) -> bytes:
    """Deterministic non-zero-heavy garbage bytes."""
    return FixedRandom(b"garbage/" + tag.encode())(n)


def entries(lo: int, hi: int):
    import wctest
    return wctest.make_entries(lo, hi, length=LENGTH)


def snap_data(index: int) -> bytes:
    return FixedRandom(b"snapshot/%d" % index)(SNAP_LEN)


# ---------------------------------------------------------------------------------------------
# Building the stores
# ---------------------------------------------------------------------------------------------

def child_write(kind: str, path: str, rollback_out: str) -> None:
    """Child process: write the enc/enc-other/plain store, then die without closing."""
    make_deterministic(SEEDS[kind])
    import wctest
    from walcrypt import HardState
    plain = kind == "plain"
    s = wctest.open_store(path, encrypted=not plain, segment_size=SEG_SIZE, sync="always")
    nxt = 1
    for b in range(1, BATCHES + 1):
        ents = entries(nxt, nxt + BATCH)
        s.save(hard_state=HardState(ents[-1].term, 1, ents[-1].index), entries=ents)
        nxt += BATCH
        if b == ROLLBACK_AFTER and rollback_out:
            segs = wctest.segment_files(path, encrypted=not plain)
            shutil.copyfile(segs[-1], rollback_out)
    sys.stdout.flush()
    os._exit(0)                                    # die without close(): segment 4 stays unsealed


def build_child_store(kind: str, path: str, rollback_out: str = "") -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, path, rollback_out],
                   check=True, env=env, cwd=ROOT, timeout=300)


def build_snap_store(path: str) -> None:
    """In a child too, so that its randomness stream starts from its own seed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child-snap", path], check=True, env=env,
                   cwd=ROOT, timeout=300)


def child_snap(path: str) -> None:
    make_deterministic(SEEDS["snap"])
    import wctest
    from walcrypt import ConfState, HardState, SnapshotMeta
    from walcrypt.backup import export_snapshot
    with wctest.open_store(path, segment_size=SEG_SIZE, sync="always", snapshot_chunk_size=SNAP_CHUNK) as s:
        for a in range(1, SNAP_ENTRIES + 1, 10):
            ents = entries(a, a + 10)
            s.save(hard_state=HardState(ents[-1].term, 1, ents[-1].index), entries=ents)
            if a + 9 in SNAP_AT:
                s.save_snapshot(SnapshotMeta(a + 9, 1, ConfState(voters=(1, 2, 3))), snap_data(a + 9))
        out = os.path.join(os.path.dirname(path), "exports")
        os.makedirs(out, exist_ok=True)
        export_snapshot(s, os.path.join(out, "snap-40.wcexp"))
        export_snapshot(s, os.path.join(out, "snap-40-kek.wcexp"), embed_kek=True)
    os._exit(0)


def copy_store(src: str, dst: str) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("LOCK", "lock.mdb"))


# ---------------------------------------------------------------------------------------------
# Reading what was built (for the manifest and the cases)
# ---------------------------------------------------------------------------------------------

def store_facts(path: str, encrypted: bool) -> dict:
    """Store ID, data keys and the segment manifest, read through a read-only open."""
    import walcrypt
    import wctest
    from walcrypt import meta as M
    kek = walcrypt.RawKey(wctest.KEK_BYTES) if encrypted else None
    s = walcrypt.open(path, kek=kek, encrypted=encrypted, read_only=True)
    try:
        with s.meta.read() as r:
            manifest = {int.from_bytes(k, "big"): M.decode_manifest(v, "") for k, v in r.items(M.DB_SEGMENTS)}
        keys = {kid.hex(): s.secret(kid).hex() for kid, e in s.keys.items() if e.purpose == 1} if encrypted else {}
        facts = {"store_id": s.store_id.hex(), "encrypted": encrypted, "keys": keys, "segments": []}
        wal = os.path.join(path, ENC_WAL if encrypted else PLAIN_WAL)
        for seg_id, rec in sorted(manifest.items()):
            name = f"{seg_id:016x}-{rec['base_index']:016x}.wal"
            data = read(os.path.join(wal, name))
            ents = [f for f in wctest.parse_frames(data) if f.type == 1]
            lo = ents[0].index if ents else rec["base_index"]
            hi = ents[-1].index + ents[-1].count if ents else rec["base_index"]
            facts["segments"].append({
                "file": f"{ENC_WAL if encrypted else PLAIN_WAL}/{name}", "segment_id": seg_id,
                "base_index": rec["base_index"], "algorithm": rec["algorithm"], "key_id": rec["key_id"].hex(),
                "state": "sealed" if rec["state"] == 2 else "open", "index_offset": rec["index_offset"],
                "end_offset": rec["end_offset"], "entries": [lo, hi], "size": len(data)})
        return facts
    finally:
        s.close()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# FORMAT.md section 11.4, written out independently of the engine (used to derive expectations)
# ---------------------------------------------------------------------------------------------

def looks_incomplete(data: bytes, lo: int, hi: int) -> bool:
    """Rule 3 of FORMAT.md 11.4: the frame with extent [lo, hi) looks like an incomplete write."""
    if hi > len(data):
        return True
    if hi > lo and end_never_written(data, lo, hi):
        return True
    starts = [lo] + [s for s in range((lo // 512 + 1) * 512, hi, 512)]
    for s in starts:
        e = min(hi, s + 32)
        if e - s >= min(32, hi - lo) and not any(data[s:e]):
            return True
    return False


def first_changed_frame(frames, data: bytes, lo: int, hi: int):
    """The first frame whose checked bytes (header and sealed payload, not padding) change when
    [lo, hi) is zeroed: where a reader walking the frames in order fails."""
    for fr in frames:
        if any(data[max(fr.offset, lo):min(fr.end, hi)]):
            return fr
    raise AssertionError("zeroing changes no frame")


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

def build_cases(stores: dict, rollback: bytes, exports_dir: str) -> list[dict]:
    import wctest
    from walcrypt import format as fmt
    from wctest import FRAME_FIELDS, FRAME_HEADER_SIZE, HEADER_FIELDS

    cases: list[dict] = []

    def seg_path(store: str, k: int) -> str:
        return stores[store]["facts"]["segments"][k]["file"]

    def seg_bytes(store: str, k: int) -> bytes:
        return read(os.path.join(stores[store]["dir"], seg_path(store, k)))

    S_REL = seg_path("enc", 3)                       # the open segment
    M_REL = seg_path("enc", 1)                       # a sealed middle segment
    S = seg_bytes("enc", 3)
    M = seg_bytes("enc", 1)
    frames = wctest.parse_frames(S)
    bs = wctest.batches(frames)
    assert len(bs) == 6, f"the open segment should hold the creation unit + 5 units, not {len(bs)}"
    C = bs[-1][-1].next                              # committed end
    prev_C = bs[-2][-1].next                         # start of the last unit
    full = BATCHES * BATCH
    before_last = full - BATCH
    assert not any(S[C:]), "nothing but zeros after the last commit"
    hs_of = lambda n: [1, 1, n]  # noqa: E731 - hard state saved with the batch ending at n

    def add(name, data, expect, *, base="enc", target=S_REL, note=""):
        cases.append({"name": name, "base": base, "target": target, "data": data, "expect": expect, "note": note})

    def opens(last, repaired, **kw):
        return {"outcome": "opens", "first_index": 1, "last_index": last, "hard_state": hs_of(last),
                "repaired": repaired, **kw}

    def error(name, offset, *, target=S_REL, when="open"):
        return {"outcome": "error", "error": name, "path": target, "offset": offset, "when": when}

    def edited(src: bytes, fn) -> bytes:
        b = bytearray(src)
        fn(b)
        return bytes(b)

    # -- segment header: every field, bit flipped, with and without the CRC fixed ------------
    plus_crc = {"version": ("UnsupportedFormatError", None), "header_size": ("UnsupportedFormatError", None),
                "algorithm": ("AuthenticationError", 0), "flags": ("CorruptionError", 13),
                "reserved0": ("CorruptionError", 13), "store_id": ("AuthenticationError", 0),
                "segment_id": ("AuthenticationError", 0), "base_index": ("AuthenticationError", 0),
                "key_id": ("AuthenticationError", 48), "salt": ("AuthenticationError", 0),
                "commitment": ("AuthenticationError", 0), "reserved1": ("CorruptionError", 13)}
    for field, (o, size) in HEADER_FIELDS.items():
        pos = o + size // 2

        def flip(b, pos=pos):
            wctest.flip_bit(b, pos, 0)
        add(f"header-{field}-flip", edited(S, flip), error("CorruptionError", 0),
            note="any header change fails the magic or the header CRC (FORMAT 3.3)")
        if field in plus_crc:
            name, off = plus_crc[field]

            def flip_fix(b, pos=pos):
                wctest.flip_bit(b, pos, 0)
                wctest.fix_header_crc(b)
            exp = error(name, off) if name != "UnsupportedFormatError" else \
                {"outcome": "error", "error": name, "path": None, "offset": None, "when": "open"}
            add(f"header-{field}-flip+crc", edited(S, flip_fix), exp,
                note="a CRC-valid header that disagrees with the manifest or its key (FORMAT 3.3, 11.1 step 8)")

    # -- frame header fields of an ENTRIES frame in a middle unit (later units follow) -------
    f = bs[2][0]
    assert f.type == fmt.FRAME_ENTRIES and len(bs) - 2 >= 3
    for field in list(FRAME_FIELDS) + ["payload", "tag"]:
        pos = wctest.frame_field_flip_position(f, field)
        bit = 1 if field == "type" else 0

        def flip(b, pos=pos, bit=bit):
            wctest.flip_bit(b, pos, bit)
        add(f"frame-{field}-flip", edited(S, flip), error("CorruptionError", f.offset),
            note="CRC mismatch in a unit followed by later committed units: damage, not a torn tail (11.4 rule 1)")
        if field != "crc":
            def flip_fix(b, pos=pos, bit=bit):
                wctest.flip_bit(b, pos, bit)
                wctest.fix_frame_crc(b, f.offset)
            add(f"frame-{field}-flip+crc", edited(S, flip_fix), error("AuthenticationError", f.offset),
                note="a CRC-valid frame that fails its field checks or its tag (11.3 step 6)")
    for label, fr in (("hardstate", bs[2][1]), ("commit", bs[2][2])):
        pos = fr.offset + FRAME_HEADER_SIZE + 1
        add(f"{label}-frame-payload-flip", edited(S, lambda b, pos=pos: wctest.flip_bit(b, pos, 0)),
            error("CorruptionError", fr.offset))
        add(f"{label}-frame-payload-flip+crc",
            edited(S, lambda b, pos=pos, off=fr.offset: (wctest.flip_bit(b, pos, 0), wctest.fix_frame_crc(b, off))),
            error("AuthenticationError", fr.offset))

    # -- damage in the last unit: torn or corrupt by rule 3 ------------------------------------
    lf = bs[-1][0]
    pos = lf.offset + FRAME_HEADER_SIZE + 3
    damaged = edited(S, lambda b: wctest.flip_bit(b, pos, 0))
    assert not looks_incomplete(damaged, lf.offset, lf.end), "pick another byte: the frame looks incomplete"
    add("last-unit-payload-flip", damaged, error("CorruptionError", lf.offset),
        note="our frame, damaged, and it does not look like an incomplete write (11.4 rule 3)")
    add("last-unit-payload-flip+crc", edited(damaged, lambda b: wctest.fix_frame_crc(b, lf.offset)),
        error("AuthenticationError", lf.offset))

    # -- truncations -----------------------------------------------------------------------------
    for label, cut in (("1-byte-of-last-unit", prev_C + 1), ("mid-header-of-last-unit", prev_C + 40),
                       ("mid-payload-of-last-unit", prev_C + FRAME_HEADER_SIZE + 50),
                       ("inside-last-commit", C - 20)):
        add(f"truncated-{label}", S[:cut], opens(before_last, True),
            note="a file ending inside the last unit is a torn tail (11.4): cut back to the last commit")
    add("truncated-at-last-commit", S[:C], opens(full, False), note="W <= C: a clean end, nothing to repair")
    mid = bs[3][0].offset + FRAME_HEADER_SIZE + 40
    add("truncated-inside-a-middle-unit", S[:mid], opens((BATCHES - 3) * BATCH, True),
        note="NOT DETECTED BY DESIGN (FORMAT 15, 'rollback of the tail'): cutting the newest unsealed segment "
             "inside an earlier unit looks like a crash during that unit; the later units are lost")
    add("truncated-inside-header", S[:100], error("CorruptionError", 0))
    add("truncated-to-empty", b"", error("CorruptionError", 0))
    add("sealed-truncated", M[:-8], error("CorruptionError", len(M) - 8, target=M_REL),
        base="enc", target=M_REL, note="a sealed segment's exact size is in the MAC'd manifest")

    # -- zeroed sectors ----------------------------------------------------------------------------
    pieces = []
    p = prev_C
    while p < C:                                   # bounded: p strictly grows
        q = min(C, (p // 512 + 1) * 512)
        pieces.append((p, q))
        p = q
    for label, (a, b_) in (("first", pieces[0]), ("last", pieces[-1])):
        def zero(b, a=a, b_=b_):
            b[a:b_] = bytes(b_ - a)
        add(f"last-unit-{label}-sector-lost", edited(S, zero), opens(before_last, True),
            note="a power loss during the last write keeps any subset of its sectors (FORMAT 14)")
    lo_u, hi_u = bs[2][0].offset, bs[3][-1].next
    sector = ((lo_u + 511) // 512) * 512
    assert sector + 512 <= hi_u, "a whole sector inside units 2-3"
    hit = first_changed_frame(frames, S, sector, sector + 512)
    add("middle-unit-sector-zeroed", edited(S, lambda b: b.__setitem__(slice(sector, sector + 512), bytes(512))),
        error("CorruptionError", hit.offset), note="a lost sector in a unit that later commits prove durable (rule 1)")
    add("header-sector-zeroed", edited(S, lambda b: b.__setitem__(slice(0, 512), bytes(512))),
        error("CorruptionError", 0))
    zero_from = prev_C + 300
    add("zeroed-from-mid-last-unit", S[:zero_from] + bytes(len(S) - zero_from), opens(before_last, True))
    mf = wctest.parse_frames(M)
    me = [fr for fr in mf if fr.type == fmt.FRAME_ENTRIES]
    ms = ((me[2].offset + 511) // 512) * 512
    first_hit = first_changed_frame(me, M, ms, ms + 512)
    add("sealed-sector-zeroed", edited(M, lambda b: b.__setitem__(slice(ms, ms + 512), bytes(512))),
        error("CorruptionError", first_hit.offset, target=M_REL, when="read"), target=M_REL,
        note="sealed segments are opened through their index; the damaged record fails when it is read")

    # -- garbage tails -----------------------------------------------------------------------------
    add("garbage-40-bytes-after-last-commit", S[:C] + garbage("40", 40) + S[C + 40:], opens(full, True))
    add("garbage-600-bytes-after-last-commit", S[:C] + garbage("600", 600) + S[C + 600:], opens(full, True),
        note="not the frame this segment would write next (none of nonce, key ID, chain match): torn (rule 2)")
    add("garbage-appended-at-eof", S + garbage("eof", 100), opens(full, True))
    add("sealed-garbage-after-index", M + garbage("sealed", 100), error("CorruptionError", len(M), target=M_REL),
        target=M_REL)

    # -- swapped, duplicated, deleted records ----------------------------------------------------
    a_, b2 = bs[1][0], bs[3][0]
    assert a_.length == b2.length

    def swap(b, a_=a_, b2=b2):
        ra, rb = bytes(b[a_.offset:a_.next]), bytes(b[b2.offset:b2.next])
        b[a_.offset:a_.next], b[b2.offset:b2.next] = rb, ra
    add("records-swapped", edited(S, swap), error("AuthenticationError", a_.offset))
    x, y = bs[2], bs[3]
    lo_x, hi_x, lo_y, hi_y = x[0].offset, x[-1].next, y[0].offset, y[-1].next
    add("units-swapped", edited(S, lambda b: b.__setitem__(slice(lo_x, hi_y), b[lo_y:hi_y] + b[lo_x:hi_x])),
        error("AuthenticationError", lo_x))
    add("record-duplicated-over-another",
        edited(S, lambda b: b.__setitem__(slice(b2.offset, b2.next), b[a_.offset:a_.next])),
        error("AuthenticationError", b2.offset))
    add("unit-deleted", S[:lo_x] + S[hi_x:] + bytes(hi_x - lo_x), error("AuthenticationError", lo_x),
        note="the next unit slides into its place: its sequence number and chain value give it away")
    u4 = S[bs[4][0].offset:bs[4][-1].next]
    add("stale-unit-replayed-after-last-commit", S[:C] + u4 + S[C + len(u4):], error("AuthenticationError", C),
        note="a complete, CRC-valid earlier unit after the last commit is not a torn write: the disk never "
             "returns old bytes in unwritten space (FORMAT 14), so it is reported, not cut")
    M3 = seg_bytes("enc", 2)
    stale = M3[128:128 + 512]
    add("stale-frames-of-an-earlier-segment-after-last-commit", S[:C] + stale + S[C + len(stale):],
        error("AuthenticationError", C),
        note="frames of an earlier segment (same data key) after the last commit: CRC-valid, wrong sequence")
    src = wctest.batches(wctest.parse_frames(M3))[2][0]
    dst = bs[2][0]
    assert src.length == dst.length
    add("record-from-another-segment", S[:dst.offset] + M3[src.offset:src.next] + S[dst.next:],
        error("AuthenticationError", dst.offset))
    O = read(os.path.join(stores["enc-other"]["dir"], seg_path("enc-other", 3)))
    assert seg_path("enc-other", 3) == S_REL
    add("record-from-another-store", S[:dst.offset] + O[dst.offset:dst.next] + S[dst.next:],
        error("AuthenticationError", dst.offset))

    # -- foreign and missing segments -----------------------------------------------------------
    add("segment-from-another-store", O, error("AuthenticationError", 48),
        note="its header names another data key than the manifest")
    add("segment-renamed-over-the-next", M3, error("AuthenticationError", 0),
        note="a segment of the same store in another segment's slot")
    P = read(os.path.join(stores["plain"]["dir"], seg_path("plain", 3)))
    add("plaintext-segment-in-encrypted-store", P, error("AuthenticationError", 48))
    MO = read(os.path.join(stores["enc-other"]["dir"], seg_path("enc-other", 1)))
    add("sealed-segment-from-another-store", MO, error("AuthenticationError", 48, target=M_REL), target=M_REL)
    add("sealed-segment-deleted", None, error("CorruptionError", None, target=M_REL), target=M_REL)
    add("open-segment-deleted", None, error("CorruptionError", None))
    add("rollback-of-the-open-segment", rollback, opens(ROLLBACK_AFTER * BATCH, False),
        note="NOT DETECTED BY DESIGN (FORMAT 15): an older copy of the newest unsealed segment, cut at a commit "
             "boundary, looks like a store that stopped there")

    # -- sealed segment records ------------------------------------------------------------------
    rec = me[3]
    pos = rec.offset + FRAME_HEADER_SIZE + 5
    add("sealed-record-payload-flip", edited(M, lambda b: wctest.flip_bit(b, pos, 0)),
        error("CorruptionError", rec.offset, target=M_REL, when="read"), target=M_REL)
    add("sealed-record-payload-flip+crc",
        edited(M, lambda b: (wctest.flip_bit(b, pos, 0), wctest.fix_frame_crc(b, rec.offset))),
        error("AuthenticationError", rec.offset, target=M_REL, when="read"), target=M_REL)
    idx = [fr for fr in mf if fr.type == fmt.FRAME_INDEX][0]
    ipos = idx.offset + FRAME_HEADER_SIZE + 2
    add("sealed-index-payload-flip", edited(M, lambda b: wctest.flip_bit(b, ipos, 0)),
        error("CorruptionError", idx.offset, target=M_REL), target=M_REL)
    add("sealed-index-payload-flip+crc",
        edited(M, lambda b: (wctest.flip_bit(b, ipos, 0), wctest.fix_frame_crc(b, idx.offset))),
        error("AuthenticationError", idx.offset, target=M_REL), target=M_REL)

    # -- plaintext store (algorithm NONE: keyless BLAKE2b tags) --------------------------------
    Pf = wctest.parse_frames(P)
    Pb = wctest.batches(Pf)
    pf = Pb[2][0]
    ppos = pf.offset + FRAME_HEADER_SIZE + 7
    P_REL = seg_path("plain", 3)
    add("plain-frame-payload-flip", edited(P, lambda b: wctest.flip_bit(b, ppos, 0)),
        error("CorruptionError", pf.offset, target=P_REL), base="plain", target=P_REL)
    add("plain-frame-payload-flip+crc",
        edited(P, lambda b: (wctest.flip_bit(b, ppos, 0), wctest.fix_frame_crc(b, pf.offset))),
        error("AuthenticationError", pf.offset, target=P_REL), base="plain", target=P_REL)
    add("plain-truncated-in-last-unit", P[:Pb[-2][-1].next + 100], opens(before_last, True),
        base="plain", target=P_REL)
    add("plain-header-flip", edited(P, lambda b: wctest.flip_bit(b, 20, 0)), error("CorruptionError", 0, target=P_REL),
        base="plain", target=P_REL)

    # -- snapshots of the 'snap' store: the newest fails, the older one takes over --------------
    import snaptest
    sdir = os.path.join(stores["snap"]["dir"], ENC_SNAP)
    names = sorted(n for n in os.listdir(sdir) if n.endswith(".snap"))
    assert len(names) == 2
    NEW_REL = f"{ENC_SNAP}/{names[-1]}"
    N = read(os.path.join(sdir, names[-1]))
    lay = snaptest.parse_snapshot(N)
    assert len(lay.chunks) >= 3 and lay.chunks[-1].flags & 1
    fallback = {"outcome": "opens", "first_index": 1, "last_index": SNAP_ENTRIES, "hard_state": hs_of(SNAP_ENTRIES),
                "repaired": False, "snapshot_index": SNAP_AT[0], "snapshot_quarantined": True}
    c0, c1 = lay.chunks[0], lay.chunks[1]

    def snap_case(name, data, note=""):
        add(name, data, fallback, base="snap", target=NEW_REL,
            note=note or "the newest snapshot fails verification at open: renamed .broken, the older one is used "
                         "(FORMAT 11.8)")
    snap_case("snapshot-chunk-flip", edited(N, lambda b: wctest.flip_bit(b, c1.offset + 8 + 10, 0)))
    snap_case("snapshot-missing-final-chunk", N[:lay.chunks[-1].offset])
    snap_case("snapshot-chunks-swapped",
              N[:c0.offset] + N[c1.offset:c1.end] + N[c0.offset:c0.end] + N[c1.end:])
    snap_case("snapshot-header-flip", edited(N, lambda b: wctest.flip_bit(b, 30, 0)))
    snap_case("snapshot-bundle-flip", edited(N, lambda b: wctest.flip_bit(b, 128 + 40, 2)))
    snap_case("snapshot-meta-flip", edited(N, lambda b: wctest.flip_bit(b, lay.meta_offset + 8 + 3, 0)))
    snap_case("snapshot-garbage-after-final-chunk", N + garbage("snap", 50))
    snap_case("snapshot-truncated-to-header", N[:128])

    # -- export files ------------------------------------------------------------------------------
    ex = read(os.path.join(exports_dir, "snap-40.wcexp"))
    exk = read(os.path.join(exports_dir, "snap-40-kek.wcexp"))
    from walcrypt.backup import EXPORT_HEADER_SIZE
    bundle_len = int.from_bytes(ex[52:56], "little")
    snap_off = EXPORT_HEADER_SIZE + bundle_len
    ok = {"outcome": "inspects", "index": SNAP_AT[1], "term": 1, "data_bytes": SNAP_LEN}

    def export_case(name, data, expect, note=""):
        cases.append({"name": name, "base": None, "target": None, "data": data, "expect": expect, "note": note,
                      "kind": "export"})

    def ex_err(name, when="parse"):
        return {"outcome": "error", "error": name, "when": when}
    export_case("export-valid", ex, ok)
    export_case("export-kek-embedded-valid", exk, {**ok, "kek_embedded": True})
    export_case("export-header-flip", edited(ex, lambda b: wctest.flip_bit(b, 20, 0)), ex_err("CorruptionError"))
    export_case("export-truncated", ex[:-10], ex_err("CorruptionError"))
    export_case("export-extended", ex + b"\x00" * 10, ex_err("CorruptionError"))
    export_case("export-kek-section-flip", edited(exk, lambda b: wctest.flip_bit(b, EXPORT_HEADER_SIZE + 3, 0)),
                ex_err("CorruptionError"))
    export_case("export-bundle-flip", edited(ex, lambda b: wctest.flip_bit(b, EXPORT_HEADER_SIZE + 30, 0)),
                ex_err("CorruptionError"))
    export_case("export-snapshot-chunk-flip",
                edited(ex, lambda b: wctest.flip_bit(b, snap_off + c1.offset + 8 + 10, 0)),
                ex_err("AuthenticationError", when="inspect"))
    export_case("export-snapshot-header-flip", edited(ex, lambda b: wctest.flip_bit(b, snap_off + 30, 0)),
                ex_err("CorruptionError"))
    return cases


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

EXT = {"export": ".wcexp"}


def main(outdir: str) -> None:
    work = tempfile.mkdtemp(prefix="walcrypt-corpus-")
    try:
        built = {}
        rollback_path = os.path.join(work, "rollback.wal")
        for kind in ("enc", "enc-other", "plain"):
            path = os.path.join(work, kind)
            build_child_store(kind, path, rollback_path if kind == "enc" else "")
            built[kind] = path
        built["snap"] = os.path.join(work, "snap")
        build_snap_store(built["snap"])
        exports_dir = os.path.join(work, "exports")

        # fresh output tree
        for sub in ("stores", "cases", "exports"):
            shutil.rmtree(os.path.join(outdir, sub), ignore_errors=True)
        os.makedirs(os.path.join(outdir, "cases"))
        stores = {}
        for kind, path in built.items():
            dst = os.path.join(outdir, "stores", kind)
            copy_store(path, dst)
            stores[kind] = {"dir": dst, "facts": store_facts(path, kind != "plain")}
        shutil.copytree(exports_dir, os.path.join(outdir, "exports"))

        cases = build_cases(stores, read(rollback_path), exports_dir)
        manifest_cases = []
        names = set()
        for case in cases:
            assert case["name"] not in names, case["name"]
            names.add(case["name"])
            rel = None
            if case["data"] is not None:
                ext = EXT.get(case.get("kind", ""), os.path.splitext(case["target"] or ".bin")[1])
                rel = f"cases/{case['name']}{ext}"
                with open(os.path.join(outdir, rel), "wb") as fh:
                    fh.write(case["data"])
            manifest_cases.append({"name": case["name"], "kind": case.get("kind", "store"), "base": case["base"],
                                   "target": case["target"], "file": rel, "expect": case["expect"],
                                   "note": case["note"]})
        doc = {
            "format_version": 1,
            "generator": "tests/corpus/make_corpus.py",
            "kek": __import__("wctest").KEK_BYTES.hex(),
            "entries": {"generator": "wctest.make_entries(lo, hi, length=24)", "batch": BATCH,
                        "hard_state": "HardState(1, 1, last index of the batch)"},
            "snapshot_data": "make_corpus.snap_data(index)",
            "stores": {k: {"dir": f"stores/{k}", **v["facts"]} for k, v in stores.items()},
            "exports": sorted(os.listdir(os.path.join(outdir, "exports"))),
            "cases": manifest_cases,
        }
        with open(os.path.join(outdir, "MANIFEST.json"), "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.write("\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        child_write(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    elif len(sys.argv) >= 2 and sys.argv[1] == "--child-snap":
        child_snap(sys.argv[2])
    else:
        main(os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else HERE)
