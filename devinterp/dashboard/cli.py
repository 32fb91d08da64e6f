"""``devinterp dashboard``: write one self-contained HTML file, or serve a folder of runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from devinterp.cli import ArgumentParser, UsageError
from devinterp.dashboard.page import DEFAULT_MAX_TRACE_VALUES, build_page, load_runs, render_html
from devinterp.dashboard.server import serve

EXAMPLES = """examples:
  devinterp dashboard runs/tms -o tms.html                  one run, one offline HTML file
  devinterp dashboard runs/seed0 runs/seed1 -o seeds.html   runs overlaid on one step axis
  devinterp dashboard runs --serve                          http://127.0.0.1:8765/, live
"""


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
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS",
                   help="how often served pages check for new λ̂ rows (default 5)")
    p.add_argument("--max-trace-values", type=int, default=DEFAULT_MAX_TRACE_VALUES,
                   metavar="N",
                   help="loss-trace values (chains × draws, over checkpoints) to embed in a "
                        f"file (default {DEFAULT_MAX_TRACE_VALUES}; 0: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``devinterp dashboard``; returns the exit code."""
    args = _parser().parse_args(argv)
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
    runs = load_runs(args.paths)
    text = render_html(build_page(runs, max_trace_values=args.max_trace_values))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(runs)} run{'s' if len(runs) > 1 else ''}, "
          f"{out.stat().st_size / 1e6:.1f} MB)")
    return 0
