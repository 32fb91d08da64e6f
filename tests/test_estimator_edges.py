"""Estimator edge cases: scalar weights, tied weights, non-finite curvature, vmap fallback,
mis-paired baseline caches, half precision, threads, precision statements, bad values.

Each test is written against what a user would see and fails on the code before the fix.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from devinterp import estimate_llc
from devinterp.llc import NonFiniteCurvatureError
from devinterp.llc.data import TensorBatches
from devinterp.models import gaussian_nll, mean_output
from devinterp.theory import regular_llc, tempered_posterior_llc

QUICK = dict(num_chains=4, num_draws=60, num_burnin=20, seed=0)


def half_se(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((o - t) ** 2).sum(-1).mean()


class NormalCrossing(nn.Module):
    """f(x) = x · Π w_i^{p_i} at w* = 0 (the peer library's known-truth model); ``scalar``
    stores each weight as its own 0-d parameter."""

    def __init__(self, powers: list[float], scalar: bool = False) -> None:
        super().__init__()
        self.scalar = scalar
        if scalar:
            self.ws = nn.ParameterList([nn.Parameter(torch.tensor(0.0)) for _ in powers])
        else:
            self.w = nn.Parameter(torch.zeros(len(powers)))
        self.register_buffer("p", torch.tensor(powers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.stack(list(self.ws)) if self.scalar else self.w
        return x * torch.prod(w**self.p)


def crossing_data(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    return x, torch.zeros(n, 1)


# -- scalar (0-d) parameters -----------------------------------------------------------------
def test_scalar_parameters_give_the_numbers_of_one_element_vectors():
    data = crossing_data()
    kw = dict(QUICK, step_size=1e-3)
    scalar = estimate_llc(NormalCrossing([1.0, 1.0], scalar=True), data, half_se, **kw)
    vector = estimate_llc(NormalCrossing([1.0, 1.0]), data, half_se, **kw)
    assert scalar.settings["num_sampled_params"] == 2
    np.testing.assert_allclose(scalar.llc_trace, vector.llc_trace, rtol=1e-5, atol=1e-9)
    refined = estimate_llc(NormalCrossing([1.0, 1.0], scalar=True), data, half_se,
                           weights=["ws.0"], **kw)
    assert refined.settings["num_sampled_params"] == 1


# -- tied weights ----------------------------------------------------------------------------
class TiedRegression(nn.Module):
    """A linear regression whose used layer shares its weight with a layer registered
    earlier: ``named_parameters()`` lists the shared tensor once, under the unused name."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(6, 3, bias=False)
        self.used = nn.Linear(6, 3, bias=False)
        self.used.weight = self.unused.weight
        self.bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x) + self.bias


def test_tied_weight_moves_at_every_use_and_reads_d_over_2():
    """Exact λ = d/2 with d = 6·3 + 3 = 21 (noiseless teacher, so w* is an exact minimum).
    Substituting only the first-registered name read λ̂ = 0.00 for the 18 tied weights."""
    torch.manual_seed(0)
    model = TiedRegression()
    x = torch.randn(10_000, 6)
    with torch.no_grad():
        y = model(x)
    r = estimate_llc(model, (x, y), half_se, seed=0)
    assert r.settings["num_sampled_params"] == 21  # the shared tensor counts once
    exact = regular_llc(21)
    assert abs(r.llc_mean - exact) < 0.1 * exact, (r.llc_mean, exact)


def test_weights_may_name_either_alias_of_a_tied_tensor():
    model = TiedRegression()
    x = torch.randn(512, 6)
    with torch.no_grad():
        y = model(x)
    kw = dict(QUICK, step_size=1e-4)
    by_use = estimate_llc(model, (x, y), half_se, weights=["used.weight"], **kw)
    by_owner = estimate_llc(model, (x, y), half_se, weights=["unused.weight"], **kw)
    assert by_use.settings["num_sampled_params"] == by_owner.settings["num_sampled_params"] == 18
    np.testing.assert_array_equal(by_use.llc_trace, by_owner.llc_trace)
    assert by_use.llc_mean > 0


# -- curvature for the automatic step --------------------------------------------------------
def test_nan_second_derivative_falls_back_to_finite_differences():
    """w ** 0 at w = 0: torch's second derivative is NaN while the gradient is finite; the
    step used to become NaN and every chain 'diverged'."""
    r = estimate_llc(NormalCrossing([0.0, 1.0]), crossing_data(), half_se, **QUICK)
    assert math.isfinite(r.settings["step_size"]) and r.settings["step_size"] > 0
    assert r.diagnostics["curvature_method"] == "finite_difference"
    assert r.diagnostics["num_diverged"] == 0 and math.isfinite(r.llc_mean)


class Attention(nn.Module):
    """One attention layer through F.scaled_dot_product_attention, whose fused CPU kernel
    has no double backward."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unsqueeze(1) for t in self.qkv(x).chunk(3, -1))
        return self.out(F.scaled_dot_product_attention(q, k, v).squeeze(1)).mean(1)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_auto_step_works_with_fused_attention():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(512, 5, 8)
    with torch.no_grad():
        y = model(x)
    r = estimate_llc(model, (x, y), half_se, num_chains=2, num_draws=40, num_burnin=20)
    assert r.diagnostics["curvature_method"] == "finite_difference"
    assert 0 < r.settings["step_size"] < math.inf and math.isfinite(r.llc_mean)


class SqrtAtZero(nn.Module):
    """sqrt(w) at w = 0: the loss is finite but its gradient is infinite there."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.w)


def test_curvature_that_is_nowhere_finite_is_one_clear_error():
    with pytest.raises(NonFiniteCurvatureError, match="curvature at w\\* is not finite"):
        estimate_llc(SqrtAtZero(), crossing_data(100), half_se, **QUICK)


# -- divergence by cause is in test_llc.py (Cliff / Quartic) ---------------------------------
# -- vmap fallback ---------------------------------------------------------------------------
class Branchy(nn.Module):
    """Data-dependent Python control flow: vmap cannot batch it, one chain at a time can."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if h.sum() > 1e9:
            h = h * 0
        return h


def test_unbatchable_model_falls_back_to_sequential_chains_with_the_same_numbers():
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(512, 3)
    with torch.no_grad():
        y = model(x)
    kw = dict(QUICK, step_size=1e-4)
    with pytest.warns(UserWarning, match="vectorize=False"):
        r = estimate_llc(model, (x, y), half_se, **kw)
    seq = estimate_llc(model, (x, y), half_se, vectorize=False, **kw)
    assert r.settings["vectorize"] is False
    assert any("one at a time" in w for w in r.warnings)
    np.testing.assert_array_equal(r.llc_trace, seq.llc_trace)


class ThroughNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.from_numpy(self.w.detach().numpy().copy())


def test_a_loss_that_cannot_be_differentiated_at_all_names_both_attempts():
    x = torch.randn(64, 3)
    with pytest.raises(RuntimeError, match="neither vectorized over chains .* nor one chain"):
        estimate_llc(ThroughNumpy(), (x, torch.zeros(64)),
                     lambda o, t: ((o - t) ** 2).mean(), **QUICK)


# -- the per-sample baseline cache ------------------------------------------------------------
def sorted_classification(n: int = 2000, classes: int = 3, seed: int = 0, train: bool = False):
    """Rows sorted by class, as torchvision's ImageFolder yields them; ``train``: the model
    fitted to them with the class-weighted loss (so w* is near a minimum)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, classes))
    x = torch.randn(n, 5)
    with torch.no_grad():
        y = torch.distributions.Categorical(logits=3 * model(x)).sample()
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    if train:
        opt = torch.optim.LBFGS(model.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = weighted_ce(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return model, x, y


def weighted_ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(o, t, weight=torch.tensor([1.0, 5.0, 0.2]))


def padded_token_ce(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens of the batch (padding label -100)."""
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1), ignore_index=-100)


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


def padded_sequences(n: int = 600, length: int = 8):
    """Sequences sorted by length (as length-bucketed loaders yield them), padded with -100."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (n, length), generator=g)
    lengths = torch.sort(torch.randint(1, length + 1, (n,), generator=g)).values
    y = torch.roll(x, -1, dims=1)
    y[torch.arange(length)[None, :] >= lengths[:, None]] = -100
    return x, y


@pytest.mark.parametrize("case", ["weighted", "padded"])
def test_baseline_cache_is_refused_for_losses_that_are_not_per_sample_means(case):
    if case == "weighted":
        model, x, y = sorted_classification()
        loss = weighted_ce
    else:
        model, (x, y) = TokenModel(), padded_sequences()
        loss = padded_token_ce
    source = TensorBatches(x, y, 256, torch.device("cpu"))
    with torch.no_grad():
        assert source.per_sample_losses(model, loss) is None
        # ... while the plain mean cross entropy is cached.
        if case == "weighted":
            assert source.per_sample_losses(model, F.cross_entropy) is not None


@pytest.mark.slow
def test_class_sorted_rows_give_the_lambda_of_shuffled_rows():
    """The mis-paired cache made λ̂ depend on the row order (25.3 vs 36.3 reported)."""
    model, x, y = sorted_classification(train=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    kw = dict(num_chains=8, num_draws=200, seed=0)
    ordered = estimate_llc(model, (x, y), weighted_ce, **kw)
    shuffled = estimate_llc(model, (x[perm], y[perm]), weighted_ce, **kw)
    se = math.hypot(ordered.diagnostics["llc_se"], shuffled.diagnostics["llc_se"])
    assert shuffled.llc_mean > 0
    assert abs(ordered.llc_mean - shuffled.llc_mean) < 4 * se + 0.05 * shuffled.llc_mean, (
        ordered.llc_mean, shuffled.llc_mean)


# -- half precision --------------------------------------------------------------------------
def test_bf16_model_is_sampled_in_float32_and_reads_the_float32_lambda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).to(torch.bfloat16)
    reference = copy.deepcopy(model).float()  # the same (bf16-rounded) weights in float32
    x = torch.randn(4000, 8)
    with torch.no_grad():
        y = reference(x)
    kw = dict(num_chains=4, num_draws=200, seed=0)
    r32 = estimate_llc(reference, (x, y), half_se, **kw)
    # bf16 weights with float32 data, as under Trainer(precision="bf16-true").
    r16 = estimate_llc(model, (x, y), half_se, **kw)
    assert r16.settings["model_dtype"] == "bfloat16"
    assert r16.settings["sample_dtype"] == "float32"
    assert next(model.parameters()).dtype == torch.bfloat16  # the model is left as it was
    assert abs(r16.llc_mean - r32.llc_mean) < 0.1 * r32.llc_mean, (r16.llc_mean, r32.llc_mean)


# -- truth-free guards -----------------------------------------------------------------------
def test_a_loss_that_ignores_the_sampled_weights_is_flagged():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    frozen = copy.deepcopy(model)
    x = torch.randn(512, 4)
    with torch.no_grad():
        y = model(x)
    r = estimate_llc(model, (x, y), batch_loss=lambda forward, batch: half_se(
        frozen(batch[0]), batch[1]), step_size=1e-3, **QUICK)
    assert r.llc_mean == 0.0
    assert any("barely move" in w for w in r.warnings), r.warnings


def test_mala_acceptance_below_target_is_flagged_as_step_bias():
    from test_llc import Quartic

    data = (torch.zeros(100, 1), torch.zeros(100))
    r = estimate_llc(Quartic(), data, mean_output, num_chains=8, num_draws=50, num_burnin=0,
                     step_size=0.3, nbeta=1.0, localization=0.0, seed=0, sampler="sgld")
    assert 0.5 <= r.diagnostics["mala_acceptance"] < 0.9
    assert any("biases λ̂" in w for w in r.warnings), r.warnings


# -- precision statement ---------------------------------------------------------------------
def test_every_result_states_its_precision_and_warns_when_it_is_poor():
    r = estimate_llc(NormalCrossing([1.0, 2.0]), crossing_data(), half_se, num_chains=4,
                     num_draws=40, seed=0)
    d = r.diagnostics
    assert d["llc_se"] == pytest.approx(r.llc_std / math.sqrt(4))
    assert d["llc_rel_se"] == pytest.approx(d["llc_se"] / r.llc_mean)
    assert d["llc_rel_se"] > 0.1  # 4 x 40 draws cannot pin a λ of 1/4
    warning = next(w for w in r.warnings if "standard error" in w)
    needed = math.ceil((d["llc_rel_se"] / 0.1) ** 2 * 40)
    assert f"about {needed} draws per chain (now 40)" in warning


def test_a_precise_estimate_has_no_precision_warning():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x = torch.randn(4000, 6)
    with torch.no_grad():
        y = model(x)
    r = estimate_llc(model, (x, y), half_se, num_chains=4, num_draws=200, seed=0)
    assert r.diagnostics["llc_rel_se"] < 0.1
    assert not any("standard error" in w for w in r.warnings)


# -- w* is never a draw; bad values ----------------------------------------------------------
def test_with_no_burn_in_the_first_draw_is_not_w_star():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(256, 4)
    with torch.no_grad():
        y = model(x)
    r = estimate_llc(model, (x, y), half_se, num_chains=2, num_draws=5, num_burnin=0,
                     step_size=1e-3, batch_size=256)
    # Full-batch minibatches: a draw at w* would have exactly the baseline loss.
    assert (r.llc_trace[:, 0] != 0).all()


@pytest.mark.parametrize("bad", [
    {"num_draws": 1}, {"num_draws": 0}, {"step_size": math.inf}, {"step_size": math.nan},
    {"localization": math.inf}, {"nbeta": math.inf}, {"num_samples": 0},
    {"num_threads": 0}, {"num_chains": True},
])
def test_bad_values_are_refused_up_front_with_the_name(bad):
    model = nn.Linear(2, 1)
    data = (torch.randn(16, 2), torch.randn(16, 1))
    with pytest.raises(ValueError, match=next(iter(bad))):
        estimate_llc(model, data, gaussian_nll, **bad)


# -- threads ---------------------------------------------------------------------------------
def test_small_models_run_on_one_thread_and_the_setting_is_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    model = nn.Linear(4, 1)
    data = (torch.randn(64, 4), torch.randn(64, 1))
    r = estimate_llc(model, data, half_se, num_chains=2, num_draws=4, step_size=1e-4)
    assert r.settings["num_threads"] == 1
    assert torch.get_num_threads() == before
    two = estimate_llc(model, data, half_se, num_chains=2, num_draws=4, step_size=1e-4,
                       num_threads=2)
    assert two.settings["num_threads"] == 2 and torch.get_num_threads() == before
    np.testing.assert_allclose(two.llc_trace, r.llc_trace, rtol=1e-5, atol=1e-9)


# -- normal crossings against the exact tempered posterior -----------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("powers", [[0, 1], [1, 1], [1, 2], [3, 3]])
def test_normal_crossings_match_the_exact_tempered_posterior(powers):
    """The peer library's cases. The reference is nβ·E[L − L(w*)] under the localized tempered
    posterior by quadrature: at γ = 1 it sits well below λ (the localizer holds chains in the
    flat valleys), and λ̂ must match it, not λ. With 32 × 2000 draws and the automatic step
    divided by 4 (these valleys stiffen without bound away from w*, where the automatic step
    chosen near w* reads up to ~15 % high) the estimate is within 3 standard errors."""
    x, y = crossing_data()
    n = len(x)
    nbeta = n / math.log(n)
    m2 = float((x**2).mean())
    exact = tempered_posterior_llc(
        lambda a, b: 0.5 * m2 * np.abs(a) ** (2 * powers[0]) * np.abs(b) ** (2 * powers[1]),
        2, nbeta, 1.0)
    model = NormalCrossing([float(p) for p in powers])
    # The automatic step of the full run: calibration depends on the chain length, not on
    # the number of chains, so a 2-chain run of the same length picks the same ε.
    probe = estimate_llc(model, (x, y), half_se, num_chains=2, num_draws=2000, seed=0)
    r = estimate_llc(model, (x, y), half_se, num_chains=32, num_draws=2000, seed=0,
                     step_size=probe.settings["step_size"] / 4)
    assert r.diagnostics["num_diverged"] == 0
    assert abs(r.llc_mean - exact) < 3 * r.diagnostics["llc_se"], (r.llc_mean, exact)


# -- RNNs on CUDA ----------------------------------------------------------------------------
def test_rnn_models_sample_with_cudnn_off_on_cuda_only():
    """cuDNN has no RNN backward in eval mode; the problem turns it off for RNN models on
    CUDA (run for real on a GPU by tests/test_cuda.py) and leaves every other case alone."""
    from devinterp.llc.problem import Problem

    rnn, mlp = nn.GRU(3, 4), nn.Linear(3, 4)
    for model, device, off in ((rnn, "cuda", True), (rnn, "cpu", False), (mlp, "cuda", False)):
        prob = Problem(model, {}, {}, None, None, None, torch.device(device))
        with prob._rnn_backward_allowed():
            assert torch.backends.cudnn.enabled is (not off)
    assert torch.backends.cudnn.enabled


def test_a_thread_count_the_user_chose_for_the_process_is_kept(monkeypatch):
    """``--threads N`` (every command) sets OMP_NUM_THREADS: the small-model policy yields."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    r = estimate_llc(nn.Linear(4, 1), (torch.randn(64, 4), torch.randn(64, 1)), half_se,
                     num_chains=2, num_draws=4, step_size=1e-4)
    assert r.settings["num_threads"] == before


# -- memory: chunks ----------------------------------------------------------------------------
def chunk_sizes(monkeypatch) -> list[int]:
    import devinterp.llc.driver as driver

    sizes, real = [], driver.run_chains

    def spy(prob, chains, **kw):
        sizes.append(len(chains))
        return real(prob, chains, **kw)

    monkeypatch.setattr(driver, "run_chains", spy)
    return sizes


def test_sequential_chains_hold_one_chain_at_a_time_with_the_same_numbers(monkeypatch):
    model = nn.Linear(4, 2)
    data = (torch.randn(128, 4), torch.randn(128, 2))
    kw = dict(num_chains=3, num_draws=10, step_size=1e-3, seed=0)
    together = estimate_llc(model, data, half_se, **kw)
    sizes = chunk_sizes(monkeypatch)
    alone = estimate_llc(model, data, half_se, vectorize=False, **kw)
    assert sizes == [1, 1, 1]
    np.testing.assert_allclose(alone.llc_trace, together.llc_trace, rtol=1e-6, atol=1e-9)


def test_unset_chain_chunk_size_follows_free_memory(monkeypatch):
    import devinterp.llc.estimate as estimate

    model = nn.Linear(100, 100)  # 10,100 parameters: 16 copies x 4 bytes ~ 0.65 MB a chain
    data = (torch.randn(64, 100), torch.randn(64, 100))
    monkeypatch.setattr(estimate, "_free_memory", lambda device: 3 * 2**20)  # 3 MB free
    sizes = chunk_sizes(monkeypatch)
    r = estimate_llc(model, data, half_se, num_chains=8, num_draws=4, step_size=1e-4)
    assert sizes == [2, 2, 2, 2]  # half of 3 MB holds two chains
    monkeypatch.setattr(estimate, "_free_memory", lambda device: None)
    sizes.clear()
    same = estimate_llc(model, data, half_se, num_chains=8, num_draws=4, step_size=1e-4)
    assert sizes == [8]
    np.testing.assert_allclose(r.llc_trace, same.llc_trace, rtol=1e-6, atol=1e-9)


# -- the driver's restriction (components in one computation) --------------------------------
@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_a_restricted_chain_gives_the_numbers_of_estimate_llc_with_weights(sampler):
    """A chain that draws noise for some parameters and masks the rest is, step for step, the
    chain of ``estimate_llc(weights=...)``: exactly with one ε, to float rounding with a
    per-chain ε (one ε per component)."""
    from devinterp.config import SamplerConfig
    from devinterp.llc import driver
    from devinterp.llc.estimate import _build_problem
    from devinterp.llc.problem import sampled_parameters
    from devinterp.samplers import get_kernel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(600, 4)
    with torch.no_grad():
        y = model(x)
    ref = estimate_llc(model, (x, y), gaussian_nll, num_chains=2, num_draws=30, num_burnin=15,
                       weights=["2.*"], step_size=1e-3, sampler=sampler)
    cfg = SamplerConfig(num_chains=2, num_draws=30, step_size=1e-3, sampler=sampler)
    prob, _ = _build_problem(model, (x, y), sampled_parameters(model, None), gaussian_nll,
                             None, cfg, None)
    names = tuple(k for k in prob.anchor if k.startswith("2."))
    masks = {k: torch.full((2, *v.shape), float(k in names)) for k, v in prob.anchor.items()}
    restriction = driver.Restriction(params=(names, names), masks=masks)
    for eps, tol in ((1e-3, 0.0), (torch.tensor([1e-3, 1e-3], dtype=torch.float64), 1e-5)):
        run = driver.run_chains(prob, [0, 1], seed=0, kernel=get_kernel(sampler), step_size=eps,
                                nbeta=ref.settings["nbeta"], localization=1.0, num_burnin=15,
                                num_draws=30, vectorize=True, restriction=restriction)
        trace = ref.settings["nbeta"] * (run.loss - run.baseline[None, :])
        np.testing.assert_allclose(trace, ref.llc_trace, rtol=tol, atol=tol)
        for k in prob.anchor:
            if k not in names:  # masked weights never left w*
                torch.testing.assert_close(run.final[k], prob.anchor[k].expand_as(run.final[k]))


def test_a_recorder_sees_every_draw_of_every_chain_at_the_sampled_positions():
    """The hook per-draw observables use: bound to the problem once, then shown each draw."""

    class Distances:
        def __init__(self) -> None:
            self.seen: dict[int, list[int]] = {}
            self.problem = None

        def bind(self, problem) -> None:
            self.problem = problem

        def on_draw(self, draw, chains, position, losses, baseline, batch) -> None:
            assert position["weight"].shape[0] == len(chains) == len(losses)
            for c in chains:
                self.seen.setdefault(c, []).append(draw)

    model = nn.Linear(3, 1)
    data = (torch.randn(64, 3), torch.randn(64, 1))
    rec = Distances()
    r = estimate_llc(model, data, half_se, num_chains=3, num_draws=5, step_size=1e-3,
                     chain_chunk_size=2, recorders=[rec])
    assert rec.problem is not None and rec.problem.model is model
    assert rec.seen == {c: list(range(5)) for c in range(3)}
    assert r.loss_trace.shape == (3, 5)
