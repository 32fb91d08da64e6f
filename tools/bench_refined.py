"""K components × C chains in one ``estimate_refined_llc`` call against K separate
``estimate_llc(weights=...)`` calls, with the same draws.

    python tools/bench_refined.py [--layers 2] [--width 32] [--chains 4] [--draws 200]
                                  [--batch 64 4] [--repeats 2] [--device cuda]
                                  [--grouping auto|joint|grouped]

The model is a small transformer (``experiments/transformer.py``, width 32, 4 heads) on a
regression target; the components are its blocks and their MLPs (whole parameters, so both
ways can express them: 2 × layers components). Each batch size is one configuration: 64
(arithmetic dominates a step) and 4 (per-step overhead dominates). Each variant runs in a
fresh process; the script prints the best wall time of each, their ratio (target ≤ 0.8 on
CPU: data, baseline and Python overhead are shared), the same for the process's CPU time (on
a machine shared with other work, wall time also counts the waits for a core; CPU time does
not), the peak memory of each (CPU: growth of the peak resident set over the process's
baseline after building model and data; CUDA: ``torch.cuda.max_memory_allocated``), and
checks that both give the same λ̂ traces. On the CPU it also prints the share of each
variant's CPU time spent evaluating the chains' gradients: the part one call cannot share
(every component's chains still need their own forward and backward passes), so the separate
calls' share is about the lowest ratio a plan that runs the same gradients can reach.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devinterp import estimate_llc, estimate_refined_llc  # noqa: E402
from devinterp.components import layers, mlps  # noqa: E402
from devinterp.llc import driver  # noqa: E402
from devinterp.models import gaussian_nll  # noqa: E402
from experiments.transformer import Transformer  # noqa: E402


def build(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = Transformer(args.width, args.layers, 4, 8).to(args.device)
    x = torch.randn(2048, 8, args.width, device=args.device)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn_like(x)
    return model, (x, y)


def peak_mb(device: str, base_kb: int) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb) / 1024


@contextlib.contextmanager
def gradient_time() -> Iterator[list[float]]:
    """Inside the block, the CPU seconds spent in the chains' gradient evaluations
    (``driver.chain_gradients``' functions) accumulate in the yielded one-element list."""
    spent = [0.0]
    original = driver.chain_gradients

    def timed(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        fn = original(*args, **kwargs)

        def run(*a: Any) -> Any:
            t = time.process_time()
            try:
                return fn(*a)
            finally:
                spent[0] += time.process_time() - t

        return run

    driver.chain_gradients = timed
    try:
        yield spent
    finally:
        driver.chain_gradients = original


def child(args: argparse.Namespace) -> None:
    """Run one variant, ``args.repeats`` times; print its best time and peak; save traces."""
    model, data = build(args)
    comps = {**layers(model), **mlps(model)}
    opts = dict(num_chains=args.chains, num_draws=args.draws, num_burnin=args.draws // 2,
                step_size=1e-4, batch_size=args.batch[0], sampler="sgld", seed=0, nbeta=100.0)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu, grad, traces, how = [], [], [], {}, ""

    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        with gradient_time() as spent:
            if args.variant == "refined":
                out = estimate_refined_llc(model, data, gaussian_nll, components=comps,
                                           grouping=args.grouping, **opts)
            else:
                out = {k: estimate_llc(model, data, gaussian_nll, weights=w, **opts)
                       for k, w in comps.items()}
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        grad.append(spent[0] / cpu[-1])
        traces = {k: r.llc_trace for k, r in out.items()}
        how = next(iter(out.values())).settings.get("components_run", "")
    np.savez(args.save, **traces)
    print(json.dumps({"best_s": min(times), "best_cpu_s": min(cpu),
                      "gradient_share": grad[int(np.argmin(cpu))],
                      "peak_mb": peak_mb(args.device, base_kb),
                      "components": len(comps), "how": how,
                      "params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grouping", default="auto", choices=("auto", "joint", "grouped"),
                   help="estimate_refined_llc's plan (auto: its own choice)")
    p.add_argument("--variant", choices=("refined", "separate"))
    p.add_argument("--save")
    args = p.parse_args()
    if args.variant:
        child(args)
        return
    for batch in args.batch:
        compare(args, batch)


def compare(args: argparse.Namespace, batch: int) -> None:
    """Both variants at one batch size, each in a fresh process; print the table."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("separate", "refined"):
            cmd = [sys.executable, __file__, "--variant", variant, "--save",
                   f"{tmp}/{variant}.npz", f"--batch={batch}"] + [
                f"--{k}={getattr(args, k)}" for k in
                ("layers", "width", "chains", "draws", "repeats", "device", "grouping")]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[variant] = json.loads(out.strip().splitlines()[-1])
        a, b = np.load(f"{tmp}/separate.npz"), np.load(f"{tmp}/refined.npz")
        worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)
    sep, ref = rows["separate"], rows["refined"]
    print(f"batch {batch}: {ref['components']} components × {args.chains} chains × "
          f"{args.draws} draws (+{args.draws // 2} burn-in), {ref['params']} parameters, "
          f"device {args.device}")
    print(f"{'':34} {'best wall time':>15} {'best CPU time':>14} {'in gradients':>13} "
          f"{'peak memory':>12}")
    for name, row in (("separate estimate_llc(weights=...)", sep),
                      ("one estimate_refined_llc call", ref)):
        print(f"{name:34} {row['best_s']:13.2f} s {row['best_cpu_s']:12.2f} s "
              f"{row['gradient_share']:12.0%} {row['peak_mb']:9.1f} MB"
              + (f"   (ran {row['how']})" if row is ref else ""))
    print(f"ratio (one call / separate): wall {ref['best_s'] / sep['best_s']:.2f}, CPU "
          f"{ref['best_cpu_s'] / sep['best_cpu_s']:.2f} (target <= 0.8); peak memory ratio "
          f"{ref['peak_mb'] / max(sep['peak_mb'], 1e-9):.2f}")
    print(f"largest difference between the λ̂ traces: {worst:.3g}\n")


if __name__ == "__main__":
    main()
