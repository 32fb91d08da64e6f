"""Re-exports only: the run store is :mod:`devinterp.run.store`. This module keeps
``from devinterp.store import ...`` working where it is still written (the stages, tracking and
dashboard packages, tools and tests); new code imports from :mod:`devinterp.run.store`."""

from devinterp.run.store import (
    ESTIMATOR_DEFAULTS,
    LLC_FILE,
    METRICS_FILE,
    RUN_FILE,
    SETTINGS_FILE,
    SETTINGS_ID_KEYS,
    SNAPSHOT_DIR,
    STAGES_FILE,
    TRACE_DIR,
    MixedSettingsError,
    Run,
    RunStore,
    atomic_write_bytes,
    file_sha256,
    load_run,
    open_regular,
    read_regular_bytes,
    settings_id,
    snapshot_name,
)

#: The old private spelling, still imported by ``tools/screenshot_dashboard.py`` and
#: ``tools/bench_dashboard.py``.
_atomic_write_bytes = atomic_write_bytes

__all__ = ["ESTIMATOR_DEFAULTS", "LLC_FILE", "METRICS_FILE", "RUN_FILE", "SETTINGS_FILE",
           "SETTINGS_ID_KEYS", "SNAPSHOT_DIR", "STAGES_FILE", "TRACE_DIR", "MixedSettingsError",
           "Run", "RunStore", "atomic_write_bytes", "file_sha256", "load_run", "open_regular",
           "read_regular_bytes", "settings_id", "snapshot_name"]
