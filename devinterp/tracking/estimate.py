"""One estimate at one step, and its row in the run store: the part the callback, ``track_llc``
and ``devinterp estimate`` share.

A step without λ̂ (every chain diverged, a non-finite loss at w*, an estimator error) is an
:class:`EstimateFailure` value, written as a failed row; it never stops training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from torch import Tensor, nn

from devinterp.config import SamplerConfig
from devinterp.run.store import SETTINGS_FILE, RunStore
from devinterp.tracking.losses import estimating

__all__ = ["ESTIMATOR_OPTIONS", "ROW_SETTINGS", "EstimateFailure", "chain_range", "describe",
           "estimator_kwargs", "failed_row", "first_line", "iter_floats", "record_result",
           "resolved_num_chains", "result_row", "run_estimator", "write_settings"]

#: Options of :func:`devinterp.estimate_llc` that the callback and ``devinterp estimate`` pass
#: through and record in ``settings.json``: the fields of :class:`SamplerConfig`, their one home.
ESTIMATOR_OPTIONS = tuple(f.name for f in fields(SamplerConfig))
#: Settings recorded in every λ̂ row: they change λ̂ a lot (always report nβ with λ̂).
ROW_SETTINGS = ("nbeta", "step_size", "localization", "num_chains", "num_draws", "num_burnin",
                "batch_size", "sampler", "seed")


@dataclass(frozen=True)
class EstimateFailure:
    """Why a step has no λ̂ (every chain diverged, a non-finite loss at w*, an estimator error):
    a result of the run, written as a failed row, never a reason to stop training."""

    reason: str
    #: Every chain diverged: the step size is too large here (run calibration lowers it).
    diverged: bool = False


def estimator_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that :func:`devinterp.estimate_llc` takes (None = default).

    Raises:
        ValueError: an unknown name, said by :meth:`SamplerConfig.from_options` (the values
            are checked where they are used: by ``estimate_llc``, or the caller's own checks).
    """
    SamplerConfig.from_options(dict.fromkeys(options))
    return {k: v for k, v in options.items() if v is not None}


def resolved_num_chains(options: Mapping[str, Any]) -> int:
    """The number of chains ``options`` asks for, or the estimator's default."""
    if options.get("num_chains") is not None:
        return int(options["num_chains"])
    return SamplerConfig().num_chains


def chain_range(num_chains: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(first_chain, count)`` of the chains that ``rank`` runs when ``num_chains`` chains are
    split as evenly as possible over ``world_size`` processes (count may be 0)."""
    base, extra = divmod(num_chains, world_size)
    first = rank * base + min(rank, extra)
    return first, base + (1 if rank < extra else 0)


def run_estimator(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    batch_loss: Callable[..., Tensor] | None = None,
    options: Mapping[str, Any] | None = None,
    first_chain: int = 0,
    num_chains: int | None = None,
    recorders: Sequence[Any] = (),
) -> Any:
    """Run :func:`devinterp.estimate_llc` on chains ``[first_chain, first_chain + num_chains)``,
    with ``self.log`` silenced and the optimizer out of reach (:func:`estimating`);
    ``recorders`` see its draws (e.g. :meth:`devinterp.influence.ProbeInfluence.recorder`).

    Returns the ``LLCResult``, or an :class:`EstimateFailure` when the checkpoint has no λ̂:
    every chain diverged, or the loss at w* is not finite. Other errors propagate.
    """
    from devinterp.llc import AllChainsDivergedError, NonFiniteLossError, estimate_llc

    kwargs = estimator_kwargs(options or {})
    if num_chains is not None:
        kwargs["num_chains"] = num_chains
    try:
        with estimating(model):
            return estimate_llc(model, data, loss_fn, batch_loss=batch_loss,
                                first_chain=first_chain, progress=False, recorders=recorders,
                                **kwargs)
    except AllChainsDivergedError as e:
        return EstimateFailure(first_line(e), diverged=True)
    except NonFiniteLossError as e:
        return EstimateFailure(first_line(e))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def result_row(step: int, result: Any) -> dict[str, Any]:
    """The λ̂-table row of an ``LLCResult``: λ̂, its std over chains, the scalar diagnostics
    (timings left out, so a table does not depend on the machine), the settings that change λ̂,
    and ``status="ok"``."""
    row: dict[str, Any] = {"step": int(step), "llc_mean": float(result.llc_mean),
                           "llc_std": float(result.llc_std), "init_loss": float(result.init_loss)}
    for k, v in result.diagnostics.items():
        if _scalar(v) and not k.endswith("_s"):
            row[k] = float(v) if isinstance(v, (float, np.floating)) else int(v)
    for k in ROW_SETTINGS:
        if k in result.settings:
            row[k] = result.settings[k]
    row["status"] = "ok"
    row["reason"] = ""
    row["warnings"] = " | ".join(result.warnings)
    return row


def failed_row(step: int, reason: str) -> dict[str, Any]:
    """A λ̂-table row for a step where no estimate exists, saying why."""
    return {"step": int(step), "llc_mean": math.nan, "llc_std": math.nan, "status": "failed",
            "reason": reason, "warnings": ""}


def record_result(store: RunStore, step: int, result: Any, *, save_trace: bool = True,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the row (and the (chain, draw) loss trace) of ``result``: an ``LLCResult``, or an
    :class:`EstimateFailure`, with the columns ``extra`` added (e.g. ``calibration``). The
    library passes only those; a plain string is still read as a failure's reason, for
    callers written before :class:`EstimateFailure` existed."""
    if isinstance(result, str):
        result = EstimateFailure(result)
    if isinstance(result, EstimateFailure):
        row = failed_row(step, result.reason)
    else:
        row = result_row(step, result)
        if save_trace:
            store.save_trace(step, result.loss_trace)
    row.update(extra or {})
    store.write_llc_row(row)
    return row


def describe(row: Mapping[str, Any], elapsed: float | None = None) -> str:
    """One compact progress line for an estimate."""
    step = row["step"]
    if row.get("status") != "ok":
        return f"LLC step {step}: failed ({row.get('reason', '')})"
    text = f"LLC step {step}: λ̂ = {row['llc_mean']:.4g} ± {row['llc_std']:.2g}"
    if "num_chains" in row and "num_draws" in row:
        text += f" ({row['num_chains']} chains × {row['num_draws']} draws"
        text += f", {elapsed:.1f} s)" if elapsed is not None else ")"
    warnings = [w for w in str(row.get("warnings") or "").split(" | ") if w]
    if warnings:
        more = f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else ""
        text += f"; warning: {warnings[0]}{more}"
    return text


def write_settings(store: RunStore, options: Mapping[str, Any], **extra: Any) -> None:
    """Record the sampler settings (as requested; None = the estimator's default) and extras."""
    store.update_json(SETTINGS_FILE, {**{k: options.get(k) for k in ESTIMATOR_OPTIONS}, **extra})


def iter_floats(values: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    """The entries of a metrics mapping that are real scalars, as floats."""
    for k, v in values.items():
        if isinstance(v, Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if _scalar(v):
            yield k, float(v)
