"""check_stability: the convergence checks of issue 12 (split R-hat; λ̂ stable 4× longer and
at half the step), on a model whose chains provably settle, on one whose chains provably have
not, and at all defaults on small trained versions of the project's grokking MLP and
attention-only LM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from llc_models import least_squares
from torch import nn

from devinterp.llc.calibration import STABLE_REL, STABLE_SE, check_stability

# experiments/ is not installed: import it from this repository, as `devinterp run` does.
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _regression() -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    """Least squares on noisy linear data: a regular minimum, λ = d/2 = 3.5."""
    return least_squares(2000)


def _half_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).mean() / 0.09  # unit-variance NLL of the 0.3 noise


def test_settled_chains_pass_every_check():
    model, data = _regression()
    c = check_stability(model, data, _half_mse, num_chains=4, num_draws=100)
    assert c["rhat"] <= 1.1
    for key in ("longer", "half_step"):
        v = c[key]
        assert v["stable"], (key, v)
        assert v["bound"] == pytest.approx(
            STABLE_REL + STABLE_SE * (c["se"] ** 2 + v["se"] ** 2) ** 0.5 / abs(c["llc"]))
        assert v["change"] == pytest.approx((v["llc"] - c["llc"]) / abs(c["llc"]))
    assert c["llc"] == pytest.approx(3.5, rel=0.2)


def test_chains_still_climbing_pass_rhat_but_fail_longer_and_half_step():
    # Plain SGLD at a step ~500x below what the curvature allows, no burn-in: every chain
    # climbs from w* alike (relaxation ~700 steps), so split R-hat sees nothing (~1.0) while
    # λ̂ grows when the chains run longer and shrinks at half the step.
    model, data = _regression()
    c = check_stability(model, data, _half_mse, num_chains=4, num_draws=50, num_burnin=0,
                        step_size=3e-6, sampler="sgld")
    assert c["rhat"] < 1.1
    assert c["longer"]["change"] > c["longer"]["bound"] and not c["longer"]["stable"]
    assert -c["half_step"]["change"] > c["half_step"]["bound"]
    assert not c["half_step"]["stable"]


def _grokking_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """configs/modular_addition.yaml's MLP at p = 23 and a quarter of its widths, after 1,500
    full-batch AdamW steps (train loss ~1e-3: memorized)."""
    from experiments.modular_addition import ModularAdditionMLP

    torch.manual_seed(0)
    model = ModularAdditionMLP(modulus=23, embed_dim=16, hidden_dim=32, lr=3e-3,
                               weight_decay=1.0)
    x, y = model.train_dataset.tensors
    opt = model.configure_optimizers()
    for _ in range(1500):
        loss = model.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), (x, y)


def _attention_lm() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """configs/induction_lm.yaml's attention-only LM at width 8, 16 tokens, context 12 (two
    copied segments of 2), 128 sequences, after 200 Adam steps."""
    from experiments.induction_lm import InductionLM

    torch.manual_seed(0)
    model = InductionLM(vocab_size=16, seq_len=12, copy_len=2, num_copies=2, width=8,
                        num_samples=128, lr=3e-3)
    x, y = model.train_dataset.tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(len(x), (32,), generator=g)
        loss = model.loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), (x, y)


#: Why the defaults do not converge yet on these models (measured at 100 draws: split R-hat 1.64
#: on this grokking MLP at 4 chains, 1.84 on this attention-only LM at 8 chains, by
#: ``tools/bench_llc.py --criteria --quick``). The attention LM's chains are
#: still spreading into the flat directions (‖w − w*‖² grows through the draws); the grokking
#: MLP's w* is not a minimum of the train loss (its gradient points along −w*: scaling the
#: weights up lowers the loss), so the chains drift outward as long as they run. Strict: the
#: day the defaults converge, these tests fail until the mark is removed.
NOT_YET = ("issue 12 item 2: the default sampler does not equilibrate the flat directions "
           "within the default draws")


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=NOT_YET)
@pytest.mark.parametrize("build", [_grokking_mlp, _attention_lm], ids=["grokking", "attention"])
def test_defaults_converge_on_trained_models(build):
    """Issue 12's "Done when" at all defaults (4 chains x 100 draws to stay in budget)."""
    model, data = build()
    c = check_stability(model, data, model.loss_fn, num_chains=4, num_draws=100)
    assert c["rhat"] <= 1.1, c
    assert c["longer"]["stable"], c
    assert c["half_step"]["stable"], c
