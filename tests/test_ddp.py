"""LLCCallback under DDP: chains split over two CPU processes (gloo) equal a one-process run."""

from __future__ import annotations

import shutil

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from llc_models import FAST, Tiny

from devinterp import LLCCallback, load_run
from devinterp.run.estimate import estimate_run
from devinterp.run.store import LLC_FILE, TRACE_DIR
from devinterp.tracking import chain_range


def ddp_fit(tmp_path, callback: LLCCallback) -> None:
    """Train Tiny for 4 steps on two CPU processes (ddp_spawn, gloo) with ``callback``."""
    pl.seed_everything(0, verbose=False)
    pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=4, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path,
               callbacks=[callback]).fit(Tiny())


def estimate_copy(tmp_path, run_dir):
    """The run's snapshots (and calibration.json) copied without its rows, estimated in one
    process: what a single-process run with the same settings writes."""
    single = tmp_path / "single"
    shutil.copytree(run_dir, single)
    (single / LLC_FILE).unlink()
    shutil.rmtree(single / TRACE_DIR)
    estimate_run(single, progress=False)
    return single


def test_chain_range_splits_chains_without_overlap():
    for chains in range(1, 9):
        for world in range(1, 5):
            ranges = [chain_range(chains, world, r) for r in range(world)]
            covered = [c for first, n in ranges for c in range(first, first + n)]
            assert covered == list(range(chains)), (chains, world)
    assert chain_range(3, 2, 0) == (0, 2) and chain_range(3, 2, 1) == (2, 1)
    assert chain_range(1, 2, 1) == (1, 0)  # a rank with no chain


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_spawn_two_cpu_processes_matches_one_process(tmp_path):
    settings = {**FAST, "num_chains": 3}  # rank 0 runs chains 0-1, rank 1 runs chain 2
    run_dir = tmp_path / "ddp"
    ddp_fit(tmp_path, LLCCallback(run_dir, every_n_train_steps=2, progress=False, **settings))
    ddp = load_run(run_dir)
    assert ddp.llc["step"].tolist() == [0, 2, 4] and (ddp.llc["status"] == "ok").all()
    assert (ddp.llc["num_chains"] == 3).all()
    assert ddp.trace(2).shape == (3, FAST["num_draws"])

    # The same snapshots estimated in one process with the same seed: the same numbers.
    single = estimate_copy(tmp_path, run_dir)
    one = load_run(single)
    numeric = ["llc_mean", "llc_std", "init_loss", "mala_acceptance", "nbeta", "step_size"]
    pd.testing.assert_frame_equal(ddp.llc[["step", *numeric]], one.llc[["step", *numeric]],
                                  rtol=1e-5)
    for step in (0, 2, 4):
        np.testing.assert_allclose(ddp.trace(step), one.trace(step), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_run_calibration_holds_rank_zeros_step_on_every_rank(tmp_path):
    """Step size unset: global rank 0 calibrates, every rank samples with its ε (the rows
    equal a one-process estimate of the same snapshots with the same run settings)."""
    settings = {key: value for key, value in FAST.items() if key != "step_size"}
    settings["num_chains"] = 3
    run_dir = tmp_path / "ddp"
    ddp_fit(tmp_path, LLCCallback(run_dir, every_n_train_steps=2, progress=False, **settings))
    ddp = load_run(run_dir)
    (entry,) = ddp.calibration.values()
    assert ddp.llc["step"].tolist() == [0, 2, 4] and (ddp.llc["status"] == "ok").all()
    assert (ddp.llc["step_size"] == entry["step_size"]).all()
    single = estimate_copy(tmp_path, run_dir)  # reuses calibration.json: the run's settings
    one = load_run(single)
    numeric = ["llc_mean", "llc_std", "step_size", "nbeta"]
    pd.testing.assert_frame_equal(ddp.llc[["step", *numeric]], one.llc[["step", *numeric]],
                                  rtol=1e-5)
