"""devinterp: local learning coefficient (λ̂) estimation and developmental-stage tracking.

Public API (imported lazily, so ``import devinterp`` stays cheap and the estimator never
imports Lightning):

- :func:`estimate_llc` -> :class:`LLCResult`: localized, tempered SGLD around a checkpoint.
- :func:`estimate_refined_llc`: λ̂ of many components (heads, layers; :mod:`devinterp.components`)
  in one call.
- :class:`LLCCallback`: a Lightning callback that tracks λ̂ during training.
- :func:`load_run`: read a run directory (λ̂ table, metrics, stages, snapshots).
- :mod:`devinterp.theory`: exact learning coefficients of models where theory gives them.
- :mod:`devinterp.stages`: developmental-stage detection on λ̂ curves.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "estimate_llc": "devinterp.llc",
    "estimate_refined_llc": "devinterp.llc",
    "LLCResult": "devinterp.llc",
    "merge_results": "devinterp.llc",
    "AllChainsDivergedError": "devinterp.llc",
    "NonFiniteLossError": "devinterp.llc",
    "LLCCallback": "devinterp.tracking.callback",
    "load_run": "devinterp.run.store",
    "Run": "devinterp.run.store",
    "RunStore": "devinterp.run.store",
    "detect_stages": "devinterp.stages",
    "estimate_bif": "devinterp.influence",
    "BIFResult": "devinterp.influence",
    "estimate_susceptibilities": "devinterp.susceptibility",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'devinterp' has no attribute {name!r}")
