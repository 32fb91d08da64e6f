"""The default λ̂ loss is the module's own training objective: a LightningModule written as
usual (``training_step`` computes, logs and returns the loss) needs no change, in the callback,
in ``track_llc`` and in ``devinterp estimate``; what cannot be a loss is named with the fix."""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from llc_models import FAST, Tiny, regression_data, trainer
from plain_modules import DictClassifier, Regressor
from torch import nn

from devinterp import LLCCallback, load_run
from devinterp.cli.estimate import main
from devinterp.tracking import LossSpec, TrainingStepLoss, module_loss, track_llc

FAST_FLAGS = ["--num-chains", "2", "--num-draws", "10", "--num-burnin", "5", "--step-size",
              "1e-4", "--batch-size", "32", "--quiet"]


def fit(tmp_path, module, callbacks, **kwargs) -> pl.Trainer:
    """Seed, build the module (when given a factory) and fit: equal seeds give equal runs."""
    pl.seed_everything(0, verbose=False)
    if not isinstance(module, nn.Module):
        module = module()
    t = trainer(tmp_path, callbacks, **{"max_steps": 8, **kwargs})
    t.fit(module)
    return t


def inline(tmp_path, module, name="run", **kwargs):
    cb = LLCCallback(tmp_path / name, every_n_train_steps=4, progress=False, **FAST, **kwargs)
    fit(tmp_path, module, [cb])
    return load_run(tmp_path / name)


# -- the callback -------------------------------------------------------------------------------
def test_an_unchanged_module_attaches_and_gives_finite_rows(tmp_path):
    logger = CSVLogger(tmp_path / "logs")
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST)
    fit(tmp_path, Regressor, [cb], logger=logger)
    run = load_run(tmp_path / "run")
    assert run.llc["step"].tolist() == [0, 4, 8] and (run.llc["status"] == "ok").all()
    assert np.isfinite(run.llc["llc_mean"]).all() and np.isfinite(run.llc["llc_std"]).all()
    assert run.meta["loss"] == {"kind": "module_training_step"} and run.meta["missing"] == []
    # self.log inside the step is dropped while λ̂ is estimated: the module's 8 training rows
    # reach the logger and the run store, and nothing more.
    logged = pd.read_csv(logger.log_dir + "/metrics.csv")
    assert logged["train_loss"].notna().sum() == 8
    assert run.metrics["train_loss"].notna().sum() == 8


def test_the_sampled_loss_is_the_training_step_at_the_sampled_weights(tmp_path):
    """init_loss (L at w*, on the estimator's first minibatch) equals the module's own MSE;
    and the λ̂ rows equal those of the same objective given explicitly as loss_fn."""
    by_step = inline(tmp_path, Regressor, "step").llc
    explicit = inline(tmp_path, Regressor, "explicit", loss_fn=F.mse_loss).llc
    cols = ["step", "llc_mean", "llc_std", "init_loss", "mala_acceptance"]
    pd.testing.assert_frame_equal(by_step[cols], explicit[cols], rtol=1e-5)
    assert not np.allclose(by_step["llc_mean"], 0.0)


def test_a_dict_batch_and_a_dict_return_with_log_dict(tmp_path):
    logger = CSVLogger(tmp_path / "logs")
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST)
    fit(tmp_path, DictClassifier, [cb], logger=logger)
    run = load_run(tmp_path / "run")
    assert run.llc["step"].tolist() == [0, 4, 8] and (run.llc["status"] == "ok").all()
    assert np.isfinite(run.llc["llc_mean"]).all()
    assert run.llc["init_loss"].between(0.0, 5.0).all()  # a cross entropy over 3 classes
    logged = pd.read_csv(logger.log_dir + "/metrics.csv")
    assert logged["train_accuracy"].notna().sum() == 8


class SkipsEveryBatch(Regressor):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return None


class ReadsTheLearningRate(Regressor):
    def training_step(self, batch, batch_idx):
        self.log("lr", self.optimizers().param_groups[0]["lr"])
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("module", "match"), [
    (SkipsEveryBatch, "SkipsEveryBatch.training_step returned None"),
    (ReadsTheLearningRate, r"ReadsTheLearningRate.training_step calls self.optimizers\(\)"),
])
def test_a_step_that_is_no_loss_fails_the_rows_with_the_fix_and_training_goes_on(
        tmp_path, module, match):
    """Each a failed row whose reason names the module, what it returned and both fixes; one
    warning; training runs to the end (the optimizer is never touched by λ̂)."""
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False,
                     **{**FAST, "batch_size": 16})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, module(shuffle=False), [cb])
    assert t.global_step == 8
    table = load_run(tmp_path / "run").llc
    assert table["step"].tolist() == [0, 4, 8] and (table["status"] == "failed").all()
    for reason in table["reason"]:
        assert re.search(match, reason), reason
        assert "loss_fn=" in reason and "llc_batch_loss(self, forward, batch)" in reason
    ours = [w for w in caught if "no λ̂ at step" in str(w.message)]
    assert len(ours) == 1


class ManualOptimization(Regressor):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize(("returned", "match"), [
    (lambda loss: loss.expand(16, 1), r"a tensor of shape \(16, 1\)"),
    (lambda loss: (loss, loss), "a tuple"),
    (lambda loss: {"objective": loss}, r"a dict without a scalar 'loss' \(keys \['objective'\]\)"),
    (lambda loss: {"loss": None}, r"a dict without a scalar 'loss' \(keys \['loss'\]\)"),
])
def test_a_step_that_returns_no_scalar_loss_is_named_with_the_fix(returned, match):
    module = Regressor()
    module.training_step = lambda batch, batch_idx: returned(F.mse_loss(module(batch[0]),
                                                                        batch[1]))
    with pytest.raises(ValueError, match=rf"^Regressor.training_step returned {match}, not a "
                       r"scalar loss tensor or a dict with a scalar 'loss'; pass --loss, or "
                       r"define llc_batch_loss\(self, forward, batch\) on Regressor$"):
        TrainingStepLoss(module, fix="pass --loss")(module, regression_data(16))


def test_manual_optimization_is_refused_before_training_naming_both_fixes(tmp_path):
    module = ManualOptimization()
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST)
    with pytest.raises(ValueError, match=r"ManualOptimization.training_step cannot be the λ̂ "
                       r"loss: .*automatic_optimization = False.*loss_fn=.*llc_batch_loss"):
        fit(tmp_path, module, [cb])
    assert module.global_step == 0


def test_manual_optimization_with_an_explicit_loss_works(tmp_path):
    run = inline(tmp_path, ManualOptimization, loss_fn=F.mse_loss)
    assert (run.llc["status"] == "ok").all()
    assert run.meta["loss"] == {"kind": "function",
                                "path": "torch.nn.functional:mse_loss"}


# -- the one resolution order -------------------------------------------------------------------
class AllConventions(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.loss_fn = nn.MSELoss()

    def llc_batch_loss(self, forward, batch):
        return self.loss_fn(forward(batch[0]), batch[1])


def test_resolution_order_argument_method_attribute_training_step():
    both = AllConventions()
    assert module_loss(both, F.l1_loss) == LossSpec("argument", loss_fn=F.l1_loss)
    assert module_loss(both) == LossSpec("module_llc_batch_loss", batch_loss=both.llc_batch_loss)
    assert module_loss(both, recorded="module_loss_fn") == LossSpec("module_loss_fn",
                                                                    loss_fn=both.loss_fn)
    step = module_loss(both, recorded="module_training_step")
    assert step.kind == "module_training_step" and isinstance(step.batch_loss, TrainingStepLoss)
    attribute_only = Tiny()  # loss_fn attribute and a training_step: the attribute wins
    assert module_loss(attribute_only) == LossSpec("module_loss_fn",
                                                   loss_fn=attribute_only.loss_fn)
    assert module_loss(Regressor()).kind == "module_training_step"
    # a recorded convention the module lacks: the order decides
    assert module_loss(Regressor(), recorded="module_loss_fn").kind == "module_training_step"
    with pytest.raises(TypeError, match="not both"):
        module_loss(both, F.l1_loss, lambda forward, batch: 0)
    with pytest.raises(ValueError, match=r"^Linear has no loss for λ̂: tried an llc_batch_loss"
                       r".*training_step\(batch, batch_idx\); pass --loss x, or define "
                       r"llc_batch_loss\(self, forward, batch\) on Linear$"):
        module_loss(nn.Linear(2, 1), fix="pass --loss x")


def test_training_step_loss_takes_a_dict_loss_and_a_step_without_batch_idx():
    x, y = regression_data(16)
    module = DictClassifier()
    loss = TrainingStepLoss(module, fix="f")
    labels = torch.zeros(16, dtype=torch.long)
    value = loss(module, {"features": x, "label": labels})
    assert value.shape == () and torch.allclose(value, F.cross_entropy(module(x), labels))
    one_arg = Regressor()
    one_arg.training_step = lambda batch: F.mse_loss(one_arg(batch[0]), batch[1])
    assert torch.allclose(TrainingStepLoss(one_arg, fix="f")(one_arg, (x, y)),
                          F.mse_loss(one_arg(x), y))


# -- without the Trainer -------------------------------------------------------------------------
def test_track_llc_uses_the_training_step_and_self_log_is_quiet_without_a_trainer(tmp_path):
    model = Regressor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = track_llc(model, 3, tmp_path, data=regression_data(64), **FAST)
    assert row["status"] == "ok" and np.isfinite(row["llc_mean"])
    assert not [w for w in caught if "self.log" in str(w.message)]
    assert "log" not in vars(model) and "optimizers" not in vars(model)  # guard undone
    with pytest.raises(ValueError, match=r"^Sequential has no loss .* pass loss_fn= or "
                       r"batch_loss= to track_llc"):
        track_llc(nn.Sequential(nn.Linear(4, 1)), 0, tmp_path / "other",
                  data=regression_data(64), **FAST)
    assert not (tmp_path / "other").exists()  # nothing written for bad input


def test_deferred_then_devinterp_estimate_rebuilds_the_training_step_loss(tmp_path):
    ref = inline(tmp_path, Regressor, "inline")
    cb = LLCCallback(tmp_path / "deferred", every_n_train_steps=4, mode="deferred",
                     progress=False, **FAST)
    fit(tmp_path, Regressor, [cb])
    assert load_run(tmp_path / "deferred").meta["loss"] == {"kind": "module_training_step"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([str(tmp_path / "deferred"), "--quiet"]) == 0
    assert not [w for w in caught if "self.log" in str(w.message)]
    got = load_run(tmp_path / "deferred").llc
    cols = ["step", "llc_mean", "llc_std", "init_loss", "status"]
    pd.testing.assert_frame_equal(got[cols], ref.llc[cols])


def test_lightning_checkpoints_of_an_unchanged_module(tmp_path):
    ckpts = tmp_path / "ckpts"
    fit(tmp_path, Regressor, [ModelCheckpoint(ckpts, every_n_train_steps=4, save_top_k=-1)],
        enable_checkpointing=True)
    ref = inline(tmp_path, Regressor, "inline", include_init=False)
    out = tmp_path / "estimated"
    assert main([str(ckpts), "--module", "plain_modules:Regressor", "--out", str(out),
                 *FAST_FLAGS]) == 0
    got = load_run(out).llc
    cols = ["step", "llc_mean", "llc_std", "init_loss", "status"]
    pd.testing.assert_frame_equal(got[cols], ref.llc[cols])
