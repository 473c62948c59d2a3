"""Overwriting the free pages of the LMDB metadata file in place (FORMAT.md 9.11), a mixin of
walcrypt.meta.Meta: after a key is destroyed or the KEK replaced, the old records LMDB's
copy-on-write left in free pages are overwritten by filling them with scratch records, and the
file is then searched for the secrets that must be gone."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import lmdb

from .errors import (
    StorageError,
)
from .vfs import DEFAULT_VFS, VFS

if TYPE_CHECKING:
    from contextlib import contextmanager
    from typing import Any, Iterator

    from .meta import ReadTxn

log = logging.getLogger("walcrypt")



SCRUB_DB = b"scrub"
SCRUB_KEY = 8                       # key size of the scratch records (u64, big-endian, appended)
LEAF_HEADER = 16                    # LMDB's page header
SCRUB_ATTEMPTS = 5                  # scrubs before a secret a reader pins is left to the next one
SCRUB_DELAY_S = 0.05
SCRUB_SLACK_PAGES = 8               # the first fill commit: the unused pages less this many (and 1/128) ...
SCRUB_MAX_BATCHES = 16              # ... then 1, 2, 4, ... pages a commit until LMDB grows the file
SCAN_CHUNK = 1 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def scrub_key(n: int) -> bytes:
    return n.to_bytes(SCRUB_KEY, "big")


class ScrubMixin:
    """Scrubbing the free pages of the metadata file (see the module docstring)."""

    # Host contract: provided by Meta (meta.py).
    path: str
    env: lmdb.Environment | None
    dbs: dict[bytes, Any]                   # table handles by name (a FrozenMeta maps names to names)

    if TYPE_CHECKING:
        @contextmanager
        def read(self) -> Iterator[ReadTxn]: ...
        @contextmanager
        def _in_use(self) -> Iterator[None]: ...
        @contextmanager
        def _txn(self, *, write: bool) -> Iterator: ...
        def _renew(self) -> None: ...

    def has_free_pages(self) -> bool:
        """True when data.mdb holds pages no table uses (old versions of records among them)."""
        return self._free_pages_upper_bound() > 0

    def _free_pages_upper_bound(self) -> int:
        """Pages of data.mdb no walcrypt table uses: the free pages, plus the free list's own few pages
        and the scratch table's, if there is one (an upper bound, cheap: no table is opened)."""
        def pages(st: lmdb._StatDict) -> int:      # (py-lmdb's own type of stat())
            return st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        with self.read() as r:
            assert self.env is not None                      # a read transaction is open on it
            used = 2 + pages(self.env.stat())                # the meta pages and the main table
            used += sum(pages(r.txn.stat(db)) for db in self.dbs.values())
            return max(0, self.env.info()["last_pgno"] + 1 - used)

    def scratch_table(self, txn, *, create: bool = False):
        """The scratch table of scrub() in the write transaction ``txn``, or None when there is none."""
        if not create and txn.get(SCRUB_DB) is None:          # the main table names every table
            return None
        assert self.env is not None                          # txn is a transaction of it
        return self.env.open_db(SCRUB_DB, txn=txn, create=create)

    def scrub(self, secrets=(), *, vfs: VFS | None = None, attempts: int = SCRUB_ATTEMPTS,
              delay: float = SCRUB_DELAY_S) -> bool:
        """Overwrite the reusable free pages of data.mdb with zeros, through LMDB (FORMAT.md 9.11).

        Then, if ``secrets`` are given, read data.mdb (through ``vfs``, never through a link) and
        check that none of them occurs in it any more.  One that still does (a read transaction, of
        this process or another, pinned the pages that hold it) is retried up to ``attempts`` times,
        ``delay`` seconds apart, then logged and left to the next scrub.  Returns whether the file
        was found clean (True without ``secrets``).

        Each step is one ordinary LMDB commit, so an interruption anywhere leaves a valid
        environment (at worst a scratch table with records: a scrub is pending, see scrub_pending).
        LMDB failures are StorageError, a failed read of data.mdb an OSError."""
        secrets = [bytes(s) for s in secrets if s]
        for attempt in range(max(1, attempts)):
            if attempt:
                time.sleep(delay)
            self._scrub_pass()
            try:
                if not secrets or not self.holds(secrets, vfs):
                    return True
            except BaseException:
                self.mark_scrub_pending()            # not known to be clean: the next open scrubs again
                raise
        self.mark_scrub_pending()
        log.warning("a key that was destroyed or re-wrapped is still in the metadata database %s: a reader "
                    "held on to old pages (a long read transaction, in this process or another); the next "
                    "scrub (at the next key destruction, KEK rotation or read-write open) removes it", self.path)
        return False

    def holds(self, secrets, vfs: VFS | None = None) -> bool:
        """Whether any of ``secrets`` occurs in data.mdb, read through ``vfs`` without following a link."""
        vfs = vfs or DEFAULT_VFS
        secrets = [bytes(s) for s in secrets if s]
        if not secrets:
            return False
        keep = max(len(s) for s in secrets) - 1
        fd = vfs.open(os.path.join(self.path, "data.mdb"), os.O_RDONLY | _O_NOFOLLOW)
        try:
            tail, offset = b"", 0
            while chunk := vfs.pread(fd, SCAN_CHUNK, offset):
                offset += len(chunk)
                buf = tail + chunk
                if any(s in buf for s in secrets):
                    return True
                tail = buf[-keep:] if keep else b""
            return False
        finally:
            vfs.close(fd)

    def _scrub_pass(self) -> None:
        """One scrub (FORMAT.md 9.11): the environment renewed (_renew), then four LMDB commits.

        1. Every record of walcrypt's tables written again as it is: every page of theirs gets a new
           version made from a new buffer, and the old versions (whose unused middle may repeat old
           bytes) go to the free list.  The scratch table is created (a leftover emptied) with one
           record.
        2. One record more in the scratch table: LMDB reuses the pages freed by commit T from
           commit T + 2 on (with no older reader), so the pages freed by 1 and by the caller's
           commit become reusable by 3.
        3. Records of zero bytes, three to a leaf page (filling it), appended until LMDB had to
           grow the file: every free page it could reuse was taken, and written whole, first.  The
           first fill commit takes a little less than the unused pages (an upper bound of the
           reusable ones), later ones 1, 2, 4, ... pages, so the file grows by a page or a few.
        4. The scratch table is emptied: its pages, all zeros, go back to the free list.  The empty
           table stays: it tells a read-write open that no scrub is pending (scrub_pending)."""
        try:
            self._renew()
            assert self.env is not None                      # _renew() reopened it, or raised
            with self._in_use():
                psize = self.env.stat()["psize"]
            # A leaf node: 2-byte pointer, 8-byte header, key, value; three of them fill a page's
            # body exactly (MDB_APPEND leaves full pages full), well below LMDB's overflow threshold.
            vlen = ((psize - LEAF_HEADER) // 3 - 2 - 8 - SCRUB_KEY) & ~1
            value = bytes(vlen)
            with self._txn(write=True) as txn:                           # 1
                for db in self.dbs.values():
                    with txn.cursor(db=db) as cur:
                        records = [(bytes(k), bytes(v)) for k, v in cur]
                    for k, v in records:
                        txn.put(k, v, db=db)
                scratch = self.scratch_table(txn, create=True)
                txn.drop(scratch, delete=False)
                txn.put(scrub_key(0), value, db=scratch)
            with self._txn(write=True) as txn:                           # 2
                txn.put(scrub_key(1), value, db=self.scratch_table(txn, create=True), append=True)
            n, grown = 2, False
            for batch in range(SCRUB_MAX_BATCHES):                       # 3
                with self._in_use():
                    before = self.env.info()["last_pgno"]
                if batch == 0:
                    bound = self._free_pages_upper_bound()
                    pages = max(1, bound - SCRUB_SLACK_PAGES - bound // 128)
                else:
                    pages = 1 << (batch - 1)
                with self._txn(write=True) as txn:
                    scratch = self.scratch_table(txn, create=True)
                    for _ in range(3 * pages):
                        txn.put(scrub_key(n), value, db=scratch, append=True)
                        n += 1
                with self._in_use():
                    grown = self.env.info()["last_pgno"] > before
                if grown:
                    break
            if not grown:
                log.warning("scrubbing the metadata database %s: LMDB did not grow the file for %d scratch "
                            "pages; some free pages may not have been overwritten", self.path, n // 3)
            self._empty_scratch()                                        # 4
        except lmdb.MapFullError:
            raise StorageError(f"the metadata database {self.path} is full") from None
        except lmdb.Error as exc:
            raise StorageError(f"scrubbing the metadata database {self.path} failed: {exc}") from None

    def _empty_scratch(self) -> None:
        with self._txn(write=True) as txn:
            txn.drop(self.scratch_table(txn, create=True), delete=False)

    def scrub_pending(self) -> bool:
        """Whether a scrub is due (read-write only): the scratch table is missing (the file was never
        scrubbed: a new store, or one an earlier walcrypt wrote) or holds records (a commit that
        replaced key material marked it, or a scrub was interrupted, or found a secret still there)."""
        try:
            with self._txn(write=True) as txn:            # opening a table is done in a write transaction
                db = self.scratch_table(txn)
                return db is None or txn.stat(db)["entries"] > 0
        except lmdb.Error as exc:
            raise StorageError(f"reading the metadata database {self.path} failed: {exc}") from None

    def mark_scrub_pending(self) -> None:
        """Record (in a commit of its own) that a scrub is due: see WriteTxn.mark_scrub_pending."""
        try:
            with self._txn(write=True) as txn:
                txn.put(scrub_key(0), b"", db=self.scratch_table(txn, create=True))
        except lmdb.Error as exc:
            raise StorageError(f"metadata commit failed in {self.path}: {exc}") from None
