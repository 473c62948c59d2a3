"""Wiring pysyncobj to walcrypt: applied once (:func:`install`), acting only on the SyncObj
instances whose conf came from ``walcrypt_conf``.

* A conf's :class:`~.pysyncobj_node.WalcryptNode` is bound to the SyncObj built with it
  (``SyncObj.__init__``); every hook finds its node through that SyncObj (its journal, its
  serializer's bound methods), never through a process-wide table keyed by path.
* ``createJournal`` (under every name pysyncobj exports it) returns the node's journal for the
  SyncObj being built from our conf, and refuses, like ``FileJournal`` itself, to put pysyncobj's
  plaintext journal into a walcrypt data directory.
* Queued entries become durable before the node answers the leader (``SyncObj.__sendNextNodeIdx``)
  and at the end of every tick; the store is closed exactly once, whatever ends the node.
* ``Serializer.getTransmissionData`` / ``setTransmissionData``: snapshots sent to lagging followers
  (:mod:`.pysyncobj_transfer`).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

import pysyncobj as _pkg
import pysyncobj.journal as _pj
import pysyncobj.syncobj as _ps
from pysyncobj.serializer import Serializer

from ..errors import UsageError
from ..layout import LOCK_NAME, META_DIR
from . import pysyncobj_node
from .pysyncobj_journal import WalcryptJournal
from .pysyncobj_node import WalcryptNode
from .pysyncobj_transfer import receive_chunk, send_chunk

_INSTALLED = False
_LOCK = threading.Lock()
_CONF_PATHS: set[str] = set()        # data directories given to walcrypt_conf (real paths): refused to FileJournal
_BUILDING = threading.local()        # .nodes: the nodes whose SyncObj.__init__ runs in this thread
log = logging.getLogger("walcrypt.adapters.pysyncobj")     # the adapter's one logger (named in the README)


class InsecureTransportWarning(UserWarning):
    """A pysyncobj node on a walcrypt store starts without ``password``: pysyncobj's TCP traffic,
    log entries and decrypted snapshots included, is neither encrypted nor authenticated.
    Filter it (``warnings.filterwarnings("ignore", category=...)``) where that is intended, or
    escalate it to an error (``"error"``) to refuse such starts."""


def register_conf_path(path: str) -> None:
    """``path`` was given to walcrypt_conf: pysyncobj's FileJournal is refused there from now on,
    even before a store exists there."""
    with _LOCK:
        _CONF_PATHS.add(os.path.realpath(path))


def node_for_serializer(ser: Any) -> WalcryptNode | None:
    """The node whose conf built this Serializer: its serializer hook is that node's bound method."""
    node = getattr(getattr(ser, "_Serializer__serializer", None), "__self__", None)
    return node if isinstance(node, WalcryptNode) else None


def _store_dir_of(path: Any) -> str | None:
    """The walcrypt data directory that ``path`` is or lies in (one on disk, or one given to
    walcrypt_conf in this process and perhaps not created yet), else None."""
    d = os.path.realpath(os.fsdecode(path))
    while True:
        if d in _CONF_PATHS or (os.path.isfile(os.path.join(d, LOCK_NAME))
                                and os.path.isdir(os.path.join(d, META_DIR))):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _refuse_plaintext_journal(journal_file: Any) -> None:
    """UsageError when pysyncobj's FileJournal (plaintext, never fsynced) would write at or into a
    walcrypt data directory: its files (the journal and ``.meta``) would sit beside the encrypted
    store, in clear."""
    if journal_file is None:
        return
    store_dir = _store_dir_of(journal_file)
    if store_dir is not None:
        raise UsageError(f"{os.fsdecode(journal_file)} is in the walcrypt data directory {store_dir}: pysyncobj's "
                         "FileJournal would write the log there in plaintext. Build the SyncObj with "
                         f"conf=walcrypt_conf({store_dir!r}, kek=...) instead")


def _building_node() -> WalcryptNode | None:
    nodes = getattr(_BUILDING, "nodes", None)
    return nodes[-1] if nodes else None


def _warn_cleartext(node: WalcryptNode, self_node: Any) -> None:
    msg = (f"pysyncobj node {self_node} on the walcrypt store {node.path} starts without password=: pysyncobj's "
           "TCP traffic is neither encrypted nor authenticated, so every log entry and every snapshot sent to a "
           "lagging follower (decrypted from the store) crosses the network in clear, and anyone who can reach "
           "the port can send the node messages (pickles, which pysyncobj unpickles). Give walcrypt_conf a "
           "password= (see the README: what pysyncobj's transport protects)")
    log.warning("%s", msg)
    warnings.warn(msg, InsecureTransportWarning, stacklevel=3)   # the SyncObj(...) call


def install() -> None:
    """Wire pysyncobj to walcrypt.  Idempotent; affects only SyncObjs built from walcrypt_conf."""
    global _INSTALLED
    with _LOCK:
        if _INSTALLED:
            return
        _INSTALLED = True

    # createJournal under every name pysyncobj exports it (SyncObj.__init__ calls the one in
    # pysyncobj.syncobj), and FileJournal itself for callers that kept an earlier reference.
    def wrap_create_journal(previous):
        def create_journal(journalFile=None):
            node = _building_node()
            if node is not None and journalFile is not None and os.path.abspath(os.fspath(journalFile)) == node.path:
                return node.open_journal()
            _refuse_plaintext_journal(journalFile)
            return previous(journalFile)
        return create_journal

    for module in (_ps, _pkg, _pj):
        module.createJournal = wrap_create_journal(module.createJournal)

    orig_file_journal_init = _pj.FileJournal.__init__

    def file_journal_init(self, journalFile, *args, **kwargs):
        _refuse_plaintext_journal(journalFile)
        orig_file_journal_init(self, journalFile, *args, **kwargs)

    _pj.FileJournal.__init__ = file_journal_init

    orig_init = _ps.SyncObj.__init__

    def init(self, selfNode, otherNodes, conf=None, consumers=None, *args, **kwargs):
        node = getattr(conf, "walcrypt", None)
        if not isinstance(node, WalcryptNode):
            return orig_init(self, selfNode, otherNodes, conf, consumers, *args, **kwargs)
        node.check_conf(conf)
        if conf.password is None:
            _warn_cleartext(node, selfNode)   # first: escalated to an error, it stops the start here
        node.bind(self)                       # before the tick thread can ask for the state
        self._walcrypt_node = node            # set before pysyncobj lists its own attributes: never in a snapshot
        building = _BUILDING.__dict__.setdefault("nodes", [])
        building.append(node)
        try:
            orig_init(self, selfNode, otherNodes, conf, consumers, *args, **kwargs)
        except BaseException:
            node.unbind(self)                 # the journal may be open already: close it
            raise
        finally:
            building.pop()

    _ps.SyncObj.__init__ = init

    orig_destroy = _ps.SyncObj.destroy

    def destroy(self):
        orig_destroy(self)
        journal = self.__dict__.get("_SyncObj__raftLog")
        if not isinstance(journal, WalcryptJournal) or journal.closed:
            return
        thread = self.__dict__.get("_SyncObj__thread")
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            return                            # no tick thread to wait for (or we are it)
        if not journal.wait_closed(pysyncobj_node.CLOSE_WAIT_S):
            log.warning("SyncObj.destroy(): the tick thread has not closed the walcrypt store at %s within %.0f s; "
                        "it stays locked until it does", journal.node.path, pysyncobj_node.CLOSE_WAIT_S)

    _ps.SyncObj.destroy = destroy

    orig_do_destroy = _ps.SyncObj._doDestroy

    def do_destroy(self):
        try:
            orig_do_destroy(self)             # transport, consumers, then the journal
        except BaseException:
            journal = self.__dict__.get("_SyncObj__raftLog")
            if isinstance(journal, WalcryptJournal):
                journal.close_quietly()       # a transport or consumer failure must not leave the store open
            raise

    _ps.SyncObj._doDestroy = do_destroy

    orig_tick_thread = _ps.SyncObj._autoTickThread

    def auto_tick_thread(self):              # ``self`` is a weakref.proxy of the SyncObj
        try:
            journal = self._SyncObj__raftLog
        except ReferenceError:
            journal = None
        try:
            return orig_tick_thread(self)
        finally:
            # However the thread ends (destroy, a failed bind, an exception, the thread that built
            # the SyncObj gone) the store it served is closed; after a destroy, a no-op.
            if isinstance(journal, WalcryptJournal):
                journal.close_quietly()

    _ps.SyncObj._autoTickThread = auto_tick_thread

    orig_send_next = _ps.SyncObj._SyncObj__sendNextNodeIdx

    def send_next_node_idx(self, *args, **kwargs):
        journal = self.__dict__.get("_SyncObj__raftLog")
        if isinstance(journal, WalcryptJournal) and not journal.closed:
            journal.flush()                   # entries are durable before the leader hears of them
        return orig_send_next(self, *args, **kwargs)

    _ps.SyncObj._SyncObj__sendNextNodeIdx = send_next_node_idx

    orig_tick = _ps.SyncObj._onTick

    def on_tick(self, timeToWait=0.0):
        try:
            return orig_tick(self, timeToWait)
        finally:
            node = self.__dict__.get("_walcrypt_node")
            if node is not None and not getattr(self, "_SyncObj__destroying", False):
                node.after_tick(self)

    _ps.SyncObj._onTick = on_tick

    orig_get = Serializer.getTransmissionData

    def get_transmission_data(self, transmissionID):
        node = node_for_serializer(self)
        if node is None:
            return orig_get(self, transmissionID)
        return send_chunk(node, self, transmissionID)

    Serializer.getTransmissionData = get_transmission_data

    orig_set = Serializer.setTransmissionData

    def set_transmission_data(self, data):
        node = node_for_serializer(self)
        if node is None:
            return orig_set(self, data)
        return receive_chunk(node, self, data)

    Serializer.setTransmissionData = set_transmission_data
