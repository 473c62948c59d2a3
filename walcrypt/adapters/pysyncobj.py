"""A durable, encrypted journal and snapshot store for pysyncobj.

The whole user-facing surface::

    from pysyncobj import SyncObj
    from walcrypt.adapters.pysyncobj import walcrypt_conf

    conf = walcrypt_conf("/var/lib/node1", kek=walcrypt.KeyFile("/secure/kek"), password="cluster-secret")
    node = SyncObj("127.0.0.1:4321", ["127.0.0.1:4322", "127.0.0.1:4323"], consumers=[...], conf=conf)
    conf.walcrypt.rotate_dek()          # optional: rotate the data key under load

How it is wired (all of it is applied once, by :func:`_install`, and acts only on SyncObj
instances whose conf came from :func:`walcrypt_conf`):

* A conf's :class:`WalcryptNode` is bound to the SyncObj built with it (``SyncObj.__init__``),
  one running SyncObj at a time; every hook finds its node through that SyncObj (its journal,
  its serializer's bound methods), never through a process-wide table keyed by path.
* ``createJournal`` (under every name pysyncobj exports it: ``pysyncobj``,
  ``pysyncobj.syncobj``, ``pysyncobj.journal``) returns a :class:`WalcryptJournal` for the
  SyncObj being built from our conf, and refuses, like ``FileJournal`` itself, to put
  pysyncobj's plaintext journal into a walcrypt data directory.  ``add()`` queues entries;
  they become durable in one ``save()`` (one fdatasync for every entry of a tick: group commit)
  *before* the node answers the leader (``SyncObj.__sendNextNodeIdx``) and at the end of every
  tick, so a leader counts only durable entries of its own toward the commit index.
  ``setCurrentTerm`` is durable at once (the stable store).
* Log compaction uses pysyncobj's custom serializer hooks: the state of the
  SyncObj and its consumers is written as a walcrypt snapshot (encrypted under
  this node's DEK); ``fullDumpFile`` is only a small marker file without
  secrets.
* Snapshots sent to lagging followers: ``Serializer.getTransmissionData`` streams
  the *decrypted* snapshot over pysyncobj's transport (encrypted only when the conf has a
  ``password``; without one a warning, :class:`InsecureTransportWarning`, is given at start),
  and the receiver's ``setTransmissionData`` spools it under an ephemeral in-memory key, then
  re-encrypts it under its own DEK as a walcrypt snapshot.  No node ever receives ciphertext
  that needs another node's key.
* DEK rotation is wired to pysyncobj's forced log compaction: ``rotate_dek()``
  starts a rotation on the tick thread and forces compactions until a snapshot
  at or above the rotation point completes it.

Lifecycle (the store is closed exactly once, whatever ends the node):

* ``SyncObj.destroy()`` returns once the store is closed (with ``autoTick``, it waits, at most
  :data:`CLOSE_WAIT_S`, for the tick thread to close it), so a new SyncObj on the same data
  directory can start right away in the same process.  Called from the tick thread itself
  (a callback), it cannot wait: the store closes when that tick ends.
* The store is also closed when the tick thread ends any other way (a failed bind, an
  exception in ``_doDestroy``, the end of the thread that built the SyncObj), and when
  ``SyncObj.__init__`` fails after the journal was opened.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

try:
    import pysyncobj.journal  # noqa: F401 - what the modules below subclass and wire
    import pysyncobj.serializer  # noqa: F401
    import pysyncobj.syncobj  # noqa: F401
    from pysyncobj import SyncObjConf
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise ImportError("walcrypt.adapters.pysyncobj needs pysyncobj: pip install 'walcrypt[pysyncobj]'") from exc

from ..errors import UsageError
from ..keys import KeyEncryptionKey
from . import pysyncobj_node
from .pysyncobj_adopt import LegacyFilesWarning  # noqa: F401 - the adapter's names, used as pysyncobj.<name>
from .pysyncobj_format import DUMP_MAGIC, MARKER_NAME, decode_dump, encode_dump  # noqa: F401
from .pysyncobj_install import InsecureTransportWarning, node_for_serializer, register_conf_path  # noqa: F401
from .pysyncobj_install import install as _install
from .pysyncobj_journal import WalcryptJournal  # noqa: F401
from .pysyncobj_node import CLOSE_WAIT_S, WalcryptNode  # noqa: F401


class _AdapterModule(types.ModuleType):
    """This module, whose ``CLOSE_WAIT_S`` (the README's knob: how long destroy() and a restart wait
    for the old SyncObj's tick thread to close the store) is set where it is read."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "CLOSE_WAIT_S":
            pysyncobj_node.CLOSE_WAIT_S = value
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _AdapterModule


def walcrypt_conf(path: str | os.PathLike[str], *, kek: KeyEncryptionKey | None = None, encrypted: bool = True,
                  store_options: dict[str, Any] | None = None, import_journal: str | os.PathLike[str] | None = None,
                  import_dump: str | os.PathLike[str] | None = None, **syncobj_options: Any) -> SyncObjConf:
    """A ``SyncObjConf`` whose journal and snapshots live in a walcrypt store at ``path``.

    ``kek`` is this node's own key-encryption key.  Any SyncObjConf option may be given;
    ``password=`` is the one to give: without it pysyncobj sends every entry and every snapshot
    (decrypted) in clear and accepts messages from anyone who can reach its port (an
    :class:`InsecureTransportWarning` at start says so).  ``store_options`` go to
    :func:`walcrypt.open` (``sync``, ``segment_size``, ...).

    The conf serves one running SyncObj at a time; once that one is destroyed it can start
    another (a restart), as can a new conf for the same path.

    Adopting a node that ran on pysyncobj's own ``FileJournal``: ``import_journal`` (the old
    ``journalFile``; its ``.meta`` beside it is read too) and ``import_dump`` (the old
    ``fullDumpFile``) are imported into the store on the first start, when ``path`` holds no store
    yet (:func:`walcrypt.legacy.pysyncobj_files.import_pysyncobj`); later starts ignore them.
    ``import_journal="auto"`` takes ``<path>.journal`` and ``<path>.dump`` when they exist and are
    pysyncobj's files, and nothing when they do not.  The originals are left as they are and a
    :class:`LegacyFilesWarning` says so once, with the command that removes them.  Files found at
    ``<path>.journal``/``<path>.dump`` are never imported without ``import_journal`` (walcrypt never
    adopts plaintext data implicitly): a first start without it only warns."""
    if import_dump is not None and import_journal is None:
        raise UsageError("import_dump needs import_journal (the journal the dump belongs to), or 'auto'")
    for forbidden in ("journalFile", "fullDumpFile", "serializer", "deserializer"):
        if forbidden in syncobj_options:
            raise UsageError(f"walcrypt_conf manages {forbidden}; do not pass it")
    path = os.path.abspath(os.fspath(path))
    _install()
    register_conf_path(path)
    node = WalcryptNode(path, kek=kek, encrypted=encrypted, store_options=store_options or {})
    node.import_journal = None if import_journal is None else (
        "auto" if import_journal == "auto" else os.path.abspath(os.fspath(import_journal)))
    node.import_dump = None if import_dump is None else os.path.abspath(os.fspath(import_dump))
    syncobj_options.setdefault("useFork", False)
    conf = SyncObjConf(journalFile=path, fullDumpFile=node.marker, serializer=node.serialize,
                       deserializer=node.deserialize, **syncobj_options)
    conf.walcrypt = node
    return conf
