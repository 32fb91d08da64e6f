"""Tiny LightningModules for the callback, post-hoc and DDP tests (importable by name, so
``devinterp estimate`` and spawned DDP workers can rebuild them)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: Small sampler settings: fast, and deterministic given the seed.
FAST = {"num_chains": 2, "num_draws": 10, "num_burnin": 5, "step_size": 1e-4, "batch_size": 32}


def regression_data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 4) and noiseless targets of a fixed linear teacher, from their own generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])


class Tiny(pl.LightningModule):
    """A 4-``width``-1 MLP trained with Adam on ``(x, y)`` batches with ``self.loss_fn``.

    ``dropout`` and ``batchnorm`` add state that an estimate could disturb (the random stream,
    running statistics); ``nan_at_step`` makes the training loss NaN at that step.
    """

    def __init__(self, width: int = 8, lr: float = 0.05, n: int = 64, shuffle: bool = True,
                 dropout: float = 0.0, batchnorm: bool = False,
                 nan_at_step: int | None = None) -> None:
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
        self.loss_fn = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
                      ) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        if self.hparams.nan_at_step is not None and self.global_step == self.hparams.nan_at_step:
            loss = loss * float("nan")
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*regression_data(self.hparams.n)), batch_size=16,
                          shuffle=self.hparams.shuffle)


class TinyWithVal(Tiny):
    """:class:`Tiny` with a validation loop logging ``val_loss``."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*regression_data(32, seed=1)), batch_size=16)


class DictBatches(Tiny):
    """Batches are dicts, so the module provides ``llc_batch_loss``; it also calls ``self.log``
    inside the loss, which must not reach the loggers while λ̂ is estimated."""

    def llc_batch_loss(self, forward, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss_fn(forward(batch["x"]), batch["y"])
        self.log("leaked_from_llc", loss)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss_fn(self(batch["x"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        x, y = regression_data(self.hparams.n)
        rows = [{"x": a, "y": b} for a, b in zip(x, y, strict=True)]
        return DataLoader(rows, batch_size=16, shuffle=self.hparams.shuffle)


def trainer(tmp_path, callbacks=(), **kwargs) -> pl.Trainer:
    """A quiet CPU trainer writing into ``tmp_path``."""
    defaults = dict(
        max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def least_squares(n: int, d: int = 6, *, seed: int = 0, noise: float = 0.3, bias: bool = True
                  ) -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    """A linear model at the least-squares point of noisy linear data: a regular minimum, so
    with ½·squared error (unit-variance noise) λ = (d + bias)/2 exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + noise * torch.randn(n, 1, generator=g)
    model = nn.Linear(d, 1, bias=bias)
    design = torch.cat([x, torch.ones(n, 1)], 1) if bias else x
    solution = torch.linalg.lstsq(design, y).solution
    with torch.no_grad():
        model.weight.copy_(solution[:d].T)
        if bias:
            model.bias.copy_(solution[d])
    return model, (x, y)
