"""Key options: which KEK a command was given, and which KEK a store or file needs."""

from __future__ import annotations

import os

import click

from .. import backup
from .. import format as fmt
from .. import keys as K
from .. import meta as M
from ..errors import (
    KeyProviderError,
    UsageError,
)
from ..kms import Kms, Retry
from ..storedir import open_meta, require_store, store_record
from ..vfs import open_regular
from .context import Ctx

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


def new_kek_from_options(kw) -> K.KeyEncryptionKey | None:
    """The KEK named by --new-... (the retries of --kms-retries apply to it too); pop before kek_from_options(kw)."""
    retry = _retry({"kms_retries": kw.get("kms_retries"), "kms_retry_delay": kw.get("kms_retry_delay")})
    return kek_from(kw.pop("new_key_file"), kw.pop("new_key_env"), kw.pop("new_passphrase_env"), kw.pop("new_kms"),
                    kw.pop("new_kms_options"), prefix="--new-", retry=retry)


def kek_from_options(kw) -> K.KeyEncryptionKey | None:
    retry = _retry(kw)
    kek = kek_from(kw.pop("key_file"), kw.pop("key_env"), kw.pop("passphrase_env"), kw.pop("kms"),
                   kw.pop("kms_options"), retry=retry)
    Ctx.kek = kek
    return kek


def stored_kek(source: str) -> tuple[dict | None, bytes | None, str]:
    """(KEK parameters, check value, what) stored in a data directory, an export or a snapshot file, read
    without any key (neither is secret; neither is authenticated: they are what open checks a key against)."""
    if os.path.isdir(source):
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
    magic = read_magic(source)
    if magic == backup.EXPORT_MAGIC:
        ex = backup.ExportFile(source)
        doc = ex.bundle_doc() or ex.snapshot_file().bundle_doc()
        what = "export"
    elif magic == fmt.SNAPSHOT_MAGIC:
        doc = backup.SnapshotSource(source).snapshot_file().bundle_doc()
        what = "snapshot"
    else:
        raise UsageError(f"{source} is not a walcrypt data directory, snapshot export or snapshot file")
    check = bytes.fromhex(doc["kek_check"]) if doc.get("kek_check") else None
    return doc.get("kek_params"), check, what


def kek_summary(params: dict | None, check: bytes | None) -> dict:
    """What names the KEK a store or file needs: its kind, its fingerprint (None for a KMS-held key, which
    has no check value: the plug-in name is what identifies it)."""
    out: dict = {"kind": (params or {}).get("kind"), "fingerprint": K.params_fingerprint(params, check)}
    if params is not None and out["kind"] == "kms":
        out["plugin"] = params.get("plugin")
    return out


def describe_fingerprint(summary: dict) -> str:
    if summary.get("fingerprint"):
        return f"fingerprint {summary['fingerprint']}"
    if summary.get("kind") == "kms":
        return (f"fingerprint none (a KMS-held key has no check value; KMS plug-in {summary.get('plugin')!r} "
                "holds it)")
    return "fingerprint none (no check value stored)"


def need_key_error(directory: str) -> KeyProviderError:
    return KeyProviderError(f"{directory} is encrypted: give its key with --key-file F (or --key-env, "
                            "--passphrase-env, --kms)")


def read_magic(path: str) -> bytes:
    """The first 8 bytes of an operator's file: never blocks on a FIFO or device (UnsafeFileError)."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a snapshot file")
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        return f.read(8)
