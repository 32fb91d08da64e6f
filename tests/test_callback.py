"""LLCCallback: schedule, skip rules, run store, state restoration, resume, bad input."""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import docstring_parser
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from llc_models import FAST, DictBatches, Tiny, TinyWithVal, regression_data, trainer
from plain_modules import Regressor
from torch import nn

from devinterp import LLCCallback, load_run
from devinterp.config import SamplerConfig
from devinterp.tracking import Schedule, log_spaced_steps, preserved_training_state, track_llc


def fit(tmp_path, module=Tiny, *, seed=0, callbacks=(), ckpt_path=None, **trainer_kwargs
        ) -> pl.Trainer:
    """Seed, build the module (when given a factory) and fit: equal seeds give equal runs."""
    pl.seed_everything(seed, verbose=False)
    if not isinstance(module, nn.Module):
        module = module()
    t = trainer(tmp_path, callbacks, **trainer_kwargs)
    t.fit(module, ckpt_path=ckpt_path)
    return t


def snapshot_steps(path) -> list[int]:
    return sorted(load_run(path).snapshots)


# -- training untouched ------------------------------------------------------------------------
@pytest.mark.parametrize("module_class", [Tiny, Regressor])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, module_class):
    """Dropout (random stream), BatchNorm (buffers), Adam (optimizer state), a shuffling loader
    (the loader's seed comes from the global stream): all must end exactly equal, with a
    ``loss_fn`` attribute (Tiny) and with the unchanged module's own training_step."""
    def run(with_callback: bool):
        pl.seed_everything(0, verbose=False)
        module = module_class(dropout=0.2, batchnorm=True)
        cbs = [LLCCallback(tmp_path / "run", every_n_train_steps=3, progress=False, **FAST)] \
            if with_callback else []
        t = fit(tmp_path, module, callbacks=cbs, max_steps=7)
        opt = t.optimizers[0].state_dict()
        rng = (torch.get_rng_state(), np.random.get_state()[1].copy(),  # noqa: NPY002
               random.getstate())
        return module.state_dict(), opt, rng, module.training

    ref_weights, ref_opt, ref_rng, ref_mode = run(False)
    weights, opt, rng, mode = run(True)
    assert set(weights) == set(ref_weights)
    for k in ref_weights:
        assert torch.equal(weights[k], ref_weights[k]), k
    for p, state in ref_opt["state"].items():
        for k, v in state.items():
            assert torch.equal(torch.as_tensor(opt["state"][p][k]), torch.as_tensor(v)), (p, k)
    assert torch.equal(rng[0], ref_rng[0]) and np.array_equal(rng[1], ref_rng[1])
    assert rng[2] == ref_rng[2] and mode == ref_mode
    table = load_run(tmp_path / "run").llc
    assert table["step"].tolist() == [0, 3, 6]
    assert (table["status"] == "ok").all() and table["llc_mean"].notna().all()


def test_preserved_training_state_restores_what_a_block_changes():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model(torch.randn(5, 3)).sum().backward()
    model.eval()
    weight, grad = model[0].weight.detach().clone(), model[0].weight.grad
    running = model[1].running_mean.clone()
    rng = torch.get_rng_state()
    with preserved_training_state(model):
        model.train()
        model(torch.randn(8, 3))  # moves BatchNorm statistics and the random stream
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model[0].weight.requires_grad_(False)
        model.zero_grad()
        torch.set_grad_enabled(False)
    assert torch.is_grad_enabled()
    assert not model.training and not model[1].training
    assert torch.equal(model[0].weight, weight) and model[0].weight.requires_grad
    assert model[0].weight.grad is grad
    assert torch.equal(model[1].running_mean, running)
    assert torch.equal(torch.get_rng_state(), rng)


# -- schedule ----------------------------------------------------------------------------------
def test_every_n_train_steps_and_explicit_steps_union_with_step_0(tmp_path):
    cb = LLCCallback(tmp_path, every_n_train_steps=4, steps=[1, 6], mode="deferred",
                     progress=False)
    fit(tmp_path, callbacks=[cb], max_steps=8)
    assert snapshot_steps(tmp_path) == [0, 1, 4, 6, 8]
    state = torch.load(load_run(tmp_path).snapshots[4], weights_only=True)
    assert set(state) == set(Tiny().state_dict())


def test_log_spaced_union_linear(tmp_path):
    cb = LLCCallback(tmp_path, log_spaced=5, every_n_train_steps=12, mode="deferred",
                     progress=False)
    fit(tmp_path, callbacks=[cb], max_steps=16)
    assert log_spaced_steps(5, 16) == [1, 2, 4, 8, 16]
    assert snapshot_steps(tmp_path) == [0, 1, 2, 4, 8, 12, 16]
    assert load_run(tmp_path).settings["schedule"]["planned"] == [0, 1, 2, 4, 8, 12, 16]


def test_log_spaced_resolves_max_steps_from_max_epochs(tmp_path):
    cb = LLCCallback(tmp_path, log_spaced=4, include_init=False, mode="deferred",
                     progress=False)
    fit(tmp_path, callbacks=[cb], max_steps=-1, max_epochs=2)  # 4 batches per epoch
    assert snapshot_steps(tmp_path) == log_spaced_steps(4, 8) == [1, 2, 4, 8]


def test_every_n_epochs(tmp_path):
    cb = LLCCallback(tmp_path, every_n_epochs=1, mode="deferred", progress=False)
    fit(tmp_path, callbacks=[cb], max_steps=-1, max_epochs=3)
    assert snapshot_steps(tmp_path) == [0, 4, 8, 12]


def test_gradient_accumulation_takes_each_step_once(tmp_path):
    cb = LLCCallback(tmp_path, every_n_train_steps=1, mode="deferred", progress=False)
    fit(tmp_path, callbacks=[cb], max_steps=3, accumulate_grad_batches=2)
    assert snapshot_steps(tmp_path) == [0, 1, 2, 3]


def test_fast_dev_run_is_skipped(tmp_path):
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=1, mode="deferred", progress=False)
    with pytest.warns(UserWarning, match="fast_dev_run"):
        fit(tmp_path, callbacks=[cb], fast_dev_run=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({}, "empty schedule"),
    ({"steps": []}, "empty schedule"),
    ({"every_n_train_steps": 10, "every_n_epochs": 1}, "conflicting schedule"),
    ({"every_n_train_steps": 0}, "every_n_steps must be an integer >= 1"),
    ({"every_n_epochs": -1}, "every_n_epochs must be an integer >= 1"),
    ({"steps": [5, -1]}, "steps must be integers >= 0"),
    ({"log_spaced": 0}, "log_spaced must be an integer >= 1"),
    ({"every_n_train_steps": 5, "mode": "later"}, "mode must be 'inline' or 'deferred'"),
    ({"every_n_train_steps": 5, "num_chains": 0}, "num_chains must be an integer >= 1"),
    ({"every_n_train_steps": 5, "step_size": -1.0},
     "step_size must be a positive finite float or 'auto'"),
    ({"every_n_train_steps": 5, "sampler": "hmc"}, "sampler must be one of"),
    ({"every_n_train_steps": 5, "weights": []}, "names no parameter"),
    ({"every_n_train_steps": 5, "num_threads": 0}, "num_threads must be an integer >= 1"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLCCallback("unused", **kwargs)


def test_every_sampler_option_is_an_argument_of_the_callback():
    """SamplerConfig is the one home of the sampler options; LLCCallback repeats their names
    (typed, for LightningCLI), so a field it does not take is caught here, with its default
    None (= SamplerConfig's default) and recorded in settings.json."""
    params = inspect.signature(LLCCallback).parameters
    for f in dataclasses.fields(SamplerConfig):
        assert f.name in params, f"LLCCallback does not take SamplerConfig.{f.name}"
        assert params[f.name].default is None, f.name
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, f.name
    cb = LLCCallback("unused", every_n_train_steps=5)
    assert set(cb.options) == {f.name for f in dataclasses.fields(SamplerConfig)}


def test_weights_as_a_string_is_a_type_error():
    with pytest.raises(TypeError, match="list of parameter names"):
        LLCCallback("unused", every_n_train_steps=5, weights="net.0.weight")


def test_log_spaced_without_a_step_budget_fails_before_training(tmp_path):
    cb = LLCCallback(tmp_path, log_spaced=10, mode="deferred", progress=False)
    module = Tiny()
    with pytest.raises(ValueError, match="log_spaced needs the number of training steps"):
        fit(tmp_path, module, callbacks=[cb], max_steps=-1, max_epochs=-1)
    assert module.global_step == 0


def test_steps_beyond_max_steps_warn(tmp_path):
    cb = LLCCallback(tmp_path, steps=[2, 50], mode="deferred", progress=False)
    with pytest.warns(UserWarning, match=r"steps \[50\] are beyond max_steps=8"):
        fit(tmp_path, callbacks=[cb], max_steps=8)
    assert snapshot_steps(tmp_path) == [0, 2]


def test_unwritable_dirpath_fails_before_training_naming_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    module = Tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = LLCCallback(blocker / "run", every_n_train_steps=2, progress=False)
    with pytest.raises(PermissionError, match="a_file/run"):
        fit(tmp_path, module, callbacks=[cb])
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_sharded_strategies_are_refused():
    cb = LLCCallback("unused", every_n_train_steps=2)
    deepspeed = type("DeepSpeedStrategy", (), {})()
    for strategy in (FSDPStrategy(), deepspeed):
        fake = SimpleNamespace(strategy=strategy, fast_dev_run=False)
        with pytest.raises(ValueError, match="sharded strategy .*strategy='ddp'"):
            cb.setup(fake, Tiny(), "fit")


class NoLoss(Tiny):
    """Manual optimization and no loss_fn or llc_batch_loss: no convention gives a loss."""

    def __init__(self) -> None:
        super().__init__()
        del self.loss_fn
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.manual_backward(loss)
        self.optimizers().step()


def test_missing_loss_is_reported_before_training(tmp_path):
    module = NoLoss()
    cb = LLCCallback(tmp_path, every_n_train_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"NoLoss.training_step cannot be the λ̂ loss: .*"
                       r"pass loss_fn=.* to LLCCallback, or define llc_batch_loss"):
        fit(tmp_path, module, callbacks=[cb])
    assert module.global_step == 0


# -- run store -----------------------------------------------------------------------------------
def test_inline_rows_traces_settings_and_metrics(tmp_path):
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST)
    fit(tmp_path, TinyWithVal, callbacks=[cb], max_steps=8, val_check_interval=4,
        num_sanity_val_steps=2)
    run = load_run(tmp_path / "run")
    assert run.llc["step"].tolist() == [0, 4, 8]
    for col in ("llc_mean", "llc_std", "init_loss", "mala_acceptance", "nbeta", "step_size"):
        assert run.llc[col].notna().all(), col
    assert run.llc["nbeta"].tolist() == pytest.approx([64 / np.log(64)] * 3)
    assert (run.llc["num_chains"] == 2).all() and (run.llc["status"] == "ok").all()
    assert run.trace(4).shape == (2, 10)
    assert run.settings["num_chains"] == 2 and run.settings["mode"] == "inline"
    assert run.meta["module"] == "llc_models:TinyWithVal" and run.meta["hparams"]["width"] == 8
    # The loss of the batch that starts at step s is recorded at s (as the loggers do).
    m = run.metrics.set_index("step")
    assert sorted(m["train_loss"].dropna().index) == list(range(8))
    # val_loss: at the validation runs after steps 4 and 8, never from sanity checking.
    assert sorted(m["val_loss"].dropna().index) == [4, 8]


def test_training_metrics_match_what_the_module_logged(tmp_path):
    seen = {}

    class Spy(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen[trainer.global_step - 1] = float(outputs["loss"])

    cb = LLCCallback(tmp_path, every_n_train_steps=100, mode="deferred", progress=False)
    fit(tmp_path, callbacks=[cb, Spy()], max_steps=6)
    m = load_run(tmp_path).metrics.set_index("step")["train_loss"]
    assert m.to_dict() == pytest.approx(seen)


def test_llc_batch_loss_and_self_log_inside_it_is_dropped(tmp_path):
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST)
    logger = pl.loggers.CSVLogger(tmp_path / "logs")
    fit(tmp_path, DictBatches, callbacks=[cb], max_steps=4, logger=logger)
    run = load_run(tmp_path / "run")
    assert run.llc["step"].tolist() == [0, 4] and (run.llc["status"] == "ok").all()
    assert run.meta["loss"] == {"kind": "module_llc_batch_loss"}
    logged = pd.read_csv(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv")
    assert "leaked_from_llc" not in logged.columns and "llc/mean" in logged.columns
    assert "leaked_from_llc" not in run.metrics.columns


def test_explicit_data_and_loss_override_the_module(tmp_path):
    x, y = regression_data(40, seed=3)
    calls = []

    def half_mse(out, target):
        calls.append(len(out))
        return 0.5 * nn.functional.mse_loss(out, target)

    cb = LLCCallback(tmp_path, steps=[2], include_init=False, data=(x, y), loss_fn=half_mse,
                     progress=False, **FAST)
    fit(tmp_path, callbacks=[cb], max_steps=2)
    run = load_run(tmp_path)
    assert run.llc["step"].tolist() == [2]
    assert run.llc["nbeta"].iloc[0] == pytest.approx(40 / np.log(40))
    assert calls and max(calls) <= 32
    # A local function cannot be imported by `devinterp estimate`: the run says so.
    assert run.meta["loss"]["kind"] == "unrecorded" and "the loss" in run.meta["missing"]


def test_non_finite_training_loss_marks_the_row_and_training_continues(tmp_path):
    cb = LLCCallback(tmp_path, every_n_train_steps=2, progress=False, **FAST)
    module = Tiny(nan_at_step=3)  # the batch starting at step 3 ends at step 4
    fit(tmp_path, module, callbacks=[cb], max_steps=6)
    table = load_run(tmp_path).llc.set_index("step")
    assert list(table.index) == [0, 2, 4, 6]
    assert (table.loc[[0, 2], "status"] == "ok").all()
    assert table.loc[4, "status"] == "failed"
    assert "non-finite training loss" in table.loc[4, "reason"]
    assert table.loc[6, "status"] == "failed" and "non-finite" in table.loc[6, "reason"]
    assert module.global_step == 6


def test_non_finite_weights_mark_the_row(tmp_path):
    model = nn.Linear(4, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    row = track_llc(model, 5, tmp_path, data=regression_data(16), loss_fn=nn.MSELoss(), **FAST)
    assert row["status"] == "failed" and row["reason"] == "non-finite weights at this step"
    assert load_run(tmp_path).llc["status"].tolist() == ["failed"]


def test_all_chains_diverged_marks_the_row_and_training_continues(tmp_path):
    settings = {**FAST, "step_size": 10.0, "nbeta": 1e6, "sampler": "sgld"}
    cb = LLCCallback(tmp_path, every_n_train_steps=4, progress=False, **settings)
    module = Tiny()
    fit(tmp_path, module, callbacks=[cb], max_steps=4)
    table = load_run(tmp_path).llc
    assert table["step"].tolist() == [0, 4] and (table["status"] == "failed").all()
    assert table["reason"].str.contains("diverged").all() and table["llc_mean"].isna().all()
    assert module.global_step == 4


def test_progress_is_one_line_per_estimate(tmp_path, capsys):
    cb = LLCCallback(tmp_path, every_n_train_steps=4, **FAST)
    fit(tmp_path, callbacks=[cb], max_steps=8)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LLC step")]
    assert [ln.split(":")[0] for ln in lines] == ["LLC step 0", "LLC step 4", "LLC step 8"]
    assert all("2 chains × 10 draws" in ln for ln in lines)


# -- resume --------------------------------------------------------------------------------------
class Crash(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("module_class", [Tiny, Regressor])
def test_resume_after_crash_gives_the_uninterrupted_table(tmp_path, module_class):
    def callbacks(run_dir, ckpt_dir, crash=None):
        cbs = [LLCCallback(run_dir, every_n_train_steps=3, progress=False, **FAST),
               ModelCheckpoint(ckpt_dir, every_n_train_steps=4, save_top_k=-1)]
        return cbs + ([Crash(crash)] if crash else [])

    common = dict(max_steps=10, enable_checkpointing=True)

    def module():
        return module_class(shuffle=False)

    fit(tmp_path, module, callbacks=callbacks(tmp_path / "ref", tmp_path / "c0"), **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, module, callbacks=callbacks(tmp_path / "run", tmp_path / "c1", crash=7),
            **common)
    crashed = load_run(tmp_path / "run").llc["step"].tolist()
    assert crashed == [0, 3, 6]
    fit(tmp_path, module, callbacks=callbacks(tmp_path / "run", tmp_path / "c1"),
        ckpt_path=str(tmp_path / "c1" / "epoch=0-step=4.ckpt"), **common)
    ref, run = load_run(tmp_path / "ref"), load_run(tmp_path / "run")
    assert run.llc["step"].tolist() == [0, 3, 6, 9]
    pd.testing.assert_frame_equal(run.llc, ref.llc)
    assert run.metrics["step"].is_unique
    pd.testing.assert_frame_equal(run.metrics, ref.metrics)


def test_state_dict_round_trip_keeps_done_steps_and_directory(tmp_path):
    cb = LLCCallback(every_n_train_steps=2, mode="deferred", progress=False)
    fit(tmp_path, callbacks=[cb], max_steps=4)
    state = cb.state_dict()
    assert state["done_steps"] == [0, 2, 4] and state["module"] == "llc_models:Tiny"
    fresh = LLCCallback(every_n_train_steps=2, mode="deferred", progress=False)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["done_steps"] == [0, 2, 4]
    assert fresh.store.path == cb.store.path == tmp_path / "llc"
    assert fresh.state_key == cb.state_key
    assert LLCCallback(every_n_train_steps=3).state_key != cb.state_key


# -- without the Trainer -------------------------------------------------------------------------
def test_track_llc_in_a_plain_loop_leaves_training_untouched(tmp_path):
    x, y = regression_data(64)

    def train(track: bool) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        schedule = Schedule(every_n_steps=3, max_steps=6)
        for step in range(7):
            if track and step in schedule:
                track_llc(model, step, tmp_path, data=(x, y), loss_fn=nn.MSELoss(), **FAST)
            if step < 6:
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
        return model.state_dict()

    ref, tracked = train(False), train(True)
    assert all(torch.equal(ref[k], tracked[k]) for k in ref)
    run = load_run(tmp_path)
    assert run.llc["step"].tolist() == [0, 3, 6] and sorted(run.snapshots) == [0, 3, 6]
    assert (run.llc["status"] == "ok").all() and run.settings["num_chains"] == 2


def test_track_llc_refuses_a_bad_option_before_writing_anything(tmp_path):
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="num_draws must be an integer >= 2 or auto, got 1"):
        track_llc(model, 0, tmp_path / "run", data=regression_data(16), loss_fn=nn.MSELoss(),
                  num_draws=1)
    with pytest.raises(ValueError, match=r"unknown sampler options \['num_chain'\]"):
        track_llc(model, 0, tmp_path / "run", data=regression_data(16), loss_fn=nn.MSELoss(),
                  num_chain=2)
    assert not (tmp_path / "run").exists()


def test_schedule_membership():
    s = Schedule(every_n_steps=5, steps=(3,), log_spaced=3, max_steps=100)
    assert [t for t in range(101) if t in s] == sorted({0, 1, 3, 10, 100} | set(range(5, 101, 5)))
    assert 7 not in s and -5 not in s and "3" not in s
    assert Schedule(steps=(7,), include_init=False).planned(10) == [7]
    with pytest.raises(ValueError, match="empty"):
        Schedule(include_init=False)
    assert Schedule(steps=(50, 5), max_steps=10).beyond(10) == [50]


def test_built_from_yaml_like_lightning_cli_with_every_argument_documented():
    parser = ArgumentParser()
    parser.add_class_arguments(LLCCallback, "llc")
    cfg = parser.parse_string(
        "llc:\n  dirpath: runs/x\n  log_spaced: 100\n  every_n_train_steps: 1000\n"
        "  mode: deferred\n  step_size: auto\n  num_chains: 4\n"
        "  loss_fn: torch.nn.functional.mse_loss\n"
    )
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    cb = build(cfg).llc
    assert isinstance(cb, LLCCallback) and cb.mode == "deferred" and cb.log_spaced == 100
    assert cb.options["num_chains"] == 4 and cb.loss_fn is nn.functional.mse_loss
    documented = {p.arg_name for p in docstring_parser.parse(LLCCallback.__doc__).params}
    assert documented == set(inspect.signature(LLCCallback).parameters)


def test_module_loss_convention_is_one_function():
    """llc_batch_loss wins over loss_fn, unless the run recorded that it sampled with loss_fn;
    neither (and no training_step): an error naming what to add. The full order, training_step
    included, is in tests/test_training_step_loss.py."""
    from devinterp.tracking import LossSpec, module_loss

    class Both(nn.Module):
        loss_fn = staticmethod(nn.functional.mse_loss)

        def llc_batch_loss(self, forward, batch):
            return forward(batch[0]).sum()

    both = Both()
    assert module_loss(both) == LossSpec("module_llc_batch_loss", batch_loss=both.llc_batch_loss)
    assert module_loss(both, recorded="module_loss_fn") == LossSpec(
        "module_loss_fn", loss_fn=nn.functional.mse_loss)
    with pytest.raises(ValueError, match="^Linear has no loss for λ̂"):
        module_loss(nn.Linear(2, 1))


@pytest.mark.slow  # a fresh interpreter importing torch
def test_track_llc_and_the_fabric_names_never_import_lightning():
    """devinterp.tracking imports LLCCallback (and so Lightning) only when it is asked for."""
    code = ("import sys; from devinterp.tracking import Schedule, track_llc; "
            "from devinterp.tracking import record_result; import devinterp.tracking as t; "
            "before = 'lightning.pytorch' in sys.modules; t.LLCCallback; "
            "print(before, 'lightning.pytorch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["False", "True"], out.stderr
