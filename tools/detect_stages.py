"""Detect developmental stages in a λ̂ curve (a thin CLI over ``devinterp.stages``).

    python tools/detect_stages.py INPUT [--method auto|critical|pelt|binseg] [--json]
                                        [--min-stage-length DECADES] [--no-write | --force]
                                        [--threads N]

INPUT is a run directory or a CSV with columns ``step, llc_mean`` (optional ``llc_std``,
``loss``, ``num_chains``). Prints a stage table with the range of each milestone; writes
``stages.json`` into a run directory, unless it holds stages found with another method or other
settings (``--force`` replaces them); with ``--json`` prints only a JSON list of stage dicts.
Bad input exits with code 2 and one line on stderr saying what is wrong and how to fix it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devinterp.cli import run_command  # noqa: E402
from devinterp.cli.stages import main  # noqa: E402

__all__ = ["run"]

PROG = "detect_stages.py"


def run(argv: list[str] | None = None) -> int:
    """``main`` with user errors turned into one line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    return run_command(PROG, lambda a: main(a, prog=PROG), args, debug=debug)


if __name__ == "__main__":
    sys.exit(run())
