"""Opening stores for a command (read-only, read-write, preflight checks), progress on stderr,
legacy data found where a store was expected."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING

import click

from .. import layout
from ..errors import (
    LockedError,
    UsageError,
)
from ..storage import Store
from ..storedir import lock_holders, locked_message, read_mode, require_store
from .context import Ctx
from .errors import NoWrite
from .options import need_key_error

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar  # what click.progressbar returns (click.termui names it so too)

# ---------------------------------------------------------------------------
# Opening stores
# ---------------------------------------------------------------------------

def store_mode(root: str, directory: str) -> bool:
    return read_mode(root, directory)


def refuse_key_for_plaintext(directory: str, encrypted: bool, kek) -> None:
    """A key given for a store whose metadata says plaintext: the operator expects an encrypted
    store, and plaintext metadata can be planted by anyone who can write the directory."""
    if kek is not None and not encrypted:
        raise UsageError(
            f"{directory} holds a plaintext store, but a key was given: nothing in it is authenticated by a key. "
            "If this store was encrypted, its metadata was replaced and must not be trusted; if it is a "
            "plaintext store, run the command without a key")


def open_ro(root: str, directory: str, kek):
    encrypted = store_mode(root, directory)
    if encrypted and kek is None:
        raise need_key_error(directory)
    refuse_key_for_plaintext(directory, encrypted, kek)
    return Store(root, kek=kek if encrypted else None, encrypted=encrypted, read_only=True)


def open_rw(root: str, directory: str, kek):
    encrypted = store_mode(root, directory)
    holders = lock_holders(root)
    if holders:
        raise LockedError(locked_message(directory, holders))
    if encrypted and kek is None:
        raise need_key_error(directory)
    refuse_key_for_plaintext(directory, encrypted, kek)
    require_writable(root, directory)
    preflight(root, kek if encrypted else None, encrypted)
    store = Store(root, kek=kek if encrypted else None, encrypted=encrypted)
    for rep in store.repairs:
        click.echo(f"walcrypt: note: opening the store repaired {rep['path']}: {rep['detail']}"
                   + (f" (copy kept in {rep['broken_copy']})" if rep.get("broken_copy") else ""), err=True)
    return store


def preflight(root: str, kek, encrypted: bool) -> None:
    """Open read-only first: a wrong key, damage, a torn tail or an unregistered snapshot file the
    read-write open would refuse is refused before a read-write open touches anything (even LMDB's
    lock file).  A torn tail is 'walcrypt repair''s job, not a side effect of a key operation."""
    store = Store(root, kek=kek, encrypted=encrypted, read_only=True)
    try:
        refusal = store.snapshots.refusal()      # what only a read-write open looks at
    finally:
        store.close()
    if refusal is not None:
        raise refusal


def store_root(directory: str) -> str:
    root = require_store(directory)
    Ctx.source = directory
    return root


def require_writable(root: str, directory: str) -> None:
    """Before a read-write command: every file and directory it may write is writable, or exit 2 saying
    why (a read-only mount, or permissions) - not a half-done operation and a misleading error later."""
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
            raise NoWrite(f"{directory} lies on a file system mounted read-only ({p} cannot be written); remount "
                           "it read-write to run this. Read-only commands (inspect, verify, dump, snapshot "
                           "export) work as it is")
        raise NoWrite(f"no permission to write {p}; run as the user that owns the store")


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------

def _progress_on() -> bool:
    if Ctx.progress is not None:
        return Ctx.progress
    return sys.stderr.isatty()


class Bar:
    """A click progress bar on stderr driven by (done, total) callbacks; silent when progress is off."""

    def __init__(self, label: str, *, unit: str = "bytes"):
        self.label = label
        self.unit = unit
        self.bar: ProgressBar[int] | None = None

    def __enter__(self) -> "Bar":
        if _progress_on():
            bar = click.progressbar(length=1, label=self.label, file=sys.stderr, show_pos=False,
                                    show_percent=True, show_eta=True, width=30)
            # --progress on a non-terminal draws the bar too (click hides it there; the attribute
            # is named is_hidden up to click 8.1 and _is_atty since)
            if hasattr(bar, "is_hidden"):
                bar.is_hidden = False
            if hasattr(bar, "_is_atty"):
                bar._is_atty = True
            bar.__enter__()
            self.bar = bar
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


class Spinner:
    """Elapsed time on stderr for operations that report no progress of their own."""

    def __init__(self, label: str):
        self.label = label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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

    def __enter__(self) -> "Spinner":
        if _progress_on():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def legacy_findings(path: str) -> list[dict]:
    """What walcrypt.legacy.detect finds at ``path`` (data other Raft libraries wrote); never fails inspect."""
    # lazy: start-up time (walcrypt.legacy: the etcd WAL and pysyncobj journal readers)
    from ..legacy import detect
    try:
        return detect(path)
    except Exception as exc:                 # a detector's failure must not hide the store's own report
        logging.getLogger("walcrypt").debug("legacy detection at %s failed: %s", path, exc)
        return []


def print_legacy(findings: list[dict]) -> None:
    for f in findings:
        click.echo(f"found {f['detail']} ({f['kind']}): {', '.join(f['paths'])}")
        click.echo(f"  adopt it with: {f['command']}")
