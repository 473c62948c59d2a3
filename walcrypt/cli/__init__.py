"""The ``walcrypt`` command: the operator's view of a store.

Exit codes: 0 ok, 1 findings or data errors, 2 usage errors (bad options, a missing or
wrong key, a missing directory, no permission, a store locked by a running process), 3 the key
service could not be reached.  Bad input gives one line on stderr saying what is wrong and what
to do, never a traceback (``walcrypt --debug ...`` shows one), and modifies nothing.  Read-only
commands (inspect, verify, dump, snapshot inspect, snapshot export) never write to the store
(beyond their reader slot in LMDB's ``meta/lock.mdb``).  inspect, verify and snapshot export take
no lock and work on a store whose writer is running (see ``walcrypt.online``); dump holds a
shared lock on ``DATA/LOCK`` while it reads, so it refuses a store a running process has open and
keeps one from opening it meanwhile.  Progress goes to stderr when it is a terminal
(``--progress`` / ``--no-progress`` override).

Damage (a data directory with its metadata missing or damaged included) is exit 1; only a
directory holding no walcrypt files is "not a walcrypt data directory".  With ``--json`` an error
is also a JSON object on stdout, ``{"error": {"kind", "type", "message", "hint", "path",
"exit_code"}}`` (kinds: ``errors.ERROR_KINDS``).

The package: ``app`` (the group), ``errors`` (exit codes and error output), ``options`` (key
options), ``output`` (JSON documents, tables), ``stores`` (opening stores, progress), and one
module per command group (``keys_cmds``, ``store_cmds``, ``snapshot_cmds``, ``legacy_cmds``,
``tools_cmds``), imported here so that their commands are registered on the group.  Each module
imports what it uses at its top, but for the tool subsystems only one command runs (the verify
walk, the inspect report, the meta/ rebuilder, migration, the demo, the legacy parsers): that
command imports them, for start-up time, as its comment says.
"""

from __future__ import annotations

from . import keys_cmds, legacy_cmds, snapshot_cmds, store_cmds, tools_cmds  # noqa: F401 - register the commands
from .app import main

__all__ = ["main"]
