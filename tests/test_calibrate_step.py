"""calibrate_step_size: the automatic step of estimate_llc without the chains, and whether w*
is near a minimum (what run-level calibration needs to pick its checkpoints)."""

import pytest
import torch
from llc_models import least_squares
from torch import nn

from devinterp.llc import calibrate_step_size, estimate_llc


def _regression(seed: int = 0) -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    return least_squares(512, seed=seed)


def _half_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).mean()


def test_same_step_as_the_estimate_chooses():
    model, data = _regression()
    opts = {"num_chains": 2, "num_draws": 40, "seed": 3}
    chosen = calibrate_step_size(model, data, _half_mse, **opts)
    result = estimate_llc(model, data, _half_mse, **opts)
    assert chosen["step_size"] == pytest.approx(result.settings["step_size"], rel=1e-12)
    assert chosen["nbeta"] == pytest.approx(result.settings["nbeta"])
    assert chosen["calibration_s"] > 0


def test_near_minimum_at_least_squares_and_not_on_a_slope():
    model, data = _regression()
    assert calibrate_step_size(model, data, _half_mse, num_chains=2)["near_minimum"]
    with torch.no_grad():
        model.weight.add_(0.5)  # far up the bowl: pilot chains run downhill
    assert not calibrate_step_size(model, data, _half_mse, num_chains=2)["near_minimum"]


def test_a_given_step_is_refused():
    model, data = _regression()
    with pytest.raises(ValueError, match="leave it unset"):
        calibrate_step_size(model, data, _half_mse, step_size=1e-3)
