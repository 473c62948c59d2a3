"""inspect, verify, repair, compact, recover, dump."""

from __future__ import annotations

import base64
import json
import os
import sys

import click

from .. import keys as K
from ..errors import (
    KeyProviderError,
    LockedError,
    UsageError,
)
from ..inspection_render import render
from ..layout import looks_like_store
from ..storedir import SharedLock, lock_holders, locked_message
from .app import command
from .errors import EXIT_FINDINGS, EXIT_OK
from .options import kek_from_options, key_options, need_key_error
from .output import JsonList, emit_json, format_table, human_size
from .stores import (
    Bar,
    Spinner,
    legacy_findings,
    open_ro,
    open_rw,
    print_legacy,
    refuse_key_for_plaintext,
    store_mode,
    store_root,
)

# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------

@command(short_help="Show what a store holds (no key needed; never writes).")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def inspect(directory, as_json, **kw) -> None:
    """Show what a store holds; works on a running store and without any key.

    Without a key: layout, segments, snapshots, keyring (IDs and states only),
    rotation and migration state and warnings, read from the metadata without
    authenticating it.  With a key: MACs are verified and the hard state and
    first/last index are read through the engine.  Never writes, takes no lock.

    \b
    Examples:
      walcrypt inspect /var/lib/node1
      walcrypt inspect /var/lib/node1 --key-file /secure/kek --json
    """
    # lazy: start-up time (walcrypt.inspection, the inspect report)
    from ..inspection import inspect_store
    key_file = kw.get("key_file")
    kek = kek_from_options(kw)
    legacy = legacy_findings(directory)
    if legacy and not (os.path.isdir(directory) and looks_like_store(directory)):
        if as_json:
            emit_json({"path": os.path.abspath(directory), "store": False, "legacy": legacy})
        else:
            print_legacy(legacy)
        sys.exit(EXIT_OK)
    rep = inspect_store(directory, kek, key_file=key_file)
    if legacy:
        rep["legacy"] = legacy
    if as_json:
        emit_json(rep)
    else:
        click.echo(render(rep))
        print_legacy(legacy)
    sys.exit(EXIT_FINDINGS if rep["errors"] else EXIT_OK)






# ---------------------------------------------------------------------------
# verify, repair
# ---------------------------------------------------------------------------

MAX_LOCATIONS_SHOWN = 5


def _print_findings(report, root: str) -> None:
    """Each finding with where it is, what it is and what to do.  Identical findings (same severity,
    detail and advice, e.g. the same damage in many segments) are one entry with a count and their
    locations (the first few; --json lists every finding)."""
    groups: dict = {}
    for f in report.findings:
        groups.setdefault((f.severity, f.kind, f.detail, f.hint), []).append(f)
    for (severity, _kind, detail, hint), found in groups.items():
        locs = []
        for f in found:
            where = os.path.relpath(f.path, root) if f.path and f.path.startswith(root) else (f.path or "(store)")
            loc = [where]
            if f.offset is not None:
                loc.append(f"offset {f.offset}")
            if f.index is not None:
                loc.append(f"index {f.index}")
            locs.append(("  " if len(found) == 1 else ", ").join(loc))
        if len(found) == 1:
            click.echo(f"{severity.upper():<9}{locs[0]}")
            click.echo(f"{'':<9}{detail}")
        else:
            click.echo(f"{severity.upper():<9}{len(found)} x {detail}")
            more = len(locs) - MAX_LOCATIONS_SHOWN
            click.echo(f"{'':<9}in " + "; ".join(locs[:MAX_LOCATIONS_SHOWN])
                       + (f"; and {more} more (--json lists every one)" if more > 0 else ""))
        if hint:
            click.echo(f"{'':<9}what to do: {hint}")


def _summary(report) -> str:
    rng = (f"; log {report.first_index}..{report.last_index}" if report.first_index is not None
           and report.last_index is not None and report.last_index >= report.first_index else "")
    return (f"{report.segments} segment(s), {report.records} records, {report.entries} entries "
            f"({human_size(report.bytes)}); {report.snapshots} snapshot(s) ({human_size(report.snapshot_bytes)})"
            + rng)


@command(short_help="Authenticate every record and snapshot chunk (read-only).")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def verify(directory, as_json, **kw) -> None:
    """Read and authenticate every record and every snapshot chunk.

    Lists each finding with its file, offset and Raft index, and what to do;
    exits 1 if anything is wrong.  Read-only: writes nothing, takes no lock, and
    works on a running store (what its writer changes while it reads - a file
    removed, the write in progress at the end of the segment being appended
    to - is listed as a NOTE, not as a finding).

    \b
    Example:
      walcrypt verify /var/lib/node1 --key-file /secure/kek
    """
    # lazy: start-up time (walcrypt.check with its walk, findings and online readers)
    from ..check import check
    kek = kek_from_options(kw)
    root = store_root(directory)
    encrypted = store_mode(root, directory)
    if encrypted and kek is None:
        raise need_key_error(directory)
    refuse_key_for_plaintext(directory, encrypted, kek)
    with Bar("verifying") as bar:
        report = check(root, kek=kek if encrypted else None, encrypted=encrypted, progress=bar)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"verified {directory}: {_summary(report)}")
        _print_findings(report, root)
        n_err = len(report.errors)
        n_warn = sum(1 for f in report.findings if f.severity == "warning")
        click.echo("OK" + (f" ({n_warn} warning(s))" if n_warn else "") if report.ok
                   else f"FAILED: {n_err} error(s)" + (f", {n_warn} warning(s)" if n_warn else "")
                   + (" - 'walcrypt repair' can fix this" if all(f.repairable for f in report.errors)
                      else ""))
    sys.exit(EXIT_OK if report.ok else EXIT_FINDINGS)


@command(short_help="Cut a torn tail, set aside damage below the snapshot; refuse anything else.")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def repair(directory, as_json, **kw) -> None:
    """Verify, then repair what can be repaired safely.

    Truncates a torn tail (the incomplete last write of a crashed process),
    keeping a .broken copy of the file, and drops a broken newest snapshot when
    an older one can take over.  Damaged or missing segments that lie wholly
    below the newest valid snapshot are set aside (renamed .broken) and the log
    compacted up to the snapshot; the index range no longer served is listed.
    Never deletes authenticated data.  Refuses anything else (mid-log
    corruption, tampering, missing segments above the snapshot) without
    modifying the store, and says what to do instead.

    \b
    Example:
      walcrypt repair /var/lib/node1 --key-file /secure/kek
    """
    # lazy: start-up time (walcrypt.check with its walk, findings and online readers)
    from ..check import check
    kek = kek_from_options(kw)
    root = store_root(directory)
    encrypted = store_mode(root, directory)
    if encrypted and kek is None:
        raise need_key_error(directory)
    refuse_key_for_plaintext(directory, encrypted, kek)
    holders = lock_holders(root)
    if holders:
        raise LockedError(locked_message(directory, holders))
    with Bar("checking") as bar:
        report = check(root, kek=kek if encrypted else None, encrypted=encrypted, fix=True, progress=bar)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print_findings(report, root)
        if report.refused:
            click.echo(f"REFUSED: {report.advice}")
        elif report.repaired:
            if report.compaction and report.compaction.get("dropped"):
                lo, hi = report.compaction["dropped"]
                click.echo(f"dropped: entries {lo}..{hi} are no longer served (the snapshot at index "
                           f"{report.compaction['snapshot_index']} covers them); nothing above it was dropped")
            click.echo(f"repaired; verified again: {_summary(report)}")
            click.echo("OK" if report.ok else f"FAILED: {len(report.errors)} error(s) remain")
        else:
            click.echo(f"nothing to repair: {_summary(report)}")
            click.echo("OK")
    sys.exit(EXIT_OK if report.ok else EXIT_FINDINGS)


# ---------------------------------------------------------------------------
# compact, recover
# ---------------------------------------------------------------------------

@command(short_help="Compact the log up to an index a valid snapshot covers (dry run unless --apply).")
@click.argument("directory", type=click.Path())
@click.option("--to", "index", type=click.IntRange(min=1), required=True,
              help="Discard entries up to and including this index.")
@click.option("--apply", "do_apply", is_flag=True, help="Do it (without: only say what would be done).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def compact(directory, index, do_apply, as_json, **kw) -> None:
    """Discard the entries up to INDEX (the host's compaction, offline).

    Refuses an INDEX beyond the newest snapshot that authenticates end to end:
    what is compacted must be covered by a valid snapshot.  Whole segments no
    retained snapshot needs are deleted.  A dry run (the default) says what
    would be dropped and changes nothing; --apply does it.  Stop the node first.

    \b
    Examples:
      walcrypt compact /var/lib/node1 --to 5000 --key-file /secure/kek
      walcrypt compact /var/lib/node1 --to 5000 --key-file /secure/kek --apply
    """
    kek = kek_from_options(kw)
    root = store_root(directory)
    if do_apply:
        store = open_rw(root, directory, kek)
    else:
        with SharedLock(root, directory):
            store = open_ro(root, directory, kek)
    try:
        snap = store.snapshot()
        first, last, point = store.first_index(), store.last_index(), store.first_index() - 1
        if snap is None:
            raise UsageError(f"{directory} has no valid snapshot: compacting would discard entries nothing else "
                             "holds; save a snapshot first")
        if index > snap.meta.index:
            raise UsageError(f"--to {index} is beyond the newest valid snapshot at index {snap.meta.index}: "
                             "entries after it are held by nothing else")
        out = {"directory": directory, "snapshot_index": snap.meta.index, "compacted_to": point,
               "to": index, "applied": False, "dropped": None, "segments_deleted": []}
        if index <= point:
            out["note"] = f"already compacted up to {point}; nothing to do"
        else:
            floor = min(index, store.snapshots.floor() if store.snapshots.floor() is not None else index)
            gone = [s for s in store.wal.removable(floor)]
            out["dropped"] = [first, index]
            out["segments_deleted"] = [os.path.basename(s.path) for s in gone]
            if do_apply:
                store.compact(index)
                out["applied"] = True
                out["compacted_to"] = index
    finally:
        store.close()
    if as_json:
        emit_json(out)
        return
    if out["dropped"] is None:
        click.echo(f"{directory}: {out['note']}")
        return
    lo, hi = out["dropped"]
    verb = "dropped" if out["applied"] else "would drop"
    click.echo(f"{directory}: {verb} entries {lo}..{hi} (the snapshot at index {snap.meta.index} covers them); "
               f"the log keeps {hi + 1}..{last}")
    if out["segments_deleted"]:
        click.echo(f"{'deleted' if out['applied'] else 'would delete'} {len(out['segments_deleted'])} segment "
                   f"file(s): {', '.join(out['segments_deleted'])}")
    if not out["applied"]:
        click.echo("dry run: nothing was changed; add --apply to compact")


@command(short_help="Rebuild a lost or damaged meta/ from the snapshot and segment files (dry run unless --apply).")
@click.argument("directory", type=click.Path())
@click.option("--apply", "do_apply", is_flag=True, help="Rebuild (without: only say what would be rebuilt).")
@click.option("--store-id", metavar="HEX", help="The store to rebuild when snapshots of several authenticate.")
@click.option("--force", is_flag=True, help="Rebuild even though meta/ opens and authenticates.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def recover(directory, do_apply, store_id, force, as_json, **kw) -> None:
    """Rebuild the metadata (meta/) of an encrypted data directory from its
    snapshot and segment files and the KEK.

    Snapshot files carry their wrapped data keys: every file is authenticated
    with keys the KEK unwraps before it is used, and what does not authenticate
    (another store's files, files planted without the key, segments under a data
    key no readable snapshot carries) is never adopted.  The rebuilt store serves
    the log above the newest snapshot; the stable store (Raft term and vote of
    hosts that keep them there) lived only in meta/ and is lost - read the
    report.  A dry run (the default) says what would be rebuilt and changes
    nothing; --apply renames the old meta/ aside (never deletes it), renames the
    files it does not adopt to NAME.unlisted and writes the new metadata.

    \b
    Examples:
      walcrypt recover /var/lib/node1 --key-file /secure/kek
      walcrypt recover /var/lib/node1 --key-file /secure/kek --apply
    """
    # lazy: start-up time (walcrypt.recover with recover_scan, the meta/ rebuilder)
    from .. import recover as R
    kek = kek_from_options(kw)
    if kek is None:
        raise KeyProviderError("recover needs the store's KEK: --key-file F (or --key-env, --passphrase-env, --kms)")
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise UsageError(f"{directory} does not exist or is not a directory")
    sid = None
    if store_id is not None:
        sid = K.hex_bytes(store_id, min_len=16, max_len=16)
        if sid is None:
            raise UsageError(f"--store-id takes the 32 hex digits of a store ID, not {store_id!r}")
    holders = lock_holders(path) if os.path.exists(os.path.join(path, "LOCK")) else None
    if holders:
        raise LockedError(locked_message(directory, holders))
    with Spinner("rebuilding" if do_apply else "authenticating"):
        rep = R.run(path, kek, apply=do_apply, store_id=sid, force=force)
    _recover_report(rep, as_json)
    if not rep.get("applied"):
        if rep["can_apply"]:
            click.echo("dry run: nothing was changed; add --apply to rebuild", err=as_json)
        else:
            click.echo("REFUSED: this directory cannot be rebuilt as it is (see above); nothing was changed",
                       err=as_json)
    sys.exit(EXIT_OK if rep["can_apply"] else EXIT_FINDINGS)


def _recover_report(rep: dict, as_json: bool) -> None:
    if as_json:
        emit_json(rep)
        return
    click.echo(f"meta/          {rep['meta']}")
    click.echo(f"store ID       {rep['store_id'] or '(none authenticates with this KEK)'}")
    if rep["snapshots"]:
        click.echo("snapshots")
        click.echo(format_table(["ID", "INDEX", "TERM", "SIZE", "KEY ID"],
                                [[s["id"], s["index"], s["term"], human_size(s["size"]), s["key_id"]]
                                 for s in rep["snapshots"]]))
    if rep["segments"]:
        click.echo("segments")
        click.echo(format_table(["ID", "FIRST", "LAST", "SEALED", "KEY ID"],
                                [[s["id"], s["first_index"], s["last_index"], "yes" if s["sealed"] else "no",
                                  s["key_id"]] for s in rep["segments"]]))
    if rep["store_id"] and not rep["refused"]:
        lg, hs = rep["log"], rep["hard_state"]
        click.echo(f"log            entries {lg['first_index']}..{lg['last_index']} (compacted up to "
                   f"{rep['compacted_to']})")
        click.echo("hard state     " + (f"term={hs['term']} vote={hs['vote']} commit={hs['commit']}" if hs
                                        else "none (no segment)"))
    verb = "renamed aside" if rep.get("applied") else "not adopted (renamed NAME.unlisted by --apply)"
    for f in rep["set_aside"]:
        click.echo(f"{verb}: {f['file']}: {f['reason']}")
    for f in rep["ignored"]:
        click.echo(f"not read: {f['file']}: {f['reason']}")
    for x in rep["lost"]:
        click.echo(f"cannot be recovered: {x}")
    for x in rep["refused"]:
        click.echo(f"REFUSED: {x}")
    for x in rep["notes"]:
        click.echo(f"note: {x}")
    if rep.get("applied"):
        click.echo(f"rebuilt {rep['path']}/meta; it opens with walcrypt.open and serves the log above")


# ---------------------------------------------------------------------------
# dump
# ---------------------------------------------------------------------------

def _data_view(d: bytes) -> dict:
    try:
        return {"text": d.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(d).decode()}


@command(short_help="Print decrypted entries and the hard state.")
@click.argument("directory", type=click.Path())
@click.option("--from", "lo", type=click.IntRange(min=1), default=None, help="First index (default: first retained).")
@click.option("--to", "hi", type=click.IntRange(min=0), default=None, help="Last index, inclusive (default: last).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def dump(directory, lo, hi, as_json, **kw) -> None:
    """Print decrypted entries and the hard state.

    Entry data is shown as text where it is UTF-8, else as base64.  Read-only.

    \b
    Example:
      walcrypt dump /var/lib/node1 --key-file /secure/kek --from 100 --to 120 --json
    """
    kek = kek_from_options(kw)
    if lo is not None and hi is not None and lo > hi + 1:       # --to FROM-1 is the empty range
        raise UsageError(f"--from {lo} is after --to {hi}: give the range first index first (--to is inclusive)")
    root = store_root(directory)
    with SharedLock(root, directory):
        store = open_ro(root, directory, kek)
        try:
            first, last = store.first_index(), store.last_index()
            a = first if lo is None else lo
            b = last if hi is None else hi
            held = (f"the log holds {first}..{last}" if last >= first else
                    f"the log is empty (entries up to {first - 1} are compacted into the snapshot)")
            if lo is not None and lo > last:
                raise UsageError(f"--from {lo} is beyond the last index {last}; {held}")
            if a < first:
                raise UsageError(f"--from {a} is below the first retained index {first} (earlier entries are "
                                 f"compacted into the snapshot); {held}")
            if hi is not None and hi > last:
                raise UsageError(f"--to {hi} is beyond the last index {last}; {held}")
            if hi is not None and hi < first - 1:
                raise UsageError(f"--to {hi} is below the first retained index {first} (earlier entries are "
                                 f"compacted into the snapshot); {held}")
            hs, cs = store.initial_state()
            snap = store.snapshot()
            head = {"first_index": first, "last_index": last,
                    "hard_state": {"term": hs.term, "vote": hs.vote, "commit": hs.commit},
                    "conf_state": {"voters": list(cs.voters), "learners": list(cs.learners)},
                    "snapshot": None if snap is None else {"index": snap.meta.index, "term": snap.meta.term,
                                                           "size": snap.size}}
            # --json: an error from here on ends the document with its "error" member (see errors._fail)
            listing = JsonList(head, "entries") if as_json else None
            if listing is None:
                click.echo(f"hard state: term={hs.term} vote={hs.vote} commit={hs.commit}")
                click.echo(f"log: first index {first}, last index {last}"
                           + (f"; snapshot at index {snap.meta.index} term {snap.meta.term}" if snap else ""))
                click.echo("INDEX\tTERM\tSIZE\tDATA")
            idx = a
            while idx <= b:
                batch = store.entries(idx, min(b, idx + 1023) + 1, max_size=4 << 20)
                for e in batch:
                    v = _data_view(e.data)
                    if listing is not None:
                        listing.add({"index": e.index, "term": e.term, **v})
                    else:
                        shown = json.dumps(v["text"], ensure_ascii=False) if "text" in v else "base64:" + v["base64"]
                        click.echo(f"{e.index}\t{e.term}\t{len(e.data)}\t{shown}")
                idx = batch[-1].index + 1
            if listing is not None:
                listing.close()
        finally:
            store.close()
