"""λ̂ at a training step without the Lightning Trainer: for Lightning Fabric and plain PyTorch loops.

:func:`track_llc` does at one step what :class:`devinterp.LLCCallback` does at each scheduled
step: snapshot the weights into the run directory, estimate λ̂ with the training state left
exactly as it was, and write the λ̂ row (and the per-chain loss trace) to the run store. Both
are built from the same pieces (:class:`~devinterp.tracking.Schedule`,
:func:`~devinterp.tracking.preserved_training_state`, :func:`~devinterp.tracking.run_estimator`,
:func:`~devinterp.tracking.record_result`), so both write the same table.

Example (a plain loop; with Fabric, pass the unwrapped ``model.module`` on global rank 0)::

    schedule = Schedule(every_n_steps=100, log_spaced=30, max_steps=2_000)
    for step in range(2_001):
        if step in schedule:  # λ̂ at the weights after `step` optimizer steps
            track_llc(model, step, "runs/mlp", data=(x, y), loss_fn=nn.MSELoss())
        if step < 2_000:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from devinterp.config import SamplerConfig
from devinterp.run.store import SETTINGS_FILE, RunStore
from devinterp.tracking.estimate import (
    EstimateFailure,
    record_result,
    run_estimator,
    write_settings,
)
from devinterp.tracking.losses import module_loss
from devinterp.tracking.state import preserved_training_state, weights_finite

__all__ = ["track_llc"]


def track_llc(
    model: nn.Module,
    step: int,
    store: RunStore | str,
    *,
    data: Any,
    loss_fn: Callable[..., Tensor] | None = None,
    batch_loss: Callable[..., Tensor] | None = None,
    snapshot: bool = True,
    save_trace: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Snapshot ``model`` at ``step``, estimate λ̂ and write its row to the run store.

    For Lightning Fabric and plain loops; the training state (RNG streams, modes, grads,
    weights) is exactly as before the call, so training continues as if nothing happened.

    Args:
        model: the network being trained, at the weights of ``step``.
        step: the training step (optimizer steps taken so far; 0 = initialization).
        store: a :class:`RunStore` or a run-directory path (created if missing).
        data: what to sample with, as in :func:`devinterp.estimate_llc`.
        loss_fn, batch_loss: the loss, as in :func:`devinterp.estimate_llc`. Default: the
            module's, found as :func:`module_loss` says (e.g. a LightningModule's own
            ``training_step``).
        snapshot: also save the weights (``snapshots/step_*.pt``).
        save_trace: also save the per-chain loss trace, shape (chain, draw).
        **options: estimator options (``num_chains``, ``num_draws``, ``step_size``, ...).

    Returns:
        The row written: ``step, llc_mean, llc_std, <diagnostics>, status, reason, ...``.
    """
    loss = module_loss(model, loss_fn, batch_loss, fix="pass loss_fn= or batch_loss= to "
                                                      "track_llc")
    SamplerConfig.from_options(options)  # names and values checked before anything is written
    if not isinstance(store, RunStore):
        store = RunStore(store, create=True)
    if store.read_json(SETTINGS_FILE) is None:
        write_settings(store, options)
    if snapshot:
        store.save_snapshot(step, model.state_dict())
    if not weights_finite(model):
        return record_result(store, step, EstimateFailure("non-finite weights at this step"))
    with preserved_training_state(model):
        result = run_estimator(model, data, loss_fn=loss.loss_fn, batch_loss=loss.batch_loss,
                               options=options)
    return record_result(store, step, result, save_trace=save_trace)
