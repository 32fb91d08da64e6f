"""Run-level calibration: one ε for every checkpoint of a run, inline and post-hoc, lowered
(and marked) where a checkpoint fails with it."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from llc_models import Tiny, regression_data, trainer
from torch.utils.data import TensorDataset

from devinterp import LLCCallback, estimate_llc, load_run
from devinterp.dashboard.figures import llc_figure
from devinterp.llc import calibrate_step_size
from devinterp.run.estimate import estimate_run
from devinterp.run.store import CALIBRATION_FILE, RunStore
from devinterp.tracking import EstimateFailure
from devinterp.tracking.calibration import MALA_FLOOR, RunCalibration, early_and_last

#: Small chains, and no step size: the run chooses it.
SMALL = {"num_chains": 2, "num_draws": 40, "batch_size": 32}


def fit(tmp_path, callbacks=(), max_steps=60) -> Tiny:
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    trainer(tmp_path, callbacks, max_steps=max_steps).fit(module)
    return module


def at_snapshot(run, step) -> Tiny:
    model = Tiny()
    model.load_state_dict(torch.load(run.snapshots[step], weights_only=True))
    return model


def entry_of(run) -> dict:
    (entry,) = run.calibration.values()
    return entry


def test_inline_run_holds_the_step_chosen_at_the_first_checkpoint_near_a_minimum(tmp_path):
    fit(tmp_path, [LLCCallback(tmp_path / "run", every_n_train_steps=10, progress=False,
                               **SMALL)])
    run = load_run(tmp_path / "run")
    entry = entry_of(run)
    assert list(run.llc["step"]) == [0, 10, 20, 30, 40, 50, 60]
    assert (run.llc["status"] == "ok").all() and (run.llc["calibration"] == "run").all()
    # One ε and one nβ on every row, the ones calibration.json holds.
    assert (run.llc["step_size"] == entry["step_size"]).all()
    assert (run.llc["nbeta"] == entry["nbeta"]).all()
    # Tried at the 1st, 2nd, 4th ... waiting checkpoint; held at the first near a minimum.
    (chosen,) = entry["calibrated_on"]
    tried = [a["step"] for a in entry["attempts"]] + [chosen["step"]]
    assert tried == [0, 10, 30][:len(tried)] and chosen["near_minimum"]
    assert not any(a["near_minimum"] for a in entry["attempts"])
    assert entry["rule"] == "first checkpoint near a minimum"
    # The ε is calibrate_step_size's at that checkpoint's weights.
    model = at_snapshot(run, chosen["step"])
    data = TensorDataset(*regression_data(64))  # Tiny's training data
    again = calibrate_step_size(model, data, torch.nn.functional.mse_loss, **SMALL)
    assert again["step_size"] == pytest.approx(entry["step_size"], rel=1e-6)
    # A checkpoint that waited (step 0) is estimated from its snapshot, exactly as a direct call.
    direct = estimate_llc(at_snapshot(run, 0), data, torch.nn.functional.mse_loss, **SMALL,
                          step_size=entry["step_size"], nbeta=entry["nbeta"], progress=False)
    assert run.llc["llc_mean"].iloc[0] == pytest.approx(direct.llc_mean, rel=1e-6)


def test_waiting_and_backfilled_checkpoints_leave_training_untouched(tmp_path):
    plain = fit(tmp_path / "plain")
    tracked = fit(tmp_path / "tracked", [LLCCallback(tmp_path / "run", every_n_train_steps=10,
                                                     progress=False, **SMALL)])
    assert load_run(tmp_path / "run").calibration  # the run was calibrated and backfilled
    for (k, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k


def test_posthoc_calibrates_on_an_early_and_the_last_checkpoint_first(tmp_path):
    fit(tmp_path, [LLCCallback(tmp_path / "run", every_n_train_steps=10, mode="deferred",
                               progress=False)])
    report = estimate_run(tmp_path / "run", progress=False, **SMALL)
    run = load_run(tmp_path / "run")
    entry = entry_of(run)
    assert report.estimated == [0, 10, 20, 30, 40, 50, 60]
    assert [c["step"] for c in entry["calibrated_on"]] == early_and_last(run.snapshots) == [10, 60]
    assert entry["step_size"] == min(c["step_size"] for c in entry["calibrated_on"])
    data = TensorDataset(*regression_data(64))  # what data.pt holds: Tiny's training data
    for step in (10, 60):
        eps = calibrate_step_size(at_snapshot(run, step), data, torch.nn.functional.mse_loss,
                                  **SMALL)["step_size"]
        assert eps == pytest.approx(
            next(c["step_size"] for c in entry["calibrated_on"] if c["step"] == step), rel=1e-6)
    assert (run.llc["step_size"] == entry["step_size"]).all()
    assert (run.llc["calibration"] == "run").all()
    # Every row is its own snapshot's estimate at the run's settings (calibrating on other
    # snapshots first must not leave their weights in the model).
    for step in (0, 30):
        direct = estimate_llc(at_snapshot(run, step), data, torch.nn.functional.mse_loss,
                              **SMALL, step_size=entry["step_size"], nbeta=entry["nbeta"],
                              progress=False)
        assert run.llc.set_index("step").loc[step, "llc_mean"] == pytest.approx(
            direct.llc_mean, rel=1e-6)
    # A second call reuses the settings; --force chooses them again, and gets the same.
    first = run.llc["llc_mean"].to_numpy()
    estimate_run(tmp_path / "run", progress=False, force=True, **SMALL)
    np.testing.assert_allclose(load_run(tmp_path / "run").llc["llc_mean"], first, rtol=1e-6)


def test_a_checkpoint_that_fails_with_the_run_step_lowers_it_from_then_on(tmp_path):
    fit(tmp_path, [LLCCallback(tmp_path / "run", every_n_train_steps=20, mode="deferred",
                               progress=False)])
    store = RunStore(tmp_path / "run")
    cal = RunCalibration(store, SMALL)
    # A run step far too large (as if calibration had missed the stiffest checkpoint).
    cal.fix({60: {"step_size": 0.4, "nbeta": 15.0, "near_minimum": True}}, "test")
    estimate_run(tmp_path / "run", progress=False, **SMALL)
    run = load_run(tmp_path / "run")
    entry = entry_of(run)
    assert entry["changes"], "a diverging step must lower ε"
    first = entry["changes"][0]["step"]
    assert entry["changes"][0]["from"] == 0.4
    before = run.llc[run.llc["step"] < first]
    assert (before["step_size"] == 0.4).all() and (before["calibration"] == "run").all()
    for c in entry["changes"]:
        assert c["to"] == c["from"] / 2 and c["reason"]
    eps = entry["step_size"]
    assert eps == 0.4 / 2 ** len(entry["changes"])
    later = run.llc[run.llc["step"] > max(c["step"] for c in entry["changes"])]
    assert (later["step_size"] == eps).all() and (later["calibration"] == "run").all()
    assert set(run.llc.loc[run.llc["step"].isin([c["step"] for c in entry["changes"]]),
                           "calibration"]) == {"lowered"}
    # The dashboard marks where ε changed.
    fig = llc_figure([run], ["run"])
    marks = [s for s in fig["layout"]["shapes"] if s.get("name", "").startswith("step-size:")]
    assert [m["x0"] - 1 for m in marks] == sorted(c["step"] for c in entry["changes"])


def test_given_step_size_is_not_calibrated(tmp_path):
    fit(tmp_path, [LLCCallback(tmp_path / "run", every_n_train_steps=30, progress=False,
                               step_size=1e-3, **SMALL)])
    run = load_run(tmp_path / "run")
    assert not (tmp_path / "run" / CALIBRATION_FILE).exists()
    assert (run.llc["step_size"] == 1e-3).all()
    # "auto", asked for: chosen at every checkpoint, as estimate_llc chooses it per call.
    fit(tmp_path, [LLCCallback(tmp_path / "auto", every_n_train_steps=30, progress=False,
                               step_size="auto", **SMALL)])
    auto = load_run(tmp_path / "auto")
    assert not (tmp_path / "auto" / CALIBRATION_FILE).exists()
    assert auto.llc["step_size"].nunique() == 3


def test_training_that_never_nears_a_minimum_is_calibrated_on_its_last_checkpoint(tmp_path):
    fit(tmp_path, [LLCCallback(tmp_path / "run", steps=[0, 1, 2], progress=False, **SMALL)],
        max_steps=2)
    run = load_run(tmp_path / "run")
    entry = entry_of(run)
    assert list(run.llc["step"]) == [0, 1, 2] and (run.llc["status"] == "ok").all()
    assert (run.llc["step_size"] == entry["step_size"]).all()
    # Two training steps from the initialization: the chains still run downhill everywhere.
    assert entry["rule"] == "last checkpoint (none was near a minimum)"
    assert [a["step"] for a in entry["attempts"]] == [0, 1]
    assert [c["step"] for c in entry["calibrated_on"]] == [2]
    assert not any(a["near_minimum"] for a in entry["attempts"])


def test_early_and_last():
    assert early_and_last([]) == []
    assert early_and_last([5]) == [5]
    assert early_and_last([0, 1, 2, 10, 50, 100]) == [10, 100]
    assert early_and_last([100, 0]) == [100]  # nothing past a tenth but the last itself


class _Result:
    def __init__(self, **diagnostics):
        self.diagnostics = diagnostics


def test_what_counts_as_a_failure_of_the_run_step():
    assert RunCalibration.failure(_Result(num_diverged=0, mala_acceptance=0.95)) is None
    assert "diverged" in RunCalibration.failure(_Result(num_diverged=2, mala_acceptance=0.9))
    assert "MALA" in RunCalibration.failure(_Result(num_diverged=0,
                                                    mala_acceptance=MALA_FLOOR - 0.1))
    assert RunCalibration.failure(EstimateFailure("all chains diverged", diverged=True))
    # A non-finite loss at w* is not the step's fault.
    assert RunCalibration.failure(EstimateFailure("loss at w* is nan")) is None


def test_calibration_file_is_kept_by_settings_id(tmp_path):
    store = RunStore(tmp_path, create=True)
    a, b = RunCalibration(store, SMALL), RunCalibration(store, {**SMALL, "num_draws": 80})
    a.fix({1: {"step_size": 0.01, "nbeta": 3.0}}, "test")
    b.fix({1: {"step_size": 0.02, "nbeta": 3.0}}, "test")
    doc = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert {doc[a.key]["step_size"], doc[b.key]["step_size"]} == {0.01, 0.02}
    assert RunCalibration(store, SMALL).estimator_options()["step_size"] == 0.01


def test_posthoc_component_curves_use_the_run_step(tmp_path):
    from devinterp.run.estimate import estimate_run_components

    fit(tmp_path, [LLCCallback(tmp_path / "run", every_n_train_steps=20, mode="deferred",
                               progress=False)])
    components = {"first": ["net.0.*"], "last": ["net.2.*"]}
    estimate_run_components(tmp_path / "run", components, **SMALL)
    run = load_run(tmp_path / "run")
    entry = entry_of(run)  # chosen on the whole model's early and last snapshots
    assert [c["step"] for c in entry["calibrated_on"]] == early_and_last(run.snapshots)
    assert (run.components["step_size"] == entry["step_size"]).all()
    assert (run.components["status"] == "ok").all()
    # The λ̂ curve estimated afterwards holds the same step.
    estimate_run(tmp_path / "run", progress=False, **SMALL)
    assert (load_run(tmp_path / "run").llc["step_size"] == entry["step_size"]).all()


def test_a_checkpoint_whose_draws_fall_below_the_baseline_does_not_set_the_run_step(
        tmp_path, monkeypatch):
    """Short pilot chains can miss a slow way down (a saddle at a small initialization): the
    checkpoint's own estimate must confirm it is near a minimum, or the settings are dropped
    and a later checkpoint is tried."""
    real = RunCalibration.probe

    def fooled(self, *args, **kwargs):
        return {**real(self, *args, **kwargs), "near_minimum": True}  # every pilot fooled

    monkeypatch.setattr(RunCalibration, "probe", fooled)
    fit(tmp_path, [LLCCallback(tmp_path / "run", every_n_train_steps=10, progress=False,
                               **SMALL)])
    run = load_run(tmp_path / "run")
    entry = entry_of(run)
    rejected = [a for a in entry["attempts"] if a.get("reason")]
    assert rejected and rejected[0]["step"] == 0  # the initialization is no minimum
    chosen = entry["calibrated_on"][-1]["step"]
    rows = run.llc.set_index("step")
    assert rows.loc[chosen, "frac_below_baseline"] <= 0.3
    assert all(rows.loc[a["step"], "frac_below_baseline"] > 0.3 for a in rejected)
    assert (run.llc["step_size"] == entry["step_size"]).all()
