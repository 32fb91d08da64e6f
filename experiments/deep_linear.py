"""Deep linear network learning a low-rank teacher from small initialization.

f(x) = W_M ⋯ W_2 W_1 x learns y = T x, where T = U diag(s) Vᵀ has rank r = len(s) and distinct
singular values s. From a small initialization, gradient descent learns the modes one at a time,
the largest first (Saxe et al. 2014): the loss sits on a plateau at ½·Σ (unlearned s_i²), drops,
and sits on the next. Each learned mode raises the rank of the end-to-end map by one.

The teacher outputs are noiseless, so at convergence the network is at an exact minimum of the
empirical loss, and the hidden units the teacher does not need keep their small initial weights:
it sits near the most singular point of the set of true parameters, where Aoyagi (2024) gives the
learning coefficient exactly (:meth:`DeepLinearNetwork.exact_llc`). λ̂ at the end of training
should approach it.

The loss is ½‖y − f(x)‖² summed over outputs and averaged over the batch: the Gaussian negative
log-likelihood with unit noise, up to a constant. With x ~ N(0, I) the population loss is exactly
½‖W_M ⋯ W_1 − T‖²_F, logged as ``val_loss``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DeepLinearNetwork", "half_squared_error", "make_teacher"]


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """½‖targets − outputs‖² summed over outputs, averaged over the batch."""
    return 0.5 * (targets - outputs).pow(2).sum(-1).mean()


def make_teacher(num_inputs: int, num_outputs: int, singular_values: tuple[float, ...],
                 generator: torch.Generator) -> Tensor:
    """T = U diag(s) Vᵀ (num_outputs × num_inputs) with random orthonormal U, V."""
    u, _ = torch.linalg.qr(torch.randn(num_outputs, num_outputs, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(num_inputs, num_inputs, generator=generator))
    r = len(singular_values)
    return u[:, :r] @ torch.diag(torch.tensor(list(singular_values))) @ v[:, :r].T


class DeepLinearNetwork(pl.LightningModule):
    """A product of bias-free linear layers trained with SGD on a noiseless low-rank teacher.

    Args:
        widths: layer widths, input first and output last (e.g. [6, 3, 3, 6]: two hidden
            layers). Keep hidden layers narrow: when they are wide compared with input + output,
            λ does not depend on the teacher's rank.
        teacher_singular_values: the teacher's nonzero singular values, largest first; their
            number is the teacher's rank. Far-apart values give well-separated loss plateaus.
        num_samples: n, the training set size; inputs are N(0, I).
        batch_size: SGD minibatch size.
        lr: SGD learning rate.
        init_scale: standard deviation of the initial weights (drawn from the global RNG, i.e.
            ``seed_everything``). Small values give long plateaus and a sharp staircase.
        seed: seed of the teacher and the training data.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (6, 3, 3, 6),
        teacher_singular_values: tuple[float, ...] = (4.0, 1.0),
        num_samples: int = 1024,
        batch_size: int = 128,
        lr: float = 0.05,
        init_scale: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        rank = len(teacher_singular_values)
        if len(widths) < 2 or rank > min(widths):
            raise ValueError(f"the teacher's rank ({rank}) must fit every width in {widths}; "
                             "give fewer teacher_singular_values or wider layers")
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False)
                                    for a, b in zip(widths[:-1], widths[1:], strict=True))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=init_scale)
        g = torch.Generator().manual_seed(seed)
        teacher = make_teacher(widths[0], widths[-1], teacher_singular_values, g)
        self.register_buffer("teacher", teacher, persistent=False)
        x = torch.randn(num_samples, widths[0], generator=g)
        self.train_dataset = TensorDataset(x, x @ teacher.T)
        self.loss_fn = half_squared_error

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def product(self) -> Tensor:
        """The end-to-end map W_M ⋯ W_1."""
        p = self.layers[0].weight
        for layer in self.layers[1:]:
            p = layer.weight @ p
        return p

    def learned_rank(self) -> int:
        """Singular values of the end-to-end map above half the teacher's smallest one."""
        threshold = 0.5 * min(self.hparams.teacher_singular_values)
        return int((torch.linalg.svdvals(self.product().detach()) > threshold).sum())

    def exact_llc(self) -> float:
        """Aoyagi's learning coefficient for these widths and the teacher's rank."""
        from devinterp.theory import deep_linear_network_llc

        return deep_linear_network_llc(self.hparams.widths,
                                       len(self.hparams.teacher_singular_values))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        with torch.no_grad():
            self.log("val_loss", 0.5 * (self.product() - self.teacher).pow(2).sum())
            self.log("rank", float(self.learned_rank()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.hparams.batch_size, shuffle=True)
