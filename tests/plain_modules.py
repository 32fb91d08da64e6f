"""LightningModules written the way users write them: the loss is computed, logged and returned
by ``training_step``; no ``loss_fn`` attribute, no ``llc_batch_loss``. Importable by name, so
``devinterp estimate``, spawned DDP workers and killed-and-resumed scripts can rebuild them."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from llc_models import regression_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regressor(pl.LightningModule):
    """An MLP regressor on ``(x, y)`` batches: ``loss = F.mse_loss(self(x), y); return loss``.

    ``dropout`` and ``batchnorm`` add state an estimate could disturb (the random stream,
    running statistics).
    """

    def __init__(self, width: int = 8, lr: float = 0.05, n: int = 64, shuffle: bool = True,
                 dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(4, width)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*regression_data(self.hparams.n)), batch_size=16,
                          shuffle=self.hparams.shuffle)


class DictClassifier(pl.LightningModule):
    """A classifier on dict batches ``{"features", "label"}`` whose ``training_step`` logs
    with ``self.log_dict`` and returns ``{"loss": ..., "accuracy": ...}`` (as Hugging
    Face-style modules return ``outputs.loss`` among other things)."""

    def __init__(self, n: int = 64, classes: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int
                      ) -> dict[str, torch.Tensor]:
        logits = self(batch["features"])
        loss = F.cross_entropy(logits, batch["label"])
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
        self.log_dict({"train_loss": loss, "train_accuracy": accuracy})
        return {"loss": loss, "accuracy": accuracy.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        x, _ = regression_data(self.hparams.n)
        labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        rows = [{"features": a, "label": b} for a, b in zip(x, labels, strict=True)]
        return DataLoader(rows, batch_size=16, shuffle=True)
