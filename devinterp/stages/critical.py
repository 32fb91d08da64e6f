"""The default detector, ``critical``: milestones at critical points of a GP-smoothed λ̂ curve.

This is the procedure of Hoogland et al. 2024 (arXiv:2402.02364): smooth λ̂ with a Gaussian
process on log-step and take the plateaus of the smoothed curve as milestones, with their final
hand-picking replaced by the tests of :class:`~devinterp.stages.rules.StageRules`.
"""

from __future__ import annotations

import numpy as np

from devinterp.stages.base import Detector
from devinterp.stages.gp import gp_profile
from devinterp.stages.points import MAX_POINTS
from devinterp.stages.profile import Profile
from devinterp.stages.rules import StageRules

__all__ = ["CriticalPoints"]


class CriticalPoints(Detector):
    """Milestones at critical points of a Gaussian-process-smoothed λ̂ curve over log-step.

    The GP (:mod:`devinterp.stages.gp`) has a Matérn-5/2 kernel on ``x = log10(step + 1)``
    (twice differentiable, and less prone than an RBF kernel to ringing next to sharp
    transitions; it scored better on the benchmark), a constant mean, and noise variance
    ``s² · rel_sd²`` with ``rel_sd`` from ``llc_std`` (heteroscedastic). Amplitude, lengthscale
    and ``s`` maximise the marginal likelihood; ``gp_`` holds them after ``fit``.

    Args:
        min_stage_length, min_change, plateau_ratio, significance, min_stage_checkpoints,
            min_change_se: the rules a stage and a milestone must pass
            (:class:`~devinterp.stages.rules.StageRules`).
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
        rules = StageRules(min_stage_length=min_stage_length, min_change=min_change,
                           plateau_ratio=plateau_ratio, significance=significance,
                           min_stage_checkpoints=min_stage_checkpoints,
                           min_change_se=min_change_se)
        super().__init__(rules=rules, grid_size=grid_size, max_points=max_points,
                         threads=threads)
        if lengthscale is not None and not lengthscale > 0:
            raise ValueError(f"lengthscale must be > 0 decades, got {lengthscale}")
        self.lengthscale = lengthscale

    def _profile(self, x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray) -> Profile:
        profile, self.gp_ = gp_profile(x, y, rel_sd, lengthscale=self.lengthscale,
                                       grid_size=self.grid_size)
        return profile
