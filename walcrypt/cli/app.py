"""The ``walcrypt`` group and the ``command`` decorator every subcommand is declared with."""

from __future__ import annotations

import logging

import click

from .context import Ctx
from .errors import EXIT_CODES, Root

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


@click.group(cls=Root, help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("--progress/--no-progress", default=None, help="Force progress bars on or off (default: on a terminal).")
@click.version_option(package_name="walcrypt")
def main(debug: bool, progress: bool | None) -> None:
    Ctx.debug = debug
    Ctx.progress = progress
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR,
                        format="walcrypt: %(levelname)s: %(message)s")


def command(group=None, **kw):
    """A subcommand whose --help ends with the exit codes."""
    kw.setdefault("epilog", EXIT_CODES)
    return (group or main).command(**kw)
