"""Re-exports only: post-hoc estimation is :mod:`devinterp.run.estimate` and its command line
:mod:`devinterp.cli.estimate`. This module keeps ``from devinterp.posthoc import estimate_run,
main`` working where it is still written (``tests/test_ddp.py``,
``tests/test_training_step_loss.py``); new code imports from those modules."""

from devinterp.cli.estimate import main
from devinterp.run.estimate import EstimateReport, estimate_run

__all__ = ["EstimateReport", "estimate_run", "main"]
