"""``devinterp dashboard``: write one self-contained HTML file, or serve a folder of runs
(the page is built by :mod:`devinterp.dashboard`, which raises plain errors; this module turns
the command line into its calls)."""

from __future__ import annotations

import argparse
from pathlib import Path

from devinterp.cli import ArgumentParser, UsageError, add_threads_argument, apply_threads
from devinterp.dashboard.page import DEFAULT_MAX_TRACE_VALUES, build_page, load_runs, render_html
from devinterp.dashboard.server import serve
from devinterp.run.store import atomic_write_bytes

__all__ = ["EXAMPLES", "main"]

EXAMPLES = """examples:
  devinterp dashboard runs/tms -o tms.html                  one run, one offline HTML file
  devinterp dashboard runs/seed0 runs/seed1 -o seeds.html   runs overlaid on one step axis
  devinterp dashboard runs --serve                          http://127.0.0.1:8765/, live
"""


def _port(text: str) -> int:
    """A TCP port for ``--port``: an integer in 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number: use 0-65535 "
                                         "(0 picks a free one)")
    return port


def _seconds(text: str) -> float:
    """A positive number of seconds for ``--poll``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="devinterp dashboard", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Loss, λ̂ and developmental stages of one run or many, with sampler "
                    "diagnostics and chain loss traces.")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR",
                   help="run directories to show (with --serve: one folder holding runs)")
    p.add_argument("-o", "--output", metavar="FILE.html",
                   help="write a self-contained HTML file (opens with no network)")
    p.add_argument("--serve", action="store_true",
                   help="serve the runs under the folder; pages pick up new λ̂ rows")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8765,
                   help="port to listen on (default 8765; 0: any free port)")
    p.add_argument("--poll", type=_seconds, default=5.0, metavar="SECONDS",
                   help="how often served pages check for new λ̂ rows (default 5)")
    p.add_argument("--max-trace-values", type=int, default=DEFAULT_MAX_TRACE_VALUES,
                   metavar="N",
                   help="loss-trace values (chains × draws, over checkpoints) to embed in a "
                        f"file (default {DEFAULT_MAX_TRACE_VALUES}; 0: none)")
    add_threads_argument(p, default="as the environment sets them")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``devinterp dashboard``; returns the exit code."""
    args = _parser().parse_args(argv)
    apply_threads(args.threads)
    if args.serve:
        if args.output:
            raise UsageError("--serve and -o exclude each other; drop one of them")
        if len(args.paths) != 1:
            raise UsageError("--serve takes one folder (it finds the runs below it); "
                             "pass a single ROOT")
        serve(args.paths[0], host=args.host, port=args.port, poll_seconds=args.poll)
        return 0
    if not args.output:
        raise UsageError("say where the dashboard goes: -o FILE.html writes a file, "
                         "--serve starts a local server")
    if args.max_trace_values < 0:
        raise UsageError("--max-trace-values must be >= 0")
    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"-o {args.output} is a directory; name the file to write, e.g. "
                         f"-o {out / 'dashboard.html'}")
    try:
        runs = load_runs(args.paths)
    except (FileNotFoundError, NotADirectoryError, PermissionError):  # one line already
        raise
    except OSError as e:
        raise UsageError(f"cannot read {e.filename or 'a run directory'}: "
                         f"{e.strerror or e}") from e
    text = render_html(build_page(runs, max_trace_values=args.max_trace_values))
    try:
        # Temp file + rename: an existing dashboard is replaced whole or left as it was.
        atomic_write_bytes(out, text.encode("utf-8"))
    except OSError as e:
        raise UsageError(f"cannot write {args.output}: {e.strerror or e}; choose another "
                         "-o FILE.html") from e
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''}, "
          f"{out.stat().st_size / 1e6:.1f} MB)")
    return 0
