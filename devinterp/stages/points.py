"""The points a stage detector fits: checkpoints in log-step, their noise, and bins of them.

Every detector works in ``x = log10(step + 1)`` (decades; step 0 is x = 0). Each checkpoint is
weighted by its per-checkpoint spread ``llc_std`` (relative to the median), the overall noise
scale is estimated from the data, and a curve of more than ``max_points`` checkpoints is first
averaged in bins of equal width in x, so memory and time stay bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MAX_POINTS", "MIN_CHECKPOINTS", "estimate_noise", "log_step", "relative_sd"]

MIN_CHECKPOINTS = 5
MAX_POINTS = 1000  # default cap on the points a detector fits (longer curves are binned)


def log_step(steps: Any) -> np.ndarray:
    """``log10(step + 1)``: the time axis of every detector (step 0 maps to 0)."""
    return np.log10(np.asarray(steps, dtype=float) + 1.0)


def estimate_noise(x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray | None = None) -> float:
    """Scale ``s`` such that the noise on ``y[i]`` has standard deviation ``s * rel_sd[i]``.

    Robust to trends: each interior point is compared with the straight line through its two
    neighbours (exact for any locally linear curve), the residual is divided by its standard
    deviation under white noise, and the median absolute value is turned into a standard
    deviation (x 1.4826), so the few points on sharp bends do not count.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    r = np.ones_like(y) if rel_sd is None else np.asarray(rel_sd, float)
    if len(y) < 3:
        return 0.0
    h0, h1 = x[1:-1] - x[:-2], x[2:] - x[1:-1]
    c0, c1 = h1 / (h0 + h1), h0 / (h0 + h1)
    resid = y[1:-1] - (c0 * y[:-2] + c1 * y[2:])
    sd = np.sqrt(r[1:-1] ** 2 + (c0 * r[:-2]) ** 2 + (c1 * r[2:]) ** 2)
    return float(1.4826 * np.median(np.abs(resid / sd)))


def relative_sd(llc_std: Any, n: int, *, window: int = 7) -> np.ndarray:
    """Per-checkpoint noise weights from ``llc_std``, relative to their median.

    ``llc_std`` is itself an estimate from a few chains (±25% with 8 chains), while the noise it
    measures varies slowly along training; a running median over ``window`` neighbouring
    checkpoints keeps the trend without letting one lucky small spread make a checkpoint count
    several times. Missing, zero or non-finite entries are ignored; the ratios are clipped to
    [0.2, 5].
    """
    if llc_std is None:
        return np.ones(n)
    s = pd.Series(np.asarray(llc_std, dtype=float))
    s = s.where(np.isfinite(s) & (s > 0))
    if s.isna().all():
        return np.ones(n)
    smooth = s.rolling(window, center=True, min_periods=1).median()
    smooth = smooth.fillna(s.median()).to_numpy()
    return np.clip(smooth / np.median(smooth), 0.2, 5.0)


def standard_errors(llc_std: Any, num_chains: Any, n: int) -> np.ndarray | None:
    """The standard error of each checkpoint's λ̂: ``llc_std / sqrt(num_chains)``, or
    ``llc_std`` itself when the number of chains is unknown (the error of a one-chain estimate:
    an upper bound, so a curve without a ``num_chains`` column never gets stages that are
    smaller than its error bars). The median where one is unknown; None without ``llc_std``."""
    if llc_std is None:
        return None
    std = np.asarray(llc_std, dtype=float)
    if std.shape != (n,):
        std = np.broadcast_to(std, (n,)).astype(float)
    chains = np.ones(n) if num_chains is None else np.broadcast_to(
        np.asarray(num_chains, dtype=float), (n,))
    se = std / np.sqrt(chains)
    se[~np.isfinite(se) | (se <= 0)] = np.nan
    if np.isnan(se).all():
        return None
    return np.where(np.isnan(se), np.nanmedian(se), se)


@dataclass
class _Points:
    """The points a detector fits: checkpoints, or bins of them on long curves.

    Attributes:
        steps: a real checkpoint step per point (milestones snap to these), increasing.
        x: ``log10(step + 1)`` of the point (the weighted mean of its checkpoints').
        y: λ̂ (the inverse-variance weighted mean of its checkpoints').
        rel_sd: relative noise of ``y`` (of the mean, for a bin).
        standard_errors: a single estimate's standard error there (not the bin mean's: the
            ``min_change_se`` floor is in units of one estimate), or None.
        loss: the loss (mean over the bin), or None.
    """

    steps: np.ndarray
    x: np.ndarray
    y: np.ndarray
    rel_sd: np.ndarray
    standard_errors: np.ndarray | None
    loss: np.ndarray | None


def _bin_points(p: _Points, max_points: int) -> _Points:
    """At most ``max_points`` points: the first and last checkpoint as they are, the others in
    ``max_points - 2`` bins of equal width in log-step (memory and time stay bounded however
    many checkpoints there are: the GP is O(points²) in memory).

    λ̂ is smooth in log-step, and equal-width bins are narrowest where checkpoints are sparse:
    early checkpoints keep a bin each, the dense late ones are averaged (a bin of k
    checkpoints has 1/sqrt(k) of their noise, which its ``rel_sd`` says). Each bin is placed
    at the inverse-variance weighted mean of its checkpoints and represented, for snapping, by
    the checkpoint nearest to that.
    """
    n, nb = len(p.x), max_points - 2
    span = p.x[-1] - p.x[0]
    inner = np.clip(np.floor((p.x[1:-1] - p.x[0]) / span * nb), 0, nb - 1)
    labels = np.r_[-1.0, inner, float(nb)]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    ends = np.r_[starts[1:], n]
    counts = ends - starts
    w = p.rel_sd ** -2.0
    sw = np.add.reduceat(w, starts)
    x = np.add.reduceat(w * p.x, starts) / sw
    y = np.add.reduceat(w * p.y, starts) / sw
    # The checkpoint nearest to each bin's x, inside the bin (x is sorted within it).
    right = np.clip(np.searchsorted(p.x, x), starts, ends - 1)
    left = np.clip(right - 1, starts, ends - 1)
    rep = np.where(np.abs(p.x[left] - x) <= np.abs(p.x[right] - x), left, right)
    se = None if p.standard_errors is None else np.sqrt(
        np.add.reduceat(p.standard_errors ** 2, starts) / counts)
    loss = None if p.loss is None else np.add.reduceat(p.loss, starts) / counts
    return _Points(p.steps[rep], x, y, 1.0 / np.sqrt(sw), se, loss)


def fit_points(steps: Any, llc_mean: Any, llc_std: Any, num_chains: Any, loss: Any,
               max_points: int | None) -> _Points:
    """The checked checkpoints of a curve as :class:`_Points`, binned above ``max_points``."""
    steps = np.asarray(steps, dtype=np.int64)
    y = np.asarray(llc_mean, dtype=float)
    if steps.ndim != 1 or steps.shape != y.shape:
        raise ValueError("steps and llc_mean must be 1-D arrays of the same length")
    if len(steps) < MIN_CHECKPOINTS:
        raise ValueError(f"need at least {MIN_CHECKPOINTS} checkpoints with a finite λ̂, got "
                         f"{len(steps)}; estimate λ̂ at more steps")
    if not np.all(np.diff(steps) > 0) or steps[0] < 0:
        raise ValueError("steps must be non-negative and strictly increasing")
    if not np.all(np.isfinite(y)):
        raise ValueError("llc_mean has non-finite values; drop those rows first")
    pts = _Points(steps, log_step(steps), y, relative_sd(llc_std, len(y)),
                  standard_errors(llc_std, num_chains, len(y)),
                  None if loss is None else np.asarray(loss, dtype=float))
    if max_points is not None and len(y) > max_points:
        pts = _bin_points(pts, max_points)
    return pts
