"""The problem the chains solve: the loss as a function of the sampled weights (with every use
of a tied tensor substituted), the anchor w*, the data, and the checks that fail early."""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap
from torch.nn.utils.stateless import _reparametrize_module

from devinterp.config import check_weights
from devinterp.llc.data import LoaderBatches, LossFn, TensorBatches
from devinterp.llc.errors import NonFiniteLossError

__all__ = ["BatchLoss", "Problem", "at_weights", "check_loss", "first_line",
           "parameter_aliases", "sampled_parameters", "vmap_works"]

BatchLoss = Callable[[Callable[..., Any], Any], Tensor]


def at_weights(model: nn.Module, tensors: Mapping[str, Tensor]
               ) -> contextlib.AbstractContextManager:
    """Run ``model`` (and all its submodules and methods) with its parameters and buffers
    replaced by ``tensors`` inside the block; tied tensors (one tensor registered under several
    names, e.g. GPT-2's output head and input embedding) are replaced under every name.

    This is the context manager behind ``torch.func.functional_call`` (``tie_weights=True``):
    functional_call only runs ``forward``, while a loss may need the model's other methods.
    """
    return _reparametrize_module(model, dict(tensors), tie_weights=True)


@dataclass
class Problem:
    """Everything the chains need: the loss as a function of parameters, the anchor w*, data."""

    model: nn.Module
    anchor: dict[str, Tensor]
    consts: dict[str, Tensor]
    loss_fn: LossFn | None
    batch_loss: BatchLoss | None
    source: TensorBatches | LoaderBatches
    device: torch.device
    baseline_cache: Tensor | None = None  # per-sample losses at w*, when the loss is a mean
    # Where ``loss`` writes each tensor, per key order of its ``params`` (see ``_slots``).
    _slot_cache: dict[tuple[str, ...], _Slots | None] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.has_rnn = any(isinstance(m, nn.RNNBase) for m in self.model.modules())

    def baseline(self, idx: Tensor | None, batch: Any) -> Tensor:
        """L_B(w*) of this minibatch: from the cache when possible, else one forward pass."""
        if idx is not None and self.baseline_cache is not None:
            return self.baseline_cache[idx].mean()
        return self.loss(self.anchor, batch).detach().double()

    def loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """The batch loss with the model's weights replaced by ``params`` for the whole call,
        so a ``batch_loss`` may run the model, any of its submodules or methods (e.g. a
        LightningModule's ``training_step``) and every use of a tied tensor moves together.

        It runs once per chain chunk and step, so the substitution is the one
        :func:`at_weights` makes, with where each tensor goes worked out once per problem
        (:func:`_slots`) instead of at every call."""
        keys = tuple(params)
        slots = self._slot_cache.get(keys, _UNSET)
        if slots is _UNSET:
            slots = self._slot_cache[keys] = _slots(self.model, self.consts, keys)
        if slots is None:  # names at_weights resolves otherwise, or rejects: let it
            swap = at_weights(self.model, {**self.consts, **params})
        else:
            swap = _swapped(slots, params)
        with swap, self._rnn_backward_allowed():
            return self._evaluate(batch)

    def _evaluate(self, batch: Any) -> Tensor:
        if self.batch_loss is not None:
            return self.batch_loss(self.model, batch)
        inputs, targets = batch
        return self.loss_fn(self.model(inputs), targets)

    def _rnn_backward_allowed(self) -> contextlib.AbstractContextManager:
        """cuDNN refuses an RNN's backward in eval mode (the mode sampling runs in), so on
        CUDA a model with RNN layers samples with cuDNN off (PyTorch's own kernels); a no-op
        elsewhere."""
        if self.device.type == "cuda" and self.has_rnn:
            return torch.backends.cudnn.flags(enabled=False)
        return contextlib.nullcontext()

    def outputs_at_anchor(self, inputs: Tensor) -> Tensor:
        """The model's outputs at w* (for the per-sample baseline cache)."""
        with at_weights(self.model, {**self.consts, **self.anchor}):
            return self.model(inputs)


#: (owner dict, key in it, tensor or the name in ``params`` of the tensor to put there)
_Slots = tuple[tuple[tuple[dict, str, Tensor], ...], tuple[tuple[dict, str, str], ...]]
_UNSET: Any = object()


def _slots(model: nn.Module, consts: Mapping[str, Tensor], keys: tuple[str, ...]
           ) -> _Slots | None:
    """Where :func:`at_weights` puts each tensor of ``{**consts, **params}`` (``keys``: the
    names in ``params``): the ``_parameters`` or ``_buffers`` entry of every name the tensor is
    registered under, tied aliases included; constants resolved to their tensor. None when a
    name is not a registered parameter or buffer, or two given names are one tied tensor:
    then ``at_weights`` itself handles (or rejects) the call."""
    names: dict[int, list[str]] = {}
    for name, t in chain(model.named_parameters(remove_duplicate=False),
                         model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    tied = {n: group for group in names.values() for n in group}
    given = {**dict.fromkeys(consts), **dict.fromkeys(keys)}
    const_slots, param_slots, seen = [], [], set()
    for name in given:
        for target in tied.get(name, [name]):
            if target != name and target in given:
                return None
            prefix, _, attr = target.rpartition(".")
            try:
                owner = model.get_submodule(prefix)
            except AttributeError:
                return None
            table = (owner._parameters if attr in owner._parameters
                     else owner._buffers if attr in owner._buffers else None)
            if table is None:
                return None
            if (id(table), attr) in seen:  # a module registered under two names
                continue
            seen.add((id(table), attr))
            if name in keys:
                param_slots.append((table, attr, name))
            else:
                const_slots.append((table, attr, consts[name]))
    return tuple(const_slots), tuple(param_slots)


@contextlib.contextmanager
def _swapped(slots: _Slots, params: Mapping[str, Tensor]):
    """Inside the block, every slot holds its tensor; afterwards what it held before."""
    const_slots, param_slots = slots
    done: list[tuple[dict, str, Any]] = []
    try:
        for table, attr, tensor in const_slots:
            done.append((table, attr, table[attr]))
            table[attr] = tensor
        for table, attr, name in param_slots:
            done.append((table, attr, table[attr]))
            table[attr] = params[name]
        yield
    finally:
        for table, attr, old in reversed(done):
            table[attr] = old


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Every name a parameter is registered under -> its canonical name (the one
    ``named_parameters()`` lists). A tied tensor has several names and one canonical name."""
    canonical: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = canonical.setdefault(id(p), name)
    return out


def sampled_parameters(model: nn.Module, weights: Sequence[str] | None
                        ) -> dict[str, nn.Parameter]:
    """The parameters SGLD moves, by canonical name: those matching ``weights`` (a pattern may
    name any alias of a tied tensor), else the trainable ones. A tied tensor counts once."""
    named = dict(model.named_parameters())
    if weights is None:
        params = {n: p for n, p in named.items() if p.requires_grad}
        if not params:
            raise ValueError("model has no trainable parameters (requires_grad=True); unfreeze "
                             "the weights whose λ̂ you want, or name them with weights=[...]")
        return params
    check_weights(weights)
    aliases = parameter_aliases(model)
    unmatched = [w for w in weights if not any(fnmatch.fnmatchcase(n, w) for n in aliases)]
    if unmatched:
        shown = ", ".join(list(named)[:12]) + (", ..." if len(named) > 12 else "")
        raise ValueError(f"weights {unmatched} match no parameter of "
                         f"{type(model).__name__}; its parameters are: {shown}")
    chosen = {c for n, c in aliases.items() if any(fnmatch.fnmatchcase(n, w) for w in weights)}
    return {n: p for n, p in named.items() if n in chosen}


def first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def vmap_works(prob: Problem, seed: int, notes: list[str]) -> bool:
    """Whether ``torch.func.vmap`` can batch the loss's gradient over chains.

    Models with data-dependent control flow, ``.item()``, in-place writes into preallocated
    tensors or ops without a batching rule cannot be vmapped; their chains then run one at a
    time (the same numbers, slower), said once in ``notes``. If one chain cannot be
    differentiated either, the error names the model, both attempts and the fixes.
    """
    batch = next(prob.source.iterate(seed))
    stacked = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in prob.anchor.items()}
    try:
        vmap(grad_and_value(prob.loss), in_dims=(0, None))(stacked, batch)
        return True
    except Exception as vmap_error:  # noqa: BLE001 - any failure: try one chain at a time
        try:
            grad_and_value(prob.loss)(prob.anchor, batch)
        except Exception as seq_error:  # noqa: BLE001
            raise RuntimeError(
                f"cannot differentiate the loss of {type(prob.model).__name__} with respect to "
                f"its weights, neither vectorized over chains ({first_line(vmap_error)}) nor "
                f"one chain at a time ({first_line(seq_error)}); the loss must be a "
                "differentiable function of the weights (no .detach(), .item() or numpy on "
                "the path, no optimizer step); pass loss_fn= or batch_loss= that computes it"
            ) from seq_error
        message = (f"torch.func.vmap cannot batch {type(prob.model).__name__} over chains "
                   f"({first_line(vmap_error)}); its chains ran one at a time (same numbers, "
                   "slower); pass vectorize=False to skip this check")
        warnings.warn(message, stacklevel=3)
        notes.append(message)
        return False


def check_loss(prob: Problem, seed: int) -> None:
    """Fail early, with a clear message, on a loss that is not a finite scalar at w*."""
    batch = next(prob.source.iterate(seed))
    with torch.no_grad():
        value = prob.loss(prob.anchor, batch)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn must return a scalar mean loss of the batch, got {shape}; reduce it "
            "(e.g. reduction='mean')"
        )
    if not torch.isfinite(value):
        raise NonFiniteLossError(f"the loss at w* is not finite ({value.item()}); estimate λ̂ "
                                 "only at a checkpoint whose loss is finite")
