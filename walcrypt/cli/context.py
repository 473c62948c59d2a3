"""What the running command knows beyond its arguments (set by the group and the key options)."""

from __future__ import annotations


class Ctx:
    debug = False
    progress: bool | None = None      # None: when stderr is a terminal
    json = False                      # --json given: errors are also a JSON object on stdout
    json_stream_open = False          # a --json document is being streamed (dump): close it around the error
    kek = None                        # the KEK the key options named (to explain a wrong key)
    source: str | None = None         # the store, export or snapshot file the command works on
