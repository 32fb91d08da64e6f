"""Re-exports only, so that ``from devinterp.fabric import ...`` keeps working where it is
written outside :mod:`devinterp.tracking`: the README (``Schedule``, ``track_llc``),
:mod:`devinterp.posthoc` and ``tests/test_dashboard.py`` (``record_result``). The code lives in
:mod:`devinterp.tracking`; new code imports it from there."""

from __future__ import annotations

from typing import Any

import devinterp.tracking

#: Served from :mod:`devinterp.tracking` on first access (as ``devinterp``'s own exports are).
_REEXPORTED = ("ESTIMATOR_OPTIONS", "Schedule", "describe", "estimator_kwargs", "first_line",
               "module_loss", "record_result", "run_estimator", "track_llc", "training_data",
               "weights_finite")
__all__ = list(_REEXPORTED)


def __getattr__(name: str) -> Any:
    if name in _REEXPORTED:
        return getattr(devinterp.tracking, name)
    raise AttributeError(f"module 'devinterp.fabric' has no attribute {name!r}; the tracking "
                         f"code is in devinterp.tracking")
