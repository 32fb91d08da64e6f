"""Exact learning coefficients for models where singular learning theory gives them.

Used as ground truth by the tests, the benchmarks and the examples. Every function returns the
learning coefficient λ; the ``*_multiplicity`` functions return m (the power of log log n).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

__all__ = [
    "deep_linear_network_llc",
    "deep_linear_network_multiplicity",
    "normal_crossing_llc",
    "normal_crossing_multiplicity",
    "reduced_rank_regression_llc",
    "reduced_rank_regression_multiplicity",
    "regular_llc",
    "separable_sum_llc",
    "tempered_posterior_llc",
]


def regular_llc(num_params: int) -> float:
    """λ = d/2 for a regular (non-degenerate) minimum in ``num_params`` dimensions."""
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    return num_params / 2


def separable_sum_llc(powers: Sequence[int]) -> float:
    """λ = Σ 1/(2 k_i) for K(w) = Σ_i w_i^(2 k_i) (multiplicity 1).

    Args:
        powers: the exponents k_i >= 1, one per coordinate.
    """
    if any(int(k) != k or k < 1 for k in powers):
        raise ValueError(f"powers must be integers >= 1, got {list(powers)}")
    return float(sum(Fraction(1, 2 * int(k)) for k in powers))


def normal_crossing_llc(powers: Sequence[int]) -> float:
    """λ = min_i 1/(2 k_i) over k_i > 0 for K(w) = Π_i w_i^(2 k_i)."""
    positive = [k for k in powers if k > 0]
    if not positive:
        raise ValueError("normal_crossing_llc needs at least one positive power")
    return 1 / (2 * max(positive))


def normal_crossing_multiplicity(powers: Sequence[int]) -> int:
    """m = the number of coordinates attaining the minimum of 1/(2 k_i)."""
    positive = [k for k in powers if k > 0]
    if not positive:
        raise ValueError("normal_crossing_multiplicity needs at least one positive power")
    return sum(1 for k in positive if k == max(positive))


def _check_rank(widths: Sequence[int], rank: int) -> None:
    if len(widths) < 2 or any(int(h) != h or h < 1 for h in widths):
        raise ValueError(f"widths must be >= 2 positive integers, got {list(widths)}")
    if not 0 <= rank <= min(widths):
        raise ValueError(f"rank must be in [0, min(widths)={min(widths)}], got {rank}")


def reduced_rank_regression_llc(
    input_dim: int, hidden_dim: int, output_dim: int, rank: int
) -> float:
    """λ of y = B·A·x with A: H×M, B: N×H and a teacher of rank r (Aoyagi & Watanabe 2005).

    Args:
        input_dim: M. hidden_dim: H. output_dim: N. rank: r, the true rank (<= min(M, H, N)).
    """
    return _rrr(input_dim, hidden_dim, output_dim, rank)[0]


def reduced_rank_regression_multiplicity(
    input_dim: int, hidden_dim: int, output_dim: int, rank: int
) -> int:
    """m of reduced-rank regression (2 in the odd case of the general formula, else 1)."""
    return _rrr(input_dim, hidden_dim, output_dim, rank)[1]


def _rrr(M: int, H: int, N: int, r: int) -> tuple[float, int]:
    _check_rank([M, H, N], r)
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2, 1
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2, 1
    if M + N < H + r:
        return M * N / 2, 1
    X = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + H + N + r) % 2 == 0:
        return X / 8, 1
    return (X + 1) / 8, 2


def _dln(widths: Sequence[int], r: int) -> tuple[float, int]:
    _check_rank(widths, r)
    deltas = sorted(h - r for h in widths)
    for ell in range(1, len(deltas)):
        inside, outside = deltas[: ell + 1], deltas[ell + 1 :]
        min_out = min(outside) if outside else math.inf
        S = sum(inside)
        if max(inside) < min_out and S >= ell * max(inside) and S < ell * min_out:
            a = S - (math.ceil(Fraction(S, ell)) - 1) * ell
            pairs = sum(inside[i] * inside[j] for i in range(len(inside)) for j in range(i))
            lam = (
                Fraction(-(r**2) + r * (widths[0] + widths[-1]), 2)
                + Fraction(a * (ell - a), 4 * ell)
                - Fraction(ell * (ell - 1), 4) * Fraction(S, ell) ** 2
                + Fraction(pairs, 2)
            )
            return float(lam), a * (ell - a) + 1
    raise AssertionError(f"no admissible subset for widths {list(widths)}, rank {r}")  # unreachable


def deep_linear_network_llc(widths: Sequence[int], rank: int) -> float:
    """λ of f(x) = W_M ⋯ W_1 x at its most singular true parameter (Aoyagi 2024).

    Args:
        widths: H_1 (input), hidden widths ..., H_{M+1} (output).
        rank: r, the rank of the teacher's product matrix.

    With one hidden layer this equals :func:`reduced_rank_regression_llc`; with no hidden layer
    (two widths) it is the regular value H_1·H_2/2.
    """
    return _dln(widths, rank)[0]


def deep_linear_network_multiplicity(widths: Sequence[int], rank: int) -> int:
    """m of the deep linear network (Aoyagi 2024): a(ℓ − a) + 1."""
    return _dln(widths, rank)[1]


def tempered_posterior_llc(
    loss: Callable[..., np.ndarray],
    dim: int,
    nbeta: float,
    localization: float,
    *,
    half_width: float = 8.0,
    points: int = 1601,
) -> float:
    """nβ·(E_w[L(w)] − L(0)) under p(w) ∝ exp(−nβ·L(w) − (γ/2)·‖w‖²), by quadrature.

    What a perfect sampler at w* = 0 returns at finite nβ and localization γ: the estimator's
    reference for models in one to three dimensions (λ itself is the nβ → ∞, γ → 0 limit,
    and at finite nβ points of multiplicity m > 1, or a strong γ, read lower than λ).

    Args:
        loss: ``loss(w_1, ..., w_dim)`` -> L on numpy arrays (broadcast over a grid).
        dim: the number of weights (1, 2 or 3).
        nbeta: nβ.
        localization: γ (the ``½`` convention: the localizer is (γ/2)‖w‖²).
        half_width: the grid covers [−half_width, half_width] per weight; with γ > 0 the
            localizer makes the mass beyond a few 1/√γ negligible.
        points: grid points per weight (the grid includes 0).
    """
    if dim not in (1, 2, 3):
        raise ValueError(f"tempered_posterior_llc integrates 1 to 3 weights, got dim={dim}")
    axis = np.linspace(-half_width, half_width, points if points % 2 else points + 1)
    grids = np.meshgrid(*([axis] * dim), indexing="ij", sparse=True)
    excess = np.asarray(loss(*grids), dtype=np.float64) - float(loss(*([0.0] * dim)))
    energy = nbeta * excess + 0.5 * localization * sum(g * g for g in grids)
    weight = np.exp(-(energy - energy.min()))
    return float(nbeta * (weight * excess).sum() / weight.sum())
