"""Exact learning coefficients: published values and the cross-check of the two formulas."""

import itertools

import pytest

from devinterp import theory


@pytest.mark.parametrize(
    "widths, rank, lam",
    [((5, 3, 5), 0, 6.5), ((5, 4, 5), 0, 8.0), ((3, 3, 3), 0, 3.5), ((3, 3, 3), 1, 4.0),
     ((3, 3, 3), 2, 4.5), ((3, 3, 3), 3, 4.5), ((10, 20, 20, 10), 10, 50.0)],
)
def test_deep_linear_network_published_values(widths, rank, lam):
    assert theory.deep_linear_network_llc(widths, rank) == pytest.approx(lam)


def test_one_hidden_layer_equals_reduced_rank_regression():
    for M, H, N in itertools.product(range(1, 7), repeat=3):
        for r in range(min(M, H, N) + 1):
            assert theory.deep_linear_network_llc([M, H, N], r) == pytest.approx(
                theory.reduced_rank_regression_llc(M, H, N, r)), (M, H, N, r)
            assert theory.deep_linear_network_multiplicity([M, H, N], r) == (
                theory.reduced_rank_regression_multiplicity(M, H, N, r))


def test_no_hidden_layer_is_regular():
    assert theory.deep_linear_network_llc([4, 3], 2) == theory.regular_llc(12)


def test_wide_hidden_layers_ignore_rank():
    """Aoyagi 2024: hidden layers wide compared with in + out make λ rank-free (a trap for
    tests that vary the rank)."""
    values = {theory.deep_linear_network_llc([2, 10, 10, 2], r) for r in range(3)}
    assert values == {2.0}


def test_simple_models():
    assert theory.regular_llc(7) == 3.5
    assert theory.separable_sum_llc([1, 2, 3]) == pytest.approx(0.5 + 0.25 + 1 / 6)
    assert theory.normal_crossing_llc([1, 2, 2]) == 0.25
    assert theory.normal_crossing_multiplicity([1, 2, 2]) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        theory.deep_linear_network_llc([3, 2, 3], 3)
    with pytest.raises(ValueError, match="powers"):
        theory.separable_sum_llc([0])


def test_tempered_posterior_quadrature_matches_the_localized_quadratic():
    """For K = a·w²/2 under localization γ the exact value is nβ·a / (2(nβ·a + γ))."""
    import numpy as np

    for a, nbeta, gamma in [(1.0, 100.0, 1.0), (0.02, 50.0, 1.0), (3.0, 10.0, 0.0)]:
        exact = nbeta * a / (2 * (nbeta * a + gamma))
        got = theory.tempered_posterior_llc(lambda w, a=a: 0.5 * a * w**2, 1, nbeta, gamma)
        assert got == pytest.approx(exact, rel=1e-3), (a, nbeta, gamma)
        two = theory.tempered_posterior_llc(lambda u, v, a=a: 0.5 * a * (u**2 + v**2), 2, nbeta,
                                            gamma, points=801)
        assert two == pytest.approx(2 * exact, rel=1e-3)
    with pytest.raises(ValueError, match="1 to 3"):
        theory.tempered_posterior_llc(lambda *w: sum(w), 4, 1.0, 1.0)
    assert np.isfinite(theory.tempered_posterior_llc(lambda w: w**4, 1, 1e4, 1.0))
