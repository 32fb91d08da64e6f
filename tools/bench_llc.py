"""Benchmark of ``estimate_llc``: speed against hand-written SGLD loops, and accuracy on models
whose learning coefficient is known exactly. Every figure is a ratio or a value measured in this
one run, so it can be compared across machines.

    python tools/bench_llc.py            # speed (10k and ~1M parameters) + accuracy table
    python tools/bench_llc.py --quick    # smaller, for a smoke run
    python tools/bench_llc.py --device cuda
    python tools/bench_llc.py --skip-speed --step-scale 2   # why the auto step is not larger
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from devinterp import estimate_llc
from devinterp.models import (
    SeparableSum,
    deep_linear_network,
    gaussian_nll,
    mean_output,
    teacher_data,
)
from devinterp.theory import deep_linear_network_llc, regular_llc


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chains: int, steps: int,
              batch: int, eps: float, nbeta: float, gamma: float) -> float:
    """The minimal sequential SGLD loop: per chain, per step, one forward and backward."""
    sync(x.device)
    t0 = time.perf_counter()
    for c in range(chains):
        net = copy.deepcopy(model)
        anchor = [p.detach().clone() for p in net.parameters()]
        g = torch.Generator(device=x.device).manual_seed(c)
        for _ in range(steps):
            idx = torch.randint(len(x), (batch,), generator=g, device=x.device)
            loss = gaussian_nll(net(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for w, gr, w0 in zip(net.parameters(), grads, anchor, strict=True):
                    w.add_(-(eps / 2) * (nbeta * gr + gamma * (w - w0))
                           + math.sqrt(eps) * torch.randn_like(w))
    sync(x.device)
    return time.perf_counter() - t0


def vmapped_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chains: int, steps: int,
                 batch: int, eps: float, nbeta: float, gamma: float) -> float:
    """The minimal loop with chains batched by torch.func.vmap (no baseline, no diagnostics)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    anchor = {k: v.unsqueeze(0).expand(chains, *v.shape).clone() for k, v in params.items()}
    w = {k: v.clone() for k, v in anchor.items()}

    def loss(p, xb, yb):
        return gaussian_nll(functional_call(model, p, (xb,)), yb)

    vgrad = vmap(grad(loss), in_dims=(0, None, None))
    g = torch.Generator(device=x.device).manual_seed(0)
    sync(x.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g, device=x.device)
        gr = vgrad(w, x[idx], y[idx])
        w = {k: v - (eps / 2) * (nbeta * gr[k] + gamma * (v - anchor[k]))
             + math.sqrt(eps) * torch.randn_like(v) for k, v in w.items()}
    sync(x.device)
    return time.perf_counter() - t0


def timed_estimate(model, data, **kw) -> tuple[float, object]:
    sync(data[0].device)
    t0 = time.perf_counter()
    r = estimate_llc(model, data, gaussian_nll, **kw)
    sync(data[0].device)
    return time.perf_counter() - t0, r


def speed(name: str, widths: list[int], device: torch.device, chains: int, draws: int,
          batch: int) -> None:
    torch.manual_seed(0)
    model = mlp(widths).to(device)
    d = sum(p.numel() for p in model.parameters())
    n = 10_000
    x = torch.randn(n, widths[0], device=device)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(n, widths[-1], device=device)
    eps, gamma = 1e-7, 1.0
    nbeta = n / math.log(n)
    common = dict(num_chains=chains, batch_size=batch, nbeta=nbeta, localization=gamma,
                  device=device, seed=0)
    # warm-up (lazy initialisation, allocator, first-call costs of both paths)
    estimate_llc(model, (x, y), gaussian_nll, num_draws=2, num_burnin=0, step_size=eps,
                 **common)
    estimate_llc(model, (x, y), gaussian_nll, num_draws=2, num_burnin=0, **common)
    t_bare = bare_loop(model, x, y, chains=chains, steps=draws, batch=batch, eps=eps,
                       nbeta=nbeta, gamma=gamma)
    t_vmap = vmapped_loop(model, x, y, chains=chains, steps=draws, batch=batch, eps=eps,
                          nbeta=nbeta, gamma=gamma)
    t_one, _ = timed_estimate(model, (x, y), num_draws=2, num_burnin=0, step_size=eps,
                              sampler="sgld", **common)
    t_sgld, _ = timed_estimate(model, (x, y), num_draws=draws, num_burnin=0, step_size=eps,
                               sampler="sgld", **common)
    t_rms, _ = timed_estimate(model, (x, y), num_draws=draws, num_burnin=0, step_size=eps,
                              sampler="rmsprop_sgld", **common)
    t_fixed_default, _ = timed_estimate(model, (x, y), num_draws=draws, step_size=eps, **common)
    t_auto, r_auto = timed_estimate(model, (x, y), num_draws=draws, **common)
    # With num_burnin=0 a call still takes one step before its first draw (w* is never a
    # draw): t_one covers 3 steps, t_sgld draws + 1.
    per_step = (t_sgld - t_one) / (draws - 2)
    fixed = t_one - 3 * per_step
    print(f"\n{name}: {d:,} parameters, {chains} chains x {draws} draws, batch {batch}, "
          f"{device}")
    print(f"  bare sequential loop        {1e3 * t_bare / draws:8.2f} ms/step (all chains)")
    print(f"  bare vmapped loop           {1e3 * t_vmap / draws:8.2f} ms/step")
    print(f"  estimate_llc (sgld)         {1e3 * per_step:8.2f} ms/step   "
          f"ratio to bare sequential {per_step * draws / t_bare:5.2f}x   "
          f"to bare vmapped {per_step * draws / t_vmap:5.2f}x")
    print(f"  estimate_llc (rmsprop_sgld) {1e3 * t_rms / draws:8.2f} ms/step   "
          f"ratio to bare sequential {t_rms / t_bare:5.2f}x")
    print(f"  fixed cost per call         {fixed:8.3f} s")
    print(f"  step_size='auto' costs      {(t_auto - t_fixed_default) / t_fixed_default:8.1%} "
          f"of the estimate's own time (chose eps={r_auto.settings['step_size']:.2e}, "
          f"{r_auto.diagnostics['calibration_rounds']} pilot rounds)")


def accuracy(device: torch.device, quick: bool, sampler: str, step_scale: float = 1.0) -> None:
    step = "auto step" if step_scale == 1 else f"{step_scale:g} x the auto step"
    print(f"\nAccuracy with default settings ({step}, nβ = n/log n, γ = 1, 8 chains x 400 "
          f"draws, sampler {sampler}), n = 10,000, noiseless teachers:")
    print(f"  {'model':<34} {'exact λ':>8} {'λ̂':>8} {'± se':>6} {'error':>7} {'MALA acc':>8} "
          f"{'ESS':>6}")
    cases: list[tuple[str, nn.Module, tuple, object, float, dict]] = []
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    cases.append(("linear regression 6->3", lin, teacher_data(lin, 6, 10_000), gaussian_nll,
                  regular_llc(21), {}))
    for widths in [(3, 3, 6), (2, 4, 2, 4)] if not quick else [(3, 3, 6)]:
        for rank in range(min(widths) + 1):
            m = deep_linear_network(widths, rank, seed=rank)
            cases.append((f"deep linear {'-'.join(map(str, widths))} rank {rank}", m,
                          teacher_data(m, widths[0], 10_000, seed=rank), gaussian_nll,
                          deep_linear_network_llc(widths, rank), {}))
    for powers in [(1, 1, 2), (2, 2, 2)]:
        m = SeparableSum(powers)
        cases.append((f"separable sum k={powers} (16x1500)", m,
                      (torch.zeros(10_000, 1), torch.zeros(10_000)), mean_output, m.llc(),
                      dict(num_chains=16, num_draws=1500)))
    worst = 0.0
    for name, model, (x, y), loss, exact, kw in cases:
        model = model.to(device)
        data = (x.to(device), y.to(device))
        r = estimate_llc(model, data, loss, seed=0, sampler=sampler, **kw)
        if step_scale != 1:
            r = estimate_llc(model, data, loss, seed=0, sampler=sampler,
                             step_size=step_scale * r.settings["step_size"], **kw)
        se = r.llc_std / math.sqrt(r.settings["num_chains"])
        err = r.llc_mean / exact - 1
        worst = max(worst, abs(err))
        print(f"  {name:<34} {exact:8.3f} {r.llc_mean:8.3f} {se:6.3f} {err:+7.1%} "
              f"{r.diagnostics['mala_acceptance']:8.2f} {r.diagnostics['ess']:6.0f}")
    print(f"  worst relative error: {worst:.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--sampler", default="rmsprop_sgld", choices=["rmsprop_sgld", "sgld"],
                   help="sampler of the accuracy table (default: the estimator's default)")
    p.add_argument("--step-scale", type=float, default=1.0,
                   help="accuracy table at this multiple of the auto step size (bias vs mixing)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine more threads "
                        "spin-wait on each other and every variant slows down erratically)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    draws = 50 if args.quick else 200
    if not args.skip_speed:
        speed("~10k-parameter MLP", [32, 128, 64, 10], device, 4, draws, 256)
        speed("~1M-parameter MLP", [256, 1024, 512, 10] if not args.quick else [256, 512, 10],
              device, 4, draws, 256)
    if not args.skip_accuracy:
        accuracy(device, args.quick, args.sampler, args.step_scale)


if __name__ == "__main__":
    main()
