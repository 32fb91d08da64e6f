"""``devinterp`` command line: ``run | estimate | stages | dashboard``.

Each subcommand lives in its own module and exposes ``main(argv) -> int``; this file only
dispatches and turns user errors into one line and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("devinterp.experiment", "train a config-driven experiment with the LLC callback"),
    "estimate": ("devinterp.posthoc", "estimate λ̂ for the snapshots of a run directory"),
    "stages": ("devinterp.stages", "detect developmental stages in a run's λ̂ curve"),
    "dashboard": ("devinterp.dashboard", "write or serve the dashboard of one or many runs"),
}

USAGE = "usage: devinterp {run,estimate,stages,dashboard} [--debug] ...\n\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()
)


class UsageError(Exception):
    """A mistake in the user's command or config: reported as one line, exit code 2."""


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
    try:
        return int(module.main(rest) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError, PermissionError, KeyError) as e:
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"devinterp {cmd}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
