"""A fitted λ̂ curve with its uncertainty: what every detector produces and the rules read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["Profile", "flat_profile", "grid"]


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


def grid(x: np.ndarray, grid_size: int) -> np.ndarray:
    """A uniform grid over the checkpoints' range, united with the checkpoints themselves."""
    return np.unique(np.concatenate([np.linspace(x[0], x[-1], grid_size), x]))


def flat_profile(x: np.ndarray, y: np.ndarray) -> Profile:
    """The profile of a constant curve: no slope, no uncertainty, hence one stage."""
    return Profile(x, np.full_like(x, y[0]), np.zeros_like(x), lambda i, j: 0.0,
                   lambda i, j: 0.0, lambda idx, num, rng: np.zeros((num, len(idx))))
