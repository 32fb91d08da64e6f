"""Stage detection (devinterp.stages) against planted truth (devinterp.synthetic)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import ruptures as rpt

from devinterp.run.store import STAGES_FILE, RunStore, load_run
from devinterp.stages import (
    MAX_POINTS,
    ChangePoints,
    CriticalPoints,
    detect_stages,
    detect_with,
    estimate_noise,
    log_step,
    make_detector,
    relative_sd,
    write_stages,
)
from devinterp.stages.costs import WeightedLinearCost
from devinterp.stages.points import _bin_points, _Points
from devinterp.synthetic import (
    Transition,
    checkpoint_steps,
    in_context_regression_transitions,
    language_model_transitions,
    planted_llc_curve,
    planted_milestones,
    random_transitions,
)

MARGIN = 0.1  # decades of log10(step + 1), as in tools/bench_stages.py


def assert_recovered(stages: list[dict], truth: list[int], types: list[str]) -> None:
    """Same number of stages, every planted milestone within MARGIN, the same types."""
    found = [s["end_step"] for s in stages[:-1]]
    assert len(found) == len(truth), (found, truth)
    err = np.abs(log_step(found) - log_step(truth))
    assert np.all(err <= MARGIN), (found, truth, err)
    assert [s["type"] for s in stages] == types


# -- planted truth -----------------------------------------------------------------------------
def test_planted_milestones_are_critical_points() -> None:
    # A rise then an equal fall: by symmetry the peak is midway in log-step.
    ts = [Transition(99, 5.0, 0.05), Transition(9_999, -5.0, 0.05)]
    bounds, types = planted_milestones(ts, 0, 100_000)
    assert types == ["A", "B"]
    assert abs(float(log_step(bounds[0])) - 3.0) < 1e-3


@pytest.mark.parametrize("noise", [0.0, 0.003])
def test_language_model_curve_recovered(noise: float) -> None:
    curve, truth, types = planted_llc_curve(language_model_transitions(), noise=noise, seed=3)
    assert types == ["A", "A", "B", "A", "A"]
    assert_recovered(detect_stages(curve), truth, types)


def test_in_context_regression_curve_recovered() -> None:
    curve, truth, types = planted_llc_curve(in_context_regression_transitions(),
                                            max_step=500_000, noise=0.001, seed=1)
    assert types == ["A", "A", "B", "B", "A"]
    assert_recovered(detect_stages(curve), truth, types)


def test_shallow_b_stage_recovered() -> None:
    # A fall of 1% of the λ̂ range between two rises, like the paper's stage LM3.
    rng = np.random.default_rng(7)
    ts = random_transitions(rng, shallow_b=True)
    curve, truth, types = planted_llc_curve(ts, noise=0.001, seed=7)
    assert "B" in types
    assert_recovered(detect_stages(curve), truth, types)


def test_irregular_log_spaced_steps() -> None:
    rng = np.random.default_rng(0)
    steps = np.unique(np.round(np.geomspace(1, 50_000, 150)).astype(int))
    steps = np.sort(rng.choice(steps, int(0.7 * len(steps)), replace=False))
    curve, truth, types = planted_llc_curve(language_model_transitions()[:2], steps=steps,
                                            noise=0.002, seed=0)
    assert_recovered(detect_stages(curve), truth, types)


def test_pelt_recovers_well_separated_transitions() -> None:
    ts = [Transition(300, 5.0, 0.09), Transition(2_000, -4.0, 0.09),
          Transition(13_000, 6.0, 0.09)]
    curve, truth, types = planted_llc_curve(ts, noise=0.002, seed=2)
    assert types == ["A", "B", "A"]
    for method in ("pelt", "binseg"):
        assert_recovered(detect_stages(curve, method=method), truth, types)


def test_pelt_on_llc_and_loss_jointly() -> None:
    """joint=True: ruptures segments λ̂ and the loss together (the planted loss falls where λ̂
    rises); the milestones are still λ̂'s, and a missing loss is named."""
    ts = [Transition(300, 5.0, 0.09), Transition(2_000, -4.0, 0.09),
          Transition(13_000, 6.0, 0.09)]
    curve, truth, types = planted_llc_curve(ts, noise=0.002, seed=2)
    for method in ("pelt", "binseg"):
        assert_recovered(detect_stages(curve, method=method, joint=True), truth, types)
    with pytest.raises(ValueError, match=r"loss is unknown at 3 of \d+ checkpoints"):
        detect_stages(curve.assign(loss=curve["loss"].where(curve.index > 2)), method="pelt",
                      joint=True)
    with pytest.raises(ValueError, match="joint=True .* works with method 'pelt' or 'binseg'"):
        detect_stages(curve, joint=True)


# -- flat curves, NaN rows, input checks ------------------------------------------------------
@pytest.mark.parametrize("method", ["critical", "pelt"])
def test_flat_curve_is_one_stage(method: str) -> None:
    steps = checkpoint_steps(10_000)
    const = pd.DataFrame({"step": steps, "llc_mean": 3.0})
    stages = detect_stages(const, method=method)
    assert len(stages) == 1 and stages[0]["llc_change"] == 0.0
    assert (stages[0]["start_step"], stages[0]["end_step"]) == (0, 10_000)
    rng = np.random.default_rng(0)
    noisy = const.assign(llc_mean=3.0 + 0.05 * rng.standard_normal(len(steps)), llc_std=0.14)
    assert len(detect_stages(noisy, method=method)) == 1


# The quickstart's λ̂ curve (configs/quickstart.yaml, rounded): a rise in two steps, then a plateau
# that drifts down by ~2% of the range and wobbles up once between the last two checkpoints.
QUICKSTART = pd.DataFrame({
    "step": [0, 1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 63, 83, 109, 144, 190, 250, 330,
             434, 572, 754, 994, 1310, 1727, 2276, 3000],
    "llc_mean": [-2.838, -1.167, 0.214, 1.0, 1.669, 2.182, 2.791, 3.213, 3.571, 3.829, 3.969,
                 4.06, 4.201, 4.28, 4.33, 4.381, 4.438, 4.5, 4.796, 5.753, 7.476, 8.44, 8.447,
                 8.316, 8.315, 8.296, 8.226, 8.171, 8.237],
    "llc_std": [0.463, 0.561, 0.642, 0.692, 0.754, 0.796, 0.817, 0.817, 0.829, 0.772, 0.767,
                0.819, 0.804, 0.826, 0.828, 0.805, 0.805, 0.76, 0.851, 1.305, 2.015, 2.364, 2.235,
                1.977, 2.01, 1.972, 1.874, 1.793, 1.888],
})


def test_no_last_stage_on_one_interval() -> None:
    """The last interval alone (2276 -> 3000) is no stage: the smoothed slope is least
    constrained at the end of the curve; with min_stage_checkpoints=2 it used to be one.
    (min_change_se=0: the rule on its own, without the error-bar floor.)"""
    ends = [s["end_step"] for s in detect_stages(QUICKSTART, min_change_se=0)]
    assert ends == [109, 434, 3000]
    loose = [s["end_step"] for s in detect_stages(QUICKSTART, min_stage_checkpoints=2,
                                                  min_change_se=0)]
    assert loose[-2:] == [2276, 3000]
    with pytest.raises(ValueError, match="min_stage_checkpoints must be an integer >= 2"):
        detect_stages(QUICKSTART, min_stage_checkpoints=1)


def test_a_drift_within_one_standard_error_is_no_stage() -> None:
    """With the number of chains known (a run directory records it), the quickstart plateau's
    drift of -0.2 is under one standard error of an estimate (llc_std / sqrt(4) ≈ 0.9): no
    stage. The curve is smooth because every checkpoint used the same seed, which is why the
    GP alone calls it significant."""
    ends = [s["end_step"] for s in detect_stages(QUICKSTART.assign(num_chains=4))]
    assert ends == [109, 3000]
    ends = [s["end_step"] for s in detect_stages(QUICKSTART.assign(num_chains=4),
                                                 min_change_se=0)]
    assert ends == [109, 434, 3000]
    # README's columns only (step, llc_mean, llc_std): llc_std itself is the error bar, and
    # the drift of -0.2 against llc_std ≈ 1.9 is no stage either.
    assert [s["end_step"] for s in detect_stages(QUICKSTART)] == [109, 3000]
    with pytest.raises(ValueError, match="min_change_se must be >= 0"):
        detect_stages(QUICKSTART, min_change_se=-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fall_within_llc_std_is_no_stage_without_num_chains(seed: int) -> None:
    """Planted: a rise of 10, then a fall of 0.3 on a curve that is smoother than its error
    bars (llc_std ≈ 0.5, the noise on llc_mean ≈ 0.03: what estimates with one seed at every
    checkpoint look like). With the README's columns alone the fall is under one llc_std: no
    stage, though the GP alone finds it. A fall of three llc_std is found."""
    def curve(fall: float) -> pd.DataFrame:
        ts = [Transition(300, 10.0, 0.08), Transition(3_000, -fall, 0.08)]
        c, truth, types = planted_llc_curve(ts, noise=0.002, seed=seed)
        assert types == ["A", "B"]
        return c.drop(columns=["num_chains"]).assign(llc_std=7 * c["llc_std"]), truth

    small, _ = curve(0.3)
    assert 0.3 < small["llc_std"].median() < 0.6
    assert [s["type"] for s in detect_stages(small, min_change_se=0)] == ["A", "B"]
    assert [s["type"] for s in detect_stages(small)] == ["A"]
    large, truth = curve(1.5)
    assert_recovered(detect_stages(large), truth, ["A", "B"])


# -- long curves: binned in log-step, bounded memory ---------------------------------------------
def test_bin_points_keeps_the_ends_and_averages_with_the_right_noise() -> None:
    steps = np.arange(0, 10_001)
    x = log_step(steps)
    y = np.where(steps < 5_000, 1.0, 3.0)
    rel = np.ones(len(steps))
    pts = _bin_points(_Points(steps, x, y, rel, np.full(len(steps), 0.5), None), 50)
    assert len(pts.x) <= 50
    assert pts.steps[0] == 0 and pts.steps[-1] == 10_000  # the ends, exactly
    assert np.all(np.diff(pts.steps) > 0) and np.all(np.isin(pts.steps, steps))
    assert np.all(np.diff(pts.x) > 0)
    # Bins wholly on one side of the jump average to its level; a bin of k points has 1/sqrt(k)
    # of a point's noise, and a single estimate's standard error is kept as it is.
    width = (x[-1] - x[0]) / 48
    counts = np.histogram(x[1:-1], bins=np.linspace(x[0], x[-1], 49))[0]
    counts = np.r_[1, counts[counts > 0], 1]
    assert np.allclose(pts.rel_sd, 1 / np.sqrt(counts))
    assert np.allclose(pts.standard_errors, 0.5)
    pure = np.abs(pts.x - x[5_000]) > width
    assert set(np.round(pts.y[pure], 12)) == {1.0, 3.0}
    # Each point sits at its bin's mean log-step, represented by the checkpoint nearest to it.
    assert np.all(np.abs(log_step(pts.steps) - pts.x) <= width / 2 + 1e-12)


def test_a_long_curve_binned_gives_the_stages_of_the_full_curve() -> None:
    steps = np.unique(np.r_[np.round(np.geomspace(1, 50_000, 200)),
                            np.arange(0, 50_001, 50)]).astype(np.int64)
    curve, truth, types = planted_llc_curve(language_model_transitions(), steps=steps,
                                            noise=0.003, seed=0)
    assert len(curve) > 1_000
    binned, full = CriticalPoints(max_points=300), CriticalPoints(max_points=None)
    stages_binned, stages_full = detect_with(curve, binned), detect_with(curve, full)
    assert len(binned.points_.x) <= 300 and len(full.points_.x) == len(curve)
    assert_recovered(stages_binned, truth, types)
    assert_recovered(stages_full, truth, types)
    ends_binned = [s["end_step"] for s in stages_binned]
    ends_full = [s["end_step"] for s in stages_full]
    assert np.all(np.abs(log_step(ends_binned) - log_step(ends_full)) <= 0.05)


def test_100k_checkpoints_run_binned_and_find_the_planted_stages() -> None:
    curve, truth, types = planted_llc_curve(language_model_transitions(),
                                            steps=np.arange(100_000), noise=0.003, seed=0)
    det = make_detector("auto")
    stages = detect_with(curve, det)
    assert len(det.points_.x) <= MAX_POINTS
    assert_recovered(stages, truth, types)
    assert stages[0]["start_step"] == 0 and stages[-1]["end_step"] == 99_999
    with pytest.raises(ValueError, match="max_points must be an integer >= 10 or None"):
        detect_stages(curve, max_points=5)


def test_nan_rows_are_skipped_and_reported() -> None:
    curve, truth, types = planted_llc_curve(language_model_transitions(), noise=0.001, seed=0)
    curve.loc[[3, 60, 120], "llc_mean"] = np.nan
    nan_steps = curve["step"][[3, 60, 120]].tolist()
    with pytest.warns(UserWarning, match="skipped 3 checkpoint") as record:
        stages = detect_stages(curve)
    assert all(str(s) in str(record[0].message) for s in nan_steps)
    assert_recovered(stages, truth, types)


def test_too_few_checkpoints() -> None:
    curve = pd.DataFrame({"step": [0, 10, 100, 1000, 5000, 9000],
                          "llc_mean": [1.0, 2.0, np.nan, np.nan, 3.0, 3.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="4 checkpoint.*2 NaN skipped.*at least 5"):
            detect_stages(curve)


def test_bad_input_messages(tmp_path) -> None:
    with pytest.raises(ValueError, match="no column llc_mean.*needs columns step, llc_mean"):
        detect_stages(pd.DataFrame({"step": [1, 2, 3], "llc": [1, 2, 3]}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_stages(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="duplicate steps"):
        detect_stages(pd.DataFrame({"step": [0, 1, 1, 2, 3, 4], "llc_mean": np.arange(6.0)}))
    with pytest.raises(ValueError, match="no llc.csv"):
        detect_stages(RunStore(tmp_path / "empty", create=True).path)
    with pytest.raises(ValueError, match="unknown stage method 'gp'"):
        detect_stages(pd.DataFrame({"step": range(9), "llc_mean": 1.0}), method="gp")


# -- stage dicts, uncertainty, run directories ------------------------------------------------
def test_stage_dicts_are_consistent() -> None:
    curve, truth, _ = planted_llc_curve(language_model_transitions(), noise=0.003, seed=5)
    stages = detect_stages(curve)
    for prev, cur in zip(stages[:-1], stages[1:], strict=True):
        assert cur["start_step"] == prev["end_step"]
        assert (cur["start_step_low"], cur["start_step_high"]) == (
            prev["end_step_low"], prev["end_step_high"])
    for s in stages:
        assert s["end_step_low"] <= s["end_step"] <= s["end_step_high"]
        assert s["type"] == ("A" if s["llc_change"] >= 0 else "B")
        assert math.isclose(s["llc_change"], s["llc_end"] - s["llc_start"])
        # The planted loss falls where λ̂ rises.
        assert (s["loss_change"] < 0) == (s["llc_change"] > 0)
    assert stages[-1]["end_step_low"] == stages[-1]["end_step_high"] == 50_000
    # The ranges are 5%-95% intervals: most cover their planted milestone.
    covered = [s["end_step_low"] <= t <= s["end_step_high"]
               for s, t in zip(stages[:-1], truth, strict=True)]
    assert sum(covered) >= 3, (stages, truth)


def test_run_directory_and_write_stages(tmp_path) -> None:
    curve, truth, types = planted_llc_curve(language_model_transitions(), noise=0.002, seed=4)
    store = RunStore(tmp_path / "run", create=True)
    for row in curve[["step", "llc_mean", "llc_std"]].to_dict("records"):
        store.write_llc_row(row)
    # Metrics logged every 50 steps, with a loss column the detector must find by name.
    steps = np.arange(0, 50_001, 50)
    loss = 3.0 - np.interp(log_step(steps), log_step(curve["step"]), curve["llc_mean"]) / 60
    store.write_metrics([{"step": int(s), "train_loss": float(v), "val_acc": 0.5}
                         for s, v in zip(steps, loss, strict=True)])
    for source in (store.path, load_run(store.path)):
        stages = detect_stages(source)
        assert_recovered(stages, truth, types)
        assert all(s["loss_change"] is not None for s in stages)
        assert all((s["loss_change"] < 0) == (s["type"] == "A") for s in stages)
    write_stages(store.path, stages, method="critical", params={"min_stage_length": 0.05})
    doc = store.read_json(STAGES_FILE)
    assert doc["method"] == "critical" and doc["params"] == {"min_stage_length": 0.05}
    assert load_run(store.path).stages == stages


def test_loss_is_optional() -> None:
    curve, _, _ = planted_llc_curve(language_model_transitions(), noise=0.002, seed=0)
    stages = detect_stages(curve.drop(columns=["loss", "llc_std"]))
    assert all(s["loss_change"] is None for s in stages)


# -- detectors, noise, the ruptures cost ---------------------------------------------------------
def test_detectors_speak_ruptures_verbs() -> None:
    curve, truth, _ = planted_llc_curve(language_model_transitions(), noise=0.002, seed=1)
    args = (curve["step"], curve["llc_mean"], curve["llc_std"])
    for det in (CriticalPoints(min_stage_length=0.05), ChangePoints(algorithm="pelt")):
        assert det.fit(*args) is det
        ends = det.predict()
        assert ends[-1] == 50_000 and ends[:-1] == det.boundaries_
        assert len(det.boundary_ranges_) == len(det.boundaries_)
        assert det.fit_predict(*args) == ends
    with pytest.raises(TypeError):
        CriticalPoints(0.05)  # keyword-only, as in ruptures
    with pytest.raises(ValueError, match="plateau_ratio"):
        make_detector("critical", plateau_ratio=2.0)
    assert make_detector("auto").params == CriticalPoints().params


def test_estimate_noise_ignores_trends() -> None:
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 5, 2000))
    rel = np.where(x > 2.5, 2.0, 1.0)
    y = 10 * np.tanh(x - 2) + 0.3 * rel * rng.standard_normal(len(x))
    assert estimate_noise(x, y, rel) == pytest.approx(0.3, rel=0.1)


def test_relative_sd() -> None:
    assert np.array_equal(relative_sd(None, 3), np.ones(3))
    r = relative_sd([1.0, np.nan, 1.0, 0.0, 100.0, 1.0, 1.0], 7, window=5)
    assert np.all(np.isfinite(r)) and r.max() <= 5.0
    assert r[4] == 1.0  # one wild chain-spread estimate does not move its checkpoint's weight


def test_weighted_linear_cost_matches_least_squares() -> None:
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 3, 40))
    y = 2 * x + rng.standard_normal(40)
    w = rng.uniform(0.5, 2, 40)
    cost = WeightedLinearCost().fit(np.column_stack([y, x, w]))
    coef = np.polyfit(x[5:30], y[5:30], 1, w=np.sqrt(w[5:30]))
    rss = float(np.sum(w[5:30] * (y[5:30] - np.polyval(coef, x[5:30])) ** 2))
    assert cost.error(5, 30) == pytest.approx(rss)
    # Noiseless piecewise-linear signal: Pelt recovers the breakpoints exactly.
    x = np.linspace(0, 3, 60)
    y = np.where(x < 1, x, np.where(x < 2, 1.0, 1 - 2 * (x - 2)))
    y = np.where((x >= 1) & (x < 2), 5.0, y)
    cost = WeightedLinearCost().fit(np.column_stack([y, x, np.ones_like(x)]))
    bkps = rpt.Pelt(custom_cost=cost, min_size=3, jump=1).fit(cost.signal).predict(pen=1.0)
    assert bkps == [int(np.argmax(x >= 1)), int(np.argmax(x >= 2)), 60]


def test_every_detector_reads_the_same_stage_rules() -> None:
    """The thresholds are one frozen StageRules, whatever the detector; they are recorded in
    stages.json (``params``) next to each detector's own settings."""
    from dataclasses import FrozenInstanceError, asdict

    from devinterp.stages import StageRules

    rules = StageRules(min_stage_length=0.1, significance=2)
    for det in (CriticalPoints(min_stage_length=0.1, significance=2),
                ChangePoints(algorithm="binseg", min_stage_length=0.1, significance=2)):
        assert det.rules == rules
        assert det.params.items() >= asdict(rules).items()
    assert isinstance(rules.significance, float)
    assert CriticalPoints().params["lengthscale"] is None
    assert ChangePoints().params["algorithm"] == "pelt"
    with pytest.raises(FrozenInstanceError):
        rules.significance = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="min_stage_checkpoints must be an integer >= 2"):
        StageRules(min_stage_checkpoints=1.5)
    with pytest.raises(TypeError):
        StageRules(0.05)  # keyword-only
