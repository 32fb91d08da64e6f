"""README's "Attach to your run" example, as a user runs it: the code block is the example file,
and the estimate-later path (deferred snapshots, `devinterp estimate`, a Lightning checkpoint
folder) gives the table README shows, converged at its settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devinterp import load_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "regression.py"


def readme_block(after: str) -> str:
    """The first fenced block after the line containing ``after``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    match = re.search(r"```[a-z]*\n(.*?)```", text[start:], re.S)
    assert match, f"no code block after {after!r} in README.md"
    return match.group(1)


def expected_table() -> dict[int, tuple[float, float, float]]:
    """step -> (llc_mean, llc_std, rhat) from README's expected output of the example."""
    rows = {}
    for line in readme_block("prints (the last lines):").splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[-1] == "ok":
            rows[int(parts[1])] = (float(parts[2]), float(parts[3]), float(parts[4]))
    assert len(rows) >= 10
    return rows


def test_the_readme_block_is_the_example_file():
    assert readme_block("Attach to your run").strip() == EXAMPLE.read_text().strip()


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_estimate_later_reproduces_readme_table(tmp_path: Path):
    shutil.copy(EXAMPLE, tmp_path / "regression.py")
    devinterp = [sys.executable, "-m", "devinterp"]
    printed = run([sys.executable, "regression.py", "deferred"], tmp_path)
    assert "devinterp estimate runs/regression-deferred" in printed
    run([*devinterp, "estimate", "runs/regression-deferred", "--module",
         "regression.py:Regression"], tmp_path)
    run_dir = load_run(tmp_path / "runs" / "regression-deferred")
    llc = run_dir.llc.set_index("step")
    expected = expected_table()
    assert sorted(llc.index) == sorted(expected)
    assert (llc["status"] == "ok").all()
    for step, (mean, std, rhat) in expected.items():
        # The numbers README prints for the inline run: deferred + estimate gives the same
        # curve; only the run's step size differs (calibrated on other checkpoints).
        assert llc.loc[step, "llc_mean"] == pytest.approx(mean, abs=0.25 * std), step
        assert llc.loc[step, "rhat"] == pytest.approx(rhat, abs=0.02), step
    assert llc["step_size"].nunique() == 1  # one step size for the whole run
    # Converged at its settings: at every checkpoint near a minimum (λ̂ > 0), and within
    # 1.11 on the first steps of training, far from one.
    assert llc.loc[llc["llc_mean"] > 0, "rhat"].max() <= 1.1
    assert llc["rhat"].max() <= 1.11
    assert (tmp_path / "runs" / "regression-deferred" / "stages.json").exists()

    # The Lightning checkpoint of the same run: λ̂ goes next to the folder, not into it.
    ckpts = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints"
    run([*devinterp, "estimate", str(ckpts.relative_to(tmp_path)), "--module",
         "regression.py:Regression", "--num-chains", "4", "--num-draws", "1000"], tmp_path)
    assert sorted(p.suffix for p in ckpts.iterdir()) == [".ckpt"]
    from_ckpt = load_run(ckpts.with_name("checkpoints-llc")).llc.set_index("step")
    assert from_ckpt.loc[1000, "llc_mean"] == pytest.approx(expected[1000][0],
                                                            abs=0.25 * expected[1000][1])
