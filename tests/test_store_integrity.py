"""One λ̂ table never mixes sampler settings, and a row always matches its snapshot: rows carry
``settings_id`` and ``snapshot_sha256``; `devinterp estimate` refuses to mix settings, records
``settings.json`` only with finished rows, re-estimates a rewritten snapshot, and keeps going
past a snapshot without a finite loss. Bad options fail up front, in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from llc_models import FAST, Tiny, trainer

import devinterp.run.estimate
from devinterp import LLCCallback, load_run
from devinterp.cli import main as cli_main
from devinterp.run.estimate import estimate_run
from devinterp.run.store import (
    ESTIMATOR_DEFAULTS,
    LLC_FILE,
    SETTINGS_FILE,
    SETTINGS_ID_KEYS,
    MixedSettingsError,
    RunStore,
    file_sha256,
    settings_id,
)

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def deferred(tmp_path_factory) -> Path:
    """A deferred run of Tiny with snapshots at steps 0, 2, 4, 6, 8 (trained once)."""
    root = tmp_path_factory.mktemp("deferred")
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(root / "run", every_n_train_steps=2, mode="deferred", progress=False,
                     **FAST)
    trainer(root, [cb]).fit(Tiny())
    return root / "run"


@pytest.fixture
def run(deferred, tmp_path) -> Path:
    return Path(shutil.copytree(deferred, tmp_path / "run"))


def num_draws(run: Path) -> dict[int, int]:
    table = load_run(run).llc
    return dict(zip(table["step"].tolist(), table["num_draws"].astype(int).tolist(),
                    strict=True))


def test_the_stores_defaults_are_the_estimators():
    """The store spells out estimate_llc's defaults (reading a run must not import torch)."""
    import inspect

    from devinterp.llc import DEFAULT_LOCALIZATION, estimate_llc

    params = inspect.signature(estimate_llc).parameters
    for key, value in ESTIMATOR_DEFAULTS.items():
        want = DEFAULT_LOCALIZATION if key == "localization" else params[key].default
        assert value == want, key
    assert {k for k in SETTINGS_ID_KEYS if params[k].default is not None} <= set(
        ESTIMATOR_DEFAULTS)
    code = ("import sys; from devinterp.run.store import settings_id; settings_id({}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "False"


def test_settings_id_counts_defaults_as_given_and_tells_settings_apart():
    assert settings_id({}) == settings_id({"num_draws": 400, "num_burnin": 200,
                                           "localization": 1, "step_size": "auto"})
    assert settings_id({"num_draws": 10}) == settings_id({"num_draws": 10, "num_burnin": 5})
    assert settings_id({"chain_chunk_size": 1, "vectorize": False}) == settings_id({})
    ids = {settings_id(s) for s in ({}, {"num_draws": 401}, {"step_size": 1e-4},
                                    {"weights": ["a.*"]}, {"nbeta": 10.0}, {"seed": 1})}
    assert len(ids) == 6


def test_rows_carry_settings_and_snapshot_digest(run):
    estimate_run(run, progress=False)
    table = load_run(run).llc
    snaps = RunStore(run).snapshots()
    assert table["snapshot_sha256"].tolist() == [file_sha256(snaps[s]) for s in table["step"]]
    assert set(table["settings_id"]) == {settings_id(FAST)}
    assert not load_run(run).mixed_settings and not table["settings_mismatch"].any()


def test_a_deferred_run_has_the_status_column_before_any_estimate(run):
    """README's print line on a deferred run raised KeyError: "['status'] not in index"."""
    table = load_run(run).llc[["step", "llc_mean", "llc_std", "status"]]
    assert table.empty


def test_interrupted_force_then_plain_rerun_is_refused_until_forced(run, monkeypatch):
    """`--force --num-draws 12` killed after 2 rows, then a plain rerun: before, 2 rows at 12
    draws and 3 at 10 stayed in one table."""
    estimate_run(run, progress=False)
    real, calls = devinterp.run.estimate.record_result, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(devinterp.run.estimate, "record_result", interrupted)
    with pytest.raises(KeyboardInterrupt):
        estimate_run(run, progress=False, force=True, num_draws=12)
    monkeypatch.undo()
    assert num_draws(run) == {0: 12, 2: 12, 4: 10, 6: 10, 8: 10}
    mixed = load_run(run)
    assert mixed.mixed_settings and mixed.settings["num_draws"] == 12
    assert mixed.llc["settings_mismatch"].tolist() == [False, False, True, True, True]
    with pytest.raises(ValueError, match=r"mixes sampler settings: 3 of 5 rows \(steps 4, 6, 8\)"):
        estimate_run(run, progress=False)
    assert estimate_run(run, progress=False, force=True).estimated == [0, 2, 4, 6, 8]
    assert set(num_draws(run).values()) == {12} and not load_run(run).mixed_settings


def test_force_on_some_steps_with_new_settings_is_refused(run):
    estimate_run(run, progress=False)
    with pytest.raises(ValueError, match=r"--force would leave 4 rows .* drop --steps"):
        estimate_run(run, progress=False, force=True, steps=[4], num_draws=12)
    assert set(num_draws(run).values()) == {10}
    # The same settings on some steps: fine.
    assert estimate_run(run, progress=False, force=True, steps=[4]).estimated == [4]


def test_a_failed_command_records_no_settings(run, capsys):
    """`--chain-chunk-size 0` was saved into settings.json and refused every later run."""
    before = (run / SETTINGS_FILE).read_bytes()
    assert cli_main(["estimate", str(run), "--chain-chunk-size", "0", "--quiet"]) == 2
    assert "--chain-chunk-size must be an integer >= 1, got 0" in capsys.readouterr().err
    assert (run / SETTINGS_FILE).read_bytes() == before and not (run / LLC_FILE).exists()
    assert cli_main(["estimate", str(run), "--quiet"]) == 0


def test_a_concurrent_estimate_with_other_settings_stops_the_first(run, monkeypatch):
    """Two `devinterp estimate` with different options on one run directory: when the other
    rewrites a row this one already wrote, this one stops instead of mixing."""
    real, calls = devinterp.run.estimate.run_estimator, []

    def with_another_process(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after this estimate wrote step 0, another rewrites it
            monkeypatch.setattr(devinterp.run.estimate, "run_estimator", real)
            estimate_run(run, progress=False, steps=[0], force=True, num_draws=12)
        return real(*args, **kwargs)

    monkeypatch.setattr(devinterp.run.estimate, "run_estimator", with_another_process)
    with pytest.raises(MixedSettingsError, match="another process wrote rows of other"):
        estimate_run(run, progress=False)
    assert num_draws(run) == {0: 12}


def test_a_rewritten_snapshot_is_estimated_again(run, capsys):
    """Resumed deferred training rewrites snapshots after its checkpoint: the old λ̂ row of
    such a step was kept and skipped."""
    estimate_run(run, progress=False)
    old = load_run(run).llc.set_index("step")["llc_mean"]
    snap = RunStore(run).snapshot_path(4)
    state = torch.load(snap, weights_only=True)
    torch.save({k: v * 1.5 for k, v in state.items()}, snap)
    capsys.readouterr()
    report = estimate_run(run, progress=False)
    assert report.estimated == [4] and report.skipped == [0, 2, 6, 8]
    assert f"{snap} changed since its λ̂ row was written" in capsys.readouterr().err
    new = load_run(run).llc.set_index("step")
    assert new.loc[4, "snapshot_sha256"] == file_sha256(snap)
    assert new.loc[4, "llc_mean"] != old[4]
    pd.testing.assert_series_equal(new["llc_mean"].drop(4), old.drop(4))


def test_a_snapshot_without_a_finite_loss_fails_alone(run, capsys):
    """Finite weights whose loss overflows: a failed row naming the step; the job goes on."""
    snap = RunStore(run).snapshot_path(4)
    state = torch.load(snap, weights_only=True)
    torch.save({k: v * 1e30 for k, v in state.items()}, snap)
    assert cli_main(["estimate", str(run), "--quiet"]) == 0
    assert "step 4 failed (the loss at w* is not finite" in capsys.readouterr().err
    table = load_run(run).llc.set_index("step")
    assert table.loc[4, "status"] == "failed" and np.isnan(table.loc[4, "llc_mean"])
    assert (table.drop(4)["status"] == "ok").all()


@pytest.mark.parametrize("flags, problem", [
    (["--num-draws", "1"], "--num-draws must be an integer >= 2"),
    (["--step-size", "inf"], "--step-size must be 'auto' or a finite number > 0, got inf"),
    (["--step-size", "nan"], "--step-size must be 'auto' or a finite number > 0"),
    (["--localization", "-1"], "--localization must be a finite number >= 0"),
    (["--nbeta", "inf"], "--nbeta must be a finite number > 0"),
    (["--num-samples", "0"], "--num-samples must be an integer >= 1"),
    (["--num-chains", "0"], "--num-chains must be an integer >= 1"),
    (["--device", "foo"], "device 'foo' is not a torch device"),
    (["--device", "cuda:99"], "device 'cuda:99'"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--workers", "2", "--rank", "2"], "0 <= --rank < --workers"),
])
def test_bad_options_fail_up_front_in_one_line(run, capsys, flags, problem):
    before = (run / SETTINGS_FILE).read_bytes()
    assert cli_main(["estimate", str(run), *flags]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and problem in err[0], err
    assert (run / SETTINGS_FILE).read_bytes() == before and not (run / LLC_FILE).exists()


def test_a_full_disk_is_one_line_and_keeps_the_rows_written(run, capsys, monkeypatch):
    import errno

    import devinterp.run.store

    real, writes = devinterp.run.store.atomic_write_bytes, []

    def filling_up(path, data, **kwargs):
        if Path(path).name == LLC_FILE:
            writes.append(path)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, **kwargs)

    monkeypatch.setattr(devinterp.run.store, "atomic_write_bytes", filling_up)
    assert cli_main(["estimate", str(run), "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and f"cannot write {run / LLC_FILE}: No space left on device" in err[0]
    assert load_run(run).llc["step"].tolist() == [0, 2]
    monkeypatch.undo()
    assert cli_main(["estimate", str(run), "--quiet"]) == 0
    assert load_run(run).llc["step"].tolist() == [0, 2, 4, 6, 8]


def test_bad_settings_json_is_named(run, capsys):
    settings = json.loads((run / SETTINGS_FILE).read_text())
    (run / SETTINGS_FILE).write_text(json.dumps({**settings, "num_draws": "ten"}))
    assert cli_main(["estimate", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"num_draws in {run / SETTINGS_FILE} must be an integer >= 2" in err
    assert "got 'ten'" in err
    (run / SETTINGS_FILE).write_text("[1, 2]")
    assert cli_main(["estimate", str(run)]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err


def test_threads_apply_while_estimating_only(run, monkeypatch):
    real, seen = devinterp.run.estimate.run_estimator, []

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(devinterp.run.estimate, "run_estimator", recording)
    torch.set_num_threads(1)
    estimate_run(run, progress=False, steps=[0], threads=2)
    assert seen == [2] and torch.get_num_threads() == 1


def test_estimate_writes_stages(run):
    """Without --wandb too, as inline training does at its end (5 λ̂ points here)."""
    assert not (run / "stages.json").exists()
    assert cli_main(["estimate", str(run), "--quiet"]) == 0
    stages = load_run(run).stages
    assert stages and stages[0]["start_step"] == 0 and stages[-1]["end_step"] == 8


@pytest.mark.slow
def test_workers_without_rank_launch_the_processes(run, capsys):
    """`--workers 2` without `--rank` estimated half the snapshots and exited 0; now it
    launches both workers and waits for them."""
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env_path) if p)
    try:
        assert cli_main(["estimate", str(run), "--workers", "2", "--quiet"]) == 0
    finally:
        os.environ["PYTHONPATH"] = env_path
    table = load_run(run).llc
    assert table["step"].tolist() == [0, 2, 4, 6, 8] and (table["status"] == "ok").all()
    assert (run / "stages.json").exists()


def test_the_run_store_needs_no_fcntl(tmp_path):
    """The lock is `filelock` (POSIX and Windows): without fcntl the store still imports and
    writes (fcntl made every import of the run store fail on Windows)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["fcntl"] = None  # as on Windows: `import fcntl` fails
        from devinterp.run.store import RunStore
        store = RunStore(sys.argv[1], create=True)
        store.write_llc_row({"step": 3, "llc_mean": 1.0, "llc_std": 0.0})
        print(store.read_table("llc.csv")["step"].tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[3]"


def test_row_guard_refuses_under_the_lock(tmp_path):
    store = RunStore(tmp_path, create=True)
    store.row_settings = {"num_draws": 10}
    store.write_llc_row({"step": 0, "llc_mean": 1.0, "llc_std": 0.0})

    def refuse_other_settings(table, row):
        if (table["settings_id"] != row["settings_id"]).any():
            raise MixedSettingsError("mixed")

    store.row_settings, store.row_guard = {"num_draws": 20}, refuse_other_settings
    with pytest.raises(MixedSettingsError):
        store.write_llc_row({"step": 1, "llc_mean": 1.0, "llc_std": 0.0})
    assert store.read_table(LLC_FILE)["step"].tolist() == [0]
    store.row_guard = None
    store.write_llc_row({"step": 1, "llc_mean": 1.0, "llc_std": 0.0})
    run = load_run(tmp_path)  # no settings.json: the last step's settings are the reference
    assert run.mixed_settings and run.llc["settings_mismatch"].tolist() == [True, False]


def test_callback_rows_of_changed_settings_are_flagged_and_estimate_refuses_them(tmp_path):
    """A run continued with other settings (rows 0-4 at 10 draws, 6-8 at 12): the callback's
    rows are stamped through the run store, load_run flags the rows that differ from
    settings.json, and `devinterp estimate` will not add to the mix."""
    run_dir = tmp_path / "run"
    pl.seed_everything(0, verbose=False)
    first = LLCCallback(run_dir, every_n_train_steps=2, progress=False, **FAST)
    trainer(tmp_path, [first], max_steps=4).fit(Tiny())
    later = LLCCallback(run_dir, steps=[6, 8], include_init=False, progress=False,
                        **{**FAST, "num_draws": 12})
    trainer(tmp_path, [later], max_steps=8).fit(Tiny())
    run = load_run(run_dir)
    assert num_draws(run_dir) == {0: 10, 2: 10, 4: 10, 6: 12, 8: 12}
    assert run.mixed_settings
    assert run.llc["settings_mismatch"].tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match=r"mixes sampler settings: 3 of 5 rows \(steps 0, 2, 4\)"):
        estimate_run(run_dir, progress=False)


def test_an_unreadable_settings_json_never_blocks_a_row(tmp_path):
    """The callback writes rows during training: a damaged settings.json costs the rows their
    settings_id, never the row (or the training run)."""
    store = RunStore(tmp_path, create=True)
    (tmp_path / SETTINGS_FILE).write_text("{not json")
    row = store.write_llc_row({"step": 0, "llc_mean": 1.0, "llc_std": 0.0})
    assert "settings_id" not in row
    assert store.read_table(LLC_FILE)["step"].tolist() == [0]


def within(seconds: float, fn, *args):
    """``fn(*args)`` in a thread: its result or exception, or a failure if it blocks."""
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__qualname__} blocked for {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize("name", [SETTINGS_FILE, LLC_FILE, "traces/step_000000000.npy"])
def test_a_fifo_in_a_run_directory_is_refused_not_waited_on(tmp_path, name):
    """A run directory is untrusted input: a FIFO named like one of its files would block a
    plain open() forever; reading it is one error naming the path."""
    store = RunStore(tmp_path / "run", create=True)
    store.write_llc_row({"step": 0, "llc_mean": 1.0, "llc_std": 0.0})
    store.save_trace(0, np.zeros((2, 3)))
    store.write_json(SETTINGS_FILE, {"num_draws": 10})
    (store.path / name).unlink()
    os.mkfifo(store.path / name)
    with pytest.raises(ValueError, match=rf"{re.escape(str(store.path / name))} is a FIFO"):
        within(10, lambda: (load_run(store.path), store.load_trace(0)))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_snapshot_is_named_and_skipped(run, capsys):
    """Post-hoc estimation reads every snapshot: a FIFO among them is named and skipped (exit
    code 1), the other snapshots are estimated, and nothing waits on it."""
    fifo = run / "snapshots" / "step_000000004.pt"
    fifo.unlink()
    os.mkfifo(fifo)
    code = within(120, cli_main, ["estimate", str(run), "--quiet"])
    assert code == 1
    assert f"cannot read {fifo} ({fifo} is a FIFO" in capsys.readouterr().err
    table = load_run(run).llc
    assert table[table["status"] == "ok"]["step"].tolist() == [0, 2, 6, 8]


@pytest.mark.parametrize("step", ["2.5", "soon", ""])
def test_a_step_that_is_not_a_whole_number_names_the_table(tmp_path, step):
    store = RunStore(tmp_path, create=True)
    (tmp_path / LLC_FILE).write_text(f"step,llc_mean\n0,1.0\n{step},2.0\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / LLC_FILE))}: 'step' "
                                         r"must be a whole number in every row, got .* data "
                                         r"row 2"):
        store.read_table(LLC_FILE)
    (tmp_path / LLC_FILE).write_text("step,llc_mean\n0,1.0\n4.0,2.0\n")  # whole: still fine
    assert store.read_table(LLC_FILE)["step"].tolist() == [0, 4]
