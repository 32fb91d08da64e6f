"""The callback never ends training: an estimator error, a non-finite loss at w*, a failure on
one DDP rank, or a run-store write that fails becomes a failed row (or a warning) and training
runs to the end, exactly as it would have without the callback."""

from __future__ import annotations

import errno
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from llc_models import FAST, Tiny, regression_data, trainer

from devinterp import LLCCallback, load_run
from devinterp.run.store import RunStore
from devinterp.tracking import EstimateFailure, record_result, run_estimator


class FailsFromStep4(Tiny):
    """λ̂'s loss raises from step 4 on (as a vmap, sdpa or dtype failure would)."""

    def llc_batch_loss(self, forward, batch):
        if self.global_step >= 4:
            raise RuntimeError("vmap: no batching rule for aten::_fused_sdp_choice")
        return self.loss_fn(forward(batch[0]), batch[1])


def train(tmp_path, module_class, callbacks, max_steps=8):
    pl.seed_everything(0, verbose=False)
    module = module_class(dropout=0.2)
    t = trainer(tmp_path, callbacks, max_steps=max_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(module)
    return t, module, [str(w.message) for w in caught]


def test_an_estimator_error_is_a_failed_row_one_warning_and_training_is_untouched(tmp_path):
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=2, progress=False, **FAST)
    t, module, caught = train(tmp_path, FailsFromStep4, [cb])
    _, reference, _ = train(tmp_path, FailsFromStep4, [])
    assert t.global_step == 8
    for k, v in reference.state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k
    table = load_run(tmp_path / "run").llc.set_index("step")
    assert list(table.index) == [0, 2, 4, 6, 8]
    assert (table.loc[[0, 2], "status"] == "ok").all()
    failed = table.loc[[4, 6, 8]]
    assert (failed["status"] == "failed").all() and failed["llc_mean"].isna().all()
    assert (failed["reason"] == "RuntimeError: vmap: no batching rule for "
                                "aten::_fused_sdp_choice").all()
    ours = [m for m in caught if "no λ̂ at step" in m]
    assert len(ours) == 1 and "step 4" in ours[0] and "training goes on" in ours[0]


def test_a_non_finite_loss_at_w_star_is_a_failed_row(tmp_path):
    x, y = regression_data(64)
    y[3] = float("nan")
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, data=(x, y),
                     **{**FAST, "batch_size": 64})
    t, _, caught = train(tmp_path, Tiny, [cb])
    assert t.global_step == 8
    table = load_run(tmp_path / "run").llc
    assert table["step"].tolist() == [0, 4, 8] and (table["status"] == "failed").all()
    assert table["reason"].str.startswith("the loss at w* is not finite").all()
    assert sum("no λ̂ at step" in m for m in caught) == 1


def test_run_estimator_and_record_result_speak_estimate_failure(tmp_path):
    """Divergence is an EstimateFailure (a value, not an exception), and record_result writes
    it, or a plain reason string, as a failed row."""
    x, y = regression_data(64)
    model = torch.nn.Linear(4, 1)
    out = run_estimator(model, (x, y), loss_fn=torch.nn.functional.mse_loss,
                        options={**FAST, "step_size": 10.0, "nbeta": 1e6, "sampler": "sgld"})
    assert isinstance(out, EstimateFailure) and "diverged" in out.reason
    store = RunStore(tmp_path, create=True)
    assert record_result(store, 1, out)["reason"] == out.reason
    assert record_result(store, 2, "non-finite weights at this step")["status"] == "failed"
    table = load_run(tmp_path).llc
    assert table["status"].tolist() == ["failed", "failed"] and table["llc_mean"].isna().all()


def test_a_run_store_write_that_fails_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    real = RunStore.save_snapshot

    def disk_full(self, step, state_dict):
        if step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, state_dict)

    monkeypatch.setattr(RunStore, "save_snapshot", disk_full)
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=2, progress=False, **FAST)
    t, _, caught = train(tmp_path, Tiny, [cb])
    assert t.global_step == 8
    run = load_run(tmp_path / "run")
    assert sorted(run.snapshots) == [0, 2]
    assert run.llc["step"].tolist() == [0, 2, 4, 6, 8] and (run.llc["status"] == "ok").all()
    ours = [m for m in caught if "could not save the snapshot" in m]
    assert len(ours) == 1 and "No space left" in ours[0]


class FailsOnRank1(Tiny):
    """λ̂'s loss raises on global rank 1 only."""

    def llc_batch_loss(self, forward, batch):
        if self.global_rank == 1:
            raise RuntimeError("out of memory on rank 1")
        return self.loss_fn(forward(batch[0]), batch[1])


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_a_failure_on_one_ddp_rank_neither_deadlocks_nor_ends_training(tmp_path):
    """Rank 1's chain fails at every step: the ranks still meet at the gather, rank 0's chains
    make the row (with a warning naming the failure), and training reaches max_steps (the row
    of step 4 is written after the last optimizer step)."""
    cb = LLCCallback(tmp_path / "ddp", every_n_train_steps=2, progress=False,
                     **{**FAST, "num_chains": 3})
    pl.seed_everything(0, verbose=False)
    t = pl.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[cb],
    )
    t.fit(FailsOnRank1())
    table = load_run(tmp_path / "ddp").llc
    assert table["step"].tolist() == [0, 2, 4] and (table["status"] == "ok").all()
    assert (table["num_chains"] == 2).all() and np.isfinite(table["llc_mean"]).all()
    assert table["warnings"].str.contains(
        r"on 1 rank\(s\) the estimate failed \(RuntimeError: out of memory on rank 1\)").all()
