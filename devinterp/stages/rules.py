"""What a stage and a milestone must satisfy: :class:`StageRules`, shared by every detector.

A stage must change λ̂ by ``significance`` standard errors of the fit, ``min_change_se``
standard errors of a single estimate (and ``min_change`` of the fitted range), and last
``min_stage_length`` decades of log-step (the first and last: ``min_stage_checkpoints``
checkpoints). A milestone must be a plateau: its ``|slope|`` at most ``plateau_ratio`` times the
steepest slope of each stage beside it, and significantly below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from devinterp.stages.profile import Profile

__all__ = ["DIP_Z", "StageRules"]

#: A milestone's |slope| must lie this many standard errors below the steepest slope beside it
#: (one-sided 95 %).
DIP_Z = 1.645


@dataclass(frozen=True, kw_only=True)
class StageRules:
    """The thresholds a stage and a milestone must pass (every detector takes them).

    Attributes:
        min_stage_length: shortest stage, in decades of log-step.
        min_change: smallest stage, as a fraction of the range of the fitted λ̂ (a guard against
            the many small wiggles that pass a significance test by chance; the shallow stage
            LM3 of Hoogland et al. 2024, arXiv:2402.02364, is 2.6% of the range).
        plateau_ratio: a milestone's |slope| must be at most this fraction of the steepest slope
            of the gentler stage beside it (the paper used an absolute 0.25 per log-unit; a
            ratio does not depend on the scale of λ̂, which depends on nβ).
        significance: a stage must change λ̂ by this many standard errors of the fit.
        min_stage_checkpoints: fewest checkpoints the first and the last stage span, their ends
            included. At the ends of the curve the smoothed slope is the least constrained: with
            2, one interval there can make a stage (e.g. a tiny last stage on a flat final
            plateau); 3 asks for a checkpoint inside it. (Interior stages are held by data on
            both sides.)
        min_change_se: a stage must also change λ̂ by this many standard errors of a single
            estimate (``llc_std / sqrt(num_chains)``, the median over the stage's checkpoints;
            ``llc_std`` itself when the number of chains is unknown, e.g. a CSV with the columns
            step, llc_mean, llc_std; not used without ``llc_std``). The fit's own standard error
            comes from how smooth the curve is, and curves estimated with the same seed at every
            checkpoint are smoother than their error bars, so without this a drift of a
            fraction of one error bar along a plateau can count as a stage.
    """

    min_stage_length: float = 0.05
    min_change: float = 0.005
    plateau_ratio: float = 0.5
    significance: float = 3.0
    min_stage_checkpoints: int = 3
    min_change_se: float = 1.0

    def __post_init__(self) -> None:
        if not self.min_stage_length >= 0:
            raise ValueError(f"min_stage_length must be >= 0 decades of log-step, got "
                             f"{self.min_stage_length}")
        if not 0 <= self.min_change < 1:
            raise ValueError(f"min_change must be in [0, 1) (a fraction of the λ̂ range), got "
                             f"{self.min_change}")
        if not 0 < self.plateau_ratio <= 1:
            raise ValueError(f"plateau_ratio must be in (0, 1], got {self.plateau_ratio}")
        if not self.significance > 0:
            raise ValueError(f"significance must be > 0 standard errors, got {self.significance}")
        if not self.min_change_se >= 0:
            raise ValueError(f"min_change_se must be >= 0 standard errors, got "
                             f"{self.min_change_se}")
        if not isinstance(self.min_stage_checkpoints, int) or self.min_stage_checkpoints < 2:
            raise ValueError(f"min_stage_checkpoints must be an integer >= 2 (a stage's two "
                             f"ends), got {self.min_stage_checkpoints!r}")
        for name in ("min_stage_length", "min_change", "plateau_ratio", "significance",
                     "min_change_se"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def on(self, p: Profile, checkpoints: np.ndarray,
           standard_errors: np.ndarray | None) -> RuleCheck:
        """These rules applied to a fitted curve whose checkpoints sit at ``checkpoints`` (x)."""
        return RuleCheck(self, p, checkpoints, standard_errors)


class RuleCheck:
    """:class:`StageRules` bound to one fitted curve: scores for stages and milestones."""

    def __init__(self, rules: StageRules, p: Profile, checkpoints: np.ndarray,
                 standard_errors: np.ndarray | None) -> None:
        self.rules, self.p, self.abs_slope = rules, p, np.abs(p.slope)
        self.standard_errors = standard_errors
        self.checkpoints = np.asarray(checkpoints, float)
        self.min_change = rules.min_change * float(np.ptp(p.llc))

    def evidence(self, e0: int, e1: int) -> float:
        """< 1 when stage [e0, e1] is too short (in decades, or, for the first and last stage, in
        checkpoints), or changes λ̂ by under ``significance`` standard errors of the fit, under
        ``min_change_se`` standard errors of one estimate, or under ``min_change`` of the fitted
        curve's range."""
        p, r = self.p, self.rules
        change = abs(p.llc[e1] - p.llc[e0])
        se = r.significance * p.change_sd(e0, e1)
        score = change / se if se > 0 else (math.inf if change > 0 else 0.0)
        if self.min_change > 0:
            score = min(score, change / self.min_change)
        if r.min_stage_length > 0:
            score = min(score, (p.x[e1] - p.x[e0]) / r.min_stage_length)
        lo, hi = np.searchsorted(self.checkpoints, [p.x[e0] - 1e-9, p.x[e1] + 1e-9])
        if r.min_stage_checkpoints > 2 and (e0 == 0 or e1 == len(p.x) - 1):
            score = min(score, (hi - lo - 1) / (r.min_stage_checkpoints - 1))
        if r.min_change_se > 0 and self.standard_errors is not None and hi > lo:
            floor = r.min_change_se * float(np.median(self.standard_errors[lo:hi]))
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
                        a[b] / (self.rules.plateau_ratio * a[q]) if a[q] > 0 else math.inf,
                        a[b] / rate if rate > 0 else math.inf,
                        se / dip if dip > 0 else math.inf)
        return worst
