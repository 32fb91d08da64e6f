"""Susceptibilities against the exact restricted Gaussian posterior of a linear regression."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from devinterp import estimate_susceptibilities


def half_se(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((o - t) ** 2).sum(-1).mean()


class TwoPart(nn.Module):
    """f(x) = a·x[:, :1] + b·x[:, 1:]: two components of one linear regression."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1, 1, bias=False).double()
        self.b = nn.Linear(2, 1, bias=False).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :1]) + self.b(x[:, 1:])


def problem(n: int = 40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 12, 3, generator=g, dtype=torch.float64)
    x[n:] *= 2.0  # the second probe: off-distribution inputs
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    y += 0.7 * torch.randn(n + 12, 1, generator=g, dtype=torch.float64)
    w_star = torch.linalg.lstsq(x[:n], y[:n]).solution
    model = TwoPart()
    with torch.no_grad():
        model.a.weight.copy_(w_star[:1].T)
        model.b.weight.copy_(w_star[1:].T)
    return model, x, y, w_star


def exact_chi(x, y, w_star, idx, n, probes, nbeta, gamma, eps):
    """χ = Var(L) − Cov(L, ℓ_q) under the stationary law of plain SGLD restricted to the
    coordinates ``idx``: Gaussian, mean w*, covariance (Λ_CC(I − εΛ_CC/4))⁻¹ with Λ_CC the
    block of nβ·XᵀX/n + γI; Cov(ℓ_i, ℓ_j) = ½·C_ij² + m_i·m_j·C_ij, C = X_C Σ X_Cᵀ."""
    lam = (nbeta * x[:n].T @ x[:n] / n + gamma * torch.eye(3, dtype=x.dtype))[idx][:, idx]
    ev, u = torch.linalg.eigh(lam)
    sigma = u @ torch.diag(1 / (ev * (1 - eps * ev / 4))) @ u.T
    xc = x[:, idx]
    c = xc @ sigma @ xc.T
    m = (y - x @ w_star).squeeze(1)
    k = 0.5 * c**2 + m[:, None] * m[None, :] * c
    var_l = k[:n, :n].mean()
    return {name: float(var_l - k[:n][:, rows].mean()) for name, rows in probes.items()}


@pytest.mark.slow
def test_susceptibilities_match_the_exact_restricted_posterior():
    """Every χ within 4 standard errors of the exact value; for the shifted probe (the large
    responses) the error is small enough that a sign flip or a factor of 2 fails."""
    model, x, y, w_star = problem()
    n, nbeta, gamma, eps = 40, 2.0, 1.0, 0.05
    probes = {"seen": list(range(10)), "shifted": list(range(n, n + 12))}
    frame = estimate_susceptibilities(
        model, (x[:n], y[:n]), half_se, components={"a": ["a.*"], "b": ["b.*"]},
        probes={k: (x[v], y[v]) for k, v in probes.items()}, batch_size=n, sampler="sgld",
        step_size=eps, nbeta=nbeta, localization=gamma, num_chains=8, num_draws=1500,
        num_burnin=50, seed=1)
    assert list(frame.columns) == ["component", "probe", "susceptibility", "se"]
    assert len(frame) == 4 and set(frame.attrs["llc"]) == {"a", "b"}
    for comp, idx in (("a", [0]), ("b", [1, 2])):
        truth = exact_chi(x, y, w_star, idx, n, probes, nbeta, gamma, eps)
        for probe, value in truth.items():
            row = frame[(frame.component == comp) & (frame.probe == probe)].iloc[0]
            assert abs(row.susceptibility - value) < 4 * row.se, (comp, probe, row, value)
        shifted = frame[(frame.component == comp) & (frame.probe == "shifted")].iloc[0]
        assert shifted.se < abs(truth["shifted"]) / 4, (comp, shifted, truth)


def test_bad_components_and_probes_are_named():
    model, x, y, _ = problem()
    data = (x[:40], y[:40])
    with pytest.raises(ValueError, match="component 'c'.*match no parameter.*a.weight"):
        estimate_susceptibilities(model, data, half_se, components={"c": ["c.*"]},
                                  probes={"p": data})
    with pytest.raises(ValueError, match="probes must be a non-empty mapping"):
        estimate_susceptibilities(model, data, half_se, components=["a.*"], probes={})
    with pytest.raises(TypeError, match="sets weights= per component"):
        estimate_susceptibilities(model, data, half_se, components=["a.*"],
                                  probes={"p": data}, weights=["a.*"])


def test_the_training_data_as_probe_has_zero_susceptibility():
    """χ = −Cov(L, ℓ_q − L) vanishes exactly when the probe is the data L is the loss of
    (here all of it: fewer samples than num_train), and not for another probe."""
    model, x, y, _ = problem()
    data = (x[:40], y[:40])
    frame = estimate_susceptibilities(
        model, data, half_se, components=["a.*", "*"],
        probes={"train": data, "shifted": (x[40:], y[40:])}, num_chains=3, num_draws=60,
        step_size=1e-2, seed=0)
    assert list(frame.component) == ["a.*", "a.*", "*", "*"]
    train = frame[frame.probe == "train"]
    assert (train.susceptibility.abs() < 1e-12).all(), train
    shifted = frame[frame.probe == "shifted"]
    assert (shifted.susceptibility.abs() > 1e-4).all(), shifted


@pytest.mark.parametrize("grouping", ["joint", "grouped"])
def test_components_run_together_give_each_component_run_alone(grouping):
    """One computation over every component's chains (one probe recorder over all of them)
    gives, component by component, the numbers of a run of that component alone."""
    model, x, y, _ = problem()
    data = (x[:40], y[:40])
    probes = {"seen": (x[:10], y[:10]), "shifted": (x[40:], y[40:])}
    opts = dict(num_chains=3, num_draws=60, step_size=1e-2, seed=2)
    both = estimate_susceptibilities(model, data, half_se, components={"a": ["a.*"],
                                     "b": ["b.*"]}, probes=probes, grouping=grouping, **opts)
    assert both.attrs["llc"]["a"].settings["components_run"] == grouping
    for name in ("a", "b"):
        alone = estimate_susceptibilities(model, data, half_se,
                                          components={name: [f"{name}.*"]}, probes=probes,
                                          **opts)
        got = both[both.component == name].reset_index(drop=True)
        np.testing.assert_allclose(got.susceptibility, alone.susceptibility, rtol=1e-9)
        np.testing.assert_allclose(got.se, alone.se, rtol=1e-9)
        np.testing.assert_allclose(both.attrs["llc"][name].llc_per_chain,
                                   alone.attrs["llc"][name].llc_per_chain, rtol=1e-9)


class WithDeadWeights(TwoPart):
    """TwoPart and a parameter the output does not depend on."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = nn.Parameter(torch.zeros(2, dtype=torch.float64))


def test_a_component_no_loss_depends_on_has_zero_susceptibility():
    """Moving weights that neither L nor any probe loss depends on changes no loss: χ is 0
    (to float rounding) for that component, in the same computation as components that do respond
    (a chain moving another component's weights would break it)."""
    model, x, y, _ = problem()
    dead = WithDeadWeights()
    dead.load_state_dict(model.state_dict(), strict=False)
    frame = estimate_susceptibilities(
        dead, (x[:40], y[:40]), half_se, components=["dead", "a.*", "b.*"],
        probes={"shifted": (x[40:], y[40:])}, num_chains=3, num_draws=60, step_size=1e-2,
        seed=0, grouping="joint")
    assert frame.attrs["llc"]["dead"].settings["components_run"] == "joint"
    chi = dict(zip(frame.component, frame.susceptibility, strict=True))
    assert abs(chi["dead"]) < 1e-20, frame
    assert abs(chi["a.*"]) > 1e-4 and abs(chi["b.*"]) > 1e-4, frame
