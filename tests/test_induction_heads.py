"""``tools/induction_heads.py``: the formation window, head types, the change of λ̂ in s.e.,
the adjusted Rand index against known values, and one small end-to-end pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "induction_heads.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("induction_heads_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    # Registered first: the tool's dataclasses look their module up while being defined.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_formation_window_is_where_the_copy_loss_falls(tool):
    """A plateau at 3.0 (after an early fall from 3.4 at step 0), a fall from step 450 to
    1450 to 1.0: the window runs from the last step within 10% of the drop of the plateau to
    the first within 10% of the final value."""
    steps = np.arange(0, 3001, 100)
    y = np.interp(steps, [0, 100, 450, 1450, 3000], [3.4, 3.0, 3.0, 1.0, 1.0])
    start, end = tool.formation_window(pd.DataFrame({"step": steps, "val_loss_copy": y}))
    assert (start, end) == (500, 1400)


def test_head_types_and_brackets(tool):
    assert tool.head_type({"induction": 0.5, "previous_token": 0.6}) == "induction"
    assert tool.head_type({"induction": 0.1, "previous_token": 0.6}) == "previous-token"
    assert tool.head_type({"induction": 0.1, "previous_token": 0.15}) == "other"
    assert tool.bracket([200, 600, 1000, 3000], (700, 1400)) == (600, 3000)
    assert tool.bracket([800, 1000], (700, 1400)) == (800, 1000)


def test_change_in_standard_errors(tool):
    table = pd.DataFrame({"component": ["A", "A", "B", "B"], "step": [1, 2, 1, 2],
                          "llc_mean": [1.0, 4.0, 2.0, 2.0], "llc_se": [0.3, 0.4, 0.1, 0.1]})
    z = tool.change_z(table, 1, 2)
    assert z["A"] == pytest.approx(3.0 / 0.5)
    assert z["B"] == 0.0


def test_adjusted_rand_index_known_values(tool):
    """Identical partitions (any names) give 1; sklearn's documented example
    adjusted_rand_score([0, 0, 1, 1], [0, 0, 1, 2]) = 0.5714...; a split that crosses every
    pair structure gives the negative value of the formula."""
    assert tool.adjusted_rand([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert tool.adjusted_rand([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert tool.adjusted_rand([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)


def test_training_keeps_checkpoints_and_every_head_gets_an_estimate(tool):
    args = dict(vocab_size=16, seq_len=32, copy_len=4, num_copies=2, width=16, num_heads=2,
                num_samples=128, num_val_samples=16, batch_size=16)
    model, training = tool.train(args, max_steps=12, seed=0, checkpoints=[4, 12], log_every=4)
    assert sorted(training.weights) == [4, 12]
    assert list(training.val["step"]) == [0, 4, 8, 12]
    # The kept weights are the weights at that step, not a reference to the live ones.
    assert not torch.equal(training.weights[4]["embed.weight"], model.embed.weight)
    torch.testing.assert_close(training.weights[12]["embed.weight"], model.embed.weight)
    table = tool.estimate_heads(model, dict(num_chains=2, num_draws=8, num_burnin=4,
                                            batch_size=16, sampler="sgld", step_size=1e-4,
                                            nbeta=30.0, localization=6.0, seed=0))
    assert list(table["component"]) == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert np.isfinite(table[["llc_mean", "llc_se", "rhat"]].to_numpy()).all()
