"""λ̂ during training: the schedule, the training state left untouched, one estimate and its
row, the loss, the rebuild recipe, the loggers, and the two front ends that use them:
:class:`LLCCallback` (Lightning's Trainer) and :func:`track_llc` (Fabric and plain loops).

Modules, one job each: :mod:`.schedule`, :mod:`.state`, :mod:`.losses`, :mod:`.estimate`,
:mod:`.calibration` (one sampler setting per run), :mod:`.recipes` (``run.json``), :mod:`.loggers`, :mod:`.distributed` (DDP), :mod:`.report`
(stages and the dashboard after training), :mod:`.callback`, :mod:`.fabric`.
``LLCCallback`` is imported on first use, so ``track_llc`` never imports Lightning.
"""

from __future__ import annotations

from typing import Any

from devinterp.tracking.calibration import RunCalibration
from devinterp.tracking.estimate import (
    ESTIMATOR_OPTIONS,
    ROW_SETTINGS,
    EstimateFailure,
    chain_range,
    describe,
    estimator_kwargs,
    failed_row,
    first_line,
    iter_floats,
    record_result,
    resolved_num_chains,
    result_row,
    run_estimator,
    write_settings,
)
from devinterp.tracking.fabric import track_llc
from devinterp.tracking.losses import (
    LOSS_ORDER,
    LossSpec,
    TrainingStepLoss,
    estimating,
    module_loss,
    training_data,
)
from devinterp.tracking.schedule import Schedule, log_spaced_steps
from devinterp.tracking.state import preserved_training_state, weights_finite

__all__ = ["ESTIMATOR_OPTIONS", "LOSS_ORDER", "ROW_SETTINGS", "EstimateFailure", "LLCCallback",
           "LossSpec", "RunCalibration", "Schedule", "TrainingStepLoss", "chain_range", "describe", "estimating",
           "estimator_kwargs", "failed_row", "first_line", "iter_floats", "log_spaced_steps",
           "module_loss", "preserved_training_state", "record_result", "resolved_num_chains",
           "result_row", "run_estimator", "track_llc", "training_data", "weights_finite",
           "write_settings"]


def __getattr__(name: str) -> Any:
    if name == "LLCCallback":
        from devinterp.tracking.callback import LLCCallback

        return LLCCallback
    raise AttributeError(f"module 'devinterp.tracking' has no attribute {name!r}")
