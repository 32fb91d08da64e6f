"""Developmental stages from a λ̂ curve.

Hoogland et al. 2024 (arXiv:2402.02364) define milestones as critical points of the λ̂ curve
over log-time: the plateaus between a rise and the next change, where ``dλ̂/d log t`` vanishes.
A stage runs from one milestone to the next; it is type "A" when λ̂ rises over it and type "B"
when it falls. They smoothed λ̂ with a Gaussian process on ``log(step + 1)``, flagged
``|dλ̂/d log t| < 0.25`` as plateau candidates and chose the final boundaries by hand. This
package replaces the hand with tests.

Every detector works in ``x = log10(step + 1)`` (decades; step 0 is x = 0) in two moves:

1. fit a curve with its uncertainty to the checkpoints (a :class:`Profile` on a grid in x),
   weighting checkpoints by the per-checkpoint spread ``llc_std`` and estimating the overall
   noise scale from the data (:mod:`~devinterp.stages.points`); a curve of more than
   ``max_points`` (1,000) checkpoints is first averaged in bins of equal width in x, so memory
   and time stay bounded (100,000 rows: ``tools/bench_stages_memory.py``);
2. read the milestones off the fitted curve (:mod:`~devinterp.stages.milestones`): the turning
   points where λ̂ goes from rising to falling or back, simplified as in topological
   persistence, then, inside each monotone run, the local minima of ``|slope|``, kept only while
   every stage and milestone pass the :class:`StageRules` (:mod:`~devinterp.stages.rules`).

Detectors (ruptures' verbs: ``fit``, ``predict``, ``fit_predict``; keyword-only arguments), one
a module:

- :class:`CriticalPoints` ("critical", the default; :mod:`~devinterp.stages.critical`): the GP
  smoother of :mod:`~devinterp.stages.gp` (Matérn-5/2 kernel, heteroscedastic noise from
  ``llc_std``, hyperparameters by marginal likelihood), as in the paper.
- :class:`ChangePoints` ("pelt", "binseg"; :mod:`~devinterp.stages.changepoints`): ruptures
  (``jump=1``) on a piecewise-linear model in x (the costs of :mod:`~devinterp.stages.costs`),
  weighted by ``llc_std``, with a BIC penalty in units of the estimated noise variance.

Curves are read by :mod:`~devinterp.stages.curve`, stages found by
:mod:`~devinterp.stages.detect` (:func:`detect_stages`), and ``stages.json`` is written and read
only by :mod:`~devinterp.stages.io` (:func:`detect_and_write`, :func:`write_stages`).
"""

from __future__ import annotations

from devinterp.stages.base import Detector
from devinterp.stages.changepoints import ChangePoints
from devinterp.stages.critical import CriticalPoints
from devinterp.stages.detect import detect_stages, detect_with, stage_index
from devinterp.stages.io import conflicting_stages, detect_and_write, read_stages, write_stages
from devinterp.stages.methods import DEFAULT_METHOD, METHODS, make_detector
from devinterp.stages.points import (
    MAX_POINTS,
    MIN_CHECKPOINTS,
    estimate_noise,
    log_step,
    relative_sd,
)
from devinterp.stages.profile import Profile
from devinterp.stages.rules import StageRules
from devinterp.stages.table import format_table

__all__ = [
    "DEFAULT_METHOD",
    "MAX_POINTS",
    "METHODS",
    "MIN_CHECKPOINTS",
    "ChangePoints",
    "CriticalPoints",
    "Detector",
    "Profile",
    "StageRules",
    "conflicting_stages",
    "detect_and_write",
    "detect_stages",
    "detect_with",
    "estimate_noise",
    "format_table",
    "log_step",
    "make_detector",
    "read_stages",
    "relative_sd",
    "stage_index",
    "write_stages",
]
