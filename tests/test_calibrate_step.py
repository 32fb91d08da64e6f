"""calibrate_step_size: the automatic step of estimate_llc without the chains, and whether w*
is near a minimum (what run-level calibration needs to pick its checkpoints)."""

import pytest
import torch
from torch import nn

from devinterp.llc import calibrate_step_size, estimate_llc


def _regression(seed: int = 0) -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.3 * torch.randn(512, 1, generator=g)
    model = nn.Linear(6, 1)
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(512, 1)], 1), y).solution
    with torch.no_grad():
        model.weight.copy_(solution[:6].T)
        model.bias.copy_(solution[6])
    return model, (x, y)


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
