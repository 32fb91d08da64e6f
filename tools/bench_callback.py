"""Overhead of LLCCallback on training wall time; prints ratios from one run.

1. deferred: training with ``LLCCallback(mode="deferred")`` (snapshots + metrics only) against
   the same training without the callback. Target: <= 1.05.
2. inline: training with ``LLCCallback(mode="inline")`` against training without it plus the
   time ``estimate_llc`` alone takes on the same snapshots. Target: <= 1.05.

Times are the best of ``--repeats`` interleaved runs (the machine may be shared); every run
trains the same model from the same seed.

    .venv/bin/python tools/bench_callback.py [--steps 2000] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp import LLCCallback, estimate_llc, load_run

INLINE_REPEATS = 3
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


class Clock:
    """Wall time and process CPU time (all threads) of a block; CPU time barely moves when
    other processes load a shared machine, wall time does."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def train(steps: int, callback: LLCCallback | None, root: str) -> Clock:
    """Wall and CPU time of ``trainer.fit`` (model construction and trainer setup excluded)."""
    pl.seed_everything(0, verbose=False)
    model = MLP()
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        callbacks=[callback] if callback else [],
    )
    with Clock() as clock:
        trainer.fit(model)
    return clock


def bare_estimation(run_dir: str) -> Clock:
    """Time ``estimate_llc`` alone takes on every snapshot of ``run_dir``."""
    data = MLP().train_dataloader().dataset
    models = []
    for path in load_run(run_dir).snapshots.values():
        model = MLP()
        model.load_state_dict(torch.load(path, weights_only=True))
        models.append(model)
    with Clock() as clock:
        for model in models:
            estimate_llc(model, data, model.loss_fn, **ESTIMATOR)
    return clock


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
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        train(50, None, root)  # warm-up: imports, allocator, thread pools
        base, t_def, t_inl, t_est = [], [], [], []
        # Interleaved, so that load from other processes hits every variant alike.
        for i in range(args.repeats):
            base.append(train(args.steps, None, root))
            cb = LLCCallback(f"{root}/deferred{i}", log_spaced=args.log_spaced,
                             every_n_train_steps=max(args.steps // 6, 1), mode="deferred",
                             progress=False)
            t_def.append(train(args.steps, cb, root))
            if i < INLINE_REPEATS:
                cb = LLCCallback(f"{root}/inline{i}", every_n_train_steps=args.inline_every,
                                 progress=False, **ESTIMATOR)
                t_inl.append(train(args.steps, cb, root))
                t_est.append(bare_estimation(f"{root}/inline{i}"))
        snaps = len(load_run(f"{root}/deferred0").snapshots)
        estimates = len(load_run(f"{root}/inline0").llc)
    print(f"{args.steps} training steps; deferred: {snaps} snapshots; inline: {estimates} "
          f"estimates; best of {args.repeats} (inline: best of {INLINE_REPEATS}), interleaved")
    for kind in ("wall", "cpu"):
        b, d, i, e = (min(getattr(c, kind) for c in runs) for runs in (base, t_def, t_inl, t_est))
        print(f"[{kind:4}] none {b:6.2f} s | deferred {d:6.2f} s | inline {i:6.2f} s | "
              f"bare estimate_llc {e:6.2f} s")
        print(f"[{kind:4}] deferred / none = {d / b:.3f} (target <= 1.05); "
              f"inline / (none + estimation) = {i / (b + e):.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
