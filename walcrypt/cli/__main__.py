"""``python -m walcrypt.cli``: the same as the ``walcrypt`` command."""

from . import main

main()
