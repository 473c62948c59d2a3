"""The ``walcrypt`` command: the operator's view of a store.

Exit codes: 0 ok, 1 findings or data errors, 2 usage errors (bad options, a missing or
wrong key, a missing directory, no permission, a store locked by a running process).
Bad input gives one line on stderr saying what is wrong and what to do, never a
traceback (``walcrypt --debug ...`` shows one), and modifies nothing.  Read-only
commands (inspect, verify, dump, snapshot inspect, snapshot export) never write to the
store (beyond their reader slot in LMDB's ``meta/lock.mdb``).  inspect, verify and
snapshot export take no lock and work on a store whose writer is running (see
``walcrypt.online``); dump holds a shared lock on ``DATA/LOCK`` while it reads, so it
refuses a store a running process has open and keeps one from opening it meanwhile.
Progress goes to stderr when it is a terminal (``--progress`` / ``--no-progress``
override).

Damage (a data directory with its metadata missing or damaged included) is exit 1;
only a directory holding no walcrypt files is "not a walcrypt data directory".  With
``--json`` an error is also a JSON object on stdout, ``{"error": {"kind", "type",
"message", "hint", "path", "exit_code"}}`` (kinds: ``ERROR_KINDS``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time

import click

from . import keys as K
from .errors import (
    CompactedError,
    KeyProviderError,
    KeyProviderUnavailableError,
    LockedError,
    SymlinkError,
    UnavailableError,
    UsageError,
    WalcryptError,
    WrongKeyError,
)
from .kms import Kms, Retry

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

EXIT_CODES = """\b
Exit codes:
  0  ok
  1  findings or data errors (damaged, tampered or inconsistent data)
  2  usage errors (bad options, missing or wrong key, missing directory,
     no permission, store locked by a running process)
  3  the key service (KMS) could not be reached: nothing was changed, retry"""


class _Ctx:
    debug = False
    progress: bool | None = None      # None: when stderr is a terminal
    json = False                      # --json given: errors are also a JSON object on stdout
    json_stream_open = False          # a --json document is being streamed (dump): close it around the error
    kek = None                        # the KEK the key options named (to explain a wrong key)
    source: str | None = None         # the store, export or snapshot file the command works on


class _NoWrite(UsageError):
    """A read-write command on a store it cannot write (permissions, a read-only mount): exit 2."""


# ---------------------------------------------------------------------------
# Errors: one line, an exit code, no traceback (and a JSON object with --json)
# ---------------------------------------------------------------------------

ERROR_KINDS = {
    # kind: what it means (README "Command line" lists them; exit code in brackets)
    "usage": "bad options or arguments, a missing file or directory, an index out of range [2]",
    "key": "a missing, unreadable or wrong key [2]",
    "locked": "a running process holds the store [2]",
    "permission": "no permission, or a read-only file system [2]",
    "damaged": "damaged, tampered or inconsistent data or metadata [1]",
    "unsupported": "a format version or algorithm this walcrypt does not know [1]",
    "unsafe-file": "a link, FIFO, device or hard link where walcrypt expects a file of its own [1]",
    "failed": "an earlier write failed; reopen the store [1]",
    "storage": "a file-system error (disk full, I/O error) [1]",
    "internal": "a bug: run with --debug and report it [1]",
    "interrupted": "interrupted (Ctrl-C) [130]",
}


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _no_permission(exc: BaseException) -> bool:
    """A permission problem, here or as the cause of a StorageError (EACCES, EPERM, EROFS, LMDB's ReadonlyError)."""
    import errno

    import lmdb
    for e in _causes(exc):
        if isinstance(e, (PermissionError, lmdb.ReadonlyError, _NoWrite)):
            return True
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return True
    return False


def _kind(exc: BaseException) -> str:
    from .errors import (
        AuthenticationError,
        CorruptionError,
        KeyNotFoundError,
        StorageError,
        StoreFailedError,
        UnsafeFileError,
        UnsupportedFormatError,
    )
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if _no_permission(exc):
        return "permission"
    if isinstance(exc, (click.ClickException, UsageError, CompactedError, UnavailableError, FileExistsError,
                        FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return "usage"
    if isinstance(exc, KeyProviderUnavailableError):
        return "unavailable"
    if isinstance(exc, (KeyProviderError, WrongKeyError)):
        return "key"
    if isinstance(exc, LockedError):
        return "locked"
    if isinstance(exc, (SymlinkError, UnsafeFileError)):
        return "unsafe-file"
    if isinstance(exc, UnsupportedFormatError):
        return "unsupported"
    if isinstance(exc, (CorruptionError, AuthenticationError, KeyNotFoundError)):
        return "damaged"
    if isinstance(exc, StoreFailedError):
        return "failed"
    if isinstance(exc, (StorageError, OSError)):
        return "storage"
    return "internal"


def _exit_code(exc: BaseException) -> int:
    kind = _kind(exc)
    if kind == "interrupted":
        return 130
    if kind == "unavailable":
        return EXIT_UNAVAILABLE
    return EXIT_USAGE if kind in ("usage", "key", "locked", "permission") else EXIT_FINDINGS


def _message(exc: BaseException) -> str:
    if isinstance(exc, click.ClickException):
        return " ".join(exc.format_message().split())
    if isinstance(exc, PermissionError):
        return f"no permission to access {exc.filename or 'a file'}; run as the user that owns the store"
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or 'a file'} does not exist"
    if isinstance(exc, FileExistsError):
        return f"{exc.filename or 'a file'} already exists; refusing to overwrite it"
    if isinstance(exc, OSError):
        from .errors import os_error_advice
        return (f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''} "
                f"({os_error_advice(exc)})")
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, WalcryptError):
        return " ".join(str(exc).split())
    return (f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())}); nothing more was done. "
            "Run 'walcrypt --debug ...' for a traceback and report it")


def _which_key(exc: BaseException) -> str:
    """For a wrong key: the fingerprint the store (or file) needs and the one of the key given."""
    if not isinstance(exc, WrongKeyError) or _Ctx.kek is None or not _Ctx.source:
        return ""
    try:
        params, check, _where = stored_kek(_Ctx.source)
        need = K.params_fingerprint(params, check)
        have = K.fingerprint_of(_Ctx.kek, params)
    except Exception:                   # noqa: BLE001 - an explanation must never hide the error itself
        return ""
    if not need or not have or need == have:
        return ""
    return f"; {_Ctx.source} needs the KEK with fingerprint {need}, the key given has fingerprint {have}"


def _error_doc(exc: BaseException, code: int, which_key: str = "") -> dict:
    """The JSON error object (README, "Command line"): kind, type, message, hint, path, exit_code."""
    from .errors import CorruptionError
    hint = None
    if isinstance(exc, CorruptionError) and exc.hint:
        where = f"{exc.path}{' at offset ' + str(exc.offset) if exc.offset is not None else ''}: " \
            if exc.path is not None else ""
        message = " ".join((where + exc.detail).split())
        hint = " ".join(exc.hint.split())
    else:
        message = _message(exc)
    message += which_key
    if isinstance(exc, WrongKeyError):
        hint = "check --key-file / --key-env / --passphrase-env / --kms; 'walcrypt key fingerprint' names a key"
    path = getattr(exc, "path", None) or getattr(exc, "filename", None)
    return {"error": {"kind": _kind(exc), "type": type(exc).__name__, "message": message, "hint": hint,
                      "path": None if path is None else str(path), "exit_code": code}}


def _fail(exc: BaseException, code: int | None = None) -> None:
    if _Ctx.debug:
        import traceback
        traceback.print_exception(exc)
    code = _exit_code(exc) if code is None else code
    if isinstance(exc, WrongKeyError):
        hint = " (check --key-file / --key-env / --passphrase-env / --kms)"
    else:
        hint = ""
    which_key = _which_key(exc)
    if _Ctx.json:
        doc = _error_doc(exc, code, which_key)
        if _Ctx.json_stream_open:        # close the streamed document: the error becomes its "error" member
            _Ctx.json_stream_open = False
            body = json.dumps(doc["error"], indent=2).replace("\n", "\n  ")
            click.echo(f'\n  ],\n  "error": {body}\n}}')
        else:
            click.echo(json.dumps(doc, indent=2))
    click.echo(f"walcrypt: error: {_message(exc)}{which_key}{hint}", err=True)
    sys.exit(code)


def _json_requested(argv) -> bool:
    """--json among the arguments (before a bare '--', after which arguments belong to someone else)."""
    for a in argv:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


class _Group(click.Group):
    """Maps every exception a command raises to one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise                             # click reports these (the root group, with --json)
        except BrokenPipeError:               # `walcrypt dump ... | head`: the reader has had enough
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())    # so that the final flush at exit cannot fail again
            sys.exit(EXIT_OK)
        except KeyboardInterrupt as exc:
            if _Ctx.json:
                _fail(exc)
            click.echo("walcrypt: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:              # noqa: BLE001 - the one place that turns errors into exit codes
            _fail(exc)


class _Root(_Group):
    """The top-level group: with --json, click's own usage errors become the JSON error object too."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        _Ctx.json = _json_requested(argv)
        if not _Ctx.json or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail(KeyboardInterrupt())
        except click.ClickException as exc:
            _fail(exc, exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------

def key_options(f):
    f = click.option("--kms-retry-delay", "kms_retry_delay", type=click.FloatRange(0, 3600), default=None,
                     metavar="SECONDS", help="First wait before a KMS call is repeated (doubling, at most 5 s; "
                                             "default 0.2).")(f)
    f = click.option("--kms-retries", "kms_retries", type=click.IntRange(1, 100), default=None, metavar="N",
                     help="Calls made to an unreachable KMS before giving up (default 5).")(f)
    f = click.option("--kms-option", "kms_options", multiple=True, metavar="KEY=VALUE",
                     help="Option for the KMS plug-in (repeatable); see 'Key services' in the README.")(f)
    f = click.option("--kms", "kms", metavar="NAME",
                     help="KEK held by a key service: vault-transit, pkcs11, kmip (or an installed plug-in).")(f)
    f = click.option("--passphrase-env", metavar="NAME", help="Environment variable holding a passphrase (scrypt).")(f)
    f = click.option("--key-env", metavar="NAME", help="Environment variable holding the KEK (hex or base64).")(f)
    f = click.option("--key-file", type=click.Path(dir_okay=False), envvar="WALCRYPT_KEY_FILE", show_envvar=True,
                     help="File holding the KEK (mode 0600; 'walcrypt keygen' makes one).")(f)
    return f


def new_key_options(f):
    """The target KEK of a command that re-wraps or restores under another key (--new-...)."""
    f = click.option("--new-kms-option", "new_kms_options", multiple=True, metavar="KEY=VALUE",
                     help="Option for the new KEK's KMS plug-in (repeatable).")(f)
    f = click.option("--new-kms", metavar="NAME", help="Key service holding the new KEK (as --kms).")(f)
    f = click.option("--new-passphrase-env", metavar="NAME", help="Environment variable holding the new passphrase.")(f)
    f = click.option("--new-key-env", metavar="NAME", help="Environment variable holding the new KEK.")(f)
    f = click.option("--new-key-file", type=click.Path(dir_okay=False), help="File holding the new KEK.")(f)
    return f


def _kms_options(pairs, flag: str = "--kms-option") -> dict:
    out = {}
    for p in pairs or ():
        if "=" not in p or not p.split("=", 1)[0]:
            # not echoed: a mistyped option may well be a token or a PIN
            raise UsageError(f"{flag} takes KEY=VALUE; one value given has no '=' before its value (not shown, "
                             "in case it holds a secret)")
        k, v = p.split("=", 1)
        if k in out:
            raise UsageError(f"{flag} {k}=... is given twice")
        if k == "retry":
            raise UsageError(f"{flag} retry=... is not a plug-in option; use --kms-retries and --kms-retry-delay")
        out[k] = v
    return out


def kek_from(key_file, key_env, passphrase_env, kms, kms_options=(), *, prefix: str = "--", retry=None):
    """The KEK provider the options name, or None."""
    given = [x for x in (key_file, key_env, passphrase_env, kms) if x]
    if len(given) > 1:
        raise UsageError(f"give only one of {prefix}key-file, {prefix}key-env, {prefix}passphrase-env, {prefix}kms")
    if kms_options and not kms:
        raise UsageError(f"{prefix}kms-option needs {prefix}kms NAME")
    if key_file:
        return K.KeyFile(key_file)
    if key_env:
        if not os.environ.get(key_env):
            raise KeyProviderError(f"environment variable {key_env} is not set (it should hold the KEK)")
        return K.EnvKey(key_env)
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise KeyProviderError(f"environment variable {passphrase_env} is not set (it should hold the passphrase)")
        return K.Passphrase(value)
    if kms:
        return Kms(kms, retry=retry, **_kms_options(kms_options, f"{prefix}kms-option"))
    return None


def _retry(kw) -> Retry | None:
    attempts, delay = kw.pop("kms_retries", None), kw.pop("kms_retry_delay", None)
    if attempts is None and delay is None:
        return None
    base = Retry()
    return Retry(attempts=base.attempts if attempts is None else attempts,
                 delay=base.delay if delay is None else delay, max_delay=base.max_delay)


def _new_kek(kw) -> K.KeyEncryptionKey | None:
    """The KEK named by --new-... (the retries of --kms-retries apply to it too); pop before _kek(kw)."""
    retry = _retry({"kms_retries": kw.get("kms_retries"), "kms_retry_delay": kw.get("kms_retry_delay")})
    return kek_from(kw.pop("new_key_file"), kw.pop("new_key_env"), kw.pop("new_passphrase_env"), kw.pop("new_kms"),
                    kw.pop("new_kms_options"), prefix="--new-", retry=retry)


def _kek(kw) -> K.KeyEncryptionKey | None:
    retry = _retry(kw)
    kek = kek_from(kw.pop("key_file"), kw.pop("key_env"), kw.pop("passphrase_env"), kw.pop("kms"),
                   kw.pop("kms_options"), retry=retry)
    _Ctx.kek = kek
    return kek


def stored_kek(source: str) -> tuple[dict | None, bytes | None, str]:
    """(KEK parameters, check value, what) stored in a data directory, an export or a snapshot file, read
    without any key (neither is secret; neither is authenticated: they are what open checks a key against)."""
    from . import backup
    from . import format as fmt
    from . import meta as M
    if os.path.isdir(source):
        from .inspection import open_meta, require_store, store_record
        root = require_store(source)
        meta = open_meta(root, source)
        try:
            with meta.read() as r:
                _sid, encrypted = store_record(r, root, source)
                raw_params = r.raw(M.DB_STORE, M.K_KEK_PARAMS)
                check = r.raw(M.DB_STORE, M.K_KEK_CHECK)
        finally:
            meta.close()
        if not encrypted:
            raise UsageError(f"{source} is a plaintext store: it has no KEK")
        return K.parse_kek_params(raw_params, meta.path), check, "store"
    if not os.path.exists(source):
        raise UsageError(f"{source} does not exist")
    magic = _read_magic(source)
    if magic == backup.EXPORT_MAGIC:
        ex = backup.ExportFile(source)
        doc = ex.bundle_doc() or ex.snapshot_file().bundle_doc()
        what = "export"
    elif magic == fmt.SNAPSHOT_MAGIC:
        doc = _SnapOnly(source).snapshot_file().bundle_doc()
        what = "snapshot"
    else:
        raise UsageError(f"{source} is not a walcrypt data directory, snapshot export or snapshot file")
    check = bytes.fromhex(doc["kek_check"]) if doc.get("kek_check") else None
    return doc.get("kek_params"), check, what


def kek_summary(params: dict | None, check: bytes | None) -> dict:
    """What names the KEK a store or file needs: its kind, its fingerprint (None for a KMS-held key, which
    has no check value: the plug-in name is what identifies it)."""
    out: dict = {"kind": (params or {}).get("kind"), "fingerprint": K.params_fingerprint(params, check)}
    if out["kind"] == "kms":
        out["plugin"] = params.get("plugin")
    return out


def describe_fingerprint(summary: dict) -> str:
    if summary.get("fingerprint"):
        return f"fingerprint {summary['fingerprint']}"
    if summary.get("kind") == "kms":
        return (f"fingerprint none (a KMS-held key has no check value; KMS plug-in {summary.get('plugin')!r} "
                "holds it)")
    return "fingerprint none (no check value stored)"


def _need_key(directory: str) -> KeyProviderError:
    return KeyProviderError(f"{directory} is encrypted: give its key with --key-file F (or --key-env, "
                            "--passphrase-env, --kms)")


# ---------------------------------------------------------------------------
# Opening stores
# ---------------------------------------------------------------------------

def _mode(root: str, directory: str) -> bool:
    from .inspection import read_mode
    return read_mode(root, directory)


def _refuse_key_for_plaintext(directory: str, encrypted: bool, kek) -> None:
    """A key given for a store whose metadata says plaintext: the operator expects an encrypted
    store, and plaintext metadata can be planted by anyone who can write the directory."""
    if kek is not None and not encrypted:
        raise UsageError(
            f"{directory} holds a plaintext store, but a key was given: nothing in it is authenticated by a key. "
            "If this store was encrypted, its metadata was replaced and must not be trusted; if it is a "
            "plaintext store, run the command without a key")


def _open_ro(root: str, directory: str, kek):
    from .storage import Store
    encrypted = _mode(root, directory)
    if encrypted and kek is None:
        raise _need_key(directory)
    _refuse_key_for_plaintext(directory, encrypted, kek)
    return Store(root, kek=kek if encrypted else None, encrypted=encrypted, read_only=True)


def _open_rw(root: str, directory: str, kek):
    from .inspection import lock_holders, locked_message
    from .storage import Store
    encrypted = _mode(root, directory)
    holders = lock_holders(root)
    if holders:
        raise LockedError(locked_message(directory, holders))
    if encrypted and kek is None:
        raise _need_key(directory)
    _refuse_key_for_plaintext(directory, encrypted, kek)
    _require_writable(root, directory)
    _preflight(root, kek if encrypted else None, encrypted)
    store = Store(root, kek=kek if encrypted else None, encrypted=encrypted)
    for rep in store.repairs:
        click.echo(f"walcrypt: note: opening the store repaired {rep['path']}: {rep['detail']}"
                   + (f" (copy kept in {rep['broken_copy']})" if rep.get("broken_copy") else ""), err=True)
    return store


def _preflight(root: str, kek, encrypted: bool) -> None:
    """Open read-only first: a wrong key, damage, a torn tail or an unregistered snapshot file the
    read-write open would refuse is refused before a read-write open touches anything (even LMDB's
    lock file).  A torn tail is 'walcrypt repair''s job, not a side effect of a key operation."""
    from .storage import Store
    store = Store(root, kek=kek, encrypted=encrypted, read_only=True)
    try:
        refusal = store.snapshots.refusal()      # what only a read-write open looks at
    finally:
        store.close()
    if refusal is not None:
        raise refusal


def _store_dir(directory: str) -> str:
    from .inspection import require_store
    root = require_store(directory)
    _Ctx.source = directory
    return root


def _require_writable(root: str, directory: str) -> None:
    """Before a read-write command: every file and directory it may write is writable, or exit 2 saying
    why (a read-only mount, or permissions) - not a half-done operation and a misleading error later."""
    from . import layout
    meta = os.path.join(root, layout.META_DIR)
    paths = [root, meta] + [os.path.join(meta, n) for n in sorted(os.listdir(meta))]
    paths += [os.path.join(root, d) for d in (layout.WAL_ENCRYPTED, layout.SNAP_ENCRYPTED, layout.WAL_PLAIN,
                                              layout.SNAP_PLAIN, layout.LOCK_NAME)
              if os.path.exists(os.path.join(root, d))]
    for p in paths:
        if os.access(p, os.W_OK):
            continue
        try:
            read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            raise _NoWrite(f"{directory} lies on a file system mounted read-only ({p} cannot be written); remount "
                           "it read-write to run this. Read-only commands (inspect, verify, dump, snapshot "
                           "export) work as it is")
        raise _NoWrite(f"no permission to write {p}; run as the user that owns the store")


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------

def _progress_on() -> bool:
    if _Ctx.progress is not None:
        return _Ctx.progress
    return sys.stderr.isatty()


class _Bar:
    """A click progress bar on stderr driven by (done, total) callbacks; silent when progress is off."""

    def __init__(self, label: str, *, unit: str = "bytes"):
        self.label = label
        self.unit = unit
        self.bar = None

    def __enter__(self) -> "_Bar":
        if _progress_on():
            self.bar = click.progressbar(length=1, label=self.label, file=sys.stderr, show_pos=False,
                                         show_percent=True, show_eta=True, width=30)
            # --progress on a non-terminal draws the bar too (click hides it there; the attribute
            # is named is_hidden up to click 8.1 and _is_atty since)
            if hasattr(self.bar, "is_hidden"):
                self.bar.is_hidden = False
            if hasattr(self.bar, "_is_atty"):
                self.bar._is_atty = True
            self.bar.__enter__()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            return
        self.bar.length = max(int(total), 1)
        step = int(done) - self.bar.pos
        if step:
            self.bar.update(step)

    def stage(self, label: str) -> None:
        if self.bar is not None:
            self.bar.label = label

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


class _Spinner:
    """Elapsed time on stderr for operations that report no progress of their own."""

    def __init__(self, label: str):
        self.label = label
        self._stop = threading.Event()
        self._thread = None

    def _run(self) -> None:
        start = time.monotonic()
        frames = "|/-\\"
        n = 0
        while not self._stop.wait(0.1):
            sys.stderr.write(f"\r{self.label} {frames[n % 4]} {time.monotonic() - start:.1f}s")
            sys.stderr.flush()
            n += 1
        sys.stderr.write(f"\r{self.label} done in {time.monotonic() - start:.1f}s\n")
        sys.stderr.flush()

    def __enter__(self) -> "_Spinner":
        if _progress_on():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


# ---------------------------------------------------------------------------
# The group
# ---------------------------------------------------------------------------

HELP = f"""walcrypt - encrypted write-ahead log and snapshot store for Raft.

\b
Typical session at 3 a.m.:
  walcrypt inspect /var/lib/node1                      # what is there (no key needed)
  walcrypt verify  /var/lib/node1 --key-file /secure/kek
  walcrypt repair  /var/lib/node1 --key-file /secure/kek

\b
Key options (wherever a key is needed): --key-file F (or WALCRYPT_KEY_FILE),
--key-env NAME, --passphrase-env NAME, --kms NAME [--kms-option K=V ...].
Key material is never printed.  'walcrypt key fingerprint --key-file F' prints
a key's fingerprint (not secret); inspect and snapshot inspect show the
fingerprint of the key a store or backup needs.

With --json, output is JSON on stdout, and an error is a JSON object
{{"error": {{"kind", "type", "message", "hint", "path", "exit_code"}}}} on stdout
as well as one line on stderr.

{EXIT_CODES}
"""


@click.group(cls=_Root, help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("--progress/--no-progress", default=None, help="Force progress bars on or off (default: on a terminal).")
@click.version_option(package_name="walcrypt")
def main(debug: bool, progress: bool | None) -> None:
    _Ctx.debug = debug
    _Ctx.progress = progress
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR,
                        format="walcrypt: %(levelname)s: %(message)s")


def command(group=None, **kw):
    """A subcommand whose --help ends with the exit codes."""
    kw.setdefault("epilog", EXIT_CODES)
    return (group or main).command(**kw)


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
        _emit_json({"path": path, "mode": "0600", "fingerprint": fp})
        return
    click.echo(f"wrote a new key-encryption key to {path} (mode 0600, fingerprint {fp}); keep it away from the "
               "data directory and back it up: without it the data cannot be read")


@main.group(cls=_Group, epilog=EXIT_CODES, short_help="Key tools: which key is this (fingerprint)?")
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
    kek = _kek(kw)
    if kek is None:
        raise KeyProviderError("give the key: --key-file F (or --key-env, --passphrase-env, --kms)")
    params = check = None
    if source is not None:
        params, check, _what = stored_kek(source)
    elif isinstance(kek, K.Passphrase):
        raise UsageError("a passphrase's fingerprint depends on the scrypt salt of the store it protects: give "
                         "the data directory, export or snapshot file as SOURCE")
    fp = K.fingerprint_of(kek, params)
    out = {"key": kek.describe(), "fingerprint": fp}
    if source is not None:
        need = kek_summary(params, check)
        out.update({"source": source, "source_kek": need})
        if isinstance(kek, Kms):
            out["matches"] = (False if need.get("plugin") != kek.name
                              else None if need["fingerprint"] is None or fp is None
                              else need["fingerprint"] == fp)
        else:
            out["matches"] = None if need["fingerprint"] is None else need["fingerprint"] == fp
        if out["matches"] is False:
            raise WrongKeyError(f"the key given ({kek.describe()}, "
                                + (f"fingerprint {fp}" if fp else "a KMS plug-in") + f") is not the KEK {source} "
                                f"needs ({describe_fingerprint(need)})")
    if as_json:
        _emit_json(out)
        return
    if fp:
        click.echo(f"{fp}  {kek.describe()}")
    else:
        click.echo(f"none  {kek.describe()}: a KMS-held key has no check value, so no fingerprint (walcrypt "
                   "never sees the key)")
    if source is not None:
        if out["matches"]:
            click.echo(f"{source} needs this key ({describe_fingerprint(out['source_kek'])})")
        else:
            click.echo(f"{source}: {describe_fingerprint(out['source_kek'])}; whether the key is the right one "
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
    from .storage import Store
    kek = _kek(kw)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory):
        raise UsageError(f"{directory} is not empty; choose a new or empty directory")
    if plaintext and kek is not None:
        raise UsageError("a plaintext store takes no key; drop the key option or --plaintext")
    if not plaintext and kek is None:
        raise KeyProviderError("an encrypted store needs a key: --key-file F (create one with 'walcrypt keygen F')")
    from . import crypto
    if not plaintext:
        crypto.suite_by_name(algorithm)
        if isinstance(kek, K.KeyFile):
            kek.read()                       # a bad key file is refused before anything is created
        if isinstance(kek, Kms):
            kek.new_params()                 # so is a key service that cannot be loaded or reached
    Store(directory, kek=None if plaintext else kek, encrypted=not plaintext, algorithm=algorithm).close()
    click.echo(f"created an empty {'plaintext' if plaintext else 'encrypted (' + algorithm + ')'} store in {directory}")


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
    from .inspection import inspect_store, render
    from .layout import looks_like_store
    key_file = kw.get("key_file")
    kek = _kek(kw)
    legacy = _legacy_findings(directory)
    if legacy and not (os.path.isdir(directory) and looks_like_store(directory)):
        if as_json:
            _emit_json({"path": os.path.abspath(directory), "store": False, "legacy": legacy})
        else:
            _print_legacy(legacy)
        sys.exit(EXIT_OK)
    rep = inspect_store(directory, kek, key_file=key_file)
    if legacy:
        rep["legacy"] = legacy
    if as_json:
        _emit_json(rep)
    else:
        click.echo(render(rep))
        _print_legacy(legacy)
    sys.exit(EXIT_FINDINGS if rep["errors"] else EXIT_OK)


def _legacy_findings(path: str) -> list[dict]:
    """What walcrypt.legacy.detect finds at ``path`` (data other Raft libraries wrote); never fails inspect."""
    try:
        from .legacy import detect
        return detect(path)
    except Exception as exc:                 # a detector's failure must not hide the store's own report
        logging.getLogger("walcrypt").debug("legacy detection at %s failed: %s", path, exc)
        return []


def _print_legacy(findings: list[dict]) -> None:
    for f in findings:
        click.echo(f"found {f['detail']} ({f['kind']}): {', '.join(f['paths'])}")
        click.echo(f"  adopt it with: {f['command']}")


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
    from .inspection import human_size
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
    from .check import check
    kek = _kek(kw)
    root = _store_dir(directory)
    encrypted = _mode(root, directory)
    if encrypted and kek is None:
        raise _need_key(directory)
    _refuse_key_for_plaintext(directory, encrypted, kek)
    with _Bar("verifying") as bar:
        report = check(root, kek=kek if encrypted else None, encrypted=encrypted, progress=bar)
    if as_json:
        _emit_json(report.to_dict())
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
    from .check import check
    kek = _kek(kw)
    root = _store_dir(directory)
    encrypted = _mode(root, directory)
    if encrypted and kek is None:
        raise _need_key(directory)
    _refuse_key_for_plaintext(directory, encrypted, kek)
    from .inspection import lock_holders, locked_message
    holders = lock_holders(root)
    if holders:
        raise LockedError(locked_message(directory, holders))
    with _Bar("checking") as bar:
        report = check(root, kek=kek if encrypted else None, encrypted=encrypted, fix=True, progress=bar)
    if as_json:
        _emit_json(report.to_dict())
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
    kek = _kek(kw)
    root = _store_dir(directory)
    from .inspection import SharedLock
    if do_apply:
        store = _open_rw(root, directory, kek)
    else:
        with SharedLock(root, directory):
            store = _open_ro(root, directory, kek)
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
        _emit_json(out)
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
    from . import recover as R
    from .inspection import lock_holders, locked_message
    kek = _kek(kw)
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
    with _Spinner("rebuilding" if do_apply else "authenticating"):
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
    from .inspection import format_table, human_size
    if as_json:
        _emit_json(rep)
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
    from .inspection import SharedLock
    kek = _kek(kw)
    if lo is not None and hi is not None and lo > hi + 1:       # --to FROM-1 is the empty range
        raise UsageError(f"--from {lo} is after --to {hi}: give the range first index first (--to is inclusive)")
    root = _store_dir(directory)
    with SharedLock(root, directory):
        store = _open_ro(root, directory, kek)
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
            if as_json:
                click.echo(json.dumps(head, indent=2)[:-2] + ',\n  "entries": [', nl=False)
                _Ctx.json_stream_open = True        # an error from here on closes the document (see _fail)
            else:
                click.echo(f"hard state: term={hs.term} vote={hs.vote} commit={hs.commit}")
                click.echo(f"log: first index {first}, last index {last}"
                           + (f"; snapshot at index {snap.meta.index} term {snap.meta.term}" if snap else ""))
                click.echo("INDEX\tTERM\tSIZE\tDATA")
            n = 0
            idx = a
            while idx <= b:
                batch = store.entries(idx, min(b, idx + 1023) + 1, max_size=4 << 20)
                for e in batch:
                    v = _data_view(e.data)
                    if as_json:
                        click.echo(("\n    " if n == 0 else ",\n    ")
                                   + json.dumps({"index": e.index, "term": e.term, **v}), nl=False)
                    else:
                        shown = json.dumps(v["text"], ensure_ascii=False) if "text" in v else "base64:" + v["base64"]
                        click.echo(f"{e.index}\t{e.term}\t{len(e.data)}\t{shown}")
                    n += 1
                idx = batch[-1].index + 1
            if as_json:
                _Ctx.json_stream_open = False
                click.echo(("\n  ]\n}" if n else "]\n}"))
        finally:
            store.close()


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
    kek = _kek(kw)
    root = _store_dir(directory)
    if not _mode(root, directory):
        raise UsageError(f"{directory} is a plaintext store and has no data keys; encrypt it first with "
                         "'walcrypt migrate DIR --to encrypted --key-file F'")
    store = _open_rw(root, directory, kek)
    try:
        before = {k["key_id"]: k["state"] for k in store.key_info()["keys"]}
        with _Spinner("re-encrypting"):
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
        _emit_json(out)
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
    from .storage import Store
    new = _new_kek(kw)
    kek = _kek(kw)
    if new is None:
        raise UsageError("give the new KEK with --new-key-file F (create one with 'walcrypt keygen F')")
    root = _store_dir(directory)
    if not _mode(root, directory):
        raise UsageError(f"{directory} is a plaintext store and has no KEK")
    if kek is None:
        raise _need_key(directory)
    if isinstance(new, (K.KeyFile, K.EnvKey)):
        fresh = new.material(None)           # a bad new key is refused before anything changes
        if isinstance(kek, (K.KeyFile, K.EnvKey)) and fresh == kek.material(None):
            raise UsageError("the new KEK is the same as the current one; create a new one with 'walcrypt keygen F'")
    store = _open_rw(root, directory, kek)
    try:
        n = sum(1 for k in store.key_info()["keys"] if k["state"] != "destroyed")
        store.rotate_kek(new)
    finally:
        store.close()
    Store(root, kek=new, read_only=True).close()       # the new KEK opens it
    click.echo(f"re-wrapped {n} data key(s) and the metadata key under the new KEK ({new.describe()}); the old KEK "
               "no longer opens this store. Exports made before now still need the old KEK: keep it until they "
               "have expired")


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
    import walcrypt

    from .migrate import remove_source as _remove_source
    kek = _kek(kw)
    root = _store_dir(directory)
    have = _mode(root, directory)
    want = target == "encrypted"
    if have == want:
        click.echo(f"{directory} is already {target}; nothing to migrate")
    else:
        if not want and not yes:
            raise UsageError("turning encryption off writes every record to disk in clear; add --yes to confirm")
        if kek is None:
            raise (_need_key(directory) if have else
                   KeyProviderError("migrating to encrypted needs a key: --key-file F (create one with "
                                    "'walcrypt keygen F')"))
        if want:
            from . import crypto
            crypto.suite_by_name(algorithm)
            if isinstance(kek, (K.KeyFile, K.EnvKey)):
                kek.material(None)
        from .inspection import lock_holders, locked_message
        holders = lock_holders(root)
        if holders:
            raise LockedError(locked_message(directory, holders))
        _require_writable(root, directory)
        _preflight(root, kek if have else None, have)
        with _Bar(f"migrating to {target}") as bar:
            def progress(stage, done, total):
                bar.stage(f"migrating to {target}: {stage}")
                bar(done, total)
            walcrypt.open(root, kek=kek, encrypted=want, migrate=True, migration_progress=progress,
                          algorithm=algorithm).close()
        click.echo(f"migrated {directory} to {target}"
                   + ("" if remove_source else "; the old directories are kept (remove them with --remove-source)"))
    if remove_source:
        removed = _remove_source(root)
        click.echo("removed " + ", ".join(os.path.basename(p) + "/" for p in removed) if removed
                   else "no directories of the other mode to remove")
        _remove_imported_sources(root, directory, kek)


def _remove_imported_sources(root: str, directory: str, kek) -> None:
    """migrate --remove-source on a store imported from pysyncobj files: delete those files, each only
    while it is byte-identical to what was imported (the record is sealed: it needs the key)."""
    from .legacy import pysyncobj_files as legacy
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

@main.group(cls=_Group, epilog=EXIT_CODES, short_help="Backups: export, inspect, redact, restore.")
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
    from .backup import _refuse_existing, export_store
    from .inspection import human_size
    kek = _kek(kw)
    root = _store_dir(directory)
    out_abs = os.path.abspath(out)
    _refuse_existing(out)                # never overwritten, never written through a link
    if not os.path.isdir(os.path.dirname(out_abs)):
        raise UsageError(f"the directory of {out} does not exist")
    if out_abs.startswith(root + os.sep):
        raise UsageError(f"{out} lies inside the data directory; write exports somewhere else")
    encrypted = _mode(root, directory)
    if encrypted and kek is None:
        raise _need_key(directory)
    _refuse_key_for_plaintext(directory, encrypted, kek)
    with _Spinner("exporting"):
        info = export_store(root, out_abs, kek=kek if encrypted else None, encrypted=encrypted,
                            embed_kek=embed_kek)
    click.echo(f"exported the snapshot at index {info['index']} term {info['term']} to {out} "
               f"({human_size(info['size'])}, mode 0600)")
    if info["kek_embedded"]:
        click.echo(f"WARNING: {out} embeds the KEK: anyone who can read it can decrypt everything in it. "
                   f"Run 'walcrypt snapshot redact {out} --kek-out F' before storing or sending it", err=True)


class _SnapOnly:
    """A raw ``.snap`` file presented the way backup.unlock_export expects an export."""

    def __init__(self, path: str):
        self.path, self.kek, self.snapshot_offset, self.bundle = path, None, 0, b""

    def bundle_doc(self) -> dict:
        return {}                 # no export keyring: the snapshot's own bundle is used

    def snapshot_file(self):
        from .snapshot import SnapshotFile
        from .vfs import DEFAULT_VFS
        return SnapshotFile(DEFAULT_VFS, self.path)


def _read_magic(path: str) -> bytes:
    """The first 8 bytes of an operator's file: never blocks on a FIFO or device (UnsafeFileError)."""
    from .vfs import open_regular
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a snapshot file")
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(8)


def _inspect_snapshot_file(path: str, kek, plaintext: bool = False) -> dict:
    from . import backup, crypto
    from . import format as fmt
    magic = _read_magic(path)
    if magic == backup.EXPORT_MAGIC:
        info = backup.inspect_export(path, kek, plaintext=plaintext)
        info["kind"] = "export"
        params, check, _what = stored_kek(path)
        info["kek"] = None if info["plaintext"] else kek_summary(params, check)
        return info
    if magic != fmt.SNAPSHOT_MAGIC:
        raise UsageError(f"{path} is not a walcrypt snapshot export or snapshot file")
    shim = _SnapOnly(path)
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
    from .inspection import format_table, human_size
    kek = _kek(kw)
    if not os.path.exists(file):
        raise UsageError(f"{file} does not exist")
    _Ctx.source = file
    info = _inspect_snapshot_file(file, kek, plaintext)
    for w in info["warnings"]:
        click.echo(f"WARNING: {w}", err=True)
    if as_json:
        _emit_json(info)
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
    from . import backup
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
    if _read_magic(file) != backup.EXPORT_MAGIC:
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
    from . import backup
    new = _new_kek(kw)
    kek = _kek(kw)
    if not os.path.exists(file):
        raise UsageError(f"{file} does not exist")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory):
        raise UsageError(f"{directory} is not empty; restore only into a new or empty directory")
    if isinstance(new, (K.KeyFile, K.EnvKey)):
        new.material(None)                   # a bad new key is refused before anything is created
    _Ctx.source = file
    with _Spinner("verifying the snapshot"):
        info = _inspect_snapshot_file(file, kek, plaintext)
    if info["plaintext"]:
        backup.refuse_plaintext(file, plaintext, "it is restored only when asked for explicitly")
    if not info["verified"]:
        raise KeyProviderError(f"{file} is encrypted and embeds no KEK: give the KEK it was "
                               + ("exported under" if info["kind"] == "export" else "written under (its store's)"))
    with _Spinner("restoring"):                 # built aside and renamed into place (backup.restore_export)
        res = backup.restore_export(file, directory, kek=kek, plaintext=plaintext, new_kek=new)
    under = ("a plaintext store" if not res["encrypted"] else
             f"encrypted under the new KEK ({new.describe()})" if new is not None else "encrypted under the same KEK")
    click.echo(f"restored the snapshot at index {res['index']} term {res['term']} ({res['data_bytes']} bytes) "
               f"into {directory}, {under}; start the node on it and Raft will catch it up from the leader")
    if kek is None and new is None and info["kek_embedded"]:
        click.echo(f"note: the new store is encrypted under the KEK embedded in {file}; save it with "
                   f"'walcrypt snapshot redact {file} --kek-out F' to open the store later", err=True)


# ---------------------------------------------------------------------------
# import, export: data written before walcrypt (walcrypt.legacy)
# ---------------------------------------------------------------------------

@main.group(name="import", cls=_Group, epilog=EXIT_CODES,
            short_help="Adopt a Raft library's own files: pysyncobj journals, etcd member directories.")
def import_group() -> None:
    """Import data a Raft library wrote before walcrypt into a new encrypted store.
    The source files are only read, never changed."""


@main.group(name="export", cls=_Group, epilog=EXIT_CODES,
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
    from .legacy import pysyncobj_files as legacy
    kek = _kek(kw)
    if kek is None:
        raise KeyProviderError("the imported store is encrypted and needs a key: --key-file F (create one with "
                               "'walcrypt keygen F')")
    if isinstance(kek, (K.KeyFile, K.EnvKey)):
        kek.material(None)                   # a bad key is refused before anything is read or created
    for f in (journal, dump):
        if f is not None and not os.path.isfile(f):
            raise UsageError(f"{f} does not exist or is not a file")
    opts = {} if max_dump_bytes is None else {"max_dump_bytes": max_dump_bytes}
    with _Spinner("importing"):
        rep = legacy.import_pysyncobj(directory, journal=journal, dump=dump, kek=kek, **opts)
    if as_json:
        _emit_json(rep)
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
    from .legacy.etcd import import_etcd
    kek = _kek(kw)
    if kek is None:
        raise UsageError("give the KEK of the new store (--key-file, --key-env, --passphrase-env or --kms)")
    _Ctx.source = member_dir
    with _Spinner("importing"):
        res = import_etcd(data, member_dir=member_dir, kek=kek)
    if as_json:
        _emit_json(res)
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
    from .legacy.etcd import export_etcd
    kek = _kek(kw)
    _Ctx.source = data
    with _Spinner("exporting"):
        res = export_etcd(data, member_dir=member_dir, kek=kek)
    if as_json:
        _emit_json(res)
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



# ---------------------------------------------------------------------------
# demo, bench
# ---------------------------------------------------------------------------

@command(short_help="The main job: a 3-node pysyncobj cluster on encrypted stores, then one store up close.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--entries", "n_entries", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Writes through the cluster, and entries written to the single store.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False), default=None,
              help="Where to create the cluster's and the store's directories (default: a new temporary "
                   "directory, removed afterwards).")
def demo(as_json, n_entries, workdir) -> None:
    """Run walcrypt under a real Raft cluster, then take one store apart; print what was seen.

    \b
    Part 1: a 3-node pysyncobj cluster on 127.0.0.1, one subprocess per node,
    each on its own encrypted store with its own KEK: a replicated key/value
    workload, the leader killed with SIGKILL and restarted, a rolling DEK
    rotation under load, a full-cluster restart; then every acknowledged write
    is checked on every node, and every file searched for plaintext.
    Part 2: one store up close: written, reopened and read back byte for
    byte, searched for plaintext, a wrong key refused, verified, a flipped bit
    detected, a crashed writer's torn tail repaired.

    Every step checks what it claims; exits 1 if any check fails.
    """
    from .demo import run_demo
    report = run_demo(n_entries=n_entries, workdir=workdir, echo=None if as_json else click.echo)
    if as_json:
        _emit_json(report)
    sys.exit(EXIT_OK if report["ok"] else EXIT_FINDINGS)


def find_checkout() -> str | None:
    """A source checkout holding benchmarks/: the current directory, or the one above the package."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.getcwd(), here):
        if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
            return root
    return None


@command(short_help="Run the quick benchmark suite (source checkout); results to a file of your own.",
         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the results (JSON) here; default: walcrypt-bench-<date>-<time>.json in the current "
                   "directory.  Never overwrites.")
@click.option("--update-repo", is_flag=True,
              help="Also rewrite the checkout's committed results (benchmarks/RESULTS.md, benchmarks/results/ "
                   "and the chart), as a release does; off by default.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(out, update_repo, args) -> None:
    """Run the quick benchmark suite (python -m benchmarks --quick [ARGS]).

    Needs a source checkout with benchmarks/ (in the current directory or next
    to the installed package); extra ARGS go to the suite, e.g. 'walcrypt bench
    -- --list'.  The results go to --out (default: a new dated file in the
    current directory); the checkout's committed benchmarks/RESULTS.md is left
    alone unless --update-repo is given.
    """
    root = find_checkout()
    if root is None:
        raise UsageError("'walcrypt bench' needs a source checkout: no benchmarks/ in the current directory or "
                         "next to the package; run it from a clone of the walcrypt repository")
    if out is None:
        out = time.strftime("walcrypt-bench-%Y%m%d-%H%M%S.json")
    out = os.path.abspath(out)
    if os.path.lexists(out):
        raise UsageError(f"{out} already exists; refusing to overwrite it (choose another --out)")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"the directory of {out} does not exist")
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    mine = ["--json", out] + ([] if update_repo else ["--no-save"])
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", *mine, *args], cwd=root, env=env)
    if os.path.exists(out):
        click.echo(f"results written to {out}" + ("" if update_repo else
                   " (benchmarks/RESULTS.md left alone; --update-repo rewrites it)"))
    sys.exit(proc.returncode)


if __name__ == "__main__":  # pragma: no cover
    main()
