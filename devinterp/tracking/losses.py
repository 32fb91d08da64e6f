"""The λ̂ loss: one resolution order for the callback, ``track_llc`` and ``devinterp estimate``,
and what keeps a module's own ``training_step`` from reaching the loggers or the optimizer."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = ["LOSS_ORDER", "LossSpec", "TrainingStepLoss", "estimating", "module_loss",
           "training_data"]

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

