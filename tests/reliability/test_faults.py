"""Faults a long training run meets: a full disk under a logger, a tracker that raises, a
corrupt or malicious snapshot, and bad arguments to every command. Nothing the user already has
is lost, and every error is one line that names the problem."""

from __future__ import annotations

import errno
import os
import pickle
import threading
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger, Logger
from llc_models import FAST, Tiny, trainer

from devinterp import LLCCallback, load_run
from devinterp.cli import main as cli_main
from devinterp.run.store import RunStore


class DiskFullLogger(Logger):
    """A logger whose directory has run out of space."""

    @property
    def name(self) -> str:
        return "diskfull"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def fit(tmp_path: Path, loggers, **kwargs) -> Path:
    run_dir = tmp_path / "run"
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(run_dir, every_n_train_steps=4, progress=False, **FAST, **kwargs)
    trainer(tmp_path, [cb], logger=loggers, max_steps=8).fit(Tiny())
    return run_dir


def test_disk_full_logger_training_goes_on_rows_land_one_warning(tmp_path):
    csv = CSVLogger(tmp_path / "logs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_dir = fit(tmp_path, [DiskFullLogger(), csv])
    assert load_run(run_dir).llc["step"].tolist() == [0, 4, 8]
    ours = [w for w in caught if "DiskFullLogger" in str(w.message)]
    assert len(ours) == 1 and "No space left" in str(ours[0].message)


def test_wandb_raising_loses_no_row(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="reliability")

    def unreachable(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wb, "log_metrics", unreachable)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_dir = fit(tmp_path, [wb])
    finally:
        wb.experiment.finish()
    assert sum("unreachable" in str(w.message) for w in caught) == 1
    assert load_run(run_dir).llc["step"].tolist() == [0, 4, 8]


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_and_truncated_snapshots_are_named_skipped_and_never_executed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(run_dir, every_n_train_steps=4, mode="deferred", progress=False, **FAST)
    trainer(tmp_path, [cb], max_steps=12).fit(Tiny())
    snaps = RunStore(run_dir).snapshots()
    marker = tmp_path / "pwned"
    with open(snaps[4], "wb") as f:
        pickle.dump({"net.0.weight": _Payload(marker)}, f)
    snaps[8].write_bytes(snaps[8].read_bytes()[:100])  # truncated mid-write by a crash
    snaps[12].write_bytes(b"")  # what an operating-system crash can leave (snapshots: no fsync)
    code = cli_main(["estimate", str(run_dir), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert all(str(snaps[s]) in err for s in (4, 8, 12))
    assert not marker.exists()
    assert load_run(run_dir).llc["step"].tolist() == [0]


@pytest.fixture
def csv_curve(tmp_path: Path) -> Path:
    p = tmp_path / "curve.csv"
    p.write_text("step,llc_mean\n" + "".join(f"{s},{s / 10}\n" for s in range(1, 40)))
    return p


@pytest.mark.parametrize(
    "argv",
    [
        ["nonsense"],
        ["run", "{tmp}/missing.yaml"],
        ["run", "{tmp}/curve.csv"],
        ["estimate", "{tmp}/missing"],
        ["estimate", "{tmp}", "--num-chains", "0"],
        ["estimate", "{tmp}", "--num-draws", "1"],
        ["estimate", "{tmp}", "--step-size", "inf"],
        ["estimate", "{tmp}", "--num-samples", "0"],
        ["estimate", "{tmp}", "--chain-chunk-size", "0"],
        ["estimate", "{tmp}", "--device", "foo"],
        ["estimate", "{tmp}", "--threads", "0"],
        ["estimate", "{tmp}", "--workers", "2", "--rank", "3"],
        ["stages", "{tmp}/missing.csv"],
        ["stages", "{tmp}/curve.csv", "--method", "astrology"],
        ["stages", "{tmp}/curve.csv", "--min-stage-length", "soon"],
        ["dashboard", "{tmp}/missing", "-o", "{tmp}/x.html"],
        ["dashboard", "{tmp}", "--serve", "--port", "eighty"],
        ["dashboard", "{tmp}", "-o", "{tmp}/x.html", "--threads", "0"],
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_no_traceback(tmp_path, csv_curve, capsys, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli_main(argv) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err + out.out


def test_dashboard_threads_are_applied(tmp_path, capsys, monkeypatch):
    """``devinterp dashboard --threads 1`` sizes the thread pools (as every command's
    --threads does) and writes the page; ``--threads 0`` is one line and exit code 2."""
    from test_dashboard import write_run

    from devinterp.cli import THREAD_ENV

    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    run, out = write_run(tmp_path / "run"), tmp_path / "page.html"
    assert cli_main(["dashboard", str(run), "-o", str(out), "--threads", "1"]) == 0
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    assert all(os.environ[name] == "1" for name in THREAD_ENV)
    assert cli_main(["dashboard", str(run), "-o", str(out), "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads must be a positive integer" in err[0], err


def test_a_disk_error_in_any_command_is_one_line(tmp_path, csv_curve, capsys, monkeypatch):
    """An OSError that a command does not word itself (here: stages.json on a full disk) is
    still one line naming it, exit code 2, and the old file is kept."""
    import devinterp.run.store as store_module
    from devinterp.cli import USER_ERRORS

    assert OSError in USER_ERRORS
    run = RunStore(tmp_path / "run", create=True)
    for step in range(1, 40):
        run.write_llc_row({"step": step, "llc_mean": step / 10, "llc_std": 0.1, "status": "ok"})
    (run.path / "stages.json").write_text("[]")

    def disk_full(path, data, *, durable=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(store_module, "atomic_write_bytes", disk_full)
    assert cli_main(["stages", str(run.path)]) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0], out.err
    assert "stages.json" in lines[0] and "Traceback" not in out.err + out.out
    assert (run.path / "stages.json").read_text() == "[]"


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        cli_main(["estimate", str(tmp_path / "missing"), "--debug"])


def test_processes_opening_one_run_directory_at_once_all_succeed(tmp_path):
    """DDP ranks and post-hoc workers open (and check) one run directory at the same moment;
    a shared write-probe file name made some of them fail with "not writable"."""
    errors: list[Exception] = []

    def open_many() -> None:
        for _ in range(200):
            try:
                RunStore(tmp_path / "run", create=True)
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=open_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no probe left behind
