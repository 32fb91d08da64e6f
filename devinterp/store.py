"""Re-exports only: the run store is :mod:`devinterp.run.store`. This module keeps
``from devinterp.store import ...`` working where it is still written (the stages, tracking and
dashboard packages, tools and tests); new code imports from :mod:`devinterp.run.store`."""

import devinterp.run.store as _run_store
from devinterp.run.store import *  # noqa: F403 - every public name, as listed in its __all__

__all__ = list(_run_store.__all__)

#: The old private spelling, still imported by ``tools/screenshot_dashboard.py`` and
#: ``tools/bench_dashboard.py``.
_atomic_write_bytes = _run_store.atomic_write_bytes
