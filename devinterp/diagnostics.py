"""MCMC convergence diagnostics over sample arrays shaped (chain, draw).

Split R-hat and the effective sample size follow Gelman et al., *Bayesian Data Analysis* (3rd
ed., ch. 11) and Vehtari et al. 2021 (split chains, Geyer's initial monotone sequence). They are
a few lines of numpy, so we keep them here rather than pull in a plotting-sized dependency.
"""

from __future__ import annotations

import numpy as np


def _split(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an array shaped (chain, draw), got shape {x.shape}")
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


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


def ess(x: np.ndarray) -> float:
    """Bulk effective sample size of samples shaped (chain, draw), over all chains together."""
    s = _split(x)
    m, n = s.shape
    if n < 4:
        return float("nan")
    acov = _autocov(s)
    chain_var = acov[:, 0] * n / (n - 1)
    w = chain_var.mean()
    var_plus = w * (n - 1) / n + (s.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    if var_plus == 0:
        return float(m * n)
    rho = 1.0 - (w - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    # Geyer: sum consecutive pairs while positive, forcing them to be monotone.
    tau = -1.0
    prev = np.inf
    for t in range(0, n - 1, 2):
        pair = rho[t] + rho[t + 1]
        if pair < 0:
            break
        pair = min(pair, prev)
        prev = pair
        tau += 2.0 * pair
    tau = max(tau, 1.0 / np.log10(m * n))
    return float(m * n / tau)
