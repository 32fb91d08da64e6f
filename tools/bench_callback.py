"""Overhead of LLCCallback on training wall time; prints ratios from one run.

1. deferred: training with ``LLCCallback(mode="deferred")`` (snapshots + metrics only) against
   the same training without the callback. Target: <= 1.05.
2. inline: training with ``LLCCallback(mode="inline")`` against training without it plus the
   time ``estimate_llc`` alone takes on the same snapshots. Target: <= 1.05.

Each repeat runs the three variants back to back, in rotating order. Printed: the ratio of the
best times over ``--repeats`` repeats (noise on a shared machine only adds time; for inline the
best of a sum is compared with a sum of bests, which errs against the callback), and the median
and range of the ratios taken within each repeat. Every run trains the same model from the
same seed. Both move by several percent between runs on a shared virtual machine, so the
callback's own time is also measured directly: the time inside its hooks less the time inside
``estimate_llc``.

    .venv/bin/python tools/bench_callback.py [--steps 2000] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import devinterp.tracking.callback
from devinterp import LLCCallback, estimate_llc, load_run

ESTIMATOR = {"num_chains": 4, "num_draws": 100, "num_burnin": 100, "batch_size": 256,
             "step_size": 1e-5}


class MLP(pl.LightningModule):
    """A 32-128-128-1 regression MLP: a few milliseconds per training step on a CPU."""

    def __init__(self, width: int = 128, n: int = 4096, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, 1))
        self.loss_fn = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.hparams.n, 32, generator=g)
        y = torch.sin(x[:, :1]) + 0.1 * x[:, 1:2]
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def train(steps: int, callback: LLCCallback | None, root: str) -> float:
    """Wall time of ``trainer.fit`` (model construction and trainer setup excluded)."""
    pl.seed_everything(0, verbose=False)
    model = MLP()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[callback] if callback else [],
    )
    start = time.perf_counter()
    trainer.fit(model)
    return time.perf_counter() - start


def bare_estimation(run_dir: str) -> float:
    """Time ``estimate_llc`` alone takes on every snapshot of ``run_dir``."""
    data = MLP().train_dataloader().dataset
    models = []
    for path in load_run(run_dir).snapshots.values():
        model = MLP()
        model.load_state_dict(torch.load(path, weights_only=True))
        models.append(model)
    start = time.perf_counter()
    for model in models:
        estimate_llc(model, data, model.loss_fn, **ESTIMATOR)
    return time.perf_counter() - start


VARIANTS = ["none", "deferred", "inline"]
HOOKS = ("setup", "on_train_start", "on_train_batch_start", "on_train_batch_end",
         "on_train_epoch_end", "on_validation_end", "on_save_checkpoint", "on_train_end",
         "teardown")


class HookTimer:
    """Time spent inside a callback's hooks, less the time inside ``estimate_llc``: the
    callback's own cost, measured directly (wall-time ratios on a shared machine move by a few
    percent from run to run; this does not)."""

    def __init__(self, callback: LLCCallback) -> None:
        self.hooks = self.estimation = 0.0
        for name in HOOKS:
            setattr(callback, name, self._timed(getattr(callback, name), "hooks"))

    def _timed(self, fn: Callable[..., Any], field: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - start)
        return timed

    @contextlib.contextmanager
    def estimating(self) -> Iterator[None]:
        """Count time inside the callback's calls of the estimator separately."""
        original = devinterp.tracking.callback.run_estimator
        devinterp.tracking.callback.run_estimator = self._timed(original, "estimation")
        try:
            yield
        finally:
            devinterp.tracking.callback.run_estimator = original

    @property
    def own(self) -> float:
        return self.hooks - self.estimation


def run_variant(variant: str, args: argparse.Namespace, run_dir: str, root: str,
                times: dict[str, list[float]]) -> None:
    """Train once as ``variant`` and append its wall time (inline: and the bare estimation's)."""
    if variant == "none":
        times["none"].append(train(args.steps, None, root))
    elif variant == "deferred":
        cb = LLCCallback(run_dir, log_spaced=args.log_spaced, mode="deferred", progress=False,
                         every_n_train_steps=max(args.steps // 6, 1))
        timer = HookTimer(cb)
        times["deferred"].append(train(args.steps, cb, root))
        times["deferred_own"].append(timer.own)
    else:
        cb = LLCCallback(run_dir, every_n_train_steps=args.inline_every, progress=False,
                         **ESTIMATOR)
        timer = HookTimer(cb)
        with timer.estimating():
            times["inline"].append(train(args.steps, cb, root))
        times["inline_own"].append(timer.own)
        times["estimate"].append(bare_estimation(run_dir))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--log-spaced", type=int, default=30,
                   help="deferred schedule: log-spaced snapshots (plus every --steps/6 steps)")
    p.add_argument("--inline-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steadier timings on a shared machine)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # per-fit banners
    torch.set_num_threads(args.threads)
    ratios: dict[str, list[float]] = {"deferred": [], "inline": []}
    times: dict[str, list[float]] = {k: [] for k in (
        "none", "deferred", "inline", "estimate", "deferred_own", "inline_own")}
    with tempfile.TemporaryDirectory() as root:
        train(50, None, root)  # warm-up: imports, allocator, thread pools
        for i in range(args.repeats):
            # The three runs of a repeat follow each other closely and their order rotates, so
            # slow phases of a shared machine hit the variants alike; each ratio is taken within
            # one repeat.
            for variant in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
                run_variant(variant, args, f"{root}/{variant}{i}", root, times)
            none = times["none"][-1]
            ratios["deferred"].append(times["deferred"][-1] / none)
            ratios["inline"].append(times["inline"][-1] / (none + times["estimate"][-1]))
        snaps = len(load_run(f"{root}/deferred0").snapshots)
        estimates = len(load_run(f"{root}/inline0").llc)
    print(f"{args.steps} training steps; deferred: {snaps} snapshots; inline: {estimates} "
          f"estimates; {args.repeats} repeats, median [min, max]")
    med = {k: statistics.median(v) for k, v in times.items()}
    print("wall time: " + " | ".join(f"{k} {med[k]:.2f} s"
                                     for k in ("none", "deferred", "inline", "estimate")))
    best = {k: min(v) for k, v in times.items()}
    best_ratio = {"deferred": best["deferred"] / best["none"],
                  "inline": best["inline"] / (best["none"] + best["estimate"])}
    for kind, label in (("deferred", "deferred / none"),
                        ("inline", "inline / (none + bare estimate_llc)")):
        r = ratios[kind]
        print(f"{label}: best times {best_ratio[kind]:.3f}; paired median "
              f"{statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}] (target <= 1.05)")
    print(f"callback's own time (in its hooks, estimate_llc excluded): deferred "
          f"{med['deferred_own'] * 1e3:.0f} ms = {med['deferred_own'] / med['none']:.1%} of "
          f"training ({med['deferred_own'] / snaps * 1e3:.1f} ms per snapshot with the per-step "
          f"checks); inline {med['inline_own'] / estimates * 1e3:.0f} ms per estimate")


if __name__ == "__main__":
    main()
