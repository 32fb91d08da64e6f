"""Faults a long training run meets: a full disk under a logger, a tracker that raises, a
corrupt or malicious snapshot, and bad arguments to every command. Nothing the user already has
is lost, and every error is one line that names the problem."""

from __future__ import annotations

import errno
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
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_no_traceback(tmp_path, csv_curve, capsys, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli_main(argv) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err + out.out


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
