"""Benchmark of ``estimate_llc``: speed against hand-written SGLD loops, and accuracy on models
whose learning coefficient is known exactly. Every figure is a ratio or a value measured in this
one run, so it can be compared across machines.

    python tools/bench_llc.py            # speed (10k and ~1M parameters) + accuracy table
    python tools/bench_llc.py --quick    # smaller, for a smoke run
    python tools/bench_llc.py --device cuda
    python tools/bench_llc.py --skip-speed --step-scale 2   # why the auto step is not larger
    python tools/bench_llc.py --transformer   # the two transformers at a trained checkpoint
    python tools/bench_llc.py --transformer --checkpoint icl=run/last.ckpt   # a given snapshot
    python tools/bench_llc.py --criteria      # only the convergence criteria (issue 12)

``--transformer`` ends with the convergence criteria at all defaults on an attention-only
transformer and the grokking MLP: split R-hat, and λ̂'s relative change when the same settings
run 4x longer and when ε is halved, each against its bound 5 % + 2 standard errors.
"""

from __future__ import annotations

import argparse
import copy
import math
import pickle
import sys
import time
from pathlib import Path

import torch
from torch import nn

from devinterp import LLCResult, estimate_llc
from devinterp.llc.calibration import check_stability
from devinterp.llc.data import LossFn
from devinterp.models import (
    SeparableSum,
    deep_linear_network,
    gaussian_nll,
    mean_output,
    teacher_data,
)
from devinterp.theory import deep_linear_network_llc, regular_llc

# experiments/ is not installed: import it from this repository, as `devinterp run` does.
sys.path.append(str(Path(__file__).resolve().parents[1]))


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


#: The clock of every timing: this process's CPU time on a CPU-only run (one torch thread, so
#: it is the work done, unchanged by other processes sharing the cores; wall time is not),
#: wall time when an accelerator does the work.
CLOCK = {"cpu": time.process_time}


def now(device: torch.device) -> float:
    """Seconds on the clock used for ``device`` (see :data:`CLOCK`), after a device sync."""
    sync(device)
    return CLOCK.get(device.type, time.perf_counter)()


def bare_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chains: int, steps: int,
              batch: int, eps: float, nbeta: float, gamma: float,
              loss_fn: LossFn = gaussian_nll, ticks: list[float] | None = None) -> float:
    """The minimal sequential SGLD loop: per step, per chain, one forward and backward.
    Returns the seconds taken; ``ticks`` gets the clock after every step of all chains."""
    nets = [copy.deepcopy(model) for _ in range(chains)]
    anchors = [[p.detach().clone() for p in net.parameters()] for net in nets]
    gens = [torch.Generator(device=x.device).manual_seed(c) for c in range(chains)]
    t0 = now(x.device)
    for _ in range(steps):
        for net, anchor, g in zip(nets, anchors, gens, strict=True):
            idx = torch.randint(len(x), (batch,), generator=g, device=x.device)
            loss = loss_fn(net(x[idx]), y[idx])
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for w, gr, w0 in zip(net.parameters(), grads, anchor, strict=True):
                    w.add_(-(eps / 2) * (nbeta * gr + gamma * (w - w0))
                           + math.sqrt(eps) * torch.randn_like(w))
        if ticks is not None:
            ticks.append(now(x.device))
    return now(x.device) - t0


def vmapped_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, chains: int, steps: int,
                 batch: int, eps: float, nbeta: float, gamma: float,
                 loss_fn: LossFn = gaussian_nll, ticks: list[float] | None = None) -> float:
    """The minimal loop with chains batched by torch.func.vmap (no baseline, no diagnostics).
    Returns the seconds taken; ``ticks`` gets the clock after every step."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    anchor = {k: v.unsqueeze(0).expand(chains, *v.shape).clone() for k, v in params.items()}
    w = {k: v.clone() for k, v in anchor.items()}

    def loss(p, xb, yb):
        return loss_fn(functional_call(model, p, (xb,)), yb)

    vgrad = vmap(grad(loss), in_dims=(0, None, None))
    g = torch.Generator(device=x.device).manual_seed(0)
    t0 = now(x.device)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g, device=x.device)
        gr = vgrad(w, x[idx], y[idx])
        w = {k: v - (eps / 2) * (nbeta * gr[k] + gamma * (v - anchor[k]))
             + math.sqrt(eps) * torch.randn_like(v) for k, v in w.items()}
        if ticks is not None:
            ticks.append(now(x.device))
    return now(x.device) - t0


def fastest_window(ticks: list[float], window: int) -> float:
    """Seconds per step of the fastest run of ``window`` consecutive steps: on a shared
    machine the least disturbed stretch (every window holds the same work)."""
    return min((ticks[i + window] - ticks[i]) / window
               for i in range(0, len(ticks) - window, window))


def timed_estimate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                   loss_fn: LossFn = gaussian_nll, **kw) -> tuple[float, LLCResult]:
    """Wall time of one ``estimate_llc`` call (device work included) and its result."""
    t0 = now(data[0].device)
    r = estimate_llc(model, data, loss_fn, **kw)
    return now(data[0].device) - t0, r


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


#: The project's transformers: experiment class and config (model, sampler settings).
TRANSFORMERS = {
    "icl": ("in-context regression", "experiments.icl_regression", "InContextRegression",
            "configs/icl_regression.yaml"),
    "induction": ("induction LM", "experiments.induction_lm", "InductionLM",
                  "configs/induction_lm.yaml"),
}


def load_transformer(key: str, checkpoint: str | None, train_steps: int
                     ) -> tuple[nn.Module, dict, str]:
    """The model of ``TRANSFORMERS[key]`` from its config, at a trained checkpoint: the
    snapshot at ``checkpoint`` (a Lightning .ckpt or a state dict), else trained here with
    Adam for ``train_steps`` steps. Also returns the config's LLCCallback settings."""
    import importlib
    from pathlib import Path

    import yaml

    _, module, cls, config = TRANSFORMERS[key]
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / config).read_text())
    hp = cfg["model"]["init_args"]
    llc = next(c["init_args"] for c in cfg["trainer"]["callbacks"]
               if c["class_path"].endswith("LLCCallback"))
    torch.manual_seed(0)
    model = getattr(importlib.import_module(module), cls)(**hp)
    if checkpoint is not None:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
        except (OSError, RuntimeError, AttributeError, pickle.UnpicklingError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--checkpoint {key}={checkpoint}: not a snapshot of {cls} as "
                             f"{config} builds it ({first[:160]}); pass a Lightning .ckpt or "
                             "a state dict of that model") from e
        return model.eval(), llc, f"snapshot {checkpoint}"
    x, y = model.train_dataset.tensors
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    g = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        idx = torch.randint(len(x), (hp["batch_size"],), generator=g)
        loss = model.loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss = model.loss_fn(model(x[:1024]), y[:1024])
    return model.eval(), llc, f"trained {train_steps} Adam steps, loss {loss.item():.3g}"


class StepClock:
    """A recorder (``estimate_llc(recorders=[...])``) that times the sampling loop itself, so
    the call's fixed costs (checks, the per-sample baseline cache, summaries) are left out:
    seconds per step between the first and the last draw, or with ``window`` those of the
    fastest ``window`` consecutive draws (see :func:`fastest_window`; a window of 32 holds
    exactly one of the estimator's MALA checks). ``cached``: whether the paired baseline came
    from the per-sample cache (no forward at w* per step)."""

    def __init__(self, num_draws: int, window: int | None = None) -> None:
        self.num_draws, self.window = num_draws, window
        self.ticks: list[float] = []  # the clock at the draws in self.draws
        self.draws: list[int] = []
        self.cached = False

    def bind(self, problem) -> None:
        self.cached = problem.baseline_cache is not None

    def on_draw(self, draw: int, chains, position, losses, baseline, batch) -> None:
        if draw in (0, self.num_draws - 1) or (self.window and draw % self.window == 0):
            self.draws.append(draw)
            self.ticks.append(now(losses.device))

    def per_step(self) -> float:
        if self.window:
            return min((b - a) / self.window for a, b, da, db in zip(
                self.ticks, self.ticks[1:], self.draws, self.draws[1:], strict=False)
                if db - da == self.window)
        return (self.ticks[-1] - self.ticks[0]) / (self.num_draws - 1)


def loop_and_fixed(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], draws: int,
                   window: int | None = None, **kw) -> tuple[float, float, bool]:
    """(seconds per sampling step, fixed seconds of the call, whether the baseline was cached)
    of one ``estimate_llc`` call (``window``: see :class:`StepClock`)."""
    clock = StepClock(draws, window)
    t0 = now(data[0].device)
    estimate_llc(model, data, num_draws=draws, recorders=[clock], **kw)
    total = now(data[0].device) - t0
    mean = (clock.ticks[-1] - clock.ticks[0]) / (draws - 1)
    return clock.per_step(), total - (draws + 1) * mean, clock.cached


def transformer_speed(name: str, model: nn.Module, llc: dict, origin: str,
                      device: torch.device, chains: int, draws: int, window: int) -> None:
    """Estimator vs bare loops on one of the project's transformers, at the config's fixed
    step (nβ, γ, ε and batch of its LLCCallback). The paired baseline L_B(w*), which a bare
    loop does not compute, is shown apart: ``batch_loss=`` always pays it (one forward at w*
    per step); ``loss_fn=`` replaces it by a per-sample cache when that is cheaper."""
    model = model.to(device)
    x, y = (t.to(device) for t in model.train_dataset.tensors)
    loss_fn = model.loss_fn
    d = sum(p.numel() for p in model.parameters())
    eps, gamma, nbeta, batch = (float(llc["step_size"]), float(llc["localization"]),
                                float(llc["nbeta"]), int(llc["batch_size"]))
    common = dict(num_chains=chains, batch_size=batch, nbeta=nbeta, localization=gamma,
                  device=device, seed=0, step_size=eps, num_burnin=0)

    def batch_loss(forward, b):  # the same loss, through the path that is never cached
        return loss_fn(forward(b[0]), b[1])

    # warm-up: lazy initialisation and first calls of every path
    estimate_llc(model, (x, y), loss_fn, num_draws=2, **common)
    estimate_llc(model, (x, y), batch_loss=batch_loss, num_draws=2, **common)
    kw = dict(chains=chains, steps=draws, batch=batch, eps=eps, nbeta=nbeta, gamma=gamma,
              loss_fn=loss_fn)
    vmapped_loop(model, x, y, **{**kw, "steps": 2})
    ticks: list[float] = []
    bare_loop(model, x, y, **kw, ticks=ticks)
    t_bare = fastest_window(ticks, window)
    ticks = []
    vmapped_loop(model, x, y, **kw, ticks=ticks)
    t_vmap = fastest_window(ticks, window)
    t_fwd = _baseline_forward(model, x, y, loss_fn, batch, draws)
    rows = [("estimate_llc (sgld)",
             loop_and_fixed(model, (x, y), draws, window, loss_fn=loss_fn, sampler="sgld",
                            **common)),
            ("estimate_llc (default sampler)",
             loop_and_fixed(model, (x, y), draws, window, loss_fn=loss_fn, **common)),
            ("sgld, paired baseline (batch_loss)",
             loop_and_fixed(model, (x, y), draws, window, batch_loss=batch_loss,
                            sampler="sgld", **common))]
    print(f"\n{name}: {d:,} parameters ({origin}), {chains} chains x {draws} draws "
          f"(fastest {window}-step window), batch {batch}, eps={eps:g}, nβ={nbeta:g}, "
          f"γ={gamma:g}, {device}")
    print(f"  bare sequential loop               {1e3 * t_bare:8.2f} ms/step (all chains)")
    print(f"  bare vmapped loop                  {1e3 * t_vmap:8.2f} ms/step")
    for label, (t, _, cached) in rows:
        print(f"  {label:<34} {1e3 * t:8.2f} ms/step   ratio to bare sequential "
              f"{t / t_bare:5.2f}x   to bare vmapped {t / t_vmap:5.2f}x   baseline "
              f"{'cached' if cached else 'forward'}")
    print(f"  one forward at w* (the baseline)   {1e3 * t_fwd:8.2f} ms/step "
          f"({t_fwd / t_vmap:.1%} of a bare vmapped step)")
    print(f"  fixed cost per call                {rows[0][1][1]:8.3f} s (sgld, loss_fn), "
          f"{rows[2][1][1]:.3f} s (batch_loss)")


def trained_grokking_mlp(steps: int, quick: bool) -> tuple[nn.Module, str]:
    """The MLP of configs/modular_addition.yaml (p = 23, a quarter of the widths with
    ``quick``) after ``steps`` full-batch AdamW steps, as that config trains it."""
    from experiments.modular_addition import ModularAdditionMLP

    torch.manual_seed(0)
    sizes = dict(modulus=23, embed_dim=16, hidden_dim=32) if quick else {}
    model = ModularAdditionMLP(lr=3e-3, weight_decay=1.0, **sizes)
    x, y = model.train_dataset.tensors
    opt = model.configure_optimizers()
    for _ in range(steps):
        loss = model.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), f"{steps} full-batch AdamW steps, train loss {loss.item():.2g}"


def trained_attention_lm(steps: int, quick: bool) -> tuple[nn.Module, str]:
    """A small attention-only induction LM (the model of configs/induction_lm.yaml at width
    16, 16 tokens, context 24, 256 sequences; with ``quick`` width 8, context 12, 128
    sequences) after ``steps`` Adam steps: the config's size is too slow for six default
    estimates on a CPU."""
    from experiments.induction_lm import InductionLM

    torch.manual_seed(0)
    sizes = (dict(vocab_size=16, seq_len=12, copy_len=2, width=8, num_samples=128) if quick
             else dict(vocab_size=16, seq_len=24, copy_len=4, width=16, num_samples=256))
    model = InductionLM(lr=3e-3, **sizes)
    x, y = model.train_dataset.tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=g)
        loss = model.loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), f"{steps} Adam steps, train loss {loss.item():.3g}"


def criteria(device: torch.device, quick: bool) -> None:
    """Issue 12's convergence criteria at all defaults on both models (see
    :func:`devinterp.llc.calibration.check_stability`)."""
    draws = {"num_draws": 100} if quick else {}
    print(f"\nConvergence at all defaults ({'100 draws, ' if quick else ''}pass: R-hat <= 1.1, "
          "|change| < bound = 5 % + 2 se):")
    models = [("attention-only LM", *trained_attention_lm(200 if quick else 400, quick)),
              ("grokking MLP", *trained_grokking_mlp(1500 if quick else 3000, quick))]
    for name, model, origin in models:
        x, y = (t.to(device) for t in model.train_dataset.tensors)
        t0 = time.perf_counter()
        c = check_stability(model.to(device), (x, y), model.loss_fn, device=device, **draws)
        d = sum(p.numel() for p in model.parameters())
        print(f"  {name} ({d:,} parameters, {origin}): λ̂ = {c['llc']:.4g} ± {c['se']:.2g}, "
              f"eps = {c['step_size']:.3g}, γ = {c['localization']:g}, nβ = {c['nbeta']:.4g}, "
              f"{time.perf_counter() - t0:.0f} s")
        print(f"    split R-hat (defaults)      {c['rhat']:6.3f}   "
              f"{'pass' if c['rhat'] <= 1.1 else 'FAIL'}")
        for key, label in (("longer", "4x longer"), ("half_step", "eps / 2")):
            v = c[key]
            print(f"    relative change, {label:<10} {v['change']:+7.1%}   bound {v['bound']:6.1%}"
                  f"   {'pass' if v['stable'] else 'FAIL'}   (λ̂ = {v['llc']:.4g} ± {v['se']:.2g})")


def _baseline_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                      batch: int, steps: int) -> float:
    """Seconds per minibatch loss at w* without gradient: the paired baseline's cost."""
    g = torch.Generator(device=x.device).manual_seed(0)
    t0 = now(x.device)
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.randint(len(x), (batch,), generator=g, device=x.device)
            loss_fn(model(x[idx]), y[idx])
    return (now(x.device) - t0) / steps


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
    p.add_argument("--transformer", action="store_true",
                   help="estimator vs bare loops on the in-context regression transformer and "
                        "the induction LM at a trained checkpoint (8 chains), instead of the "
                        "MLPs and the accuracy table")
    p.add_argument("--criteria", action="store_true",
                   help="only the convergence criteria at all defaults (printed at the end of "
                        "--transformer): R-hat, 4x longer, eps / 2 on an attention-only LM and "
                        "the grokking MLP")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                   help="with --transformer: time MODEL (icl or induction) at this snapshot "
                        "(Lightning .ckpt or state dict) instead of training it here")
    p.add_argument("--train-steps", type=int, default=300,
                   help="with --transformer: Adam steps to reach the checkpoint (default 300)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    draws = 50 if args.quick else 200
    if args.criteria:
        criteria(device, args.quick)
        return
    if args.transformer:
        snapshots = {}
        for item in args.checkpoint:
            key, sep, path = item.partition("=")
            if not sep or key not in TRANSFORMERS:
                p.error(f"--checkpoint {item!r}: write MODEL=PATH with MODEL one of "
                        f"{', '.join(TRANSFORMERS)}")
            snapshots[key] = path
        for key in TRANSFORMERS:
            try:
                loaded = load_transformer(key, snapshots.get(key),
                                          30 if args.quick else args.train_steps)
            except ValueError as e:
                p.error(str(e))
            # 128 draws: the per-sample cache pays off on both models' data (at fewer, the
            # estimator pays a forward per step); 32-step windows hold one MALA check each.
            transformer_speed(TRANSFORMERS[key][0], *loaded, device, 8,
                              *((4, 2) if args.quick else (128, 32)))
        criteria(device, args.quick)
        return
    if not args.skip_speed:
        speed("~10k-parameter MLP", [32, 128, 64, 10], device, 4, draws, 256)
        speed("~1M-parameter MLP", [256, 1024, 512, 10] if not args.quick else [256, 512, 10],
              device, 4, draws, 256)
    if not args.skip_accuracy:
        accuracy(device, args.quick, args.sampler, args.step_scale)


if __name__ == "__main__":
    main()
