import sys

from devinterp.cli import main

__all__: list[str] = []  # ``python -m devinterp`` runs the command line; nothing to import

sys.exit(main())
