"""Benchmark the dashboard: HTML size and time until the page has drawn in headless Chromium.

Cases: one run with 2,000 λ̂ points, and a comparison of 10 runs (200 points each). Every run
has stages, diagnostics (a few flagged) and loss traces. Time is measured in the page: from
navigation start to ``window.__dashboard.ready`` (all figures drawn), median of ``--repeats``
loads in one browser. The baseline row is an empty Plotly plot in an HTML file that embeds the
same plotly.js: the part of the time that is plotly.js itself being parsed and run.

    .venv/bin/python tools/bench_dashboard.py [--repeats 5] [--keep DIR] [--build-only]

Target: under 2 s to draw. Needs Debian's chromium (/usr/bin/chromium) and playwright.

It also times the Python page build (runs -> page model) of one run whose every row is
flagged, at 50k, 100k and 200k rows: the build is linear when doubling the rows doubles the
time (ratio ~2; a build quadratic in flagged rows gives ~4 and took minutes at 200k rows).
``--build-only`` runs just that part (no browser needed).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from screenshot_dashboard import CHROMIUM, CHROMIUM_ARGS  # tools/, next to this file

from devinterp.dashboard import build_html, build_page
from devinterp.dashboard.page import plotly_js
from devinterp.run.store import SETTINGS_FILE, STAGES_FILE, RunStore, atomic_write_bytes, load_run

#: Stage ends and λ̂ changes of the language-model run in Hoogland et al. 2024, arXiv 2402.02364.
STAGE_ENDS = [900, 6500, 8500, 17000, 50000]
STAGE_CHANGES = [26.4, 22.5, -1.57, 8.62, 1.77]


def write_synthetic_run(path: Path, n_points: int, *, seed: int = 0, chains: int = 4,
                        draws: int = 200, name: str | None = None) -> Path:
    """A run directory shaped like a real one: λ̂ that develops in the planted stages above."""
    rng = np.random.default_rng(seed)
    store = RunStore(path, create=True)
    steps = np.unique(np.concatenate([[0], np.geomspace(1, STAGE_ENDS[-1], n_points)
                                      .astype(int)]))
    while len(steps) < n_points:  # low steps collide after rounding: top up linearly
        extra = rng.integers(1, STAGE_ENDS[-1], n_points - len(steps))
        steps = np.unique(np.concatenate([steps, extra]))
    steps = steps[:n_points]
    logt = np.log10(steps + 1.0)
    llc = np.full(len(steps), 2.0)
    start = 0
    for end, change in zip(STAGE_ENDS, STAGE_CHANGES, strict=True):
        mid = (math.log10(start + 1) + math.log10(end + 1)) / 2
        llc += change / (1 + np.exp(-(logt - mid) * 8))
        start = end
    llc += rng.normal(0, 0.4, len(steps))
    loss = 3.2 * np.exp(-llc / 20) + 0.05 + rng.normal(0, 0.01, len(steps))
    store.upsert_rows("llc.csv", [{
        "step": int(s), "llc_mean": float(v), "llc_std": float(0.5 + 0.05 * abs(v)),
        "init_loss": float(lo), "rhat": float(1.3 if k % 97 == 50 else 1.0 + rng.uniform(0, 0.04)),
        "ess": float(rng.uniform(150, 600)),
        "mala_acceptance": float(0.3 if k % 131 == 70 else rng.uniform(0.85, 0.95)),
        "num_diverged": int(k % 173 == 90), "frac_below_baseline": float(rng.uniform(0, 0.05)),
        "nbeta": 60.0, "step_size": 1e-3,
        "warnings": ["split R-hat is 1.30 (> 1.1): chains disagree"] if k % 97 == 50 else [],
    } for k, (s, v, lo) in enumerate(zip(steps, llc, loss, strict=True))])
    metric_steps = np.unique(np.geomspace(1, STAGE_ENDS[-1], 400).astype(int))
    train = np.interp(metric_steps, steps, loss) + rng.normal(0, 0.02, len(metric_steps))
    store.write_metrics([{"step": int(s), "train_loss": float(t), "val_loss": float(t + 0.04)}
                         for s, t in zip(metric_steps, train, strict=True)])
    stages, start = [], 0
    for k, (end, change) in enumerate(zip(STAGE_ENDS, STAGE_CHANGES, strict=True)):
        stages.append({"start_step": start, "end_step": end, "type": "A" if change > 0 else "B",
                       "llc_change": change, "loss_change": -0.3 / (k + 1)})
        start = end
    store.write_json(STAGES_FILE, {"method": "synthetic", "params": {}, "stages": stages})
    store.write_json(SETTINGS_FILE, {"sampler": "sgld", "nbeta": 60.0, "step_size": 1e-3,
                                     "localization": 6.0, "num_chains": chains,
                                     "num_draws": draws, "num_burnin": 100, "seed": seed})
    store.write_json("run.json", {"name": name or path.name, "model": "synthetic"})
    for s, v, lo in zip(steps, llc, loss, strict=True):
        noise = np.cumsum(rng.normal(0, 0.002, (chains, draws)), axis=1) * 0.1
        store.save_trace(int(s), lo + v / 60 + noise + rng.normal(0, 0.004, (chains, draws)))
    return path


def write_flagged_run(path: Path, n_rows: int) -> Path:
    """A λ̂ table of ``n_rows`` rows, each flagged twice (R-hat and the estimator's warning)."""
    store = RunStore(path, create=True)
    steps = np.arange(n_rows)
    store.upsert_rows("llc.csv", [{
        "step": int(s), "llc_mean": 1.0 + (s % 7), "llc_std": 0.1, "rhat": 1.5, "ess": 300.0,
        "num_chains": 4, "warnings": "split R-hat is 1.50 (> 1.1): chains disagree"}
        for s in steps.tolist()])
    return path


def build_scaling(work: Path, sizes: tuple[int, ...] = (50_000, 100_000, 200_000),
                  repeats: int = 2) -> None:
    """Print the page-build time of fully flagged tables (best of ``repeats``; the tables are
    written first) and the ratio per doubling."""
    runs = {n: load_run(write_flagged_run(work / f"flagged{n}", n)) for n in sizes}
    print(f"\n{'flagged λ̂ rows':>15} {'build s':>8} {'x previous':>10}")
    previous = None
    for n, run in runs.items():
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            build_page([run], embed_traces=False)
            best = min(best, time.perf_counter() - t)
        ratio = f"{best / previous:.2f}" if previous else "—"
        print(f"{n:>15,} {best:>8.2f} {ratio:>10}")
        previous = best
    print("(rows doubled each line: a ratio near 2 is linear, near 4 quadratic; best of "
          f"{repeats} builds)")


def time_to_draw(page, url: str) -> tuple[float, float, float]:
    """Milliseconds from navigation start until plotly.js has run, the first figure has
    drawn, and every figure has drawn."""
    page.goto(url)
    page.wait_for_function("() => window.__drawnAt || (window.__dashboard && "
                           "window.__dashboard.ready)", timeout=60_000)
    return tuple(page.evaluate("""() => window.__drawnAt ?
        [window.__scriptAt, window.__drawnAt, window.__drawnAt] :
        [window.__dashboard.scriptAt, window.__dashboard.mainAt, window.__dashboard.drawnAt]"""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="keep the run dirs and HTML files here")
    ap.add_argument("--build-only", action="store_true",
                    help="only time the Python page build of large flagged tables")
    args = ap.parse_args(argv)
    if args.build_only:
        with tempfile.TemporaryDirectory(prefix="bench_dashboard_") as tmp:
            build_scaling(Path(tmp))
        return 0
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed: pip install playwright", file=sys.stderr)
        return 2
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: apt-get install chromium", file=sys.stderr)
        return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_dashboard_"))
    work.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    single = [write_synthetic_run(work / "single", 2000, seed=1)]
    seeds = [write_synthetic_run(work / "seeds" / f"seed{k}", 200, seed=k, name=f"seed {k}")
             for k in range(10)]
    print(f"wrote synthetic runs in {time.perf_counter() - t:.1f} s under {work}")

    baseline = work / "plotly_only.html"
    atomic_write_bytes(baseline, (
        "<!DOCTYPE html><html><body><div id='g'></div><script>" + plotly_js() + "</script>"
        "<script>window.__scriptAt = performance.now(); Plotly.newPlot('g', [{x: [1, 10], y: [1, 2]}], {xaxis: {type: 'log'}})"
        ".then(function () { window.__drawnAt = performance.now(); });</script></body></html>"
    ).encode())
    cases = [("plotly.js alone (baseline)", baseline, None)]
    for label, runs, file in (("1 run × 2,000 λ̂ points", single, "single.html"),
                              ("10 runs × 200 λ̂ points", seeds, "compare10.html")):
        t = time.perf_counter()
        text = build_html(runs)
        build_s = time.perf_counter() - t
        out = work / file
        atomic_write_bytes(out, text.encode("utf-8"))
        cases.append((label, out, build_s))

    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Cases take turns within each repeat, so a change in machine load hits them alike.
        times: list[list[tuple[float, float, float]]] = [[] for _ in cases]
        for _ in range(args.repeats):
            for k, (_, path, _) in enumerate(cases):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                times[k].append(time_to_draw(page, path.as_uri()))
                page.close()
        browser.close()
    for (label, path, build_s), case_times in zip(cases, times, strict=True):
        script, first, drawn = (statistics.median(t[k] for t in case_times) for k in range(3))
        rows.append((label, path.stat().st_size / 1e6, build_s, script, first, drawn))

    base = rows[0][5]
    print(f"\n{'case':<28} {'HTML MB':>8} {'build s':>8} {'plotly ms':>10} {'first ms':>9} "
          f"{'drawn ms':>9} {'vs plotly':>9} {'< 2 s':>6}")
    for label, mb, build_s, script, first, drawn in rows:
        build = f"{build_s:.2f}" if build_s is not None else "—"
        print(f"{label:<28} {mb:>8.2f} {build:>8} {script:>10.0f} {first:>9.0f} {drawn:>9.0f} "
              f"{drawn / base:>8.2f}x {'yes' if drawn < 2000 else 'NO':>6}")
    build_scaling(work)
    print(f"\nmedians over {args.repeats} loads, ms from navigation start: plotly = plotly.js "
          "parsed and run; first = loss/λ̂ figure drawn; drawn = every figure drawn (the "
          "target). vs plotly: drawn / drawn of plotly.js alone. build s: Python, runs -> HTML.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
