"""pysyncobj's own files, imported into an encrypted store the pysyncobj adapter resumes from.

What pysyncobj (0.3.x, ``pysyncobj/journal.py``, ``serializer.py``, ``syncobj.py``) writes, as this
reader understands it (formats/LEGACY.md, "pysyncobj", has the byte layout):

* The ``FileJournal`` file (``journalFile``): a 40-byte header - the application name
  ``PYSYNCOBJ`` NUL-padded to 24 bytes, pysyncobj's version string NUL-padded to 8, the format
  version (little-endian u32, 1) and the offset where the last record ends (u32) - then records,
  each a u32 length ``n``, ``n`` bytes (u64 index, u64 term, the command) and the same u32 length
  again.  The file is written through ``mmap`` and grown by doubling, so bytes past the recorded end
  are spare capacity or stale records; nothing is ever fsynced.
* ``<journalFile>.meta``: a pickle of a dict with ``currentTerm``, ``votedForNodeId`` and
  ``raftCommitIndex`` (replaced by rename, not fsynced).
* The full dump (``fullDumpFile``): gzip around a protocol-2 pickle of the tuple
  ``(state, last, prev, cluster)``: the state is the SyncObj's own fields (a dict) or, with
  consumers, ``[fields, consumer1, ...]``; ``last`` and ``prev`` are the journal entries
  ``(command, index, term)`` at and just before the last applied index; ``cluster`` is the set of
  nodes.  After a dump pysyncobj drops the journal up to ``prev``.

Trust: every byte is untrusted.  Lengths are checked against the file before anything is
allocated, pickles are walked opcode by opcode and loaded with a restricted loader that builds
nothing but plain values and pysyncobj's node classes (``_pickles``), the state machine's part of
the dump is carried into the encrypted snapshot as bytes without ever being unpickled here, and
the sources are opened read-only and never changed.

The work is done in the modules beside this one, each with one job: :mod:`.pysyncobj_read`
(the journal and its ``.meta``), :mod:`.pysyncobj_dump` (the full dump), :mod:`.pysyncobj_import`
(the import into a new store), :mod:`.pysyncobj_sources` (removing the sources afterwards) and
:mod:`.pysyncobj_detect` (finding the files); their names are all available from here.
"""

from __future__ import annotations

from ..adapters.pysyncobj_format import TERM_OFFSET  # noqa: F401 - the names of pysyncobj_files, used as P.<name>
from .pysyncobj_detect import MAX_SCAN, detect, sibling_files, sniff  # noqa: F401
from .pysyncobj_dump import MAX_DUMP_BYTES, PLAIN_BUDGET, dump_blob, read_dump  # noqa: F401
from .pysyncobj_import import BATCH_BYTES, import_pysyncobj  # noqa: F401
from .pysyncobj_read import (  # noqa: F401
    FORMAT_VERSION,
    HEADER_SIZE,
    LAST_OFFSET_AT,
    MAX_INDEX,
    MAX_META_BYTES,
    NAME,
    NAME_SIZE,
    RECORD_MIN,
    VERSION_SIZE,
    read_journal,
    read_meta,
)
from .pysyncobj_sources import STABLE_SOURCES, has_recorded_sources, removal_command, remove_sources  # noqa: F401
