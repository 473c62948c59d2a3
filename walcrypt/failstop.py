"""The fail-stop guard around the steps of a mutating operation (see FailStop)."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Literal

from .errors import StoreFailedError

if TYPE_CHECKING:
    from .storage import Store


class FailStop:
    """Fail-stop for the steps of a mutating operation (a segment cut or seal, a snapshot publish,
    compaction, rotation, re-key, KEK rotation): any exception that escapes -- an OSError (failed
    write, fsync, rename, unlink, full disk), but also KeyboardInterrupt, MemoryError or an
    exception raised from a signal handler -- leaves the store failed: it refuses writes with
    StoreFailedError until it is reopened, which runs recovery.  An OSError surfaces as
    StoreFailedError; anything else propagates unchanged.  Validation of the caller's arguments
    happens before a guard is entered, and the host's own code (a snapshot source, the stream a
    snapshot is read from) runs outside guards: its exceptions leave the store as it is."""

    __slots__ = ("store", "what")

    def __init__(self, store: "Store", what: str):
        self.store, self.what = store, what

    def __enter__(self) -> "FailStop":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc_type is None or exc is None:
            return False
        self.store.wal.fail(exc)
        if issubclass(exc_type, OSError):
            raise StoreFailedError(f"{self.what} failed: {exc}; the store refuses writes until it is reopened "
                                   "(reopening runs recovery; free space first if the disk is full)") from exc
        return False
