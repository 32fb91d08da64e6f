"""Shared test setup: no network for W&B, and one torch thread (tiny models run faster on
one thread, and timings do not collapse when another process holds the second core)."""

import os

import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)
