"""Plain SGLD (Welling & Teh 2011) on the localized, tempered potential: a blackjax-shaped
kernel, ``init(position) -> state`` and ``step(state, grad, noise, ...) -> (state, info)``."""

from __future__ import annotations

from dataclasses import dataclass

from devinterp.samplers.langevin import Position, drift, move

__all__ = ["SGLDState", "init", "step"]


@dataclass(frozen=True)
class SGLDState:
    """A chain (or a stack of chains) of plain SGLD: its position only."""

    position: Position


def init(position: Position, *, localization: float) -> SGLDState:
    """The state at ``position`` (copied). ``localization`` is unused (the RMSProp kernel
    derives its damping from it; every kernel takes the same arguments)."""
    return SGLDState({k: v.detach().clone() for k, v in position.items()})


def step(state: SGLDState, grad: Position, noise: Position, *, anchor: Position,
         step_size: float, nbeta: float, localization: float, adapt: bool
         ) -> tuple[SGLDState, dict]:
    """One step; ``info`` holds the drift ∇U and √G (None: no preconditioner) it used, which
    the driver's MALA accounting needs. ``adapt`` is unused (nothing to adapt)."""
    d = drift(state.position, grad, anchor, nbeta, localization)
    return SGLDState(move(state.position, d, noise, step_size)), {"drift": d, "root": None}
