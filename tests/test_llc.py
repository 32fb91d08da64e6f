"""The estimator against exact learning coefficients, and its contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp import (
    AllChainsDivergedError,
    LLCResult,
    NonFiniteLossError,
    estimate_llc,
    merge_results,
)
from devinterp.models import (
    SeparableSum,
    deep_linear_network,
    gaussian_nll,
    mean_output,
    teacher_data,
)
from devinterp.theory import deep_linear_network_llc

FAST = dict(num_chains=3, num_draws=30, num_burnin=10, step_size=1e-4, batch_size=64)


def small_regression(n: int = 512, seed: int = 0) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(n, 4)
    with torch.no_grad():
        y = model(x)
    return model, (x, y)


# -- accuracy against theory (default sampler settings: auto step, nβ = n/log n, γ default) ------
@pytest.mark.slow
def test_regular_linear_regression_matches_d_over_2():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x, y = teacher_data(model, 6, 10_000)
    r = estimate_llc(model, (x, y), gaussian_nll, seed=1)
    exact = (6 + 1) * 3 / 2
    assert abs(r.llc_mean - exact) < 0.1 * exact, (r.llc_mean, exact, r.diagnostics)
    assert r.settings["nbeta"] == pytest.approx(10_000 / math.log(10_000))


@pytest.mark.slow
@pytest.mark.parametrize("powers", [(1, 1, 2), (2, 2, 2), (1, 2)])
def test_separable_sum_matches_sum_of_inverse_powers(powers):
    """Default sampler settings; more chains and draws only for precision: nβ·K at a
    singular point is Gamma(λ)-distributed, so its relative spread is 1/√λ per draw."""
    model = SeparableSum(powers)
    data = (torch.zeros(10_000, 1), torch.zeros(10_000))
    r = estimate_llc(model, data, mean_output, num_chains=16, num_draws=1500, seed=0)
    assert abs(r.llc_mean - model.llc()) < 0.1 * model.llc(), (r.llc_mean, model.llc())


@pytest.mark.slow
@pytest.mark.parametrize("widths", [(3, 3, 6), (2, 4, 2, 4)])
def test_deep_linear_network_rank_sweep(widths):
    """Narrow hidden layers, so λ depends on the rank; each within 10 % and in order."""
    estimates = []
    for rank in range(min(widths) + 1):
        model = deep_linear_network(widths, rank, seed=rank)
        x, y = teacher_data(model, widths[0], 10_000, seed=rank)
        r = estimate_llc(model, (x, y), gaussian_nll, seed=rank)
        exact = deep_linear_network_llc(widths, rank)
        assert abs(r.llc_mean - exact) < 0.1 * exact, (widths, rank, r.llc_mean, exact)
        estimates.append(r.llc_mean)
    assert estimates == sorted(estimates)


@pytest.mark.slow
def test_weight_refined_llc_of_one_layer_of_a_deep_linear_network():
    """Weight-refined λ (Wang et al. 2024): with one layer of f = W2·W1·x held at w*, f is
    linear in the other, so the loss is quadratic in it and λ = rank(sampled layer ↦ f) / 2:
    rank(W2)·in / 2 when W1 moves, out·rank(W1) / 2 when W2 moves."""
    widths, rank = (3, 3, 6), 1
    model = deep_linear_network(widths, rank)
    x, y = teacher_data(model, widths[0], 10_000)
    first = estimate_llc(model, (x, y), gaussian_nll, weights=["0.weight"])
    second = estimate_llc(model, (x, y), gaussian_nll, weights=["1.*"])
    for r, exact, size in ((first, rank * widths[0] / 2, 9), (second, widths[2] * rank / 2, 18)):
        assert abs(r.llc_mean - exact) < 0.1 * exact, (r.llc_mean, exact, r.settings)
        assert r.settings["num_sampled_params"] == size
    # Both refined values are below the whole network's λ = 6 (the layers interact).
    assert first.llc_mean + second.llc_mean < deep_linear_network_llc(widths, rank)


def test_weights_selects_what_moves_and_all_of_them_is_the_plain_llc():
    model, data = small_regression()
    plain = estimate_llc(model, data, nn.MSELoss(), **FAST)
    every = estimate_llc(model, data, nn.MSELoss(), weights=["*"], **FAST)
    np.testing.assert_array_equal(plain.loss_trace, every.loss_trace)
    assert every.settings["weights"] == ["*"] and plain.settings["weights"] is None
    # A frozen parameter can be named; the others stay at w* (a smaller λ̂ than the whole).
    model[0].weight.requires_grad_(False)
    last = estimate_llc(model, data, nn.MSELoss(), weights=["0.weight"], **FAST)
    assert last.settings["num_sampled_params"] == 32
    assert model[0].weight.requires_grad is False
    with pytest.raises(ValueError, match=r"weights \['3.bias', 'head.\*'\] match no parameter.*"
                                         r"its parameters are: 0.weight, 0.bias, 2.weight"):
        estimate_llc(model, data, nn.MSELoss(), weights=["3.bias", "head.*", "0.*"], **FAST)
    with pytest.raises(TypeError, match="list of parameter names"):
        estimate_llc(model, data, nn.MSELoss(), weights="0.weight", **FAST)
    with pytest.raises(ValueError, match=r"weights=\[\] names no parameter"):
        estimate_llc(model, data, nn.MSELoss(), weights=[], **FAST)


# -- contracts --------------------------------------------------------------------------------
def test_result_shapes_and_fields():
    model, data = small_regression()
    r = estimate_llc(model, data, gaussian_nll, **FAST)
    assert isinstance(r, LLCResult)
    assert r.loss_trace.shape == (3, 30) and r.llc_trace.shape == (3, 30)
    assert r.llc_per_chain.shape == (3,)
    np.testing.assert_allclose(r.llc_trace, r.settings["nbeta"] * (r.loss_trace - r.baseline_trace))
    assert r.llc_mean == pytest.approx(r.llc_per_chain.mean())
    assert r.llc_std == pytest.approx(np.std(r.llc_per_chain, ddof=1))
    assert r.init_loss == pytest.approx(r.baseline_trace.mean())
    for key in ("mala_acceptance", "rhat", "ess", "frac_below_baseline", "num_diverged"):
        assert key in r.diagnostics
    d = r.to_dict()
    assert d["llc_mean"] == r.llc_mean and d["num_chains"] == 3 and d["step_size"] == 1e-4
    m = r.metrics()
    assert m["llc/mean"] == r.llc_mean and m["llc/std"] == r.llc_std and "llc/rhat" in m


def test_vectorized_equals_sequential_and_chunked():
    model, data = small_regression()
    a = estimate_llc(model, data, gaussian_nll, **FAST)
    b = estimate_llc(model, data, gaussian_nll, vectorize=False, **FAST)
    c = estimate_llc(model, data, gaussian_nll, chain_chunk_size=2, **FAST)
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.loss_trace, c.loss_trace, rtol=1e-5, atol=1e-7)


def test_same_seed_same_result_other_seed_differs():
    model, data = small_regression()
    a = estimate_llc(model, data, gaussian_nll, seed=3, **FAST)
    b = estimate_llc(model, data, gaussian_nll, seed=3, **FAST)
    c = estimate_llc(model, data, gaussian_nll, seed=4, **FAST)
    np.testing.assert_array_equal(a.loss_trace, b.loss_trace)
    assert not np.allclose(a.loss_trace, c.loss_trace)


def test_split_chains_merge_to_the_single_run():
    """DDP ranks run disjoint chain ranges with the same seed; merged, they are one run."""
    model, data = small_regression()
    whole = estimate_llc(model, data, gaussian_nll, **FAST)
    opts = {**FAST, "num_chains": 1}
    parts = [estimate_llc(model, data, gaussian_nll, first_chain=i, **opts) for i in range(3)]
    merged = merge_results(parts)
    np.testing.assert_allclose(merged.llc_per_chain, whole.llc_per_chain, rtol=1e-5)
    assert merged.llc_mean == pytest.approx(whole.llc_mean, rel=1e-5)
    assert merged.settings["num_chains"] == 3


def test_loss_scale_and_nbeta_trade_off():
    """A loss scaled by c with nβ scaled by 1/c is the same posterior: the same λ̂."""
    model, data = small_regression()
    opts = {k: v for k, v in FAST.items() if k != "step_size"}
    a = estimate_llc(model, data, gaussian_nll, nbeta=100.0, **opts)
    b = estimate_llc(model, data, lambda o, t: 7.0 * gaussian_nll(o, t), nbeta=100.0 / 7, **opts)
    assert b.settings["step_size"] == pytest.approx(a.settings["step_size"], rel=1e-3)
    assert b.llc_mean == pytest.approx(a.llc_mean, rel=1e-3)


def test_model_rng_and_grad_mode_untouched():
    model, data = small_regression()
    model.train()
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with torch.no_grad():
        estimate_llc(model, data, gaussian_nll, **FAST)
        assert not torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.training and model[0].training and not model[1].training
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_buffers_not_updated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x, y = torch.randn(256, 3), torch.randn(256, 1)
    model.train()
    mean_before = model[1].running_mean.clone()
    r = estimate_llc(model, (x, y), gaussian_nll, **FAST)
    assert torch.equal(model[1].running_mean, mean_before)
    assert math.isfinite(r.llc_mean)


def test_dataset_dataloader_and_batch_loss_inputs():
    model, (x, y) = small_regression()
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=64, shuffle=True)
    rng = torch.get_rng_state()
    for data in (ds, loader):
        r = estimate_llc(model, data, gaussian_nll, **FAST)
        assert math.isfinite(r.llc_mean)
    assert torch.equal(torch.get_rng_state(), rng)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"features": x[i], "labels": y[i]}

    def batch_loss(forward, batch):
        return gaussian_nll(forward(batch["features"]), batch["labels"])

    r = estimate_llc(model, Dicts(), batch_loss=batch_loss, **FAST)
    assert math.isfinite(r.llc_mean) and r.settings["num_samples"] == len(x)


def test_paired_baseline_survives_label_noise():
    """With heavy label noise, an unpaired baseline would move λ̂ by nβ × minibatch noise
    (hundreds here); the paired one keeps λ̂ near d/2 and the chains in agreement."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(20_000, 3)
    y = model(x).detach() + 3.0 * torch.randn(20_000, 1)
    with torch.no_grad():  # move w* to the least-squares optimum of the noisy data
        X = torch.cat([x, torch.ones(len(x), 1)], 1)
        sol = torch.linalg.lstsq(X, y).solution
        model.weight.copy_(sol[:3].T)
        model.bias.copy_(sol[3])
    r = estimate_llc(model, (x, y), lambda o, t: gaussian_nll(o, t) / 9.0, num_draws=200, seed=0)
    assert 1.0 < r.llc_mean < 3.0, r.llc_mean  # λ = 2; reads somewhat low (pitfall 9)
    assert r.llc_std < 1.0


# -- divergence ------------------------------------------------------------------------------
class Cliff(nn.Module):
    """Quadratic bowl whose loss is NaN beyond |w| > 1: the model itself makes NaN there."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        w = self.w.expand(x.shape[0])
        return torch.where(w.abs() > 1.0, torch.full_like(w, float("nan")), w**2)


class Quartic(nn.Module):
    """L(w) = w⁴: an explicit Langevin step with a large ε blows chains that wander far up."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.w.expand(x.shape[0]) ** 4


def test_some_chains_diverge_are_dropped_and_reported():
    data = (torch.zeros(100, 1), torch.zeros(100))
    r = estimate_llc(Quartic(), data, mean_output, num_chains=8, num_draws=50, num_burnin=0,
                     step_size=0.35, nbeta=1.0, localization=0.0, seed=0, sampler="sgld")
    nd = r.diagnostics["num_diverged"]
    assert 0 < nd < 8
    assert np.isnan(r.llc_per_chain).sum() == nd
    assert math.isfinite(r.llc_mean) and math.isfinite(r.llc_std)
    warning = next(w for w in r.warnings if "diverged" in w)
    first = r.diagnostics["divergences"][0]
    # The warning names the first diverged chain, where, and the step as the cause.
    assert f"chain {first['chain']} at draw {first['step']}" in warning
    assert "smaller step_size" in warning
    assert len(r.diagnostics["divergences"]) == nd


def test_model_nan_near_w_star_fails_fast_and_blames_the_model():
    """A loss that turns NaN straight from an ordinary value is the model's doing: the error
    says so, names the chain and the draw, and comes before the remaining draws run."""
    data = (torch.zeros(100, 1), torch.zeros(100))
    with pytest.raises(NonFiniteLossError, match=r"chain \d+, (draw|burn-in step) \d+") as e:
        estimate_llc(Cliff(), data, mean_output, num_chains=8, num_draws=100_000, num_burnin=0,
                     step_size=0.02, nbeta=1.0, localization=0.0, seed=0, sampler="sgld")
    assert "the model or the loss returns NaN" in str(e.value)
    assert "smaller step size does not fix" in str(e.value)


def test_all_chains_diverging_raises_with_advice():
    data = (torch.zeros(100, 1), torch.zeros(100))
    with pytest.raises(AllChainsDivergedError, match="smaller step_size"):
        estimate_llc(Quartic(), data, mean_output, num_chains=2, num_draws=50, num_burnin=0,
                     step_size=100.0, nbeta=1.0, localization=0.0, sampler="sgld")


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.functional.mse_loss, gaussian_nll])
def test_auto_step_size_works_with_builtin_losses(loss_fn):
    model, data = small_regression()
    opts = {k: v for k, v in FAST.items() if k != "step_size"}
    r = estimate_llc(model, data, loss_fn, **opts)
    assert r.settings["step_size"] > 0 and math.isfinite(r.llc_mean)
    assert r.diagnostics["hessian_top"] > 0


def test_auto_step_size_is_reported_and_user_value_wins():
    model, data = small_regression()
    opts = {k: v for k, v in FAST.items() if k != "step_size"}
    auto = estimate_llc(model, data, gaussian_nll, **opts)
    assert auto.settings["step_size_auto"] and auto.settings["step_size"] > 0
    assert auto.diagnostics["calibration_rounds"] >= 1
    fixed = estimate_llc(model, data, gaussian_nll, step_size=3e-5, **opts)
    assert fixed.settings["step_size"] == 3e-5 and not fixed.settings["step_size_auto"]


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_chains": 0}, "num_chains"),
        ({"num_draws": 0}, "num_draws"),
        ({"step_size": -1.0}, "step_size"),
        ({"nbeta": 0.0}, "nbeta"),
        ({"sampler": "hmc"}, "sampler"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    model, data = small_regression()
    with pytest.raises(ValueError, match=match):
        estimate_llc(model, data, gaussian_nll, **{**FAST, **kwargs})


def test_bad_inputs_have_clear_errors():
    model, (x, y) = small_regression()
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_llc(frozen, (x, y), gaussian_nll, **FAST)
    with pytest.raises(ValueError, match="empty"):
        estimate_llc(model, (x[:0], y[:0]), gaussian_nll, **FAST)
    with pytest.raises(ValueError, match="same first dimension"):
        estimate_llc(model, (x, y[:10]), gaussian_nll, **FAST)
    with pytest.raises(ValueError, match="scalar"):
        estimate_llc(model, (x, y), lambda o, t: (o - t) ** 2, **FAST)
    with pytest.raises(NonFiniteLossError, match="not finite"):
        estimate_llc(model, (x, y * float("inf")), gaussian_nll, **FAST)
    with pytest.raises(TypeError, match="data must be"):
        estimate_llc(model, [1, 2, 3], gaussian_nll, **FAST)
    with pytest.raises(TypeError, match="exactly one of"):
        estimate_llc(model, (x, y), **FAST)
    with pytest.raises(ValueError, match="empty"):
        estimate_llc(model, TensorDataset(x[:0], y[:0]), gaussian_nll, **FAST)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_drift_warning_says_which_way_and_what_to_do(direction):
    """A λ̂ trace still climbing means chains are moving away from w* (burn-in or localization);
    one still falling means burn-in only."""
    from devinterp.llc.result import summarize

    rng = np.random.default_rng(0)
    trace = 10 + direction * np.linspace(0, 5, 200)[None, :] + rng.normal(0, 0.5, (4, 200))
    r = summarize(trace, trace / 100, np.zeros(200), np.full(4, 0.9), np.zeros(4, bool),
                   {"step_size": 1e-3}, {})
    drift = [w for w in r.warnings if "drifts" in w]
    assert len(drift) == 1 and "increase num_burnin" in drift[0]
    assert ("localization" in drift[0]) == (direction > 0)
    assert ("drifts up" in drift[0]) == (direction > 0)


def test_sync_free_loop_gives_the_same_numbers(monkeypatch):
    """On accelerators the chain loop resets diverged chains without asking the device whether
    any diverged (no sync per step); forced on the CPU it gives the very same result."""
    import devinterp.llc.driver as driver

    data = (torch.zeros(100, 1), torch.zeros(100))
    kw = dict(num_chains=8, num_draws=50, num_burnin=0, step_size=0.35, nbeta=1.0,
              localization=0.0, seed=0, sampler="sgld")
    model, regression = small_regression()
    plain = estimate_llc(Quartic(), data, mean_output, **kw)
    plain_mlp = estimate_llc(model, regression, nn.MSELoss(), **FAST)
    monkeypatch.setattr(driver, "sync_free", lambda device: True)
    with pytest.raises(NonFiniteLossError, match="the model or the loss returns NaN"):
        estimate_llc(Cliff(), data, mean_output, **{**kw, "step_size": 0.02})
    free = estimate_llc(Quartic(), data, mean_output, **kw)
    free_mlp = estimate_llc(model, regression, nn.MSELoss(), **FAST)
    assert 0 < free.diagnostics["num_diverged"] == plain.diagnostics["num_diverged"]
    np.testing.assert_array_equal(free.loss_trace, plain.loss_trace)
    np.testing.assert_array_equal(free_mlp.llc_trace, plain_mlp.llc_trace)
