"""A run directory is untrusted input: `devinterp estimate` never runs code that a run
directory, a checkpoint or a config names, only model / datamodule classes of importable
packages. Each payload below would create a marker file if it ran."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from llc_models import FAST, Tiny, trainer

from devinterp import LLCCallback, load_run
from devinterp.cli import main as cli_main

FAST_FLAGS = ["--num-chains", "2", "--num-draws", "10", "--num-burnin", "5", "--step-size",
              "1e-4", "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def deferred(tmp_path_factory) -> Path:
    """A deferred run of Tiny (snapshots at steps 0, 4, 8), trained once for this file."""
    root = tmp_path_factory.mktemp("deferred")
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(root / "run", every_n_train_steps=4, mode="deferred", progress=False,
                     **FAST)
    trainer(root, [cb]).fit(Tiny())
    return root / "run"


@pytest.fixture
def run(deferred, tmp_path) -> Path:
    """A fresh copy of the deferred run, to tamper with."""
    import shutil

    return Path(shutil.copytree(deferred, tmp_path / "run"))


def tamper(run: Path, **changes) -> None:
    meta = json.loads((run / "run.json").read_text())
    meta.update(changes)
    (run / "run.json").write_text(json.dumps(meta))


def touch_command(marker: Path) -> str:
    return f"touch {marker}"


def evil_script(path: Path, marker: Path) -> Path:
    """A Python file that creates ``marker`` when imported, defining an nn.Module ``Model``."""
    path.write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).touch()
        from llc_models import Tiny as Model
    """))
    return path


def refused(argv: list[str], capsys) -> str:
    """Run `devinterp estimate`; assert exit 2 with one line and no row; return the line."""
    code = cli_main(["estimate", *argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_function_named_as_the_module_is_not_called(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    tamper(run, module="os:system", hparams={"command": touch_command(marker)})
    line = refused([str(run)], capsys)
    assert "'os:system', which is not a Module subclass" in line and "--module" in line
    assert not marker.exists()
    assert load_run(run).llc.empty


def test_a_recorded_script_file_is_never_imported(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    script = evil_script(tmp_path / "evil.py", marker)
    tamper(run, module=f"{script}:Model")
    assert "a class from a script file" in refused([str(run)], capsys)
    tamper(run, module="__main__:Model", module_file=str(script))
    line = refused([str(run)], capsys)
    assert f"pass --module {script}:Model" in line
    assert not marker.exists()
    # Named by the user, the same file is imported (without running its __main__ block).
    assert cli_main(["estimate", str(run), "--module", f"{script}:Model", "--quiet"]) == 0
    assert marker.exists() and load_run(run).llc["status"].tolist() == ["ok"] * 3


def test_a_module_inside_the_run_directory_is_not_imported(run, tmp_path, capsys,
                                                           monkeypatch):
    """Even when the run directory is importable (e.g. the working directory)."""
    marker = tmp_path / "pwned"
    evil_script(run / "evilmodels.py", marker)
    monkeypatch.syspath_prepend(str(run))
    tamper(run, module="evilmodels:Model")
    assert "imported from inside the run directory" in refused([str(run)], capsys)
    assert not marker.exists()


def test_a_datamodule_recipe_builds_only_a_datamodule(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    tamper(run, data={"kind": "datamodule", "class": "os:system",
                      "hparams": {"command": touch_command(marker)}})
    assert "which is not a LightningDataModule subclass" in refused([str(run)], capsys)
    assert not marker.exists()


def test_a_recorded_loss_function_outside_torch_and_the_model_package_is_refused(run,
                                                                                capsys):
    tamper(run, loss={"kind": "function", "path": "os:system"})
    line = refused([str(run)], capsys)
    assert "names the loss 'os:system'" in line and "pass --loss os:system" in line
    tamper(run, loss={"kind": "function", "path": "torch.nn.functional:mse_loss"})
    assert cli_main(["estimate", str(run), "--quiet"]) == 0


def test_a_data_file_outside_the_run_directory_is_refused(run, capsys):
    tamper(run, data={"kind": "file", "file": "../../elsewhere/data.pt"})
    assert "outside the run directory" in refused([str(run)], capsys)


def test_a_checkpoint_naming_a_function_is_not_called(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpts = tmp_path / "ckpts"
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(tmp_path / "cbrun", every_n_train_steps=4, mode="deferred", progress=False)
    trainer(tmp_path, [cb, ModelCheckpoint(ckpts, every_n_train_steps=8)],
            enable_checkpointing=True).fit(Tiny())
    (path,) = ckpts.glob("*.ckpt")
    ckpt = torch.load(path, weights_only=True)  # strings only: it loads with weights_only
    for key in ckpt["callbacks"]:
        if key.startswith("LLCCallback"):
            ckpt["callbacks"][key]["module"] = "os:system"
    ckpt["hyper_parameters"] = {"command": touch_command(marker)}
    torch.save(ckpt, path)
    line = refused([str(ckpts), *FAST_FLAGS], capsys)
    assert "a checkpoint's LLCCallback state names 'os:system'" in line
    assert not marker.exists()


def test_a_config_yaml_naming_a_function_is_not_called(tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, [ModelCheckpoint(ckpts, every_n_train_steps=8)],
            enable_checkpointing=True).fit(Tiny())
    (ckpts / "config.yaml").write_text("model:\n  class_path: os.system\n")
    assert "which is not a Module subclass" in refused([str(ckpts), *FAST_FLAGS], capsys)


@pytest.mark.parametrize("content, problem", [
    ("[]", "must hold a JSON object"),
    ('{"hparams": "width=8"}', "'hparams' must be a JSON object"),
    ('{"data": {"kind": 3}}', "'data.kind' must be a string"),
    ('{"module": ["llc_models", "Tiny"]}', "'module' must be a string"),
])
def test_wrong_type_run_json_is_one_line(run, capsys, content, problem):
    (run / "run.json").write_text(content)
    assert problem in refused([str(run)], capsys)
