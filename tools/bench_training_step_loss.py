"""What the default loss of an unchanged LightningModule costs: ``estimate_llc`` time with the
module's own ``training_step`` (tracking.TrainingStepLoss, a batch loss) against the same objective
given as ``loss_fn`` (whose paired baseline comes from a per-sample cache instead of one extra
forward per draw). Same model, data, seed and settings; the λ̂ values are printed to show the two
estimate the same thing. Every figure is measured in this one run.

    python tools/bench_training_step_loss.py [--repeats 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from devinterp.tracking import module_loss, run_estimator


class Regressor(pl.LightningModule):
    """A plain module: training_step computes, logs and returns the loss."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Regressor(args.width).to(args.device)
    x = torch.randn(4096, 16, device=args.device)
    y = model(x).detach() + 0.1 * torch.randn(4096, 4, device=args.device)
    options = {"num_chains": 4, "num_draws": 200, "num_burnin": 100, "step_size": 1e-4,
               "batch_size": 256}
    spec = module_loss(model)
    assert spec.kind == "module_training_step"
    variants = {"training_step": {"batch_loss": spec.batch_loss}, "loss_fn": {"loss_fn": F.mse_loss}}
    times: dict[str, list[float]] = {k: [] for k in variants}
    llc: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, loss in variants.items():  # interleaved: drift on a shared machine cancels
            start = time.perf_counter()
            result = run_estimator(model, (x, y), options=options, **loss)
            times[name].append(time.perf_counter() - start)
            llc[name] = result.llc_mean
    best = {k: min(v) for k, v in times.items()}
    n = sum(p.numel() for p in model.parameters())
    print(f"{n} parameters, 4 chains x 300 steps, batch 256, {args.device}, best of "
          f"{args.repeats}")
    for name in variants:
        print(f"  {name:>13}: {best[name]:.3f} s, λ̂ = {llc[name]:.3f}")
    print(f"  training_step / loss_fn: {best['training_step'] / best['loss_fn']:.2f}x")


if __name__ == "__main__":
    main()
