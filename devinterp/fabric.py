"""λ̂ at a training step without the Lightning Trainer: for Lightning Fabric and plain PyTorch loops.

:func:`track_llc` does at one step what :class:`devinterp.LLCCallback` does at each scheduled
step: snapshot the weights into the run directory, estimate λ̂ with the training state left
exactly as it was, and write the λ̂ row (and the per-chain loss trace) to the run store. The
callback is a Lightning adapter over the same pieces (:class:`Schedule`,
:func:`preserved_training_state`, :func:`run_estimator`, :func:`result_row`), so both paths write
the same table.

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

import contextlib
import inspect
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from devinterp.store import SETTINGS_FILE, RunStore

#: Options of :func:`devinterp.estimate_llc` that the callback and ``devinterp estimate`` pass
#: through and record in ``settings.json``.
ESTIMATOR_OPTIONS = (
    "num_chains", "num_draws", "num_burnin", "batch_size", "step_size", "localization", "nbeta",
    "sampler", "seed", "num_samples", "chain_chunk_size", "vectorize", "weights",
)
#: Settings recorded in every λ̂ row: they change λ̂ a lot (SCIENCE.md: always report nβ).
ROW_SETTINGS = ("nbeta", "step_size", "localization", "num_chains", "num_draws", "num_burnin",
                "batch_size", "sampler", "seed")


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------
def log_spaced_steps(num: int, max_steps: int) -> list[int]:
    """About ``num`` steps spaced evenly in log-time over ``[1, max_steps]`` (duplicates dropped)."""
    if num < 1 or max_steps < 1:
        return []
    return sorted({int(s) for s in np.round(np.geomspace(1, max_steps, num))})


@dataclass(frozen=True)
class Schedule:
    """The steps at which λ̂ is estimated: the union of every n-th step, explicit steps and
    log-spaced steps (the papers use ~100 log-spaced steps union many linear ones), plus step 0
    (the initialization) when ``include_init``.

    Args:
        every_n_steps: every n-th step (n, 2n, ...).
        steps: explicit steps.
        log_spaced: about this many steps spaced evenly in log(step) over ``[1, max_steps]``.
        max_steps: the last training step; needed by ``log_spaced``.
        include_init: include step 0.

    Raises:
        ValueError: a non-positive interval, a negative step, ``log_spaced`` without
            ``max_steps``, or a schedule with no step at all.
    """

    every_n_steps: int | None = None
    steps: tuple[int, ...] = ()
    log_spaced: int | None = None
    max_steps: int | None = None
    include_init: bool = True
    _explicit: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and (
            not _is_int(self.every_n_steps) or self.every_n_steps < 1
        ):
            raise ValueError(f"every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")
        if self.log_spaced is not None and (not _is_int(self.log_spaced) or self.log_spaced < 1):
            raise ValueError(f"log_spaced must be an integer >= 1, got {self.log_spaced!r}")
        bad = [s for s in self.steps if not _is_int(s) or s < 0]
        if bad:
            raise ValueError(f"steps must be integers >= 0, got {bad}")
        if self.log_spaced is not None and self.max_steps is None:
            raise ValueError("log_spaced needs the number of training steps: set max_steps "
                             "(or max_epochs with a dataloader of known length)")
        explicit = set(self.steps)
        if self.log_spaced is not None:
            explicit.update(log_spaced_steps(self.log_spaced, int(self.max_steps)))
        object.__setattr__(self, "_explicit", frozenset(explicit))
        if not explicit and self.every_n_steps is None and not self.include_init:
            raise ValueError("the schedule is empty: give every_n_steps, steps or log_spaced")

    def __contains__(self, step: object) -> bool:
        if not _is_int(step) or step < 0:
            return False
        if step == 0 and self.include_init:
            return True
        if step in self._explicit:
            return True
        return self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0

    def planned(self, max_steps: int | None = None) -> list[int]:
        """All scheduled steps up to ``max_steps`` (default: the schedule's own)."""
        last = self.max_steps if max_steps is None else max_steps
        if last is None:
            raise ValueError("planned() needs max_steps")
        out = {s for s in self._explicit if s <= last}
        if self.include_init:
            out.add(0)
        if self.every_n_steps is not None:
            out.update(range(self.every_n_steps, last + 1, self.every_n_steps))
        return sorted(out)

    def beyond(self, max_steps: int) -> list[int]:
        """Explicit steps that a run of ``max_steps`` steps never reaches."""
        return sorted(s for s in self._explicit if s > max_steps)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# Leaving training untouched
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserved_training_state(model: nn.Module) -> Iterator[None]:
    """Restore everything training depends on after the block, whatever the block did.

    Restored: the Python, NumPy, torch CPU and CUDA random streams, grad mode, each submodule's
    train/eval flag, each parameter's ``requires_grad`` and ``.grad``, and the values of
    parameters and buffers (e.g. BatchNorm statistics). Buffers are always written back (they
    are small, and kernels such as BatchNorm's update them without moving their version
    counter); a parameter is written back only if its version counter moved, so the common
    case costs one copy of the parameters and no writes to them.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (the legacy global stream users seed)
    cpu_state = torch.get_rng_state()
    cuda_states = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    grad_enabled = torch.is_grad_enabled()
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [(p, p.requires_grad, p.grad) for p in params]
    saved = [(t, t._version, t.detach().clone()) for t in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, version, copy in saved:
                if t._version != version:
                    t.copy_(copy)
            for b, copy in buffers:
                b.copy_(copy)
        for p, requires_grad, g in grads:
            p.requires_grad_(requires_grad)
            p.grad = g
        for m, training in modes:
            m.training = training
        torch.set_grad_enabled(grad_enabled)
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def weights_finite(model: nn.Module) -> bool:
    """True if every parameter is finite (a NaN weight makes λ̂ meaningless)."""
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Estimating and recording
# ----------------------------------------------------------------------------------------------
def estimator_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that :func:`devinterp.estimate_llc` takes (None = default)."""
    unknown = sorted(set(options) - set(ESTIMATOR_OPTIONS))
    if unknown:
        raise ValueError(f"unknown estimator options {unknown}; known: {list(ESTIMATOR_OPTIONS)}")
    return {k: v for k, v in options.items() if v is not None}


def resolved_num_chains(options: Mapping[str, Any]) -> int:
    """The number of chains ``options`` asks for, or the estimator's default."""
    if options.get("num_chains") is not None:
        return int(options["num_chains"])
    from devinterp.llc import estimate_llc

    return int(inspect.signature(estimate_llc).parameters["num_chains"].default)


def chain_range(num_chains: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(first_chain, count)`` of the chains that ``rank`` runs when ``num_chains`` chains are
    split as evenly as possible over ``world_size`` processes (count may be 0)."""
    base, extra = divmod(num_chains, world_size)
    first = rank * base + min(rank, extra)
    return first, base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class EstimateFailure:
    """Why a step has no λ̂ (every chain diverged, a non-finite loss at w*, an estimator error):
    a result of the run, written as a failed row, never a reason to stop training."""

    reason: str


def run_estimator(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable[..., Tensor] | None = None,
    batch_loss: Callable[..., Tensor] | None = None,
    options: Mapping[str, Any] | None = None,
    first_chain: int = 0,
    num_chains: int | None = None,
) -> Any:
    """Run :func:`devinterp.estimate_llc` on chains ``[first_chain, first_chain + num_chains)``,
    with ``self.log`` silenced and the optimizer out of reach (:func:`estimating`).

    Returns the ``LLCResult``, or an :class:`EstimateFailure` when the checkpoint has no λ̂:
    every chain diverged, or the loss at w* is not finite. Other errors propagate.
    """
    from devinterp.llc import AllChainsDivergedError, NonFiniteLossError, estimate_llc

    kwargs = estimator_kwargs(options or {})
    if num_chains is not None:
        kwargs["num_chains"] = num_chains
    try:
        with estimating(model):
            return estimate_llc(model, data, loss_fn, batch_loss=batch_loss,
                                first_chain=first_chain, progress=False, **kwargs)
    except (AllChainsDivergedError, NonFiniteLossError) as e:
        return EstimateFailure(first_line(e))


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def result_row(step: int, result: Any) -> dict[str, Any]:
    """The λ̂-table row of an ``LLCResult``: λ̂, its std over chains, the scalar diagnostics
    (timings left out, so a table does not depend on the machine), the settings that change λ̂,
    and ``status="ok"``."""
    row: dict[str, Any] = {"step": int(step), "llc_mean": float(result.llc_mean),
                           "llc_std": float(result.llc_std), "init_loss": float(result.init_loss)}
    for k, v in result.diagnostics.items():
        if _scalar(v) and not k.endswith("_s"):
            row[k] = float(v) if isinstance(v, (float, np.floating)) else int(v)
    for k in ROW_SETTINGS:
        if k in result.settings:
            row[k] = result.settings[k]
    row["status"] = "ok"
    row["reason"] = ""
    row["warnings"] = " | ".join(result.warnings)
    return row


def failed_row(step: int, reason: str) -> dict[str, Any]:
    """A λ̂-table row for a step where no estimate exists, saying why."""
    return {"step": int(step), "llc_mean": math.nan, "llc_std": math.nan, "status": "failed",
            "reason": reason, "warnings": ""}


def record_result(store: RunStore, step: int, result: Any, *, save_trace: bool = True
                  ) -> dict[str, Any]:
    """Write the row (and the (chain, draw) loss trace) of ``result``: an ``LLCResult``, or an
    :class:`EstimateFailure` (a plain string is read as a failure's reason too)."""
    if isinstance(result, (EstimateFailure, str)):
        row = failed_row(step, result.reason if isinstance(result, EstimateFailure) else result)
    else:
        row = result_row(step, result)
        if save_trace:
            store.save_trace(step, result.loss_trace)
    store.write_llc_row(row)
    return row


def describe(row: Mapping[str, Any], elapsed: float | None = None) -> str:
    """One compact progress line for an estimate."""
    step = row["step"]
    if row.get("status") != "ok":
        return f"LLC step {step}: failed ({row.get('reason', '')})"
    text = f"LLC step {step}: λ̂ = {row['llc_mean']:.4g} ± {row['llc_std']:.2g}"
    if "num_chains" in row and "num_draws" in row:
        text += f" ({row['num_chains']} chains × {row['num_draws']} draws"
        text += f", {elapsed:.1f} s)" if elapsed is not None else ")"
    warnings = [w for w in str(row.get("warnings") or "").split(" | ") if w]
    if warnings:
        more = f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else ""
        text += f"; warning: {warnings[0]}{more}"
    return text


def write_settings(store: RunStore, options: Mapping[str, Any], **extra: Any) -> None:
    """Record the sampler settings (as requested; None = the estimator's default) and extras."""
    store.update_json(SETTINGS_FILE, {**{k: options.get(k) for k in ESTIMATOR_OPTIONS}, **extra})


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
    estimator_kwargs(options)
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


# ----------------------------------------------------------------------------------------------
# The loss: one resolution order for the callback, track_llc and `devinterp estimate`
# ----------------------------------------------------------------------------------------------
#: Where the λ̂ loss comes from; the first that exists wins (``LossSpec.kind`` in ``run.json``).
LOSS_ORDER = ("argument", "module_llc_batch_loss", "module_loss_fn", "module_training_step")


@dataclass(frozen=True)
class LossSpec:
    """The loss λ̂ samples with: exactly one of ``loss_fn(outputs, targets)`` and
    ``batch_loss(forward, batch)``, and the convention (:data:`LOSS_ORDER`) that gave it."""

    kind: str
    loss_fn: Callable[..., Tensor] | None = None
    batch_loss: Callable[..., Tensor] | None = None


def module_loss(
    module: nn.Module,
    loss_fn: Callable[..., Tensor] | None = None,
    batch_loss: Callable[..., Tensor] | None = None,
    *,
    recorded: str | None = None,
    fix: str = "pass loss_fn=(outputs, targets) -> mean loss",
) -> LossSpec:
    """The loss to sample ``module`` with, in the one documented order: the ``loss_fn`` (or
    ``batch_loss``) argument; else a method ``llc_batch_loss(self, forward, batch)``; else an
    attribute ``loss_fn(outputs, targets)``; else the module's own ``training_step(batch,
    batch_idx)`` (:class:`TrainingStepLoss`). ``recorded`` (a ``run.json`` loss kind) makes
    that convention win when the module has it: the run sampled with it.

    Raises:
        TypeError: both ``loss_fn`` and ``batch_loss``.
        ValueError: no convention applies, or the training step cannot be a loss (manual
            optimization); the message names the module, what was tried, and ``fix``.
    """
    if loss_fn is not None and batch_loss is not None:
        raise TypeError("pass one of loss_fn(outputs, targets) or batch_loss(forward, batch), "
                        "not both")
    if loss_fn is not None or batch_loss is not None:
        return LossSpec("argument", loss_fn, batch_loss)
    name = type(module).__name__
    found: dict[str, Callable[[], LossSpec]] = {}
    method = getattr(module, "llc_batch_loss", None)
    if callable(method):
        found["module_llc_batch_loss"] = lambda: LossSpec("module_llc_batch_loss",
                                                          batch_loss=method)
    attr = getattr(module, "loss_fn", None)
    if callable(attr):
        found["module_loss_fn"] = lambda: LossSpec("module_loss_fn", loss_fn=attr)
    if _has_training_step(module):
        found["module_training_step"] = lambda: LossSpec(
            "module_training_step", batch_loss=TrainingStepLoss(module, fix=fix))
    if not found:
        raise ValueError(
            f"{name} has no loss for λ̂: tried an llc_batch_loss(self, forward, batch) method, a "
            "loss_fn attribute (callable(outputs, targets) -> mean loss) and training_step("
            f"batch, batch_idx); {fix}, or define llc_batch_loss(self, forward, batch) on {name}"
        )
    kind = recorded if recorded in found else next(k for k in LOSS_ORDER if k in found)
    return found[kind]()


def _has_training_step(module: nn.Module) -> bool:
    """True for a LightningModule that overrides ``training_step``, or any module with one."""
    if not callable(getattr(module, "training_step", None)):
        return False
    pl = sys.modules.get("lightning.pytorch")
    if pl is not None and isinstance(module, pl.LightningModule):
        from lightning.pytorch.utilities.model_helpers import is_overridden

        return is_overridden("training_step", module)
    return True


class TrainingStepLoss:
    """The module's own training objective as a ``batch_loss``: ``training_step(batch, 0)``
    evaluated at the sampled weights, its tensor (or the ``"loss"`` entry of its dict) the
    batch loss. Inside it (see :func:`estimating`) ``self.log`` does nothing and the optimizer
    and schedulers are out of reach; the estimator sets eval mode and restores the random
    streams. It is the objective as written, regularizers included: λ̂ needs a mean negative
    log-likelihood, so give ``loss_fn=`` or ``llc_batch_loss`` when the step adds other terms.

    Raises:
        ValueError: at construction for a module that optimizes manually; when called, for a
            step that returns None or no scalar loss, or that uses the optimizer.
    """

    def __init__(self, module: nn.Module, *, fix: str) -> None:
        self.module = module
        self._name = type(module).__name__
        self._fix = f"{fix}, or define llc_batch_loss(self, forward, batch) on {self._name}"
        if getattr(module, "automatic_optimization", True) is False:
            raise ValueError(
                f"{self._name}.training_step cannot be the λ̂ loss: the module optimizes "
                f"manually (automatic_optimization = False); {self._fix}"
            )
        try:
            params = inspect.signature(module.training_step).parameters.values()
        except (TypeError, ValueError):
            params = ()
        # Lightning passes batch_idx only to a training_step that takes it.
        self._with_index = len(params) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)

    def __call__(self, forward: Any, batch: Any) -> Tensor:
        try:
            out = (self.module.training_step(batch, 0) if self._with_index
                   else self.module.training_step(batch))
        except _OptimizerUse as e:
            raise ValueError(f"{self._name}.training_step calls self.{e.hook}(): it needs the "
                             f"optimizer, which λ̂ must not touch; {self._fix}") from None
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if isinstance(loss, Tensor) and loss.numel() == 1:
            return loss.reshape(())
        if out is None:
            got = "None (a skipped batch)"
        elif isinstance(out, Mapping):
            got = f"a dict without a scalar 'loss' (keys {sorted(map(str, out))})"
        elif isinstance(loss, Tensor):
            got = f"a tensor of shape {tuple(loss.shape)}"
        else:
            got = f"a {type(out).__name__}"
        raise ValueError(f"{self._name}.training_step returned {got}, not a scalar loss tensor "
                         f"or a dict with a scalar 'loss'; {self._fix}")


class _OptimizerUse(RuntimeError):
    """A loss called an optimizer or scheduler hook while λ̂ was estimated."""

    def __init__(self, hook: str) -> None:
        super().__init__(f"self.{hook}() is not available while λ̂ is estimated: the loss must "
                         "not use the optimizer or the schedulers")
        self.hook = hook


_MISSING = object()
_SILENCED = ("log", "log_dict")
_OPTIMIZER_HOOKS = ("optimizers", "lr_schedulers", "manual_backward", "toggle_optimizer",
                    "untoggle_optimizer", "clip_gradients")


@contextlib.contextmanager
def estimating(model: nn.Module) -> Iterator[None]:
    """While λ̂ is estimated, in every LightningModule of ``model``: ``self.log`` and
    ``self.log_dict`` do nothing (no value reaches a logger, with or without a trainer), and the
    optimizer and scheduler hooks (``self.optimizers()``, ``manual_backward``, ...) raise, so a
    loss that runs training code cannot step them. Undone after the block."""
    pl = sys.modules.get("lightning.pytorch")
    modules = [m for m in model.modules() if pl is not None and isinstance(m, pl.LightningModule)]
    saved = [(m, name, m.__dict__.get(name, _MISSING)) for m in modules
             for name in (*_SILENCED, *_OPTIMIZER_HOOKS)]
    for m, name, _ in saved:
        m.__dict__[name] = _nothing if name in _SILENCED else _refusing(name)
    try:
        yield
    finally:
        for m, name, value in saved:
            if value is _MISSING:
                m.__dict__.pop(name, None)
            else:
                m.__dict__[name] = value


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _refusing(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise _OptimizerUse(name)

    return refuse


def training_data(loader: Any) -> Any:
    """What to sample with, given a training loader: its dataset, so the estimator draws its own
    minibatches of its own size from ``seed``; the loader itself when it collates specially or
    its dataset is not a ``Dataset`` (the estimator re-creates it with its own generator; the
    training loader is never iterated, so the training random stream is not consumed)."""
    from torch.utils.data import DataLoader, Dataset
    from torch.utils.data._utils.collate import default_collate

    if not isinstance(loader, DataLoader):
        return loader
    if loader.collate_fn is default_collate and isinstance(loader.dataset, Dataset):
        return loader.dataset
    return loader


def iter_floats(values: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    """The entries of a metrics mapping that are real scalars, as floats."""
    for k, v in values.items():
        if isinstance(v, Tensor):
            if v.numel() != 1:
                continue
            v = v.item()
        if _scalar(v):
            yield k, float(v)
