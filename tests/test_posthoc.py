"""``devinterp estimate``: deferred runs and Lightning checkpoints give the inline λ̂ table."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from llc_models import FAST, Tiny, trainer

from devinterp import LLCCallback, load_run
from devinterp.cli import main as cli_main
from devinterp.cli.estimate import main
from devinterp.run.estimate import estimate_run
from devinterp.run.store import file_sha256
from devinterp.run.wandb import run_record

TESTS = Path(__file__).parent
FAST_FLAGS = ["--num-chains", "2", "--num-draws", "10", "--num-burnin", "5", "--step-size",
              "1e-4", "--batch-size", "32", "--quiet"]


def fit(tmp_path, callbacks, module=Tiny, **kwargs) -> None:
    pl.seed_everything(0, verbose=False)
    defaults = dict(max_steps=8)
    defaults.update(kwargs)
    trainer(tmp_path, callbacks, **defaults).fit(module())


def llc_run(tmp_path, name, mode, **kwargs) -> Path:
    """Train Tiny for 8 steps with the callback every 4 steps; returns the run directory."""
    run_dir = tmp_path / name
    settings = {**FAST, "every_n_train_steps": 4, "progress": False, **kwargs}
    fit(tmp_path, [LLCCallback(run_dir, mode=mode, **settings)])
    return run_dir


def test_deferred_then_estimate_gives_the_inline_table(tmp_path):
    inline = llc_run(tmp_path, "inline", "inline")
    deferred = llc_run(tmp_path, "deferred", "deferred")
    assert load_run(deferred).llc.empty and sorted(load_run(deferred).snapshots) == [0, 4, 8]
    assert load_run(deferred).meta["data"] == {"kind": "file", "file": "data.pt"}
    assert main([str(deferred), "--quiet"]) == 0
    a, b = load_run(inline), load_run(deferred)
    pd.testing.assert_frame_equal(b.llc, a.llc)
    for step in (0, 4, 8):
        np.testing.assert_array_equal(b.trace(step), a.trace(step))


def test_weight_refined_inline_and_deferred_agree(tmp_path):
    """weights= reaches the estimator from the callback (inline), from settings.json (deferred
    + devinterp estimate) and from --weights; unknown names fail before training."""
    inline = llc_run(tmp_path, "inline", "inline", weights=["net.2.*"])
    deferred = llc_run(tmp_path, "deferred", "deferred", weights=["net.2.*"])
    assert load_run(deferred).settings["weights"] == ["net.2.*"]
    assert main([str(deferred), "--quiet"]) == 0
    pd.testing.assert_frame_equal(load_run(deferred).llc, load_run(inline).llc)
    plain = llc_run(tmp_path, "plain", "deferred")
    assert main([str(plain), "--quiet", "--weights", "net.2.*"]) == 0
    pd.testing.assert_frame_equal(load_run(plain).llc, load_run(inline).llc)
    whole = llc_run(tmp_path, "whole", "inline")
    assert not np.allclose(load_run(whole).llc["llc_mean"], load_run(inline).llc["llc_mean"])
    with pytest.raises(ValueError, match=r"weights \['head.\*'\] match no parameter of Tiny"):
        llc_run(tmp_path, "bad", "inline", weights=["head.*"])
    assert not (tmp_path / "bad" / "snapshots").exists()


def test_out_puts_a_refined_curve_in_its_own_run_directory(tmp_path, capsys):
    """--out: one training run, one directory per λ̂ curve (here a weight-refined one), each a
    run of its own for the dashboard; the training run's table is left alone."""
    run = llc_run(tmp_path, "run", "inline")
    before = load_run(run).llc
    head = tmp_path / "run-head"
    assert main([str(run), "--quiet", "--weights", "net.2.*", "--out", str(head)]) == 0
    refined, source = load_run(head), load_run(run)
    pd.testing.assert_frame_equal(source.llc, before)
    assert refined.meta["name"] == "run-head" and "wandb" not in refined.meta
    assert refined.meta["snapshots_from"] == str(run.resolve())
    assert refined.settings["weights"] == ["net.2.*"] and source.settings["weights"] is None
    assert refined.settings["num_chains"] == FAST["num_chains"]  # the run's sampler settings
    pd.testing.assert_frame_equal(refined.metrics, source.metrics)
    # The same numbers as a refined estimate during training.
    inline = llc_run(tmp_path, "inline", "inline", weights=["net.2.*"])
    pd.testing.assert_frame_equal(refined.llc, load_run(inline).llc)
    assert cli_main(["estimate", str(run), "--out", str(head), "--wandb"]) == 2
    assert "would mix two curves" in capsys.readouterr().err


def llc_dir(ckpts: Path) -> Path:
    """Where `devinterp estimate CKPT_DIR` writes its run store: the sibling CKPT_DIR-llc."""
    return ckpts.parent / f"{ckpts.name}-llc"


def test_checkpoint_directory_gives_the_inline_values(tmp_path, capsys):
    """A run that only has ModelCheckpoint files: the module class is given on the command
    line, hyperparameters come from the checkpoints, data and loss from the module. The λ̂ run
    store goes to a sibling directory (said on stderr); the checkpoint folder is not touched."""
    ckpts = tmp_path / "ckpts"
    fit(tmp_path, [ModelCheckpoint(ckpts, every_n_train_steps=4, save_top_k=-1, save_last=True)],
        enable_checkpointing=True)
    before = {p: p.read_bytes() for p in ckpts.rglob("*")}
    inline = llc_run(tmp_path, "inline", "inline", include_init=False)
    capsys.readouterr()
    assert main([str(ckpts), "--module", "llc_models:Tiny", *FAST_FLAGS]) == 0
    assert f"writing λ̂ to the run directory {llc_dir(ckpts)}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in ckpts.rglob("*")} == before
    got, want = load_run(llc_dir(ckpts)).llc, load_run(inline).llc
    assert got["step"].tolist() == [4, 8]  # last.ckpt is step 8 again: estimated once
    # The same λ̂ rows; each row's digest is of the checkpoint file it was estimated from.
    digest = "snapshot_sha256"
    pd.testing.assert_frame_equal(got.drop(columns=digest), want.drop(columns=digest))
    by_step = {4: sorted(ckpts.glob("*step=4*")), 8: sorted(ckpts.glob("*step=8*"))}
    assert got[digest].tolist() == [file_sha256(by_step[s][0]) for s in (4, 8)]
    assert load_run(llc_dir(ckpts)).settings["num_chains"] == 2
    # Asked for explicitly, the checkpoint folder itself holds the table.
    assert main([str(ckpts), "--module", "llc_models:Tiny", "--out", str(ckpts),
                 *FAST_FLAGS]) == 0
    assert load_run(ckpts).llc["step"].tolist() == [4, 8]


def test_lightning_cli_bookkeeping_in_hyperparameters_is_ignored(tmp_path):
    """Plain LightningCLI adds _class_path / _instantiator to the hyperparameters."""
    ckpts = tmp_path / "ckpts"
    fit(tmp_path, [ModelCheckpoint(ckpts, every_n_train_steps=8)], enable_checkpointing=True)
    (path,) = ckpts.glob("*.ckpt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"].update(_class_path="llc_models.Tiny", _instantiator="x.y")
    torch.save(ckpt, path)
    assert main([str(ckpts), "--module", "llc_models:Tiny", *FAST_FLAGS]) == 0
    assert load_run(llc_dir(ckpts)).llc["status"].tolist() == ["ok"]


def test_checkpoint_of_a_run_with_the_callback_names_its_module(tmp_path):
    ckpts = tmp_path / "ckpts"
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, mode="deferred", progress=False)
    fit(tmp_path, [cb, ModelCheckpoint(ckpts, every_n_train_steps=8, save_top_k=-1)],
        enable_checkpointing=True)
    report = estimate_run(ckpts, progress=False, **FAST)
    assert report.estimated == [8] and not report.unreadable


def test_data_and_loss_given_by_import_path(tmp_path):
    ckpts = tmp_path / "ckpts"
    fit(tmp_path, [ModelCheckpoint(ckpts, every_n_train_steps=8, save_top_k=-1)],
        enable_checkpointing=True)
    assert main([str(ckpts), "--module", "llc_models:Tiny", "--data",
                 "llc_models:regression_data", "--loss", "torch.nn.functional:mse_loss",
                 *FAST_FLAGS]) == 0
    row = load_run(llc_dir(ckpts)).llc.iloc[0]
    assert row["step"] == 8 and row["status"] == "ok"
    assert row["nbeta"] == pytest.approx(64 / np.log(64))


def test_unreadable_snapshot_is_named_and_the_others_are_estimated(tmp_path, capsys):
    run_dir = llc_run(tmp_path, "run", "deferred")
    bad = run_dir / "snapshots" / "step_000000004.pt"
    bad.write_bytes(b"truncated")
    wrong = run_dir / "snapshots" / "step_000000008.pt"
    torch.save({"not_a_weight": torch.zeros(1)}, wrong)
    assert main([str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert f"cannot read {bad}" in err
    assert f"cannot read {wrong}" in err and "weights do not match Tiny" in err
    assert load_run(run_dir).llc["step"].tolist() == [0]


def test_done_steps_are_skipped_and_conflicting_settings_need_force(tmp_path):
    run_dir = llc_run(tmp_path, "run", "deferred")
    first = estimate_run(run_dir, steps=[0, 4], progress=False)
    assert first.estimated == [0, 4]
    second = estimate_run(run_dir, progress=False)
    assert second.skipped == [0, 4] and second.estimated == [8]
    with pytest.raises(ValueError, match="differ from the settings .* pass --force"):
        estimate_run(run_dir, progress=False, num_draws=12)
    forced = estimate_run(run_dir, progress=False, force=True, num_draws=12)
    assert forced.estimated == [0, 4, 8]
    run = load_run(run_dir)
    assert (run.llc["num_draws"] == 12).all() and run.settings["num_draws"] == 12


def test_workers_split_the_snapshots(tmp_path):
    run_dir = llc_run(tmp_path, "run", "deferred", every_n_train_steps=2)
    a = estimate_run(run_dir, workers=2, rank=0, progress=False)
    b = estimate_run(run_dir, workers=2, rank=1, progress=False)
    assert a.estimated == [0, 4, 8] and b.estimated == [2, 6]
    assert load_run(run_dir).llc["step"].tolist() == [0, 2, 4, 6, 8]


@pytest.mark.slow
def test_concurrent_workers_from_torchrun_environment(tmp_path):
    """Two processes (one configured like torchrun, one by flags) share one run store."""
    run_dir = llc_run(tmp_path, "run", "deferred", every_n_train_steps=1)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, "-m", "devinterp", "estimate", str(run_dir)]
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": "0", "WORLD_SIZE": "2"},
                         stdout=subprocess.PIPE, text=True),
        subprocess.Popen([*cmd, "--workers", "2", "--rank", "1"], env=env,
                         stdout=subprocess.PIPE, text=True),
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    done = [[int(ln.split()[2].rstrip(":")) for ln in out.splitlines()
             if ln.startswith("LLC step")] for out in outs]
    assert done == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    table = load_run(run_dir).llc
    assert table["step"].tolist() == list(range(9)) and (table["status"] == "ok").all()


@pytest.mark.slow
def test_module_defined_in_a_training_script(tmp_path):
    """A LightningModule defined in the script that trained it: rebuilt from the script file,
    without running the script's training again."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import lightning.pytorch as pl
        from llc_models import Tiny, trainer
        from devinterp import LLCCallback

        class ScriptModel(Tiny):
            pass

        if __name__ == "__main__":
            with open({str(tmp_path / "trained.txt")!r}, "a") as f:
                f.write("trained\\n")
            cb = LLCCallback({str(tmp_path / "run")!r}, every_n_train_steps=4, mode="deferred",
                             progress=False)
            trainer({str(tmp_path)!r}, [cb]).fit(ScriptModel())
    """))
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(TESTS)})
    meta = load_run(tmp_path / "run").meta
    assert meta["module"] == "__main__:ScriptModel" and meta["module_file"] == str(script)
    # A recorded script is never imported on the run directory's word; the error says how.
    with pytest.raises(ValueError, match=f"pass --module {script}:ScriptModel"):
        estimate_run(tmp_path / "run", progress=False, **FAST)
    report = estimate_run(tmp_path / "run", module=f"{script}:ScriptModel", progress=False,
                          **FAST)
    assert report.estimated == [0, 4, 8]
    assert (tmp_path / "trained.txt").read_text() == "trained\n"


def test_a_script_that_imports_a_sibling_module_is_rebuilt(tmp_path):
    """`--module path/train.py:Model` imports the script with its own folder on the path, as
    `python train.py` had it (a raw ModuleNotFoundError before)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "model_defs.py").write_text("from llc_models import Tiny\n\n\nclass Net(Tiny):\n"
                                           "    pass\n")
    script = project / "train.py"
    script.write_text(textwrap.dedent(f"""
        from llc_models import trainer
        from model_defs import Net
        from devinterp import LLCCallback

        class ScriptModel(Net):
            pass

        if __name__ == "__main__":
            cb = LLCCallback({str(tmp_path / "run")!r}, every_n_train_steps=4, mode="deferred",
                             progress=False)
            trainer({str(tmp_path)!r}, [cb]).fit(ScriptModel())
    """))
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, cwd=project,
                   env={**os.environ, "PYTHONPATH": str(TESTS)})
    sys.modules.pop("model_defs", None)
    assert str(project) not in sys.path
    report = estimate_run(tmp_path / "run", module=f"{script}:ScriptModel", progress=False,
                          **FAST)
    assert report.estimated == [0, 4, 8]


def test_wandb_receives_deferred_values_on_the_loss_axis(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from test_callback_loggers import wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=tmp_path / "wb", offline=True, project="devinterp-test")
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, mode="deferred", progress=False,
                     **FAST)
    try:
        fit(tmp_path, [cb], logger=logger, max_steps=24)
        # What run.json records is what resumes the W&B run (devinterp.run.wandb's record).
        assert load_run(tmp_path / "run").meta["wandb"] == run_record(logger.experiment,
                                                                      logger.save_dir)
    finally:
        wandb.finish()
    assert main([str(tmp_path / "run"), "--wandb", "--quiet"]) == 0
    history = wandb_history(tmp_path / "wb")  # the training run and the estimate's resume
    llc = {r["trainer/global_step"]: r["llc/mean"] for r in history if "llc/mean" in r}
    run = load_run(tmp_path / "run")
    assert llc == pytest.approx(dict(zip(run.llc["step"], run.llc["llc_mean"], strict=True)))
    assert any("train_loss" in r for r in history)
    # As at the end of inline training: stages written, stage/index on the λ̂ steps, the page.
    assert run.stages and run.stages[-1]["end_step"] == 24
    index = {r["trainer/global_step"]: r["stage/index"] for r in history if "stage/index" in r}
    assert sorted(index) == sorted(llc) and index[0] == 1
    assert any(r.get("dashboard/_type") == "html-file" for r in history)


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["estimate", str(empty)]) == 2
    assert "holds no snapshot" in capsys.readouterr().err
    assert cli_main(["estimate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    ckpts = tmp_path / "ckpts"
    fit(tmp_path, [ModelCheckpoint(ckpts, every_n_train_steps=8)], enable_checkpointing=True)
    assert cli_main(["estimate", str(ckpts)]) == 2
    assert "pass --module package.module:ClassName" in capsys.readouterr().err
    assert cli_main(["estimate", str(ckpts), "--module", "llc_models:Nope"]) == 2
    assert "has no 'Nope'" in capsys.readouterr().err
    assert cli_main(["estimate", str(ckpts), "--module", "Tiny"]) == 2
    assert "is not an import path" in capsys.readouterr().err
    assert cli_main(["estimate", str(ckpts), "--steps", "a,b"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert cli_main(["estimate", str(ckpts), "--num-chains", "many"]) == 2
    err = capsys.readouterr().err
    assert "invalid int value: 'many'" in err and len(err.strip().splitlines()) == 1


def test_the_run_package_and_the_dashboard_do_not_import_the_command_line():
    """Command lines are parsed only under devinterp.cli: post-hoc estimation, its W&B module
    and the dashboard are library code (plain errors, no parser)."""
    code = ("import sys, devinterp.run.estimate, devinterp.run.wandb, devinterp.dashboard; "
            "print(sorted(m for m in sys.modules if m.startswith('devinterp.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert out.strip() == "[]"
