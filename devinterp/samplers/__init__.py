"""The SGLD family as kernels: one file per sampler, each ``init(position, *, localization)
-> state`` and ``step(state, grad, noise, *, anchor, step_size, nbeta, localization, adapt)
-> (state, info)``, pure functions over dicts of tensors (stacked over chains or not).

:data:`KERNELS` is the registry: names here are the ``sampler=`` values everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devinterp.samplers import rmsprop_sgld, sgld

__all__ = ["KERNELS", "Kernel", "get_kernel"]


@dataclass(frozen=True)
class Kernel:
    """A sampler: its name and its two pure functions."""

    name: str
    init: Callable[..., Any]
    step: Callable[..., tuple[Any, dict]]


KERNELS: dict[str, Kernel] = {
    "sgld": Kernel("sgld", sgld.init, sgld.step),
    "rmsprop_sgld": Kernel("rmsprop_sgld", rmsprop_sgld.init, rmsprop_sgld.step),
}


def get_kernel(name: str) -> Kernel:
    """The kernel called ``name``, or a ValueError naming the choices."""
    if name not in KERNELS:
        raise ValueError(f"sampler must be one of {tuple(KERNELS)}, got {name!r}")
    return KERNELS[name]
