"""``LLCCallback(components=...)``: one λ̂ curve per component in the run store's long table,
the same numbers as ``estimate_refined_llc`` at each snapshot, and stages per component."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from llc_models import FAST, Tiny, regression_data, trainer

from devinterp import LLCCallback, estimate_refined_llc, load_run
from devinterp.run.store import COMPONENT_STAGES_FILE, COMPONENTS_FILE, RunStore
from devinterp.tracking.components import write_component_rows

PARTS = {"first": ["net.0.*"], "last": ["net.2.*"]}


def test_the_callback_writes_one_curve_per_component_equal_to_estimate_refined_llc(tmp_path):
    cb = LLCCallback(tmp_path / "run", steps=[2, 4, 6, 8, 10], components=PARTS,
                     progress=False, **FAST)
    pl.seed_everything(0, verbose=False)
    module = Tiny()
    trainer(tmp_path, [cb], max_steps=10).fit(module)
    table = load_run(tmp_path / "run").components
    assert list(table.columns[:4]) == ["component", "step", "llc_mean", "llc_std"]
    assert sorted(set(table["component"])) == ["first", "last"]
    for name in PARTS:
        curve = table[table["component"] == name]
        assert curve["step"].tolist() == [0, 2, 4, 6, 8, 10]
        assert (curve["status"] == "ok").all()
    assert table.loc[table["component"] == "first", "num_sampled_params"].iloc[0] == 40
    # The last row is estimate_refined_llc at the final weights, with the callback's settings.
    last = estimate_refined_llc(module.net, regression_data(64), torch.nn.MSELoss(),
                                components={"first": ["0.*"], "last": ["2.*"]}, **FAST)
    final = table[table["step"] == 10].set_index("component")
    for name, r in zip(PARTS, last.values(), strict=True):
        assert final.loc[name, "llc_mean"] == pytest.approx(r.llc_mean, rel=1e-6)
    # The plain λ̂ curve is still written, and the stages of each component's curve.
    assert load_run(tmp_path / "run").llc["step"].tolist() == [0, 2, 4, 6, 8, 10]
    stages = RunStore(tmp_path / "run").read_json(COMPONENT_STAGES_FILE)
    assert load_run(tmp_path / "run").component_stages == stages
    assert set(stages) == {"first", "last"} and all(isinstance(v, list) for v in stages.values())


def test_bad_components_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        LLCCallback(tmp_path, steps=[1], components=PARTS, weights=["net.0.*"])
    cb = LLCCallback(tmp_path / "run", steps=[1], components={"x": ["head.*"]}, **FAST)
    with pytest.raises(ValueError, match=r"component 'x': weights \['head.\*'\] match no"):
        trainer(tmp_path, [cb], max_steps=2).fit(Tiny())
    cb = LLCCallback(tmp_path / "run2", steps=[1], components="heads", **FAST)
    with pytest.raises(ValueError, match="found no attention heads"):
        trainer(tmp_path, [cb], max_steps=2).fit(Tiny())


def test_rewritten_rows_replace_their_component_and_step_only(tmp_path):
    store = RunStore(tmp_path, create=True)
    write_component_rows(store, [{"component": c, "step": s, "llc_mean": float(s)}
                                 for c in ("a", "b") for s in (0, 1)])
    write_component_rows(store, [{"component": "a", "step": 1, "llc_mean": 9.0}])
    table = store.read_components()
    assert table[["component", "step"]].values.tolist() == [["a", 0], ["a", 1], ["b", 0],
                                                            ["b", 1]]
    np.testing.assert_array_equal(table["llc_mean"], [0.0, 9.0, 0.0, 1.0])
    assert (tmp_path / COMPONENTS_FILE).is_file()


def test_post_hoc_curves_of_a_deferred_run_equal_the_inline_ones(tmp_path):
    from devinterp.tracking.components import estimate_component_curves

    tables = {}
    for mode in ("inline", "deferred"):
        cb = LLCCallback(tmp_path / mode, steps=[3, 6], components=PARTS, mode=mode,
                         progress=False, **FAST)
        pl.seed_everything(0, verbose=False)
        trainer(tmp_path / f"t{mode}", [cb], max_steps=6).fit(Tiny())
        tables[mode] = load_run(tmp_path / mode).components
    assert len(tables["deferred"]) == 0
    store = RunStore(tmp_path / "deferred")
    rows = estimate_component_curves(store, Tiny(), regression_data(64), PARTS,
                                     loss_fn=torch.nn.MSELoss(), options=FAST)
    assert len(rows) == 6
    post = store.read_components()
    assert post[["component", "step"]].values.tolist() == tables["inline"][
        ["component", "step"]].values.tolist()
    np.testing.assert_allclose(post["llc_mean"], tables["inline"]["llc_mean"], rtol=1e-6)
    assert set(store.read_json(COMPONENT_STAGES_FILE)) == {"first", "last"}
    with pytest.raises(ValueError, match=r"no snapshot for steps \[5\]"):
        estimate_component_curves(store, Tiny(), regression_data(64), PARTS,
                                  loss_fn=torch.nn.MSELoss(), options=FAST, steps=[5])
