"""The etcd v3.4 protobuf messages walcrypt needs, built at run time with the protobuf library.

The schemas are the ``.proto`` files beside this module (``walpb.proto``, ``raftpb.proto``,
``snappb.proto``, ``etcdserverpb.proto``), written for walcrypt with the field numbers, types and
proto2 labels of etcd v3.4.23's own schema files (``wal/walpb/record.proto``,
``raft/raftpb/raft.proto``, ``etcdserver/api/snap/snappb/snap.proto``,
``etcdserver/etcdserverpb/etcdserver.proto``).  Nothing is generated: no protoc step, no
``_pb2`` modules (whose runtime-version checks would tie walcrypt to one protobuf release).
``_SCHEMA`` below states the same messages as data; the descriptors are built from it with
``descriptor_pb2`` into a private ``DescriptorPool`` (so that an etcd client library registering
the same package names in the default pool cannot clash with walcrypt), and the message classes
come from ``message_factory``.  tests/test_legacy_etcd.py checks ``_SCHEMA`` against the
``.proto`` files field for field.

gogoproto (which etcd compiles with) always marshals a field marked non-nullable, even when it is
zero; Python's proto2 runtime marshals a field whose presence bit is set.  :func:`marshal` sets
every such field (``ALWAYS``) explicitly, so what walcrypt writes has the bytes etcd itself would
write for the same values, fields in number order.
"""

from __future__ import annotations

from ...errors import UsageError

_U64, _I64, _U32, _BOOL, _BYTES, _ENUM, _MSG = "uint64", "int64", "uint32", "bool", "bytes", "enum", "message"

# package -> (dependencies, enums {name: [(value name, number)]}, messages {name: [(field, number, type,
# type name or None, repeated)]}).  Mirrors the .proto files beside this module.
_Field = tuple[str, int, str, str | None, bool]
_Package = tuple[tuple[str, ...], dict[str, list[tuple[str, int]]], dict[str, list[_Field]]]
_SCHEMA: dict[str, _Package] = {
    "raftpb": ((), {"EntryType": [("EntryNormal", 0), ("EntryConfChange", 1), ("EntryConfChangeV2", 2)]}, {
        "Entry": [("Type", 1, _ENUM, ".raftpb.EntryType", False), ("Term", 2, _U64, None, False),
                  ("Index", 3, _U64, None, False), ("Data", 4, _BYTES, None, False)],
        "HardState": [("term", 1, _U64, None, False), ("vote", 2, _U64, None, False),
                      ("commit", 3, _U64, None, False)],
        "ConfState": [("voters", 1, _U64, None, True), ("learners", 2, _U64, None, True),
                      ("voters_outgoing", 3, _U64, None, True), ("learners_next", 4, _U64, None, True),
                      ("auto_leave", 5, _BOOL, None, False)],
        "SnapshotMetadata": [("conf_state", 1, _MSG, ".raftpb.ConfState", False), ("index", 2, _U64, None, False),
                             ("term", 3, _U64, None, False)],
        "Snapshot": [("data", 1, _BYTES, None, False), ("metadata", 2, _MSG, ".raftpb.SnapshotMetadata", False)],
    }),
    "walpb": (("raftpb.proto",), {}, {
        "Record": [("type", 1, _I64, None, False), ("crc", 2, _U32, None, False), ("data", 3, _BYTES, None, False)],
        "Snapshot": [("index", 1, _U64, None, False), ("term", 2, _U64, None, False),
                     ("conf_state", 3, _MSG, ".raftpb.ConfState", False)],
    }),
    "snappb": ((), {}, {
        "snapshot": [("crc", 1, _U32, None, False), ("data", 2, _BYTES, None, False)],
    }),
    "etcdserverpb": ((), {}, {
        "Metadata": [("NodeID", 1, _U64, None, False), ("ClusterID", 2, _U64, None, False)],
    }),
}

# The fields etcd marks non-nullable (always marshalled), per message.
ALWAYS = {
    "raftpb.Entry": ("Type", "Term", "Index"),
    "raftpb.HardState": ("term", "vote", "commit"),
    "raftpb.ConfState": ("auto_leave",),
    "raftpb.SnapshotMetadata": ("conf_state", "index", "term"),
    "raftpb.Snapshot": ("metadata",),
    "walpb.Record": ("type", "crc"),
    "walpb.Snapshot": ("index", "term"),
    "snappb.snapshot": ("crc",),
    "etcdserverpb.Metadata": ("NodeID", "ClusterID"),
}

_classes: dict | None = None


def _build() -> dict:
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # optional dependency (etcd extra)
    except ImportError as exc:               # the walcrypt[etcd] extra
        raise UsageError("reading or writing etcd data needs the protobuf package: "
                         "pip install 'walcrypt[etcd]'") from exc
    F = descriptor_pb2.FieldDescriptorProto
    types = {_U64: F.TYPE_UINT64, _I64: F.TYPE_INT64, _U32: F.TYPE_UINT32, _BOOL: F.TYPE_BOOL,
             _BYTES: F.TYPE_BYTES, _ENUM: F.TYPE_ENUM, _MSG: F.TYPE_MESSAGE}
    pool = descriptor_pool.DescriptorPool()
    for package, (deps, enums, messages) in _SCHEMA.items():
        fd = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto2")
        fd.dependency.extend(deps)
        for ename, values in enums.items():
            ed = fd.enum_type.add(name=ename)
            for vname, number in values:
                ed.value.add(name=vname, number=number)
        for mname, fields in messages.items():
            md = fd.message_type.add(name=mname)
            for fname, number, ftype, type_name, repeated in fields:
                f = md.field.add(name=fname, number=number, type=types[ftype],
                                 label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
                if type_name:
                    f.type_name = type_name
        pool.Add(fd)
    out = {}
    for package, (_deps, _enums, messages) in _SCHEMA.items():
        for mname in messages:
            full = f"{package}.{mname}"
            desc = pool.FindMessageTypeByName(full)
            if hasattr(message_factory, "GetMessageClass"):
                out[full] = message_factory.GetMessageClass(desc)
            else:                                          # protobuf < 4.22
                out[full] = message_factory.MessageFactory(pool).GetPrototype(desc)
    return out


def cls(name: str):
    """The message class for ``name`` (e.g. ``"raftpb.Entry"``)."""
    global _classes
    if _classes is None:
        _classes = _build()
    return _classes[name]


def parse(name: str, data: bytes):
    """Parse ``data`` as message ``name``; raises ``ValueError`` (with protobuf's reason) on bad bytes."""
    msg = cls(name)()
    try:
        msg.ParseFromString(bytes(data))
    except Exception as exc:                 # protobuf's DecodeError (and upb's RuntimeWarnings-turned-errors)
        raise ValueError(f"not a valid {name}: {exc}") from None
    return msg


def marshal(name: str, **values) -> bytes:
    """Marshal a message as etcd (gogoproto) does: every non-nullable field present even when zero.
    Values of message fields are marshalled bytes or (field, value) dicts."""
    msg = cls(name)()
    _fill(name, msg, values)
    return msg.SerializeToString()


def _fill(name: str, msg, values: dict) -> None:
    package = name.split(".")[0]
    fields = {f[0]: f for f in _SCHEMA[package][2][name.split(".", 1)[1]]}
    for fname in ALWAYS.get(name, ()):
        if fname in values:
            continue
        if fields[fname][2] == _MSG:
            sub = getattr(msg, fname)
            _fill(_message_type(fields[fname]), sub, {})
            sub.SetInParent()
        else:
            setattr(msg, fname, getattr(msg, fname))      # the default, with its presence bit set
    for fname, value in values.items():
        _fname, _n, ftype, _type_name, repeated = fields[fname]
        if ftype == _MSG:
            sub = getattr(msg, fname)
            if isinstance(value, (bytes, bytearray)):
                sub.MergeFromString(bytes(value))
            else:
                _fill(_message_type(fields[fname]), sub, value)
            sub.SetInParent()
        elif repeated:
            getattr(msg, fname).extend(value)
        elif value is not None:
            setattr(msg, fname, value)


def _message_type(field: _Field) -> str:
    """The message a message field holds (every message field of _SCHEMA names its type)."""
    type_name = field[3]
    assert type_name is not None, field
    return type_name.lstrip(".")
