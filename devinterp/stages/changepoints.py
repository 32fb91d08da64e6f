"""The ``pelt`` and ``binseg`` detectors: ruptures change points of a piecewise-linear λ̂.

ruptures (well-kept, exact Pelt) does the search with ``jump=1``; :mod:`devinterp.stages.costs`
supplies the cost, and the fitted lines, joined across breakpoints, are the curve on which the
shared rules find milestones.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import numpy as np
import ruptures as rpt
from ruptures.base import BaseCost

from devinterp.stages.base import Detector
from devinterp.stages.costs import JointCost, WeightedLinearCost
from devinterp.stages.points import estimate_noise
from devinterp.stages.profile import Profile, grid

__all__ = ["ChangePoints"]


class ChangePoints(Detector):
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
        options: the keyword arguments of :class:`~devinterp.stages.base.Detector` (the
            :class:`~devinterp.stages.rules.StageRules` fields, ``grid_size``, ``max_points``,
            ``threads``).
    """

    def __init__(self, *, algorithm: str = "pelt", pen: float | None = None, min_size: int = 3,
                 joint: bool = False, **options: Any) -> None:
        super().__init__(**options)
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
        cost = WeightedLinearCost().fit(np.column_stack([y, x, 1.0 / (s * rel_sd) ** 2]))
        search: BaseCost = cost
        params = 3
        if self.joint:
            search, params = JointCost(cost, self._loss_cost(x)), 5
        algo = rpt.Pelt if self.algorithm == "pelt" else rpt.Binseg
        pen = self.pen if self.pen is not None else params * math.log(len(y))
        if len(y) < 2 * self.min_size:
            bkps = [len(y)]
        else:
            bkps = algo(custom_cost=search, min_size=self.min_size, jump=1).fit(
                search.signal).predict(pen=pen)
        self.segments_ = [(int(a), int(b)) for a, b in pairwise([0, *bkps])]
        return piecewise_linear_profile(cost, x, self.segments_, grid(x, self.grid_size))

    def _loss_cost(self, x: np.ndarray) -> WeightedLinearCost:
        """The loss's weighted-linear cost, in units of its own noise."""
        loss = self.loss_
        if loss is None or len(loss) != len(x) or not np.all(np.isfinite(loss)):
            missing = len(x) if loss is None else int((~np.isfinite(loss)).sum())
            raise ValueError(f"joint=True segments λ̂ and the loss together, but the loss is "
                             f"unknown at {missing} of {len(x)} checkpoints; log a training "
                             "loss (train_loss) at the λ̂ steps, or drop joint")
        s = max(estimate_noise(x, loss), 1e-9 * float(np.ptp(loss)) or 1e-12)
        return WeightedLinearCost().fit(np.column_stack([loss, x, np.full(len(x), s ** -2)]))


def piecewise_linear_profile(cost: WeightedLinearCost, x: np.ndarray,
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
    theta = np.zeros(2 * len(segments))
    for j, (a, b) in enumerate(segments):
        sw, mx, my, cxx, cxy, _ = cost.moments(a, b)
        variances[2 * j: 2 * j + 2] = (1.0 / sw, 1.0 / cxx if cxx > 0 else 0.0)
        theta[2 * j], theta[2 * j + 1] = my, (cxy / cxx if cxx > 0 else 0.0)
        for i in (a, b - 1):
            h = np.zeros(2 * len(segments))
            h[2 * j], h[2 * j + 1] = 1.0, xc[i] - mx
            knots_x.append(x[i])
            knots_h.append(h)
    knots_x = np.asarray(knots_x)
    knots_h = np.asarray(knots_h)
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
