"""The benchmark scripts run end to end at their smallest settings and print what they
promise (every figure they time is a ratio measured in the run, so only its presence and sanity
can be tested here), and reject bad input with a one-line error."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def run_tool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ratios(text: str) -> list[float]:
    return [float(r) for r in re.findall(r"ratio(?: to bare sequential)?\s+([0-9.]+)x", text)]


@pytest.mark.slow
def test_bench_gpu_quick_on_cpu_prints_every_part() -> None:
    out = run_tool("tools/bench_gpu.py", "--device", "cpu", "--quick")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for section in ("MLP:", "Scaling on the MLP", "GPT-2 (tiny config)", "chain-steps/s:",
                    "deep linear network 12-12-4-12 rank 2", "Deep linear networks"):
        assert section in text, section
    # estimator vs bare vmapped loop: sgld and default sampler, for the three models
    r = ratios(text)
    assert len(r) == 6 and all(0.05 < x < 20 for x in r), r
    scaling = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)x\s+(\d+)\s+n/a$", text, re.M)
    assert [int(c) for c, *_ in scaling] == [1, 2, 4, 8]
    assert all(int(chunk) == int(c) for c, _, _, chunk in scaling)  # all fit in memory
    assert "peak memory n/a" in text  # CPU: no accelerator memory to report
    from devinterp.theory import deep_linear_network_llc

    rows = re.findall(r"^\s+([\d-]+)\s+(\d+)\s+([\d,]+)\s+([\d,.]+)\s+([-\d,.]+)\s+"
                      r"([-+][0-9.]+)%", text, re.M)
    assert len(rows) == 2
    for widths, rank, _, exact, estimate, error in rows:
        w = tuple(int(v) for v in widths.split("-"))
        assert float(exact.replace(",", "")) == pytest.approx(
            deep_linear_network_llc(w, int(rank)), abs=0.05)
        lam_hat = float(estimate.replace(",", ""))
        assert math.isfinite(lam_hat) and lam_hat > 0
        assert float(error) == pytest.approx(
            100 * (lam_hat / float(exact.replace(",", "")) - 1), abs=0.2)


def test_bench_gpu_without_cuda_says_what_to_do() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = run_tool("tools/bench_gpu.py", "--device", "cuda", timeout=120)
    assert out.returncode == 2
    assert "no CUDA device is visible; pass --device cpu" in out.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bench_llc_transformer_quick_prints_ratios_for_both_models() -> None:
    out = run_tool("tools/bench_llc.py", "--transformer", "--quick")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "in-context regression:" in text and "induction LM:" in text
    assert text.count("trained 30 Adam steps") == 2
    r = ratios(text)
    assert len(r) == 6 and all(0.05 < x < 20 for x in r), r  # 3 estimator paths x 2 models
    assert text.count("one forward at w* (the baseline)") == 2
    # issue 12's three convergence figures, for the attention-only LM and the grokking MLP
    criteria = text.split("Convergence at all defaults")[1]
    assert "attention-only LM" in criteria and "grokking MLP" in criteria
    for label in ("split R-hat (defaults)", "relative change, 4x longer",
                  "relative change, eps / 2"):
        assert criteria.count(label) == 2, label
    rhats = [float(v) for v in re.findall(r"split R-hat \(defaults\)\s+([0-9.]+)", criteria)]
    assert all(0.9 < v < 10 for v in rhats), rhats


def import_bench_llc():
    sys.path.insert(0, str(TOOLS))
    try:
        import bench_llc
    finally:
        sys.path.remove(str(TOOLS))
    return bench_llc


@pytest.mark.slow
def test_bench_llc_loads_a_snapshot(tmp_path: Path) -> None:
    bench_llc = import_bench_llc()
    fresh, _, _ = bench_llc.load_transformer("icl", None, 0)
    trained, _, origin = bench_llc.load_transformer("icl", None, 2)
    assert origin.startswith("trained 2 Adam steps, loss ")
    assert not torch.equal(fresh.readout.weight, trained.readout.weight)  # training moved it
    path = tmp_path / "icl.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)  # a Lightning checkpoint's layout
    loaded, llc, origin = bench_llc.load_transformer("icl", str(path), 0)
    assert origin == f"snapshot {path}"
    assert llc["step_size"] == pytest.approx(1e-4)  # the config's sampler settings
    for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    for bad in (tmp_path / "missing.ckpt", tmp_path / "other.pt"):
        with pytest.raises(ValueError, match=f"--checkpoint icl={bad}: not a snapshot of "
                                             "InContextRegression") as e:
            bench_llc.load_transformer("icl", str(bad), 0)
        assert "\n" not in str(e.value)


def test_bench_llc_rejects_a_checkpoint_without_its_model() -> None:
    out = run_tool("tools/bench_llc.py", "--transformer", "--checkpoint", "lm.ckpt",
                   timeout=120)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "--checkpoint 'lm.ckpt': write MODEL=PATH with MODEL one of icl, induction" in last


@pytest.mark.slow
def test_bench_calibration_prints_the_per_run_and_per_call_costs() -> None:
    out = run_tool("tools/bench_calibration.py", "--steps", "40", "--chains", "2", "--draws",
                   "20")
    assert out.returncode == 0, out.stderr
    per_run = re.findall(r"^\s+(inline|post-hoc)\s*: calibration\s+([0-9.]+) s \((\d+) "
                         r"checkpoints calibrated\).* ([0-9.]+)% of the run's estimation time$",
                         out.stdout, re.M)
    assert [p[0] for p in per_run] == ["inline", "post-hoc"]
    assert all(0 < float(p[3]) < 100 and int(p[2]) >= 1 for p in per_run)
    assert per_run[1][2] == "2"  # post-hoc: an early and the last checkpoint
    per_call = re.findall(r"calibration ([0-9.]+) s, the estimate ([0-9.]+) s: (\d+)% extra",
                          out.stdout)
    assert len(per_call) == 2
