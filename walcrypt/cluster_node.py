"""One node of the demo/test cluster: pysyncobj + a replicated dict on a walcrypt store.

Run as ``python -m walcrypt.cluster_node --dir D --key-file K --self HOST:PORT --peer HOST:PORT ...``.
It speaks JSON lines on stdin/stdout (one request, one response), used by ``walcrypt demo``
and the cluster tests:

* ``{"op": "status"}`` -> leader flag, the leader this node knows, applied size, fsync count,
  rotation state, snapshot facts
* ``{"op": "set", "items": [[k, v], ...], "timeout": s}`` -> ``{"acked": [k, ...]}``: keys whose
  write was committed by the cluster (the callback reported success) within the timeout
* ``{"op": "dump"}`` -> every key/value this node has applied
* ``{"op": "rotate"}`` -> starts a DEK rotation of this node's store
* ``{"op": "stop"}`` -> shuts the node down cleanly and exits
Traffic goes only to the addresses given (127.0.0.1 in the demo and tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj
from pysyncobj.batteries import ReplDict

from .adapters.pysyncobj import walcrypt_conf
from .keys import KeyFile


def set_all(data: Any, items: list, timeout: float) -> dict:
    """Set every (key, value) of ``items`` on the replicated dict ``data`` and wait, at most
    ``timeout`` seconds, for the cluster's answers: {"acked": [...], "failed": [...]} (keys not
    answered in time are in neither)."""
    done: dict = {}
    cv = threading.Condition()

    def make_cb(key):
        def cb(result, error):
            with cv:
                done[key] = error
                cv.notify_all()
        return cb

    for k, v in items:
        data.set(k, v, callback=make_cb(k))
    deadline = time.monotonic() + timeout
    with cv:
        while len(done) < len(items) and time.monotonic() < deadline:
            cv.wait(timeout=0.05)
    return {"acked": [k for k, e in done.items() if e == FAIL_REASON.SUCCESS],
            "failed": [k for k, e in done.items() if e != FAIL_REASON.SUCCESS]}

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="walcrypt.cluster_node")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--key-file", required=True)
    ap.add_argument("--self", dest="self_addr", required=True)
    ap.add_argument("--peer", action="append", default=[])
    ap.add_argument("--password", default=None)
    ap.add_argument("--compaction-entries", type=int, default=2000)
    ap.add_argument("--segment-size", type=int, default=4 << 20)
    args = ap.parse_args(argv)

    data = ReplDict()
    conf = walcrypt_conf(args.dir, kek=KeyFile(args.key_file), password=args.password,
                         logCompactionMinEntries=args.compaction_entries, logCompactionMinTime=3600,
                         store_options={"segment_size": args.segment_size})
    node = conf.walcrypt
    so = SyncObj(args.self_addr, args.peer, consumers=[data], conf=conf)
    out_lock = threading.Lock()

    def reply(obj) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def status() -> dict:
        st = node.store
        snap = st.snapshot() if st is not None and not st.closed else None
        known = so._getLeader()
        return {"leader": so._isLeader(), "leader_addr": getattr(known, "id", None), "ready": so.isReady(),
                "size": len(data.rawData()),
                "fsyncs": st.fsync_count if st else 0, "needs_snapshot": bool(st and st.needs_snapshot),
                "rotation_done": node.rotation_done, "snapshots_saved": node.snapshots_saved,
                "snapshots_received": node.snapshots_received,
                "snapshot_index": snap.meta.index if snap else 0,
                "snapshot_key": snap.info.key_id.hex() if snap else None,
                "active_key": next((k["key_id"] for k in st.key_info()["keys"] if k["state"] == "active"), None)
                if st else None}

    def do_set(items, timeout: float) -> dict:
        return set_all(data, items, timeout)

    for line in sys.stdin:                     # ends when the parent closes stdin or kills us
        try:
            req = json.loads(line)
        except ValueError:
            reply({"error": "bad json"})
            continue
        op = req.get("op")
        try:
            if op == "status":
                reply(status())
            elif op == "set":
                reply(do_set(req["items"], float(req.get("timeout", 10))))
            elif op == "dump":
                reply({"items": dict(data.rawData())})
            elif op == "rotate":
                node.rotate_dek()
                reply({"ok": True})
            elif op == "stop":
                so.destroy()
                deadline = time.monotonic() + 5
                while node.store is not None and not node.store.closed and time.monotonic() < deadline:
                    time.sleep(0.02)
                reply({"ok": True})
                return 0
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as exc:   # report, keep serving
            reply({"error": f"{type(exc).__name__}: {exc}"})
    so.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
