"""In-context linear regression (Hoogland et al., "Loss Landscape Degeneracy and Stagewise
Development in Transformers", TMLR 2025; after Garg et al. 2022 and Raventós et al. 2023).

Each sequence is a fresh regression task: w ~ N(0, I_D), then K pairs (x_k, y_k) with
x_k ~ N(0, I_D) and y_k = w·x_k + ε, ε ~ N(0, σ²). The tokens alternate x_1, y_1, x_2, y_2, …
(x as (0, x), y as (y, 0, …, 0), both in R^(D+1)); at each x_k the transformer predicts y_k from
the pairs before it. The paper's model: 2 layers, 4 heads, width 64, D = 4, K = 16, σ² = 0.125.

Stages seen in the paper (500k steps): the model first learns to predict the mean, ŷ = 0 (loss
falls to about E[y²] = D + σ²), then learns to regress in context (loss falls towards the
noise floor as k grows), with λ̂ rising at each. The CPU schedule here (a few thousand steps on
a fixed set of sequences) shows these first stages.

The loss is the squared error of the predictions, averaged over the K positions and the batch:
a Gaussian negative log-likelihood up to a constant.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.transformer import Transformer

__all__ = ["InContextRegression", "sample_tasks", "squared_error"]


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """(prediction − y)², averaged over positions and the batch."""
    return (outputs - targets).pow(2).mean()


def sample_tasks(num_sequences: int, task_dim: int, num_examples: int, noise_variance: float,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Token sequences (N, 2K, D+1) and targets (N, K): a new task w for every sequence."""
    w = torch.randn(num_sequences, task_dim, 1, generator=generator)
    x = torch.randn(num_sequences, num_examples, task_dim, generator=generator)
    noise = noise_variance**0.5 * torch.randn(num_sequences, num_examples, 1, generator=generator)
    y = x @ w + noise  # (N, K, 1)
    x_tokens = torch.cat([torch.zeros_like(y), x], dim=-1)  # (0, x)
    y_tokens = torch.cat([y, torch.zeros_like(x)], dim=-1)  # (y, 0, ..., 0)
    tokens = torch.stack([x_tokens, y_tokens], dim=2).flatten(1, 2)  # x_1, y_1, x_2, ...
    return tokens, y.squeeze(-1)


class InContextRegression(pl.LightningModule):
    """A causal transformer that reads (x_1, y_1, …, x_k) and predicts y_k.

    Args:
        task_dim: D, the dimension of x and w.
        num_examples: K, pairs per sequence.
        noise_variance: σ² of the label noise.
        width: transformer width.
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        num_samples: training sequences (a fixed set, so that λ̂ has a training set of size n).
        num_val_samples: held-out sequences for ``val_loss``.
        batch_size: training minibatch size.
        lr: Adam learning rate.
        seed: seed of the training and validation sequences.
    """

    def __init__(
        self,
        task_dim: int = 4,
        num_examples: int = 16,
        noise_variance: float = 0.125,
        width: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_samples: int = 16384,
        num_val_samples: int = 1024,
        batch_size: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(task_dim + 1, width)
        self.transformer = Transformer(width, num_layers, num_heads, max_len=2 * num_examples)
        self.readout = nn.Linear(width, 1)
        g = torch.Generator().manual_seed(seed)
        args = (task_dim, num_examples, noise_variance, g)
        self.train_dataset = TensorDataset(*sample_tasks(num_samples, *args))
        self.val_dataset = TensorDataset(*sample_tasks(num_val_samples, *args))
        self.loss_fn = squared_error

    def forward(self, tokens: Tensor) -> Tensor:
        """Predictions of y_1..y_K, shape (batch, K): the outputs at the x tokens."""
        h = self.transformer(self.embed(tokens))
        return self.readout(h[:, ::2]).squeeze(-1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, y = batch
        loss = self.loss_fn(self(tokens), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        tokens, y = batch
        error = (self(tokens) - y).pow(2).mean(0)  # per position k
        self.log("val_loss", error.mean())
        # The last position has seen K − 1 examples: in-context learning shows here first.
        self.log("val_loss_last", error[-1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=len(self.val_dataset))
