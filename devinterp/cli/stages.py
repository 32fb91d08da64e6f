"""``devinterp stages INPUT`` (and ``tools/detect_stages.py``): the command line of
:mod:`devinterp.stages`, kept out of the library so that importing it builds no parsers.

A run directory's ``stages.json`` is written only when that loses nothing: when there is none,
when it holds no stages, or when it was found with the same method and settings (a re-run on a
longer λ̂ table). Stages found with other settings, e.g. the default ones that training wrote,
are kept unless ``--force`` is given; the table is printed either way.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from devinterp.cli import ArgumentParser, add_threads_argument, apply_threads
from devinterp.run.store import STAGES_FILE
from devinterp.stages import (
    DEFAULT_METHOD,
    METHODS,
    StageRules,
    conflicting_stages,
    detect_with,
    format_table,
    make_detector,
    write_stages,
)

__all__ = ["main"]

#: Detector options on the command line: (name, type, metavar, help).
_DETECTOR_FLAGS = (
    ("min_stage_length", float, "DECADES", "shortest stage in decades of log10(step + 1)"),
    ("min_change", float, "FRACTION", "smallest stage as a fraction of the λ̂ range"),
    ("plateau_ratio", float, "R", "largest |slope| at a milestone relative to the steepest "
     "slope of the stages beside it"),
    ("significance", float, "Z", "standard errors of the fit a stage must change λ̂ by"),
    ("min_change_se", float, "K", "standard errors of one estimate (llc_std / "
     "sqrt(num_chains); llc_std without a num_chains column) a stage must change λ̂ by"),
    ("min_stage_checkpoints", int, "N", "fewest checkpoints the first and last stage span, "
     "ends included"),
)


def main(argv: list[str] | None = None, *, prog: str = "devinterp stages") -> int:
    """``devinterp stages INPUT``: print the stage table; write stages.json for a run directory
    unless that would replace stages found with other settings (then ``--force``).

    User errors (missing file or columns, too few checkpoints) raise ValueError /
    FileNotFoundError with a one-line message; the caller turns them into exit code 2.
    """
    defaults = asdict(StageRules())
    parser = ArgumentParser(
        prog=prog, allow_abbrev=False, description="Detect developmental stages (milestones = "
        "critical points of λ̂ over log-step) in a run directory or a CSV with columns step, "
        "llc_mean (optional llc_std, loss, num_chains). Prints a stage table; writes "
        "stages.json into a run directory unless it holds stages found with other settings.")
    parser.add_argument("input", help="run directory or CSV file")
    parser.add_argument("--method", default="auto", choices=["auto", *METHODS],
                        help=f"detector (auto = {DEFAULT_METHOD}, best on tools/bench_stages.py)")
    parser.add_argument("--json", action="store_true",
                        help="print only a JSON list of stage dicts on stdout")
    for name, kind, metavar, text in _DETECTOR_FLAGS:
        parser.add_argument("--" + name.replace("_", "-"), type=kind, metavar=metavar,
                            help=f"{text} (default {defaults[name]})")
    parser.add_argument("--joint", action="store_true",
                        help="with --method pelt/binseg: segment λ̂ and the loss together")
    write = parser.add_mutually_exclusive_group()
    write.add_argument("--no-write", action="store_true",
                       help="do not write stages.json into the run directory")
    write.add_argument("--force", action="store_true",
                       help="replace a stages.json found with another method or settings")
    add_threads_argument(parser, default="1 for the fit (fastest at its sizes on a busy "
                         "machine)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    options: dict[str, Any] = {name: getattr(args, name) for name, *_ in _DETECTOR_FLAGS
                               if getattr(args, name) is not None}
    if args.joint:
        options["joint"] = True
    if args.threads is not None:
        options["threads"] = args.threads
    detector = make_detector(args.method, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stages = detect_with(args.input, detector)
    for w in caught:
        print(f"{prog}: note: {w.message}", file=sys.stderr)
    if Path(args.input).is_dir() and not args.no_write:
        method = DEFAULT_METHOD if args.method == "auto" else args.method
        path = Path(args.input) / STAGES_FILE
        conflict = None if args.force else conflicting_stages(args.input, method,
                                                              detector.params)
        if conflict:
            print(f"{prog}: note: did not write {path}: {conflict}; add --force to replace "
                  "them", file=sys.stderr)
        else:
            write_stages(args.input, stages, method=method, params=detector.params)
            print(f"{prog}: wrote {path}", file=sys.stderr)
    print(json.dumps(stages) if args.json else format_table(stages))
    return 0
