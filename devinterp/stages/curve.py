"""A λ̂ curve from whatever holds one: a Run, a DataFrame, a run directory or a CSV file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from devinterp.run.store import Run, load_run
from devinterp.stages.points import log_step

__all__ = ["curve_frame", "loss_at"]

_LOSS_WINDOW = 0.01  # decades: metrics rows this close to a checkpoint give its loss (median)
_NEEDS = "it needs columns step, llc_mean (optional llc_std, loss)"


def _loss_column(metrics: pd.DataFrame) -> str | None:
    """The training loss column of a metrics table: train_loss, else loss, else any *loss*."""
    for name in ("train_loss", "loss"):
        if name in metrics.columns:
            return name
    return next((c for c in metrics.columns if "loss" in str(c)), None)


def loss_at(steps: np.ndarray, metrics: pd.DataFrame) -> np.ndarray:
    """The training loss at λ̂ ``steps``: the median of the metrics rows within 0.01 decades of
    log-step (robust to minibatch noise), else linear interpolation in log-step; NaN outside
    the logged range or when no loss was logged."""
    col = _loss_column(metrics)
    out = np.full(len(steps), np.nan)
    if col is None:
        return out
    m = metrics[["step", col]].apply(pd.to_numeric, errors="coerce").dropna()
    if m.empty:
        return out
    m = m.sort_values("step")
    mx, my = log_step(m["step"].to_numpy()), m[col].to_numpy(dtype=float)
    for i, x in enumerate(log_step(steps)):
        lo, hi = np.searchsorted(mx, [x - _LOSS_WINDOW, x + _LOSS_WINDOW + 1e-12])
        if hi > lo:
            out[i] = np.median(my[lo:hi])
        elif mx[0] <= x <= mx[-1]:
            out[i] = np.interp(x, mx, my)
    return out


def _read_path(path: Path) -> Run | pd.DataFrame:
    """The run of a run directory or the table of a CSV file."""
    source = str(path)
    if path.is_dir():
        if not (path / "llc.csv").exists():
            raise ValueError(f"run directory {source} has no llc.csv; estimate λ̂ first "
                             f"(devinterp estimate {source})")
        return load_run(path)
    if path.is_file():
        try:
            return pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ValueError(f"{source} is not a readable CSV ({e}); {_NEEDS}") from e
    raise FileNotFoundError(f"{source} does not exist; pass a run directory or a CSV "
                            f"with columns step, llc_mean")


def _checked(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The columns ``step, llc_mean, llc_std, loss, num_chains``, numeric, sorted by step, one
    row per step."""
    missing = [c for c in ("step", "llc_mean") if c not in frame.columns]
    if missing:
        raise ValueError(f"{source} has no column {', '.join(missing)} (columns: "
                         f"{', '.join(map(str, frame.columns)) or 'none'}); {_NEEDS}")
    for col in ("llc_std", "loss", "num_chains"):
        if col not in frame.columns:
            frame[col] = np.nan
    frame = frame[["step", "llc_mean", "llc_std", "loss", "num_chains"]].apply(
        pd.to_numeric, errors="coerce")
    if frame["step"].isna().any() or (frame["step"] < 0).any():
        raise ValueError(f"{source} has missing, non-numeric or negative steps; steps must be "
                         "the trainer's global_step (0, 1, ...)")
    frame["step"] = frame["step"].astype(np.int64)
    frame = frame.sort_values("step", kind="stable")
    dup = frame["step"][frame["step"].duplicated()].unique()
    if len(dup):
        raise ValueError(f"{source} has duplicate steps ({', '.join(map(str, dup[:5]))}); keep "
                         "one λ̂ row per step")
    return frame.reset_index(drop=True)


def curve_frame(curve: Any) -> tuple[pd.DataFrame, str]:
    """``step, llc_mean, llc_std, loss, num_chains`` (the last three possibly all NaN) from a
    Run, a DataFrame, a run directory or a CSV file, and a name for it in messages."""
    source = "the curve"
    if isinstance(curve, (str, os.PathLike)):
        source = str(Path(curve))
        curve = _read_path(Path(curve))
    if isinstance(curve, Run):
        source = str(curve.path)
        frame = curve.llc.copy()
        frame["loss"] = loss_at(frame["step"].to_numpy(), curve.metrics)
    elif isinstance(curve, pd.DataFrame):
        frame = curve.copy()
    else:
        raise TypeError(f"cannot read a λ̂ curve from {type(curve).__name__}; pass a Run, a "
                        "DataFrame, a run directory or a CSV path")
    return _checked(frame, source), source
