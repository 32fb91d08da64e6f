"""``devinterp run CONFIG.yaml``: the whole chain from one YAML, sweeps, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from devinterp import load_run
from devinterp.cli import UsageError
from devinterp.cli import main as cli_main
from devinterp.cli.run import condense_error, parse_args, sweep_points

REPO = Path(__file__).resolve().parents[1]

TINY = """\
seed_everything: 3
model:
  class_path: experiments.tms.ToyModelOfSuperposition
  init_args:
    num_samples: 200
    lr: 0.1
trainer:
  max_steps: 40
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: devinterp.LLCCallback
      init_args:
        log_spaced: 8
        num_chains: 2
        num_draws: 20
        step_size: 0.001
        progress: false
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = cli_main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), [line for line in err.splitlines() if line.strip()]


def test_run_writes_the_whole_chain_and_prints_the_run_dir_last(capsys, config, tmp_path):
    run_dir = tmp_path / "run"
    code, out, _ = run(capsys, str(config), "--run-dir", str(run_dir),
                       "--trainer.max_steps=30", "--model.init_args.lr=0.05")
    assert code == 0
    assert out[-1] == str(run_dir)
    for name in ("config.yaml", "llc.csv", "metrics.csv", "stages.json", "dashboard.html"):
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["seed_everything"] == 3
    assert resolved["trainer"]["max_steps"] == 30  # the override, not the file's 40
    assert resolved["model"]["init_args"]["lr"] == 0.05
    assert resolved["model"]["init_args"]["num_features"] == 6  # defaults filled in
    callback = resolved["trainer"]["callbacks"][0]
    assert callback["init_args"]["dirpath"] == str(run_dir)
    r = load_run(run_dir)
    assert r.llc["step"].iloc[0] == 0 and r.llc["step"].iloc[-1] == 30
    assert len(r.llc) >= 5 and r.llc["llc_mean"].notna().all()
    assert "train_loss" in r.metrics.columns
    assert isinstance(r.stages, list) and len(r.stages) >= 1
    assert r.stages[0]["start_step"] == 0 and r.stages[-1]["end_step"] == 30
    assert "<html" in (run_dir / "dashboard.html").read_text()[:500].lower()
    assert (run_dir / "logs" / "metrics.csv").is_file()  # the default CSVLogger, in the run dir
    # The saved config is a config: it reruns this run exactly, into another directory.
    again = tmp_path / "again"
    code, out, _ = run(capsys, str(run_dir / "config.yaml"), "--run-dir", str(again))
    assert code == 0 and out[-1] == str(again)
    pd.testing.assert_frame_equal(load_run(again).llc[["step", "llc_mean"]],
                                  r.llc[["step", "llc_mean"]])


@pytest.mark.slow
def test_run_prints_the_run_dir_last_from_a_real_process(config, tmp_path):
    run_dir = tmp_path / "proc"
    # The config is outside the repository, so its `experiments` (not installed) comes from
    # PYTHONPATH, as it would for a user's own config elsewhere.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "devinterp", "run", str(config), "--run-dir",
                           str(run_dir), "--trainer.max_steps=20"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == str(run_dir)
    assert (run_dir / "stages.json").is_file() and (run_dir / "dashboard.html").is_file()


def test_deferred_run_is_estimated_later_by_devinterp_estimate(capsys, config, tmp_path):
    run_dir = tmp_path / "deferred"
    code, out, err = run(capsys, str(config), "--run-dir", str(run_dir), "--trainer.max_steps=20",
                         "--trainer.callbacks.init_args.mode=deferred")
    assert code == 0 and out[-1] == str(run_dir)
    assert not (run_dir / "llc.csv").exists() and len(load_run(run_dir).snapshots) >= 5
    assert any("devinterp estimate" in line for line in err)  # says what to do next
    # The module's hparams are exactly its init arguments, so another process rebuilds it.
    assert cli_main(["estimate", str(run_dir)]) == 0
    assert len(load_run(run_dir).llc) == len(load_run(run_dir).snapshots)


def test_default_run_dir_is_under_runs_named_after_the_config(monkeypatch, capsys, config,
                                                             tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, str(config), "--trainer.max_steps=6",
                       "--trainer.callbacks.init_args.log_spaced=5")
    assert code == 0
    run_dir = Path(out[-1])
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("tiny-")
    assert (tmp_path / run_dir / "llc.csv").is_file()


def test_sweep_runs_each_value_in_its_own_directory_and_writes_a_summary(capsys, config,
                                                                        tmp_path):
    root = tmp_path / "sweep"
    code, out, _ = run(capsys, str(config), "--run-dir", str(root), "--sweep", "seed=0,1",
                       "--trainer.max_steps=20")
    assert code == 0 and out[-1] == str(root)
    summary = pd.read_csv(root / "summary.csv")
    assert summary["run"].tolist() == ["seed=0", "seed=1"]
    assert {"final_loss", "final_llc", "num_stages"} <= set(summary.columns)
    assert summary["final_llc"].notna().all()
    for name, seed in (("seed=0", 0), ("seed=1", 1)):
        assert yaml.safe_load((root / name / "config.yaml").read_text())["seed_everything"] == seed
        assert (root / name / "stages.json").is_file()
        assert (root / name / "dashboard.html").is_file()
    assert summary["num_stages"].tolist() == [len(load_run(root / n).stages)
                                              for n in summary["run"]]
    assert (root / "dashboard.html").is_file()  # the runs side by side
    # Different seeds, different training: the final losses differ.
    assert summary["final_loss"].nunique() == 2


def test_torch_threads_from_the_config_are_applied(capsys, config, tmp_path):
    import torch

    try:
        code, _, _ = run(capsys, str(config), "--run-dir", str(tmp_path / "t"),
                         "--torch_threads=2", "--trainer.max_steps=6",
                         "--trainer.callbacks.init_args.log_spaced=5")
        assert code == 0 and torch.get_num_threads() == 2
        assert yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())["torch_threads"] == 2
    finally:
        torch.set_num_threads(1)


def test_sweep_points_form_the_grid_and_name_the_directories():
    points = sweep_points([("seed_everything", ["0", "1"]), ("model.init_args.lr", ["0.1"])])
    assert [name for name, _ in points] == ["seed=0,lr=0.1", "seed=1,lr=0.1"]
    assert points[1][1] == {"seed_everything": "1", "model.init_args.lr": "0.1"}


def test_parse_args_splits_own_flags_from_overrides():
    args = parse_args(["c.yaml", "--trainer.max_steps=5", "--run-dir", "d", "--sweep=seed=1,2",
                       "--model.init_args.lr", "0.1"])
    assert args.config == Path("c.yaml") and args.run_dir == Path("d")
    assert args.sweeps == [("seed_everything", ["1", "2"])]
    assert args.overrides == ["--trainer.max_steps=5", "--model.init_args.lr", "0.1"]
    assert parse_args(["--help"]) is None
    for bad in (["--run-dir", "d"], ["c.yaml", "--sweep", "seed"], ["c.yaml", "--run-dir"],
                ["c.yaml", "--sweep", "seed=1", "--sweep", "seed=2"]):
        with pytest.raises(UsageError):
            parse_args(bad)


# -- bad input: exit 2, one line, no traceback -----------------------------------------------------
def _one_line_error(capsys, *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_unknown_model_key_is_named_with_a_suggestion(capsys, config, tmp_path):
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"),
                           "--model.init_args.lrr=3")
    assert "model.init_args.lrr" in line and "did you mean 'lr'" in line
    assert not (tmp_path / "r").exists()  # nothing is created for a config that does not parse


def test_unknown_key_in_the_yaml_file_is_named(capsys, config, tmp_path):
    config.write_text(TINY.replace("    lr: 0.1", "    learning_rate: 0.1"))
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"))
    assert "model.init_args.learning_rate" in line and "lr" in line


def test_unknown_callback_key_is_named(capsys, config, tmp_path):
    config.write_text(TINY.replace("num_chains: 2", "num_chain: 2"))
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"))
    assert "trainer.callbacks" in line and "num_chain" in line and "num_chains" in line


def test_wrong_type_names_the_key_and_the_expected_type(capsys, config, tmp_path):
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"),
                           "--model.init_args.lr=fast")
    assert "model.init_args.lr" in line and "float" in line and "fast" in line


def test_unknown_trainer_option_is_named(capsys, config, tmp_path):
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"),
                           "--trainer.max_stepz=3")
    assert "--trainer.max_stepz" in line


def test_missing_config_file_is_named(capsys, tmp_path):
    line = _one_line_error(capsys, str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in line and "not found" in line


def test_invalid_yaml_says_so(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: [unclosed\n")
    line = _one_line_error(capsys, str(bad), "--run-dir", str(tmp_path / "r"))
    assert "YAML" in line


def test_a_class_path_that_does_not_import_is_named(capsys, config, tmp_path):
    config.write_text(TINY.replace("ToyModelOfSuperposition", "ToyModelOfSuperpositon"))
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"))
    assert "experiments.tms.ToyModelOfSuperpositon" in line


def test_a_class_that_refuses_its_arguments_gives_its_own_message(capsys, config, tmp_path):
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"),
                           "--model.init_args.num_hidden=3")
    assert "init='4-gon' needs num_hidden=2" in line
    assert not (tmp_path / "r").exists()


def test_trainer_settings_the_machine_cannot_run_are_one_line(capsys, config, tmp_path):
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"),
                           "--trainer.accelerator=tpu")
    assert line.startswith("devinterp run: error: trainer settings:")
    assert not (tmp_path / "r").exists()


def test_a_config_without_the_llc_callback_is_refused_before_training(capsys, config, tmp_path):
    config.write_text(TINY.split("  callbacks:")[0])
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"))
    assert "no devinterp.LLCCallback" in line and "log_spaced" in line
    assert not (tmp_path / "r").exists()


def test_a_non_empty_run_dir_is_refused(capsys, config, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "llc.csv").write_text("step,llc_mean\n")
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"))
    assert str(tmp_path / "r") in line and "not empty" in line


def test_a_bad_sweep_value_fails_before_anything_trains(capsys, config, tmp_path):
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "s"), "--sweep",
                           "model.init_args.lr=0.1,fast")
    assert "lr=fast" in line and "model.init_args.lr" in line
    assert not (tmp_path / "s").exists()


def test_condense_error_keeps_the_innermost_reason_and_the_full_key():
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'experiments.tms.ToyModelOfSuperposition':
        Parser key "init":
          Expected a typing.Literal['4-gon', 'random']. Got value: 5gon
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='init', val='5gon')"""
    line = condense_error(message)
    assert "\n" not in line
    assert line.startswith("config key 'model.init_args.init' must be")
    assert "'4-gon', 'random'" in line and "'5gon'" in line


def test_help_lists_the_config_keys(capsys, config):
    code, out, _ = run(capsys, str(config), "--help")
    assert code == 0 and any("--trainer.max_steps" in line for line in out)
    assert out[0].startswith("usage: devinterp run")
    code, out, _ = run(capsys, str(config), "--model.help",
                       "experiments.tms.ToyModelOfSuperposition")
    assert code == 0 and any("--model.lr" in line for line in out)


# -- --threads: one flag, one policy for every command --------------------------------------------
def test_threads_argument_accepts_positive_integers_only():
    from devinterp.cli import ArgumentParser, add_threads_argument

    parser = ArgumentParser(prog="devinterp x")
    add_threads_argument(parser)
    assert parser.parse_args(["--threads", "3"]).threads == 3
    assert parser.parse_args([]).threads is None
    for bad in ("0", "-2", "two"):
        with pytest.raises(UsageError, match=f"--threads must be a positive integer, got '{bad}'"):
            parser.parse_args(["--threads", bad])


def test_apply_threads_resizes_torch_and_blas_now_and_sets_the_environment(monkeypatch):
    import torch
    from threadpoolctl import threadpool_info

    from devinterp.cli import THREAD_ENV, apply_threads

    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    pools = {p["prefix"]: p["num_threads"] for p in threadpool_info()}
    torch.set_num_threads(1)
    try:
        apply_threads(2)
        assert torch.get_num_threads() == 2
        assert all(os.environ[name] == "2" for name in THREAD_ENV)
        blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
        assert blas and all(p["num_threads"] == 2 for p in blas)
        apply_threads(None)  # None: nothing changes
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="positive integer"):
            apply_threads(0)
    finally:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(before)
        threadpool_limits(pools)


def test_apply_threads_before_torch_is_imported_sizes_it_at_import(tmp_path):
    """A command calls apply_threads before its heavy imports: torch must start with that many
    threads, and apply_threads itself must not import it."""
    code = ("import sys; from devinterp.cli import apply_threads; apply_threads(1); "
            "assert 'torch' not in sys.modules; import os, torch; "
            "print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "OPENBLAS_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1"]


# -- cheap errors come before the heavy imports; no abbreviated options ---------------------------
#: Runs `devinterp run ARGV...` as the console script does, then reports what it had imported.
_PROBE = """\
import json, sys
from devinterp.cli import main
code = main(["run", *sys.argv[1:]])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lightning"))
print(json.dumps({"code": code, "heavy": heavy, "run": "devinterp.cli.run" in sys.modules}))
"""


@pytest.mark.parametrize("case", ["missing", "invalid_yaml", "not_empty", "bad_threads",
                                  "bad_sweep"])
def test_cheap_errors_are_reported_before_torch_or_lightning_is_imported(tmp_path, case):
    """A fresh process runs the command and then lists the modules it has imported: the command
    must have failed with its one line, having gone through devinterp.cli.run, with neither
    torch nor lightning in sys.modules (they take most of a minute to import on a busy CPU)."""
    good = tmp_path / "good.yaml"
    good.write_text(TINY)
    (tmp_path / "bad.yaml").write_text("model:\n  class_path: [unclosed\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    argv, expected = {
        "missing": (["nope.yaml"], "'nope.yaml' not found"),
        "invalid_yaml": (["bad.yaml"], "is not valid YAML"),
        "not_empty": ([str(good), "--run-dir", "full"], "exists and is not empty"),
        "bad_threads": ([str(good), "--threads", "0"], "--threads must be a positive integer"),
        "bad_sweep": ([str(good), "--sweep", "seed"], "is not KEY=V1,V2"),
    }[case]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    errors = proc.stderr.strip().splitlines()
    assert report["code"] == 2 and report["run"]
    assert len(errors) == 1 and errors[0].startswith("devinterp run: error: "), errors
    assert expected in errors[0]
    assert report["heavy"] == []


def test_an_abbreviated_option_is_an_error_that_names_the_full_one(capsys, config, tmp_path):
    """argparse would take --trainer.max_step as --trainer.max_steps and run: refused."""
    line = _one_line_error(capsys, str(config), "--run-dir", str(tmp_path / "r"),
                           "--trainer.max_step=100")
    assert "unknown option(s) --trainer.max_step=100" in line
    assert "did you mean --trainer.max_steps?" in line
    assert not (tmp_path / "r").exists()


def test_threads_flag_overrides_the_configs_torch_threads(capsys, config, tmp_path, monkeypatch):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from devinterp.cli import THREAD_ENV

    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    config.write_text("torch_threads: 1\n" + TINY)
    before = torch.get_num_threads()
    pools = {p["prefix"]: p["num_threads"] for p in threadpool_info()}
    try:
        code, _, _ = run(capsys, str(config), "--run-dir", str(tmp_path / "t"), "--threads", "2",
                         "--trainer.max_steps=6", "--trainer.callbacks.init_args.log_spaced=5")
        assert code == 0 and torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"
        assert yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())["torch_threads"] == 2
    finally:
        torch.set_num_threads(before)
        threadpool_limits(pools)


def test_stages_are_detected_and_written_once_per_run(capsys, config, tmp_path, monkeypatch):
    """Inline training ends with the callback detecting the stages and writing stages.json;
    `devinterp run` reads those back instead of fitting the detector and writing again."""
    from devinterp.run.store import STAGES_FILE, RunStore
    from devinterp.stages.base import Detector

    fits, writes = [], []
    real_fit, real_write = Detector.fit, RunStore.write_json

    def counting_fit(self, *args, **kwargs):
        fits.append(type(self).__name__)
        return real_fit(self, *args, **kwargs)

    def counting_write(self, name, obj):
        writes.append(name)
        return real_write(self, name, obj)

    monkeypatch.setattr(Detector, "fit", counting_fit)
    monkeypatch.setattr(RunStore, "write_json", counting_write)
    run_dir = tmp_path / "once"
    code, _, err = run(capsys, str(config), "--run-dir", str(run_dir), "--trainer.max_steps=30")
    assert code == 0
    assert fits == ["CriticalPoints"] and writes.count(STAGES_FILE) == 1
    stages = load_run(run_dir).stages
    assert stages and stages[-1]["end_step"] == 30
    assert any(line.split()[:2] == ["stage", "type"] for line in err)  # the table, printed


def test_the_config_repository_root_makes_its_experiments_importable(capsys, config, tmp_path,
                                                                     monkeypatch):
    """`experiments` is not installed: a config in a repository's configs/ folder imports the
    code next to that folder, from any current directory; elsewhere it cannot."""
    lab = tmp_path / "lab"
    (lab / "configs").mkdir(parents=True)
    (lab / "labexp").mkdir()
    (lab / "labexp" / "__init__.py").write_text("")
    (lab / "labexp" / "tms.py").write_text((REPO / "experiments" / "tms.py").read_text())
    text = TINY.replace("experiments.tms.", "labexp.tms.")
    (lab / "configs" / "tiny.yaml").write_text(text)
    (tmp_path / "elsewhere.yaml").write_text(text)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path / "lab" / "configs")  # not the repository root
    code, _, err = run(capsys, str(tmp_path / "elsewhere.yaml"), "--run-dir",
                       str(tmp_path / "no"), "--trainer.max_steps=6")
    assert code == 2 and "cannot import class_path 'labexp.tms" in err[-1]
    code, out, _ = run(capsys, str(lab / "configs" / "tiny.yaml"), "--run-dir",
                       str(tmp_path / "yes"), "--trainer.max_steps=6",
                       "--trainer.callbacks.init_args.log_spaced=5")
    assert code == 0 and out[-1] == str(tmp_path / "yes")
    assert sys.modules["labexp.tms"].__file__ == str(lab / "labexp" / "tms.py")


def test_the_wheel_holds_devinterp_only(tmp_path):
    """No top-level `experiments` package goes into site-packages."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("devinterp", "experiments"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(src), "-w", str(tmp_path / "w")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "w").glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert "devinterp" in tops and "experiments" not in tops, tops


def test_the_console_script_imports_from_the_current_directory(tmp_path, monkeypatch, capsys):
    """As under `python -m devinterp`, modules in the current directory are importable (the
    console script's own sys.path lacks it): `devinterp estimate` of a deferred run rebuilds
    `experiments.*` from the repository root, where it is not installed."""
    import importlib

    (tmp_path / "cwd_module_for_devinterp.py").write_text("VALUE = 7\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    assert cli_main(["stages", "missing.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sys.path[-1] == str(tmp_path)
    assert importlib.import_module("cwd_module_for_devinterp").VALUE == 7
