"""``devinterp`` command line: ``run | estimate | stages | dashboard``.

Each subcommand lives in its own module and exposes ``main(argv) -> int``; this file only
dispatches and turns user errors into one line and exit code 2 (``--debug`` shows the traceback).
Subcommands build their parsers with :class:`ArgumentParser`, whose errors are one line too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

COMMANDS = {
    "run": ("devinterp.experiment", "train a config-driven experiment with the LLC callback"),
    "estimate": ("devinterp.posthoc", "estimate λ̂ for the snapshots of a run directory"),
    "stages": ("devinterp.stages", "detect developmental stages in a run's λ̂ curve"),
    "dashboard": ("devinterp.dashboard", "write or serve the dashboard of one or many runs"),
}

USAGE = "usage: devinterp {run,estimate,stages,dashboard} [--debug] ...\n\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()
)

#: Exceptions that mean "the user asked for something wrong", not "the program is broken".
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
               KeyError)


class UsageError(Exception):
    """A mistake in the user's command or config: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises :class:`UsageError` (one line) instead of printing
    the usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_command(prog: str, main: Callable[[list[str]], int], argv: list[str],
                debug: bool = False) -> int:
    """Call ``main(argv)``; print a user error as ``PROG: error: ...`` and return 2."""
    try:
        return int(main(argv) or 0)
    except (UsageError, *USER_ERRORS) as e:
        if debug:
            raise
        text = str(e).strip()
        msg = text.splitlines()[0] if text else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``devinterp`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"devinterp: error: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return run_command(f"devinterp {cmd}", module.main, rest, debug)


if __name__ == "__main__":
    sys.exit(main())
