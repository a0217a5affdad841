"""``python -m edgeseal.core``: the same as the ``edgeseal`` command."""

from edgeseal.core.cli import main

main()
