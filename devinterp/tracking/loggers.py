"""The callback and the trainer's loggers: λ̂ sent to every logger, a failing logger only warns,
W&B plots λ̂ on the loss's axis, and the training metrics land in ``metrics.csv``.

``metrics.csv`` is filled by polling ``trainer.callback_metrics`` (:class:`MetricsRecorder`),
not by a ``lightning.pytorch.loggers.Logger`` added to the trainer, for two reasons:

- Lightning calls a logger only every ``log_every_n_steps``; the run store also records the
  training metrics at every λ̂ step, so each λ̂ row has the loss of the same weights next to it,
  whatever ``log_every_n_steps`` is.
- A trainer without a logger takes ``trainer.log_dir`` (the callback's default ``dirpath``, and
  where ``ModelCheckpoint`` writes) from its ``default_root_dir``; adding a logger would move
  the user's checkpoints into the logger's directory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from devinterp.run.store import RUN_FILE, RunStore
from devinterp.run.wandb import define_llc_metrics, run_record
from devinterp.tracking.estimate import iter_floats

__all__ = ["LoggerGuard", "MetricsRecorder", "log_metrics", "setup_wandb"]

#: ``warn(key, message)``: warn once per key.
Warn = Callable[[str, str], None]
#: Logger methods the trainer or the callback calls, each guarded so a failure only warns.
GUARDED_METHODS = ("log_metrics", "log_hyperparams", "log_graph", "save", "finalize",
                   "after_save_checkpoint")
_UNSET = object()


def log_metrics(loggers: Iterable[Any], step: int, metrics: Mapping[str, float]) -> None:
    """Send the finite ``metrics`` to every logger at ``step``."""
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    for logger in loggers:
        logger.log_metrics(finite, step=step)


class LoggerGuard:
    """Make each logger warn once instead of raising, in every method the trainer or the
    callback calls (:data:`GUARDED_METHODS`), for the trainer's own metrics too: a full disk or
    an unreachable tracker must not end a long run, and the run store keeps λ̂ and the training
    metrics anyway. A logger's guard is removed once the trainer finalizes it."""

    def __init__(self, warn: Warn) -> None:
        self._warn = warn
        self._guarded: dict[int, tuple[Any, dict[str, Any]]] = {}

    def guard(self, loggers: Iterable[Any], run_dir: Any) -> None:
        """Guard every logger not guarded yet; warnings name ``run_dir`` (where λ̂ stays)."""
        for logger in loggers:
            if id(logger) in self._guarded:
                continue
            names = [n for n in GUARDED_METHODS if callable(getattr(logger, n, None))]
            self._guarded[id(logger)] = (logger, {n: logger.__dict__.get(n, _UNSET)
                                                  for n in names})
            for name in names:
                setattr(logger, name, self._guarded_method(logger, name, run_dir))

    def _guarded_method(self, logger: Any, name: str, run_dir: Any) -> Callable[..., Any]:
        method = getattr(logger, name)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a logger never ends the training run
                self._warn(
                    f"logger:{id(logger)}",
                    f"LLCCallback: {type(logger).__name__}.{name} failed ({e!r}); training goes "
                    f"on, λ̂ and the training metrics stay in the run directory {run_dir}; no "
                    "more warnings for this logger",
                )
                return None
            finally:
                if name == "finalize":
                    self._unguard(logger)

        return guarded

    def _unguard(self, logger: Any) -> None:
        _, originals = self._guarded.pop(id(logger), (None, {}))
        for name, original in originals.items():
            if original is _UNSET:
                logger.__dict__.pop(name, None)
            else:
                setattr(logger, name, original)


def setup_wandb(loggers: Iterable[Any], store: RunStore, warn: Warn) -> None:
    """Plot ``llc/*`` (and ``stage/*``) against ``trainer/global_step`` (the loss's axis), and
    record the W&B run in ``run.json`` so ``devinterp estimate --wandb`` can add deferred
    values to it later."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        try:
            run = logger.experiment
            define_llc_metrics(run)
            store.update_json(RUN_FILE, {"wandb": run_record(run, logger.save_dir)})
        except Exception as e:  # noqa: BLE001 - W&B being down must not stop training
            warn(f"logger:{id(logger)}", f"LLCCallback: could not set up W&B metrics ({e!r})")


class MetricsRecorder:
    """The training metrics for ``metrics.csv``: buffered rows of the values that changed since
    the last row (a stale value is not re-recorded), written in batches."""

    #: Rows buffered before a write (a write rewrites the table: not once per step).
    FLUSH_EVERY = 1000

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._last: dict[str, float] = {}

    def record(self, metrics: Mapping[str, Any], step: int) -> bool:
        """Buffer the scalar ``metrics`` that changed, at ``step``; True when the buffer is
        full (time to :meth:`flush`)."""
        row: dict[str, Any] = {"step": int(step)}
        for k, v in iter_floats(metrics):
            if self._last.get(k) != v:
                row[k] = self._last[k] = v
        if len(row) > 1:
            self._rows.append(row)
        return len(self._rows) >= self.FLUSH_EVERY

    def flush(self, store: RunStore) -> None:
        """Write the buffered rows; if that raises (a full disk) they stay buffered for the
        next flush."""
        if self._rows:
            store.write_metrics(self._rows)
            self._rows = []
