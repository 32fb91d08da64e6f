"""``LLCCallback``: λ̂ next to the loss during Lightning training, with training left untouched.

The callback schedules, snapshots, estimates and logs; the rest is in its own module of
:mod:`devinterp.tracking` (the schedule, the preserved training state, the estimate and its row,
the loss, ``run.json``, the loggers, DDP, the stages and dashboard at the end).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from devinterp.config import SamplerConfig
from devinterp.llc.calibration import NEAR_MINIMUM_BELOW
from devinterp.run.store import LLC_FILE, RunStore
from devinterp.tracking.calibration import MAX_LOWERINGS, RunCalibration
from devinterp.tracking.distributed import check_strategy, gather, merge
from devinterp.tracking.estimate import (
    ESTIMATOR_OPTIONS,
    EstimateFailure,
    chain_range,
    describe,
    first_line,
    record_result,
    resolved_num_chains,
    run_estimator,
    write_settings,
)
from devinterp.tracking.loggers import LoggerGuard, MetricsRecorder, log_metrics, setup_wandb
from devinterp.tracking.losses import LossSpec, module_loss, training_data
from devinterp.tracking.probes import ProbeRecording, save_probes
from devinterp.tracking.recipes import import_path, write_run_file
from devinterp.tracking.report import attach_dashboard, log_stages
from devinterp.tracking.schedule import Schedule
from devinterp.tracking.state import preserved_training_state, weights_finite

__all__ = ["LLCCallback"]

_log = logging.getLogger(__name__)


class LLCCallback(Callback):
    """Estimate the local learning coefficient λ̂ on a schedule during ``trainer.fit``.

    At each scheduled step the weights are saved to ``dirpath/snapshots`` (weights only,
    ``torch.load(weights_only=True)``); in ``"inline"`` mode λ̂ is estimated right away with
    :func:`devinterp.estimate_llc`, its row written to the run store (``dirpath/llc.csv``, the
    source of truth, read with :func:`devinterp.load_run`) and then sent to every logger in
    ``trainer.loggers``. In ``"deferred"`` mode only the snapshot is taken; run
    ``devinterp estimate DIRPATH`` later, in any process. Training is untouched: with the same
    seed, parameters and optimizer state end bit-identical to a run without the callback (the
    random streams, train/eval modes, ``requires_grad``, ``.grad`` and buffers are restored).

    Data and loss (first match wins):

    - data: the ``data`` argument (Dataset, DataLoader or ``(inputs, targets)`` tensors); else a
      module attribute ``llc_data``; else the ``.dataset`` of the trainer's train dataloader,
      resampled from ``seed`` (the trainer's own shuffling loader is never iterated, so the
      training random stream is not consumed).
    - loss, in this order (one function, :func:`devinterp.tracking.module_loss`, used by the
      callback, ``track_llc`` and ``devinterp estimate``):

      1. the ``loss_fn`` argument, ``loss_fn(outputs, targets) -> scalar mean loss`` with
         ``outputs = module(inputs)``;
      2. a module method ``llc_batch_loss(self, forward, batch) -> scalar``, for batches that
         are not ``(inputs, targets)`` (``forward(*args)`` runs the module at the sampled
         weights);
      3. a module attribute ``loss_fn(outputs, targets)``;
      4. the module's own ``training_step(batch, batch_idx)``, evaluated at the sampled
         weights: the tensor it returns, or the ``"loss"`` entry of a returned dict.

      So a LightningModule written as usual (``training_step`` computes, logs and returns the
      loss) needs no change. While λ̂ is estimated, ``self.log``/``self.log_dict`` do nothing
      (nothing reaches the loggers), the optimizer and schedulers are out of reach (a loss
      that calls ``self.optimizers()`` or ``manual_backward`` fails instead of stepping them),
      the training random streams are restored afterwards and the module is in eval mode (as
      :func:`devinterp.estimate_llc` documents: dropout off, BatchNorm statistics fixed). A
      ``training_step`` is the objective as written, regularizers included, while λ̂ needs a
      mean negative log-likelihood: give ``loss_fn=`` or ``llc_batch_loss`` when the step adds
      other terms (weight decay inside the loss, auxiliary losses). A module that optimizes
      manually (``automatic_optimization = False``) and has neither is refused before
      training starts.

    Schedule: the union of ``every_n_train_steps`` (or ``every_n_epochs``), ``steps`` and
    ``log_spaced``, plus step 0 (the initialization, at train start) when ``include_init``.
    Steps are ``trainer.global_step`` (optimizer steps taken). Sanity checking,
    ``fast_dev_run`` and steps already done are skipped. All chains use the same ``seed`` at
    every step (common random numbers: the curve is smoother than its error bars suggest).

    Logged metrics (every logger, ``step=trainer.global_step``): ``llc/mean``, ``llc/std``,
    ``llc/init_loss`` and ``llc/<diagnostic>`` (``mala_acceptance``, ``rhat``, ``ess``,
    ``frac_below_baseline``, ``num_diverged``, ``step_size``, ``nbeta``). With W&B they are
    plotted against ``trainer/global_step``, the axis of the loss, even when they arrive later.
    The run store is written before any logger is called, and while fitting a logger that
    raises (``log_metrics``, ``log_hyperparams``, ``save``, ``finalize``, ...: a full disk, an
    unreachable tracker) warns once instead of ending training: a failing logger loses nothing.

    Run store rows: ``step, llc_mean, llc_std, init_loss, <diagnostics>, <settings>, status,
    reason, warnings``; ``status`` is ``"failed"`` with a ``reason`` when the training loss or
    the weights are not finite at the step, every chain diverged, the loss at w* is not finite,
    or the estimator raised (a vmap failure, a dtype mismatch, a ``training_step`` that returns
    None, ...). The callback never ends training: each kind of failure warns once, and a
    logger or a run-store write that fails mid-run warns once too.
    Training metrics seen by the trainer (``trainer.callback_metrics``) are recorded in
    ``metrics.csv`` at logging steps, scheduled steps, validation and epoch ends.

    Sampler options (``num_chains`` ... ``weights``) default to None, meaning
    :func:`devinterp.estimate_llc`'s own defaults, which ``devinterp estimate`` also uses; each
    λ̂ row records the values used. Their names, defaults and checks live in
    :class:`devinterp.config.SamplerConfig`; the signature repeats the names, typed, because
    LightningCLI builds the callback from YAML (``init_args.num_draws``) by reading this
    signature and this ``Args:`` block. A test fails when ``SamplerConfig`` gains a field this
    signature lacks.

    One step size for the whole run: with ``step_size`` unset, ε and nβ are
    calibrated once (:mod:`devinterp.tracking.calibration`) at the first checkpoint near a
    minimum (tried at the 1st, 2nd, 4th, ... checkpoint) and held for every checkpoint, so the
    points of the curve are comparable; checkpoints before it are estimated from their
    snapshots as soon as the settings exist (at the end of training, calibrated on the last
    checkpoint, if none was near a minimum). Where a checkpoint diverges or its MALA
    acceptance falls below 0.5 with them, ε is halved from that step on. ``calibration.json``
    records the settings, where they were chosen and every change
    (:attr:`devinterp.Run.calibration`; the dashboard marks the changes), and each row its ε,
    nβ and ``calibration`` (``"run"``,
    ``"lowered"``, or ``"checkpoint"`` when calibration failed and the step chose its own).

    Distributed: under DDP the chains are split across ranks (each runs its own chain indices,
    so the merged result equals a single-process run), gathered, and global rank 0 writes and
    logs. Sharded strategies (FSDP, DeepSpeed) are refused.

    Args:
        dirpath: the run directory. Default: ``<trainer.log_dir>/llc``. Checked for write
            access before training starts.
        every_n_train_steps: estimate every n optimizer steps.
        every_n_epochs: estimate at the end of every n-th epoch (not with every_n_train_steps).
        steps: explicit steps to estimate at.
        log_spaced: about this many steps evenly spaced in log(step) up to ``max_steps``.
        include_init: also estimate at step 0, the initialization.
        mode: ``"inline"`` estimates during training; ``"deferred"`` only snapshots.
        num_chains: SGLD chains per estimate.
        num_draws: recorded draws per chain, or ``"auto"``: extended in rounds until the
            chains converge (split R-hat <= 1.05 and ESS >= 400) or ``max_draws`` is reached.
        max_draws: the budget of ``num_draws="auto"`` (draws per chain).
        num_burnin: discarded steps per chain.
        batch_size: SGLD minibatch size.
        step_size: SGLD step size ε for every checkpoint, or ``"auto"``: chosen at each
            checkpoint. Unset: one ε for the run, calibrated as above.
        localization: γ, the pull towards the checkpoint.
        nbeta: nβ (the estimator's default is n/log n, n the number of training samples).
        sampler: ``"sgld"`` or ``"rmsprop_sgld"``.
        seed: seed of the chains' noise and minibatch order.
        num_samples: n when the data has no length.
        chain_chunk_size: run at most this many chains at once (memory).
        vectorize: vectorize chains with ``torch.func.vmap``.
        num_threads: torch intra-op threads while λ̂ is estimated (restored afterwards).
        weights: parameter names or ``fnmatch`` patterns SGLD moves, for a weight-refined λ̂
            (e.g. ``["blocks.0.attn.*"]``); the other weights stay at the checkpoint.
        components: also one λ̂ curve per component (:func:`devinterp.estimate_refined_llc`,
            all components in one call per step): ``"heads"``, ``"layers"``, ``"mlps"``, or
            ``{name: [parameter names or patterns]}`` (in Python also ``{parameter: bool
            mask}``). Rows go to ``dirpath/llc_components.csv`` (``component, step, llc_mean,
            llc_std, ...``), their metrics to the loggers as ``llc/<component>/mean`` and
            ``/std``, and at the end of inline training the stages of every curve to
            ``stages_components.json``. Not with ``weights``.
        probes: a small probe set (``(inputs, targets)`` tensors, a Dataset or a DataLoader,
            as :func:`devinterp.estimate_bif`'s ``query``): at every inline estimate, the
            Bayesian influence of ``influence_train`` training samples (drawn once from the
            data with ``seed``, the same at every step) on each probe, from the same draws as
            λ̂ (one estimate). Written to ``dirpath/influence/step_*.csv`` (long: ``step,
            train_index, query_index, influence, se, kind, status, reason``; read as
            :attr:`devinterp.Run.influence`) with the inputs in ``influence/*.npy``. A step
            whose λ̂ or influence fails is a failed influence row, λ̂ untouched. Inline: one
            process (not under DDP). Deferred: the probes (as ``(inputs, targets)`` tensors)
            are kept in ``influence/probes.pt`` and ``devinterp estimate`` records the
            influence of every snapshot.
        influence_train: training samples whose influence on the probes is recorded
            (default :data:`devinterp.influence.DEFAULT_NUM_TRAIN`; each costs a forward pass
            per draw and chain).
        data: data to sample with (see above). Default: the training data.
        loss_fn: ``loss_fn(outputs, targets)`` (see above). Default: the module's
            ``llc_batch_loss``, ``loss_fn`` or ``training_step``.
        save_traces: save the per-chain loss traces, shape (chain, draw), to ``dirpath/traces``.
        progress: print one line per estimate.
    """


    def __init__(
        self,
        dirpath: str | None = None,
        *,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        steps: list[int] | None = None,
        log_spaced: int | None = None,
        include_init: bool = True,
        mode: Literal["inline", "deferred"] = "inline",
        num_chains: int | None = None,
        num_draws: int | Literal["auto"] | None = None,
        max_draws: int | None = None,
        num_burnin: int | None = None,
        batch_size: int | None = None,
        step_size: float | Literal["auto"] | None = None,
        localization: float | None = None,
        nbeta: float | None = None,
        sampler: Literal["sgld", "rmsprop_sgld"] | None = None,
        seed: int | None = None,
        num_samples: int | None = None,
        chain_chunk_size: int | None = None,
        vectorize: bool | None = None,
        num_threads: int | None = None,
        weights: list[str] | None = None,
        components: str | dict[str, list[str]] | None = None,
        probes: Any = None,
        influence_train: int | None = None,
        data: Any = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        save_traces: bool = True,
        progress: bool = True,
    ) -> None:
        given = locals()  # the sampler options by their SamplerConfig names: no third list
        if mode not in ("inline", "deferred"):
            raise ValueError(f"mode must be 'inline' or 'deferred', got {mode!r}")
        _check_schedule(every_n_train_steps, every_n_epochs, steps, log_spaced)
        self.options: dict[str, Any] = {k: given[k] for k in ESTIMATOR_OPTIONS}
        SamplerConfig.from_options(self.options)  # the one home of the sampler checks
        if weights is not None:
            self.options["weights"] = list(weights)
        if components is not None and weights is not None:
            raise ValueError("LLCCallback: give weights=[...] (one refined λ̂) or components= "
                             "(one λ̂ per component), not both")
        self.components = components
        self.influence: ProbeRecording | None = None
        if probes is not None:  # checked now; the store is known at setup
            self.influence = ProbeRecording(None, probes, num_train=influence_train,
                                            seed=int(seed or 0))
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.steps = sorted(set(steps or ()))
        self.log_spaced = log_spaced
        self.include_init = include_init
        self.mode = mode
        self.data = data
        self.loss_fn = loss_fn
        self.save_traces = save_traces
        self.progress = progress
        self._state_key = self._generate_state_key(
            dirpath=self.dirpath, mode=self.mode, every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs, steps=self.steps, log_spaced=self.log_spaced,
        )
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What the callback learns while fitting (the resumable part is in state_dict)."""
        self._done: set[int] = set()
        self._store: RunStore | None = None
        self._schedule: Schedule | None = None
        self._disabled = False
        self._data: Any = None
        self._loss: LossSpec | None = None
        self._module_path: str | None = None
        self._warned: set[str] = set()
        self._loggers = LoggerGuard(self._warn_once)
        self._metrics = MetricsRecorder()
        self._num_snapshots = 0
        self._batch_step = 0
        self._saved_since_flush = False
        self._component_names: list[str] = []
        self._recorder: Any = None
        self._recorder_error: str | None = None
        self._calibration: RunCalibration | None = None
        #: Inline checkpoints waiting for the run's settings: (step, training loss).
        self._pending: list[tuple[int, float | None]] = []
        self._attempts: list[dict[str, Any]] = []

    # -- identity and resumable state ----------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Lightning reads this at every hook call (profiler names): computed once.
        return self._state_key

    def state_dict(self) -> dict[str, Any]:
        return {
            "done_steps": sorted(self._done),
            "dirpath": str(self._store.path) if self._store is not None else None,
            "module": self._module_path,
            "pending": [[s, loss] for s, loss in self._pending],
            "attempts": list(self._attempts),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._done = {int(s) for s in state_dict.get("done_steps", [])}
        self._pending = [(int(s), loss) for s, loss in state_dict.get("pending", [])]
        self._attempts = list(state_dict.get("attempts", []))
        # A resumed run keeps writing to the directory it started in, even where the default
        # (the logger's version directory) would now be a new one.
        if self.dirpath is None and state_dict.get("dirpath"):
            self._store = RunStore(state_dict["dirpath"], create=True)

    @property
    def store(self) -> RunStore | None:
        """The run store written to (set when fitting starts)."""
        return self._store

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        if self.influence is not None and trainer.world_size > 1 and self.mode == "inline":
            raise ValueError("LLCCallback: probes= is not supported under DDP yet; train on "
                             "one device, or run devinterp.estimate_bif on the snapshots")
        if trainer.fast_dev_run:
            self._disabled = True
            self._warn_once("fast_dev_run", "LLCCallback is disabled under fast_dev_run")
            return
        self._loss = module_loss(pl_module, self.loss_fn,
                                 fix="pass loss_fn=(outputs, targets) -> mean loss to LLCCallback")
        if self.options["weights"] is not None:
            from devinterp.llc import sampled_parameters

            sampled_parameters(pl_module, self.options["weights"])  # unknown names fail now
        if self.components is not None:
            from devinterp.components import resolve_components

            # Unknown names, bad masks or a model without heads fail now, not at step 0.
            self._component_names = list(resolve_components(pl_module, self.components))
        base = trainer.log_dir or trainer.default_root_dir  # a collective: every rank calls it
        if self._store is None:
            self._store = RunStore(self.dirpath or os.path.join(base, "llc"), create=True)
        self._module_path = import_path(type(pl_module))
        self._loggers.guard(trainer.loggers, self._store.path)
        if self.influence is not None:
            self.influence.store = self._store
        self._calibration = RunCalibration(self._store, self.options)
        self._calibration.active = self._calibration.active and self.mode == "inline"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled:
            return
        max_steps = _max_steps(trainer)
        self._schedule = Schedule(
            every_n_steps=self.every_n_train_steps, steps=tuple(self.steps),
            log_spaced=self.log_spaced, max_steps=max_steps, include_init=self.include_init,
        )
        if max_steps is not None and self._schedule.beyond(max_steps):
            self._warn_once("beyond", f"LLCCallback: steps {self._schedule.beyond(max_steps)} "
                                      f"are beyond max_steps={max_steps} and will not be reached")
        self._data = self._resolve_data(trainer, pl_module)
        if trainer.is_global_zero:
            self._write_run_files(trainer, pl_module)
            if not trainer.loggers:
                self._warn_once("no_logger", "LLCCallback: the trainer has no logger; λ̂ is "
                                             f"written only to the run directory {self._store.path}")
            setup_wandb(trainer.loggers, self._store, self._warn_once)
        if trainer.global_step == 0 and 0 in self._schedule and 0 not in self._done:
            self._take(trainer, pl_module, 0, train_loss=None)

    # -- triggers ----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._batch_step = trainer.global_step
        if self._saved_since_flush:
            # Rows recorded after a checkpoint was saved, at its step (validation, epoch end),
            # are in no checkpoint: a run killed now and resumed from it would never record
            # them again. Write them before training moves on.
            self._flush_metrics()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._disabled:
            return
        step = trainer.global_step
        due = step in self._schedule and step not in self._done
        # The batch's loss was computed at the weights of the step the batch started at: record
        # it there (as Lightning's loggers do), next to the λ̂ of those weights.
        if trainer.is_global_zero and (due or step % max(trainer.log_every_n_steps, 1) == 0):
            self._record_metrics(trainer, self._batch_step)
        if due:
            self._take(trainer, pl_module, step, train_loss=_loss_value(outputs))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled:
            return
        step = trainer.global_step
        if trainer.is_global_zero:
            self._record_metrics(trainer, step)
        if (self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs
                == 0 and step not in self._done):
            self._take(trainer, pl_module, step, train_loss=None)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only validation inside fit (not sanity checking, not a separate trainer.validate).
        if (not self._disabled and not trainer.sanity_checking and trainer.is_global_zero
                and trainer.state.fn == "fit" and self._schedule is not None):
            self._record_metrics(trainer, trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._flush_metrics()
        self._saved_since_flush = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled:
            return
        if self._pending:
            self._settle_pending(trainer, pl_module)
        self._flush_metrics()
        if trainer.is_global_zero and self.progress and self.mode == "deferred":
            self._print(f"LLC: {self._num_snapshots} snapshots in {self._store.path}; "
                        f"estimate λ̂ with `devinterp estimate {self._store.path}`")
        if trainer.is_global_zero and self.mode == "inline":
            log_stages(trainer.loggers, self._store, self._warn_once)
            if self.components is not None:
                from devinterp.tracking.components import detect_component_stages

                with self._contained("component_stages", "detect the components' stages"):
                    detect_component_stages(self._store)
            attach_dashboard(trainer.loggers, self._store, self._warn_once)
        if trainer.world_size > 1:
            # Every rank leaves together: a rank that tears its process group down while global
            # rank 0 still writes the stages aborted the run under ddp_spawn (gloo).
            trainer.strategy.barrier("llc_train_end")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._flush_metrics()

    # -- one scheduled step --------------------------------------------------------------------
    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
              train_loss: float | None) -> None:
        """Snapshot, then (inline) estimate with the chains split over ranks, write, log.
        Nothing here ends training: a failure is a failed row and one warning."""
        start = time.perf_counter()
        self._done.add(step)
        if trainer.is_global_zero:
            # Written right away, on this thread: a background writer thread measured slower
            # (tools/bench_callback.py: 1.06x vs 1.02x the training time), the GIL hand-offs
            # costing more than the writes.
            with self._contained("snapshot", f"save the snapshot of step {step}"):
                self._store.save_snapshot(step, pl_module.state_dict())
                self._num_snapshots += 1
        if self.mode == "deferred":
            return
        cal = self._calibration
        if cal.active and not cal.calibrated:
            outcomes = None
            if self._calibrate_here(trainer, pl_module, step, train_loss):
                outcomes = self._confirmed(trainer, pl_module, step, train_loss)
            if outcomes is None:
                self._pending.append((step, train_loss))
                return
            self._announce(trainer)
            self._estimate_step(trainer, pl_module, step, train_loss, start, outcomes)
            self._estimate_pending(trainer, pl_module)
            return
        self._estimate_step(trainer, pl_module, step, train_loss, start)

    def _confirmed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                   train_loss: float | None) -> list[Any] | None:
        """This checkpoint's estimate with the settings just chosen there, if its draws confirm
        that it is near a minimum (the short pilot chains can miss a slow way down, e.g. from
        a saddle at a small initialization); else the settings are dropped and None."""
        outcomes = self._estimate_on_ranks(trainer, pl_module, train_loss)
        below = None
        if trainer.is_global_zero:
            result = merge(outcomes)
            below = (None if isinstance(result, EstimateFailure)
                     else float(result.diagnostics.get("frac_below_baseline", 1.0)))
        below = trainer.strategy.broadcast(below, src=0)
        if below is not None and below <= NEAR_MINIMUM_BELOW:
            return outcomes
        entry = self._calibration.record() or {}
        self._attempts.append({
            "step": int(step), "step_size": float(entry.get("step_size", math.nan)),
            "near_minimum": False, "calibration_s": float(entry.get("calibration_s", 0.0)),
            "reason": "the estimate's draws fall below L(w*)" if below is not None
            else "the estimate failed"})
        self._calibration.forget(write=trainer.is_global_zero)
        return None

    def _estimate_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                       train_loss: float | None, start: float,
                       outcomes: list[Any] | None = None) -> None:
        """λ̂ (and influence, components) of the module's weights as they are now, with the
        run's settings (``outcomes``: this step's estimate, when already run): a failure that
        says ε is too large halves it from here on."""
        if outcomes is None:
            outcomes = self._estimate_on_ranks(trainer, pl_module, train_loss)
        lowered = False
        cal = self._calibration
        if cal.active and cal.calibrated:
            for _ in range(MAX_LOWERINGS):
                reason = cal.failure(merge(outcomes)) if trainer.is_global_zero else None
                reason = trainer.strategy.broadcast(reason, src=0)
                if reason is None:
                    break
                eps = cal.lower(step, reason, write=trainer.is_global_zero)
                lowered = True
                self._warn_once(f"lowered:{step}", (
                    f"LLCCallback: at step {step} the run's step size was too large ({reason});"
                    f" lowered to {eps:.3g} from this step on (calibration.json records it)"))
                outcomes = self._estimate_on_ranks(trainer, pl_module, train_loss)
        if trainer.is_global_zero:
            self._write_and_log(trainer, step, outcomes, start, cal.row_mark(lowered))
            if self.influence is not None:
                self._influence_step(step, merge(outcomes))
        if self.components is not None:
            self._components_step(trainer, pl_module, step, train_loss)

    # -- run-level calibration -------------------------------------------------------------------
    def _calibrate_here(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                        train_loss: float | None, *, last: bool = False) -> bool:
        """Try to choose the run's settings at this checkpoint (the module at its weights):
        they are held when it is near a minimum, or when ``last`` (training ended without
        one). Tried at the 1st, 2nd, 4th, 8th, ... waiting checkpoint, so calibration costs a
        few estimates per run. Every rank takes global rank 0's result."""
        k = len(self._pending) + 1
        if not last and k & (k - 1):
            return False
        probe = None
        finite = _not_finite(trainer, pl_module, train_loss) is None  # a collective
        if trainer.is_global_zero and finite:
            try:
                with preserved_training_state(pl_module):
                    probe = self._calibration.probe(pl_module, self._data,
                                                    loss_fn=self._loss.loss_fn,
                                                    batch_loss=self._loss.batch_loss)
            except Exception as e:  # noqa: BLE001 - calibration never ends training
                _log.debug("LLCCallback: calibration failed", exc_info=True)
                self._calibration.failed_reason = f"{type(e).__name__}: {first_line(e)}"
        probe = trainer.strategy.broadcast(probe, src=0)
        if probe is None:
            return False
        if not (probe.get("near_minimum") or last):
            self._attempts.append({"step": int(step), "step_size": float(probe["step_size"]),
                                   "near_minimum": False,
                                   "calibration_s": float(probe.get("calibration_s", 0.0))})
            return False
        how = "first checkpoint near a minimum" if probe.get("near_minimum") else (
            "last checkpoint (none was near a minimum)")
        self._calibration.fix({step: probe}, how, attempts=self._attempts,
                              write=trainer.is_global_zero)
        return True

    def _announce(self, trainer: pl.Trainer) -> None:
        """One line saying which settings the run holds, and where they were chosen."""
        entry = self._calibration.record()
        if self.progress and trainer.is_global_zero and entry is not None:
            self._print(f"LLC: run settings ε = {entry['step_size']:.4g}, nβ = "
                        f"{entry['nbeta']:.4g} (calibrated at step "
                        f"{entry['calibrated_on'][-1]['step']}: {entry['rule']}); held for "
                        "every checkpoint")

    def _estimate_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Estimate the checkpoints that waited for the run's settings, each from its snapshot
        (the module's weights are put back bit for bit afterwards)."""
        pending, self._pending = self._pending, []
        for step, train_loss in pending:
            start = time.perf_counter()
            with contextlib.ExitStack() as weights:
                try:
                    weights.enter_context(self._weights_of(pl_module, step))
                except Exception as e:  # noqa: BLE001 - a lost snapshot is a failed row
                    if trainer.is_global_zero:
                        self._write_and_log(trainer, step, [EstimateFailure(
                            f"the snapshot of step {step} could not be read "
                            f"({first_line(e)})")], start)
                    continue
                self._estimate_step(trainer, pl_module, step, train_loss, start)

    @contextlib.contextmanager
    def _weights_of(self, pl_module: pl.LightningModule, step: int) -> Iterator[None]:
        """The module at the weights of ``step``'s snapshot, restored bit for bit after (in
        place: the optimizer keeps its parameters)."""
        from devinterp.run.rebuild import load_weights

        state = load_weights(self._store.snapshot_path(step))
        saved = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(state)
        try:
            yield
        finally:
            pl_module.load_state_dict(saved)

    def _settle_pending(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training ended before a checkpoint near a minimum: calibrate on the last waiting
        checkpoint and estimate them all (each choosing its own ε if calibration fails)."""
        step, train_loss = self._pending[-1]
        try:
            with self._weights_of(pl_module, step):
                ok = self._calibrate_here(trainer, pl_module, step, train_loss, last=True)
        except Exception as e:  # noqa: BLE001 - the rows say what failed
            self._calibration.failed_reason = first_line(e)
            ok = False
        if ok:
            self._announce(trainer)
        else:
            self._warn_once("uncalibrated", (
                "LLCCallback: the run's step size could not be calibrated "
                f"({self._calibration.failed_reason or 'no checkpoint'}); each waiting "
                "checkpoint chooses its own (rows marked calibration='checkpoint')"))
        self._estimate_pending(trainer, pl_module)

    def _estimate_on_ranks(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           train_loss: float | None) -> list[Any]:
        """Every rank's outcome for this step: its share of the chains, or the reason there is
        no estimate. Every rank reaches the collectives, failed or not: none is left waiting."""
        reason = _not_finite(trainer, pl_module, train_loss)
        if reason is not None:
            return [EstimateFailure(reason)]
        world, rank = trainer.world_size, trainer.global_rank
        first, count = chain_range(resolved_num_chains(self.options), world, rank)
        return gather(self._estimate(pl_module, first, count) if count else None, world)

    def _components_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                         train_loss: float | None) -> None:
        """Every component's λ̂ at this step (chains split over ranks like the main estimate),
        written to the long table by global rank 0 and logged; never ends training."""
        from devinterp.tracking.components import (
            component_rows,
            merge_components,
            run_components,
            write_component_rows,
        )

        reason = _not_finite(trainer, pl_module, train_loss)
        if reason is not None:
            outcome: Any = EstimateFailure(reason)
        else:
            world, rank = trainer.world_size, trainer.global_rank
            first, count = chain_range(resolved_num_chains(self.options), world, rank)
            mine = None
            if count:
                try:
                    with preserved_training_state(pl_module):
                        mine = run_components(
                            pl_module, self._data, self.components,
                            loss_fn=self._loss.loss_fn, batch_loss=self._loss.batch_loss,
                            options=self._calibration.estimator_options(), first_chain=first,
                            num_chains=count)
                except Exception as e:  # noqa: BLE001 - a diagnostic never ends training
                    _log.debug("LLCCallback: the components' estimate failed", exc_info=True)
                    mine = EstimateFailure(f"{type(e).__name__}: {first_line(e)}")
            outcome = merge_components(gather(mine, world))
        if not trainer.is_global_zero:
            return
        if isinstance(outcome, EstimateFailure):
            self._warn_once(f"components:{outcome.reason}", (
                f"LLCCallback: no component λ̂ at step {step} ({outcome.reason}); training "
                "goes on, the rows are marked failed"))
        with self._contained("components", f"write the component rows of step {step}"):
            write_component_rows(self._store,
                                 component_rows(step, outcome, self._component_names))
        if not isinstance(outcome, EstimateFailure):
            metrics = {f"llc/{name}/{k}": getattr(r, f"llc_{k}") for name, r in outcome.items()
                       if not isinstance(r, EstimateFailure) for k in ("mean", "std")}
            log_metrics(trainer.loggers, step, metrics)

    def _estimate(self, pl_module: pl.LightningModule, first: int, count: int) -> Any:
        """This rank's chains: an ``LLCResult``, or an :class:`EstimateFailure` for any error
        (a vmap failure, sdpa, a dtype mismatch, a loss that is not a scalar ...). With
        probes, their recorder rides on the same draws (it cannot fail the estimate)."""
        self._recorder = self._recorder_error = None
        if self.influence is not None:
            self._recorder, self._recorder_error = self.influence.recorder(
                self._data, num_chains=count, first_chain=first)
        recorders = [self._recorder] if self._recorder is not None else []
        try:
            with preserved_training_state(pl_module):
                return run_estimator(pl_module, self._data, loss_fn=self._loss.loss_fn,
                                     batch_loss=self._loss.batch_loss,
                                     options=self._calibration.estimator_options(),
                                     first_chain=first, num_chains=count, recorders=recorders)
        except Exception as e:  # noqa: BLE001 - a diagnostic must never end the training run
            _log.debug("LLCCallback: the estimate failed", exc_info=True)
            return EstimateFailure(f"{type(e).__name__}: {first_line(e)}")

    def _write_and_log(self, trainer: pl.Trainer, step: int, outcomes: list[Any],
                       start: float, mark: str = "") -> None:
        """On global rank 0: merge the ranks' outcomes, warn about failures, write the row (the
        run store first), then send λ̂ to the loggers."""
        result = merge(outcomes)
        failed = isinstance(result, EstimateFailure)
        where = (f"the row is marked failed in {self._store.path / LLC_FILE}" if failed else
                 "the chains of the failed rank(s) are left out of the row")
        for failure in outcomes:
            if isinstance(failure, EstimateFailure):
                self._warn_once(f"failed:{failure.reason}", (
                    f"LLCCallback: no λ̂ at step {step} ({failure.reason}); training goes on, "
                    f"{where} (later steps failing the same way are recorded without a "
                    "warning)"))
        row = None
        with self._contained("row", f"write the λ̂ row of step {step}"):
            row = record_result(self._store, step, result, save_trace=False,
                                extra={"calibration": mark} if mark else None)
            if self.save_traces and not failed:
                self._store.save_trace(step, result.loss_trace)
        if not failed:
            log_metrics(trainer.loggers, step, result.metrics())  # guarded: see LoggerGuard
        if self.progress and row is not None:
            self._print(describe(row, time.perf_counter() - start))

    def _influence_step(self, step: int, result: Any) -> None:
        """On global rank 0: the probes' influence of this step from the draws of its λ̂ (or
        a failed row saying why there is none)."""
        recorder, self._recorder = self._recorder, None
        reason = None
        with self._contained("influence", f"write the probe influence of step {step}"):
            reason = self.influence.write(step, result, recorder, self._recorder_error)
        if reason is not None:
            self._warn_once(f"influence:{reason}", (
                f"LLCCallback: no probe influence at step {step} ({reason}); training goes on, "
                "the influence row is marked failed"))

    @contextlib.contextmanager
    def _contained(self, key: str, what: str) -> Iterator[None]:
        """Warn once per ``key`` instead of raising: a full disk under the run directory must
        not end training either."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - the callback never ends the training run
            self._warn_once(f"contained:{key}", (
                f"LLCCallback: could not {what} ({type(e).__name__}: {first_line(e)}); training "
                "goes on (no more warnings for this)"))

    # -- training metrics ----------------------------------------------------------------------
    def _record_metrics(self, trainer: pl.Trainer, step: int) -> None:
        if self._metrics.record(trainer.callback_metrics, step):
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        """Write the buffered rows to ``metrics.csv``; a failure (a full disk) warns once and
        keeps them buffered for the next flush."""
        self._saved_since_flush = False
        if self._store is not None:
            with self._contained("metrics", "write metrics.csv"):
                self._metrics.flush(self._store)

    # -- data and what rebuilds the run --------------------------------------------------------
    def _resolve_data(self, trainer: pl.Trainer, module: pl.LightningModule) -> Any:
        if self.data is not None:
            return self.data
        if getattr(module, "llc_data", None) is not None:
            return module.llc_data
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "LLCCallback cannot take the data from the trainer's train dataloader "
                f"({type(loader).__name__}); pass data= to LLCCallback or set `llc_data` on "
                "the module"
            )
        return training_data(loader)

    def _write_run_files(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        """``run.json`` (what rebuilds the model, data and loss) and ``settings.json``."""
        missing = write_run_file(self._store, module, data=self._data,
                                 data_given=self.data is not None,
                                 datamodule=trainer.datamodule, loss=self._loss, mode=self.mode)
        probes = {}
        if self.influence is not None and self.mode == "deferred":
            # `devinterp estimate` records the influence from the run directory's copy.
            probes = {"probes": save_probes(self._store, self.influence.influence.probes),
                      "influence_train": self.influence.influence.num_train}
        write_settings(self._store, self.options, mode=self.mode, schedule={
            "every_n_train_steps": self.every_n_train_steps,
            "every_n_epochs": self.every_n_epochs, "steps": self.steps,
            "log_spaced": self.log_spaced, "include_init": self.include_init,
            "planned": self._schedule.planned() if self._schedule.max_steps else None,
        }, **probes)
        if missing and self.mode == "deferred":
            self._warn_once("missing", "LLCCallback (deferred): `devinterp estimate` cannot "
                                       f"rebuild {', '.join(missing)} from {self._store.path}; "
                                       "give them with its --module/--data/--loss options")

    # -- output --------------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        # tqdm.write moves any progress bar out of the way, and prints plainly when none is up.
        tqdm.write(line)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)


def _check_schedule(every_n_train_steps: int | None, every_n_epochs: int | None,
                    steps: list[int] | None, log_spaced: int | None) -> None:
    """Refuse a conflicting, empty or malformed schedule at construction, not after training
    started (``log_spaced`` is resolved at train start, when ``max_steps`` is known)."""
    if every_n_train_steps is not None and every_n_epochs is not None:
        raise ValueError(
            f"conflicting schedule: every_n_train_steps={every_n_train_steps} and "
            f"every_n_epochs={every_n_epochs}; give one (add explicit steps=[...] if needed)"
        )
    if every_n_epochs is not None and (not isinstance(every_n_epochs, int)
                                       or every_n_epochs < 1):
        raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
    if (every_n_train_steps is None and every_n_epochs is None and not steps
            and log_spaced is None):
        raise ValueError(
            "empty schedule: give every_n_train_steps, every_n_epochs, steps=[...] or "
            "log_spaced=N (e.g. log_spaced=100, every_n_train_steps=1000 as in the papers)"
        )
    Schedule(every_n_steps=every_n_train_steps, steps=tuple(steps or ()))
    if log_spaced is not None and (not isinstance(log_spaced, int) or log_spaced < 1):
        raise ValueError(f"log_spaced must be an integer >= 1, got {log_spaced!r}")


def _not_finite(trainer: pl.Trainer, pl_module: pl.LightningModule,
                train_loss: float | None) -> str | None:
    """Why this step has no λ̂ on any rank (a non-finite training loss or weights), or None.
    A collective under DDP: every rank calls it."""
    reason = None
    if train_loss is not None and not math.isfinite(train_loss):
        reason = f"non-finite training loss ({train_loss}) at this step"
    elif not weights_finite(pl_module):
        reason = "non-finite weights at this step"
    if trainer.world_size > 1 and not trainer.strategy.reduce_boolean_decision(
            reason is None, all=True):
        reason = reason or "non-finite training loss or weights on another rank"
    return reason


def _max_steps(trainer: pl.Trainer) -> int | None:
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return int(trainer.max_steps)
    total = trainer.estimated_stepping_batches
    return int(total) if math.isfinite(total) else None


def _loss_value(outputs: Any) -> float | None:
    """The training loss a ``training_step`` returned, if any."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    return None
