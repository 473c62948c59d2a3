"""Errors: one line on stderr, an exit code, no traceback (and a JSON object with --json); the
command group that maps every exception a command raises to them."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Iterator

import click
import lmdb

from .. import keys as K
from ..errors import (
    AuthenticationError,
    CompactedError,
    CorruptionError,
    KeyNotFoundError,
    KeyProviderError,
    KeyProviderUnavailableError,
    LockedError,
    StorageError,
    StoreFailedError,
    SymlinkError,
    UnavailableError,
    UnsafeFileError,
    UnsupportedFormatError,
    UsageError,
    WalcryptError,
    WrongKeyError,
    os_error_advice,
)
from .context import Ctx
from .options import stored_kek
from .output import emit_json, end_json_list_with_error

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

EXIT_CODES = """\b
Exit codes:
  0  ok
  1  findings or data errors (damaged, tampered or inconsistent data)
  2  usage errors (bad options, missing or wrong key, missing directory,
     no permission, store locked by a running process)
  3  the key service (KMS) could not be reached: nothing was changed, retry"""


class NoWrite(UsageError):
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


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__


def _no_permission(exc: BaseException) -> bool:
    """A permission problem, here or as the cause of a StorageError (EACCES, EPERM, EROFS, LMDB's ReadonlyError)."""
    for e in _causes(exc):
        if isinstance(e, (PermissionError, lmdb.ReadonlyError, NoWrite)):
            return True
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return True
    return False


def error_kind(exc: BaseException) -> str:
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


def exit_code_of(exc: BaseException) -> int:
    kind = error_kind(exc)
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
    if not isinstance(exc, WrongKeyError) or Ctx.kek is None or not Ctx.source:
        return ""
    try:
        params, check, _where = stored_kek(Ctx.source)
        need = K.params_fingerprint(params, check)
        have = K.fingerprint_of(Ctx.kek, params)
    except Exception:                   # noqa: BLE001 - an explanation must never hide the error itself
        return ""
    if not need or not have or need == have:
        return ""
    return f"; {Ctx.source} needs the KEK with fingerprint {need}, the key given has fingerprint {have}"


def _error_doc(exc: BaseException, code: int, which_key: str = "") -> dict:
    """The JSON error object (README, "Command line"): kind, type, message, hint, path, exit_code."""
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
    return {"error": {"kind": error_kind(exc), "type": type(exc).__name__, "message": message, "hint": hint,
                      "path": None if path is None else str(path), "exit_code": code}}


def _fail(exc: BaseException, code: int | None = None) -> None:
    if Ctx.debug:
        traceback.print_exception(exc)
    code = exit_code_of(exc) if code is None else code
    if isinstance(exc, WrongKeyError):
        hint = " (check --key-file / --key-env / --passphrase-env / --kms)"
    else:
        hint = ""
    which_key = _which_key(exc)
    if Ctx.json:
        doc = _error_doc(exc, code, which_key)
        if Ctx.json_stream_open:        # close the streamed document: the error becomes its "error" member
            end_json_list_with_error(doc["error"])
        else:
            emit_json(doc)
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


class Group(click.Group):
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
            if Ctx.json:
                _fail(exc)
            click.echo("walcrypt: interrupted", err=True)
            sys.exit(130)
        except Exception as exc:              # noqa: BLE001 - the one place that turns errors into exit codes
            _fail(exc)


class Root(Group):
    """The top-level group: with --json, click's own usage errors become the JSON error object too."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        Ctx.json = _json_requested(argv)
        if not Ctx.json or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail(KeyboardInterrupt())
        except click.ClickException as exc:
            _fail(exc, exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)
