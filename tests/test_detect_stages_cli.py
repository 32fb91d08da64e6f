"""tools/detect_stages.py and ``devinterp stages``, end to end on a CSV and on a run directory."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from devinterp import cli
from devinterp.run.store import STAGES_FILE, RunStore, load_run
from devinterp.stages import detect_and_write, log_step
from devinterp.synthetic import language_model_transitions, planted_llc_curve

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "detect_stages.py"


def _tool():
    spec = importlib.util.spec_from_file_location("detect_stages_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def planted() -> tuple[pd.DataFrame, list[int], list[str]]:
    return planted_llc_curve(language_model_transitions(), noise=0.002, seed=11)


def _check(stages: list[dict], truth: list[int], types: list[str]) -> None:
    assert [s["type"] for s in stages] == types
    ends = [s["end_step"] for s in stages[:-1]]
    assert np.all(np.abs(log_step(ends) - log_step(truth)) <= 0.1), (ends, truth)


def test_csv_end_to_end_in_a_subprocess(tmp_path, planted) -> None:
    curve, truth, types = planted
    csv = tmp_path / "llc.csv"
    curve.to_csv(csv, index=False)
    out = subprocess.run([sys.executable, str(TOOL), str(csv), "--json"], capture_output=True,
                         text=True, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    _check(json.loads(out.stdout), truth, types)  # stdout is only the JSON list
    out = subprocess.run([sys.executable, str(TOOL), str(csv)], capture_output=True, text=True,
                         cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["stage", "type", "start", "end"] and len(lines) == 6
    assert lines[3].split()[1] == "B"  # the shallow falling stage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llc.csv"]  # nothing written


def test_run_directory_writes_stages_json(tmp_path, planted, capsys) -> None:
    curve, truth, types = planted
    store = RunStore(tmp_path / "run", create=True)
    for row in curve[["step", "llc_mean", "llc_std"]].to_dict("records"):
        store.write_llc_row(row)
    store.write_metrics([{"step": int(s), "loss": float(v)}
                         for s, v in zip(curve["step"], curve["loss"], strict=True)])
    assert _tool().run([str(store.path), "--json", "--min-stage-length", "0.04",
                        "--min-stage-checkpoints", "4", "--min-change-se", "0.5"]) == 0
    captured = capsys.readouterr()
    stages = json.loads(captured.out)
    _check(stages, truth, types)
    assert all(s["loss_change"] is not None for s in stages)
    assert "wrote" in captured.err and STAGES_FILE in captured.err
    doc = store.read_json(STAGES_FILE)
    assert doc["method"] == "critical" and doc["params"]["min_stage_length"] == 0.04
    assert doc["params"]["min_stage_checkpoints"] == 4 and doc["params"]["min_change_se"] == 0.5
    assert load_run(store.path).stages == stages
    # The same through the package's console script, which also writes the run directory.
    (store.path / STAGES_FILE).unlink()
    assert cli.main(["stages", str(store.path), "--method", "pelt"]) == 0
    assert "stage" in capsys.readouterr().out
    assert store.read_json(STAGES_FILE)["method"] == "pelt"
    assert _tool().run([str(store.path), "--no-write", "--json"]) == 0
    assert store.read_json(STAGES_FILE)["method"] == "pelt"
    # Stages found with another method are not replaced unasked: the table, a note, no write.
    capsys.readouterr()
    assert cli.main(["stages", str(store.path)]) == 0
    captured = capsys.readouterr()
    assert "stage" in captured.out and "did not write" in captured.err
    assert "--method pelt" in captured.err and "--force" in captured.err
    assert store.read_json(STAGES_FILE)["method"] == "pelt"
    assert cli.main(["stages", str(store.path), "--force"]) == 0
    assert store.read_json(STAGES_FILE)["method"] == "critical"


def test_nan_rows_reported_on_stderr(tmp_path, planted, capsys) -> None:
    curve, truth, types = planted
    curve = curve.copy()
    curve.loc[[10, 90], "llc_mean"] = np.nan
    csv = tmp_path / "nan.csv"
    curve.to_csv(csv, index=False)
    assert _tool().run([str(csv), "--json"]) == 0
    captured = capsys.readouterr()
    _check(json.loads(captured.out), truth, types)
    steps = curve["step"][[10, 90]].tolist()
    assert f"skipped 2 checkpoint(s) with NaN λ̂ (steps {steps[0]}, {steps[1]})" in captured.err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist; pass a run directory or a CSV"),
    ("no_llc_column", "has no column llc_mean"),
    ("too_few", "stage detection needs at least 5"),
    ("empty_run", "has no llc.csv; estimate λ̂ first"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case: str, message: str) -> None:
    path = tmp_path / f"{case}.csv"
    if case == "no_llc_column":
        pd.DataFrame({"step": [0, 1, 2], "llc": [1.0, 2.0, 3.0]}).to_csv(path, index=False)
    elif case == "too_few":
        pd.DataFrame({"step": [0, 1, 2], "llc_mean": [1.0, 2.0, 3.0]}).to_csv(path, index=False)
    elif case == "empty_run":
        path = RunStore(tmp_path / "run", create=True).path
    assert _tool().run([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detect_stages.py: error: ")
    assert message in lines[0]


def test_constant_curve_is_one_stage(tmp_path, capsys) -> None:
    csv = tmp_path / "flat.csv"
    pd.DataFrame({"step": [0, 10, 100, 1000, 10_000, 100_000], "llc_mean": 2.5}).to_csv(
        csv, index=False)
    assert _tool().run([str(csv), "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)
    assert len(stages) == 1 and stages[0]["start_step"] == 0
    assert stages[0]["end_step"] == 100_000 and stages[0]["llc_change"] == 0.0


def test_joint_llc_and_loss_from_the_command_line(tmp_path, capsys) -> None:
    """--joint reaches the detector (and needs a ruptures method): a loss column missing at some
    checkpoints is named in one line with exit code 2."""
    curve, _, _ = planted_llc_curve(language_model_transitions(), noise=0.002, seed=11)
    csv = tmp_path / "llc.csv"
    curve.to_csv(csv, index=False)
    assert _tool().run([str(csv), "--method", "pelt", "--joint", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["stage"] == 1
    curve.assign(loss=np.nan).to_csv(csv, index=False)
    assert _tool().run([str(csv), "--method", "pelt", "--joint"]) == 2
    assert "loss is unknown at" in capsys.readouterr().err
    assert _tool().run([str(csv), "--joint"]) == 2
    assert "works with method 'pelt' or 'binseg'" in capsys.readouterr().err


def _run_dir(tmp_path, curve: pd.DataFrame) -> RunStore:
    store = RunStore(tmp_path / "run", create=True)
    for row in curve[["step", "llc_mean", "llc_std", "num_chains"]].to_dict("records"):
        store.write_llc_row(row)
    return store


def test_training_stages_are_kept_unless_forced(tmp_path, planted, capsys) -> None:
    """The stages training wrote (detect_and_write, the default method) survive
    `devinterp stages RUN --method pelt` and other settings byte for byte; the same settings
    rewrite them (nothing is lost); --force replaces them; --force with --no-write is refused."""
    curve, truth, types = planted
    store = _run_dir(tmp_path, curve)
    inline = detect_and_write(store.path)
    _check(inline, truth, types)
    path = store.path / STAGES_FILE
    before = path.read_bytes()
    for extra, why in ((["--method", "pelt"], "found with --method critical"),
                       (["--min-stage-length", "0.2"], "found with other settings (min_stage_length=0.05)"),
                       (["--method", "binseg"], "found with --method critical")):
        assert cli.main(["stages", str(store.path), *extra]) == 0
        err = capsys.readouterr().err
        assert f"did not write {path}: it holds stages {why}" in err, err
        assert "add --force to replace them" in err
        assert path.read_bytes() == before
    assert cli.main(["stages", str(store.path), "--json"]) == 0  # the same settings: rewritten
    captured = capsys.readouterr()
    assert "wrote" in captured.err and json.loads(captured.out) == inline
    assert load_run(store.path).stages == inline
    assert cli.main(["stages", str(store.path), "--method", "pelt", "--force"]) == 0
    assert store.read_json(STAGES_FILE)["method"] == "pelt"
    assert cli.main(["stages", str(store.path), "--force", "--no-write"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_bare_list_of_stages_is_kept_unless_forced(tmp_path, planted, capsys) -> None:
    """Early versions wrote stages.json as a bare list (no method): kept too; an empty one is
    nothing to lose."""
    store = _run_dir(tmp_path, planted[0])
    path = store.path / STAGES_FILE
    path.write_text(json.dumps([{"stage": 1, "end_step": 5}]))
    assert cli.main(["stages", str(store.path)]) == 0
    assert "stages that record no method" in capsys.readouterr().err
    assert json.loads(path.read_text()) == [{"stage": 1, "end_step": 5}]
    path.write_text("[]")
    assert cli.main(["stages", str(store.path)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert store.read_json(STAGES_FILE)["method"] == "critical"


def test_threads_reach_the_fit(tmp_path, planted, capsys, monkeypatch) -> None:
    """--threads N sets the BLAS threads of the detector's fit (default 1) and the process's
    pools; an invalid count is one line and exit code 2."""
    import devinterp.stages.base as stages_module
    from devinterp.cli import THREAD_ENV

    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    seen: list[int] = []
    real = stages_module.threadpool_limits

    def spy(limits, user_api=None):
        seen.append(limits)
        return real(limits, user_api=user_api)

    monkeypatch.setattr(stages_module, "threadpool_limits", spy)
    csv = tmp_path / "llc.csv"
    planted[0].to_csv(csv, index=False)
    assert cli.main(["stages", str(csv), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert seen and set(seen) == {1}
    seen.clear()
    from threadpoolctl import threadpool_info, threadpool_limits

    pools = {p["prefix"]: p["num_threads"] for p in threadpool_info()}
    try:
        assert cli.main(["stages", str(csv), "--json", "--threads", "2"]) == 0
    finally:
        threadpool_limits(pools)
    assert set(seen) == {2} and os.environ["OMP_NUM_THREADS"] == "2"
    assert [s["end_step"] for s in json.loads(capsys.readouterr().out)] == [
        s["end_step"] for s in default]
    assert cli.main(["stages", str(csv), "--threads", "0"]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err


def test_the_library_does_not_import_the_command_line() -> None:
    code = ("import sys, devinterp.stages; "
            "print(sorted(m for m in sys.modules if m in ('devinterp.cli', 'devinterp.cli.stages')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
