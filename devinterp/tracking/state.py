"""Leaving training untouched: what an estimate may change, put back afterwards."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["preserved_training_state", "weights_finite"]


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
