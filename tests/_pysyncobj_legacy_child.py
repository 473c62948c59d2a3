"""One pysyncobj node with a ReplDict, on pysyncobj's own FileJournal + full dump (``--mode file``) or
on walcrypt_conf importing those files on its first start (``--mode walcrypt``).

JSON lines on stdin/stdout like walcrypt.cluster_node (status, set, dump, compact, stop); only the
addresses given (127.0.0.1) are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import warnings

from walcrypt.cluster_node import set_all


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["file", "walcrypt"], required=True)
    ap.add_argument("--self", dest="self_addr", required=True)
    ap.add_argument("--peer", action="append", default=[])
    ap.add_argument("--journal")
    ap.add_argument("--dump")
    ap.add_argument("--dir")
    ap.add_argument("--key-file")
    ap.add_argument("--import", dest="import_journal", default=None, help="a path, or auto")
    ap.add_argument("--compaction-entries", type=int, default=100)
    ap.add_argument("--password", default="legacy-test-transport")
    args = ap.parse_args()

    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    data = ReplDict()
    opts = dict(password=args.password, logCompactionMinEntries=args.compaction_entries, logCompactionMinTime=3600)
    caught: list = []
    node = None
    if args.mode == "file":
        conf = SyncObjConf(journalFile=args.journal, fullDumpFile=args.dump, **opts)
        so = SyncObj(args.self_addr, args.peer, consumers=[data], conf=conf)
    else:
        import walcrypt
        from walcrypt.adapters.pysyncobj import LegacyFilesWarning, walcrypt_conf
        imp = {}
        if args.import_journal:
            imp["import_journal"] = args.import_journal
            if args.dump:
                imp["import_dump"] = args.dump
        conf = walcrypt_conf(args.dir, kek=walcrypt.KeyFile(args.key_file), **imp, **opts)
        node = conf.walcrypt
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always", LegacyFilesWarning)
            so = SyncObj(args.self_addr, args.peer, consumers=[data], conf=conf)
        caught = [str(w.message) for w in rec if issubclass(w.category, LegacyFilesWarning)]
    out_lock = threading.Lock()

    def reply(obj) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def do_set(items, timeout: float) -> dict:
        return {"acked": set_all(data, items, timeout)["acked"]}

    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "status":
                reply({"leader": so._isLeader(), "ready": so.isReady(), "size": len(data.rawData()),
                       "warnings": caught, "import_report": node.import_report if node else None,
                       "snapshots_saved": node.snapshots_saved if node else None})
            elif op == "set":
                reply(do_set(req["items"], float(req.get("timeout", 20))))
            elif op == "dump":
                reply({"items": dict(data.rawData())})
            elif op == "compact":
                so.forceLogCompaction()
                reply({"ok": True})
            elif op == "stop":
                so.destroy()
                t = so.__dict__.get("_SyncObj__thread")
                if t is not None:
                    t.join(timeout=15)
                reply({"ok": True})
                return 0
            else:
                reply({"error": f"unknown op {op!r}"})
        except Exception as exc:
            reply({"error": f"{type(exc).__name__}: {exc}"})
    so.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
