"""The estimator on a CUDA device (skipped without one; run them when a GPU is at hand)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from devinterp import estimate_llc
from devinterp.models import deep_linear_network, gaussian_nll, teacher_data
from devinterp.theory import deep_linear_network_llc

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_deep_linear_network_on_cuda_matches_aoyagi():
    widths, rank = [3, 3, 6], 1
    model = deep_linear_network(widths, rank).cuda()
    x, y = teacher_data(model, widths[0], 10_000)
    r = estimate_llc(model, (x, y), gaussian_nll, seed=0)
    exact = deep_linear_network_llc(widths, rank)
    assert abs(r.llc_mean - exact) < 0.1 * exact, (r.llc_mean, exact)
    assert next(model.parameters()).is_cuda


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(3, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_rnns_sample_on_cuda(cell):
    """cuDNN refuses an RNN's backward in eval mode; the estimator turns it off for them."""
    torch.manual_seed(0)
    model = Recurrent(cell).cuda()
    x = torch.randn(512, 6, 3, device="cuda")
    with torch.no_grad():
        y = model(x)
    r = estimate_llc(model, (x, y), gaussian_nll, num_chains=4, num_draws=50)
    assert math.isfinite(r.llc_mean) and r.diagnostics["num_diverged"] == 0
    assert torch.backends.cudnn.enabled


def test_bf16_model_on_cuda_is_sampled_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).cuda()
    x = torch.randn(4000, 8, device="cuda")
    with torch.no_grad():
        y = model(x)
    r32 = estimate_llc(model, (x, y), gaussian_nll, num_chains=4, num_draws=200, seed=0)
    r16 = estimate_llc(model.to(torch.bfloat16), (x, y), gaussian_nll, num_chains=4,
                       num_draws=200, seed=0)
    assert r16.settings["sample_dtype"] == "float32"
    assert abs(r16.llc_mean - r32.llc_mean) < 0.15 * r32.llc_mean


def test_model_nan_is_caught_without_a_sync_per_step():
    from test_llc import Cliff

    from devinterp.llc import NonFiniteLossError

    data = (torch.zeros(100, 1, device="cuda"), torch.zeros(100, device="cuda"))
    with pytest.raises(NonFiniteLossError, match="the model or the loss returns NaN"):
        estimate_llc(Cliff().cuda(), data, lambda o, t: o.mean(), num_chains=8,
                     num_draws=10_000, num_burnin=1, step_size=0.02, nbeta=1.0,
                     localization=0.0, sampler="sgld")
