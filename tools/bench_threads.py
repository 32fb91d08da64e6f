"""Where one torch thread beats the default: ``estimate_llc`` timed at 1 thread and at
torch's default (one per core) on MLPs of growing size, same seed, same numbers.

    python tools/bench_threads.py

Prints seconds per estimate at each thread count and the ratio default / 1 thread (> 1: one
thread is faster). The estimator's thread policy (``num_threads=None``: one thread below
``devinterp.llc.SMALL_MODEL_WORK``) comes from this table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from devinterp import estimate_llc
from devinterp.llc import SMALL_MODEL_WORK
from devinterp.models import gaussian_nll


def timed(model: nn.Module, data: tuple, threads: int, draws: int) -> tuple[float, float]:
    start = time.perf_counter()
    r = estimate_llc(model, data, gaussian_nll, num_chains=4, num_draws=draws, num_burnin=10,
                     step_size=1e-6, seed=0, num_threads=threads)
    return time.perf_counter() - start, r.llc_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=40)
    args = parser.parse_args()
    default = torch.get_num_threads()
    print(f"torch default threads: {default}; batch 256, 4 chains x {args.draws} draws")
    print(f"{'params':>9} {'work':>11} {'1 thread':>9} {f'{default} threads':>10} "
          f"{'ratio':>6}  policy")
    for width in (8, 32, 128, 512, 1024):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width),
                              nn.Tanh(), nn.Linear(width, 4))
        x = torch.randn(4096, 32)
        with torch.no_grad():
            y = model(x)
        timed(model, (x, y), 1, 2)  # warm-up
        t1, l1 = timed(model, (x, y), 1, args.draws)
        tn, ln = timed(model, (x, y), default, args.draws)
        assert abs(l1 - ln) <= 1e-6 * max(1.0, abs(l1)), (l1, ln)
        params = sum(p.numel() for p in model.parameters())
        work = params * 256
        policy = "1 thread" if work < SMALL_MODEL_WORK else "default"
        print(f"{params:>9} {work:>11.2e} {t1:>8.2f}s {tn:>9.2f}s {tn / t1:>6.2f}  {policy}")


if __name__ == "__main__":
    main()
