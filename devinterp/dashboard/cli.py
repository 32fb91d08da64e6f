"""``devinterp dashboard`` lives in :mod:`devinterp.cli.dashboard` (command lines are parsed only
under :mod:`devinterp.cli`); :func:`main` here forwards to it so that
``devinterp.dashboard.main`` keeps working."""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``devinterp dashboard``: see :func:`devinterp.cli.dashboard.main`."""
    # Imported here: devinterp.cli.dashboard imports this package, which imports this module.
    from devinterp.cli.dashboard import main as command

    return command(argv)
