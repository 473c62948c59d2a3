"""The ``walcrypt`` command.

Exit codes: 0 ok, 1 findings or data errors, 2 usage errors.  Bad input gives one
clear line on stderr, never a traceback (``--debug`` shows one).  Read-only
commands never write to the store.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys

import click

from . import keys as K
from .errors import (KeyProviderError, LockedError, StorageError, UsageError, WalcryptError,
                     WalcryptKeyError)

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


class _Ctx:
    debug = False


def _fail(exc: BaseException, code: int) -> None:
    if _Ctx.debug:
        import traceback
        traceback.print_exception(exc)
    click.echo(f"walcrypt: error: {exc}", err=True)
    sys.exit(code)


def _run(fn, *args, **kwargs):
    """Run a command body, mapping walcrypt errors to one line and an exit code."""
    try:
        return fn(*args, **kwargs)
    except (UsageError, KeyProviderError, LockedError) as exc:
        _fail(exc, EXIT_USAGE)
    except (StorageError, WalcryptKeyError, WalcryptError) as exc:
        _fail(exc, EXIT_FINDINGS)
    except PermissionError as exc:
        _fail(exc, EXIT_USAGE)


def key_options(f):
    f = click.option("--kms", "kms", metavar="NAME", help="KMS plug-in (entry-point group walcrypt.kms).")(f)
    f = click.option("--passphrase-env", metavar="NAME", help="Environment variable holding a passphrase.")(f)
    f = click.option("--key-env", metavar="NAME", help="Environment variable holding the KEK (hex or base64).")(f)
    f = click.option("--key-file", type=click.Path(dir_okay=False), help="File holding the KEK.")(f)
    return f


def kek_from(key_file, key_env, passphrase_env, kms):
    given = [x for x in (key_file, key_env, passphrase_env, kms) if x]
    if len(given) > 1:
        raise UsageError("give only one of --key-file, --key-env, --passphrase-env, --kms")
    if key_file:
        return K.KeyFile(key_file)
    if key_env:
        return K.EnvKey(key_env)
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise KeyProviderError(f"environment variable {passphrase_env} is not set")
        return K.Passphrase(value)
    if kms:
        return K.Kms(kms)
    return None


def _open_existing(directory: str, kek, *, read_only: bool):
    from .storage import Store
    from . import meta as M, layout
    if not os.path.isdir(directory):
        raise UsageError(f"{directory} does not exist")
    if not layout.looks_like_store(directory):
        raise UsageError(f"{directory} is not a walcrypt data directory (no meta/)")
    encrypted = _is_encrypted(directory)
    if encrypted and kek is None:
        raise KeyProviderError(f"{directory} is encrypted: give --key-file, --key-env, --passphrase-env or --kms")
    return Store(directory, kek=kek if encrypted else None, encrypted=encrypted, read_only=read_only)


def _is_encrypted(directory: str) -> bool:
    from . import meta as M, layout
    m = M.Meta(os.path.join(directory, layout.META_DIR), readonly=True)
    try:
        with m.read() as r:
            v = r.raw(M.DB_STORE, M.K_ENCRYPTED)
    finally:
        m.close()
    if v is None:
        raise UsageError(f"{directory} is not an initialised walcrypt store")
    return v == b"\x01"


HELP = """walcrypt - encrypted write-ahead log and snapshot store for Raft.

\b
Exit codes: 0 ok, 1 findings or data errors, 2 usage errors.
Key options (where a key is needed): --key-file F, --key-env NAME,
--passphrase-env NAME, --kms NAME.
"""


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="walcrypt")
def main(debug: bool) -> None:
    _Ctx.debug = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="walcrypt: %(levelname)s: %(message)s")


@main.command()
@click.argument("path", type=click.Path())
def keygen(path: str) -> None:
    """Write a new random 32-byte KEK to PATH (mode 0600; never overwrites)."""
    _run(K.generate_key_file, path)
    click.echo(f"wrote a new key-encryption key to {path} (mode 0600); keep it away from the data directory")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--plaintext", is_flag=True, help="Create a legacy plaintext store (no encryption).")
@click.option("--algorithm", default="aes-256-gcm", show_default=True,
              help="aes-256-gcm, chacha20-poly1305 or aes-256-gcm-siv.")
@key_options
def init(directory, plaintext, algorithm, key_file, key_env, passphrase_env, kms) -> None:
    """Create an empty store in DIRECTORY."""
    def body():
        from .storage import Store
        if os.path.exists(directory) and os.listdir(directory):
            raise UsageError(f"{directory} is not empty")
        kek = kek_from(key_file, key_env, passphrase_env, kms)
        if not plaintext and kek is None:
            raise KeyProviderError("an encrypted store needs a key: --key-file F (create one with 'walcrypt keygen F')")
        Store(directory, kek=None if plaintext else kek, encrypted=not plaintext, algorithm=algorithm).close()
        click.echo(f"created an empty {'plaintext' if plaintext else 'encrypted'} store in {directory}")
    _run(body)


@main.command()
@click.argument("directory", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@key_options
def verify(directory, as_json, key_file, key_env, passphrase_env, kms) -> None:
    """Read and authenticate every record; exit 1 if anything is wrong."""
    from .check import check

    def body():
        if not os.path.isdir(directory):
            raise UsageError(f"{directory} does not exist")
        kek = kek_from(key_file, key_env, passphrase_env, kms)
        encrypted = _is_encrypted(directory)
        if encrypted and kek is None:
            raise KeyProviderError(f"{directory} is encrypted: give --key-file (or another key option)")
        if as_json or not sys.stderr.isatty():
            report = check(directory, kek=kek if encrypted else None, encrypted=encrypted)
        else:
            with click.progressbar(length=1, label="verifying", file=sys.stderr) as bar:
                def progress(done, total):
                    bar.length = max(total, 1)
                    bar.update(done - bar.pos)
                report = check(directory, kek=kek if encrypted else None, encrypted=encrypted, progress=progress)
        return report
    report = _run(body)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "segments": report.segments, "records": report.records,
                               "entries": report.entries, "findings": [f.to_dict() for f in report.findings]},
                              indent=2))
    else:
        click.echo(f"checked {report.segments} segments, {report.records} records, {report.entries} entries")
        for f in report.findings:
            where = f"{f.path}" + (f" at offset {f.offset}" if f.offset is not None else "") if f.path else ""
            click.echo(f"{f.severity.upper()}: {where}: {f.detail}" if where else f"{f.severity.upper()}: {f.detail}")
        click.echo("OK" if report.ok else "FAILED")
    sys.exit(EXIT_OK if report.ok else EXIT_FINDINGS)


@main.command()
@click.argument("directory", type=click.Path())
@click.option("--from", "lo", type=int, default=None, help="First index (default: first retained).")
@click.option("--to", "hi", type=int, default=None, help="Last index, inclusive (default: last).")
@click.option("--json", "as_json", is_flag=True)
@key_options
def dump(directory, lo, hi, as_json, key_file, key_env, passphrase_env, kms) -> None:
    """Print decrypted entries and the hard state."""
    def body():
        kek = kek_from(key_file, key_env, passphrase_env, kms)
        with _open_existing(directory, kek, read_only=True) as s:
            first, last = s.first_index(), s.last_index()
            a = first if lo is None else lo
            b = last if hi is None else hi
            hs, _ = s.initial_state()
            return hs, (s.entries(a, b + 1) if b >= a else [])
    hs, entries = _run(body)

    def show(d: bytes):
        try:
            return {"text": d.decode("utf-8")}
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(d).decode()}
    if as_json:
        click.echo(json.dumps({"hard_state": hs._asdict(),
                               "entries": [{"index": e.index, "term": e.term, **show(e.data)} for e in entries]},
                              indent=2))
    else:
        click.echo(f"hard state: term={hs.term} vote={hs.vote} commit={hs.commit}")
        for e in entries:
            v = show(e.data)
            click.echo(f"{e.index}\t{e.term}\t" + (v["text"] if "text" in v else "base64:" + v["base64"]))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--entries", "n_entries", type=int, default=20000, show_default=True)
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to create the demo store (default: a new temporary directory).")
def demo(as_json, n_entries, workdir) -> None:
    """Write, reopen, verify and tamper with an encrypted store; print what was seen."""
    from .demo import run_demo
    report = _run(run_demo, n_entries=n_entries, workdir=workdir, echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    sys.exit(EXIT_OK if report["ok"] else EXIT_FINDINGS)


if __name__ == "__main__":  # pragma: no cover
    main()
