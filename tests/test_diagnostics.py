"""devinterp.diagnostics pinned to arviz: split R-hat and the split-chain ESS of the mean.

The reference numbers were computed once with arviz 0.23.4 (numpy 2.4.6) as
``arviz.rhat(x, method="split")`` and ``arviz.ess(x, method="mean")`` on the arrays below;
arviz is not a dependency of this project.
"""

from __future__ import annotations

import numpy as np
import pytest

from devinterp.diagnostics import ess, split_rhat


def ar1(chains: int, draws: int, phi: float, offsets: float | list[float] = 0.0) -> np.ndarray:
    """AR(1) chains shaped (chain, draw) driven by a fixed, RNG-free uniform sequence (so the
    arrays do not depend on numpy's random streams), plus a per-chain offset."""
    k = np.arange(chains * draws, dtype=float)
    u = (np.sin(k * 12.9898 + 78.233) * 43758.5453) % 1.0
    e = ((u - 0.5) * np.sqrt(12.0)).reshape(chains, draws)
    x = np.zeros((chains, draws))
    for t in range(draws):
        x[:, t] = (phi * x[:, t - 1] if t else 0.0) + e[:, t]
    return x + np.asarray(offsets, dtype=float).reshape(-1, 1)


# name: (array, arviz split R-hat, arviz ESS method="mean")
CASES = {
    "correlated, offset chains": (ar1(4, 200, 0.6, [0, 0.1, -0.2, 0.3]),
                                  1.0128624523998562, 164.10086931034866),
    "strongly correlated": (ar1(4, 500, 0.95), 1.053372429455702, 68.55028317180846),
    "anticorrelated (ESS > draws)": (ar1(4, 200, -0.3), 0.9962349291792418, 1736.1041131416825),
    "odd draw count": (ar1(3, 201, 0.5, [0, 1.0, 0]), 1.0954112335040924, 32.981665028678776),
}


@pytest.mark.parametrize("name", list(CASES))
def test_split_rhat_and_ess_match_arviz(name: str) -> None:
    x, rhat_ref, ess_ref = CASES[name]
    assert split_rhat(x) == pytest.approx(rhat_ref, rel=1e-12)
    assert ess(x) == pytest.approx(ess_ref, rel=1e-10)


def test_degenerate_inputs() -> None:
    assert ess(np.ones((4, 100))) == 400.0  # constant draws: every one counts, as in arviz
    assert split_rhat(np.ones((4, 100))) == 1.0
    assert np.isnan(ess(np.zeros((2, 6)))) and np.isnan(split_rhat(np.zeros((1, 3))))
    with pytest.raises(ValueError, match=r"shaped \(chain, draw\)"):
        ess(np.zeros(10))
