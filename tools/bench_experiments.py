"""Wall time and λ̂ settings of every experiment config, as a Markdown table for the README.

Runs ``devinterp run CONFIG`` in a fresh process per config (the time a user waits, imports
included) and reads the run directory back: λ̂ checkpoints and sampler settings from
``llc.csv``, the final λ̂, the number of stages.

    python tools/bench_experiments.py                        # every configs/*.yaml
    python tools/bench_experiments.py configs/quickstart.yaml --threads 2
    python tools/bench_experiments.py --override=--trainer.max_steps=50   # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from devinterp import load_run

__all__ = ["bench", "main", "markdown"]

REPO = Path(__file__).resolve().parents[1]


def bench(config: Path, run_dir: Path, overrides: list[str], threads: int | None) -> dict:
    """Run one config end to end and describe it: one row of the table."""
    env = dict(os.environ, WANDB_MODE="offline")
    # `devinterp run --threads` overrides the config's torch_threads (OMP_NUM_THREADS alone
    # would not: torch.set_num_threads from the config wins over it).
    command = [sys.executable, "-m", "devinterp", "run", str(config), "--run-dir", str(run_dir),
               "--trainer.enable_progress_bar=false", *overrides,
               *(["--threads", str(threads)] if threads else [])]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    run = load_run(run_dir)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    llc = run.llc
    first = next(iter(run.snapshots.values()), None)
    params = (sum(t.numel() for t in torch.load(first, weights_only=True).values())
              if first else None)
    return {
        "config": config.name,
        "model": resolved["model"]["class_path"].rsplit(".", 1)[-1],
        "params": params,
        "steps": resolved["trainer"]["max_steps"],
        "checkpoints": len(llc),
        "chains × draws": f"{int(llc['num_chains'].iloc[0])} × {int(llc['num_draws'].iloc[0])}",
        "burn-in": int(llc["num_burnin"].iloc[0]),
        "batch": int(llc["batch_size"].iloc[0]),
        "sampler": llc["sampler"].iloc[0],
        "nβ": f"{llc['nbeta'].median():.4g}",
        "step size (median)": f"{llc['step_size'].median():.2g}",
        "final λ̂": f"{llc['llc_mean'].iloc[-1]:.4g} ± {llc['llc_std'].iloc[-1]:.2g}",
        "stages": len(run.stages),
        "wall time (s)": f"{wall:.0f}",
    }


def markdown(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path,
                        help="config files (default: every configs/*.yaml)")
    parser.add_argument("--threads", type=int,
                        help="devinterp run --threads N for every run (overrides each config's "
                             "torch_threads)")
    parser.add_argument("--out", type=Path, help="keep the run directories here")
    parser.add_argument("--override", action="append", default=[], metavar="ARG",
                        help="a LightningCLI override for every run (repeatable)")
    args = parser.parse_args(argv)
    configs = args.configs or sorted((REPO / "configs").glob("*.yaml"))
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_experiments_"))
    rows = []
    for config in configs:
        print(f"running {config} ...", file=sys.stderr, flush=True)
        rows.append(bench(config.resolve(), out / config.stem, args.override, args.threads))
        print(f"  {rows[-1]['wall time (s)']} s", file=sys.stderr, flush=True)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, threads: "
          + (f"--threads {args.threads}" if args.threads else "each config's torch_threads")
          + (f", overrides: {' '.join(args.override)}" if args.override else "") + "\n")
    print(markdown(rows))
    print(f"\nrun directories: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
