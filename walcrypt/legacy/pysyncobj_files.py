"""pysyncobj's own files, imported into an encrypted store the pysyncobj adapter resumes from.

What pysyncobj (0.3.x, ``pysyncobj/journal.py``, ``serializer.py``, ``syncobj.py``) writes, as this
reader understands it (formats/LEGACY.md, "pysyncobj", has the byte layout):

* The ``FileJournal`` file (``journalFile``): a 40-byte header - the application name
  ``PYSYNCOBJ`` NUL-padded to 24 bytes, pysyncobj's version string NUL-padded to 8, the format
  version (little-endian u32, 1) and the offset where the last record ends (u32) - then records,
  each a u32 length ``n``, ``n`` bytes (u64 index, u64 term, the command) and the same u32 length
  again.  The file is written through ``mmap`` and grown by doubling, so bytes past the recorded end
  are spare capacity or stale records; nothing is ever fsynced.
* ``<journalFile>.meta``: a pickle of a dict with ``currentTerm``, ``votedForNodeId`` and
  ``raftCommitIndex`` (replaced by rename, not fsynced).
* The full dump (``fullDumpFile``): gzip around a protocol-2 pickle of the tuple
  ``(state, last, prev, cluster)``: the state is the SyncObj's own fields (a dict) or, with
  consumers, ``[fields, consumer1, ...]``; ``last`` and ``prev`` are the journal entries
  ``(command, index, term)`` at and just before the last applied index; ``cluster`` is the set of
  nodes.  After a dump pysyncobj drops the journal up to ``prev``.

Trust: every byte is untrusted.  Lengths are checked against the file before anything is
allocated, pickles are walked opcode by opcode and loaded with a restricted loader that builds
nothing but plain values and pysyncobj's node classes (``_pickles``), the state machine's part of
the dump is carried into the encrypted snapshot as bytes without ever being unpickled here, and
the sources are opened read-only and never changed.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import struct
import tempfile
import time
import zlib

from ..errors import CorruptionError, UsageError, WalcryptError
from ..types import Entry, HardState, SnapshotMeta
from ..vfs import DEFAULT_VFS, open_regular
from . import _pickles

NAME = b"PYSYNCOBJ"
NAME_SIZE, VERSION_SIZE = 24, 8
HEADER_SIZE = NAME_SIZE + VERSION_SIZE + 4 + 4          # records start here
FORMAT_VERSION = 1
RECORD_MIN = 16                                         # u64 index + u64 term (an empty command)
MAX_META_BYTES = 1 << 20
MAX_DUMP_BYTES = 1 << 30                                # decompressed; import_pysyncobj(max_dump_bytes=...)
BATCH_BYTES = 16 << 20
MAX_INDEX = (1 << 64) - 2                               # walcrypt's largest entry index; terms get +1
STABLE_SOURCES = b"pysyncobj/imported-sources"          # what was imported (path, size, SHA-256)
TERM_OFFSET = 1                                          # the adapter keeps pysyncobj's term t as t + 1


def _corrupt(path, offset, detail, hint=None):
    return CorruptionError(path, offset, detail, hint or "this is not a pysyncobj file this importer can adopt; "
                           "the source was not changed and nothing was written")


class _Source:
    """A source file opened read-only (a regular file; links followed, as the operator named it),
    hashed as it is read.  ``finish()`` reads the rest, checks the file did not change meanwhile and
    returns its record (role, path, size, SHA-256)."""

    def __init__(self, path: str, role: str):
        self.path = os.path.abspath(os.fspath(path))
        self.role = role
        try:
            fd = open_regular(self.path)
        except FileNotFoundError:
            raise UsageError(f"{self.path} does not exist (the pysyncobj {role} file to import)") from None
        st = os.fstat(fd)
        self.f = os.fdopen(fd, "rb", buffering=1 << 20)
        self.size, self._stamp = st.st_size, (st.st_size, st.st_mtime_ns, st.st_ino)
        self.pos = 0
        self.h = hashlib.sha256()

    def read(self, n: int) -> bytes:
        n = max(0, min(n, self.size - self.pos))     # never more than the file holds: no oversized buffer
        out = self.f.read(n)
        self.pos += len(out)
        self.h.update(out)
        return out

    def finish(self) -> dict:
        while self.read(1 << 20):
            pass
        st = os.stat(self.path)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != self._stamp or self.pos != self.size:
            raise UsageError(f"{self.path} changed while it was imported: stop the pysyncobj node that writes it, "
                             "then import again")
        return {"role": self.role, "path": self.path, "size": self.size, "sha256": self.h.hexdigest()}

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------------------
# The journal
# ---------------------------------------------------------------------------------------------

def _check_header(path: str, head: bytes, size: int) -> tuple[str, int]:
    """(pysyncobj version, recorded end) of a journal header; CorruptionError if it is not one."""
    if len(head) < HEADER_SIZE:
        raise _corrupt(path, 0, f"{size} bytes is too short for a pysyncobj journal header ({HEADER_SIZE} bytes)")
    if head[:NAME_SIZE] != NAME + bytes(NAME_SIZE - len(NAME)):
        raise _corrupt(path, 0, "not a pysyncobj journal (no PYSYNCOBJ header)")
    version = head[NAME_SIZE:NAME_SIZE + VERSION_SIZE].rstrip(b"\0")
    if not version or not all(0x20 < c < 0x7f for c in version):
        raise _corrupt(path, NAME_SIZE, "the journal header's version field is not a version string")
    fmt_version, end = struct.unpack_from("<II", head, NAME_SIZE + VERSION_SIZE)
    if fmt_version != FORMAT_VERSION:
        raise _corrupt(path, NAME_SIZE + VERSION_SIZE, f"journal format version {fmt_version} (this importer "
                       f"reads version {FORMAT_VERSION})")
    if end < HEADER_SIZE:
        raise _corrupt(path, LAST_OFFSET_AT, f"the recorded end of the journal ({end}) lies inside its header")
    return version.decode(), end


LAST_OFFSET_AT = NAME_SIZE + VERSION_SIZE + 4


def read_journal(src: _Source, report: dict):
    """Yield the journal's entries (index, term, command) up to its last complete record.

    A torn tail - the file ends before the recorded end, a zero length field (a region the lost
    write left zero-filled), or a record whose closing length does not match its opening one (not
    completely written) - ends the import there and is recorded in ``report["cut"]``.  A record
    that cannot be a lost write (a length too small for a record, one running past the recorded end
    of a file that is long enough, an index that does not follow, a falling term) is corruption."""
    path = src.path
    version, end = _check_header(path, src.read(HEADER_SIZE), src.size)
    report.update(pysyncobj_version=version, recorded_end=end, file_size=src.size)
    limit = min(end, src.size)
    off, prev_index, prev_term, count = HEADER_SIZE, None, None, 0

    def cut(reason: str) -> None:
        report["cut"] = {"offset": off, "bytes": end - off, "reason": reason}

    while off < end:
        if off + 4 > limit:
            if end > src.size:
                cut(f"the file ends {src.size - off} bytes into a record (it is shorter than its recorded end {end})")
                break
            raise _corrupt(path, off, f"a record's length field runs past the recorded end of the journal ({end})")
        (n,) = struct.unpack("<I", src.read(4))
        if n == 0:
            cut("a zero-filled region where the next record should be (a write that never reached the disk)")
            break
        if n < RECORD_MIN:
            raise _corrupt(path, off, f"record length {n} is shorter than a record's index and term ({RECORD_MIN})")
        rec_end = off + 4 + n + 4
        if rec_end > end or rec_end > src.size:
            if end > src.size and rec_end > src.size:
                cut(f"the file ends inside a {n}-byte record (it is shorter than its recorded end {end})")
                break
            raise _corrupt(path, off, f"record length {n} runs past the recorded end of the journal ({end})")
        body = src.read(n)
        (closing,) = struct.unpack("<I", src.read(4))
        if closing != n:
            cut(f"the record's closing length ({closing}) differs from its opening length ({n}): "
                "not completely written")
            break
        index, term = struct.unpack_from("<QQ", body)
        if prev_index is None:
            if not 1 <= index <= MAX_INDEX:
                raise _corrupt(path, off, f"the first record has index {index}")
        elif index != prev_index + 1:
            raise _corrupt(path, off, f"record index {index} does not follow {prev_index}")
        if term >= (1 << 64) - TERM_OFFSET or (prev_term is not None and term < prev_term):
            raise _corrupt(path, off, f"record {index} has term {term} after term {prev_term}")
        if prev_index is None:
            report["first_index"] = index
        yield index, term, body[16:]
        prev_index, prev_term, count = index, term, count + 1
        report.update(last_index=index, last_term=term, entries=count)
        off = rec_end


def read_meta(path: str, report: dict) -> dict:
    """Term, vote and commit index from ``<journal>.meta`` (pysyncobj's defaults when it is missing
    or empty, as pysyncobj itself reads it; anything unreadable is corruption: a silently lost vote
    could let this node vote twice in one term)."""
    values = {"currentTerm": 0, "votedForNodeId": None, "raftCommitIndex": 1}
    if not os.path.lexists(path):
        report["meta"] = "missing: pysyncobj's defaults (term 0, no vote, commit index 1)"
        return values
    src = _Source(path, "meta")
    try:
        if src.size > MAX_META_BYTES:
            raise _corrupt(path, 0, f"{src.size} bytes is too large for pysyncobj's journal meta file")
        data = src.read(src.size)
        report["sources"].append(src.finish())
    finally:
        src.close()
    if not data:
        report["meta"] = "empty (its last write never reached the disk): pysyncobj's defaults"
        return values
    try:
        _pickles.check(data)
        loaded, _ = _pickles.safe_load(data, strict=True)
    except _pickles.PickleRefused as exc:
        raise _corrupt(path, exc.offset, f"the journal meta file is not a plain pickled dict: {exc.detail}") from None
    if not isinstance(loaded, dict):
        raise _corrupt(path, None, f"the journal meta file holds a {type(loaded).__name__}, not a dict")
    values.update({k: v for k, v in loaded.items() if k in values})
    term, vote, commit = values["currentTerm"], values["votedForNodeId"], values["raftCommitIndex"]
    if type(term) is not int or not 0 <= term < (1 << 63) or type(commit) is not int or not 0 <= commit <= MAX_INDEX:
        raise _corrupt(path, None, f"the journal meta file holds term {term!r} and commit index {commit!r}")
    if vote is not None and not isinstance(vote, (str, int)):
        raise _corrupt(path, None, f"the journal meta file's vote is a {type(vote).__name__}")
    if isinstance(vote, int) and not -(1 << 63) <= vote < (1 << 64) or isinstance(vote, str) and len(vote) > 4096:
        raise _corrupt(path, None, "the journal meta file's vote is not a node ID (an integer beyond 64 bits, or "
                                   "text of more than 4096 characters)")
    report["meta"] = "read"
    return values


# ---------------------------------------------------------------------------------------------
# The full dump
# ---------------------------------------------------------------------------------------------

def read_dump(path: str, max_bytes: int, report: dict) -> dict:
    """The dump's last and previous entries, cluster and state (the state as pickle bytes only)."""
    src = _Source(path, "dump")
    try:
        if src.size > max_bytes:
            raise UsageError(f"{path} is {src.size} bytes, more than max_dump_bytes={max_bytes}; raise it if this "
                             "is really the node's dump")
        packed = src.read(src.size)
        report["sources"].append(src.finish())
    finally:
        src.close()
    data = _gunzip(path, packed, max_bytes)
    try:
        protocol, parts = _pickles.top_tuple(data)
        if len(parts) != 4:
            raise _pickles.PickleRefused(None, f"the dump is a tuple of {len(parts)} items, not pysyncobj's 4")
        value, stubbed = _pickles.safe_load(data, strict=False, nodes=True)
    except _pickles.PickleRefused as exc:
        raise _corrupt(path, exc.offset, f"not a pysyncobj full dump: {exc.detail} (offsets count in the "
                       "decompressed pickle)") from None
    state, last, prev, cluster = value
    for name, e in (("last", last), ("previous", prev)):
        if not (type(e) is tuple and len(e) == 3 and type(e[0]) is bytes and type(e[1]) is int
                and type(e[2]) is int and 1 <= e[1] <= MAX_INDEX and 0 <= e[2] < (1 << 64) - TERM_OFFSET):
            raise _corrupt(path, None, f"the dump's {name} entry is not (command, index, term)")
    if prev[1] + 1 != last[1] or prev[2] > last[2]:
        raise _corrupt(path, None, f"the dump's entries {prev[1]} and {last[1]} do not follow each other")
    nodes = _pickles.node_classes()
    budget = [PLAIN_BUDGET]
    if not nodes or not isinstance(cluster, (set, frozenset)) or not all(
            isinstance(n, tuple(nodes.values())) and _plain(vars(n), budget) for n in cluster):
        raise _corrupt(path, None, "the dump's cluster is not a set of pysyncobj nodes with plain attributes")
    if isinstance(state, dict):                 # no consumers: the adapter keeps [fields]
        a, b = parts[0]
        state_pickle = b"\x80\x02(" + data[a:b] + b"l."
        consumers = 0
    elif isinstance(state, list) and state and isinstance(state[0], dict):
        a, b = parts[0]
        state_pickle = b"\x80\x02" + data[a:b] + b"."
        consumers = len(state) - 1
    else:
        raise _corrupt(path, None, "the dump holds no SyncObj state (written with a custom serializer?)")
    report.update(dump_index=last[1], dump_term=last[2], dump_consumers=consumers, dump_bytes=len(data),
                  dump_cluster=sorted(_node_label(n) for n in cluster), dump_opaque_classes=stubbed)
    return {"last": last, "prev": prev, "cluster": cluster, "state_pickle": state_pickle}


PLAIN_BUDGET = 100_000        # containers and values looked at, for all of a dump's nodes together


def _plain(value, budget: list[int], depth: int = 0, seen: set | None = None) -> bool:
    """Whether ``value`` is built of plain values only (what the snapshot head may carry).  Each
    container is looked at once however often it is referenced (a pickle's memo lets a few bytes
    reference one list thousands of times), and ``budget[0]`` bounds the work for all calls."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if value is None or type(value) in (bool, int, float, str, bytes):
        return True
    if depth > 8:
        return False
    seen = set() if seen is None else seen
    if id(value) in seen:
        return True
    if type(value) in (tuple, list, set, frozenset):
        seen.add(id(value))
        return all(_plain(v, budget, depth + 1, seen) for v in value)
    if type(value) is dict:
        seen.add(id(value))
        return all(_plain(k, budget, depth + 1, seen) and _plain(v, budget, depth + 1, seen)
                   for k, v in value.items())
    return False


def _node_label(node) -> str:
    """A cluster node for the report: pysyncobj's node ID when it is text, its repr otherwise
    (pysyncobj accepts any hashable ID, and str() of a node with an integer ID raises)."""
    ident = node if isinstance(node, str) else getattr(node, "id", None)
    return ident if isinstance(ident, str) else repr(ident)[:200]


def _gunzip(path: str, packed: bytes, max_bytes: int) -> bytes:
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(packed), mode="rb") as g:
            while True:
                chunk = g.read(1 << 20)
                if not chunk:
                    break
                out += chunk
                if len(out) > max_bytes:
                    raise UsageError(f"{path} decompresses to more than max_dump_bytes={max_bytes}")
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(path, None, f"not a complete gzip file ({exc}): a pysyncobj dump is gzip-compressed") from None
    return bytes(out)


def dump_blob(dump: dict) -> bytes:
    """The snapshot the adapter writes (adapters.pysyncobj.encode_dump): its magic, the pickled
    (last, prev, cluster) head, then the state's pickle - here the dump's own bytes, unchanged."""
    import pickle

    from ..adapters.pysyncobj import DUMP_MAGIC
    head = pickle.dumps((tuple(dump["last"]), tuple(dump["prev"]), dump["cluster"]), protocol=4)
    return DUMP_MAGIC + struct.pack("<I", len(head)) + head + dump["state_pickle"]


# ---------------------------------------------------------------------------------------------
# The import
# ---------------------------------------------------------------------------------------------

def import_pysyncobj(data_dir, *, journal, dump=None, kek=None, max_dump_bytes: int = MAX_DUMP_BYTES,
                     **open_options) -> dict:
    """Import a pysyncobj node's ``FileJournal`` file (with its ``.meta``) and full-dump file into a
    new walcrypt store at ``data_dir`` (missing or empty), laid out as the pysyncobj adapter
    (:func:`walcrypt.adapters.pysyncobj.walcrypt_conf`) writes its own: the entries with their
    commands, term and vote, the commit index, and the dump as the snapshot.  Returns a report.

    The store is built in a private directory beside ``data_dir`` and renamed into place at the end;
    on any error nothing is left behind.  The sources are only read; their paths, sizes and SHA-256
    are recorded in the store so that ``walcrypt migrate DATA --to encrypted --remove-source`` can
    delete them later, and only while they are still byte-identical to what was imported."""
    try:
        from ..adapters import pysyncobj as adapter
    except ImportError as exc:
        raise UsageError(f"importing pysyncobj files needs pysyncobj: {exc}") from None
    from .. import opening
    data_dir = os.path.abspath(os.fspath(data_dir))
    if os.path.lexists(data_dir) and (not os.path.isdir(data_dir) or os.path.islink(data_dir) or os.listdir(data_dir)):
        raise UsageError(f"{data_dir} exists and is not an empty directory; import only into a new or empty one")
    parent = os.path.dirname(data_dir)
    if not os.path.isdir(parent):
        raise UsageError(f"{parent} does not exist; create it first")
    report: dict = {"data_dir": data_dir, "journal": os.path.abspath(os.fspath(journal)),
                    "dump": os.path.abspath(os.fspath(dump)) if dump is not None else None,
                    "entries": 0, "first_index": None, "last_index": None, "term": None, "vote": None,
                    "commit": None, "snapshot_index": None, "cut": None, "sources": []}
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(data_dir) + ".import-", dir=parent)
    try:
        meta = read_meta(report["journal"] + ".meta", report)
        snap = read_dump(report["dump"], max_dump_bytes, report) if dump is not None else None
        src = _Source(report["journal"], "journal")
        try:
            with opening.open(staging, kek=kek, **open_options) as st:
                st.stable_set(adapter._STABLE_TERM_OFFSET, str(TERM_OFFSET).encode())
                _write_log(st, read_journal(src, report), snap, report)
                report["sources"].insert(0, src.finish())
                _finish(st, adapter, meta, snap, report)
        finally:
            src.close()
        try:
            os.rename(staging, data_dir)          # onto a missing or empty directory only
        except OSError:
            if os.path.lexists(data_dir):
                raise UsageError(f"{data_dir} was created and filled while the import ran; nothing there was "
                                 "changed and the imported store was discarded") from None
            raise
        DEFAULT_VFS.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write_log(st, entries, snap, report) -> None:
    batch: list[Entry] = []
    size = 0
    first = True
    for index, term, command in entries:
        if first:
            first = False
            if index > 1:
                if snap is None:
                    raise UsageError(f"{report['journal']} starts at index {index} (pysyncobj compacted it after a "
                                     "dump): give its full-dump file too (--dump / dump=)")
                if snap["last"][1] < index - 1:
                    raise UsageError(f"the dump (index {snap['last'][1]}) is older than the journal's first entry "
                                     f"({index}): it is not the dump this journal was compacted with")
                # The log continues after index - 1; its term is not in the journal: the first entry's is
                # used (terms never fall, and nothing in pysyncobj asks for the term of a compacted entry).
                st.reset_log(index - 1, term + TERM_OFFSET)
        batch.append(Entry(index, term + TERM_OFFSET, command))
        size += len(command)
        if size >= BATCH_BYTES or len(batch) >= 4096:
            st.save(entries=batch)
            batch, size = [], 0
    if batch:
        st.save(entries=batch)


def _finish(st, adapter, meta: dict, snap, report: dict) -> None:
    if snap is not None:
        last = snap["last"]
        st.save_snapshot(SnapshotMeta(last[1], last[2] + TERM_OFFSET), dump_blob(snap))
        report["snapshot_index"] = last[1]
    top = max(st.last_index(), snap["last"][1] if snap is not None else 0)
    commit = meta["raftCommitIndex"]
    if commit > max(top, 1):
        report["commit_clamped_from"] = commit      # pysyncobj clamps it too when it loads a dump
        commit = top
    term, vote = meta["currentTerm"], meta["votedForNodeId"]
    st.stable_set(adapter._STABLE_TERM_VOTE, json.dumps({"term": term, "vote": vote}).encode())
    record = {"version": 1, "imported_at": int(time.time()), "sources": report["sources"]}
    st.stable_set(STABLE_SOURCES, json.dumps(record).encode())
    st.save(hard_state=HardState(term, 0, max(commit, 1)))
    report.update(term=term, vote=vote, commit=max(commit, 1), store_first_index=st.first_index(),
                  store_last_index=st.last_index())


# ---------------------------------------------------------------------------------------------
# Removing the sources afterwards
# ---------------------------------------------------------------------------------------------

def has_recorded_sources(data_dir: str) -> bool:
    """Whether the store records imported pysyncobj files (read without a key: the stable store's
    keys are not secret, its values are)."""
    from .. import layout
    from .. import meta as M
    meta_dir = os.path.join(data_dir, layout.META_DIR)
    if not os.path.isdir(meta_dir):
        return False
    m = M.Meta(meta_dir, readonly=True)
    try:
        with m.read() as r:
            return r.raw(M.DB_STABLE, STABLE_SOURCES) is not None   # presence only; read with the key
    finally:
        m.close()


def remove_sources(data_dir: str, kek, *, apply: bool = True) -> dict:
    """Delete the pysyncobj files the store at ``data_dir`` was imported from, each only while it is
    still a regular file byte-identical (size and SHA-256) to what was imported.
    -> {"removed": [path, ...], "kept": [{"path", "reason"}, ...]}"""
    from .. import opening
    with opening.open(data_dir, kek=kek, read_only=True) as st:
        raw = st.stable_get(STABLE_SOURCES)
    out: dict = {"removed": [], "kept": []}
    if raw is None:
        return out
    for s in json.loads(raw)["sources"]:
        path, reason = s["path"], None
        try:
            lst = os.lstat(path)
        except FileNotFoundError:
            out["kept"].append({"path": path, "reason": "already gone"})
            continue
        if not stat.S_ISREG(lst.st_mode):
            reason = "is no longer a regular file (a link or something else now)"
        elif lst.st_size != s["size"] or _sha256(path) != s["sha256"]:
            reason = "changed since it was imported (not byte-identical): left alone"
        if reason is not None:
            out["kept"].append({"path": path, "reason": reason})
            continue
        if apply:
            os.unlink(path)
        out["removed"].append(path)
    return out


def _sha256(path: str) -> str:
    fd = open_regular(path)
    h = hashlib.sha256()
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    finally:
        os.close(fd)


def removal_command(data_dir: str) -> str:
    return f"walcrypt migrate {shlex.quote(data_dir)} --to encrypted --remove-source --key-file KEK"


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

MAX_SCAN = 1000          # directory entries looked at by detect()


def sniff(path: str) -> str | None:
    """"journal", "dump" or None, from at most a few hundred bytes of ``path`` (a regular file)."""
    try:
        fd = open_regular(path)
    except (OSError, ValueError, WalcryptError):  # unreadable, special, ...: not ours to report
        return None
    try:
        head = os.read(fd, 512)
    finally:
        os.close(fd)
    if head[:NAME_SIZE] == NAME + bytes(NAME_SIZE - len(NAME)) and len(head) >= HEADER_SIZE:
        return "journal"
    if head[:2] == b"\x1f\x8b":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            start = d.decompress(head, 16)
        except zlib.error:
            return None
        if start[:3] == b"\x80\x02(":             # protocol 2, MARK: pysyncobj's (state, last, prev, cluster)
            return "dump"
    return None


def detect(path: str) -> list[dict]:
    """pysyncobj journal and dump files at ``path`` (a file, or a directory's own entries)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        names = []
        with os.scandir(path) as it:
            for k, e in enumerate(it):
                if k >= MAX_SCAN:
                    break
                if e.is_file(follow_symlinks=False) and not e.name.endswith((".meta", ".tmp")):
                    names.append(e.path)
        files = sorted(names)
    elif os.path.isfile(path):
        files = [path]
    else:
        return []
    kinds = {f: sniff(f) for f in files}
    journals = [f for f, k in kinds.items() if k == "journal"]
    dumps = [f for f, k in kinds.items() if k == "dump"]
    findings = []
    pair = dumps[0] if len(dumps) == 1 else None
    for j in journals:
        paths = [j] + ([j + ".meta"] if os.path.isfile(j + ".meta") else []) + ([pair] if pair else [])
        cmd = f"walcrypt import pysyncobj NEW_DATA_DIR --journal {shlex.quote(j)}"
        cmd += f" --dump {shlex.quote(pair)}" if pair else (" --dump DUMP_FILE" if dumps else "")
        findings.append({"kind": "pysyncobj", "paths": paths, "command": cmd + " --key-file KEK",
                         "detail": "pysyncobj FileJournal" + (" with its .meta file" if len(paths) > 1 and
                                                               paths[1].endswith(".meta") else "")
                         + (" and full-dump file" if pair else "")})
    for d in dumps:
        if d == pair and journals:
            continue
        findings.append({"kind": "pysyncobj", "paths": [d], "detail": "pysyncobj full-dump file",
                         "command": f"walcrypt import pysyncobj NEW_DATA_DIR --journal JOURNAL_FILE --dump "
                                    f"{shlex.quote(d)} --key-file KEK"})
    return findings


def sibling_files(data_dir: str) -> tuple[str | None, str | None]:
    """The adapter's rule for files beside a data directory D: ``D.journal`` (with ``D.journal.meta``)
    and ``D.dump``, each only when its content is pysyncobj's."""
    j, d = data_dir + ".journal", data_dir + ".dump"
    return (j if os.path.isfile(j) and sniff(j) == "journal" else None,
            d if os.path.isfile(d) and sniff(d) == "dump" else None)
