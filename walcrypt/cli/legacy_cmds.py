"""import pysyncobj, import etcd, export etcd (walcrypt.legacy)."""

from __future__ import annotations

import os

import click

from .. import keys as K
from ..errors import (
    KeyProviderError,
    UsageError,
)
from .app import command, main
from .context import Ctx
from .errors import EXIT_CODES, Group
from .options import kek_from_options, key_options
from .output import emit_json
from .stores import Spinner

# ---------------------------------------------------------------------------
# import, export: data written before walcrypt (walcrypt.legacy)
# ---------------------------------------------------------------------------

@main.group(name="import", cls=Group, epilog=EXIT_CODES,
            short_help="Adopt a Raft library's own files: pysyncobj journals, etcd member directories.")
def import_group() -> None:
    """Import data a Raft library wrote before walcrypt into a new encrypted store.
    The source files are only read, never changed."""


@main.group(name="export", cls=Group, epilog=EXIT_CODES,
            short_help="Hand a store back to a Raft library's own format (etcd member directory).")
def export_group() -> None:
    """Write a store's log, hard state and snapshot in another Raft library's own format."""


# --- import pysyncobj --------------------------------------------------------

@command(import_group, name="pysyncobj", short_help="Import a pysyncobj FileJournal (+ .meta) and full-dump file.")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--journal", required=True, type=click.Path(dir_okay=False),
              help="The node's journalFile (its .meta beside it is read too).")
@click.option("--dump", type=click.Path(dir_okay=False), help="The node's fullDumpFile (needed once it compacted).")
@click.option("--max-dump-bytes", type=click.IntRange(min=1), default=None,
              help="Refuse a dump larger than this, decompressed (default 1 GiB).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@key_options
def import_pysyncobj_cmd(directory, journal, dump, max_dump_bytes, as_json, **kw) -> None:
    """Import a pysyncobj node's own files into a new encrypted store in DIRECTORY
    (new or empty), which the pysyncobj adapter (walcrypt_conf) then resumes from:
    the journal's entries, the term and vote, the commit index, and the dump as
    the snapshot.  A torn journal tail (pysyncobj never fsyncs) is imported up to
    its last complete entry and reported.  The sources are only read; remove them
    later with 'walcrypt migrate DIRECTORY --to encrypted --remove-source', which
    deletes them only while they are byte-identical to what was imported.

    \b
    Examples:
      walcrypt import pysyncobj /var/lib/node1 --journal /var/lib/pso/node1.journal \\
          --dump /var/lib/pso/node1.dump --key-file /secure/node1.kek
    """
    # lazy: start-up time (walcrypt.legacy.pysyncobj_files: the journal and pickle/gzip dump parsers)
    from ..legacy import pysyncobj_files as legacy
    kek = kek_from_options(kw)
    if kek is None:
        raise KeyProviderError("the imported store is encrypted and needs a key: --key-file F (create one with "
                               "'walcrypt keygen F')")
    if isinstance(kek, (K.KeyFile, K.EnvKey)):
        kek.material(None)                   # a bad key is refused before anything is read or created
    for f in (journal, dump):
        if f is not None and not os.path.isfile(f):
            raise UsageError(f"{f} does not exist or is not a file")
    opts = {} if max_dump_bytes is None else {"max_dump_bytes": max_dump_bytes}
    with Spinner("importing"):
        rep = legacy.import_pysyncobj(directory, journal=journal, dump=dump, kek=kek, **opts)
    if as_json:
        emit_json(rep)
        return
    rng = f"entries {rep['first_index']}..{rep['last_index']}" if rep["entries"] else "no entries"
    click.echo(f"imported {rep['entries']} journal entries ({rng}), term {rep['term']}, vote {rep['vote']}, "
               f"commit index {rep['commit']}"
               + (f", snapshot at index {rep['snapshot_index']}" if rep.get("snapshot_index") else "")
               + f" into {directory}")
    if rep["cut"]:
        c = rep["cut"]
        click.echo(f"torn journal tail cut at offset {c['offset']} ({c['bytes']} bytes): {c['reason']}", err=True)
    if rep.get("commit_clamped_from"):
        click.echo(f"note: the commit index {rep['commit_clamped_from']} lay beyond the imported log; "
                   f"it is {rep['commit']} now", err=True)
    click.echo(f"the sources were not changed: {', '.join(s['path'] for s in rep['sources'])}; once the node "
               f"runs on the store, remove them with '{legacy.removal_command(directory)}'")



# --- import etcd, export etcd ------------------------------------------------

@command(import_group, name="etcd",
         short_help="An etcd v3 member directory (member/wal, member/snap) into a new store.")
@click.argument("data", type=click.Path())
@click.option("--member-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="etcd's member directory (holding wal/ and snap/), or etcd's --data-dir above it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def import_etcd_cmd(data, member_dir, as_json, **kw) -> None:
    """Import an etcd v3 member directory into a new encrypted store DATA (missing
    or empty), as etcd 3.4 itself would start from it: the newest snapshot the WAL
    records, the WAL's entries after it (raftpb.Entry bytes, byte for byte), the
    hard state, the member and cluster IDs.  A torn tail at the end of the last
    WAL file is cut and reported; any other damage is an error naming the file
    and offset, and nothing is written.  The source is only read.  etcd's v3
    database (member/snap/db) is derived state and is not imported.

    \b
    Example:
      walcrypt import etcd /var/lib/node1 --member-dir /var/lib/etcd/member --key-file /secure/kek
    """
    # lazy: start-up time (walcrypt.legacy.etcd: the etcd WAL reader and protobuf schemas)
    from ..legacy.etcd import import_etcd
    kek = kek_from_options(kw)
    if kek is None:
        raise UsageError("give the KEK of the new store (--key-file, --key-env, --passphrase-env or --kms)")
    Ctx.source = member_dir
    with Spinner("importing"):
        res = import_etcd(data, member_dir=member_dir, kek=kek)
    if as_json:
        emit_json(res)
        return
    snap = res["snapshot"]
    click.echo(f"imported {res['member_dir']} (member {res['node_id']}, cluster {res['cluster_id']}) into {data}: "
               + (f"snapshot at index {snap['index']} term {snap['term']} ({snap['bytes']} bytes), " if snap else
                  "no snapshot, ")
               + (f"entries {res['first_index']}..{res['last_index']}" if res["entries"] else "no entries")
               + f", hard state term {res['hard_state']['term']} commit {res['hard_state']['commit']}")
    if res["torn_tail"]:
        t = res["torn_tail"]
        click.echo(f"note: a torn tail was cut: {t['file']} from offset {t['offset']} ({t['reason']}); the "
                   "source file is unchanged", err=True)
    for sk in res["skipped_snapshots"]:
        click.echo(f"note: skipped {sk['file']}: {sk['reason']}", err=True)


@command(export_group, name="etcd", short_help="A store imported from etcd back into an etcd v3 member directory.")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--member-dir", required=True, type=click.Path(),
              help="The new member directory (missing or empty); name it <etcd data dir>/member.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def export_etcd_cmd(data, member_dir, as_json, **kw) -> None:
    """Write the store DATA (imported with 'walcrypt import etcd') as a new etcd v3
    member directory: one WAL file from the snapshot (or index 1) with every entry
    and the hard state, and the snap file when the store has a snapshot.  The
    output is plaintext (files 0600), as etcd keeps its data.  With no snapshot,
    etcd starts on it and rebuilds its key-value database from the log; with one,
    etcd also needs the member/snap/db file that belongs to that snapshot.

    \b
    Example:
      walcrypt export etcd /var/lib/node1 --member-dir /var/lib/etcd-restored/member --key-file /secure/kek
      etcd --data-dir /var/lib/etcd-restored --name node1 ...
    """
    # lazy: start-up time (walcrypt.legacy.etcd: the etcd WAL reader and protobuf schemas)
    from ..legacy.etcd import export_etcd
    kek = kek_from_options(kw)
    Ctx.source = data
    with Spinner("exporting"):
        res = export_etcd(data, member_dir=member_dir, kek=kek)
    if as_json:
        emit_json(res)
        return
    snap = res["snapshot"]
    click.echo(f"exported {data} to {member_dir} (plaintext): "
               + (f"snap file {snap['file']}, " if snap else "")
               + (f"entries {res['first_index']}..{res['last_index']}" if res["entries"] else "no entries")
               + f", hard state term {res['hard_state']['term']} commit {res['hard_state']['commit']}")
    if res["etcd_data_dir"]:
        click.echo(f"start etcd with --data-dir {res['etcd_data_dir']}")
    if res["needs_backend_db"]:
        click.echo("note: etcd also needs its v3 database (member/snap/db) at or after the snapshot's index; it "
                   "is not part of a walcrypt store: copy it from the member the data came from", err=True)
