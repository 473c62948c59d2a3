"""Reading pysyncobj's full-dump file as untrusted input, and carrying it into a walcrypt snapshot.

The dump is gzip around a protocol-2 pickle of ``(state, last, prev, cluster)``.  Its pickle is
walked opcode by opcode and loaded with a restricted loader (:mod:`._pickles`); the state
machine's part is carried into the encrypted snapshot as bytes, never unpickled here.
"""

from __future__ import annotations

import gzip
import io
import zlib
from typing import Any

from ..adapters.pysyncobj_format import TERM_OFFSET, encode_dump_pickled
from ..errors import UsageError
from . import _pickles
from .pysyncobj_read import MAX_INDEX, Source, corrupt

MAX_DUMP_BYTES = 1 << 30                                # decompressed; import_pysyncobj(max_dump_bytes=...)


def read_dump(path: str, max_bytes: int, report: dict) -> dict:
    """The dump's last and previous entries, cluster and state (the state as pickle bytes only)."""
    src = Source(path, "dump")
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
        raise corrupt(path, exc.offset, f"not a pysyncobj full dump: {exc.detail} (offsets count in the "
                       "decompressed pickle)") from None
    state, last, prev, cluster = value
    for name, e in (("last", last), ("previous", prev)):
        if not (type(e) is tuple and len(e) == 3 and type(e[0]) is bytes and type(e[1]) is int
                and type(e[2]) is int and 1 <= e[1] <= MAX_INDEX and 0 <= e[2] < (1 << 64) - TERM_OFFSET):
            raise corrupt(path, None, f"the dump's {name} entry is not (command, index, term)")
    if prev[1] + 1 != last[1] or prev[2] > last[2]:
        raise corrupt(path, None, f"the dump's entries {prev[1]} and {last[1]} do not follow each other")
    nodes = _pickles.node_classes()
    budget = [PLAIN_BUDGET]
    if not nodes or not isinstance(cluster, (set, frozenset)) or not all(
            isinstance(n, tuple(nodes.values())) and _plain(vars(n), budget) for n in cluster):
        raise corrupt(path, None, "the dump's cluster is not a set of pysyncobj nodes with plain attributes")
    if isinstance(state, dict):                 # no consumers: the adapter keeps [fields]
        a, b = parts[0]
        state_pickle = b"\x80\x02(" + data[a:b] + b"l."
        consumers = 0
    elif isinstance(state, list) and state and isinstance(state[0], dict):
        a, b = parts[0]
        state_pickle = b"\x80\x02" + data[a:b] + b"."
        consumers = len(state) - 1
    else:
        raise corrupt(path, None, "the dump holds no SyncObj state (written with a custom serializer?)")
    report.update(dump_index=last[1], dump_term=last[2], dump_consumers=consumers, dump_bytes=len(data),
                  dump_cluster=sorted(_node_label(n) for n in cluster), dump_opaque_classes=stubbed)
    return {"last": last, "prev": prev, "cluster": cluster, "state_pickle": state_pickle}


PLAIN_BUDGET = 100_000        # containers and values looked at, for all of a dump's nodes together


def _plain(value: Any, budget: list[int], depth: int = 0, seen: set[int] | None = None) -> bool:
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


def _node_label(node: Any) -> str:
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
        raise corrupt(path, None, f"not a complete gzip file ({exc}): a pysyncobj dump is gzip-compressed") from None
    return bytes(out)


def dump_blob(dump: dict) -> bytes:
    """The snapshot the adapter writes (adapters.pysyncobj_format.encode_dump): its magic, the
    pickled (last, prev, cluster) head, then the state's pickle - here the dump's own bytes, unchanged."""
    return encode_dump_pickled(dump["last"], dump["prev"], dump["cluster"], dump["state_pickle"])
