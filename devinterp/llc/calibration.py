"""The automatic step size: ε from the loss's curvature and short pilot chains, from data alone.

ε is capped so that ε·(nβ·λ_max(H) + γ) <= 0.1 (the top direction's discretization bias is then
about ε·a/4 = 2.5 %), then shrunk until pilot chains do not diverge, keep a MALA acceptance near
0.9 and find no steeper curvature where they went.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad

from devinterp.health import TARGET_ACCEPTANCE, rule_for
from devinterp.llc import driver
from devinterp.llc.errors import NonFiniteCurvatureError
from devinterp.llc.problem import Problem
from devinterp.samplers import Kernel

__all__ = ["NEAR_MINIMUM_BELOW", "STABLE_REL", "STABLE_SE", "calibrate", "check_stability",
           "hessian_top", "step_cap"]

STEP_CAP = 0.1
#: λ̂ counts as stable under a change of settings when it moves by less than this fraction of
#: itself plus ``STABLE_SE`` standard errors of the difference (issue 12's criterion).
STABLE_REL = 0.05
STABLE_SE = 2.0
#: w* counts as near a minimum when at most this fraction of the pilot chains' draws fall below
#: the paired baseline L_B(w*) (the health rule's bound): on a slope the chains run downhill.
NEAR_MINIMUM_BELOW = rule_for("frac_below_baseline").high


def hessian_top(prob: Problem, params: dict[str, Tensor], batch: Any, iters: int = 6,
                 seed: int = 0, where: str = "w*") -> tuple[float, str]:
    """Largest-magnitude Hessian eigenvalue of the minibatch loss at ``params`` (power
    iteration), and how the Hessian-vector products were computed.

    Exact products (reverse-over-reverse) need second derivatives; where one is missing (a
    fused attention kernel has no double backward) or is NaN where the first derivative is
    finite (``w ** 0`` at ``w = 0``), the products fall back to central finite differences
    of gradients, which need first derivatives only.
    """
    g = torch.Generator(device=prob.device).manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
         for k, p in params.items()}
    grad_fn = grad(lambda p: prob.loss(p, batch))
    scale = math.sqrt(sum(float((p.double() ** 2).sum()) for p in params.values())
                      / max(1, sum(p.numel() for p in params.values())))
    radius = 1e-3 * max(1.0, scale)  # ~ sqrt(float32 resolution) relative to the weights

    def exact(u: dict[str, Tensor]) -> dict[str, Tensor]:
        # Reverse-over-reverse: works for every loss (forward-mode jvp fails on some built-in
        # losses, e.g. nn.MSELoss, with "ZeroTensors are immutable").
        return grad(lambda q: sum((g * u[k]).sum() for k, g in grad_fn(q).items()))(params)

    def finite_difference(u: dict[str, Tensor]) -> dict[str, Tensor]:
        plus = grad_fn({k: p + radius * u[k] for k, p in params.items()})
        minus = grad_fn({k: p - radius * u[k] for k, p in params.items()})
        return {k: (plus[k] - minus[k]) / (2 * radius) for k in params}

    method = "hvp"
    lam = float("nan")
    for _ in range(iters):
        norm = torch.sqrt(sum((x * x).sum() for x in v.values()))
        if norm == 0:
            return 0.0, method
        v = {k: x / norm for k, x in v.items()}
        hv = None
        if method == "hvp":
            try:
                hv = exact(v)
            except (RuntimeError, NotImplementedError):
                hv = None  # no double backward for some op: first derivatives only
            if hv is None or not all(bool(torch.isfinite(x).all()) for x in hv.values()):
                method = "finite_difference"
        if method == "finite_difference":
            hv = finite_difference(v)
        lam = float(sum((hv[k] * v[k]).sum() for k in v))
        if not math.isfinite(lam):
            bad = [k for k, x in hv.items() if not bool(torch.isfinite(x).all())]
            raise NonFiniteCurvatureError(
                f"step_size='auto': the loss's curvature at {where} is not finite, even from "
                f"finite differences of gradients (non-finite in {bad[:5]}); the model or the "
                "loss produces NaN/inf near those weights: pass step_size=... explicitly, or "
                "check the model for operations such as log(0), x/0 or pow with a negative "
                "exponent")
        v = {k: x.detach() for k, x in hv.items()}
    return abs(lam), method


def step_cap(a_max: float, sampler: str) -> float:
    """Largest ε for a top curvature ``a_max`` of U. With RMSProp the preconditioner settles
    near 1/√a in a direction of curvature a, so the effective step ε·G·a is ε·√a."""
    return STEP_CAP / (math.sqrt(a_max) if sampler == "rmsprop_sgld" else a_max)


def calibrate(prob: Problem, *, seed: int, nbeta: float, localization: float,
              kernel: Kernel, vectorize: bool, pilot_steps: int, num_pilot: int
              ) -> tuple[float, dict]:
    """Choose ε from data alone: curvature cap, then short pilot chains that must not diverge,
    must keep a MALA acceptance near 0.9, and must not find a curvature the cap did not know."""
    batch = next(prob.source.iterate(seed + 1))
    h0, method = hessian_top(prob, prob.anchor, batch, seed=seed)
    a_max = nbeta * h0 + localization
    eps = step_cap(a_max, kernel.name)
    rounds = []
    for _ in range(8):
        run = driver.run_chains(
            prob, range(num_pilot), seed=seed + 2, kernel=kernel, step_size=eps, nbeta=nbeta,
            localization=localization, num_burnin=pilot_steps // 2,
            num_draws=pilot_steps - pilot_steps // 2, vectorize=vectorize, accept_every=2)
        acc = float(np.nanmean(run.accept)) if np.isfinite(run.accept).any() else 0.0
        diverged = bool(run.diverged.any())
        below = float(np.mean(run.loss < run.baseline[None, :])) if not diverged else 1.0
        h = 0.0
        if not diverged:
            h, m = hessian_top(prob, {k: v[0].contiguous() for k, v in run.final.items()},
                                batch, seed=seed, where="a pilot chain's last draw")
            method = m if m != "hvp" else method
        rounds.append({"step_size": eps, "acceptance": acc, "diverged": diverged,
                       "hessian_top": h, "frac_below_baseline": below})
        new = eps
        if diverged:
            new = eps / 10
        else:
            new = min(new, step_cap(nbeta * h + localization, kernel.name))
            if acc < TARGET_ACCEPTANCE:
                # 1 − acceptance grows about linearly in ε (measured on MLPs and deep linear
                # networks): jump to the target in one round, with a margin.
                new = min(new, eps * max(0.05, 0.8 * (1 - TARGET_ACCEPTANCE) / (1 - acc)))
        if new >= 0.8 * eps:
            break
        eps = new
    if not (math.isfinite(eps) and eps > 0):
        raise NonFiniteCurvatureError(
            f"step_size='auto' found no usable step (ε = {eps}; calibration rounds: {rounds}); "
            "pass step_size=... explicitly")
    return eps, {"calibration_rounds": len(rounds), "hessian_top": h0, "calibration": rounds,
                 "calibration_acceptance": rounds[-1]["acceptance"], "curvature_method": method,
                 "near_minimum": rounds[-1]["frac_below_baseline"] <= NEAR_MINIMUM_BELOW}


def check_stability(model: Any, data: Any, loss_fn: Any = None, **options: Any) -> dict[str, Any]:
    """The checks a careful researcher runs by hand on ``estimate_llc(model, data, loss_fn,
    **options)``: its split R-hat, and how far λ̂ moves when the same settings (the ε, nβ and γ
    it used) run 4× longer (draws and burn-in) and when ε is halved.

    A change counts as stable when ``|Δλ̂| < STABLE_REL·|λ̂| + STABLE_SE·se(Δλ̂)``, the standard
    error of the difference over chains of both estimates. Costs six estimates' worth of steps.

    Returns ``llc``, ``se``, ``rhat``, ``step_size``, ``localization``, ``nbeta`` of the
    estimate, and for ``"longer"`` and ``"half_step"`` a dict with the other ``llc`` and
    ``se``, ``change`` (Δλ̂/λ̂), ``bound`` (the allowed |change|) and ``stable``.
    """
    from devinterp.llc.estimate import estimate_llc  # estimate imports this module

    base = estimate_llc(model, data, loss_fn, **options)
    s = base.settings
    fixed = {**options, "step_size": s["step_size"], "nbeta": s["nbeta"],
             "localization": s["localization"], "num_burnin": s["num_burnin"]}
    variants = {
        "longer": {**fixed, "num_draws": 4 * s["num_draws"], "num_burnin": 4 * s["num_burnin"]},
        "half_step": {**fixed, "step_size": s["step_size"] / 2},
    }
    se = float(base.diagnostics["llc_se"])
    out: dict[str, Any] = {"llc": base.llc_mean, "se": se, "rhat": base.diagnostics["rhat"],
                           "step_size": s["step_size"], "localization": s["localization"],
                           "nbeta": s["nbeta"]}
    for name, opts in variants.items():
        other = estimate_llc(model, data, loss_fn, **opts)
        o_se = float(other.diagnostics["llc_se"])
        scale = abs(base.llc_mean) or 1.0
        bound = STABLE_REL + STABLE_SE * math.hypot(se, o_se) / scale
        change = (other.llc_mean - base.llc_mean) / scale
        out[name] = {"llc": other.llc_mean, "se": o_se, "change": change, "bound": bound,
                     "stable": bool(abs(change) < bound)}
    return out
