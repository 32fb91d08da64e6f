"""The Gaussian-process smoother of the ``critical`` detector: λ̂ and dλ̂/dx with uncertainty.

A Matérn-5/2 kernel on ``x = log10(step + 1)``, a constant mean, and noise variance
``s² · rel_sd²`` (heteroscedastic: ``rel_sd`` from ``llc_std``). Amplitude, lengthscale and
``s`` maximise the marginal likelihood (L-BFGS with analytic gradients, from three
lengthscales). The posterior mean and its derivative give λ̂ and dλ̂/dx in closed form, the
posterior covariance their uncertainty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.linalg import cho_solve, solve_triangular
from scipy.optimize import minimize

from devinterp.stages.points import estimate_noise
from devinterp.stages.profile import Profile, grid

__all__ = ["GP_FIT_POINTS", "gp_hyperparameters", "gp_profile"]

#: Hyperparameters are fitted on at most this many checkpoints (each L-BFGS step is O(n³)).
GP_FIT_POINTS = 400


def _matern(d: np.ndarray, ell: float) -> tuple[np.ndarray, np.ndarray]:
    """Matérn-5/2 correlation at lag ``d`` and its derivative in the first argument."""
    s = math.sqrt(5.0) * np.abs(d) / ell
    e = np.exp(-s)
    return (1 + s + s * s / 3) * e, -(5 * d / (3 * ell**2)) * (1 + s) * e


def _matern_slope_cov(d: Any, ell: float) -> np.ndarray:
    """Covariance of the derivatives of a unit Matérn-5/2 process at lag ``d``."""
    s = math.sqrt(5.0) * np.abs(d) / ell
    return 5 / (3 * ell**2) * (1 + s - s * s) * np.exp(-s)


def _negative_log_likelihood(dist: np.ndarray, y: np.ndarray, r2: np.ndarray
                             ) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """The GP's negative log marginal likelihood of ``y`` and its gradient, as a function of
    (log amplitude, log lengthscale, log noise scale)."""
    eye = np.eye(len(y))

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        log_amp, log_ell, log_noise = theta
        amp2, ell2, noise2 = math.exp(2 * log_amp), math.exp(2 * log_ell), math.exp(2 * log_noise)
        s = math.sqrt(5.0) * dist / math.sqrt(ell2)
        e = np.exp(-s)
        k = (1 + s + s * s / 3) * e
        try:
            chol = np.linalg.cholesky(amp2 * k + np.diag(noise2 * r2 + 1e-10))
        except np.linalg.LinAlgError:
            return 1e10, np.zeros(3)
        alpha = cho_solve((chol, True), y)
        m = cho_solve((chol, True), eye) - np.outer(alpha, alpha)
        value = 0.5 * y @ alpha + np.log(np.diag(chol)).sum()
        grad = 0.5 * np.array([
            np.sum(m * (2 * amp2 * k)),
            np.sum(m * (amp2 * (s * s / 3) * (1 + s) * e)),
            np.sum(np.diag(m) * 2 * noise2 * r2),
        ])
        return float(value), grad

    return nll


def gp_hyperparameters(x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray,
                       lengthscale: float | None) -> tuple[float, float, float]:
    """(amplitude², lengthscale, noise scale²) maximising the GP marginal likelihood of ``y``
    (standardised), with analytic gradients; ``lengthscale`` fixes that one."""
    nll = _negative_log_likelihood(np.abs(x[:, None] - x[None, :]), y, rel_sd**2)
    span = float(x[-1] - x[0])
    noise0 = min(max(estimate_noise(x, y, rel_sd), 1e-3), 1.0)
    bounds = [(math.log(1e-2), math.log(1e2)), (math.log(1e-2), math.log(max(span, 0.02))),
              (math.log(1e-3), math.log(10.0))]
    if lengthscale is not None:
        bounds[1] = (math.log(lengthscale),) * 2
        starts = [lengthscale]
    else:
        starts = [0.05, 0.15, 0.5]
    best = None
    for ell0 in starts:
        theta0 = np.array([0.0, math.log(min(max(ell0, 1e-2), max(span, 0.02))), math.log(noise0)])
        res = minimize(nll, theta0, jac=True, method="L-BFGS-B", bounds=bounds)
        if best is None or res.fun < best.fun:
            best = res
    log_amp, log_ell, log_noise = best.x
    return math.exp(2 * log_amp), math.exp(log_ell), math.exp(2 * log_noise)


def gp_profile(x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray, *, lengthscale: float | None,
               grid_size: int) -> tuple[Profile, dict[str, float]]:
    """The GP posterior of λ̂ on a grid in x, and its hyperparameters (``amplitude``,
    ``lengthscale``, ``noise_scale``, in λ̂'s units and decades)."""
    center, scale = float(y.mean()), float(y.std())
    ys = (y - center) / scale
    # Hyperparameters from at most GP_FIT_POINTS checkpoints, evenly spaced by index so the
    # sampling density is kept; the posterior uses all of them.
    sub = np.unique(np.linspace(0, len(x) - 1, min(len(x), GP_FIT_POINTS)).round()).astype(int)
    amp2, ell, noise2 = gp_hyperparameters(x[sub], ys[sub], rel_sd[sub], lengthscale)
    info = {"amplitude": math.sqrt(amp2) * scale, "lengthscale": ell,
            "noise_scale": math.sqrt(noise2) * scale}
    cov = amp2 * _matern(x[:, None] - x[None, :], ell)[0]
    chol = np.linalg.cholesky(cov + np.diag(noise2 * rel_sd**2 + 1e-10))
    alpha = cho_solve((chol, True), ys)
    g = grid(x, grid_size)
    k_g, dk_g = _matern(g[:, None] - x[None, :], ell)
    k_g, dk_g = amp2 * k_g, amp2 * dk_g
    v = solve_triangular(chol, k_g.T, lower=True)
    w = solve_triangular(chol, dk_g.T, lower=True)
    var = np.maximum(amp2 - np.einsum("ij,ij->j", v, v), 0.0)
    slope_var = np.maximum(5 * amp2 / (3 * ell**2) - np.einsum("ij,ij->j", w, w), 0.0)
    slope = scale * (dk_g @ alpha)

    def change_sd(i: int, j: int) -> float:
        c = amp2 * float(_matern(np.array(g[i] - g[j]), ell)[0]) - float(v[:, i] @ v[:, j])
        return scale * math.sqrt(max(var[i] + var[j] - 2 * c, 0.0))

    def slope_change_sd(i: int, j: int) -> float:
        c = amp2 * float(_matern_slope_cov(g[i] - g[j], ell)) - float(w[:, i] @ w[:, j])
        return scale * math.sqrt(max(slope_var[i] + slope_var[j] - 2 * c, 0.0))

    def slope_draws(idx: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
        wi = w[:, idx]
        cov = amp2 * _matern_slope_cov(g[idx][:, None] - g[idx][None, :], ell) - wi.T @ wi
        vals, vecs = np.linalg.eigh(cov)
        root = vecs * np.sqrt(np.clip(vals, 0.0, None))
        return slope[idx] + scale * rng.standard_normal((num, len(idx))) @ root.T

    profile = Profile(g, center + scale * (k_g @ alpha), slope, change_sd, slope_change_sd,
                      slope_draws)
    return profile, info
