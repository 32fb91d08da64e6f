"""ruptures costs of the change-point detectors: a weighted line in log-step, O(1) a segment.

ruptures does the search (``Pelt``, ``Binseg`` with ``custom_cost=``); these supply the cost of
a segment, as ruptures' own :mod:`ruptures.costs` do.
"""

from __future__ import annotations

import numpy as np
from ruptures.base import BaseCost
from ruptures.costs import NotEnoughPoints

__all__ = ["JointCost", "WeightedLinearCost"]


class WeightedLinearCost(BaseCost):
    """ruptures cost: weighted least squares of λ̂ on a line in log-step, O(1) per segment.

    ``fit(signal)`` takes columns (λ̂, x, weight = 1 / noise variance); a segment's cost is its
    weighted residual sum of squares, i.e. -2 log-likelihood up to a constant in units of the
    noise, so a penalty of ``k · log n`` is BIC for ``k`` parameters per extra segment.
    """

    model = "weighted_linear"
    min_size = 3

    def fit(self, signal: np.ndarray) -> WeightedLinearCost:
        """Precompute the cumulative weighted sums of ``signal`` (columns λ̂, x, weight)."""
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
        """The weighted residual sum of squares of the line through ``[start, end)``."""
        if end - start < self.min_size:
            raise NotEnoughPoints
        _, _, _, cxx, cxy, cyy = self.moments(start, end)
        return max(cyy - cxy * cxy / cxx, 0.0) if cxx > 0 else max(cyy, 0.0)


class JointCost(BaseCost):
    """ruptures cost of two signals on the same checkpoints: the sum of their costs."""

    model = "joint_weighted_linear"
    min_size = 3

    def __init__(self, first: WeightedLinearCost, second: WeightedLinearCost) -> None:
        self.first, self.second = first, second
        self.signal = np.column_stack([first.signal, second.signal])

    def fit(self, signal: np.ndarray) -> JointCost:
        """Nothing to do: both parts are fitted already (ruptures calls this with
        ``self.signal``)."""
        return self

    def error(self, start: int, end: int) -> float:
        """The sum of both parts' costs of ``[start, end)``."""
        return self.first.error(start, end) + self.second.error(start, end)
