"""Detectors by name: what ``method=`` and ``--method`` choose from."""

from __future__ import annotations

from typing import Any

from devinterp.stages.base import Detector
from devinterp.stages.changepoints import ChangePoints
from devinterp.stages.critical import CriticalPoints

__all__ = ["DEFAULT_METHOD", "METHODS", "make_detector"]

METHODS = ("critical", "pelt", "binseg")
#: What ``method="auto"`` means: the best detector on ``tools/bench_stages.py``.
DEFAULT_METHOD = "critical"


def make_detector(method: str = "auto", **options: Any) -> Detector:
    """A detector by name: "critical", "pelt", "binseg", or "auto" (the benchmark's best)."""
    name = DEFAULT_METHOD if method == "auto" else method
    if options.get("joint") and name not in ("pelt", "binseg"):
        raise ValueError("joint=True (--joint: λ̂ and loss together) works with method 'pelt' or "
                         f"'binseg'; {name!r} reads λ̂ alone")
    if name == "critical":
        return CriticalPoints(**options)
    if name in ("pelt", "binseg"):
        return ChangePoints(algorithm=name, **options)
    raise ValueError(f"unknown stage method {method!r}; choose one of auto, {', '.join(METHODS)}")
