"""``devinterp`` command line: ``run | estimate | stages | dashboard``.

Each subcommand lives in its own module and exposes ``main(argv) -> int``: ``run`` in
:mod:`devinterp.cli.run` (with LightningCLI in :mod:`devinterp.cli._lightning`), ``stages`` in
:mod:`devinterp.cli.stages`, ``estimate`` in :mod:`devinterp.cli.estimate` and ``dashboard``
in :mod:`devinterp.cli.dashboard`. Command lines are parsed only in these command modules; library
code raises plain errors (ValueError, FileNotFoundError, ...). This file only
dispatches and turns user errors into one line and exit code 2 (``--debug`` shows the traceback).
Subcommands build their parsers with :class:`ArgumentParser`, whose errors are one line too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

__all__ = [
    "ArgumentParser",
    "COMMANDS",
    "THREAD_ENV",
    "USAGE",
    "USER_ERRORS",
    "UsageError",
    "add_threads_argument",
    "apply_threads",
    "importable_from",
    "main",
    "run_command",
    "thread_count",
]

COMMANDS = {
    "run": ("devinterp.cli.run", "train a config-driven experiment with the LLC callback"),
    "estimate": ("devinterp.cli.estimate", "estimate λ̂ for the snapshots of a run directory"),
    "stages": ("devinterp.cli.stages", "detect developmental stages in a run's λ̂ curve"),
    "dashboard": ("devinterp.cli.dashboard", "write or serve the dashboard of one or many runs"),
}

USAGE = "usage: devinterp {run,estimate,stages,dashboard} [--debug] ...\n\n" + "\n".join(
    f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()
)

#: Exceptions that mean "the user asked for something wrong", not "the program is broken".
#: ``OSError`` (a full disk, an unreadable file, and its subclasses FileNotFoundError,
#: NotADirectoryError, PermissionError) is the user's to fix too: one line, not a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
               KeyError, OSError)


class UsageError(Exception):
    """A mistake in the user's command or config: reported as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises :class:`UsageError` (one line) instead of printing
    the usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


#: Environment variables that size the thread pools of torch, OpenMP and the BLAS libraries when
#: they load: set by :func:`apply_threads` for libraries not loaded yet and for child processes.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_count(text: str) -> int:
    """argparse type of ``--threads``: a positive integer, or a one-line error saying so."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be a positive integer, got {text!r}")
    return n


def add_threads_argument(parser: argparse.ArgumentParser, *, default: str = "the library's "
                         "choice") -> None:
    """Add ``--threads N`` to a command's parser (one spelling and one check for every command);
    ``default`` says in the help what the command does without it. Pass the parsed value to
    :func:`apply_threads`."""
    parser.add_argument(
        "--threads", type=thread_count, default=None, metavar="N",
        help="threads for torch, OpenMP and BLAS (torch.set_num_threads and the "
             f"OMP/MKL/OpenBLAS pools); default: {default}")


def apply_threads(n: int | None) -> None:
    """Run torch and the OpenMP / BLAS pools on ``n`` threads; None leaves them as they are.

    Pools already loaded are resized now (torch only if it is imported: this never imports it,
    so a command can call this before its heavy imports); ``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` are set so that libraries loaded later and
    child processes (e.g. post-hoc workers) start with ``n`` too.
    """
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    for name in THREAD_ENV:
        os.environ[name] = str(n)
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


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


def importable_from(*folders: str | os.PathLike) -> None:
    """Append ``folders`` to ``sys.path`` (each once): their modules become importable, while
    an installed package of the same name still wins."""
    for folder in map(str, folders):
        if folder not in sys.path:
            sys.path.append(folder)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``devinterp`` console script.

    The current directory's modules are importable, as under ``python -m devinterp`` (the
    console script alone would not see them): a config's ``class_path`` or ``--module``
    ``experiments.tms:...`` run from the repository root finds the repository's
    ``experiments``, which is not installed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    importable_from(os.getcwd())
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
