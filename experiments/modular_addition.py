"""Modular addition that groks: an MLP learns (a + b) mod p from half of all pairs.

The network first memorizes the training pairs (train loss near 0 within a few hundred steps,
test loss *rising*), and only much later, pushed by weight decay towards a lower-norm solution,
generalizes (test loss falls, test accuracy goes from chance to 100%): "grokking" (Power et al.
2022). An MLP on embeddings groks on a CPU in a few thousand full-batch AdamW steps; the
transformer of the original papers is not needed to see it.

The loss is cross entropy, a negative log-likelihood. ``val_loss`` / ``val_acc`` are measured on
all pairs not used for training.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["ModularAdditionMLP", "modular_addition_split"]


def modular_addition_split(modulus: int, train_fraction: float,
                           seed: int) -> tuple[TensorDataset, TensorDataset]:
    """All pairs (a, b) with label (a + b) mod p, split at random into train and test sets.

    Inputs are long tensors of shape (N, 2); labels shape (N,).
    """
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    pairs = torch.cartesian_prod(torch.arange(modulus), torch.arange(modulus))
    labels = pairs.sum(-1) % modulus
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * len(pairs)))
    train, test = order[:n_train], order[n_train:]
    return TensorDataset(pairs[train], labels[train]), TensorDataset(pairs[test], labels[test])


class ModularAdditionMLP(pl.LightningModule):
    """Embed a and b, concatenate, one ReLU hidden layer, logits over the p residues.

    Args:
        modulus: p.
        train_fraction: fraction of the p² pairs used for training (the rest is the test set).
        embed_dim: embedding width of each operand.
        hidden_dim: width of the hidden layer.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay: what makes the network generalize after memorizing.
        batch_size: training minibatch size; None trains full batch (one step per epoch).
        seed: seed of the train / test split.
    """

    def __init__(
        self,
        modulus: int = 53,
        train_fraction: float = 0.5,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        lr: float = 3e-3,
        weight_decay: float = 1.0,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(modulus, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * embed_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, modulus))
        self.train_dataset, self.test_dataset = modular_addition_split(modulus, train_fraction,
                                                                       seed)
        self.loss_fn = F.cross_entropy

    def forward(self, pairs: Tensor) -> Tensor:
        return self.mlp(self.embed(pairs).flatten(-2))  # (N, 2, d) -> (N, 2d) -> logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay, betas=(0.9, 0.98))

    def train_dataloader(self) -> DataLoader:
        size = self.hparams.batch_size or len(self.train_dataset)
        return DataLoader(self.train_dataset, batch_size=size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=len(self.test_dataset))
