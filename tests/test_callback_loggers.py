"""LLCCallback sends λ̂ to every logger at the trainer's global step; the run store comes first."""

from __future__ import annotations

import json
import struct
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from llc_models import FAST, Tiny, trainer

from devinterp import LLCCallback, load_run

STEPS = [0, 4, 8]


def fit(tmp_path, logger, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST, **kwargs)
    t = trainer(tmp_path, [cb], logger=logger, max_steps=8)
    t.fit(Tiny())
    return t


def llc_by_step(tmp_path) -> dict[int, float]:
    table = load_run(tmp_path / "run").llc
    return dict(zip(table["step"], table["llc_mean"], strict=True))


def test_csv_logger_gets_rows_at_the_scheduled_steps(tmp_path):
    logger = CSVLogger(tmp_path / "logs")
    fit(tmp_path, logger)
    logged = pd.read_csv(logger.log_dir + "/metrics.csv")
    rows = logged.dropna(subset=["llc/mean"])
    assert rows["step"].tolist() == STEPS
    assert dict(zip(rows["step"], rows["llc/mean"], strict=True)) == pytest.approx(
        llc_by_step(tmp_path))
    for key in ("llc/std", "llc/mala_acceptance", "llc/nbeta", "llc/init_loss"):
        assert rows[key].notna().all(), key
    assert logged["train_loss"].notna().sum() == 8  # the module's own logging is unchanged
    # 3 λ̂ points are too few for stages: none logged, none written, no warning.
    assert "stage/index" not in logged and load_run(tmp_path / "run").stages == []


def test_stages_are_written_and_logged_on_the_llc_steps_at_the_end(tmp_path):
    logger = CSVLogger(tmp_path / "logs")
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST)
    trainer(tmp_path, [cb], logger=logger, max_steps=32).fit(Tiny())
    run = load_run(tmp_path / "run")
    assert run.stages and run.stages[-1]["end_step"] == 32
    logged = pd.read_csv(logger.log_dir + "/metrics.csv").dropna(subset=["stage/index"])
    assert sorted(logged["step"]) == list(range(0, 33, 4))
    for step, index in zip(logged["step"], logged["stage/index"], strict=True):
        stage = run.stages[int(index) - 1]
        assert stage["start_step"] <= step <= stage["end_step"]
        assert step == 0 or step > stage["start_step"]


def test_tensorboard_logger_gets_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path / "tb")
    fit(tmp_path, logger)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("llc/mean")}
    assert scalars == pytest.approx(llc_by_step(tmp_path), rel=1e-6)


def test_mlflow_logger_gets_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file:{tmp_path / 'mlruns'}"
    logger = MLFlowLogger(experiment_name="llc", tracking_uri=uri)
    fit(tmp_path, logger)
    history = MlflowClient(uri).get_metric_history(logger.run_id, "llc/mean")
    assert {m.step: m.value for m in history} == pytest.approx(llc_by_step(tmp_path))


def _wandb_records(path):
    """Records of a W&B offline ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:  # block padding
            pos += left - 7
            continue
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _has_exit(path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(path))
    except Exception:  # a record still being written does not parse yet
        return False


def _finished_runs(save_dir, timeout: float = 60.0) -> list:
    """The offline run files under ``save_dir``, once each holds its exit record (W&B's writer
    process can still be writing when ``finish()`` returns on a busy machine)."""
    deadline = time.monotonic() + timeout
    while True:
        paths = sorted(save_dir.glob("wandb/offline-run-*/run-*.wandb"))
        done = [_has_exit(p) for p in paths]
        if (paths and all(done)) or time.monotonic() > deadline:
            return paths
        time.sleep(0.2)


def wandb_history(save_dir) -> list[dict]:
    """History rows of every offline W&B run under ``save_dir``."""
    rows = []
    for path in _finished_runs(save_dir):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def wandb_step_metrics(save_dir) -> dict[str, str]:
    """``define_metric`` step axes of every offline W&B run under ``save_dir``."""
    out = {}
    for path in _finished_runs(save_dir):
        for r in _wandb_records(path):
            if r.WhichOneof("record_type") == "metric":
                out[r.metric.glob_name or r.metric.name] = r.metric.step_metric
    return out


def test_wandb_offline_gets_llc_on_the_loss_step_axis(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=tmp_path, offline=True, project="devinterp-test")
    try:
        fit(tmp_path, logger)
        summary = dict(logger.experiment.summary)
    finally:
        wandb.finish()
    expected = llc_by_step(tmp_path)
    assert summary["llc/mean"] == pytest.approx(expected[8])
    history = wandb_history(tmp_path)
    llc = {r["trainer/global_step"]: r["llc/mean"] for r in history if "llc/mean" in r}
    assert llc == pytest.approx(expected)
    assert any("train_loss" in r and "trainer/global_step" in r for r in history)
    assert wandb_step_metrics(tmp_path)["llc/*"] == "trainer/global_step"
    assert wandb_step_metrics(tmp_path)["stage/*"] == "trainer/global_step"
    meta = load_run(tmp_path / "run").meta["wandb"]
    assert meta["id"] == logger.version and meta["project"] == "devinterp-test"
    # the dashboard page, attached at the end as W&B media
    assert any(r.get("dashboard/_type") == "html-file" for r in history)


class BrokenLogger(Logger):
    """A tracker that is down: every ``log_metrics`` call raises, the trainer's own too."""

    calls = 0

    @property
    def name(self):
        return "broken"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        BrokenLogger.calls += 1
        raise ConnectionError("tracker unreachable")


def test_a_failing_logger_loses_no_row_and_warns_once(tmp_path):
    BrokenLogger.calls = 0
    broken, csv = BrokenLogger(), CSVLogger(tmp_path / "logs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(tmp_path, [broken, csv])
    assert t.global_step == 8  # training went on
    run = load_run(tmp_path / "run")
    assert run.llc["step"].tolist() == STEPS and (run.llc["status"] == "ok").all()
    assert run.metrics["train_loss"].notna().sum() == 8
    ours = [w for w in caught if "BrokenLogger.log_metrics failed" in str(w.message)]
    assert len(ours) == 1 and "ConnectionError" in str(ours[0].message)
    assert BrokenLogger.calls == 8 + len(STEPS)  # the trainer's 8 rows and our 3
    logged = pd.read_csv(csv.log_dir + "/metrics.csv")  # the other logger still got everything
    assert logged.dropna(subset=["llc/mean"])["step"].tolist() == STEPS
    assert logged["train_loss"].notna().sum() == 8
    assert "log_metrics" not in vars(broken)  # the guard is gone once fitting ends


def test_no_logger_works_and_warns_once(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, False)
    assert load_run(tmp_path / "run").llc["step"].tolist() == STEPS
    assert sum("has no logger" in str(w.message) for w in caught) == 1


class FillTheDisk(Callback):
    """Once the CSVLogger's directory exists, every file it writes goes to /dev/full, which
    fails each write with ENOSPC: a disk that filled up under the logger."""

    def __init__(self, logger: CSVLogger) -> None:
        self.logger = logger

    def setup(self, trainer, pl_module, stage) -> None:
        for name in ("metrics.csv", "hparams.yaml"):
            path = Path(self.logger.log_dir) / name
            path.unlink(missing_ok=True)
            path.symlink_to("/dev/full")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_csv_logger_warns_once_and_training_goes_on(tmp_path):
    """CSVLogger writes in log_hyperparams, save (after every log_metrics) and finalize: each
    raises on a full disk, none ends training, and λ̂ and the training metrics are all in the
    run store."""
    csv = CSVLogger(tmp_path / "logs")
    pl.seed_everything(0, verbose=False)
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, **FAST)
    t = trainer(tmp_path, [FillTheDisk(csv), cb], logger=csv, max_steps=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Tiny())
    assert t.global_step == 8
    run = load_run(tmp_path / "run")
    assert run.llc["step"].tolist() == STEPS and (run.llc["status"] == "ok").all()
    assert run.metrics["train_loss"].notna().sum() == 8
    ours = [str(w.message) for w in caught if "CSVLogger." in str(w.message)]
    assert len(ours) == 1 and "CSVLogger.log_hyperparams failed" in ours[0]
    assert "No space left on device" in ours[0]
    assert not set(vars(csv)) & {"log_metrics", "log_hyperparams", "save", "finalize"}


def test_metrics_recorder_keeps_changed_values_and_rows_a_failed_write_did_not_save(tmp_path):
    """metrics.csv gets a value once per change (a stale callback_metrics entry is not recorded
    again at later steps), and rows a failing write could not save are written by the next."""
    import torch

    from devinterp.run.store import RunStore
    from devinterp.tracking.loggers import MetricsRecorder

    rec, store = MetricsRecorder(), RunStore(tmp_path, create=True)
    rec.record({"train_loss": torch.tensor(1.0), "vec": torch.ones(3), "name": "x"}, 0)
    rec.record({"train_loss": torch.tensor(1.0), "val_loss": 2.0}, 1)
    rec.record({"train_loss": torch.tensor(1.0), "val_loss": 2.0}, 2)  # nothing changed

    def disk_full(rows):
        raise OSError(28, "No space left on device")

    real, store.write_metrics = store.write_metrics, disk_full
    with pytest.raises(OSError):
        rec.flush(store)
    store.write_metrics = real
    rec.flush(store)
    m = load_run(tmp_path).metrics
    assert m["step"].tolist() == [0, 1]
    assert m["train_loss"].tolist()[0] == 1.0 and pd.isna(m["train_loss"].tolist()[1])
    assert pd.isna(m["val_loss"].tolist()[0]) and m["val_loss"].tolist()[1] == 2.0
    assert "vec" not in m.columns and "name" not in m.columns
