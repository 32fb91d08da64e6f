"""Toy model of superposition (Chen et al. 2023, "Dynamical versus Bayesian Phase Transitions in
a Toy Model of Superposition", arXiv 2310.06301).

An autoencoder squeezes ``c = 6`` features through ``2`` hidden dimensions::

    f(x) = ReLU(WᵀW x + b),   W ∈ R^(2×c), b ∈ R^c

Each input has exactly one active feature, chosen uniformly, with magnitude uniform in [0, 1].
Its critical points are "k-gons": k columns of W of equal length at the vertices of a regular
polygon, one shared bias, the other c − k features dead (W_i = 0). Their population losses
are known exactly, and SGD started near a 4-gon jumps between them: the loss falls in sudden
drops and λ̂ rises at each one.

The population loss has a closed form for *any* (W, b) (:func:`population_loss`), because the
input is one feature times a uniform scalar: each (input feature, output) pair contributes a
piecewise-quadratic integral over t ∈ [0, 1]. It is logged as ``val_loss``: the loss on
infinitely many fresh samples, with no sampling noise, so the plateaus can be read off exactly.

The loss is ‖x − f(x)‖² summed over features and averaged over the batch (Chen et al.'s
convention, so the published values apply): a Gaussian negative log-likelihood with variance ½,
up to a constant.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "ToyModelOfSuperposition",
    "kgon_critical_point",
    "polygon",
    "population_loss",
    "sample_inputs",
    "squared_error",
]


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """‖targets − outputs‖² summed over features, averaged over the batch."""
    return (targets - outputs).pow(2).sum(-1).mean()


def sample_inputs(num_samples: int, num_features: int, generator: torch.Generator) -> Tensor:
    """One active feature per row, chosen uniformly, with magnitude uniform in [0, 1]."""
    feature = torch.randint(num_features, (num_samples,), generator=generator)
    magnitude = torch.rand(num_samples, generator=generator)
    x = torch.zeros(num_samples, num_features)
    x[torch.arange(num_samples), feature] = magnitude
    return x


def _integral_of_square(slope: Tensor, offset: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """∫_lo^hi (slope·t + offset)² dt."""
    return (slope**2 * (hi**3 - lo**3) / 3 + slope * offset * (hi**2 - lo**2)
            + offset**2 * (hi - lo))


def population_loss(W: Tensor, b: Tensor) -> Tensor:
    """Exact E‖x − ReLU(WᵀWx + b)‖² under the data distribution, for any W (h × c) and b (c).

    For input feature i at magnitude t, output j is ReLU(a_ij·t + b_j) with a = WᵀW; its
    target is t when i = j, else 0. ReLU is active on one sub-interval of [0, 1], where the
    error is linear in t; elsewhere the error is the target. Differentiable; float64.
    """
    W, b = W.double(), b.double()
    c = W.shape[1]
    a = W.T @ W  # a[i, j]: input feature i -> output j
    offset = b.expand(c, c)
    target = torch.eye(c, dtype=a.dtype)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    root = (-offset / torch.where(a == 0, one, a)).clamp(0, 1)  # where a·t + b crosses 0
    lo = torch.where(a > 0, root, zero)
    hi = torch.where(a < 0, root, one)
    hi = torch.where(a == 0, (offset > 0).to(a.dtype), hi)  # constant pre-activation
    active = _integral_of_square(a - target, offset, lo, hi)
    inactive = target * (1 - (hi**3 - lo**3)) / 3  # ∫ t² dt outside [lo, hi], only when i = j
    return (active + inactive).sum() / c


def polygon(k: int, num_features: int, length: float | Tensor = 1.0, bias: float | Tensor = 0.0,
            dead_bias: float = 0.0) -> tuple[Tensor, Tensor]:
    """A k-gon: columns 0..k−1 of W at the vertices of a regular k-gon of radius ``length``,
    sharing the bias ``bias``; the other features dead (W_i = 0) with bias ``dead_bias``."""
    angle = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    vertices = torch.zeros(2, num_features, dtype=torch.float64)
    vertices[0, :k], vertices[1, :k] = torch.cos(angle), torch.sin(angle)
    on = torch.arange(num_features) < k
    b = torch.where(on, torch.as_tensor(bias, dtype=torch.float64), float(dead_bias))
    return vertices * length, b


def kgon_critical_point(k: int, num_features: int = 6) -> tuple[float, float, float]:
    """(length l*, bias b*, population loss) of the k-gon critical point with dead biases 0.

    Found by minimizing the closed-form population loss over (l, b): nothing is tabulated, so
    comparing with the published values tests :func:`population_loss` and this search.
    """
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = population_loss(*polygon(k, num_features, params[0], params[1]))
        loss.backward()
        return loss

    opt.step(closure)
    length, bias = (float(v) for v in params.detach())
    return length, bias, float(population_loss(*polygon(k, num_features, length, bias)))


class ToyModelOfSuperposition(pl.LightningModule):
    """f(x) = ReLU(WᵀWx + b) trained with SGD on ``num_samples`` inputs drawn from ``seed``.

    Args:
        num_features: c, the number of features (6 in the paper).
        num_hidden: hidden dimensions (2: the k-gons are polygons in the plane).
        num_samples: n, the training set size (λ̂ uses nβ = n / log n by default).
        batch_size: SGD minibatch size.
        lr: SGD learning rate.
        init: ``"4-gon"`` starts near the 4-gon (l = 1, b = 0) on features 0..3, the other
            features near dead; ``"random"`` starts near W = 0, b = 0.
        init_noise: standard deviation of the Gaussian noise added to W and b (all noise is
            drawn from the global RNG, i.e. ``seed_everything``).
        dead_init: with ``init="4-gon"``, standard deviation of the dead features' columns of W.
            Large enough (0.3) that SGD leaves the 4-gon for the 5-gon within a few hundred
            steps from most seeds; small ones stall at 4⁺⁺ (two dead features, positive bias).
        seed: seed of the training data.
    """

    def __init__(
        self,
        num_features: int = 6,
        num_hidden: int = 2,
        num_samples: int = 1000,
        batch_size: int = 64,
        lr: float = 0.1,
        init: Literal["4-gon", "random"] = "4-gon",
        init_noise: float = 0.1,
        dead_init: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if init == "4-gon" and (num_hidden != 2 or num_features < 4):
            raise ValueError(f"init='4-gon' needs num_hidden=2 and num_features>=4, got "
                             f"num_hidden={num_hidden}, num_features={num_features}; "
                             "use init='random'")
        W = init_noise * torch.randn(num_hidden, num_features)
        b = init_noise * torch.randn(num_features)
        if init == "4-gon":
            W[:, :4] += polygon(4, num_features)[0][:, :4].float()
            W[:, 4:] = dead_init * torch.randn(num_hidden, num_features - 4)
        self.W = torch.nn.Parameter(W)
        self.b = torch.nn.Parameter(b)
        x = sample_inputs(num_samples, num_features, torch.Generator().manual_seed(seed))
        self.train_dataset = TensorDataset(x, x)  # an autoencoder: the target is the input
        self.loss_fn = squared_error

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W.T @ self.W + self.b)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        with torch.no_grad():
            self.log("val_loss", population_loss(self.W, self.b).float())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.hparams.batch_size, shuffle=True)
