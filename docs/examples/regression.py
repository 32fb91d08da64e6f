"""An unchanged LightningModule with λ̂ tracked during training (README: "Attach to your run").

    python regression.py            # λ̂ estimated during training, into runs/regression
    python regression.py deferred   # snapshots only, into runs/regression-deferred; then
    devinterp estimate runs/regression-deferred --module regression.py:Regression
"""

import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp import LLCCallback, load_run


class Regression(pl.LightningModule):
    """A module as it is usually written: the loss lives in training_step, nothing else."""

    def __init__(self, width: int = 16, lr: float = 0.01):
        super().__init__()
        self.save_hyperparameters()  # lets `devinterp estimate` rebuild the module later
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y) / 2  # ½·squared error: the Gaussian NLL λ̂ needs
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 4, generator=g)
        y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]))
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


if __name__ == "__main__":
    deferred = sys.argv[1:] == ["deferred"]
    pl.seed_everything(0)
    llc = LLCCallback(
        "runs/regression-deferred" if deferred else "runs/regression",
        mode="deferred" if deferred else "inline",
        log_spaced=8, every_n_train_steps=250,  # log- and linear-spaced steps, plus step 0
        num_chains=4, num_draws=1000,           # chains that mix here (split R-hat <= 1.05)
    )
    trainer = pl.Trainer(max_steps=1000, callbacks=[llc], logger=pl.loggers.CSVLogger("logs"),
                         enable_progress_bar=False)
    trainer.fit(Regression())
    if not deferred:  # deferred: the callback printed the `devinterp estimate` command
        print(load_run(llc.store.path).llc[["step", "llc_mean", "llc_std", "rhat", "status"]])
