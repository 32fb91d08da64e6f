"""MCMC convergence diagnostics over sample arrays shaped (chain, draw).

Both work on split chains (each chain's first and second half count as two chains; the middle
draw of an odd count is dropped) and on the draws as they are, without the rank normalization
of Vehtari et al. 2021 (arXiv 1903.08008):

- :func:`split_rhat` is the split R-hat of Gelman et al., *Bayesian Data Analysis* (3rd ed.,
  ch. 11): ``arviz.rhat(x, method="split")``, not arviz's default rank-normalized R-hat;
- :func:`ess` is the split-chain effective sample size of the mean, with Geyer's initial
  positive and initial monotone sequences as Stan computes it: ``arviz.ess(x,
  method="mean")``. It is not the "bulk" ESS (that one rank-normalizes the draws first).

``tests/test_diagnostics.py`` pins both to arviz's values. They are a few lines of numpy, so we
keep them here rather than pull in a plotting-sized dependency.
"""

from __future__ import annotations

import numpy as np
from einops import rearrange

__all__ = ["ess", "split_rhat"]


def _split(x: np.ndarray) -> np.ndarray:
    """Samples (chain, draw) as (2·chain, draw // 2): each chain's halves become two chains."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an array shaped (chain, draw), got shape {x.shape}")
    if x.shape[1] % 2:
        x = np.delete(x, x.shape[1] // 2, axis=1)  # the middle draw, as arviz drops it
    return rearrange(x, "chain (half draw) -> (half chain) draw", half=2)


def split_rhat(x: np.ndarray) -> float:
    """Split R-hat of samples shaped (chain, draw); near 1.0 when chains agree (> 1.1 is bad)."""
    s = _split(x)
    m, n = s.shape
    if n < 2 or m < 2:
        return float("nan")
    means = s.mean(axis=1)
    w = s.var(axis=1, ddof=1).mean()
    b = n * means.var(ddof=1)
    if w == 0:
        return 1.0 if b == 0 else float("inf")
    var_plus = (n - 1) / n * w + b / n
    return float(np.sqrt(var_plus / w))


def _autocov(x: np.ndarray) -> np.ndarray:
    """Autocovariance of each row by FFT (biased estimator, lag 0 .. n-1)."""
    n = x.shape[1]
    xc = x - x.mean(axis=1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(xc, size, axis=1)
    return np.fft.irfft(f * np.conj(f), size, axis=1)[:, :n] / n


def _geyer_tau(rho: np.ndarray) -> float:
    """Integrated autocorrelation time from the combined autocorrelations ``rho`` (lag 0 .. n-1):
    pairs of lags summed while positive (initial positive sequence), then made non-increasing
    (initial monotone sequence), as in Stan and arviz."""
    n = len(rho)
    r = np.zeros(n)
    even, odd = 1.0, float(rho[1])
    r[0], r[1] = even, odd
    t = 1
    while t < n - 3 and even + odd > 0:
        even, odd = float(rho[t + 1]), float(rho[t + 2])
        if even + odd >= 0:
            r[t + 1], r[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        r[max_t + 1] = even
    for t in range(1, max_t - 1, 2):
        if r[t + 1] + r[t + 2] > r[t - 1] + r[t]:
            r[t + 1] = r[t + 2] = (r[t - 1] + r[t]) / 2
    return -1.0 + 2.0 * float(r[:max_t + 1].sum()) + float(r[max_t + 1:max_t + 2].sum())


def ess(x: np.ndarray) -> float:
    """Split-chain effective sample size of the mean of samples shaped (chain, draw), over all
    chains together (``arviz.ess(x, method="mean")``; see the module docstring)."""
    s = _split(x)
    m, n = s.shape
    if n < 4:
        return float("nan")
    if np.ptp(s) < np.finfo(float).resolution:  # constant draws: every one counts
        return float(m * n)
    acov = _autocov(s)
    w = acov[:, 0].mean() * n / (n - 1)
    var_plus = w * (n - 1) / n + (s.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    rho = 1.0 - (w - acov.mean(axis=0)) / var_plus
    tau = max(_geyer_tau(rho), 1.0 / np.log10(m * n))
    return float(m * n / tau)
