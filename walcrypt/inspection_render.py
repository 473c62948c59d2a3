"""The text form of an inspection report (walcrypt.inspection.inspect_store), and the small table
and size helpers the command line shares."""

from __future__ import annotations

import datetime

from . import keys as K

# ---------------------------------------------------------------------------
# Tables for people
# ---------------------------------------------------------------------------

def ns_iso(ns: int | None) -> str | None:
    if not ns:
        return None
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(headers: list[str], rows: list[list], indent: str = "  ") -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in cells:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _checked_summary(rep: dict) -> str:
    """What the authenticated read checked, exactly (the 'authenticated' line)."""
    segs = rep["segments"]
    index_only = sum(1 for r in segs if r.get("checked") == "index frame")
    every = sum(1 for r in segs if r.get("checked") == "every record")
    unread = sum(1 for r in segs if r.get("checked") is None)
    parts = ["metadata MACs verified"]
    if index_only:
        parts.append(f"{index_only} sealed segment(s): header and index frame authenticated, records not read")
    if every:
        parts.append(f"{every} open segment(s): every committed record authenticated")
    if unread:
        parts.append(f"{unread} segment(s) not read (written or removed after the metadata was read)")
    snap = next((r for r in rep["snapshots"] if r.get("checked")), None)
    if snap is not None:
        parts.append(f"snapshot {snap['id']} authenticated end to end")
    return "yes: " + "; ".join(parts) + " ('walcrypt verify' authenticates every record)"


def render(rep: dict) -> str:
    """The inspection report for people."""
    out = []
    log = rep["log"]
    kek = rep.get("kek") or {}
    mode = rep["mode"] + (f" ({rep['algorithm']})" if rep["mode"] == "encrypted" else "")
    lock = rep["lock"]
    lock_s = ("unknown" if lock["held"] is None else
              f"held by process {', '.join(map(str, lock['pids']))}" if lock["held"] else
              "free (no process has it open)")
    out.append(f"store          {rep['path']}")
    out.append(f"format         version {rep['format_version']}, {mode}")
    out.append(f"store ID       {rep['store_id']}")
    if kek:
        if kek.get("fingerprint"):
            how = "--kms NAME --kms-option ..." if kek.get("kind") == "kms" else "--key-file F"
            fp = f"fingerprint {kek['fingerprint']}" + (" (the key given matches)" if rep["authenticated"] else
                                                       f" ('walcrypt key fingerprint {how}' names a key)")
        elif kek.get("kind") == "kms":
            fp = "fingerprint none: a KMS-held key has no check value (the plug-in name identifies it)"
        else:
            fp = "fingerprint none: no check value is stored"
        kind = str(kek.get("kind")) + (f" ({kek['plugin']})" if kek.get("plugin") else "")
        if kek.get("key"):
            kind += f" key {K.describe_identity(kek['key'])}" + (f" version {kek['version']}"
                                                              if kek.get("version") is not None else "")
        out.append(f"KEK            {kind}, {fp}")
    out.append(f"lock           {lock_s}")
    out.append("authenticated  " + (_checked_summary(rep) if rep["authenticated"]
                                    else "no - " + rep.get("note", "see errors below")))
    hs = log.get("hard_state")
    out.append(f"log            first index {log['first_index']}, last index {log['last_index']}"
               + ("" if rep["authenticated"] else " (unauthenticated)"))
    if hs is not None:
        out.append(f"hard state     term={hs['term']} vote={hs['vote']} commit={hs['commit']}")
    cs = log.get("conf_state")
    if cs and (cs["voters"] or cs["learners"]):
        out.append(f"conf state     voters={cs['voters']} learners={cs['learners']}")
    out.append(f"compacted      index {log['compacted_index']} term {log['compacted_term']}; next segment ID "
               f"{log['next_segment']}, next snapshot ID {log['next_snapshot']}; {log['stable_keys']} stable key(s)")
    out.append("")
    out.append("directories")
    out.append(format_table(["DIRECTORY", "ROLE", "FILES", "SIZE"],
                            [[d["name"] + "/", d["role"], d["files"] if d["exists"] else "absent",
                              human_size(d["bytes"]) if d["exists"] else ""] for d in rep["directories"]]))
    out.append("")
    out.append(f"segments ({len(rep['segments'])})")
    if rep["segments"]:
        out.append(format_table(
            ["ID", "FILE", "FIRST", "LAST", "KEY ID", "SEALED", "SIZE"],
            [[s["id"], s["file"], s["first_index"],
              s["last_index"] if s["last_index"] is None or s["last_index"] >= s["first_index"] else "(none)",
              s["key_id"] if rep["mode"] == "encrypted" else "-",
              "yes" if s["sealed"] else "no", "MISSING" if s.get("missing") else human_size(s["size"])]
             for s in rep["segments"]]))
    out.append("")
    out.append(f"snapshots ({len(rep['snapshots'])})")
    if rep["snapshots"]:
        out.append(format_table(
            ["ID", "INDEX", "TERM", "KEY ID", "DATA", "FILE SIZE", "KEK EMBEDDED"],
            [[s["id"], s["index"], s["term"], s["key_id"] if rep["mode"] == "encrypted" else "-",
              human_size(s["size"]), "MISSING" if s.get("missing") else human_size(s["file_size"]),
              "YES" if s["kek_embedded"] else "no"] for s in rep["snapshots"]]))
        out.append("  (snapshots in a data directory carry wrapped keys only, never the KEK)")
    out.append("")
    out.append(f"keyring ({len(rep['keyring'])})" + ("" if rep["keyring"] or rep["mode"] == "encrypted"
                                                     else " - a plaintext store has no keys"))
    if rep["keyring"]:
        has_usage = any("records" in k for k in rep["keyring"])
        headers = ["KEY ID", "PURPOSE", "STATE", "ALGORITHM", "CREATED"] + (["RECORDS", "BYTES"] if has_usage else [])
        out.append(format_table(headers, [
            [k["key_id"], k["purpose"], k["state"], k["algorithm"], ns_iso(k["created_ns"])]
            + ([k.get("records"), human_size(k.get("bytes")) if "bytes" in k else None] if has_usage else [])
            for k in rep["keyring"]]))
        out.append("  (key IDs and states only; key material is never shown)")
    out.append("")
    rot = rep["rotation"]
    if rot is None:
        out.append("rotation       none in flight")
    else:
        out.append(f"rotation       {'full re-key' if rot['full_rekey'] else 'DEK rotation'} to key "
                   f"{rot['pending_key_id']}, requested {ns_iso(rot['requested_ns'])} ({rot['reason']}); "
                   f"needs a snapshot at or above index {rot['snapshot_index_needed']}; {rot['queued']} queued")
    out.append("migration      " + ("none in progress" if rep["migration"] is None
                                    else f"to {rep['migration'].get('to')} interrupted"))
    if rep.get("notes"):
        out.append("")
        out.append(f"notes ({len(rep['notes'])})")
        out.extend(f"  - {n}" for n in rep["notes"])
    if rep["warnings"]:
        out.append("")
        out.append(f"warnings ({len(rep['warnings'])})")
        out.extend(f"  ! {w}" for w in rep["warnings"])
    if rep["errors"]:
        out.append("")
        out.append(f"errors ({len(rep['errors'])})")
        out.extend(f"  x {e}" for e in rep["errors"])
    return "\n".join(out)
