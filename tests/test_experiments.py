"""The experiments in ``experiments/``: exact facts about their models and data, and tiny runs
that show the published developmental picture (loss plateaus at known values, rank staircase,
memorization before generalization, bigram before induction)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from devinterp import estimate_llc
from devinterp.theory import deep_linear_network_llc
from experiments.deep_linear import DeepLinearNetwork
from experiments.icl_regression import InContextRegression, sample_tasks
from experiments.induction_lm import InductionLM, sample_sequences, transition_matrix
from experiments.modular_addition import ModularAdditionMLP, modular_addition_split
from experiments.tms import (
    ToyModelOfSuperposition,
    kgon_critical_point,
    polygon,
    population_loss,
    sample_inputs,
)


class Recorder(pl.Callback):
    """Calls ``fn(module)`` after every training step and keeps (step, value)."""

    def __init__(self, fn):
        self.fn, self.values = fn, []

    def on_train_batch_end(self, trainer, module, *args):
        with torch.no_grad():
            self.values.append((trainer.global_step, self.fn(module)))


def fit(module: pl.LightningModule, max_steps: int, callbacks=(), **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks), **kwargs)
    trainer.fit(module)
    return trainer


# -- toy model of superposition -----------------------------------------------------------------
# Published values (Chen et al. 2023, arXiv 2310.06301): k -> (l*, b*, population loss at c = 6).
KGONS = {5: (1.17046, -0.28230, 0.06874), 6: (1.32053, -0.61814, 0.04819)}


@pytest.mark.parametrize("k", [5, 6])
def test_kgon_critical_points_match_the_paper(k):
    length, bias, loss = kgon_critical_point(k, num_features=6)
    want_l, want_b, want_loss = KGONS[k]
    assert length == pytest.approx(want_l, abs=2e-5)
    assert bias == pytest.approx(want_b, abs=2e-5)
    assert loss == pytest.approx(want_loss, abs=1e-5)


def test_dead_feature_with_positive_bias_lowers_the_loss_by_one_over_4c_squared():
    length, bias, _ = kgon_critical_point(5)
    five_plus = float(population_loss(*polygon(5, 6, length, bias, dead_bias=1 / 12)))
    assert five_plus == pytest.approx(0.06180, abs=1e-5)
    four_plus = polygon(4, 6)
    four_plus[1][4] = 1 / 12
    assert float(population_loss(*four_plus)) == pytest.approx(0.10417, abs=1e-5)
    assert float(population_loss(*polygon(4, 6))) == pytest.approx(2 / 18, abs=1e-12)


def test_kgon_is_a_critical_point_of_the_full_loss():
    length, bias, _ = kgon_critical_point(5)
    W, b = polygon(5, 6, length, bias)
    W.requires_grad_(True)
    b.requires_grad_(True)
    population_loss(W, b).backward()
    assert W.grad.abs().max() < 1e-6 and b.grad.abs().max() < 1e-6
    W2, b2 = (p.detach() + 0.05 * torch.randn_like(p) for p in (W, b))
    W2.requires_grad_(True)
    population_loss(W2, b2).backward()
    assert W2.grad.abs().max() > 1e-3  # not vanishing everywhere


@pytest.mark.parametrize("point", ["random", "5-gon"])
def test_closed_form_loss_matches_monte_carlo_of_the_model(point):
    g = torch.Generator().manual_seed(1)
    if point == "random":
        W, b = torch.randn(2, 6, generator=g), 0.3 * torch.randn(6, generator=g)
    else:
        W, b = polygon(5, 6, *kgon_critical_point(5)[:2])
    model = ToyModelOfSuperposition(num_samples=10)
    with torch.no_grad():
        model.W.copy_(W)
        model.b.copy_(b)
    x = sample_inputs(400_000, 6, g)
    per_sample = (x - model(x)).pow(2).sum(-1).double()
    se = per_sample.std() / math.sqrt(len(x))
    assert abs(per_sample.mean() - population_loss(W, b)) < 4 * se


def test_tms_data_one_active_feature_and_seeded():
    a = ToyModelOfSuperposition(num_samples=500, seed=3).train_dataset.tensors[0]
    b = ToyModelOfSuperposition(num_samples=500, seed=3).train_dataset.tensors[0]
    c = ToyModelOfSuperposition(num_samples=500, seed=4).train_dataset.tensors[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a > 0).sum(-1) == 1).all() and a.max() <= 1


def _plateaus(steps: np.ndarray, loss: np.ndarray, half_width: float = 0.15,
              rel_tol: float = 0.02) -> list[float]:
    """Loss levels of the plateaus of a curve over log-step.

    A step is flat when the loss changes by less than ``rel_tol`` (relative) across
    ±``half_width`` decades around it; each run of flat steps is one plateau, whose level is the
    loss where the curve is flattest (a saddle is left before it is reached exactly).
    """
    logs = np.log10(steps)
    change = np.full(len(steps), np.inf)
    for i in range(len(steps)):
        lo = np.searchsorted(logs, logs[i] - half_width)
        hi = np.searchsorted(logs, logs[i] + half_width, side="right") - 1
        if steps[i] >= 10 and logs[i] - half_width >= logs[0] and hi < len(steps) - 1:
            change[i] = abs(loss[hi] - loss[lo]) / loss[i]
    levels, i = [], 0
    while i < len(steps):
        if change[i] < rel_tol:
            j = i
            while j + 1 < len(steps) and change[j + 1] < rel_tol:
                j += 1
            levels.append(float(loss[i + int(np.argmin(change[i:j + 1]))]))
            i = j
        i += 1
    return levels


@pytest.mark.slow
def test_tms_sgd_from_near_a_4gon_plateaus_at_closed_form_kgon_losses():
    pl.seed_everything(5, verbose=False)  # configs/quickstart.yaml's seed
    model = ToyModelOfSuperposition()
    rec = Recorder(lambda m: float(population_loss(m.W, m.b)))
    fit(model, 1500, [rec])
    steps, loss = (np.array(v) for v in zip(*rec.values, strict=True))
    l5, b5, five = kgon_critical_point(5)
    four = float(population_loss(*polygon(4, 6)))
    known = [four - k / 144 for k in range(3)]  # 4, 4+, 4++ (one or two positive dead biases)
    known += [five, float(population_loss(*polygon(5, 6, l5, b5, dead_bias=1 / 12)))]
    known.append(kgon_critical_point(6)[2])
    levels = _plateaus(steps, loss)
    assert len(levels) >= 2, levels
    assert all(a > b for a, b in zip(levels, levels[1:], strict=False)), levels
    for level in levels:  # nearest critical point, well within half the spacing (0.0069)
        assert min(abs(level - k) for k in known) < 2.5e-3, (level, known)
    assert min(abs(loss[-1] - k) for k in known[3:]) < 5e-4  # settled on a 5-gon or beyond


# -- deep linear network -------------------------------------------------------------------------
def test_dln_teacher_has_the_given_singular_values_and_data_are_seeded():
    m = DeepLinearNetwork(widths=(5, 4, 5), teacher_singular_values=(3.0, 0.5), seed=2)
    sv = torch.linalg.svdvals(m.teacher)
    assert torch.allclose(sv[:2], torch.tensor([3.0, 0.5]), atol=1e-5) and sv[2:].max() < 1e-5
    x, y = m.train_dataset.tensors
    assert torch.allclose(y, x @ m.teacher.T)  # noiseless teacher
    same = DeepLinearNetwork(widths=(5, 4, 5), teacher_singular_values=(3.0, 0.5), seed=2)
    other = DeepLinearNetwork(widths=(5, 4, 5), teacher_singular_values=(3.0, 0.5), seed=3)
    assert torch.equal(same.train_dataset.tensors[1], y)
    assert not torch.equal(other.train_dataset.tensors[1], y)
    assert m.exact_llc() == deep_linear_network_llc([5, 4, 5], 2)


def test_dln_rejects_a_teacher_rank_that_does_not_fit():
    with pytest.raises(ValueError, match="rank"):
        DeepLinearNetwork(widths=(6, 2, 6), teacher_singular_values=(3.0, 2.0, 1.0))


def _train_dln() -> tuple[DeepLinearNetwork, np.ndarray, np.ndarray, np.ndarray]:
    pl.seed_everything(0, verbose=False)
    m = DeepLinearNetwork()  # 6-3-3-6, teacher singular values 4 and 1
    rec = Recorder(lambda m: (0.5 * float((m.product() - m.teacher).pow(2).sum()),
                              m.learned_rank()))
    fit(m, 700, [rec])
    steps = np.array([s for s, _ in rec.values])
    loss = np.array([v[0] for _, v in rec.values])
    rank = np.array([v[1] for _, v in rec.values])
    return m, steps, loss, rank


@pytest.fixture(scope="module")
def trained_dln():
    return _train_dln()


def test_dln_learns_modes_one_at_a_time(trained_dln):
    _, steps, loss, rank = trained_dln
    assert (np.diff(rank) >= 0).all()  # the rank of the learned map never falls
    assert set(rank.tolist()) == {0, 1, 2} and rank[-1] == 2
    # A plateau at ½·1² = 0.5 (the first mode, s = 4, learned; the second, s = 1, not yet).
    plateaus = _plateaus(steps, loss, half_width=0.1)
    assert any(abs(p - 8.5) < 0.1 for p in plateaus), plateaus
    assert any(abs(p - 0.5) < 0.02 for p in plateaus), plateaus
    assert loss[-1] < 1e-4


@pytest.mark.slow
def test_dln_llc_at_convergence_is_near_aoyagis_value(trained_dln):
    m = trained_dln[0]
    result = estimate_llc(m, m.train_dataset, m.loss_fn, seed=0)
    assert m.exact_llc() == 10.5
    assert result.llc_mean == pytest.approx(m.exact_llc(), rel=0.15)


# -- modular addition ---------------------------------------------------------------------------
def test_modular_addition_split_is_a_seeded_partition_of_all_pairs():
    train, test = modular_addition_split(11, 0.4, seed=0)
    pairs = torch.cat([train.tensors[0], test.tensors[0]])
    assert len(train) == round(0.4 * 121) and len(pairs) == 121
    assert len({tuple(p) for p in pairs.tolist()}) == 121
    for ds in (train, test):
        x, y = ds.tensors
        assert torch.equal(y, (x[:, 0] + x[:, 1]) % 11)
    again, _ = modular_addition_split(11, 0.4, seed=0)
    other, _ = modular_addition_split(11, 0.4, seed=1)
    assert torch.equal(again.tensors[0], train.tensors[0])
    assert not torch.equal(other.tensors[0], train.tensors[0])


@pytest.mark.slow
def test_modular_addition_memorizes_long_before_it_generalizes():
    pl.seed_everything(0, verbose=False)
    m = ModularAdditionMLP()
    fit(m, 300, num_sanity_val_steps=0, check_val_every_n_epoch=300)
    x, y = m.test_dataset.tensors
    with torch.no_grad():
        train_loss = m.loss_fn(m(m.train_dataset.tensors[0]), m.train_dataset.tensors[1])
        test_logits = m(x)
    assert train_loss < 0.1  # memorized
    assert F.cross_entropy(test_logits, y) > math.log(53)  # worse than chance on new pairs
    assert (test_logits.argmax(-1) == y).float().mean() < 0.1


# -- in-context linear regression ----------------------------------------------------------------
def test_icl_tokens_interleave_x_and_y_with_the_stated_noise():
    g = torch.Generator().manual_seed(0)
    tokens, y = sample_tasks(20_000, 4, 16, 0.125, g)
    assert tokens.shape == (20_000, 32, 5) and y.shape == (20_000, 16)
    assert (tokens[:, ::2, 0] == 0).all() and (tokens[:, 1::2, 1:] == 0).all()
    assert torch.equal(tokens[:, 1::2, 0], y)
    # E[y²] = E‖w‖²·E[x²] + σ² = 4 + 0.125.
    assert y.pow(2).mean().item() == pytest.approx(4.125, rel=0.03)
    again, _ = sample_tasks(20_000, 4, 16, 0.125, torch.Generator().manual_seed(0))
    assert torch.equal(again, tokens)


def test_icl_predictions_only_see_the_past():
    torch.manual_seed(0)
    m = InContextRegression(num_samples=8, num_val_samples=8)
    tokens = m.train_dataset.tensors[0][:2].clone()
    before = m(tokens)
    tokens[:, 20:] += 1.0  # change x_11 and everything after it
    after = m(tokens)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


# -- induction language model ------------------------------------------------------------------
def _lm_sequences(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return sample_sequences(200, 64, transition_matrix(16, 3.0, g), copy_len=8, num_copies=2,
                            generator=g)


def test_lm_copies_are_exact_and_the_mask_marks_predictable_tokens():
    tokens, copied = _lm_sequences(0)
    assert tokens.shape == copied.shape == (200, 65)
    assert (copied.sum(-1) == 2 * 7).all()
    for seq, mask in zip(tokens, copied, strict=True):
        for t in mask.nonzero().flatten().tolist():
            # an earlier occurrence of the previous token is followed by this token
            hits = (seq[:t - 1] == seq[t - 1]).nonzero().flatten().tolist()
            assert any(seq[h + 1] == seq[t] for h in hits)
    assert torch.equal(_lm_sequences(0)[0], tokens)
    assert not torch.equal(_lm_sequences(1)[0], tokens)


def test_lm_bigram_is_learned_within_a_hundred_steps():
    pl.seed_everything(0, verbose=False)
    m = InductionLM(num_samples=2048, num_val_samples=256)
    x, y, copied = m.val_dataset.tensors
    with torch.no_grad():
        start = F.cross_entropy(m(x).transpose(1, 2), y, reduction="none")[~copied].mean()
    fit(m, 100, num_sanity_val_steps=0, limit_val_batches=0)
    with torch.no_grad():
        end = F.cross_entropy(m(x).transpose(1, 2), y, reduction="none")[~copied].mean()
    uniform = math.log(32)
    assert start == pytest.approx(uniform, rel=0.1)
    assert m.bigram_entropy() < end < start - 1.0  # most of the way to the bigram entropy


# -- every experiment trains and samples under the estimator --------------------------------------
TINY = {
    "tms": lambda: ToyModelOfSuperposition(num_samples=64),
    "dln": lambda: DeepLinearNetwork(num_samples=64),
    "modular": lambda: ModularAdditionMLP(modulus=7, embed_dim=8, hidden_dim=16),
    "icl": lambda: InContextRegression(width=16, num_samples=32, num_val_samples=8,
                                       batch_size=8),
    "lm": lambda: InductionLM(width=16, seq_len=24, copy_len=4, num_samples=32,
                              num_val_samples=8, batch_size=8),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_trains_logs_and_estimates(name):
    pl.seed_everything(0, verbose=False)
    module = TINY[name]()
    assert callable(module.loss_fn) and module.hparams  # the LLC callback's conventions
    trainer = fit(module, 3, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=3,
                  check_val_every_n_epoch=None)
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))
    if name not in ("tms", "dln"):
        assert math.isfinite(float(trainer.callback_metrics["val_loss"]))
    result = estimate_llc(module, module.train_dataset, module.loss_fn, num_chains=2,
                          num_draws=5, num_burnin=2, step_size=1e-6, batch_size=8, seed=0)
    assert np.isfinite(result.llc_per_chain).all()
    rebuilt = type(module)(**module.hparams)  # save_hyperparameters is enough to rebuild it
    assert torch.equal(rebuilt.train_dataset.tensors[0], module.train_dataset.tensors[0])
