"""Reading pysyncobj's pickles without running them.

pysyncobj keeps its term, vote and commit index (the journal's ``.meta`` file) and its full dump
as pickles.  Unpickling runs code named by the file (``REDUCE`` calls any importable callable),
so an importer must not simply ``pickle.loads`` files it is handed.  This module does two
things, both on bytes already held in memory (the callers bound the size first):

* :func:`top_tuple` walks the opcode stream with :mod:`pickletools` (which decodes opcodes and
  their arguments and executes nothing), checks the stack effects and the memo indices, and
  returns where each element of the outermost tuple starts and ends.  Memo indices are checked
  because the C unpickler grows its memo table to the largest index it is given (a
  ``LONG_BINPUT 0xffffffff`` would make it allocate tens of gigabytes).
* :func:`safe_load` unpickles with a ``find_class`` that hands out only a few harmless callables
  (``set``, ``frozenset``, ``bytes()`` with no arguments, ``_codecs.encode`` for latin-1 text:
  how protocol 2 writes ``bytes``) and pysyncobj's node classes (created without running their
  ``__init__``).  Anything else is refused (``strict``) or replaced by an inert stand-in object
  that ignores whatever is done to it, so the parts of a dump the importer only carries along
  (the state machine's own objects) are never constructed.
"""

from __future__ import annotations

import io
import pickle
import pickletools

_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}


class PickleRefused(ValueError):
    def __init__(self, offset: int | None, detail: str):
        super().__init__(detail)
        self.offset = offset
        self.detail = detail


MAX_TOP_ITEMS = 64        # items on the stack outside the outermost mark and inside it (pysyncobj: 4)


def top_tuple(data: bytes, max_protocol: int = 3) -> tuple[int, list[tuple[int, int]]]:
    """(protocol, [(start, end), ...]) for a pickle whose value is one tuple built with MARK ... TUPLE
    (how protocols 0-3 write a tuple of more than three items).  Each slice holds the opcodes of one
    element; an element's memo references point only into itself or earlier elements.

    Memory stays proportionate to the nesting, not to the number of items: only the stack levels
    that can make up the outermost tuple (outside any mark, and directly inside the first mark)
    keep each item's first offset - at most MAX_TOP_ITEMS of them; a deeper mark keeps its offset
    and a count (an item's offset there never matters: what the deeper items build starts at their
    mark or earlier)."""
    # frames[0]: the stack outside any mark; frames[k]: the items pushed since the k-th open mark.
    # A frame is [mark offset, starts] with starts a list (levels 0 and 1) or an int count (deeper).
    frames: list[list] = [[0, []]]
    puts = 0
    protocol = 0
    result = None

    def push(first: int) -> None:
        items = frames[-1][1]
        if isinstance(items, int):
            frames[-1][1] = items + 1
            return
        if len(items) >= MAX_TOP_ITEMS:
            raise PickleRefused(None, f"more than {MAX_TOP_ITEMS} items at the top of the pickle")
        items.append(first)

    def pop(n: int, name: str, pos: int) -> int | None:
        """Pop n items of the innermost frame; the smallest first offset among them (None: unknown,
        a deep frame, where it never matters)."""
        items = frames[-1][1]
        have = items if isinstance(items, int) else len(items)
        if have < n:
            raise PickleRefused(pos, f"{name} on a stack too short")
        if isinstance(items, int):
            frames[-1][1] = items - n
            return None
        popped = items[len(items) - n:] if n else []
        del items[len(items) - n:]
        return min(popped) if popped else None

    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            assert pos is not None      # genops gives every opcode's offset when the stream has tell() (BytesIO)
            name = op.name
            if name == "PROTO":
                if pos != 0 or not isinstance(arg, int) or not 2 <= arg <= max_protocol:
                    raise PickleRefused(pos, f"pickle protocol {arg} (expected 2..{max_protocol} at the start)")
                protocol = arg
                continue
            if name in ("FRAME", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"):
                raise PickleRefused(pos, f"opcode {name} is not used by pysyncobj's pickles")
            if name in _PUTS:
                idx = puts if name == "MEMOIZE" else arg
                if not isinstance(idx, int) or not 0 <= idx <= puts:
                    raise PickleRefused(pos, f"memo index {idx} out of order (next is {puts})")
                if idx == puts:
                    puts += 1
                items = frames[-1][1]
                if (items if isinstance(items, int) else len(items)) == 0:
                    raise PickleRefused(pos, "memo store with nothing on the stack")
                continue
            if name in _GETS and (not isinstance(arg, int) or not 0 <= arg < puts):
                raise PickleRefused(pos, f"memo index {arg} was never stored")
            if name == "STOP":
                if len(frames) != 1 or len(frames[0][1]) != 1 or result is None:
                    raise PickleRefused(pos, "the pickle's value is not one MARK ... TUPLE")
                return protocol, result
            result = None               # set again only by the outermost TUPLE, if it is the last opcode
            before = op.stack_before
            items = frames[-1][1]
            if name == "POP" and len(frames) > 1 and (items if isinstance(items, int) else len(items)) == 0:
                frames.pop()            # POP on an empty frame discards its mark (as the unpickler does)
                continue
            firsts = [pos]
            if pickletools.markobject in before:
                below = before.index(pickletools.markobject)
                if len(frames) == 1:
                    raise PickleRefused(pos, f"{name} without a mark")
                mark_pos, items = frames.pop()
                if name == "TUPLE" and len(frames) == 1 and not frames[0][1]:
                    result = list(zip(items, items[1:] + [pos]))
                firsts.append(mark_pos)
                got = pop(below, name, pos)
            else:
                got = pop(len(before), name, pos)
            if got is not None:
                firsts.append(got)
            first = min(firsts)
            for item in op.stack_after:
                if item is pickletools.markobject:
                    frames.append([pos, [] if len(frames) < 2 else 0])
                else:
                    push(first)
    except PickleRefused:
        raise
    except Exception as exc:          # genops' own decoding errors: truncation, bad arguments, ...
        raise PickleRefused(None, f"not a readable pickle ({exc})") from None
    raise PickleRefused(len(data), "the pickle has no STOP opcode (truncated)")


class _Inert:
    """Stands in for any object the importer does not need to construct; ignores what is done to it."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass

    def add(self, item):
        pass


def _latin1(text, encoding="latin1"):
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 text (protocol 2 bytes)")
    return text.encode("latin-1")


def _empty_bytes(*args):
    if args:
        raise pickle.UnpicklingError("bytes() is allowed only without arguments")
    return b""


def node_classes() -> dict:
    try:
        from pysyncobj import node  # optional dependency (the pysyncobj extra): no node classes without it
    except ImportError:
        return {}
    return {("pysyncobj.node", n): getattr(node, n) for n in ("Node", "TCPNode") if hasattr(node, n)}


_ALLOWED = {
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("builtins", "bytes"): _empty_bytes, ("__builtin__", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _latin1,
}


class _Restricted(pickle.Unpickler):
    def __init__(self, f, strict: bool, nodes: bool):
        super().__init__(f)
        self.strict = strict
        self.allowed = dict(_ALLOWED)
        if nodes:
            self.allowed.update(node_classes())
        self.stubbed: set[str] = set()

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        if self.strict:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        self.stubbed.add(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent IDs are not allowed")


def safe_load(data: bytes, *, strict: bool, nodes: bool = False):
    """(value, names of the classes and callables replaced by inert stand-ins).  Call only on bytes
    :func:`top_tuple` (or :func:`check`) accepted: that bounds the memo."""
    u = _Restricted(io.BytesIO(data), strict, nodes)
    try:
        value = u.load()
    except Exception as exc:
        raise PickleRefused(None, f"the pickle does not load safely ({type(exc).__name__}: {exc})") from None
    return value, sorted(u.stubbed)


def check(data: bytes, max_protocol: int = 3) -> None:
    """Validate a small pickle's opcodes and memo indices (any value shape)."""
    puts = 0
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            if op.name == "PROTO" and (not isinstance(arg, int) or not 0 <= arg <= max_protocol):
                raise PickleRefused(pos, f"pickle protocol {arg}")
            if op.name in ("FRAME", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"):
                raise PickleRefused(pos, f"opcode {op.name} is not used by pysyncobj's pickles")
            if op.name in _PUTS:
                idx = puts if op.name == "MEMOIZE" else arg
                if not isinstance(idx, int) or not 0 <= idx <= puts:
                    raise PickleRefused(pos, f"memo index {idx} out of order")
                puts += idx == puts
            elif op.name in _GETS and (not isinstance(arg, int) or not 0 <= arg < puts):
                raise PickleRefused(pos, f"memo index {arg} was never stored")
            elif op.name == "STOP":
                return
    except PickleRefused:
        raise
    except Exception as exc:
        raise PickleRefused(None, f"not a readable pickle ({exc})") from None
    raise PickleRefused(len(data), "the pickle has no STOP opcode (truncated)")
