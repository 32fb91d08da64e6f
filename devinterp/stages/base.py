"""What every stage detector shares: ruptures' verbs (``fit``, ``predict``, ``fit_predict``)
over a fitted :class:`~devinterp.stages.profile.Profile`, read by one set of
:class:`~devinterp.stages.rules.StageRules`.

A detector supplies only ``_profile``: the fitted curve with its uncertainty. Each milestone
comes with a range of steps (``end_step_low`` .. ``end_step_high``): the 5%-95% quantiles of
where the flattest point falls over draws of the slope from the fit's uncertainty.
"""

from __future__ import annotations

import abc
from dataclasses import asdict
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from devinterp.stages.milestones import milestone_range, milestones
from devinterp.stages.points import MAX_POINTS, estimate_noise, fit_points
from devinterp.stages.profile import Profile, flat_profile
from devinterp.stages.rules import StageRules

__all__ = ["Detector"]


class Detector(abc.ABC):
    """Shared ``fit`` / ``predict`` / ``fit_predict`` of the stage detectors.

    Args:
        min_stage_length, min_change, plateau_ratio, significance, min_stage_checkpoints,
            min_change_se: what a stage and a milestone must satisfy, the fields of
            :class:`~devinterp.stages.rules.StageRules` (``rules`` after construction).
        grid_size: points of the uniform grid in log-step (checkpoints are added).
        max_points: longer curves are first binned to this many points, equally wide in
            log-step (the first and last checkpoint kept as they are); None fits every
            checkpoint.
        threads: BLAS threads for the fit (1 is fastest at these sizes on a busy machine).
    """

    def __init__(self, *, min_stage_length: float = StageRules.min_stage_length,
                 min_change: float = StageRules.min_change,
                 plateau_ratio: float = StageRules.plateau_ratio,
                 significance: float = StageRules.significance,
                 min_stage_checkpoints: int = StageRules.min_stage_checkpoints,
                 min_change_se: float = StageRules.min_change_se, grid_size: int = 600,
                 max_points: int | None = MAX_POINTS, threads: int = 1) -> None:
        rules = StageRules(min_stage_length=min_stage_length, min_change=min_change,
                           plateau_ratio=plateau_ratio, significance=significance,
                           min_stage_checkpoints=min_stage_checkpoints,
                           min_change_se=min_change_se)
        if grid_size < 10:
            raise ValueError(f"grid_size must be at least 10, got {grid_size}")
        if max_points is not None and (not isinstance(max_points, int) or max_points < 10):
            raise ValueError(f"max_points must be an integer >= 10 or None (no binning), got "
                             f"{max_points!r}")
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.rules = rules
        self.grid_size = int(grid_size)
        self.max_points = max_points
        self.threads = threads

    @property
    def params(self) -> dict[str, Any]:
        """The constructor arguments that decide the stages (recorded in stages.json): all but
        ``threads``, which only decides how fast they are found."""
        own = {k: v for k, v in vars(self).items()
               if not k.endswith("_") and k not in ("rules", "threads")}
        return {**asdict(self.rules), **own}

    @abc.abstractmethod
    def _profile(self, x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray) -> Profile:
        """The fitted curve of checkpoints ``(x, y)`` with relative noise ``rel_sd``."""

    def fit(self, steps: Any, llc_mean: Any, llc_std: Any = None, num_chains: Any = None,
            loss: Any = None) -> Detector:
        """Fit the curve. ``steps`` increasing non-negative integers; ``llc_mean`` finite.
        ``llc_std`` and ``num_chains`` (a number or one per checkpoint) give each estimate's
        standard error ``llc_std / sqrt(num_chains)``; without ``num_chains`` the standard
        error is taken to be ``llc_std`` itself (the conservative bound). ``loss`` at the same
        steps is used by detectors that segment λ̂ and loss jointly. Curves of more than
        ``max_points`` checkpoints are binned in log-step first (``points_``: what was fitted).
        """
        pts = fit_points(steps, llc_mean, llc_std, num_chains, loss, self.max_points)
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
            self.profile_ = (flat_profile(pts.x, pts.y) if np.ptp(pts.y) == 0
                             else self._profile(pts.x, pts.y, pts.rel_sd))
        return self

    def predict(self) -> list[int]:
        """Stage ends in steps, ruptures-style: the milestones, then the last step.

        Sets ``boundaries_`` (milestone steps) and ``boundary_ranges_`` ((low, high) steps).
        """
        p = self.profile_
        keep = milestones(self.rules.on(p, self.x_, self.standard_errors_))
        a = np.abs(p.slope)
        edges = [0, *keep, len(p.x) - 1]
        rng = np.random.default_rng(0)
        bounds, ranges = [], []
        for k, b in enumerate(keep):
            lo = edges[k] + int(np.argmax(a[edges[k]:b + 1]))
            hi = b + int(np.argmax(a[b:edges[k + 2] + 1]))
            with threadpool_limits(self.threads, user_api="blas"):
                i, j = milestone_range(p, b, lo, hi, rng)
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
