"""Snapshot, open-time and DEK-rotation cases (in process, one fresh directory per repetition).

* ``snapshot/op=write/size=256m/v=walcrypt-encrypted`` -- ``save_snapshot`` of a
  streamed state (chunked AEAD, fsync, rename, directory fsync, WAL record,
  registry commit), next to ``v=raw``: ``os.write`` of the same bytes in the
  same 1 MiB chunks and one ``os.fsync``.  Payload MiB/s.
* ``snapshot/op=read/...`` -- read the whole snapshot back through
  ``snapshot().open()`` (decrypting and authenticating every chunk) next to
  reading the raw file.  Both were just written: the page cache is warm.
* ``open/entries=50k/segments=sealed/v=walcrypt-encrypted`` -- ``walcrypt.open``
  of a closed store (every segment sealed: only their index frames are read);
  ``segments=unsealed`` opens a crash image of the same log left in one open
  segment (every record is scanned and authenticated, then the segment is
  sealed); ``segments=sealed+read-all`` is a full replay: open plus
  ``entries()`` over the whole log.  Seconds (lower is better).
* ``open/segment=64m/segments=crashed-full/v=walcrypt-encrypted`` -- crash-recovery open:
  ``walcrypt.open`` of a crash image whose newest segment is a full unsealed segment of the
  default 64 MiB (1 KiB entries saved 64 at a time until one more save would cut a new segment;
  the directory copied while the writer still had it open).  ``v=read-decrypt`` is its floor: read
  a file of the segment's size and AES-256-GCM-decrypt the entry bytes that segment holds once, in
  records of walcrypt's record size (32 entries of 1 KiB), with ``cryptography``'s AESGCM.
  Seconds; the goal's ratio is the floor's time over the open's.
* ``rotation/state=100m/v=walcrypt-encrypted`` -- from ``rotate_dek()`` until the
  old DEK is *inactive*, on a store whose ``snapshot_source`` returns a state
  of that size (the new snapshot, the promotion, the purge of the old key's
  segments and snapshot).  ``v=raw`` is the raw write + fsync of the same
  state, for scale.  Seconds.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import tempfile
import time
from typing import Callable, List, Optional, Tuple

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .baselines import BENCH_KEY, NONCE_LEN
from .common import WALCRYPT_KEK, Selector, Sizing, make_batches, payload_pool
from .harness import Case, Sample
from .sources import PatternStream, raw_read, raw_write_fsync, size_name

E = "walcrypt-encrypted"


def _open(path: str, **options):
    import walcrypt

    return walcrypt.open(path, kek=walcrypt.RawKey(WALCRYPT_KEK), **options)


def _meta(index: int, term: int = 1):
    from walcrypt import SnapshotMeta

    return SnapshotMeta(index=index, term=term)


def _entries(n: int, entry: int, batch: int):
    from walcrypt import Entry

    return [[Entry(i, t, d) for i, t, d in b] for b in make_batches(n, entry, batch)]


# ------------------------------------------------------------------- snapshots


def _snap_write_once(variant: str, size: int) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        if variant == E:
            store = _open(os.path.join(d, "wal"))
            try:
                t0 = time.perf_counter()
                store.save_snapshot(_meta(1), PatternStream(size))
                dt = time.perf_counter() - t0
                if store.snapshot().size != size:
                    raise AssertionError("walcrypt snapshot has the wrong size")
            finally:
                store.close()
        else:
            t0 = time.perf_counter()
            raw_write_fsync(os.path.join(d, "state.raw"), PatternStream(size))
            dt = time.perf_counter() - t0
        return Sample(dt, 1, size)

    return run


def _snap_read_once(variant: str, size: int) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        if variant == E:
            path = os.path.join(d, "wal")
            store = _open(path)
            store.save_snapshot(_meta(1), PatternStream(size))
            store.close()
            store = _open(path)           # opening authenticates the snapshot once (untimed)
            try:
                chunk = 1 << 20
                got = 0
                t0 = time.perf_counter()
                with store.snapshot().open() as f:
                    while True:
                        block = f.read(chunk)
                        if not block:
                            break
                        got += len(block)
                dt = time.perf_counter() - t0
            finally:
                store.close()
        else:
            path = os.path.join(d, "state.raw")
            raw_write_fsync(path, PatternStream(size))
            t0 = time.perf_counter()
            got = raw_read(path)
            dt = time.perf_counter() - t0
        if got != size:
            raise AssertionError(f"{variant} read {got} bytes of a {size}-byte snapshot")
        return Sample(dt, 1, size)

    return run


# -------------------------------------------------------------------- rotation


def _rotation_once(variant: str, state: int, n_entries: int) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        if variant != E:
            t0 = time.perf_counter()
            raw_write_fsync(os.path.join(d, "state.raw"), PatternStream(state))
            return Sample(time.perf_counter() - t0, 1, state)

        def source(store):
            return _meta(store.last_index()), PatternStream(state)

        store = _open(os.path.join(d, "wal"), snapshot_source=source)
        try:
            # Untimed: a log and a snapshot under the old DEK, and more log after the snapshot.
            batches = _entries(n_entries, 1024, 64)
            half = len(batches) // 2
            for b in batches[:half]:
                store.save(entries=b)
            store.save_snapshot(_meta(store.last_index()), PatternStream(state))
            for b in batches[half:]:
                store.save(entries=b)
            old = _active_key(store)
            t0 = time.perf_counter()
            store.rotate_dek()
            deadline = t0 + 120
            while _key_state(store, old) != "inactive":
                if time.perf_counter() > deadline:
                    raise AssertionError(f"old DEK still {_key_state(store, old)!r} 120 s after rotate_dek()")
                time.sleep(0.001)
            dt = time.perf_counter() - t0
            if _active_key(store) == old:
                raise AssertionError("rotate_dek() left the old key active")
        finally:
            store.close()
        return Sample(dt, 1, state)

    return run


def _key_state(store, key_id: str) -> Optional[str]:
    for k in store.key_info()["keys"]:
        if k["key_id"] == key_id:
            return k["state"]
    return None


def _active_key(store) -> str:
    return next(k["key_id"] for k in store.key_info()["keys"] if k["state"] == "active")


# ------------------------------------------------------------------------ open


class _OpenTemplates:
    """Two stores holding the same log, built once per run (untimed) and copied per repetition:
    ``sealed`` (closed normally, 64 MiB segments) and ``unsealed`` (a crash image: the directory
    copied while the writer still had its one segment open)."""

    def __init__(self, n: int, entry: int):
        self.n, self.entry = n, entry
        self.root: Optional[str] = None

    def get(self, workdir: str) -> str:
        if self.root is None:
            root = tempfile.mkdtemp(prefix="open-templates-", dir=workdir)
            batches = _entries(self.n, self.entry, 64)
            store = _open(os.path.join(root, "sealed"), sync="none")
            try:
                for b in batches:
                    store.save(entries=b)
            finally:
                store.close()
            one_segment = max(64 << 20, int(self.n * (self.entry + 64) * 1.25))
            store = _open(os.path.join(root, "building"), sync="none", segment_size=one_segment)
            try:
                for b in batches:
                    store.save(entries=b)
                shutil.copytree(os.path.join(root, "building"), os.path.join(root, "unsealed"))
            finally:
                store.close()
            shutil.rmtree(os.path.join(root, "building"))
            self.root = root
        return self.root


def _open_once(tpl: _OpenTemplates, segments: str) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        root = tpl.get(os.path.dirname(d))
        src = "unsealed" if segments == "unsealed" else "sealed"
        path = os.path.join(d, "wal")
        shutil.copytree(os.path.join(root, src), path)
        t0 = time.perf_counter()
        store = _open(path)
        try:
            if segments == "sealed+read-all":
                lo, hi = store.first_index(), store.last_index()
                got = 0
                for start in range(lo, hi + 1, 4096):
                    got += len(store.entries(start, min(hi + 1, start + 4096)))
                if got != tpl.n:
                    raise AssertionError(f"replay read {got} entries, wrote {tpl.n}")
            dt = time.perf_counter() - t0
            if store.last_index() != tpl.n:
                raise AssertionError(f"opened store ends at {store.last_index()}, expected {tpl.n}")
        finally:
            store.close()
        return Sample(dt, tpl.n, tpl.n * tpl.entry)

    return run


# ----------------------------------------------------------- crash-recovery open


def _wal_files(path: str) -> int:
    return sum(f.endswith(".wal") for _root, _dirs, files in os.walk(path) for f in files)


class _CrashTemplate:
    """A crash image whose newest (and only) segment is a full unsealed segment of ``segment``
    bytes, built once per run (untimed) and copied per repetition.

    How many entries fill a segment is found by saving batches of ``batch`` 1 KiB entries into a
    probe store until it cuts a second segment; the image then holds one batch fewer (the most that
    fits without a cut), saved with ``sync="none"`` and copied while the writer has it open."""

    def __init__(self, segment: int, entry: int = 1024, batch: int = 64):
        self.segment, self.entry, self.batch = segment, entry, batch
        self.root: Optional[str] = None
        self.entries = 0

    def _saves(self, store, upto: Optional[int] = None):
        from walcrypt import Entry

        pool = payload_pool(self.entry)
        n = 0
        while upto is None or n < upto:
            store.save(entries=[Entry(n + k + 1, 1, pool[(n + k) % len(pool)]) for k in range(self.batch)])
            n += self.batch
            yield n

    def _capacity(self, root: str) -> int:
        path = os.path.join(root, "probe")
        store = _open(path, sync="none", segment_size=self.segment)
        try:
            for n in self._saves(store):
                if _wal_files(path) > 1:
                    return n - self.batch
                if n * self.entry > 2 * self.segment:
                    raise AssertionError("no second segment after twice the segment size")
        finally:
            store.close()
            shutil.rmtree(path, ignore_errors=True)
        raise AssertionError("unreachable")

    def get(self, workdir: str) -> Tuple[str, int]:
        """(the crash image's directory, the entries it holds)"""
        if self.root is None:
            root = tempfile.mkdtemp(prefix="crash-template-", dir=workdir)
            n = self._capacity(root)
            building = os.path.join(root, "building")
            store = _open(building, sync="none", segment_size=self.segment)
            try:
                for _ in self._saves(store, n):
                    pass
                if _wal_files(building) != 1 or store.last_index() != n:
                    raise AssertionError(f"the crash image should hold one segment of {n} entries")
                shutil.copytree(building, os.path.join(root, "crashed"))
            finally:
                store.close()
            shutil.rmtree(building)
            self.root, self.entries = root, n
        return os.path.join(self.root, "crashed"), self.entries


def record_entries(entry: int) -> int:
    """Entries per ENTRIES record when a save of many ``entry``-byte entries is split (a record is
    closed once its data reaches walcrypt's record target)."""
    try:
        from walcrypt.format import RECORD_TARGET_BYTES as target
    except ImportError:                     # a stand-in walcrypt
        target = 32 << 10
    return max(1, math.ceil(target / entry))


def _write_sealed_file(path: str, size: int, data_bytes: int, record: int) -> List[Tuple[int, int]]:
    """A file of ``size`` bytes holding ``data_bytes`` of AES-GCM records of ``record`` plaintext
    bytes each (nonce || ciphertext || tag), zeros after; -> (offset, length) of every record."""
    aead = AESGCM(BENCH_KEY)
    plain = payload_pool(record, count=1)[0]
    aad = struct.Struct(">Q")
    parts, spans, pos, left, i = [], [], 0, data_bytes, 0
    while left > 0:
        n = min(record, left)
        nonce = os.urandom(NONCE_LEN)
        sealed = nonce + aead.encrypt(nonce, plain[:n], aad.pack(i))
        parts.append(sealed)
        spans.append((pos, len(sealed)))
        pos += len(sealed)
        left -= n
        i += 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"".join(parts))
        os.ftruncate(fd, max(size, pos))
    finally:
        os.close(fd)
    return spans


def _read_decrypt(path: str, spans: List[Tuple[int, int]]) -> int:
    """Read the whole file in 1 MiB blocks, then decrypt every record once; -> plaintext bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        buf = bytearray(size)
        mv = memoryview(buf)
        pos = 0
        while pos < size:
            got = os.preadv(fd, [mv[pos:pos + (1 << 20)]], pos)
            if got <= 0:
                raise AssertionError("short read")
            pos += got
    finally:
        os.close(fd)
    dec = AESGCM(BENCH_KEY).decrypt
    aad = struct.Struct(">Q").pack
    out = 0
    for i, (off, length) in enumerate(spans):
        out += len(dec(mv[off:off + NONCE_LEN], mv[off + NONCE_LEN:off + length], aad(i)))
    return out


def _sync_tree(root: str) -> None:
    """fsync every file below ``root`` (untimed): what is measured then reads and writes its own bytes
    only, not the write-back of a copy just made."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _crash_open_once(tpl: _CrashTemplate, variant: str) -> Callable[[str], Sample]:
    def run(d: str) -> Sample:
        src, n = tpl.get(os.path.dirname(d))
        data_bytes = n * tpl.entry
        if variant == E:
            path = os.path.join(d, "wal")
            shutil.copytree(src, path)
            _sync_tree(path)             # a crashed host's files are on disk: the open does not flush the copy
            t0 = time.perf_counter()
            store = _open(path)
            dt = time.perf_counter() - t0
            try:
                if store.last_index() != n:
                    raise AssertionError(f"recovered store ends at {store.last_index()}, expected {n}")
            finally:
                store.close()
        else:
            path = os.path.join(d, "segment.bin")
            spans = _write_sealed_file(path, tpl.segment, data_bytes, record_entries(tpl.entry) * tpl.entry)
            _sync_tree(d)
            t0 = time.perf_counter()
            got = _read_decrypt(path, spans)
            dt = time.perf_counter() - t0
            if got != data_bytes:
                raise AssertionError(f"decrypted {got} bytes, expected {data_bytes}")
        return Sample(dt, n, data_bytes)

    return run


# ----------------------------------------------------------------------- groups


def build_groups(sz: Sizing, wc_reason: Optional[str], select: Selector) -> List[List[Case]]:
    groups: List[List[Case]] = []

    def case(name, kind, variant, unit, params, factory) -> Optional[Case]:
        if not select(name, kind, variant):
            return None
        reason = "walcrypt unavailable" if wc_reason and variant.startswith("walcrypt") else None
        c = Case(name, kind, variant, unit, params=params, skip_reason=reason)
        if not reason:
            c.run_once = factory()
        return c

    size = sz.snapshot_bytes
    for op, factory in (("write", _snap_write_once), ("read", _snap_read_once)):
        group = [case(f"snapshot/op={op}/size={size_name(size)}/v={v}", "snapshot", v, "MiB/s",
                      {"op": op, "bytes": size}, lambda v=v, f=factory: f(v, size))
                 for v in (E, "raw")]
        groups.append([c for c in group if c])

    tpl = _OpenTemplates(sz.open_entries, 1024)
    group = [case(f"open/entries={size_name(sz.open_entries)}/segments={seg}/v={E}", "open", E, "s",
                  {"entries": sz.open_entries, "entry": 1024, "segments": seg},
                  lambda seg=seg: _open_once(tpl, seg))
             for seg in ("sealed", "unsealed", "sealed+read-all")]
    groups.append([c for c in group if c])

    crash = _CrashTemplate(sz.crash_segment_bytes)
    seg = size_name(sz.crash_segment_bytes)
    group = [case(f"open/segment={seg}/segments=crashed-full/v={v}", "open", v, "s",
                  {"segments": "crashed-full", "segment_bytes": sz.crash_segment_bytes, "entry": 1024},
                  lambda v=v: _crash_open_once(crash, v))
             for v in (E, "read-decrypt")]
    groups.append([c for c in group if c])

    state = sz.rotation_state_bytes
    group = [case(f"rotation/state={size_name(state)}/v={v}", "rotation", v, "s",
                  {"state_bytes": state, "entries": sz.rotation_entries},
                  lambda v=v: _rotation_once(v, state, sz.rotation_entries))
             for v in (E, "raw")]
    groups.append([c for c in group if c])
    return [g for g in groups if g]
