"""λ̂ under DDP: the chains split over ranks, gathered and merged into one result, so the merged
row equals a single-process run's. Sharded strategies (FSDP, DeepSpeed) are refused."""

from __future__ import annotations

from typing import Any

import torch

from devinterp.tracking.estimate import EstimateFailure

__all__ = ["check_strategy", "gather", "merge"]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def check_strategy(strategy: Any) -> None:
    """Raise for a sharded strategy: λ̂ needs the full weights in every process."""
    sharded = [c.__name__ for c in type(strategy).__mro__ if c.__name__ in _SHARDED]
    if sharded:
        raise ValueError(
            f"LLCCallback does not support the sharded strategy {sharded[0]}: λ̂ needs the "
            "full weights in every process. Train with strategy='ddp' (or one device), or "
            "save checkpoints and run `devinterp estimate` on them afterwards"
        )


def gather(outcome: Any, world: int) -> list[Any]:
    """Every rank's outcome, on every rank (a collective: all ranks must call it)."""
    if world <= 1:
        return [outcome]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, outcome)
    return out


def merge(outcomes: list[Any]) -> Any:
    """One result from the ranks' outcomes (``LLCResult``, :class:`EstimateFailure`, or None:
    no chains): the chains of the ranks that succeeded, with a warning naming the others."""
    from devinterp.llc import merge_results

    results = [o for o in outcomes if o is not None and not isinstance(o, EstimateFailure)]
    failures = [o for o in outcomes if isinstance(o, EstimateFailure)]
    if not results:
        return failures[0] if failures else EstimateFailure("no chain was run")
    if len(results) == 1 and not failures:
        return results[0]
    merged = merge_results(results)
    if failures:
        merged.warnings.append(f"on {len(failures)} rank(s) the estimate failed "
                               f"({failures[0].reason}); their chains are not in λ̂")
    return merged
