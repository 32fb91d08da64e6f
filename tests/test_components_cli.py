"""``devinterp estimate RUN --components layers``: a deferred run's component curves, equal to
the ones ``LLCCallback(components="layers")`` writes inline, kept in the run store."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
from llc_models import FAST, Tiny, trainer

from devinterp import LLCCallback, load_run
from devinterp.cli import main as cli_main
from devinterp.components import layers


def component_run(tmp_path, mode: str):
    """Tiny trained 8 steps, λ̂ every 4 steps (0, 4, 8), with per-layer curves."""
    run_dir = tmp_path / mode
    cb = LLCCallback(run_dir, mode=mode, every_n_train_steps=4, components="layers",
                     progress=False, **FAST)
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path / f"t{mode}", [cb], max_steps=8).fit(Tiny())
    return run_dir


def test_estimate_components_of_a_deferred_run_equals_the_inline_curves(tmp_path, capsys):
    inline = load_run(component_run(tmp_path, "inline"))
    deferred = component_run(tmp_path, "deferred")
    assert len(load_run(deferred).components) == 0
    assert cli_main(["estimate", str(deferred), "--components", "layers"]) == 0
    assert "3 steps estimated, 0 with a failed component, 0 already done" in (
        capsys.readouterr().out)
    run = load_run(deferred)
    names = sorted(layers(Tiny()))
    assert len(names) == 2 and sorted(set(run.components["component"])) == names
    for name in names:
        curve = run.components[run.components["component"] == name]
        assert curve["step"].tolist() == sorted(run.snapshots) == [0, 4, 8]
        assert (curve["status"] == "ok").all()
    key = ["component", "step"]
    assert run.components[key].values.tolist() == inline.components[key].values.tolist()
    np.testing.assert_allclose(run.components["llc_mean"], inline.components["llc_mean"],
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(run.components["llc_std"], inline.components["llc_std"],
                               rtol=0, atol=1e-9)
    assert run.component_stages is not None and set(run.component_stages) == set(names)
    # Again: every step is done and skipped, the table unchanged; --force estimates them again.
    table = (deferred / "llc_components.csv").read_bytes()
    assert cli_main(["estimate", str(deferred), "--components", "layers"]) == 0
    assert "0 steps estimated, 0 with a failed component, 3 already done" in (
        capsys.readouterr().out)
    assert (deferred / "llc_components.csv").read_bytes() == table
    assert cli_main(["estimate", str(deferred), "--components", "layers", "--force",
                     "--steps", "4", "--quiet"]) == 0
    np.testing.assert_allclose(load_run(deferred).components["llc_mean"],
                               run.components["llc_mean"], rtol=0, atol=1e-9)
    # The plain λ̂ table is not touched by --components.
    assert len(load_run(deferred).llc) == 0


@pytest.mark.parametrize(("flags", "problem"), [
    (["--components", "head"], "invalid choice: 'head'"),
    (["--components", "heads"], "found no attention heads"),
    (["--components", "layers", "--out", "elsewhere"], "drop --out"),
    (["--components", "layers", "--steps", "5"], r"no snapshot for steps \[5\]"),
])
def test_bad_component_requests_are_one_line_errors(tmp_path, capsys, flags, problem):
    import re

    deferred = component_run(tmp_path, "deferred")
    assert cli_main(["estimate", str(deferred), *flags, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(problem, err), err
    assert not (deferred / "llc_components.csv").exists()
