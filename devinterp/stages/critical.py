"""The default detector, ``critical``: milestones at critical points of a GP-smoothed λ̂ curve.

This is the procedure of Hoogland et al. 2024 (arXiv:2402.02364): smooth λ̂ with a Gaussian
process on log-step and take the plateaus of the smoothed curve as milestones, with their final
hand-picking replaced by the tests of :class:`~devinterp.stages.rules.StageRules`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from devinterp.stages.base import Detector
from devinterp.stages.gp import gp_profile
from devinterp.stages.profile import Profile

__all__ = ["CriticalPoints"]


class CriticalPoints(Detector):
    """Milestones at critical points of a Gaussian-process-smoothed λ̂ curve over log-step.

    The GP (:mod:`devinterp.stages.gp`) has a Matérn-5/2 kernel on ``x = log10(step + 1)``
    (twice differentiable, and less prone than an RBF kernel to ringing next to sharp
    transitions; it scored better on the benchmark), a constant mean, and noise variance
    ``s² · rel_sd²`` with ``rel_sd`` from ``llc_std`` (heteroscedastic). Amplitude, lengthscale
    and ``s`` maximise the marginal likelihood; ``gp_`` holds them after ``fit``.

    Args:
        lengthscale: fix the GP lengthscale (decades) instead of fitting it.
        options: the keyword arguments of :class:`~devinterp.stages.base.Detector`: the rules a
            stage and a milestone must pass (``min_stage_length``, ``min_change``,
            ``plateau_ratio``, ``significance``, ``min_stage_checkpoints``, ``min_change_se``:
            :class:`~devinterp.stages.rules.StageRules`), ``grid_size``, ``max_points`` (the
            binning bounds memory and time: the GP's are quadratic and cubic in the points) and
            ``threads``.
    """

    def __init__(self, *, lengthscale: float | None = None, **options: Any) -> None:
        super().__init__(**options)
        if lengthscale is not None and not lengthscale > 0:
            raise ValueError(f"lengthscale must be > 0 decades, got {lengthscale}")
        self.lengthscale = lengthscale

    def _profile(self, x: np.ndarray, y: np.ndarray, rel_sd: np.ndarray) -> Profile:
        profile, self.gp_ = gp_profile(x, y, rel_sd, lengthscale=self.lengthscale,
                                       grid_size=self.grid_size)
        return profile
