"""Peak memory and time of stage detection against the number of λ̂ rows, up to 100,000.

    python tools/bench_stages_memory.py [--method critical] [--rows 1000,10000,100000]
                                        [--full-rows 500,1000,2000] [--threads N]

Each case runs in a fresh process: a planted curve shaped like the paper's language model
(devinterp.synthetic), its rows spread evenly over steps 0..99,999 plus 100 log-spaced ones,
then ``detect_stages``. Printed per case: rows, the points the detector fitted, the peak of
Python and NumPy allocations during detection (tracemalloc), the growth of the process's peak
resident memory during detection (getrusage; includes LAPACK workspaces), wall time, and
whether the planted stages were found (count, types, milestones within 0.1 decades).
Default-method rows are binned to at most ``MAX_POINTS``; the ``max_points=None`` rows fit
every checkpoint and show the quadratic growth that binning removes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devinterp.stages import MAX_POINTS, detect_with, log_step, make_detector  # noqa: E402
from devinterp.synthetic import language_model_transitions, planted_llc_curve  # noqa: E402

__all__ = ["curve_steps", "main", "one"]

LAST_STEP = 99_999
MARGIN = 0.1  # decades of log10(step + 1), as in tools/bench_stages.py


def curve_steps(rows: int) -> np.ndarray:
    """About ``rows`` checkpoint steps: evenly spaced over 0..LAST_STEP, plus 100 log-spaced."""
    linear = np.round(np.linspace(0, LAST_STEP, max(rows - 100, 2)))
    return np.unique(np.r_[linear, np.round(np.geomspace(1, LAST_STEP, 100))]).astype(np.int64)


def one(rows: int, method: str, max_points: int | None, threads: int) -> dict:
    """Detect the stages of one planted curve in this process and measure it."""
    curve, truth, types = planted_llc_curve(language_model_transitions(),
                                            steps=curve_steps(rows), noise=0.003, seed=0)
    detector = make_detector(method, max_points=max_points, threads=threads)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stages = detect_with(curve, detector)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ends = [s["end_step"] for s in stages[:-1]]
    found = (len(ends) == len(truth) and [s["type"] for s in stages] == types
             and bool(np.all(np.abs(log_step(ends) - log_step(truth)) <= MARGIN)))
    return {"rows": len(curve), "fitted": len(detector.points_.x), "traced_mb": peak / 2**20,
            "rss_growth_mb": (rss1 - rss0) / 1024, "seconds": seconds, "found": found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="critical", help="detector (default critical)")
    parser.add_argument("--rows", default="1000,10000,100000",
                        help="row counts with the default binning (comma-separated)")
    parser.add_argument("--full-rows", default="500,1000,2000",
                        help="row counts fitted without binning (max_points=None); '' for none")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads of the fit (the detector's threads; default 1)")
    parser.add_argument("--one", nargs=2, metavar=("ROWS", "MAX_POINTS"),
                        help=argparse.SUPPRESS)  # a single case, in this process, as JSON
    args = parser.parse_args(argv)
    if args.one:
        rows, cap = int(args.one[0]), None if args.one[1] == "none" else int(args.one[1])
        print(json.dumps(one(rows, args.method, cap, args.threads)))
        return 0
    cases = ([(int(r), str(MAX_POINTS)) for r in args.rows.split(",") if r]
             + [(int(r), "none") for r in args.full_rows.split(",") if r])
    print(f"method {args.method}; default max_points = {MAX_POINTS}; {args.threads} BLAS "
          "thread(s)\n")
    print(f"{'rows':>7} {'max_points':>10} {'fitted':>6} {'traced MB':>9} {'RSS growth MB':>13} "
          f"{'seconds':>7} {'planted stages found':>20}")
    results = {}
    for rows, cap in cases:
        proc = subprocess.run([sys.executable, __file__, "--method", args.method, "--threads",
                               str(args.threads), "--one", str(rows), cap],
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[(rows, cap)] = r
        print(f"{r['rows']:>7,} {cap:>10} {r['fitted']:>6,} {r['traced_mb']:>9.1f} "
              f"{r['rss_growth_mb']:>13.1f} {r['seconds']:>7.2f} {str(r['found']):>20}",
              flush=True)
    binned = [results[c] for c in cases if c[1] != "none"]
    full = [results[c] for c in cases if c[1] == "none"]
    if len(binned) > 1:
        lo, hi = binned[0], binned[-1]
        print(f"\nbinned: {hi['rows'] / lo['rows']:.0f}x the rows -> "
              f"{hi['traced_mb'] / lo['traced_mb']:.2f}x the traced peak")
    if len(full) > 1:
        lo, hi = full[0], full[-1]
        growth = np.log(hi["traced_mb"] / lo["traced_mb"]) / np.log(hi["rows"] / lo["rows"])
        at = binned[-1]["rows"] if binned else 100_000
        print(f"unbinned: traced peak grows as rows^{growth:.2f}; extrapolated to {at:,} rows: "
              f"{hi['traced_mb'] * (at / hi['rows']) ** growth / 1024:,.0f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
