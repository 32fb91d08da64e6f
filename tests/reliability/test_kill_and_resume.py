"""SIGKILL (not an exception) during training and during estimation, then resume: the λ̂ table
and the training metrics end complete, with no duplicate row, and no reader ever sees a partial
table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from devinterp import load_run
from devinterp.run.store import LLC_FILE, RunStore

TESTS = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from llc_models import FAST, TinyWithVal, trainer
    from plain_modules import Regressor
    import devinterp.llc.driver
    from devinterp import LLCCallback

    run_dir, ckpt_dir, kill, resume, name = sys.argv[1:6]
    # TinyWithVal: a loss_fn attribute, and validation at the checkpoint steps (its val_loss
    # row is recorded after the checkpoint is saved); Regressor: an unchanged module, λ̂ from
    # its own training_step.
    module = {"TinyWithVal": TinyWithVal, "Regressor": Regressor}[name]

    class KillDuringTraining(Callback):
        def on_train_batch_end(self, trainer, *args):
            if kill == "training" and trainer.global_step == 7:
                os.kill(os.getpid(), signal.SIGKILL)

    if kill == "estimation":  # die inside the third estimate (step 6), mid-sampling
        real, calls = devinterp.llc.driver.run_chains, []
        def dying(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        devinterp.llc.driver.run_chains = dying

    pl.seed_everything(0, verbose=False)
    callbacks = [LLCCallback(run_dir, every_n_train_steps=3, progress=False, **FAST),
                 ModelCheckpoint(ckpt_dir, every_n_train_steps=4, save_top_k=-1),
                 KillDuringTraining()]
    ckpts = sorted(Path(ckpt_dir).glob("*.ckpt"), key=os.path.getmtime)
    ckpt = str(ckpts[-1]) if resume == "resume" and ckpts else None
    trainer(Path(run_dir).parent, callbacks, max_steps=10,
            enable_checkpointing=True).fit(module(shuffle=False), ckpt_path=ckpt)
    """
)


def train(tmp_path: Path, name: str, kill: str, resume: bool, module: str) -> int:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    cmd = [sys.executable, str(script), str(tmp_path / name), str(tmp_path / f"{name}-ckpt"),
           kill, "resume" if resume else "fresh", module]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode


def assert_clean_table(run_dir: Path) -> pd.DataFrame:
    table = load_run(run_dir).llc
    assert table["step"].is_unique
    leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers or all(p.startswith(".") for p in leftovers)
    return table


@pytest.mark.slow
@pytest.mark.parametrize(("kill", "module"), [
    ("training", "TinyWithVal"), ("estimation", "TinyWithVal"), ("training", "Regressor"),
])
def test_sigkill_then_resume_gives_the_uninterrupted_table(tmp_path, kill, module):
    assert train(tmp_path, "ref", "none", resume=False, module=module) == 0
    reference = assert_clean_table(tmp_path / "ref")
    assert reference["step"].tolist() == [0, 3, 6, 9]

    assert train(tmp_path, "run", kill, resume=False, module=module) == -signal.SIGKILL
    killed = assert_clean_table(tmp_path / "run")  # parseable, nothing duplicated
    assert killed["step"].tolist() == ([0, 3, 6] if kill == "training" else [0, 3])

    assert train(tmp_path, "run", "none", resume=True, module=module) == 0
    resumed = assert_clean_table(tmp_path / "run")
    cols = ["step", "llc_mean", "llc_std", "status"]
    pd.testing.assert_frame_equal(resumed[cols], reference[cols])
    # Every training metric too, the validation row of the checkpoint step included.
    pd.testing.assert_frame_equal(load_run(tmp_path / "run").metrics,
                                  load_run(tmp_path / "ref").metrics)


WRITER = textwrap.dedent(
    """
    import sys
    from devinterp.run.store import RunStore
    store = RunStore(sys.argv[1])
    for i in range(int(sys.argv[2])):
        store.write_llc_row({"step": i, "llc_mean": float(i), "llc_std": 0.0,
                             "note": "x" * (i % 50)})
    """
)


@pytest.mark.slow
def test_readers_never_see_a_partial_table(tmp_path):
    RunStore(tmp_path, create=True)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "300"])
    seen = 0
    while proc.poll() is None:
        if (tmp_path / LLC_FILE).exists():
            table = RunStore(tmp_path).read_table(LLC_FILE)
            assert table["step"].tolist() == list(range(len(table)))
            assert len(table) >= seen
            seen = len(table)
    assert proc.returncode == 0
    assert RunStore(tmp_path).read_table(LLC_FILE)["step"].tolist() == list(range(300))


@pytest.mark.slow
def test_two_processes_writing_one_table_lose_and_duplicate_nothing(tmp_path):
    RunStore(tmp_path, create=True)
    code = textwrap.dedent(
        """
        import sys
        from devinterp.run.store import RunStore
        store, parity = RunStore(sys.argv[1]), int(sys.argv[2])
        for step in range(parity, 120, 2):
            store.write_llc_row({"step": step, "llc_mean": float(step), "llc_std": 0.0})
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(p)])
             for p in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    table = RunStore(tmp_path).read_table(LLC_FILE)
    assert table["step"].tolist() == list(range(120))
    assert (table["llc_mean"] == table["step"]).all()
