"""The run store's long table of per-component λ̂ rows, ``llc_components.csv``: one row per
(component, step) with the columns of a λ̂ row (``component, step, llc_mean, llc_std, ...``).

It imports no torch, so the dashboard and readers of a run stay cheap; the estimates
themselves come from :mod:`devinterp.tracking.components`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pandas as pd

from devinterp.run.store import RunStore, atomic_write_bytes

__all__ = ["COMPONENTS_FILE", "COMPONENT_STAGES_FILE", "read_components",
           "write_component_rows"]

#: The long table of per-component λ̂ rows in a run directory.
COMPONENTS_FILE = "llc_components.csv"
#: Stages of every component's curve: ``{component: [stage, ...]}``.
COMPONENT_STAGES_FILE = "stages_components.json"
_KEY = ["component", "step"]


def read_components(store: RunStore | str) -> pd.DataFrame:
    """The long table, sorted by component then step (empty with its key columns if none)."""
    store = store if isinstance(store, RunStore) else RunStore(store)
    table = store.read_table(COMPONENTS_FILE)
    if "component" not in table.columns:
        table["component"] = pd.Series([], dtype="object")
    table["component"] = table["component"].astype(str)
    return table.sort_values(_KEY, kind="stable").reset_index(drop=True)


def write_component_rows(store: RunStore, rows: list[Mapping[str, Any]]) -> None:
    """Insert or replace rows by (component, step), atomically and under the store's lock (a
    resumed run re-estimating a step replaces its rows; other components and steps stay)."""
    if not rows:
        return
    new = pd.DataFrame([dict(r) for r in rows])
    with store.lock():
        old = read_components(store)
        if len(old):
            keep = ~old.set_index(_KEY).index.isin(new.set_index(_KEY).index)
            new = pd.concat([old[keep], new], ignore_index=True)
        new = new.sort_values(_KEY, kind="stable").reset_index(drop=True)
        buf = io.StringIO()
        new.to_csv(buf, index=False)
        atomic_write_bytes(store.path / COMPONENTS_FILE, buf.getvalue().encode())
