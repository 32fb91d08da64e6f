"""Readers of the per-component λ̂ table for modules that must not import torch (the
dashboard): the table itself lives in the run store (:meth:`RunStore.read_components`,
:meth:`RunStore.upsert_rows` with ``key=COMPONENT_KEY``, :attr:`devinterp.Run.components`).
Delete this module once the dashboard reads ``Run.components``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from devinterp.run.store import (
    COMPONENT_KEY,
    COMPONENT_STAGES_FILE,
    COMPONENTS_FILE,
    RunStore,
)

__all__ = ["COMPONENTS_FILE", "COMPONENT_STAGES_FILE", "read_components",
           "write_component_rows"]


def read_components(store: RunStore | str) -> pd.DataFrame:
    """The long table, sorted by component then step (:meth:`RunStore.read_components`)."""
    return (store if isinstance(store, RunStore) else RunStore(store)).read_components()


def write_component_rows(store: RunStore, rows: list[Mapping[str, Any]]) -> None:
    """Insert or replace rows by (component, step), atomically and under the store's lock."""
    store.upsert_rows(COMPONENTS_FILE, rows, key=COMPONENT_KEY)
