"""keygen, init, key fingerprint, rotate-dek, rotate-kek."""

from __future__ import annotations

import os

import click

from .. import crypto
from .. import keys as K
from ..errors import (
    KeyProviderError,
    UsageError,
    WrongKeyError,
)
from ..kms import Kms
from ..storage import Store
from .app import command, main
from .errors import EXIT_CODES, Group
from .options import (
    describe_fingerprint,
    kek_from_options,
    kek_summary,
    key_options,
    need_key_error,
    new_kek_from_options,
    new_key_options,
    stored_kek,
)
from .output import emit_json
from .stores import Spinner, open_rw, store_mode, store_root

# ---------------------------------------------------------------------------
# keygen, init
# ---------------------------------------------------------------------------

@command(short_help="New 32-byte KEK file, mode 0600 (never overwrites); prints its fingerprint.")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def keygen(path: str, as_json: bool) -> None:
    """Write a new random 32-byte KEK to PATH (mode 0600; never overwrites).

    Keep the file away from the data directory: walcrypt never stores the KEK
    beside the data it protects.  Prints the key's fingerprint (not secret):
    'walcrypt inspect' and 'walcrypt snapshot inspect' show the fingerprint of
    the key a store or backup needs, so write it down with the backup of the key.

    \b
    Example:
      walcrypt keygen /secure/kek
    """
    if os.path.isdir(os.path.dirname(os.path.abspath(path))) is False:
        raise UsageError(f"the directory of {path} does not exist; create it first")
    K.generate_key_file(path)
    fp = K.fingerprint_of(K.KeyFile(path))
    if as_json:
        emit_json({"path": path, "mode": "0600", "fingerprint": fp})
        return
    click.echo(f"wrote a new key-encryption key to {path} (mode 0600, fingerprint {fp}); keep it away from the "
               "data directory and back it up: without it the data cannot be read")


@main.group(cls=Group, epilog=EXIT_CODES, short_help="Key tools: which key is this (fingerprint)?")
def key() -> None:
    """Key tools that need no store: the fingerprint of a key-encryption key."""


@command(key, name="fingerprint", short_help="Print a KEK's fingerprint; with SOURCE, say if it is SOURCE's key.")
@click.argument("source", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def key_fingerprint(source, as_json, **kw) -> None:
    """Print the fingerprint of the KEK the key options name.

    A fingerprint is 16 hex digits computed from the key's check value
    (FORMAT.md 8.1): not secret, and the same for every store a key file or
    key variable protects.  'walcrypt keygen', 'walcrypt inspect' and 'walcrypt
    snapshot inspect' show it, so an operator can tell which key a store or a
    backup needs without trying keys.  A passphrase's fingerprint depends on the
    scrypt salt of the store it protects: give SOURCE.  A key held by a KMS
    plug-in has no check value and so no fingerprint.

    SOURCE (a data directory, export or snapshot file): also say whether the key
    is the one SOURCE needs; exit 2 if it is not.

    \b
    Examples:
      walcrypt key fingerprint --key-file /secure/kek
      walcrypt key fingerprint --key-file /secure/kek /backup/node1.wcx
      walcrypt key fingerprint --passphrase-env NODE1_PASSPHRASE /var/lib/node1
    """
    kek = kek_from_options(kw)
    if kek is None:
        raise KeyProviderError("give the key: --key-file F (or --key-env, --passphrase-env, --kms)")
    params = check = None
    if source is not None:
        params, check, _what = stored_kek(source)
    elif isinstance(kek, K.Passphrase):
        raise UsageError("a passphrase's fingerprint depends on the scrypt salt of the store it protects: give "
                         "the data directory, export or snapshot file as SOURCE")
    fp = K.fingerprint_of(kek, params)
    out: dict[str, object] = {"key": kek.describe(), "fingerprint": fp}
    need: dict | None = None            # what SOURCE needs, when given
    matches: bool | None = None         # whether the key is SOURCE's (None: cannot tell)
    if source is not None:
        need = kek_summary(params, check)
        if isinstance(kek, Kms):
            matches = (False if need.get("plugin") != kek.name
                       else None if need["fingerprint"] is None or fp is None
                       else need["fingerprint"] == fp)
        else:
            matches = None if need["fingerprint"] is None else need["fingerprint"] == fp
        out.update({"source": source, "source_kek": need, "matches": matches})
        if matches is False:
            raise WrongKeyError(f"the key given ({kek.describe()}, "
                                + (f"fingerprint {fp}" if fp else "a KMS plug-in") + f") is not the KEK {source} "
                                f"needs ({describe_fingerprint(need)})")
    if as_json:
        emit_json(out)
        return
    if fp:
        click.echo(f"{fp}  {kek.describe()}")
    else:
        click.echo(f"none  {kek.describe()}: a KMS-held key has no check value, so no fingerprint (walcrypt "
                   "never sees the key)")
    if need is not None:
        if matches:
            click.echo(f"{source} needs this key ({describe_fingerprint(need)})")
        else:
            click.echo(f"{source}: {describe_fingerprint(need)}; whether the key is the right one "
                       "shows only when it unwraps the data keys (walcrypt verify)")


@command(short_help="Create an empty store.")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--plaintext", is_flag=True, help="Create a legacy plaintext store (no encryption).")
@click.option("--algorithm", default="aes-256-gcm", show_default=True,
              help="aes-256-gcm, chacha20-poly1305 or aes-256-gcm-siv.")
@key_options
def init(directory, plaintext, algorithm, **kw) -> None:
    """Create an empty store in DIRECTORY (new or empty).

    \b
    Examples:
      walcrypt init /var/lib/node1 --key-file /secure/kek
      walcrypt init /var/lib/legacy --plaintext
    """
    kek = kek_from_options(kw)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory):
        raise UsageError(f"{directory} is not empty; choose a new or empty directory")
    if plaintext and kek is not None:
        raise UsageError("a plaintext store takes no key; drop the key option or --plaintext")
    if not plaintext and kek is None:
        raise KeyProviderError("an encrypted store needs a key: --key-file F (create one with 'walcrypt keygen F')")
    if not plaintext:
        crypto.suite_by_name(algorithm)
        if isinstance(kek, K.KeyFile):
            kek.read()                       # a bad key file is refused before anything is created
        if isinstance(kek, Kms):
            kek.new_params()                 # so is a key service that cannot be loaded or reached
    Store(directory, kek=None if plaintext else kek, encrypted=not plaintext, algorithm=algorithm).close()
    click.echo(f"created an empty {'plaintext' if plaintext else 'encrypted (' + algorithm + ')'} store in {directory}")



# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------

@command(name="rotate-dek", short_help="Re-encrypt everything under a new data key (offline re-key).")
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def rotate_dek(directory, as_json, **kw) -> None:
    """Re-encrypt everything under a new data key, offline (full re-key).

    The store must be stopped.  Every retained entry, the hard state, the newest
    snapshot and the stable-store values are rewritten under a new DEK; the old
    DEKs are then destroyed.  A crash midway is redone at the next open.

    \b
    Example:
      walcrypt rotate-dek /var/lib/node1 --key-file /secure/kek
    """
    kek = kek_from_options(kw)
    root = store_root(directory)
    if not store_mode(root, directory):
        raise UsageError(f"{directory} is a plaintext store and has no data keys; encrypt it first with "
                         "'walcrypt migrate DIR --to encrypted --key-file F'")
    store = open_rw(root, directory, kek)
    try:
        before = {k["key_id"]: k["state"] for k in store.key_info()["keys"]}
        with Spinner("re-encrypting"):
            store.rekey()
        after = store.key_info()["keys"]
        active = next(k["key_id"] for k in after if k["state"] == "active")
        entries = max(store.last_index() - store.first_index() + 1, 0)
        snap = store.snapshot()
    finally:
        store.close()
    retired = sorted(k for k in before if k != active)
    out = {"active_key_id": active, "retired_key_ids": retired, "entries": entries,
           "snapshot_index": snap.meta.index if snap else None}
    if as_json:
        emit_json(out)
    else:
        click.echo(f"re-encrypted {entries} entries" + (f" and the snapshot at index {snap.meta.index}" if snap else "")
                   + f" under the new data key {active}")
        if retired:
            click.echo(f"old data key(s) destroyed: {', '.join(retired)}")


@command(name="rotate-kek", short_help="Re-wrap the data keys under a new KEK (offline).")
@click.argument("directory", type=click.Path())
@new_key_options
@key_options
def rotate_kek(directory, **kw) -> None:
    """Re-wrap every data key under a new KEK, offline (no log data is rewritten).

    The store must be stopped.  One atomic metadata commit, which also swaps in
    copies of the retained snapshots with their keys wrapped under the new KEK;
    afterwards only the new KEK opens the store, and no file of the data
    directory holds a key wrapped under the old one.  Snapshot exports made
    earlier still need the old KEK.

    \b
    Example:
      walcrypt keygen /secure/kek2
      walcrypt rotate-kek /var/lib/node1 --key-file /secure/kek --new-key-file /secure/kek2
    """
    new = new_kek_from_options(kw)
    kek = kek_from_options(kw)
    if new is None:
        raise UsageError("give the new KEK with --new-key-file F (create one with 'walcrypt keygen F')")
    root = store_root(directory)
    if not store_mode(root, directory):
        raise UsageError(f"{directory} is a plaintext store and has no KEK")
    if kek is None:
        raise need_key_error(directory)
    if isinstance(new, (K.KeyFile, K.EnvKey)):
        fresh = new.material(None)           # a bad new key is refused before anything changes
        if isinstance(kek, (K.KeyFile, K.EnvKey)) and fresh == kek.material(None):
            raise UsageError("the new KEK is the same as the current one; create a new one with 'walcrypt keygen F'")
    store = open_rw(root, directory, kek)
    try:
        n = sum(1 for k in store.key_info()["keys"] if k["state"] != "destroyed")
        store.rotate_kek(new)
    finally:
        store.close()
    Store(root, kek=new, read_only=True).close()       # the new KEK opens it
    click.echo(f"re-wrapped {n} data key(s) and the metadata key under the new KEK ({new.describe()}); the old KEK "
               "no longer opens this store. Exports made before now still need the old KEK: keep it until they "
               "have expired")
