"""Peak memory of ``estimate_llc`` against a bare vmapped SGLD loop on the same model.

    python tools/bench_memory.py [--width 1024] [--chains 8] [--device cuda]

Each variant runs in a fresh process (CPU: peak resident memory growth over the process's
baseline after building model and data; CUDA: ``torch.cuda.max_memory_allocated``), and the
script prints each peak in MB, in parameter-sized copies per chain, and the ratios to the bare
loops (target ≤ 1.3): plain SGLD and RMSProp-SGLD written as bare vmapped loops, against
``estimate_llc`` with each sampler and with ``vectorize=False`` (which must hold one chain's
state at a time).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys

import torch
from torch import nn

VARIANTS = ("bare_vmapped", "bare_rmsprop", "sgld", "rmsprop_sgld", "sequential")


def build(width: int, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 8)).to(device)
    x = torch.randn(4096, 64, device=device)
    with torch.no_grad():
        y = model(x)
    return model, x, y


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bare_vmapped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chains: int,
                 steps: int, rmsprop: bool = False) -> None:
    """The minimal vmapped loop: position, gradient, noise, new position (and with
    ``rmsprop`` the squared-drift average and the preconditioner a bare RMSProp-SGLD keeps)."""
    from torch.func import functional_call, grad, vmap

    from devinterp.models import gaussian_nll

    anchor = {k: v.detach().unsqueeze(0).expand(chains, *v.shape).clone()
              for k, v in model.named_parameters()}
    w = {k: v.clone() for k, v in anchor.items()}
    vgrad = vmap(grad(lambda p, xb, yb: gaussian_nll(functional_call(model, p, (xb,)), yb)),
                 in_dims=(0, None, None))
    g = torch.Generator(device=x.device).manual_seed(0)
    eps, nbeta = 1e-7, len(x) / math.log(len(x))
    avg = {k: torch.zeros_like(v) for k, v in w.items()}
    for _ in range(steps):
        idx = torch.randint(len(x), (256,), generator=g, device=x.device)
        gr = vgrad(w, x[idx], y[idx])
        d = {k: nbeta * gr[k] + (v - anchor[k]) for k, v in w.items()}
        if rmsprop:
            G = {}
            for k in d:
                avg[k].mul_(0.99).addcmul_(d[k], d[k], value=0.01)
                G[k] = 1 / (avg[k].sqrt() + 1)
        else:
            G = {k: 1.0 for k in d}
        w = {k: v - (eps / 2) * G[k] * d[k] + (math.sqrt(eps) * torch.randn_like(v)) * G[k] ** 0.5
             for k, v in w.items()}


def child(variant: str, width: int, chains: int, device: str) -> None:
    import torch.func  # noqa: F401 - imports before the baseline: only sampling is measured

    from devinterp.llc import estimate_llc
    from devinterp.models import gaussian_nll

    model, x, y = build(width, device)
    with torch.no_grad():  # first-call costs (kernels, allocator) before the baseline too
        gaussian_nll(model(x[:256]), y[:256])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = peak_mb(device)
    if variant.startswith("bare"):
        bare_vmapped(model, x, y, chains, 40, rmsprop=variant == "bare_rmsprop")
    else:
        sampler = "sgld" if variant == "sgld" else "rmsprop_sgld"
        estimate_llc(model, (x, y), gaussian_nll, num_chains=chains, num_draws=20,
                     num_burnin=20, step_size=1e-7, sampler=sampler,
                     vectorize=variant != "sequential", seed=0)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"peak": peak_mb(device) - base, "params_mb": params}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.width, args.chains, args.device)
        return
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--width",
                              str(args.width), "--chains", str(args.chains), "--device",
                              args.device], capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    params_mb = rows["bare_vmapped"]["params_mb"]
    print(f"model: {params_mb:.1f} MB of parameters, {args.chains} chains, device {args.device}")
    print(f"{'variant':>14} {'peak MB':>9} {'copies/chain':>13} {'/ bare vmapped':>15} "
          f"{'/ bare rmsprop':>15}")
    for variant, r in rows.items():
        print(f"{variant:>14} {r['peak']:>9.1f} {r['peak'] / params_mb / args.chains:>13.1f} "
              f"{r['peak'] / rows['bare_vmapped']['peak']:>15.2f} "
              f"{r['peak'] / rows['bare_rmsprop']['peak']:>15.2f}")


if __name__ == "__main__":
    main()
