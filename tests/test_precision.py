"""Half-precision training runs: λ̂ is sampled in float32 master weights."""

from __future__ import annotations

import math

import pytest
import torch
from llc_models import Tiny, trainer

from devinterp import LLCCallback, load_run


@pytest.mark.slow
def test_bf16_true_training_gets_finite_lambda_rows(tmp_path):
    """Trainer(precision="bf16-true") keeps bf16 weights while the training data are float32;
    the callback crashed on that dtype mismatch, and bf16 steps rounded back to w* (λ̂ ≈ 0)."""
    llc = LLCCallback(tmp_path / "run", every_n_train_steps=4, num_chains=2, num_draws=20,
                      progress=False)
    module = Tiny()
    trainer(tmp_path, [llc], precision="bf16-true").fit(module)
    assert next(module.parameters()).dtype == torch.bfloat16
    rows = load_run(tmp_path / "run").llc
    assert list(rows["step"]) == [0, 4, 8]
    assert (rows["status"] == "ok").all(), rows[["step", "reason"]]
    assert all(math.isfinite(v) and v != 0 for v in rows["llc_mean"])
