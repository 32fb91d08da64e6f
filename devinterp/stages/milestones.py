"""Milestones read off a fitted curve: critical points kept only while :class:`StageRules` hold.

Hoogland et al. 2024 (arXiv:2402.02364) define milestones as critical points of the λ̂ curve
over log-time: the plateaus between a rise and the next change, where ``dλ̂/d log t`` vanishes.
They chose the final boundaries by hand; here the rules of :mod:`devinterp.stages.rules` do.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from devinterp.stages.profile import Profile
from devinterp.stages.rules import RuleCheck

__all__ = ["RANGE_DRAWS", "milestone_range", "milestones"]

#: Draws of the slope from the fit's uncertainty behind each milestone's 5 %-95 % range.
RANGE_DRAWS = 200


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


def _persistent_extrema(check: RuleCheck) -> list[int]:
    """The extrema left after simplifying as in topological persistence: the stage with the
    least evidence goes first, and an interior one takes both its ends with it (a peak and a
    trough cancel), so small wiggles vanish while a shallow but significant dip stays."""
    last = len(check.p.x) - 1
    ext = _extrema(check.p.slope)
    while ext:
        j, ev = check.weakest([0, *ext, last])
        if ev >= 1.0:
            break
        if j == 0:
            del ext[0]
        elif j == len(ext):
            del ext[-1]
        else:
            del ext[j - 1:j + 1]
    return ext


def _plateaus(check: RuleCheck, e0: int, e1: int) -> list[int]:
    """The milestones inside the monotone run [e0, e1]: local minima of ``|slope|``; the
    weakest stage loses its steeper interior end until all stages pass, then the least
    plateau-like milestone goes until all pass."""
    keep = _candidates(check.p.slope, e0, e1)
    while keep:
        edges = [e0, *keep, e1]
        j, ev = check.weakest(edges)
        if ev < 1.0:
            ends = [k for k in (j - 1, j) if 0 <= k < len(keep)]
            del keep[max(ends, key=lambda k: check.abs_slope[keep[k]])]
            continue
        bad = [check.badness(b, edges[k], edges[k + 2]) for k, b in enumerate(keep)]
        k = int(np.argmax(bad))
        if bad[k] <= 1.0:
            break
        del keep[k]
    return keep


def milestones(check: RuleCheck) -> list[int]:
    """Grid indices of the milestones of the fitted curve ``check.p``: the persistent extrema
    (where λ̂ turns from rising to falling or back) and the plateaus inside each monotone run
    between them."""
    last = len(check.p.x) - 1
    out: list[int] = []
    for e0, e1 in pairwise([0, *_persistent_extrema(check), last]):
        out += _plateaus(check, e0, e1)
        if e1 != last:
            out.append(e1)
    return out


def milestone_range(p: Profile, b: int, lo: int, hi: int, rng: np.random.Generator
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
