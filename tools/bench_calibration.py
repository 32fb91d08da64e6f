"""Cost of choosing the step size: per run (run-level calibration) and per estimate_llc call.

    python tools/bench_calibration.py [--steps 1000] [--chains 4] [--draws 200]

1. Per run, as a fraction of the run's total estimation time (target <= 10 %): the README
   example's module (``docs/examples/regression.py``: a 97-weight MLP, 1,000 Adam steps, 12
   checkpoints) tracked by ``LLCCallback`` with the step size unset, inline, and as a deferred
   run estimated by ``estimate_run``. Time inside ``calibrate_step_size`` against time inside
   ``estimate_llc``, both measured by wrapping them.
2. Per call at ``--chains`` x ``--draws`` (target <= 10 %): ``estimate_llc(step_size="auto")``'s
   own calibration time over the rest of the call, on that MLP at its last checkpoint and on the
   project's small transformer (``experiments/transformer.py``) at initialization.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "docs" / "examples")]

import devinterp.llc  # noqa: E402
from devinterp import LLCCallback, estimate_llc, load_run  # noqa: E402
from devinterp.run.estimate import estimate_run  # noqa: E402


@contextlib.contextmanager
def timed(names: tuple[str, ...]) -> Iterator[dict[str, float]]:
    """Seconds spent inside ``devinterp.llc.<name>`` for each name (the callback and
    ``estimate_run`` look them up there at call time)."""
    spent = dict.fromkeys(names, 0.0)
    real = {n: getattr(devinterp.llc, n) for n in names}

    def wrap(name: str) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return real[name](*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        return inner

    for n in names:
        setattr(devinterp.llc, n, wrap(n))
    try:
        yield spent
    finally:
        for n, f in real.items():
            setattr(devinterp.llc, n, f)


def train(run_dir: Path, mode: str, steps: int, chains: int, draws: int) -> None:
    from regression import Regression

    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(run_dir, mode=mode, log_spaced=8, every_n_train_steps=steps // 4,
                     num_chains=chains, num_draws=draws, progress=False)
    pl.Trainer(max_steps=steps, callbacks=[cb], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=run_dir.parent).fit(Regression())


def per_run(args: argparse.Namespace, tmp: Path) -> None:
    names = ("calibrate_step_size", "estimate_llc")
    print(f"1. per run: README example MLP, {args.steps} steps, {args.chains} chains x "
          f"{args.draws} draws, step size unset (target <= 10 %)")
    with timed(names) as inline:
        train(tmp / "inline", "inline", args.steps, args.chains, args.draws)
    train(tmp / "deferred", "deferred", args.steps, args.chains, args.draws)
    with timed(names) as posthoc:
        estimate_run(tmp / "deferred", module="regression:Regression", progress=False)
    for label, spent, run in (("inline", inline, tmp / "inline"),
                              ("post-hoc", posthoc, tmp / "deferred")):
        (entry,) = load_run(run).calibration.values()
        cal, est = spent["calibrate_step_size"], spent["estimate_llc"]
        tried = len(entry["attempts"]) + len(entry["calibrated_on"])
        print(f"   {label:8s}: calibration {cal:6.2f} s ({tried} checkpoints calibrated), "
              f"estimates {est:6.2f} s over {len(load_run(run).llc)} checkpoints: "
              f"{cal / (cal + est):.1%} of the run's estimation time")


def per_call(args: argparse.Namespace, tmp: Path) -> None:
    from regression import Regression

    from experiments.transformer import Transformer

    print(f"2. per estimate_llc call, {args.chains} chains x {args.draws} draws, step_size="
          "'auto' (target <= 10 %)")
    mlp = Regression()
    mlp.load_state_dict(torch.load(sorted(load_run(tmp / "inline").snapshots.items())[-1][1],
                                   weights_only=True))
    data = mlp.train_dataloader().dataset.tensors

    def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((out - y) ** 2).mean()

    torch.manual_seed(0)  # as tools/bench_refined.py: targets near the model's outputs
    net = Transformer(32, 2, 4, 8)
    seq = torch.randn(2048, 8, 32)
    with torch.no_grad():
        target = net(seq) + 0.1 * torch.randn_like(seq)
    for label, model, d in (("README MLP (97 weights), last checkpoint", mlp, data),
                            ("transformer (2 layers, width 32), init", net, (seq, target))):
        r = estimate_llc(model, d, half_mse, num_chains=args.chains, num_draws=args.draws)
        cal = r.diagnostics["calibration_s"]
        rest = r.diagnostics["elapsed_s"] - cal
        print(f"   {label}: calibration {cal:.2f} s, the estimate {rest:.2f} s: "
              f"{cal / rest:.0%} extra ({r.diagnostics['calibration_rounds']} pilot rounds)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=200)
    args = p.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as d:
        per_run(args, Path(d))
        per_call(args, Path(d))


if __name__ == "__main__":
    main()
