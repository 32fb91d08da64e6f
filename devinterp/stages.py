"""Developmental stages from a λ̂ curve.

Hoogland et al. (2024) define milestones as critical points of the λ̂ curve over log-time: the
plateaus between a rise and the next change, where ``dλ̂/d log t`` vanishes. A stage runs from one
milestone to the next; it is type "A" when λ̂ rises over it and type "B" when it falls. They
smoothed λ̂ with a Gaussian process on ``log(step + 1)``, flagged ``|dλ̂/d log t| < 0.25`` as
plateau candidates and chose the final boundaries by hand. This module replaces the hand with
tests.

Every detector works in ``x = log10(step + 1)`` (decades; step 0 is x = 0) in two moves:

1. fit a curve with its uncertainty to the checkpoints (a :class:`Profile` on a grid in x),
   weighting checkpoints by the per-checkpoint spread ``llc_std`` and estimating the overall
   noise scale from the data; a curve of more than ``max_points`` (1,000) checkpoints is first
   averaged in bins of equal width in x, so memory and time stay bounded (100,000 rows:
   ``tools/bench_stages_memory.py``);
2. read the milestones off the fitted curve (:func:`_milestones`): the turning points where λ̂
   goes from rising to falling or back, simplified as in topological persistence, then, inside
   each monotone run, the local minima of ``|slope|``, kept only while every stage changes λ̂ by
   ``significance`` standard errors of the fit, ``min_change_se`` standard errors of a single
   estimate (and ``min_change`` of its range) and lasts ``min_stage_length`` decades (the first
   and last: ``min_stage_checkpoints`` checkpoints), and every milestone
   is a plateau (its ``|slope|`` at most ``plateau_ratio`` times the steepest slope of each
   stage beside it, and significantly below it).

Detectors (ruptures' verbs: ``fit``, ``predict``, ``fit_predict``):

- :class:`CriticalPoints` ("critical", the default): a Gaussian process on x (Matérn-5/2 kernel,
  heteroscedastic noise from ``llc_std``, hyperparameters by marginal likelihood), as in the
  paper.
- :class:`ChangePoints` ("pelt", "binseg"): ruptures (``jump=1``) on a piecewise-linear model in
  x, weighted by ``llc_std``, with a BIC penalty in units of the estimated noise variance.

Each milestone comes with a range of steps (``end_step_low`` .. ``end_step_high``): the 5%-95%
quantiles of where the flattest point falls over draws of the slope from the fit's uncertainty.
"""

from __future__ import annotations

import abc
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ruptures as rpt
from ruptures.base import BaseCost
from ruptures.costs import NotEnoughPoints
from scipy.linalg import cho_solve, solve_triangular
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from devinterp.store import STAGES_FILE, Run, RunStore, load_run

MIN_CHECKPOINTS = 5
METHODS = ("critical", "pelt", "binseg")
DEFAULT_METHOD = "critical"
RANGE_DRAWS = 200
DIP_Z = 1.645
_GP_FIT_POINTS = 400
MAX_POINTS = 1000  # default cap on the points a detector fits (longer curves are binned)
_LOSS_WINDOW = 0.01  # decades: metrics rows this close to a checkpoint give its loss (median)


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


def _standard_errors(llc_std: Any, num_chains: Any, n: int) -> np.ndarray | None:
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


# -- the fitted curve and milestone extraction --------------------------------------------------
@dataclass
class Profile:
    """A fitted λ̂ curve on a grid in ``x = log10(step + 1)``, with its uncertainty.

    Attributes:
        x: grid points (sorted; the checkpoints' x are among them).
        llc: fitted λ̂ at ``x``.
        slope: dλ̂/dx (per decade) at ``x``.
        change_sd: ``change_sd(i, j)``: standard error of ``llc[j] - llc[i]``.
        slope_change_sd: ``slope_change_sd(i, j)``: standard error of ``slope[j] - slope[i]``.
        slope_draws: ``slope_draws(idx, num, rng)``: ``num`` joint draws of ``slope[idx]`` from
            the fit's uncertainty, shape (draw, len(idx)).
    """

    x: np.ndarray
    llc: np.ndarray
    slope: np.ndarray
    change_sd: Callable[[int, int], float]
    slope_change_sd: Callable[[int, int], float]
    slope_draws: Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _grid(x: np.ndarray, grid_size: int) -> np.ndarray:
    """A uniform grid over the checkpoints' range, united with the checkpoints themselves."""
    return np.unique(np.concatenate([np.linspace(x[0], x[-1], grid_size), x]))


def _flat_profile(x: np.ndarray, y: np.ndarray) -> Profile:
    """The profile of a constant curve: no slope, no uncertainty, hence one stage."""
    return Profile(x, np.full_like(x, y[0]), np.zeros_like(x), lambda i, j: 0.0,
                   lambda i, j: 0.0, lambda idx, num, rng: np.zeros((num, len(idx))))


def _candidates(slope: np.ndarray, lo: int = 0, hi: int | None = None) -> list[int]:
    """Grid indices strictly inside (lo, hi) where ``|slope|`` has a local minimum (the middle
    of a run of equal values, as on a piecewise-linear fit)."""
    hi = len(slope) - 1 if hi is None else hi
    a = np.abs(slope[lo:hi + 1])
    new_run = np.r_[True, ~np.isclose(a[1:], a[:-1], rtol=1e-9, atol=1e-300)]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:] - 1, len(a) - 1]
    vals = a[starts]
    return [lo + int((starts[r] + ends[r]) // 2) for r in range(1, len(starts) - 1)
            if vals[r] < vals[r - 1] and vals[r] < vals[r + 1]]


def _extrema(slope: np.ndarray) -> list[int]:
    """Grid indices where the slope changes sign (the flatter side of each crossing)."""
    sign = np.sign(slope)
    out = []
    for i in np.flatnonzero(sign[:-1] * sign[1:] < 0):
        j = int(i if abs(slope[i]) <= abs(slope[i + 1]) else i + 1)
        if 0 < j < len(slope) - 1:
            out.append(j)
    return out


class _Rules:
    """What a stage and a milestone must satisfy (see the module docstring)."""

    def __init__(self, p: Profile, *, min_stage_length: float, min_change: float,
                 plateau_ratio: float, significance: float, min_stage_checkpoints: int,
                 checkpoints: np.ndarray, min_change_se: float,
                 standard_errors: np.ndarray | None) -> None:
        self.p, self.abs_slope = p, np.abs(p.slope)
        self.min_change_se = min_change_se
        self.standard_errors = standard_errors
        self.min_stage_length = min_stage_length
        self.min_stage_checkpoints = min_stage_checkpoints
        self.checkpoints = np.asarray(checkpoints, float)
        self.min_change = min_change * float(np.ptp(p.llc))
        self.plateau_ratio = plateau_ratio
        self.significance = significance

    def evidence(self, e0: int, e1: int) -> float:
        """< 1 when stage [e0, e1] is too short (in decades, or, for the first and last stage, in
        checkpoints), or changes λ̂ by under ``significance`` standard errors of the fit, under
        ``min_change_se`` standard errors of one estimate, or under ``min_change`` of the fitted
        curve's range."""
        p = self.p
        change = abs(p.llc[e1] - p.llc[e0])
        se = self.significance * p.change_sd(e0, e1)
        score = change / se if se > 0 else (math.inf if change > 0 else 0.0)
        if self.min_change > 0:
            score = min(score, change / self.min_change)
        if self.min_stage_length > 0:
            score = min(score, (p.x[e1] - p.x[e0]) / self.min_stage_length)
        lo, hi = np.searchsorted(self.checkpoints, [p.x[e0] - 1e-9, p.x[e1] + 1e-9])
        if self.min_stage_checkpoints > 2 and (e0 == 0 or e1 == len(p.x) - 1):
            score = min(score, (hi - lo - 1) / (self.min_stage_checkpoints - 1))
        if self.min_change_se > 0 and self.standard_errors is not None and hi > lo:
            floor = self.min_change_se * float(np.median(self.standard_errors[lo:hi]))
            if floor > 0:
                score = min(score, change / floor)
        return score

    def weakest(self, edges: list[int]) -> tuple[int, float]:
        """The stage (index into consecutive ``edges``) with the least evidence, and that."""
        ev = [self.evidence(e0, e1) for e0, e1 in pairwise(edges)]
        j = int(np.argmin(ev))
        return j, ev[j]

    def badness(self, b: int, e0: int, e1: int) -> float:
        """> 1 when milestone ``b`` between stages [e0, b] and [b, e1] is not a plateau.

        Its |slope| must be at most ``plateau_ratio`` times the steepest |slope| q of each stage,
        below that by ``DIP_Z`` standard errors, and below the mean slope between q and ``b``
        (else the stage is the tail of the next one's rise, not a transition of its own).
        """
        p, a = self.p, self.abs_slope
        worst = 0.0
        for lo, hi in ((e0, b), (b, e1)):
            q = lo + int(np.argmax(a[lo:hi + 1]))
            dip = a[q] - a[b]
            rate = abs(p.llc[b] - p.llc[q]) / abs(p.x[b] - p.x[q]) if q != b else 0.0
            se = DIP_Z * p.slope_change_sd(b, q)
            worst = max(worst,
                        a[b] / (self.plateau_ratio * a[q]) if a[q] > 0 else math.inf,
                        a[b] / rate if rate > 0 else math.inf,
                        se / dip if dip > 0 else math.inf)
        return worst


def _milestones(p: Profile, *, min_stage_length: float, min_change: float,
                plateau_ratio: float, significance: float, min_stage_checkpoints: int,
                checkpoints: np.ndarray, min_change_se: float,
                standard_errors: np.ndarray | None) -> list[int]:
    """Grid indices of the milestones of a fitted curve.

    First the extrema (where λ̂ turns from rising to falling or back) are simplified as in
    topological persistence: the stage with the least evidence goes first, and an interior one
    takes both its ends with it (a peak and a trough cancel), so small wiggles vanish while a
    shallow but significant dip stays. Then, within each monotone run left, the local minima of
    ``|slope|`` are candidate plateaus: the weakest stage loses its steeper interior end until
    all stages pass, then the least plateau-like milestone goes until all pass.
    """
    rules = _Rules(p, min_stage_length=min_stage_length, min_change=min_change,
                   plateau_ratio=plateau_ratio, significance=significance,
                   min_stage_checkpoints=min_stage_checkpoints, checkpoints=checkpoints,
                   min_change_se=min_change_se, standard_errors=standard_errors)
    last = len(p.x) - 1
    ext = _extrema(p.slope)
    while ext:
        j, ev = rules.weakest([0, *ext, last])
        if ev >= 1.0:
            break
        if j == 0:
            del ext[0]
        elif j == len(ext):
            del ext[-1]
        else:
            del ext[j - 1:j + 1]
    out: list[int] = []
    for e0, e1 in pairwise([0, *ext, last]):
        keep = _candidates(p.slope, e0, e1)
        while keep:
            edges = [e0, *keep, e1]
            j, ev = rules.weakest(edges)
            if ev < 1.0:
                ends = [k for k in (j - 1, j) if 0 <= k < len(keep)]
                del keep[max(ends, key=lambda k: rules.abs_slope[keep[k]])]
                continue
            bad = [rules.badness(b, edges[k], edges[k + 2]) for k, b in enumerate(keep)]
            k = int(np.argmax(bad))
            if bad[k] <= 1.0:
                break
            del keep[k]
        out += keep
        if e1 != last:
            out.append(e1)
    return out


def _milestone_range(p: Profile, b: int, lo: int, hi: int, rng: np.random.Generator
                     ) -> tuple[int, int]:
    """Grid indices of the 5% and 95% quantiles of where the flattest point between ``lo`` and
    ``hi`` (the steepest points of the stages beside milestone ``b``) falls, over draws of the
    slope from the fit's uncertainty."""
    if hi - lo < 2:
        return b, b
    idx = np.arange(lo + 1, hi)
    draws = p.slope_draws(idx, RANGE_DRAWS, rng)
    where = idx[np.argmin(np.abs(draws), axis=1)]
    low, high = np.quantile(where, [0.05, 0.95], method="nearest")
    return min(int(low), b), max(int(high), b)


# -- detectors -------------------------------------------------------------------------------------
class _Detector(abc.ABC):
    """Shared ``fit`` / ``predict`` / ``fit_predict`` over a fitted :class:`Profile`."""

    def __init__(self, *, min_stage_length: float, min_change: float, plateau_ratio: float,
                 significance: float, grid_size: int, min_stage_checkpoints: int,
                 min_change_se: float, max_points: int | None, threads: int) -> None:
        if not min_stage_length >= 0:
            raise ValueError(f"min_stage_length must be >= 0 decades of log-step, got "
                             f"{min_stage_length}")
        if not 0 <= min_change < 1:
            raise ValueError(f"min_change must be in [0, 1) (a fraction of the λ̂ range), got "
                             f"{min_change}")
        if not 0 < plateau_ratio <= 1:
            raise ValueError(f"plateau_ratio must be in (0, 1], got {plateau_ratio}")
        if not significance > 0:
            raise ValueError(f"significance must be > 0 standard errors, got {significance}")
        if grid_size < 10:
            raise ValueError(f"grid_size must be at least 10, got {grid_size}")
        if not min_change_se >= 0:
            raise ValueError(f"min_change_se must be >= 0 standard errors, got {min_change_se}")
        if not isinstance(min_stage_checkpoints, int) or min_stage_checkpoints < 2:
            raise ValueError(f"min_stage_checkpoints must be an integer >= 2 (a stage's two "
                             f"ends), got {min_stage_checkpoints!r}")
        if max_points is not None and (not isinstance(max_points, int) or max_points < 10):
            raise ValueError(f"max_points must be an integer >= 10 or None (no binning), got "
                             f"{max_points!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.min_stage_length = float(min_stage_length)
        self.min_change = float(min_change)
        self.plateau_ratio = float(plateau_ratio)
        self.significance = float(significance)
        self.grid_size = int(grid_size)
        self.min_stage_checkpoints = min_stage_checkpoints
        self.min_change_se = float(min_change_se)
        self.max_points = max_points
        self.threads = threads

    @property
    def params(self) -> dict[str, Any]:
        """The constructor arguments that decide the stages (recorded in stages.json): all but
        ``threads``, which only decides how fast they are found."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and k != "threads"}

    @abc.abstractmethod
    def _profile(self, x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray) -> Profile:
        """The fitted curve of checkpoints ``(x, y)`` with relative noise ``rel_sd``."""

    def fit(self, steps: Any, llc_mean: Any, llc_std: Any = None, num_chains: Any = None,
            loss: Any = None) -> _Detector:
        """Fit the curve. ``steps`` increasing non-negative integers; ``llc_mean`` finite.
        ``llc_std`` and ``num_chains`` (a number or one per checkpoint) give each estimate's
        standard error ``llc_std / sqrt(num_chains)``; without ``num_chains`` the standard
        error is taken to be ``llc_std`` itself (the conservative bound). ``loss`` at the same
        steps is used by detectors that segment λ̂ and loss jointly. Curves of more than
        ``max_points`` checkpoints are binned in log-step first (``points_``: what was fitted).
        """
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
                      _standard_errors(llc_std, num_chains, len(y)),
                      None if loss is None else np.asarray(loss, dtype=float))
        if self.max_points is not None and len(y) > self.max_points:
            pts = _bin_points(pts, self.max_points)
        self.points_ = pts
        self.steps_ = pts.steps
        self.x_ = pts.x
        self.noise_ = estimate_noise(pts.x, pts.y, pts.rel_sd)
        self.standard_errors_ = pts.standard_errors
        self.loss_ = pts.loss
        # The matrices are at most about a thousand wide: on a busy machine spin-waiting BLAS
        # threads make each factorisation many times slower (100k rows on 2 busy cores: 2.6 s on
        # one thread, 19 s on two: tools/bench_stages_memory.py --threads), so `threads` is 1.
        with threadpool_limits(self.threads, user_api="blas"):
            self.profile_ = (_flat_profile(pts.x, pts.y) if np.ptp(pts.y) == 0
                             else self._profile(pts.x, pts.y, pts.rel_sd))
        return self

    def predict(self) -> list[int]:
        """Stage ends in steps, ruptures-style: the milestones, then the last step.

        Sets ``boundaries_`` (milestone steps) and ``boundary_ranges_`` ((low, high) steps).
        """
        p = self.profile_
        keep = _milestones(p, min_stage_length=self.min_stage_length, min_change=self.min_change,
                           plateau_ratio=self.plateau_ratio, significance=self.significance,
                           min_stage_checkpoints=self.min_stage_checkpoints,
                           checkpoints=self.x_, min_change_se=self.min_change_se,
                           standard_errors=self.standard_errors_)
        a = np.abs(p.slope)
        edges = [0, *keep, len(p.x) - 1]
        rng = np.random.default_rng(0)
        bounds, ranges = [], []
        for k, b in enumerate(keep):
            lo = edges[k] + int(np.argmax(a[edges[k]:b + 1]))
            hi = b + int(np.argmax(a[b:edges[k + 2] + 1]))
            with threadpool_limits(self.threads, user_api="blas"):
                i, j = _milestone_range(p, b, lo, hi, rng)
            step = self._snap(p.x[b])
            bounds.append(step)
            ranges.append((min(self._snap(p.x[i], "down"), step),
                           max(self._snap(p.x[j], "up"), step)))
        # Two milestones can snap to one checkpoint where checkpoints are sparse: keep one.
        uniq = sorted({s: r for s, r in zip(bounds, ranges, strict=True)
                       if self.steps_[0] < s < self.steps_[-1]}.items())
        self.boundaries_ = [s for s, _ in uniq]
        self.boundary_ranges_ = [r for _, r in uniq]
        return [*self.boundaries_, int(self.steps_[-1])]

    def fit_predict(self, steps: Any, llc_mean: Any, llc_std: Any = None,
                    num_chains: Any = None, loss: Any = None) -> list[int]:
        """``fit`` then ``predict``."""
        return self.fit(steps, llc_mean, llc_std, num_chains, loss).predict()

    def _snap(self, x: float, direction: str = "nearest") -> int:
        """The checkpoint step nearest to ``x`` in log-step, or the nearest at or below ("down")
        or at or above ("up") it."""
        if direction == "down":
            return int(self.steps_[max(np.searchsorted(self.x_, x + 1e-12, side="right") - 1, 0)])
        if direction == "up":
            return int(self.steps_[min(np.searchsorted(self.x_, x - 1e-12), len(self.x_) - 1)])
        return int(self.steps_[int(np.argmin(np.abs(self.x_ - x)))])


class CriticalPoints(_Detector):
    """Milestones at critical points of a Gaussian-process-smoothed λ̂ curve over log-step.

    The GP has a Matérn-5/2 kernel on ``x = log10(step + 1)`` (twice differentiable, and less
    prone than an RBF kernel to ringing next to sharp transitions; it scored better on the
    benchmark), a constant mean, and noise variance ``s² · rel_sd²`` with ``rel_sd`` from
    ``llc_std`` (heteroscedastic). Amplitude, lengthscale and ``s`` maximise the marginal
    likelihood (L-BFGS from three lengthscales). The posterior mean and its derivative give λ̂
    and dλ̂/dx in closed form, the posterior covariance their uncertainty.

    Args:
        min_stage_length: shortest stage, in decades of log-step.
        min_change: smallest stage, as a fraction of the range of the fitted λ̂ (a guard against
            the many small wiggles that pass a significance test by chance; the paper's shallow
            stage LM3 is 2.6% of the range).
        plateau_ratio: a milestone's |slope| must be at most this fraction of the steepest slope
            of the gentler stage beside it (the paper used an absolute 0.25 per log-unit; a
            ratio does not depend on the scale of λ̂, which depends on nβ).
        significance: a stage must change λ̂ by this many standard errors.
        min_stage_checkpoints: fewest checkpoints the first and the last stage span, their ends
            included. At the ends of the curve the smoothed slope is the least constrained: with
            2, one interval there can make a stage (e.g. a tiny last stage on a flat final
            plateau); 3 asks for a checkpoint inside it. (Interior stages are held by data on
            both sides.)
        min_change_se: a stage must also change λ̂ by this many standard errors of a single
            estimate (``llc_std / sqrt(num_chains)``, the median over the stage's checkpoints;
            ``llc_std`` itself when the number of chains is unknown, e.g. a CSV with the columns
            step, llc_mean, llc_std; not used without ``llc_std``). The fit's own
            standard error comes from how smooth the curve is, and curves estimated with the
            same seed at every checkpoint are smoother than their error bars, so without this a
            drift of a fraction of one error bar along a plateau can count as a stage.
        lengthscale: fix the GP lengthscale (decades) instead of fitting it.
        grid_size: points of the uniform grid in log-step (checkpoints are added).
        max_points: longer curves are first binned to this many points, equally wide in
            log-step (the first and last checkpoint kept as they are), which bounds memory and
            time (the GP's are quadratic and cubic in the points); None fits every checkpoint.
        threads: BLAS threads for the fit (1 is fastest at these sizes on a busy machine).
    """

    def __init__(self, *, min_stage_length: float = 0.05, min_change: float = 0.005,
                 plateau_ratio: float = 0.5, significance: float = 3.0,
                 min_stage_checkpoints: int = 3, min_change_se: float = 1.0,
                 lengthscale: float | None = None, grid_size: int = 600,
                 max_points: int | None = MAX_POINTS, threads: int = 1) -> None:
        super().__init__(min_stage_length=min_stage_length, min_change=min_change,
                         plateau_ratio=plateau_ratio, significance=significance,
                         grid_size=grid_size, min_stage_checkpoints=min_stage_checkpoints,
                         min_change_se=min_change_se, max_points=max_points, threads=threads)
        if lengthscale is not None and not lengthscale > 0:
            raise ValueError(f"lengthscale must be > 0 decades, got {lengthscale}")
        self.lengthscale = lengthscale

    def _profile(self, x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray) -> Profile:
        center, scale = float(y.mean()), float(y.std())
        ys = (y - center) / scale
        # Hyperparameters from at most _GP_FIT_POINTS checkpoints (O(n³) per step), evenly
        # spaced by index so the sampling density is kept; the posterior uses all of them.
        sub = np.unique(np.linspace(0, len(x) - 1, min(len(x), _GP_FIT_POINTS)).round()
                        ).astype(int)
        amp2, ell, noise2 = _gp_hyperparameters(x[sub], ys[sub], rel_sd[sub], self.lengthscale)
        self.gp_ = {"amplitude": math.sqrt(amp2) * scale, "lengthscale": ell,
                    "noise_scale": math.sqrt(noise2) * scale}
        cov = amp2 * _matern(x[:, None] - x[None, :], ell)[0]
        chol = np.linalg.cholesky(cov + np.diag(noise2 * rel_sd**2 + 1e-10))
        alpha = cho_solve((chol, True), ys)
        g = _grid(x, self.grid_size)
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

        return Profile(g, center + scale * (k_g @ alpha), slope, change_sd, slope_change_sd,
                       slope_draws)


def _matern(d: np.ndarray, ell: float) -> tuple[np.ndarray, np.ndarray]:
    """Matérn-5/2 correlation at lag ``d`` and its derivative in the first argument."""
    s = math.sqrt(5.0) * np.abs(d) / ell
    e = np.exp(-s)
    return (1 + s + s * s / 3) * e, -(5 * d / (3 * ell**2)) * (1 + s) * e


def _matern_slope_cov(d: Any, ell: float) -> np.ndarray:
    """Covariance of the derivatives of a unit Matérn-5/2 process at lag ``d``."""
    s = math.sqrt(5.0) * np.abs(d) / ell
    return 5 / (3 * ell**2) * (1 + s - s * s) * np.exp(-s)


def _gp_hyperparameters(x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray,
                        lengthscale: float | None) -> tuple[float, float, float]:
    """(amplitude², lengthscale, noise scale²) maximising the GP marginal likelihood of ``y``
    (standardised), with analytic gradients."""
    dist = np.abs(x[:, None] - x[None, :])
    r2 = rel_sd**2
    eye = np.eye(len(x))
    span = float(x[-1] - x[0])

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


class _WeightedLinearCost(BaseCost):
    """ruptures cost: weighted least squares of λ̂ on a line in log-step, O(1) per segment.

    ``fit(signal)`` takes columns (λ̂, x, weight = 1 / noise variance); a segment's cost is its
    weighted residual sum of squares, i.e. -2 log-likelihood up to a constant in units of the
    noise, so a penalty of ``k · log n`` is BIC for ``k`` parameters per extra segment.
    """

    model = "weighted_linear"
    min_size = 3

    def fit(self, signal: np.ndarray) -> _WeightedLinearCost:
        self.signal = signal
        y, x, w = signal[:, 0], signal[:, 1] - signal[:, 1].mean(), signal[:, 2]
        self._sums = np.vstack([np.zeros(6), np.cumsum(
            np.column_stack([w, w * x, w * x * x, w * y, w * x * y, w * y * y]), axis=0)])
        return self

    def moments(self, start: int, end: int) -> tuple[float, ...]:
        """(Σw, weighted mean x, weighted mean y, centred Sxx, centred Sxy, centred Syy)."""
        sw, sx, sxx, sy, sxy, syy = self._sums[end] - self._sums[start]
        mx, my = sx / sw, sy / sw
        return sw, mx, my, sxx - sw * mx * mx, sxy - sw * mx * my, syy - sw * my * my

    def error(self, start: int, end: int) -> float:
        if end - start < self.min_size:
            raise NotEnoughPoints
        _, _, _, cxx, cxy, cyy = self.moments(start, end)
        return max(cyy - cxy * cxy / cxx, 0.0) if cxx > 0 else max(cyy, 0.0)


class ChangePoints(_Detector):
    """Milestones from ruptures change points of a piecewise-linear λ̂ in log-step.

    ruptures (``Pelt`` or ``Binseg``, ``jump=1``) splits the checkpoints into segments, each a
    straight line in ``x = log10(step + 1)`` fitted by least squares weighted with
    ``1 / (s · rel_sd)²`` (``s`` from :func:`estimate_noise`, ``rel_sd`` from ``llc_std``). The
    penalty is BIC in units of that noise: ``3 · log n`` per extra segment (intercept, slope and
    location). Segments are not stages: a sigmoid rise takes several lines. The lines, joined
    across breakpoints, are the fitted curve on which milestones are found.

    With ``joint=True`` the segments are those of λ̂ and the training loss together: each
    segment fits a line to both, each in units of its own noise (from :func:`estimate_noise`),
    and the penalty is ``5 · log n`` (two lines and a location). A change that shows in both
    curves is then located by both; milestones are still read off λ̂'s lines.

    Args:
        algorithm: "pelt" (exact optimum) or "binseg" (greedy, faster on long curves).
        pen: penalty per extra segment in units of the noise variance (default ``3 · log n``).
        min_size: fewest checkpoints per segment (at least 3: a line and one degree of freedom).
        joint: segment λ̂ and the loss together (the loss must be known at every checkpoint).
        min_stage_length, min_change, plateau_ratio, significance, min_stage_checkpoints,
            min_change_se, grid_size, max_points, threads: as in :class:`CriticalPoints`.
    """

    def __init__(self, *, algorithm: str = "pelt", pen: float | None = None, min_size: int = 3,
                 joint: bool = False, min_stage_length: float = 0.05, min_change: float = 0.005,
                 plateau_ratio: float = 0.5, significance: float = 3.0,
                 min_stage_checkpoints: int = 3, min_change_se: float = 1.0,
                 grid_size: int = 600, max_points: int | None = MAX_POINTS,
                 threads: int = 1) -> None:
        super().__init__(min_stage_length=min_stage_length, min_change=min_change,
                         plateau_ratio=plateau_ratio, significance=significance,
                         grid_size=grid_size, min_stage_checkpoints=min_stage_checkpoints,
                         min_change_se=min_change_se, max_points=max_points, threads=threads)
        if algorithm not in ("pelt", "binseg"):
            raise ValueError(f"algorithm must be 'pelt' or 'binseg', got {algorithm!r}")
        if pen is not None and not pen > 0:
            raise ValueError(f"pen must be > 0 (units of the noise variance), got {pen}")
        if min_size < 3:
            raise ValueError(f"min_size must be at least 3 checkpoints, got {min_size}")
        self.algorithm = algorithm
        self.pen = pen
        self.min_size = int(min_size)
        self.joint = bool(joint)

    def _profile(self, x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray) -> Profile:
        s = max(self.noise_, 1e-9 * float(np.ptp(y)))
        cost = _WeightedLinearCost().fit(np.column_stack([y, x, 1.0 / (s * rel_sd) ** 2]))
        search: BaseCost = cost
        params = 3
        if self.joint:
            search, params = _JointCost(cost, self._loss_cost(x)), 5
        algo = rpt.Pelt if self.algorithm == "pelt" else rpt.Binseg
        pen = self.pen if self.pen is not None else params * math.log(len(y))
        if len(y) < 2 * self.min_size:
            bkps = [len(y)]
        else:
            bkps = algo(custom_cost=search, min_size=self.min_size, jump=1).fit(
                search.signal).predict(pen=pen)
        self.segments_ = [(int(a), int(b)) for a, b in pairwise([0, *bkps])]
        return _piecewise_linear_profile(cost, x, self.segments_, _grid(x, self.grid_size))


    def _loss_cost(self, x: np.ndarray) -> _WeightedLinearCost:
        """The loss's weighted-linear cost, in units of its own noise."""
        loss = self.loss_
        if loss is None or len(loss) != len(x) or not np.all(np.isfinite(loss)):
            missing = len(x) if loss is None else int((~np.isfinite(loss)).sum())
            raise ValueError(f"joint=True segments λ̂ and the loss together, but the loss is "
                             f"unknown at {missing} of {len(x)} checkpoints; log a training "
                             "loss (train_loss) at the λ̂ steps, or drop joint")
        s = max(estimate_noise(x, loss), 1e-9 * float(np.ptp(loss)) or 1e-12)
        return _WeightedLinearCost().fit(np.column_stack([loss, x, np.full(len(x), s ** -2)]))


class _JointCost(BaseCost):
    """ruptures cost of two signals on the same checkpoints: the sum of their costs."""

    model = "joint_weighted_linear"
    min_size = 3

    def __init__(self, first: _WeightedLinearCost, second: _WeightedLinearCost) -> None:
        self.first, self.second = first, second
        self.signal = np.column_stack([first.signal, second.signal])

    def fit(self, signal: np.ndarray) -> _JointCost:
        return self  # both parts are fitted already (ruptures calls this with self.signal)

    def error(self, start: int, end: int) -> float:
        return self.first.error(start, end) + self.second.error(start, end)


def _piecewise_linear_profile(cost: _WeightedLinearCost, x: np.ndarray,
                              segments: list[tuple[int, int]], g: np.ndarray) -> Profile:
    """The fitted lines joined across breakpoints, as a linear map of independent parameters.

    Line ``j`` is ``m_j + b_j (x - x̄_j)`` with ``Var m_j = 1 / Σw`` and ``Var b_j = 1 / Sxx``,
    independent (weights are inverse noise variances). The curve is linear interpolation through
    each segment's fitted end values, so every grid value and slope is ``H @ θ`` and every
    standard error a weighted norm of a row of ``H``.
    """
    xc = x - x.mean()
    knots_x, knots_h = [], []
    variances = np.zeros(2 * len(segments))
    for j, (a, b) in enumerate(segments):
        sw, mx, _, cxx, _, _ = cost.moments(a, b)
        variances[2 * j: 2 * j + 2] = (1.0 / sw, 1.0 / cxx if cxx > 0 else 0.0)
        for i in (a, b - 1):
            h = np.zeros(2 * len(segments))
            h[2 * j], h[2 * j + 1] = 1.0, xc[i] - mx
            knots_x.append(x[i])
            knots_h.append(h)
    knots_x = np.asarray(knots_x)
    knots_h = np.asarray(knots_h)
    theta = np.zeros(2 * len(segments))
    for j, (a, b) in enumerate(segments):
        sw, mx, my, cxx, cxy, _ = cost.moments(a, b)
        theta[2 * j], theta[2 * j + 1] = my, (cxy / cxx if cxx > 0 else 0.0)
    iv = np.clip(np.searchsorted(knots_x, g, side="right") - 1, 0, len(knots_x) - 2)
    dx = knots_x[iv + 1] - knots_x[iv]
    t = ((g - knots_x[iv]) / dx)[:, None]
    h_val = (1 - t) * knots_h[iv] + t * knots_h[iv + 1]
    h_slope = (knots_h[iv + 1] - knots_h[iv]) / dx[:, None]

    def change_sd(i: int, j: int) -> float:
        return float(math.sqrt((h_val[j] - h_val[i]) ** 2 @ variances))

    def slope_change_sd(i: int, j: int) -> float:
        return float(math.sqrt((h_slope[j] - h_slope[i]) ** 2 @ variances))

    def slope_draws(idx: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
        thetas = theta + np.sqrt(variances) * rng.standard_normal((num, len(theta)))
        return thetas @ h_slope[idx].T

    return Profile(g, h_val @ theta, h_slope @ theta, change_sd, slope_change_sd, slope_draws)


def make_detector(method: str = "auto", **options: Any) -> _Detector:
    """A detector by name: "critical", "pelt", "binseg", or "auto" (the benchmark's best)."""
    name = DEFAULT_METHOD if method == "auto" else method
    if options.get("joint") and name not in ("pelt", "binseg"):
        raise ValueError("joint=True (--joint: λ̂ and loss together) works with method 'pelt' or "
                         f"'binseg'; {name!r} reads λ̂ alone")
    if name == "critical":
        return CriticalPoints(**options)
    if name in ("pelt", "binseg"):
        return ChangePoints(algorithm=name, **options)
    raise ValueError(f"unknown stage method {method!r}; choose one of auto, {', '.join(METHODS)}")


# -- curves in, stages out ----------------------------------------------------------------------
def _loss_column(metrics: pd.DataFrame) -> str | None:
    """The training loss column of a metrics table: train_loss, else loss, else any *loss*."""
    for name in ("train_loss", "loss"):
        if name in metrics.columns:
            return name
    return next((c for c in metrics.columns if "loss" in str(c)), None)


def _loss_at(steps: np.ndarray, metrics: pd.DataFrame) -> np.ndarray:
    """The training loss at λ̂ ``steps``: the median of the metrics rows within 0.01 decades of
    log-step (robust to minibatch noise), else linear interpolation in log-step; NaN outside
    the logged range or when no loss was logged."""
    col = _loss_column(metrics)
    out = np.full(len(steps), np.nan)
    if col is None:
        return out
    m = metrics[["step", col]].apply(pd.to_numeric, errors="coerce").dropna()
    if m.empty:
        return out
    m = m.sort_values("step")
    mx, my = log_step(m["step"].to_numpy()), m[col].to_numpy(dtype=float)
    for i, x in enumerate(log_step(steps)):
        lo, hi = np.searchsorted(mx, [x - _LOSS_WINDOW, x + _LOSS_WINDOW + 1e-12])
        if hi > lo:
            out[i] = np.median(my[lo:hi])
        elif mx[0] <= x <= mx[-1]:
            out[i] = np.interp(x, mx, my)
    return out


_NEEDS = "it needs columns step, llc_mean (optional llc_std, loss)"


def _curve_frame(curve: Any) -> tuple[pd.DataFrame, str]:
    """``step, llc_mean, llc_std, loss`` (the last two possibly all NaN) from a Run, a DataFrame,
    a run directory or a CSV file, and a name for it in messages."""
    source = "the curve"
    if isinstance(curve, (str, os.PathLike)):
        path = Path(curve)
        source = str(path)
        if path.is_dir():
            curve = load_run(path)
            if not (path / "llc.csv").exists():
                raise ValueError(f"run directory {source} has no llc.csv; estimate λ̂ first "
                                 f"(devinterp estimate {source})")
        elif path.is_file():
            try:
                curve = pd.read_csv(path)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                raise ValueError(f"{source} is not a readable CSV ({e}); {_NEEDS}") from e
        else:
            raise FileNotFoundError(f"{source} does not exist; pass a run directory or a CSV "
                                    f"with columns step, llc_mean")
    if isinstance(curve, Run):
        source = str(curve.path)
        frame = curve.llc.copy()
        frame["loss"] = _loss_at(frame["step"].to_numpy(), curve.metrics)
    elif isinstance(curve, pd.DataFrame):
        frame = curve.copy()
    else:
        raise TypeError(f"cannot read a λ̂ curve from {type(curve).__name__}; pass a Run, a "
                        "DataFrame, a run directory or a CSV path")
    missing = [c for c in ("step", "llc_mean") if c not in frame.columns]
    if missing:
        raise ValueError(f"{source} has no column {', '.join(missing)} (columns: "
                         f"{', '.join(map(str, frame.columns)) or 'none'}); {_NEEDS}")
    for col in ("llc_std", "loss", "num_chains"):
        if col not in frame.columns:
            frame[col] = np.nan
    frame = frame[["step", "llc_mean", "llc_std", "loss", "num_chains"]].apply(
        pd.to_numeric, errors="coerce")
    if frame["step"].isna().any() or (frame["step"] < 0).any():
        raise ValueError(f"{source} has missing, non-numeric or negative steps; steps must be "
                         "the trainer's global_step (0, 1, ...)")
    frame["step"] = frame["step"].astype(np.int64)
    frame = frame.sort_values("step", kind="stable")
    dup = frame["step"][frame["step"].duplicated()].unique()
    if len(dup):
        raise ValueError(f"{source} has duplicate steps ({', '.join(map(str, dup[:5]))}); keep "
                         "one λ̂ row per step")
    return frame.reset_index(drop=True), source


def _value(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def detect_stages(curve: Any, *, method: str = "auto", **options: Any) -> list[dict]:
    """Developmental stages of a λ̂ curve.

    Args:
        curve: a :class:`devinterp.store.Run`, a DataFrame with ``step, llc_mean`` (optional
            ``llc_std``, ``loss``), or a path to a run directory or such a CSV. For a run, the
            loss is ``run.metrics``' ``train_loss`` (else ``loss``, else the first ``*loss*``
            column) taken at the λ̂ steps.
        method: "critical" (:class:`CriticalPoints`), "pelt" or "binseg" (:class:`ChangePoints`),
            or "auto" = "critical". On ``tools/bench_stages.py`` (56 curves with planted
            milestones, 0.1-decade margin) it scores precision 0.97 and recall 0.96, at least 0.9
            in every family, against 0.90 / 0.86 for "pelt" and 0.72 / 0.72 for "binseg"; its
            ranges hold the planted milestone 89% of the time. A piecewise-linear fit places a
            milestone anywhere on its flattest segment and struggles with broad, curved
            transitions; the GP follows them, and it is the paper's own procedure with the
            hand-picking replaced by tests.
        options: keyword arguments of the detector (``min_stage_length``, ``plateau_ratio``,
            ``significance``, ...).

    Returns:
        One dict per stage, in order: ``stage`` (1-based), ``type`` ("A": λ̂ rises over it, "B":
        it falls; a flat curve counts as "A"), ``start_step``, ``end_step``, their plausible
        ranges ``start_step_low/high`` and ``end_step_low/high`` (equal to the step at the
        curve's ends), ``llc_start``, ``llc_end``, ``llc_change`` (fitted curve), ``loss_start``,
        ``loss_end``, ``loss_change`` (None when the loss is unknown). Rows with NaN λ̂ are
        skipped with a warning naming their steps.
    """
    return _detect(curve, make_detector(method, **options))


def _detect(curve: Any, detector: _Detector) -> list[dict]:
    """Stage dicts of ``curve`` found by ``detector`` (see :func:`detect_stages`)."""
    frame, source = _curve_frame(curve)
    bad = ~np.isfinite(frame["llc_mean"].to_numpy(dtype=float))
    if bad.any():
        steps = frame["step"][bad].tolist()
        shown = ", ".join(map(str, steps[:10])) + (", ..." if len(steps) > 10 else "")
        warnings.warn(f"skipped {len(steps)} checkpoint(s) with NaN λ̂ (steps {shown})",
                      stacklevel=3)
        frame = frame[~bad].reset_index(drop=True)
    if len(frame) < MIN_CHECKPOINTS:
        raise ValueError(f"{source} has {len(frame)} checkpoint(s) with a finite λ̂ "
                         f"({int(bad.sum())} NaN skipped); stage detection needs at least "
                         f"{MIN_CHECKPOINTS}: estimate λ̂ at more steps")
    chains = frame["num_chains"] if frame["num_chains"].notna().any() else None
    detector.fit(frame["step"], frame["llc_mean"], frame["llc_std"], chains, frame["loss"])
    return _stage_dicts(detector, frame, detector.predict())


def _stage_dicts(detector: _Detector, frame: pd.DataFrame, ends: list[int]) -> list[dict]:
    p = detector.profile_
    steps = frame["step"].to_numpy()
    loss = frame["loss"].to_numpy(dtype=float)
    first, last = int(steps[0]), int(steps[-1])
    starts = [first, *ends[:-1]]
    ranges = [(first, first), *detector.boundary_ranges_, (last, last)]

    def llc_at(step: int) -> float:
        return float(np.interp(log_step(step), p.x, p.llc))

    def loss_at(step: int) -> float | None:
        return _value(loss[int(np.searchsorted(steps, step))])

    out = []
    for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
        l0, l1 = llc_at(s), llc_at(e)
        f0, f1 = loss_at(s), loss_at(e)
        out.append({
            "stage": k + 1,
            "type": "A" if l1 >= l0 else "B",
            "start_step": s,
            "end_step": e,
            "start_step_low": int(ranges[k][0]),
            "start_step_high": int(ranges[k][1]),
            "end_step_low": int(ranges[k + 1][0]),
            "end_step_high": int(ranges[k + 1][1]),
            "llc_start": l0,
            "llc_end": l1,
            "llc_change": l1 - l0,
            "loss_start": f0,
            "loss_end": f1,
            "loss_change": None if f0 is None or f1 is None else f1 - f0,
        })
    return out


def stage_index(stages: list[dict], step: int) -> int:
    """The 1-based stage that ``step`` lies in (a milestone closes its stage): what the callback
    and ``devinterp estimate --wandb`` log as ``stage/index`` at each λ̂ step."""
    return 1 + sum(step > s["end_step"] for s in stages[:-1])


def detect_and_write(run_dir: str | os.PathLike) -> list[dict]:
    """Detect the stages of a run directory with the default method and write ``stages.json``;
    ``[]`` (nothing written) when there are too few λ̂ points. Skipped NaN rows are not warned
    about here: the table already says why they failed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stages = detect_stages(run_dir)
    except ValueError:
        return []
    write_stages(run_dir, stages, method=DEFAULT_METHOD,
                 params=make_detector(DEFAULT_METHOD).params)
    return stages


def write_stages(run_dir: str | os.PathLike, stages: list[dict], *, method: str,
                 params: dict[str, Any]) -> None:
    """Write ``stages.json`` = ``{"method", "params", "stages"}`` into a run directory."""
    RunStore(run_dir).write_json(STAGES_FILE, {"method": method, "params": dict(params),
                                               "stages": list(stages)})


def format_table(stages: list[dict]) -> str:
    """A plain-text stage table; "end range" is where the milestone could equally be (5%-95%)."""
    rows = [f"{'stage':>5} {'type':>4} {'start':>9} {'end':>9} {'end range':>21} "
            f"{'llc change':>11} {'loss change':>11}"]
    for s in stages:
        rng = f"{s['end_step_low']:,}-{s['end_step_high']:,}"
        dloss = "" if s.get("loss_change") is None else f"{s['loss_change']:+.4g}"
        rows.append(f"{s['stage']:>5} {s['type']:>4} {s['start_step']:>9,} {s['end_step']:>9,} "
                    f"{rng:>21} {s['llc_change']:>+11.4g} {dloss:>11}")
    return "\n".join(rows)
