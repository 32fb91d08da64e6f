"""Cost and memory of per-sample observables (probe losses at every draw) against a plain λ̂
estimate with the same draws.

For P probe samples the target is

    time(λ̂ + probes) / time(λ̂)  ≤  1 + draws · chains · forward(P samples) / time(λ̂),

i.e. no more than the extra forward passes, where forward(P samples) is one plain batched
forward of the P probes under ``torch.no_grad`` (timed here, per chain), in two ways: "target"
repeats one model's forward (its weights stay in cache), "per-chain" cycles through one copy
of the model per chain, as the probes are evaluated (each chain has its own weights, which a
forward must read again). Times are this process's CPU time (one thread), so other processes'
load does not enter them. Memory: the recorder's state (running moments) for a run with D and
with 4·D draws, and the process's peak resident memory of each run in its own subprocess.

Susceptibilities (``--components K``): estimate_susceptibilities over K components (the K
hidden layers of a deeper MLP, 2 probe sets) against what it did before sharing one
computation: one estimate_llc(weights=component) per component, each with its own recorder.

    python tools/bench_influence.py [--probes 64 256 1024] [--draws 200] [--chains 4]
                                    [--components 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from devinterp.llc import estimate_llc
from devinterp.llc.observables import ProbeLosses, ProbeSets


def setup(n: int = 2048, d: int = 64, hidden: int = 256) -> tuple[nn.Module, tuple]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, 10))
    return model, (x, y)


OPTIONS = dict(batch_size=256, step_size=1e-4, num_burnin=0, seed=0)


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def forward_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 20,
                 copies: int = 1) -> float:
    """One plain batched forward (and per-sample loss) of ``x``, cycling through ``copies``
    copies of the model (1: the same weights every time)."""
    ce = nn.CrossEntropyLoss(reduction="none")
    models = [model] + [copy.deepcopy(model) for _ in range(copies - 1)]
    with torch.no_grad():
        for m in models:
            ce(m(x), y)
        t = time.process_time()
        for _ in range(repeats):
            for m in models:
                ce(m(x), y)
    return (time.process_time() - t) / (repeats * copies)


def memory_run(probes: int, draws: int, chains: int) -> dict:
    """One estimate with probes (run in a subprocess): recorder state bytes and peak RSS."""
    model, (x, y) = setup()
    rec = ProbeLosses((x[:probes], y[:probes]), chains)
    estimate_llc(model, (x, y), nn.functional.cross_entropy, num_chains=chains,
                 num_draws=draws, recorders=[rec], **OPTIONS)
    m = rec.moments
    state = sum(t.numel() * t.element_size() for t in (m.count, m.mean_rows, m.mean_cols,
                                                        m.var_rows, m.var_cols, m.cross))
    return {"state_bytes": state,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def susceptibility_times(k: int, chains: int, draws: int) -> None:
    """estimate_susceptibilities over k layers against one estimate_llc per layer."""
    # Imported here: the memory runs' peak RSS should not count pandas.
    from devinterp.influence import DEFAULT_NUM_TRAIN, subsample
    from devinterp.susceptibility import estimate_susceptibilities

    g = torch.Generator().manual_seed(1)
    d, hidden = 16, 32
    x = torch.randn(1024, d, generator=g)
    y = torch.randint(0, 10, (1024,), generator=g)
    torch.manual_seed(1)
    layers = [nn.Linear(d, hidden), nn.Tanh()]
    for _ in range(k - 1):
        layers += [nn.Linear(hidden, hidden), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(hidden, 10))
    comps = {f"L{i}": [f"{2 * i}.*"] for i in range(k)}
    probes = {"first": (x[:64], y[:64]), "shifted": (x[64:128] * 2, y[64:128])}
    ce = nn.functional.cross_entropy
    opts = dict(num_chains=chains, num_draws=draws, batch_size=64, step_size=1e-4,
                num_burnin=0, seed=0)

    def separate() -> None:
        train, _ = subsample((x, y), DEFAULT_NUM_TRAIN, 0)
        parts = [train, *probes.values()]
        sizes = [len(p[0]) for p in parts]
        reduce = torch.block_diag(*[torch.full((n, 1), 1.0 / n) for n in sizes])
        for patterns in comps.values():
            rec = ProbeLosses(ProbeSets(tuple(parts)), chains, rows=[0],
                              cols=range(len(parts)), reduce=reduce.double())
            estimate_llc(model, (x, y), ce, weights=patterns, recorders=[rec], **opts)
            rec.covariance()

    together = alone = float("inf")
    for _ in range(3):
        together = min(together, timed(lambda: estimate_susceptibilities(
            model, (x, y), ce, components=comps, probes=probes, **opts), 1))
        alone = min(alone, timed(separate, 1))
    print(f"susceptibilities, {k} layers × 2 probes: one computation {together:.2f} s, "
          f"one estimate per component {alone:.2f} s ({alone / together:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (medians are printed)")
    ap.add_argument("--components", type=int, default=3,
                    help="components of the susceptibility comparison (0: skip it)")
    ap.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory_child:
        print(json.dumps(memory_run(*args.memory_child)))
        return
    model, (x, y) = setup()
    ce = nn.functional.cross_entropy
    kw = dict(num_chains=args.chains, num_draws=args.draws, **OPTIONS)
    print(f"{args.chains} chains × {args.draws} draws (batch {OPTIONS['batch_size']}); "
          f"CPU seconds; {args.repeats} rounds of a plain run, a probed run and the forward "
          "timings, medians of each round's values")
    print(f"{'P':>6} {'plain s':>8} {'probes s':>9} {'ratio':>7} {'target':>7} "
          f"{'per-chain':>9} {'within':>6}")
    n = args.draws * args.chains
    # Warm-up (lazy imports, first-call costs), not timed.
    estimate_llc(model, (x, y), ce, recorders=[ProbeLosses((x[:8], y[:8]), args.chains)], **kw)
    for p in args.probes:
        rounds = []
        for _ in range(args.repeats):  # a round's values share the machine's load of the time
            plain = timed(lambda: estimate_llc(model, (x, y), ce, **kw), 1)
            probed = timed(lambda p=p: estimate_llc(
                model, (x, y), ce, recorders=[ProbeLosses((x[:p], y[:p]), args.chains)],
                **kw), 1)
            hot = forward_time(model, x[:p], y[:p])
            cold = forward_time(model, x[:p], y[:p], copies=args.chains)
            rounds.append((plain, probed, probed / plain, 1 + n * hot / plain,
                           1 + n * cold / plain))
        plain, probed, ratio, target, per_chain = np.median(np.array(rounds), axis=0)
        within = "yes" if ratio <= target else "per-chain" if ratio <= per_chain else "no"
        print(f"{p:>6} {plain:8.2f} {probed:9.2f} {ratio:7.3f} {target:7.3f} "
              f"{per_chain:9.3f} {within:>6}")
    if args.components:
        susceptibility_times(args.components, args.chains, args.draws)
    p = args.probes[-1]
    rows = []
    for draws in (args.draws, 4 * args.draws):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(p), str(draws),
                              str(args.chains)], capture_output=True, text=True, check=True)
        rows.append((draws, json.loads(out.stdout.strip().splitlines()[-1])))
    for draws, r in rows:
        print(f"memory, P={p}, {draws} draws: recorder state {r['state_bytes'] / 2**20:.2f} MiB, "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
