"""migrate, and the snapshot group: export, inspect, redact, restore."""

from __future__ import annotations

import os
import sys

import click

import walcrypt

from .. import backup, crypto
from .. import format as fmt
from .. import keys as K
from ..errors import (
    KeyProviderError,
    LockedError,
    SymlinkError,
    UsageError,
)
from ..migrate import remove_source as remove_migration_source
from ..storedir import lock_holders, locked_message
from .app import command, main
from .context import Ctx
from .errors import EXIT_CODES, EXIT_FINDINGS, Group
from .options import (
    describe_fingerprint,
    kek_from_options,
    kek_summary,
    key_options,
    need_key_error,
    new_kek_from_options,
    new_key_options,
    read_magic,
    stored_kek,
)
from .output import emit_json, format_table, human_size
from .stores import (
    Bar,
    Spinner,
    preflight,
    refuse_key_for_plaintext,
    require_writable,
    store_mode,
    store_root,
)

# ---------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------

@command(short_help="Migrate between encrypted and legacy plaintext (offline).")
@click.argument("directory", type=click.Path())
@click.option("--to", "target", type=click.Choice(["encrypted", "plaintext"]), required=True,
              help="The mode to migrate the store to.")
@click.option("--yes", is_flag=True, help="Confirm turning encryption off (required for --to plaintext).")
@click.option("--remove-source", is_flag=True,
              help="After success, remove the directories of the old mode (no downgrade afterwards).")
@click.option("--algorithm", default="aes-256-gcm", show_default=True, help="Cipher for --to encrypted.")
@key_options
def migrate(directory, target, yes, remove_source, algorithm, **kw) -> None:
    """Migrate a stopped store between encrypted and legacy plaintext.

    Rewrites every retained entry, the hard state and the newest snapshot into
    the other directory pair, then switches in one atomic metadata commit; an
    interrupted migration is undone at the next open and can simply be run
    again.  The old directories are kept (downgrade stays possible) unless
    --remove-source is given.  Turning encryption off needs --yes.

    \b
    Examples:
      walcrypt migrate /var/lib/legacy --to encrypted --key-file /secure/kek --remove-source
      walcrypt migrate /var/lib/node1 --to plaintext --key-file /secure/kek --yes
    """
    kek = kek_from_options(kw)
    root = store_root(directory)
    have = store_mode(root, directory)
    want = target == "encrypted"
    if have == want:
        click.echo(f"{directory} is already {target}; nothing to migrate")
    else:
        if not want and not yes:
            raise UsageError("turning encryption off writes every record to disk in clear; add --yes to confirm")
        if kek is None:
            raise (need_key_error(directory) if have else
                   KeyProviderError("migrating to encrypted needs a key: --key-file F (create one with "
                                    "'walcrypt keygen F')"))
        if want:
            crypto.suite_by_name(algorithm)
            if isinstance(kek, (K.KeyFile, K.EnvKey)):
                kek.material(None)
        holders = lock_holders(root)
        if holders:
            raise LockedError(locked_message(directory, holders))
        require_writable(root, directory)
        preflight(root, kek if have else None, have)
        with Bar(f"migrating to {target}") as bar:
            def progress(stage, done, total):
                bar.stage(f"migrating to {target}: {stage}")
                bar(done, total)
            walcrypt.open(root, kek=kek, encrypted=want, migrate=True, migration_progress=progress,
                          algorithm=algorithm).close()
        click.echo(f"migrated {directory} to {target}"
                   + ("" if remove_source else "; the old directories are kept (remove them with --remove-source)"))
    if remove_source:
        removed = remove_migration_source(root)
        click.echo("removed " + ", ".join(os.path.basename(p) + "/" for p in removed) if removed
                   else "no directories of the other mode to remove")
        _remove_imported_sources(root, directory, kek)


def _remove_imported_sources(root: str, directory: str, kek) -> None:
    """migrate --remove-source on a store imported from pysyncobj files: delete those files, each only
    while it is byte-identical to what was imported (the record is sealed: it needs the key)."""
    # lazy: start-up time (walcrypt.legacy.pysyncobj_files: the journal and pickle/gzip dump parsers)
    from ..legacy import pysyncobj_files as legacy
    if not legacy.has_recorded_sources(root):
        return
    if kek is None:
        raise KeyProviderError(f"{directory} records the pysyncobj files it was imported from; give its key "
                               "(--key-file F, --key-env, --passphrase-env or --kms) so they can be checked "
                               "before they are removed")
    res = legacy.remove_sources(root, kek)
    for p in res["removed"]:
        click.echo(f"removed the imported pysyncobj file {p}")
    kept = [k for k in res["kept"] if k["reason"] != "already gone"]
    for k in res["kept"]:
        if k not in kept:
            click.echo(f"already removed: {k['path']}")
    for k in kept:
        click.echo(f"kept {k['path']}: {k['reason']}", err=True)
    if kept:
        sys.exit(EXIT_FINDINGS)


# ---------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------

@main.group(cls=Group, epilog=EXIT_CODES, short_help="Backups: export, inspect, redact, restore.")
def snapshot() -> None:
    """Backups: export, inspect, redact and restore snapshot files."""


@command(snapshot, name="export", short_help="Export the newest snapshot with its wrapped keys.")
@click.argument("directory", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--embed-kek", is_flag=True,
              help="Embed the KEK in the export (the file alone then decrypts everything; redact it later).")
@key_options
def snapshot_export(directory, out, embed_kek, **kw) -> None:
    """Write the newest snapshot and its wrapped keys to one file OUT (0600).

    The export plus the KEK restores a node.  Read-only on the store; takes no
    lock, so it works while the node runs (the snapshot is authenticated end to
    end and copied from one open file, whatever the node saves or deletes meanwhile).

    \b
    Example:
      walcrypt snapshot export /var/lib/node1 /backup/node1.wcx --key-file /secure/kek
    """
    kek = kek_from_options(kw)
    root = store_root(directory)
    out_abs = os.path.abspath(out)
    backup.refuse_existing(out)         # never overwritten, never written through a link
    if not os.path.isdir(os.path.dirname(out_abs)):
        raise UsageError(f"the directory of {out} does not exist")
    if out_abs.startswith(root + os.sep):
        raise UsageError(f"{out} lies inside the data directory; write exports somewhere else")
    encrypted = store_mode(root, directory)
    if encrypted and kek is None:
        raise need_key_error(directory)
    refuse_key_for_plaintext(directory, encrypted, kek)
    with Spinner("exporting"):
        info = backup.export_store(root, out_abs, kek=kek if encrypted else None, encrypted=encrypted,
                                   embed_kek=embed_kek)
    click.echo(f"exported the snapshot at index {info['index']} term {info['term']} to {out} "
               f"({human_size(info['size'])}, mode 0600)")
    if info["kek_embedded"]:
        click.echo(f"WARNING: {out} embeds the KEK: anyone who can read it can decrypt everything in it. "
                   f"Run 'walcrypt snapshot redact {out} --kek-out F' before storing or sending it", err=True)






def _inspect_snapshot_file(path: str, kek, plaintext: bool = False) -> dict:
    magic = read_magic(path)
    if magic == backup.EXPORT_MAGIC:
        info = backup.inspect_export(path, kek, plaintext=plaintext)
        info["kind"] = "export"
        params, check, _what = stored_kek(path)
        info["kek"] = None if info["plaintext"] else kek_summary(params, check)
        return info
    if magic != fmt.SNAPSHOT_MAGIC:
        raise UsageError(f"{path} is not a walcrypt snapshot export or snapshot file")
    shim = backup.SnapshotSource(path)
    sf = shim.snapshot_file()
    h = sf.header
    bundle = sf.bundle_doc()
    info = {"path": path, "kind": "snapshot", "format_version": fmt.FORMAT_VERSION, "kek_embedded": False,
            "store_id": h.store_id.hex(), "index": h.index, "term": h.term, "algorithm": crypto.suite(h.algorithm).name,
            "key_id": h.key_id.hex(), "snapshot_bytes": os.path.getsize(path),
            "keys": [{"key_id": k["id"], "state": K.STATE_NAMES.get(k["state"], "?")} for k in bundle.get("keys", [])],
            "warnings": [], "verified": False, "plaintext": h.algorithm == fmt.ALG_NONE}
    info["kek"] = None if info["plaintext"] else kek_summary(
        bundle.get("kek_params"), bytes.fromhex(bundle["kek_check"]) if bundle.get("kek_check") else None)
    if info["plaintext"] and kek is not None:
        backup.refuse_plaintext(path, plaintext, "a KEK was given, so an encrypted snapshot was expected")
    if kek is not None or (info["plaintext"] and plaintext):
        unlocked = backup.unlock_export(shim, kek, plaintext=plaintext)
        assert unlocked.meta is not None        # unlock_export unlocked it: unlock() decoded its metadata
        info["conf_state"] = {"voters": list(unlocked.meta.conf_state.voters),
                              "learners": list(unlocked.meta.conf_state.learners)}
        info["data_bytes"] = unlocked.verify()
        info["verified"] = True
    return info


@command(snapshot, name="inspect", short_help="Show an export or snapshot file; warn on an embedded KEK.")
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plaintext", is_flag=True,
              help="A plaintext (unencrypted) export is expected: check it for damage.")
@key_options
def snapshot_inspect(file, as_json, plaintext, **kw) -> None:
    """Show an export (or a snapshot file): index, term, keys, whether a KEK is embedded.

    Without a key: metadata only.  With the KEK (or an embedded one) every chunk
    is authenticated.  Warns loudly when a KEK is embedded.  Read-only.

    \b
    Example:
      walcrypt snapshot inspect /backup/node1.wcx --key-file /secure/kek
    """
    kek = kek_from_options(kw)
    if not os.path.exists(file):
        raise UsageError(f"{file} does not exist")
    Ctx.source = file
    info = _inspect_snapshot_file(file, kek, plaintext)
    for w in info["warnings"]:
        click.echo(f"WARNING: {w}", err=True)
    if as_json:
        emit_json(info)
        return
    click.echo(f"file           {info['path']} ({info['kind']}, {human_size(info['snapshot_bytes'])} snapshot)")
    click.echo(f"snapshot       index {info['index']} term {info['term']}, {info['algorithm']}, "
               f"data key {info['key_id']}")
    click.echo(f"store ID       {info['store_id']}")
    if info.get("kek"):
        click.echo(f"KEK needed     {info['kek']['kind']}, {describe_fingerprint(info['kek'])}")
    click.echo(f"KEK embedded   {'YES - see the warning' if info['kek_embedded'] else 'no'}")
    if info["verified"] and info.get("plaintext"):
        click.echo(f"authenticated  NO: a plaintext export (algorithm NONE) cannot be authenticated; "
                   f"{human_size(info['data_bytes'])} of data checked for damage only")
    elif info.get("plaintext"):
        click.echo("authenticated  NO: a plaintext export (algorithm NONE); pass --plaintext to check it for damage")
    elif info["verified"]:
        cs = info.get("conf_state", {})
        click.echo(f"authenticated  yes: {human_size(info['data_bytes'])} of data, every chunk verified; "
                   f"voters={cs.get('voters')} learners={cs.get('learners')}")
    else:
        click.echo("authenticated  no (give the KEK to verify every chunk)")
    if info["keys"]:
        click.echo("wrapped keys carried (IDs and states only)")
        click.echo(format_table(["KEY ID", "STATE"], [[k["key_id"], k["state"]] for k in info["keys"]]))


@command(snapshot, name="redact", short_help="Remove an embedded KEK from an export (--kek-out keeps a copy).")
@click.argument("file", type=click.Path())
@click.option("--kek-out", type=click.Path(),
              help="Save the embedded KEK to this new file (0600) before removing it; without it the embedded "
                   "KEK is discarded.")
def snapshot_redact(file, kek_out) -> None:
    """Remove an embedded KEK from an export, in place.

    With --kek-out the KEK is saved to a new file first; without it the embedded
    KEK is discarded, and the export then needs the KEK it was made under (the
    output names its fingerprint).

    \b
    Example:
      walcrypt snapshot redact /backup/node1.wcx --kek-out /secure/kek-from-backup
    """
    if os.path.islink(file):             # redacting through a link would leave the KEK in its target
        raise SymlinkError(file, f"{file} is a symbolic link; redacting it would replace the link and leave the "
                                 f"KEK in the file it points to: redact {os.path.realpath(file)} itself")
    if not os.path.exists(file):
        raise UsageError(f"{file} does not exist")
    if kek_out and os.path.islink(kek_out):
        raise SymlinkError(kek_out, f"{kek_out} is a symbolic link; walcrypt does not write a key through a link; "
                                    "remove it or choose another path")
    if kek_out and os.path.exists(kek_out):
        raise UsageError(f"{kek_out} already exists; refusing to overwrite it")
    if kek_out and not os.path.isdir(os.path.dirname(os.path.abspath(kek_out))):
        raise UsageError(f"the directory of {kek_out} does not exist")
    if read_magic(file) != backup.EXPORT_MAGIC:
        raise UsageError(f"{file} is not a walcrypt snapshot export")
    params, check, _what = stored_kek(file)
    need = describe_fingerprint(kek_summary(params, check))
    res = backup.redact_export(file, kek_out=kek_out)
    if not res["redacted"]:
        click.echo(f"{file} embeds no KEK; nothing to redact")
        if kek_out:
            click.echo(f"(nothing was written to {kek_out})")
        return
    if kek_out:
        click.echo(f"removed the embedded KEK from {file}; saved it to {kek_out} (mode 0600, {need})")
    else:
        click.echo(f"removed the embedded KEK from {file} and discarded it (no --kek-out was given): the export "
                   f"now restores only with the KEK it was made under ({need})")


@command(snapshot, name="restore", short_help="Restore an export or .snap file into a new data directory.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--plaintext", is_flag=True,
              help="The source is a plaintext one made on purpose: restore it although nothing in it is "
                   "authenticated (as a plaintext store, or encrypted under --new-key-file).")
@new_key_options
@key_options
def snapshot_restore(file, directory, plaintext, **kw) -> None:
    """Restore an export (or a raw .snap file from a data directory) into a new
    or empty data directory.

    The snapshot is authenticated end to end first (with --key-file: the KEK of
    the export, or of the store the .snap file came from), then re-encrypted into
    a new store with its own store ID and data key, wrapped by the same KEK - or,
    with --new-key-file, by the target node's own KEK, in one step.  A plaintext
    export is restored only with --plaintext.  On any failure the new directory
    is removed again.

    \b
    Examples:
      walcrypt snapshot restore /backup/node1.wcx /var/lib/node1.new --key-file /secure/kek
      walcrypt snapshot restore /backup/node1.wcx /var/lib/node3 --key-file /secure/node1.kek \\
          --new-key-file /secure/node3.kek
      walcrypt snapshot restore /var/lib/node1/snap-v1-encrypted/FILE.snap /var/lib/node1.new --key-file /secure/kek
    """
    new = new_kek_from_options(kw)
    kek = kek_from_options(kw)
    if not os.path.exists(file):
        raise UsageError(f"{file} does not exist")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory):
        raise UsageError(f"{directory} is not empty; restore only into a new or empty directory")
    if isinstance(new, (K.KeyFile, K.EnvKey)):
        new.material(None)                   # a bad new key is refused before anything is created
    Ctx.source = file
    with Spinner("verifying the snapshot"):
        info = _inspect_snapshot_file(file, kek, plaintext)
    if info["plaintext"]:
        backup.refuse_plaintext(file, plaintext, "it is restored only when asked for explicitly")
    if not info["verified"]:
        raise KeyProviderError(f"{file} is encrypted and embeds no KEK: give the KEK it was "
                               + ("exported under" if info["kind"] == "export" else "written under (its store's)"))
    with Spinner("restoring"):                 # built aside and renamed into place (backup.restore_export)
        res = backup.restore_export(file, directory, kek=kek, plaintext=plaintext, new_kek=new)
    under = ("a plaintext store" if not res["encrypted"] else
             f"encrypted under the new KEK ({new.describe()})" if new is not None else "encrypted under the same KEK")
    click.echo(f"restored the snapshot at index {res['index']} term {res['term']} ({res['data_bytes']} bytes) "
               f"into {directory}, {under}; start the node on it and Raft will catch it up from the leader")
    if kek is None and new is None and info["kek_embedded"]:
        click.echo(f"note: the new store is encrypted under the KEK embedded in {file}; save it with "
                   f"'walcrypt snapshot redact {file} --kek-out F' to open the store later", err=True)
