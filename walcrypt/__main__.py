"""``python -m walcrypt``: the same as the ``walcrypt`` command."""

from .cli import main

main(prog_name="walcrypt")
