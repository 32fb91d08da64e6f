"""RMSProp-preconditioned SGLD (Li et al. 2016) whose preconditioner adapts during burn-in and
is then frozen, so the draws come from a fixed-preconditioner Langevin chain with the right
target while flat (singular) and stiff directions mix at similar speeds.

G = 1 / (√V + δ), V a running average (α = 0.99) of the squared drift ∇U, δ = √γ (the
localization bounds the curvature from below by γ, so G ≤ 1/√γ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from devinterp.samplers.langevin import Position, drift, move

__all__ = ["RMSPropState", "init", "step"]

ALPHA = 0.99


@dataclass(frozen=True)
class RMSPropState:
    """Position, the running squared-drift average V, the preconditioner G last computed
    (None before the first step) and the damping δ."""

    position: Position
    average: Position
    precond: Position | None
    delta: float


def init(position: Position, *, localization: float) -> RMSPropState:
    """The state at ``position`` (copied), with V = 0 and no preconditioner yet."""
    pos = {k: v.detach().clone() for k, v in position.items()}
    delta = math.sqrt(localization) if localization > 0 else 1e-8
    return RMSPropState(pos, {k: torch.zeros_like(v) for k, v in pos.items()}, None, delta)


def step(state: RMSPropState, grad: Position, noise: Position, *, anchor: Position,
         step_size: float, nbeta: float, localization: float, adapt: bool
         ) -> tuple[RMSPropState, dict]:
    """One step. With ``adapt`` (burn-in), V takes in this drift (the first step sets it) and
    G is recomputed; otherwise G stays frozen. ``info``: the drift and the G used."""
    d = drift(state.position, grad, anchor, nbeta, localization)
    precond = state.precond
    if adapt or precond is None:
        first = precond is None
        for k, dk in d.items():
            v = state.average[k]
            if first:
                v.copy_(dk * dk)
            else:
                v.mul_(ALPHA).addcmul_(dk, dk, value=1 - ALPHA)
        precond = {k: 1.0 / (v.sqrt() + state.delta) for k, v in state.average.items()}
    new = move(state.position, d, noise, step_size, precond)
    return (RMSPropState(new, state.average, precond, state.delta),
            {"drift": d, "precond": precond})
