"""Small models whose learning coefficient is known exactly, with data at their true parameter.

They are the ground truth of the tests, the benchmark (``tools/bench_llc.py``) and the README
example. Teacher outputs are noiseless, so w* is an exact minimum of the empirical loss
(label noise would move it and bias any sampler low: the estimator of Lau et al. 2023,
arXiv 2308.12108, assumes w* is a local minimum).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from devinterp import theory

__all__ = ["SeparableSum", "deep_linear_network", "gaussian_nll", "mean_output", "teacher_data"]


def gaussian_nll(outputs: Tensor, targets: Tensor) -> Tensor:
    """½‖y − f(x)‖² summed over outputs, averaged over the batch: a unit-noise Gaussian NLL."""
    return 0.5 * ((outputs - targets) ** 2).flatten(1).sum(1).mean()


def deep_linear_network(widths: Sequence[int], rank: int, *, seed: int = 0) -> nn.Sequential:
    """f(x) = W_M ⋯ W_1 x at the most singular true parameter of a rank-``rank`` teacher.

    The teacher's first ``rank`` hidden units carry random orthogonal blocks; every spare unit
    has zero weights in and out (the most singular true parameter, where Aoyagi's 2024 λ for deep
    linear networks holds).
    """
    if not 0 <= rank <= min(widths):
        raise ValueError(f"rank must be in [0, {min(widths)}], got {rank}")
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            if rank:
                q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=g))
                layer.weight[:rank, :rank] = q
    return nn.Sequential(*layers)


def teacher_data(model: nn.Module, in_dim: int, n: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n inputs x ~ N(0, I) and the model's own noiseless outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    with torch.no_grad():
        y = model(x)
    return x, y


class SeparableSum(nn.Module):
    """K(w) = Σ_i w_i^(2 k_i) at w* = 0: λ = Σ 1/(2 k_i) exactly (a normal crossing, Watanabe
    2009), and at every nβ.

    ``forward(x)`` returns K(w) for every row of x, so with ``loss_fn = mean`` the empirical loss
    is K itself; x only sets n (and hence nβ = n/log n).
    """

    def __init__(self, powers: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("powers", torch.tensor([2 * int(k) for k in powers]))
        self.w = nn.Parameter(torch.zeros(len(powers)))

    def forward(self, x: Tensor) -> Tensor:
        k = (self.w ** self.powers).sum()
        return k.expand(x.shape[0])

    def llc(self) -> float:
        return theory.separable_sum_llc([int(p) // 2 for p in self.powers])


def mean_output(outputs: Tensor, targets: Tensor) -> Tensor:
    """The loss for :class:`SeparableSum`: the batch mean of the model output."""
    return outputs.mean()
