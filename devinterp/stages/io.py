"""``stages.json``: the one place that writes it, reads it back, and decides whether a new
detection may replace it.

The document is ``{"method", "params", "stages"}`` (plus ``"skipped"``: why there are no
stages, when detection was not possible); early versions wrote a bare list of stages, which
:func:`read_stages` still reads.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from devinterp.run.store import STAGES_FILE, RunStore
from devinterp.stages.detect import detect_stages
from devinterp.stages.methods import DEFAULT_METHOD, make_detector

__all__ = ["conflicting_stages", "detect_and_write", "read_stages", "write_stages"]


def write_stages(run_dir: str | os.PathLike, stages: list[dict], *, method: str,
                 params: dict[str, Any], skipped: str | None = None) -> None:
    """Write ``stages.json`` = ``{"method", "params", "stages"}`` into a run directory;
    ``skipped`` records why there are no stages (e.g. too few λ̂ points)."""
    doc: dict[str, Any] = {"method": method, "params": dict(params), "stages": list(stages)}
    if skipped is not None:
        doc["skipped"] = skipped
    RunStore(run_dir).write_json(STAGES_FILE, doc)


def read_stages(run_dir: str | os.PathLike) -> list[dict] | None:
    """The stages recorded in a run directory's ``stages.json``; None when it has none."""
    doc = RunStore(run_dir).read_json(STAGES_FILE)
    if doc is None:
        return None
    return list(doc.get("stages") or []) if isinstance(doc, dict) else list(doc)


def detect_and_write(run_dir: str | os.PathLike) -> list[dict]:
    """Detect the stages of a run directory with the default method and write ``stages.json``;
    ``[]`` (nothing written) when there are too few λ̂ points. Skipped NaN rows are not warned
    about here: the table already says why they failed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stages = detect_stages(run_dir)
    except ValueError:
        return []
    write_stages(run_dir, stages, method=DEFAULT_METHOD,
                 params=make_detector(DEFAULT_METHOD).params)
    return stages


def conflicting_stages(run_dir: str | os.PathLike, method: str,
                       params: dict[str, Any]) -> str | None:
    """Why writing stages found by ``method`` with ``params`` into ``run_dir`` would replace
    different ones (a phrase for a message), or None when nothing would be lost: no
    ``stages.json``, one without stages, or one from the same method and settings (settings it
    does not record count as that method's defaults)."""
    doc = RunStore(run_dir).read_json(STAGES_FILE)
    if not (doc.get("stages") if isinstance(doc, dict) else doc):
        return None
    if not isinstance(doc, dict):  # a bare list of stages, as early versions wrote
        return "it holds stages that record no method"
    old = doc.get("method")
    if old != method:
        return f"it holds stages found with --method {old}"
    recorded = {**make_detector(method).params, **(doc.get("params") or {})}
    changed = [f"{k}={recorded.get(k)!r}" for k in params if recorded.get(k) != params[k]]
    if not changed:
        return None
    return f"it holds stages found with other settings ({', '.join(changed[:3])})"
