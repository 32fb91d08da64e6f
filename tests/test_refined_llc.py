"""``estimate_refined_llc``: many components' weight-refined λ̂ in one computation, against
``estimate_llc(weights=...)`` (same draws) and against exact learning coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from devinterp import estimate_llc, estimate_refined_llc
from devinterp.models import (
    SeparableSum,
    deep_linear_network,
    gaussian_nll,
    mean_output,
    teacher_data,
)
from devinterp.theory import deep_linear_network_llc

QUICK = dict(num_chains=3, num_draws=30, num_burnin=15, seed=0)


def small_regression(n: int = 600) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(n, 4)
    with torch.no_grad():
        y = model(x)
    return model, (x, y)


WHOLE = {"last": ["2.*"], "first_weight": ["0.weight"], "biases": ["*.bias"]}


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
@pytest.mark.parametrize("step_size", [1e-3, "auto"])
def test_each_component_gives_the_numbers_of_estimate_llc_with_its_weights(sampler, step_size):
    """Same seed, same draws: exactly with a fixed ε; with ε = "auto" each component is
    calibrated on its own weights (the ε estimate_llc picks) and agrees to float rounding.
    Chunks that cut across components change nothing."""
    model, data = small_regression()
    opts = dict(QUICK, sampler=sampler, step_size=step_size)
    got = estimate_refined_llc(model, data, gaussian_nll, components=WHOLE,
                               chain_chunk_size=4, **opts)
    assert list(got) == list(WHOLE)
    tol = 0.0 if step_size != "auto" else 1e-5
    for name, weights in WHOLE.items():
        ref = estimate_llc(model, data, gaussian_nll, weights=weights, **opts)
        r = got[name]
        assert r.settings["step_size"] == ref.settings["step_size"]
        assert r.settings["num_sampled_params"] == ref.settings["num_sampled_params"]
        assert r.settings["component"] == name
        np.testing.assert_allclose(r.llc_trace, ref.llc_trace, rtol=tol, atol=tol)
        np.testing.assert_allclose(r.baseline_trace, ref.baseline_trace, rtol=0, atol=0)
        assert r.llc_mean == pytest.approx(ref.llc_mean, rel=tol, abs=tol)


def test_the_sequential_path_gives_the_vectorized_numbers():
    model, data = small_regression()
    a = estimate_refined_llc(model, data, gaussian_nll, components=WHOLE, step_size=1e-3,
                             **QUICK)
    b = estimate_refined_llc(model, data, gaussian_nll, components=WHOLE, step_size=1e-3,
                             vectorize=False, **QUICK)
    for name in WHOLE:
        np.testing.assert_allclose(a[name].llc_trace, b[name].llc_trace, rtol=1e-5, atol=1e-6)


def test_the_component_holding_every_parameter_is_the_plain_llc():
    model, data = small_regression()
    plain = estimate_llc(model, data, gaussian_nll, step_size=1e-3, **QUICK)
    every = {k: torch.ones(p.shape, dtype=torch.bool) for k, p in model.named_parameters()}
    got = estimate_refined_llc(model, data, gaussian_nll, step_size=1e-3, **QUICK,
                               components={"names": ["*"], "masks": every})
    for r in got.values():
        np.testing.assert_array_equal(r.llc_trace, plain.llc_trace)
        assert r.settings["num_sampled_params"] == plain.settings["num_sampled_params"]


class Mixed(nn.Module):
    """K(w) = w[1]² + v²: w[0] and u are weights the loss does not depend on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.v = nn.Parameter(torch.zeros(()))
        self.u = nn.Parameter(torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        return (self.w[1] ** 2 + self.v ** 2).expand(x.shape[0])


def test_a_component_the_loss_does_not_depend_on_reads_zero_and_masks_do_not_leak():
    """Entry 0 of w shares its tensor with entry 1, which the loss does depend on: a mask that
    let entry 1 move would read ≈ 1/2, not 0."""
    model = Mixed()
    data = (torch.zeros(2000, 1), torch.zeros(2000))
    only_0 = torch.tensor([True, False, False])
    got = estimate_refined_llc(model, data, mean_output, num_chains=4, num_draws=200,
                               components={"w0": {"w": only_0}, "u": ["u"],
                                           "w1": {"w": torch.tensor([False, True, False])},
                                           "v": ["v"]})
    assert got["w0"].llc_mean == 0.0 and got["u"].llc_mean == 0.0
    assert got["w0"].settings["num_sampled_params"] == 1
    assert got["w0"].settings["weights"] == ["w"]
    # The quadratic directions read about 1/2 each (regular: d/2).
    for name in ("w1", "v"):
        assert 0.3 < got[name].llc_mean < 0.7, (name, got[name].llc_mean)


@pytest.mark.slow
def test_single_entries_of_one_tensor_read_one_over_twice_their_power():
    """K(w) = Σ_i w_i^(2 k_i): the entry with power k alone has λ = 1/(2k) (nβ·K is
    Gamma(λ)-distributed, so small λ need many draws for precision)."""
    powers = (1, 2, 3)
    model = SeparableSum(powers)
    data = (torch.zeros(10_000, 1), torch.zeros(10_000))
    comps = {f"w{i}": {"w": torch.arange(3) == i} for i in range(3)}
    got = estimate_refined_llc(model, data, mean_output, components=comps, num_chains=16,
                               num_draws=3000, seed=0)
    for i, k in enumerate(powers):
        exact = 1 / (2 * k)
        r = got[f"w{i}"]
        assert abs(r.llc_mean - exact) < 0.15 * exact, (k, r.llc_mean, exact)


def block_diagonal(a: nn.Sequential, b: nn.Sequential) -> nn.Sequential:
    """The deep linear network whose layers are blockdiag(a's, b's): two independent networks
    on the two halves of the input, as long as the off-diagonal blocks stay 0."""
    out = []
    for la, lb in zip(a, b, strict=True):
        (ra, ca), (rb, cb) = la.weight.shape, lb.weight.shape
        layer = nn.Linear(ca + cb, ra + rb, bias=False)
        with torch.no_grad():
            layer.weight.zero_()
            layer.weight[:ra, :ca] = la.weight
            layer.weight[ra:, ca:] = lb.weight
        out.append(layer)
    return nn.Sequential(*out)


def block_masks(model: nn.Sequential, a: nn.Sequential, first: bool) -> dict[str, Tensor]:
    masks = {}
    for i, (layer, la) in enumerate(zip(model, a, strict=True)):
        ra, ca = la.weight.shape
        m = torch.zeros(layer.weight.shape, dtype=torch.bool)
        if first:
            m[:ra, :ca] = True
        else:
            m[ra:, ca:] = True
        masks[f"{i}.weight"] = m
    return masks


@pytest.mark.slow
def test_blocks_of_a_block_diagonal_deep_linear_network_read_their_aoyagi_lambda():
    widths = (2, 4, 2, 4)
    a, b = deep_linear_network(widths, 1, seed=0), deep_linear_network(widths, 2, seed=1)
    model = block_diagonal(a, b)
    x, y = teacher_data(model, 2 * widths[0], 10_000)
    got = estimate_refined_llc(model, (x, y), gaussian_nll, seed=0,
                               components={"a": block_masks(model, a, True),
                                           "b": block_masks(model, a, False)})
    for name, rank in (("a", 1), ("b", 2)):
        exact = deep_linear_network_llc(widths, rank)
        assert abs(got[name].llc_mean - exact) < 0.1 * exact, (name, got[name].llc_mean, exact)


def test_bad_components_are_named_with_the_fix():
    model, data = small_regression()
    call = dict(step_size=1e-3, **QUICK)
    with pytest.raises(TypeError, match="components="):
        estimate_refined_llc(model, data, gaussian_nll, components={"a": ["0.*"]},
                             weights=["0.*"], **call)
    with pytest.raises(ValueError, match=r"component 'a': weights \['9.\*'\] match no"):
        estimate_refined_llc(model, data, gaussian_nll, components={"a": ["9.*"]}, **call)
    with pytest.raises(TypeError, match=r"'b'.*bool tensor of shape \(8, 4\).*mask.bool\(\)"):
        estimate_refined_llc(model, data, gaussian_nll, **call,
                             components={"b": {"0.weight": torch.ones(8, 4)}})
    with pytest.raises(ValueError, match=r"'b'.*shape \(4, 8\), the parameter has \(8, 4\)"):
        estimate_refined_llc(model, data, gaussian_nll, **call,
                             components={"b": {"0.weight": torch.ones(4, 8, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="'c' moves no entry"):
        estimate_refined_llc(model, data, gaussian_nll, **call,
                             components={"c": {"0.bias": torch.zeros(8, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="'d': 'head.weight' is not a parameter"):
        estimate_refined_llc(model, data, gaussian_nll, **call,
                             components={"d": {"head.weight": torch.ones(1, dtype=torch.bool)}})
    with pytest.raises(TypeError, match="non-empty mapping"):
        estimate_refined_llc(model, data, gaussian_nll, components={}, **call)
    with pytest.raises(ValueError, match="shorthands are"):
        estimate_refined_llc(model, data, gaussian_nll, components="neurons", **call)
    with pytest.raises(ValueError, match="found no attention heads in Sequential"):
        estimate_refined_llc(model, data, gaussian_nll, components="heads", **call)


@pytest.mark.parametrize("how", ["joint", "grouped"])
def test_joint_and_grouped_computations_give_the_same_draws(how):
    """Every chain in one computation, or one per set of parameters: the draws are
    estimate_llc's either way; components over the same tensor share a group."""
    from devinterp.components import resolve_components
    from devinterp.llc.refined import _Component, parameter_groups

    model, data = small_regression()
    comps = {**WHOLE, "half": {"0.weight": torch.arange(32).view(8, 4) % 2 == 0},
             "other_half": {"0.weight": torch.arange(32).view(8, 4) % 2 == 1}}
    got = estimate_refined_llc(model, data, gaussian_nll, components=comps, step_size=1e-3,
                               grouping=how, **QUICK)
    for name, weights in WHOLE.items():
        ref = estimate_llc(model, data, gaussian_nll, weights=weights, step_size=1e-3, **QUICK)
        np.testing.assert_allclose(got[name].llc_trace, ref.llc_trace, rtol=1e-5, atol=1e-6)
        assert got[name].settings["components_run"] == how
    # The two halves of one weight move different entries: different draws.
    assert not np.allclose(got["half"].llc_trace, got["other_half"].llc_trace)
    prob = type("P", (), {"device": torch.device("cpu")})()
    members = [_Component(n, m, prob) for n, m in resolve_components(model, comps).items()]
    assert [[c.name for c in m] for _, m in parameter_groups(members)] == [
        ["last"], ["first_weight", "half", "other_half"], ["biases"]]
    with pytest.raises(ValueError, match="grouping must be"):
        estimate_refined_llc(model, data, gaussian_nll, components=comps, grouping="all")
