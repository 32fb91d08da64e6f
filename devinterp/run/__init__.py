"""A run on disk, after training: the run directory and what reads or fills it.

Modules, one job each:

- :mod:`.store`: the run directory (:class:`RunStore`, :func:`load_run`, :class:`Run`,
  :func:`settings_id`, file digests), atomic writes under a ``filelock`` lock.
- :mod:`.estimate`: post-hoc λ̂ (:func:`estimate_run`) for a run's snapshots or checkpoints,
  one set of sampler settings per λ̂ table; :mod:`.options` checks its options first.
- :mod:`.rebuild`: the model, data and loss a snapshot needs, from what the run records (a
  run directory is untrusted input) or what the user names.
- :mod:`.wandb`: the one module that talks to Weights & Biases.

Names are imported on first use, so reading a run (:func:`load_run`) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MixedSettingsError": "devinterp.run.store",
    "Run": "devinterp.run.store",
    "RunStore": "devinterp.run.store",
    "atomic_write_bytes": "devinterp.run.store",
    "file_sha256": "devinterp.run.store",
    "load_run": "devinterp.run.store",
    "settings_id": "devinterp.run.store",
    "EstimateReport": "devinterp.run.estimate",
    "estimate_run": "devinterp.run.estimate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'devinterp.run' has no attribute {name!r}")
