"""A run on disk, after training: the run directory and what reads or fills it.

Modules, one job each:

- :mod:`.store`: the run directory (:class:`RunStore`, :func:`load_run`, :class:`Run`,
  :func:`settings_id`, file digests), atomic writes under a ``filelock`` lock.
- :mod:`.estimate`: post-hoc λ̂ (:func:`estimate_run`) for a run's snapshots or checkpoints,
  one set of sampler settings per λ̂ table; :mod:`.options` checks its options first.
- :mod:`.rebuild`: the model, data and loss a snapshot needs, from what the run records (a
  run directory is untrusted input) or what the user names.
- :mod:`.wandb`: the one module that talks to Weights & Biases.

The store's names are exported here; :mod:`.estimate` imports torch, so
``from devinterp.run.estimate import estimate_run`` (reading a run never imports torch).
"""

from devinterp.run.store import (
    MixedSettingsError,
    Run,
    RunStore,
    atomic_write_bytes,
    file_sha256,
    load_run,
    settings_id,
)

__all__ = ["MixedSettingsError", "Run", "RunStore", "atomic_write_bytes", "file_sha256",
           "load_run", "settings_id"]
