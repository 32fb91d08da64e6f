"""num_draws="auto": the same chains extended in rounds until they converge or the budget is
spent, and saying which."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llc_models import least_squares
from torch import nn

from devinterp import estimate_llc
from devinterp.config import AUTO_DRAWS, AUTO_ESS, AUTO_RHAT, SamplerConfig


def regression() -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    """A linear model at its least-squares point: λ = d/2 = 2 exactly (½·squared error)."""
    return least_squares(256, 4, noise=0.5, bias=False)


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).mean()


OPTS = {"step_size": 1e-3, "batch_size": 64, "progress": False}


def test_extended_chains_are_the_longer_run():
    """Stopped by the budget after two rounds: 200 draws extended by 100 are exactly the
    chains of one 300-draw run (same noise, minibatches and preconditioner)."""
    model, data = regression()
    auto = estimate_llc(model, data, half_mse, num_chains=2, num_draws="auto", max_draws=300,
                        **OPTS)
    plain = estimate_llc(model, data, half_mse, num_chains=2, num_draws=300,
                         num_burnin=AUTO_DRAWS // 2, **OPTS)
    np.testing.assert_array_equal(auto.loss_trace, plain.loss_trace)
    assert auto.settings["num_draws"] == 300 and auto.settings["num_draws_requested"] == "auto"
    rounds = auto.diagnostics["draw_rounds"]
    assert [r["num_draws"] for r in rounds] == [200, 300]
    # Two chains cannot reach an ESS of 400 in 300 draws: the budget ended it, and it says so.
    assert auto.diagnostics["draws_converged"] == 0
    assert any("max_draws" in w and "300" in w for w in auto.warnings)


def test_auto_stops_as_soon_as_the_chains_converge():
    model, data = regression()
    r = estimate_llc(model, data, half_mse, num_chains=8, num_draws="auto", batch_size=64)
    rounds = r.diagnostics["draw_rounds"]
    last = rounds[-1]
    assert r.diagnostics["draws_converged"] == 1
    assert last["rhat"] <= AUTO_RHAT and last["ess"] >= AUTO_ESS
    for earlier in rounds[:-1]:  # every earlier round fell short of the rule
        assert earlier["rhat"] > AUTO_RHAT or earlier["ess"] < AUTO_ESS
    assert r.settings["num_draws"] == last["num_draws"] == r.loss_trace.shape[1]
    assert [x["num_draws"] for x in rounds] == [AUTO_DRAWS * 2**k for k in range(len(rounds))]
    assert not any("max_draws" in w for w in r.warnings)
    # The known truth of this model: λ = d/2 = 2.
    assert r.llc_mean == pytest.approx(2.0, abs=3 * r.diagnostics["llc_se"] + 0.1)


def test_chunks_and_a_sequential_loop_give_the_same_auto_run():
    model, data = regression()
    kw = dict(num_chains=4, num_draws="auto", max_draws=300, **OPTS)
    one = estimate_llc(model, data, half_mse, **kw)
    chunked = estimate_llc(model, data, half_mse, chain_chunk_size=1, **kw)
    looped = estimate_llc(model, data, half_mse, vectorize=False, **kw)
    np.testing.assert_allclose(chunked.loss_trace, one.loss_trace, rtol=1e-6)
    np.testing.assert_allclose(looped.loss_trace, one.loss_trace, rtol=1e-6)
    for a, b in zip(chunked.diagnostics["draw_rounds"], one.diagnostics["draw_rounds"],
                    strict=True):
        assert a["num_draws"] == b["num_draws"] and a["rhat"] == pytest.approx(b["rhat"])


def test_bad_auto_options_are_named():
    with pytest.raises(ValueError, match="num_draws must be an integer >= 2 or auto"):
        SamplerConfig(num_draws="many")
    with pytest.raises(ValueError, match="max_draws must be an integer >= 4"):
        SamplerConfig(max_draws=1)
    assert SamplerConfig(num_draws="auto").burnin == AUTO_DRAWS // 2
