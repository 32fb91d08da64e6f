"""Planted-truth λ̂ curves: test fixtures and benchmark data for the stage detector.

In the spirit of ruptures' ``pw_constant``: each generator returns ``(curve, true_boundaries,
true_types)`` where ``curve`` is a DataFrame with the columns a run's ``llc.csv`` has
(``step, llc_mean, llc_std``) plus ``loss``, ``true_boundaries`` are the steps of the planted
milestones (stage ends, the final step excluded) and ``true_types`` the stage types ("A": λ̂ rises
over the stage, "B": it falls).

The curve is a plateau joined to the next by logistic rises and falls in ``x = log10(step + 1)``
(Hoogland et al. 2024 saw λ̂ develop this way). A milestone is a critical point of the noiseless
curve over log-step (Hoogland et al. 2024, arXiv 2402.02364): the point of least ``|dλ/dx|`` between two consecutive
transitions, which is an exact extremum when a rise meets a fall. Checkpoints are the union of
log-spaced and linear-spaced steps, as in the papers, and the noise on ``llc_mean`` is
heteroscedastic: its standard deviation is ``llc_std / sqrt(num_chains)``, with ``llc_std``
growing with λ̂ as the spread of per-chain estimates does in practice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd

__all__ = [
    "Transition",
    "checkpoint_steps",
    "in_context_regression_transitions",
    "language_model_transitions",
    "llc_curve",
    "planted_llc_curve",
    "planted_milestones",
    "random_transitions",
]


@dataclass(frozen=True)
class Transition:
    """One planted change of λ̂: a logistic in log10(step + 1).

    Args:
        center_step: the step where the change is half done.
        change: total change of λ̂ (positive: a rise, type A; negative: a fall, type B).
        width: logistic scale in decades of log-step (10%-90% of the change takes 4.4 widths).
    """

    center_step: float
    change: float
    width: float = 0.1


def checkpoint_steps(max_step: int, *, num_log: int = 100, num_linear: int = 100) -> np.ndarray:
    """Steps 0..max_step: ``num_log`` log-spaced steps united with ``num_linear + 1`` evenly
    spaced ones (step 0 included), like the checkpoint schedules of the stage papers."""
    log_steps = np.round(np.geomspace(1, max_step, num_log))
    lin_steps = np.round(np.linspace(0, max_step, num_linear + 1))
    return np.unique(np.concatenate([log_steps, lin_steps])).astype(np.int64)


def llc_curve(steps: np.ndarray, transitions: Sequence[Transition], *, base: float = 0.0
              ) -> np.ndarray:
    """The noiseless λ̂ at ``steps``: ``base`` plus a logistic per transition in log10(step+1)."""
    x = np.log10(np.asarray(steps, dtype=float) + 1.0)
    out = np.full_like(x, base)
    for t in transitions:
        out += t.change / (1.0 + np.exp(-(x - np.log10(t.center_step + 1.0)) / t.width))
    return out


def _slope(x: np.ndarray, transitions: Sequence[Transition]) -> np.ndarray:
    """dλ/dx of :func:`llc_curve` at ``x = log10(step + 1)``."""
    out = np.zeros_like(x)
    for t in transitions:
        z = (x - np.log10(t.center_step + 1.0)) / t.width
        s = 1.0 / (1.0 + np.exp(-z))
        out += t.change * s * (1.0 - s) / t.width
    return out


def planted_milestones(transitions: Sequence[Transition], first_step: int, last_step: int
                       ) -> tuple[list[int], list[str]]:
    """True stage ends (final step excluded) and stage types of a planted curve.

    The milestone between two consecutive transitions is the argmin of ``|dλ/dx|`` between their
    centers (found on a grid of 1e-4 decades); a stage's type is the sign of λ's change over it.
    """
    ts = sorted(transitions, key=lambda t: t.center_step)
    centers = [np.log10(t.center_step + 1.0) for t in ts]
    bounds_x: list[float] = []
    for c0, c1 in pairwise(centers):
        xs = np.arange(c0, c1, 1e-4)
        bounds_x.append(float(xs[np.argmin(np.abs(_slope(xs, ts)))]))
    bounds = [int(round(10**b - 1.0)) for b in bounds_x]
    edges = [first_step, *bounds, last_step]
    levels = llc_curve(np.asarray(edges), ts)
    types = ["A" if b >= a else "B" for a, b in pairwise(levels)]
    return bounds, types


def planted_llc_curve(
    transitions: Sequence[Transition],
    *,
    steps: np.ndarray | None = None,
    max_step: int = 50_000,
    base: float = 1.0,
    noise: float = 0.003,
    num_chains: int = 8,
    seed: int = 0,
) -> tuple[pd.DataFrame, list[int], list[str]]:
    """A noisy λ̂ curve with planted milestones.

    Args:
        transitions: the planted rises and falls.
        steps: checkpoint steps (default :func:`checkpoint_steps` up to ``max_step``).
        max_step: last step when ``steps`` is not given.
        base: λ̂ before the first transition.
        noise: standard deviation of the noise on ``llc_mean`` as a fraction of the curve's range
            (at mid-range; it grows linearly with λ̂, from half to 1.5 times this value).
        num_chains: chains behind each estimate: ``llc_std`` is the per-chain spread, so
            ``llc_std / sqrt(num_chains)`` is the noise on ``llc_mean``; the reported ``llc_std``
            is itself an estimate from ``num_chains`` chains (chi-distributed).
        seed: noise seed.

    Returns:
        ``(curve, true_boundaries, true_types)``: DataFrame ``step, llc_mean, llc_std, loss,
        num_chains``;
        planted stage ends (steps, final step excluded); stage types "A"/"B".
    """
    steps = checkpoint_steps(max_step) if steps is None else np.asarray(steps, dtype=np.int64)
    rng = np.random.default_rng(seed)
    clean = llc_curve(steps, transitions, base=base)
    span = float(np.ptp(clean)) or 1.0
    sd = noise * span * (0.5 + (clean - clean.min()) / span)
    llc = clean + sd * rng.standard_normal(len(steps))
    chi = np.sqrt(rng.chisquare(num_chains - 1, len(steps)) / (num_chains - 1))
    llc_std = sd * np.sqrt(num_chains) * chi
    # A loss that falls where λ̂ rises, as the papers observed for type-A stages.
    loss = 2.0 - (clean - clean.min()) / span + 0.01 * rng.standard_normal(len(steps))
    curve = pd.DataFrame({"step": steps, "llc_mean": llc, "llc_std": llc_std, "loss": loss,
                          "num_chains": num_chains})
    bounds, types = planted_milestones(transitions, int(steps[0]), int(steps[-1]))
    return curve, bounds, types


def random_transitions(rng: np.random.Generator, *, max_step: int = 50_000,
                       max_transitions: int = 5, shallow_b: bool = False) -> list[Transition]:
    """Random transitions whose milestones are unambiguous at a 0.1-decade margin.

    One to ``max_transitions`` rises and falls (two rises for each fall), centred 0.35 to 1
    decade apart from step 10^1.5 on; each is a logistic of width (nearest gap) / κ with
    κ ~ U(8, 11), so the slope between two transitions dips to a few percent of their peaks at a
    clear point, as a GP-smoothed λ̂ curve does. With ``shallow_b`` a fall of 1% of the λ̂ range
    is put in the middle of the widest gap, between two rises and past step 1000, like the
    paper's language-model stage LM3 (where checkpoints are dense enough to see it); its
    neighbours are made sharper so that it is a true dip. Draws that break these rules are
    redrawn.
    """
    x_max = np.log10(max_step + 1.0)
    while True:
        k = int(rng.integers(1, max_transitions + 1))
        centers = 1.5 + rng.uniform(0.0, 1.0) + np.r_[0.0, np.cumsum(rng.uniform(0.35, 1.0, k - 1))]
        if centers[-1] > x_max - 0.3:
            continue
        changes = list(rng.uniform(2.0, 10.0, k) * rng.choice([1.0, 1.0, -1.0], k))
        centers = list(centers)
        dip = -1
        if shallow_b:
            if k < 2:
                continue
            dip = int(np.argmax(np.diff(centers))) + 1
            if min(changes[dip - 1], changes[dip]) < 0:
                continue
            span = float(np.sum(np.abs(changes)))
            centers.insert(dip, (centers[dip - 1] + centers[dip]) / 2)
            changes.insert(dip, -0.01 * span)
        gaps = np.diff(np.r_[-np.inf, centers, np.inf])
        nearest = np.minimum(gaps[:-1], gaps[1:])
        nearest[np.isinf(nearest)] = 1.0
        kappa = rng.uniform(8.0, 11.0, len(centers))
        if shallow_b:
            kappa[[dip - 1, dip + 1]] *= 2.0
        ts = [Transition(10**c - 1.0, float(d), float(g / kp))
              for c, d, g, kp in zip(centers, changes, nearest, kappa, strict=True)]
        if shallow_b and centers[dip] < 3.0:
            continue
        if _well_posed(ts, max_step):
            return ts


def _well_posed(ts: Sequence[Transition], max_step: int) -> bool:
    """Stages at least 0.1 decades long; milestones on clear plateaus (|dλ/dx| at most 15% of
    the peaks beside them; a rise next to a fall must give a true extremum)."""
    bounds, _ = planted_milestones(ts, 0, max_step)
    xb = np.log10(np.asarray([0.0, *bounds, max_step]) + 1.0)
    if np.any(np.diff(xb) < 0.1):
        return False
    centers = [np.log10(t.center_step + 1.0) for t in ts]
    for i, b in enumerate(np.log10(np.asarray(bounds, dtype=float) + 1.0)):
        peaks = [abs(_slope(np.array([c]), ts)[0]) for c in centers[i:i + 2]]
        if abs(_slope(np.array([b]), ts)[0]) > 0.15 * min(peaks):
            return False
        lo, hi = ts[i].change, ts[i + 1].change
        if lo * hi < 0 and _slope(np.array([b - 0.01, b + 0.01]), ts).prod() > 0:
            return False
    return True


def language_model_transitions() -> list[Transition]:
    """A λ̂ curve shaped like Hoogland et al.'s 2-layer attention-only language model.

    Stages end near 0.9k, 6.5k, 8.5k, 17k and 50k steps with types A A B A A and changes close
    to +26.4, +22.5, -1.57, +8.62, +1.77 (here +26.3, +22.4, -1.69, +7.9, +2.9: the B stage is
    a dip of 3% of the range).
    """
    return [
        Transition(300, 26.4, 0.12),
        Transition(2_600, 22.8, 0.10),
        Transition(7_400, -3.4, 0.022),
        Transition(10_000, 9.0, 0.04),
        Transition(30_000, 3.0, 0.06),
    ]


def in_context_regression_transitions() -> list[Transition]:
    """A λ̂ curve shaped like Hoogland et al.'s in-context linear regression transformer.

    Stages end near 1k, 40k, 126k, 320k and 500k steps with types A A B B A.
    """
    return [
        Transition(300, 40.0, 0.15),
        Transition(8_000, 60.0, 0.2),
        Transition(80_000, -25.0, 0.07),
        Transition(200_000, -20.0, 0.06),
        Transition(420_000, 8.0, 0.03),
    ]
