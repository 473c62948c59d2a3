"""Fuzz harnesses for every walcrypt parser, shared by atheris and hypothesis.

Each harness is a function ``harness(data: bytes) -> None`` with one invariant (DESIGN.md,
"Testing principles"; STYLE.md, "Misuse vs bad input"):

* any input gives a result or a :class:`walcrypt.errors.StorageError` -- any other exception
  escapes the harness, which is what both atheris and hypothesis report;
* never data that was not written: whatever a reader returns is checked against what the
  corpus stores really hold (entries returned by a recovery scan are a prefix of the entries
  written to that segment; a frame that authenticates carries a frame that was written; a
  snapshot yields a prefix of its data; a decoded LMDB record re-encodes to its input);
* never unbounded memory or time: readers bound lengths before they allocate (checked with
  tracemalloc in the ``test_fuzz_*`` modules; libFuzzer's ``-rss_limit_mb`` under atheris).

The inputs that matter are mutations of real files, so every harness seeds from the corpus of
``tests/corpus`` (see its MANIFEST.json: the stores' IDs, data keys and segment identities are
fixed there, so the harnesses can build readers without opening a store).

Harnesses (``HARNESSES``):

``segment_header``  ``walcrypt.segment_codec.decode_header``
``segment``         frame decoding and whole-segment recovery: the open path of
                    ``storage.Store._open_segment`` (header, identity, key commitment, then
                    ``Segment.scan``), ``Segment.scan`` with the segment's own key whatever the
                    header says, the same scan of the file read in small windows
                    (``walcrypt.bounded.FileSource``) checked against the whole-file scan the
                    engine used before (``legacy_scan.py``): same outcome, same index, and
                    ``Segment.read_frame`` / ``load_sealed`` / ``read_entries_record`` on the
                    bytes written to a file
``snapshot``        ``walcrypt.snapshot.SnapshotFile``: header, bundle, unlock, every chunk
``records``         LMDB values: ``meta.decode_manifest``, ``decode_keyring``, ``decode_compacted``,
                    ``snapinfo.decode_info``, ``stable.open_value`` (encrypted and plaintext) and
                    ``Meta.open_value`` (the value MAC); the first input byte picks the decoder
``export``          ``walcrypt.backup.ExportFile`` and ``inspect_export`` (with and without the KEK)
``json``            the JSON records read from disk: ``keys.parse_kek_params`` (store/kek_params) and
                    what a KEK provider does with accepted parameters, ``snapshot.parse_bundle``
                    (keyring bundles) and how an export's keyring is used, ``rotation.parse_state``
                    and ``snapshot.decode_meta``; the first input byte picks the parser
"""

from __future__ import annotations

import functools
import itertools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
for _p in (ROOT, TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from crc32c import crc32c  # noqa: E402

import walcrypt  # noqa: E402
from walcrypt import crypto, rotation, stable  # noqa: E402
from walcrypt import keys as K  # noqa: E402
from walcrypt import format as fmt  # noqa: E402
from walcrypt import meta as M  # noqa: E402
from walcrypt.backup import EXPORT_HEADER_SIZE, ExportFile, inspect_export  # noqa: E402
from walcrypt.bounded import FileSource  # noqa: E402
from walcrypt.errors import StorageError, WalcryptKeyError  # noqa: E402
from walcrypt.segment import Segment, encode_header  # noqa: E402
from walcrypt.segment_codec import SegmentIdentity, decode_header
from walcrypt.snapshot import SnapshotFile, decode_meta, encode_meta, parse_bundle, snapshot_keys  # noqa: E402
from walcrypt.snapinfo import decode_info, encode_info  # noqa: E402
from walcrypt.types import ConfState, HardState, SnapshotMeta  # noqa: E402
from walcrypt.vfs import VFS  # noqa: E402

import wctest  # noqa: E402
from legacy_scan import LegacySegment  # noqa: E402

CORPUS = os.path.join(TESTS, "corpus")
VECTORS = os.path.join(ROOT, "formats", "vectors")
PATH = "<fuzz>"


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    with open(os.path.join(CORPUS, "MANIFEST.json"), encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def vectors() -> dict:
    with open(os.path.join(VECTORS, "vectors.json"), encoding="utf-8") as f:
        return json.load(f)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def make_corpus():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_corpus", os.path.join(CORPUS, "make_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Scratch:
    """One scratch file per process for the readers that take a path."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="walcrypt-fuzz-")
        self.n = 0

    def write(self, data: bytes, name: str = "input") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path


@functools.lru_cache(maxsize=None)
def scratch() -> _Scratch:
    return _Scratch()


# =============================================================================================
# Segments
# =============================================================================================

@dataclass(frozen=True)
class SegmentTarget:
    """A pristine corpus segment and everything needed to read it without a store."""

    store: str
    k: int                              # position in the store's manifest

    @property
    def facts(self) -> dict:
        return manifest()["stores"][self.store]

    @property
    def seg(self) -> dict:
        return self.facts["segments"][self.k]

    @property
    def pristine(self) -> bytes:
        return _read(os.path.join(CORPUS, self.facts["dir"], self.seg["file"]))

    @property
    def name(self) -> str:
        return f"{self.store}/{self.seg['segment_id']}"


SEGMENT_TARGETS = {
    "enc-open": SegmentTarget("enc", 3),       # the unsealed segment most corpus cases damage
    "enc-sealed": SegmentTarget("enc", 1),
    "plain-open": SegmentTarget("plain", 3),
    "snap-sealed": SegmentTarget("snap", 1),   # holds SNAPSHOT records
}


@functools.lru_cache(maxsize=None)
def _segment_info(key: str) -> dict:
    """Identity, cipher inputs and the ground truth of one pristine segment."""
    t = SEGMENT_TARGETS[key]
    facts, seg = t.facts, t.seg
    store_id = bytes.fromhex(facts["store_id"])
    key_id = bytes.fromhex(seg["key_id"])
    dek = bytes.fromhex(facts["keys"][seg["key_id"]]) if facts["encrypted"] else None
    pristine = t.pristine
    found = decode_header(pristine[:128], PATH)
    lo, hi = seg["entries"]
    if t.store == "snap":
        expected = make_corpus().entries(lo, hi)
    else:
        expected = wctest.make_entries(lo, hi, length=24)
    # hard states this segment can hold: the creation one (the last saved before it) and one per batch
    allowed_hs = {HardState(), *(HardState(1, 1, n) for n in range(lo - 1, hi))}
    info = {"store_id": store_id, "segment_id": seg["segment_id"], "base_index": seg["base_index"],
            "algorithm": seg["algorithm"], "key_id": key_id, "dek": dek, "salt": found.salt,
            "commitment": found.commitment, "pristine": pristine, "expected": expected,
            "allowed_hs": allowed_hs, "sealed": seg["state"] == "sealed", "index_offset": seg["index_offset"],
            "end_offset": seg["end_offset"]}
    # every frame that was written: header fields and plaintext, by sequence number
    seg_obj = _segment_for(info, found.salt)
    frames = {}
    for fr in wctest.parse_frames(pristine):
        hdr = pristine[fr.offset:fr.offset + fmt.FRAME_HEADER_SIZE]
        ct = pristine[fr.offset + fmt.FRAME_HEADER_SIZE:fr.end]
        plain = seg_obj.cipher.open(hdr, ct, path=PATH, offset=fr.offset)
        frames[fmt.FRAME_HEADER_STRUCT.unpack(hdr)] = plain
    info["frames"] = frames
    info["frame_offsets"] = [(fr.offset, fr.type) for fr in wctest.parse_frames(pristine)]
    snaps = []
    seg_obj.scan(pristine)
    snaps = [tuple(r) for r in seg_obj.snapshot_records]
    info["snapshot_records"] = set(snaps)
    return info


def _cipher(info: dict, salt: bytes) -> tuple[crypto.FrameCipher, bytes]:
    alg = info["algorithm"]
    if alg == fmt.ALG_NONE:
        return (crypto.FrameCipher(alg, crypto.suite(alg).new(b""), info["key_id"], info["store_id"],
                                   info["segment_id"]), bytes(fmt.COMMITMENT_SIZE))
    key, commitment = crypto.segment_keys(info["dek"], salt, info["store_id"], info["segment_id"], alg)
    return crypto.FrameCipher(alg, crypto.suite(alg).new(key), info["key_id"], info["store_id"],
                              info["segment_id"]), commitment


def _segment_for(info: dict, salt: bytes, path: str = PATH, cls=Segment) -> Segment:
    cipher, commitment = _cipher(info, salt)
    ident = SegmentIdentity(info["store_id"], info["segment_id"], info["base_index"], info["algorithm"],
                            info["key_id"], salt, commitment)
    return cls(VFS(), path, ident, cipher)


def segment_header(data: bytes) -> None:
    """decode_header: an identity or a StorageError; an accepted header is exactly what encode_header writes."""
    try:
        ident = decode_header(data, PATH)
    except StorageError:
        return
    assert encode_header(ident) == bytes(data[:fmt.SEGMENT_HEADER_SIZE]), "decode_header accepted bytes it would not write"


def _check_scan(info: dict, seg: Segment, data: bytes, seen: list) -> None:
    """The scan's result against the ground truth of the segment."""
    expected = info["expected"]
    assert seen == [tuple(e) for e in expected[:len(seen)]], "the scan returned entries that were never written"
    assert seg.last_index == info["base_index"] - 1 + len(seen)
    assert seg.hardstate is None or seg.hardstate in info["allowed_hs"], f"invented hard state {seg.hardstate}"
    if seg.hardstate is not None:
        assert seg.hardstate.commit <= max(seg.last_index, info["base_index"] - 1)
    assert {tuple(r) for r in seg.snapshot_records} <= info["snapshot_records"], "invented snapshot record"


def _scan(info: dict, seg: Segment, data: bytes) -> None:
    seen: list = []

    def on_entries(rec):
        seen.extend((rec.first + k, rec.terms[k], bytes(d)) for k, d in enumerate(rec.datas()))
    try:
        committed_end, torn = seg.scan(data, on_entries=on_entries)
    except StorageError:
        _check_scan(info, seg, data, seen)
        return
    assert isinstance(committed_end, int) and fmt.SEGMENT_HEADER_SIZE <= committed_end <= max(len(data), 128)
    assert committed_end % fmt.ALIGN == 0
    if torn is not None:
        offset, detail = torn
        assert offset >= committed_end and isinstance(detail, str)
    _check_scan(info, seg, data, seen)


def segment_open_path(info: dict, data: bytes) -> None:
    """What storage.Store._open_segment does before scanning: header, key ID, identity, commitment."""
    try:
        found = decode_header(data[:fmt.SEGMENT_HEADER_SIZE], PATH)
    except StorageError:
        return
    if found.key_id != info["key_id"]:
        return                                     # the engine raises AuthenticationError here
    seg = _segment_for(info, found.salt)
    try:
        seg.check_identity(found, seg.ident.commitment)
    except StorageError:
        return
    _scan(info, seg, data)


def _read_path(info: dict, data: bytes) -> None:
    """read_frame, load_sealed and read_entries_record on a file holding ``data``."""
    path = scratch().write(data, "segment.wal")
    seg = _segment_for(info, info["salt"], path)
    try:
        offsets = list(info["frame_offsets"])
        offsets += [(fr.offset, fr.type) for fr in wctest.parse_frames(bytes(data))[:64]]
        for off, ftype in offsets:
            try:
                h, plain = seg.read_frame(off, ftype)
            except StorageError:
                continue
            assert info["frames"].get(tuple(h)) == plain, f"read_frame at {off} returned a frame never written"
        if info["sealed"]:
            try:
                seg.load_sealed(info["index_offset"], len(data))
            except StorageError:
                return
            one_by_one: list = []
            for r in range(len(seg.rec_offset)):
                try:
                    rec = seg.read_entries_record(r)
                except StorageError as exc:
                    one_by_one.append(_error(exc))
                    continue
                one_by_one.append(_record(rec))
                for k, d in enumerate(rec.datas()):
                    idx = rec.first + k
                    exp = info["expected"][idx - info["base_index"]] if 0 <= idx - info["base_index"] < len(
                        info["expected"]) else None
                    assert exp is not None and tuple(exp) == (idx, rec.terms[k], bytes(d)), \
                        f"entry {idx} read from a sealed segment was never written"
            _windowed_reads(seg, one_by_one)
    finally:
        seg.close()


def _error(exc: StorageError) -> tuple:
    return ("error", type(exc).__name__, getattr(exc, "offset", None), getattr(exc, "detail", str(exc)))


def _record(rec) -> tuple:
    return (rec.first, tuple(rec.terms), tuple(rec.datas()))


# Windows for the bulk read: below one frame header plus its read-ahead, an odd size, one that
# holds a few of the corpus's records, and the default.
READ_WINDOWS = (1, 97, 1000, None)


def _windowed_reads(seg: Segment, one_by_one: list) -> None:
    """read_entries_records over every record, for every window, hands out exactly the records
    read_entries_record returns one by one, up to the first that fails, and then fails alike."""
    if not one_by_one:
        return
    want = list(itertools.takewhile(lambda x: x[0] != "error", one_by_one))
    failure = next((x for x in one_by_one if x[0] == "error"), None)
    for window in READ_WINDOWS:
        got: list = []
        try:
            for rec in seg.read_entries_records(0, len(one_by_one) - 1, window):
                got.append(_record(rec))
        except StorageError as exc:
            assert failure is not None and _error(exc) == failure, \
                f"window {window}: the bulk read failed with {_error(exc)}, the record read with {failure}"
        else:
            assert failure is None, f"window {window}: the bulk read passed over {failure}"
        assert got == want, f"window {window}: the bulk read handed out other records than the record read"


# Windows for the bounded scan: the smallest it accepts (one frame header), an odd size that puts
# window ends anywhere in a frame, sector-sized ones, and one larger than any corpus file.
SCAN_WINDOWS = (fmt.FRAME_HEADER_SIZE, 97, 512, 1000, 1 << 20)


def _scan_outcome(seg: Segment, data, see_entries: bool = True, **kw) -> tuple:
    """Everything a scan decides: its result or error (type, offset, detail) and the index it built."""
    seen: list = []

    def on_entries(rec):
        seen.extend((rec.first + k, rec.terms[k], bytes(d)) for k, d in enumerate(rec.datas()))
    try:
        out: tuple = ("ok", seg.scan(data, on_entries=on_entries if see_entries else None, **kw))
    except StorageError as exc:
        out = ("error", type(exc).__name__, getattr(exc, "offset", None), getattr(exc, "detail", str(exc)))
    return out + (seg.last_index, seg.hardstate, tuple(seg.rec_offset), tuple(seg.rec_index), tuple(seg.rec_count),
                  tuple(seg.runs), seg.sealed, seg.seq, seg.chain, seg.write_offset,
                  tuple(tuple(r) for r in seg.snapshot_records), tuple(seen))


def scan_windows(info: dict, data: bytes) -> None:
    """The bounded scan of the file, for every window size, against the whole-file scan of before."""
    expected = _scan_outcome(_segment_for(info, info["salt"], cls=LegacySegment), data)
    path = scratch().write(data, "scan.wal")
    fd = os.open(path, os.O_RDONLY)
    try:
        for window in SCAN_WINDOWS:
            got = _scan_outcome(_segment_for(info, info["salt"], path), FileSource(VFS(), fd), window=window)
            assert got == expected, f"window {window}: the bounded scan decided {got[:4]}, the whole-file " \
                                    f"scan {expected[:4]}"
        # The open's scan sees no record (it indexes terms only): it decides alike and builds the same index.
        for window in (fmt.FRAME_HEADER_SIZE, 1 << 20):
            got = _scan_outcome(_segment_for(info, info["salt"], path), FileSource(VFS(), fd), window=window,
                                see_entries=False)
            assert got == expected[:-1] + ((),), f"window {window}: the open's scan decided {got[:4]}, the " \
                                                 f"whole-file scan {expected[:4]}"
    finally:
        os.close(fd)


def segment(data: bytes, target: str = "enc-open") -> None:
    """Frames and recovery of one segment: the open path, the scan with the segment's key (whole and in
    windows), the reads."""
    info = _segment_info(target)
    data = bytes(data)
    segment_open_path(info, data)
    _scan(info, _segment_for(info, info["salt"]), data)
    scan_windows(info, data)
    _read_path(info, data)


# =============================================================================================
# Snapshots
# =============================================================================================

@functools.lru_cache(maxsize=None)
def _snapshot_info() -> dict:
    facts = manifest()["stores"]["snap"]
    sdir = os.path.join(CORPUS, facts["dir"], "snap-v1-encrypted")
    files = {}
    for name in sorted(os.listdir(sdir)):
        if name.endswith(".snap"):
            raw = _read(os.path.join(sdir, name))
            sf = SnapshotFile(VFS(), os.path.join(sdir, name))
            files[sf.header.snapshot_id] = {"raw": raw, "index": sf.header.index, "term": sf.header.term,
                                            "data": make_corpus().snap_data(sf.header.index)}
    return {"store_id": bytes.fromhex(facts["store_id"]),
            "keys": {bytes.fromhex(k): bytes.fromhex(v) for k, v in facts["keys"].items()}, "files": files}


def _snapshot_keys(h, info):
    if h.algorithm == fmt.ALG_NONE:
        return crypto.suite(fmt.ALG_NONE).new(b""), bytes(fmt.COMMITMENT_SIZE)
    dek = info["keys"].get(h.key_id)
    if dek is None:
        return None
    key, commitment = snapshot_keys(dek, h)
    return crypto.suite(h.algorithm).new(key), commitment


def snapshot_file(path: str, *, offset: int = 0, info: dict | None = None) -> None:
    """SnapshotFile at ``path``: header, bundle, unlock, chunks; checked against the corpus snapshots."""
    info = info or _snapshot_info()
    try:
        sf = SnapshotFile(VFS(), path, offset=offset)
    except StorageError:
        return
    try:
        doc = sf.bundle_doc()
        assert isinstance(doc, dict), f"bundle_doc returned {type(doc).__name__}, not a dict"
    except StorageError:
        pass
    h = sf.header
    keys = _snapshot_keys(h, info)
    if keys is None:
        return                                   # an unknown key ID: Snapshots checks the digest before
    try:
        meta = sf.unlock(*keys)
    except StorageError:
        return
    orig = info["files"].get(h.snapshot_id)
    assert orig is not None and (meta.index, meta.term) == (orig["index"], orig["term"]), \
        "snapshot metadata that was never written authenticated"
    got = bytearray()
    try:
        for chunk in sf.chunks():
            got += chunk
            assert orig["data"].startswith(bytes(got)), "a snapshot chunk that was never written authenticated"
    except StorageError:
        return
    assert bytes(got) == orig["data"], "a complete snapshot read returned other data"


def snapshot(data: bytes) -> None:
    snapshot_file(scratch().write(bytes(data), "input.snap"))


# =============================================================================================
# LMDB records
# =============================================================================================

@functools.lru_cache(maxsize=None)
def _records_info() -> dict:
    v = vectors()
    inp, kr = v["inputs"], v["keyring"]
    store_id = bytes.fromhex(inp["store_id"])
    dek_id = bytes.fromhex(inp["dek_key_id"])
    dek = bytes.fromhex(inp["dek"])

    class _Meta:
        path = PATH

    class EncStore:
        """What stable.open_value needs from a store (the vectors' store and DEK)."""
        encrypted = True
        algorithm = v["stable"]["algorithm"]
        meta = _Meta()

        def __init__(self):
            self.store_id = store_id

        def secret(self, key_id: bytes) -> bytes:
            if key_id != dek_id:
                raise walcrypt.KeyNotFoundError(f"data key {key_id.hex()} is not in the keyring")
            return dek

    class PlainStore(EncStore):
        encrypted = False

    meta = M.Meta.__new__(M.Meta)          # the MAC code only; no LMDB environment behind it
    meta.path = PATH
    meta.set_mac_key(bytes.fromhex(kr["meta_key"]), version=3)
    return {"enc": EncStore(), "plain": PlainStore(), "meta": meta, "dek_id": dek_id,
            "stable_key": bytes.fromhex(v["stable"]["key"]), "stable_value": bytes.fromhex(v["stable"]["value"]),
            "macs": kr["metadata_macs_v3"],
            "manifest_key": bytes.fromhex(kr["metadata_macs_v3"]["segment_manifest_key"])}


def _rec_manifest(b: bytes) -> None:
    try:
        d = M.decode_manifest(b, PATH)
    except StorageError:
        return
    assert M.encode_manifest(d) == b[:3] + b"\x00" + b[4:], "decode_manifest accepted bytes it would not write"


def _rec_keyring(b: bytes) -> None:
    try:
        e = M.decode_keyring(b"\x01" * 16, b, PATH)
    except StorageError:
        return
    assert M.encode_keyring(e) == b


def _rec_compacted(b: bytes) -> None:
    try:
        t = M.decode_compacted(b, PATH)
    except StorageError:
        return
    assert M.encode_compacted(*t) == b[:24]          # a catalog digest may follow (FORMAT.md 9.1)
    assert len(b) in (24, 24 + M.CATALOG_SIZE)


def _rec_info(b: bytes) -> None:
    try:
        i = decode_info(1, b, "/snap", PATH)
    except StorageError:
        return
    assert encode_info(i) == b[:1] + bytes(7) + b[8:]


def _rec_stable(b: bytes) -> None:
    ri = _records_info()
    try:
        value = stable.open_value(ri["enc"], ri["stable_key"], b)
    except StorageError:
        return
    except WalcryptKeyError:
        # A key ID that is not in the keyring is a key-family error by design (errors.py); in a
        # store the value's MAC (Meta.open_value) is checked before the value is opened.
        assert stable.key_id_of(b) != ri["dek_id"], "a known data key failed with a key error"
        return
    assert value == ri["stable_value"], "a stable value that was never written authenticated"


def _rec_stable_plain(b: bytes) -> None:
    ri = _records_info()
    try:
        value = stable.open_value(ri["plain"], ri["stable_key"], b)
    except StorageError:
        return
    assert value == b[29:]


def _rec_mac(b: bytes) -> None:
    ri = _records_info()
    try:
        value = ri["meta"].open_value(M.DB_SEGMENTS, ri["manifest_key"], b)
    except StorageError:
        return
    stored = bytes.fromhex(ri["macs"]["segment_manifest_stored"])
    assert value == stored[:-16], "a value that was never written passed its MAC"


RECORD_DECODERS: list[Callable[[bytes], None]] = [
    _rec_manifest, _rec_keyring, _rec_compacted, _rec_info, _rec_stable, _rec_stable_plain, _rec_mac]


def records(data: bytes) -> None:
    """First byte: which decoder; the rest: the stored value."""
    data = bytes(data)
    if not data:
        return
    RECORD_DECODERS[data[0] % len(RECORD_DECODERS)](data[1:])


def record_seeds() -> list[bytes]:
    """Real values for every decoder: the vectors, and the corpus stores' LMDB values (MAC removed)."""
    v = vectors()
    macs = v["keyring"]["metadata_macs"]
    out = [bytes([0]) + bytes.fromhex(v["segment_manifest_record"]["value"]),
           bytes([1]) + bytes.fromhex(v["keyring"]["keyring_record"]["value"]),
           bytes([2]) + bytes.fromhex(macs["compacted_value"]),
           bytes([3]) + bytes.fromhex(v["snapshot_registry_record"]["value"]),
           bytes([4]) + bytes.fromhex(v["stable"]["sealed"]),
           bytes([5]) + bytes.fromhex(v["stable"]["plaintext_store_form"]),
           bytes([6]) + bytes.fromhex(macs["segment_manifest_stored"])]
    import lmdb
    for store in ("enc", "snap"):
        env = lmdb.open(os.path.join(CORPUS, manifest()["stores"][store]["dir"], "meta"), readonly=True,
                        lock=False, max_dbs=8, subdir=True)
        try:
            for sel, db in ((0, M.DB_SEGMENTS), (1, M.DB_KEYRING), (3, M.DB_SNAPSHOTS)):
                with env.begin() as txn:
                    for _k, val in txn.cursor(db=env.open_db(db, txn=txn, create=False)):
                        out.append(bytes([sel]) + bytes(val)[:-16])
        finally:
            env.close()
    return out


# =============================================================================================
# Export files
# =============================================================================================

@functools.lru_cache(maxsize=None)
def _export_info() -> dict:
    mf = manifest()
    kek = bytes.fromhex(mf["kek"])
    pristine = [_read(os.path.join(CORPUS, "exports", n)) for n in mf["exports"]]
    bundles = set()
    for raw in pristine:
        blen = int.from_bytes(raw[52:56], "little")
        klen = int.from_bytes(raw[12:16], "little")
        bundles.add(raw[EXPORT_HEADER_SIZE + klen:EXPORT_HEADER_SIZE + klen + blen])
    return {"kek": kek, "bundles": bundles, "snap": _snapshot_info()}


def _inspect(path: str, kek, info: dict) -> None:
    try:
        out = inspect_export(path, kek)
    except StorageError:
        return
    except WalcryptKeyError:
        # Legitimate only when the KEK used is not the store's, or the keyring inside is not the one
        # exported (a forged bundle with a fixed CRC): never for a genuine export and its own KEK.
        ex = ExportFile(path)
        used = kek.material(None) if kek is not None else ex.kek
        assert used != info["kek"] or ex.bundle not in info["bundles"], \
            "a key error for an export that carries its own keyring and the right KEK"
        return
    assert isinstance(out, dict)
    if out["verified"]:
        snaps = [s for s in info["snap"]["files"].values() if s["index"] == out["index"]]
        assert snaps and out["term"] == snaps[0]["term"] and out["data_bytes"] == len(snaps[0]["data"]), \
            "an export verified with data that was never written"


def export(data: bytes) -> None:
    """ExportFile and inspect_export, with and without the KEK; the embedded snapshot is read too."""
    info = _export_info()
    path = scratch().write(bytes(data), "input.wcexp")
    try:
        ex = ExportFile(path)
    except StorageError:
        return
    try:
        doc = ex.bundle_doc()
        assert isinstance(doc, dict), f"bundle_doc returned {type(doc).__name__}, not a dict"
    except StorageError:
        pass
    _inspect(path, None, info)
    _inspect(path, walcrypt.RawKey(info["kek"]), info)
    snapshot_file(path, offset=ex.snapshot_offset, info=info["snap"])


# =============================================================================================
# JSON records
# =============================================================================================

_FUZZ_PASSPHRASE_MEMORY = 1 << 20           # derivations the harness lets through stay cheap


def _json_kek_params(b: bytes) -> None:
    try:
        doc = K.parse_kek_params(b, PATH)
    except StorageError:
        return
    if doc is None:
        return
    assert isinstance(doc, dict) and doc["kind"] in K.KEK_KINDS
    if doc["kind"] == "kms":
        assert K.valid_plugin_name(doc["plugin"])
    if doc["kind"] == "passphrase":
        n, r, p = doc["n"], doc["r"], doc["p"]
        assert K.check_scrypt_costs(n, r, p, max_memory=1 << 64) is None
        assert K.SCRYPT_MIN_SALT <= len(bytes.fromhex(doc["salt"])) <= K.SCRYPT_MAX_SALT
    # What the providers do with accepted parameters: a KEK or a typed error, never more memory than
    # the provider's cap (the passphrase's cap here is 1 MiB, so nothing slow is derived).
    for kek in (K.RawKey(bytes(32)), K.Passphrase("pw", n=2, r=1, max_memory=_FUZZ_PASSPHRASE_MEMORY)):
        try:
            kek.wrapper(doc)
        except (StorageError, walcrypt.WrongKeyError):
            pass


def _json_bundle(b: bytes) -> None:
    try:
        doc = parse_bundle(b, PATH, 0)
    except StorageError:
        return
    if not doc:
        assert not b
        return
    # Everything backup.unlock_export and the inspectors take from an accepted bundle is usable as is.
    assert len(bytes.fromhex(doc["store_id"])) == 16
    assert doc.get("kek_check") is None or len(bytes.fromhex(doc["kek_check"])) == 16
    for k in doc["keys"] + [doc["meta_key"]]:
        assert len(bytes.fromhex(k["id"])) == 16 and bytes.fromhex(k["wrapped"])
    for k in doc["keys"]:
        assert k["state"] in K.STATE_NAMES and k["purpose"] in (K.PURPOSE_DEK, K.PURPOSE_META)
        K.wrap_context(bytes.fromhex(doc["store_id"]), bytes.fromhex(k["id"]), k["purpose"])
    if doc.get("kek_params") is not None:
        _json_kek_params(json.dumps(doc["kek_params"]).encode())


def _json_rotation(b: bytes) -> None:
    try:
        doc = rotation.parse_state(b, PATH)
    except StorageError:
        return
    if doc is not None:
        assert len(bytes.fromhex(doc["pending"])) == 16 and doc["first_index"] >= 1
        assert isinstance(doc.get("queued", 0), int) and doc.get("queued", 0) >= 0


def _json_meta(b: bytes) -> None:
    try:
        meta, doc = decode_meta(b, PATH)
    except StorageError:
        return
    assert isinstance(doc, dict) and 0 <= meta.index < 2 ** 64 and 0 <= meta.term < 2 ** 64
    assert all(isinstance(x, (int, str)) for x in meta.conf_state.voters + meta.conf_state.learners)


JSON_PARSERS: list[Callable[[bytes], None]] = [_json_kek_params, _json_bundle, _json_rotation, _json_meta]


def json_records(data: bytes) -> None:
    """First byte: which parser; the rest: the record as stored."""
    data = bytes(data)
    if not data:
        return
    JSON_PARSERS[data[0] % len(JSON_PARSERS)](data[1:])


def json_seeds() -> list[bytes]:
    """Real records for every parser: KEK parameters of every kind, the corpus exports' and snapshots'
    keyring bundles, a rotation record, snapshot metadata."""
    params = [{"kind": "raw"}, {"kind": "file"}, {"kind": "env"}, {"kind": "kms", "plugin": "demo-kms"},
              {"kind": "passphrase", "kdf": "scrypt", "salt": "5a" * 16, "n": 1 << 15, "r": 8, "p": 1}]
    out = [bytes([0]) + json.dumps(p).encode() for p in params]
    bundles = set(_export_info()["bundles"])
    for f in _snapshot_info()["files"].values():
        blen = int.from_bytes(f["raw"][44:48], "little")
        bundles.add(f["raw"][128:128 + blen])
    out += [bytes([1]) + b for b in sorted(bundles) if b]
    out.append(bytes([2]) + json.dumps({"pending": "ab" * 16, "first_index": 41, "queued": 1, "requested_ns": 1,
                                        "reason": "requested", "rekey": False}, sort_keys=True).encode())
    out.append(bytes([3]) + encode_meta(SnapshotMeta(40, 3, ConfState((1, 2, 3), (4,))), {"app": [1, "x"]}))
    return out


# =============================================================================================
# Seeds and CRC fixers (what lets a mutation get past the checksums to the checks behind them)
# =============================================================================================

def fix_segment_crcs(b: bytearray) -> None:
    """Recompute the header CRC and every frame CRC (as an attacker can)."""
    if len(b) >= 128:
        wctest.fix_header_crc(b)
    off = 128
    for _ in range(4096):                              # bounded walk
        if off + fmt.FRAME_HEADER_SIZE > len(b) or b[off] == 0:
            return
        length = int.from_bytes(b[off + 4:off + 8], "little")
        if length > len(b):
            return
        wctest.fix_frame_crc(b, off)
        off = fmt.align_up(off + fmt.FRAME_HEADER_SIZE + length)


def fix_snapshot_crc(b: bytearray, base: int = 0) -> None:
    if len(b) >= base + 128:
        b[base + 124:base + 128] = crc32c(bytes(b[base:base + 124])).to_bytes(4, "little")


def fix_export_crcs(b: bytearray) -> None:
    if len(b) < EXPORT_HEADER_SIZE:
        return
    klen = int.from_bytes(b[12:16], "little")
    blen = int.from_bytes(b[52:56], "little")
    if klen <= len(b):
        b[48:52] = crc32c(bytes(b[64:64 + klen])).to_bytes(4, "little") if klen else bytes(4)
    b[56:60] = crc32c(bytes(b[64 + klen:64 + klen + blen])).to_bytes(4, "little")
    b[60:64] = crc32c(bytes(b[:60])).to_bytes(4, "little")
    fix_snapshot_crc(b, EXPORT_HEADER_SIZE + klen + blen)


def _case_files(pred) -> list[bytes]:
    out = []
    for c in manifest()["cases"]:
        if c["file"] and pred(c):
            out.append(_read(os.path.join(CORPUS, c["file"])))
    return out


def seeds(name: str, target: str = "enc-open") -> list[bytes]:
    """The corpus inputs of a harness: pristine files first, then the damaged cases."""
    if name in ("segment_header", "segment"):
        t = SEGMENT_TARGETS[target]
        out = [t.pristine] + _case_files(lambda c: c["base"] == t.store and c["target"] == t.seg["file"])
        if name == "segment_header":
            out = [b[:128] for b in out] + [_read(os.path.join(VECTORS, n))[:128] for n in sorted(os.listdir(VECTORS))
                                            if n.endswith(".wal")]
        return out
    if name == "snapshot":
        info = _snapshot_info()
        return [f["raw"] for f in info["files"].values()] + _case_files(lambda c: c["base"] == "snap")
    if name == "records":
        return record_seeds()
    if name == "export":
        return [_read(os.path.join(CORPUS, "exports", n)) for n in manifest()["exports"]] + \
            _case_files(lambda c: c["kind"] == "export")
    if name == "json":
        return json_seeds()
    raise KeyError(name)


CRC_FIXERS = {"segment_header": fix_segment_crcs, "segment": fix_segment_crcs, "snapshot": fix_snapshot_crc,
              "export": fix_export_crcs, "records": lambda b: None, "json": lambda b: None}

HARNESSES: dict[str, Callable[[bytes], None]] = {
    "segment_header": segment_header,
    "segment": segment,
    "snapshot": snapshot,
    "records": records,
    "export": export,
    "json": json_records,
}


def write_seeds(name: str, directory: str) -> int:
    """Fill an (empty) libFuzzer corpus directory with the seeds of ``name``."""
    os.makedirs(directory, exist_ok=True)
    if os.listdir(directory):
        return 0
    items = seeds(name)
    for k, data in enumerate(items):
        with open(os.path.join(directory, f"seed-{k:03d}-{hashlib.sha1(data).hexdigest()[:12]}"), "wb") as f:
            f.write(data)
    return len(items)


def atheris_main(name: str) -> None:
    """Entry point of tests/fuzz/atheris_<name>.py (see the docstring there)."""
    import atheris

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if args:
        n = write_seeds(name, args[0])
        if n:
            print(f"seeded {args[0]} with {n} inputs from tests/corpus", file=sys.stderr)
    harness = HARNESSES[name]
    fixer = CRC_FIXERS[name] if os.environ.get("WALCRYPT_FUZZ_FIXCRC") == "1" else None

    def one_input(data: bytes) -> None:
        if fixer is not None:
            b = bytearray(data)
            fixer(b)
            data = bytes(b)
        harness(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
