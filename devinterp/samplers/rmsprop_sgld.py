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
    """Position, the running squared-drift average V (dropped once adaptation ends: the draws
    never need it), √G (None before the first step; updated in place while adapting) and the
    damping δ."""

    position: Position
    average: Position | None
    root: Position | None
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
    G is recomputed; otherwise G stays frozen. Adaptation happens at the start of a chain
    only: the first step without it drops V. ``info``: the drift and the √G used."""
    d = drift(state.position, grad, anchor, nbeta, localization)
    average, root = state.average, state.root
    if adapt or root is None:
        first = root is None
        if first:
            root = {k: torch.empty_like(v) for k, v in average.items()}
        for k, dk in d.items():
            v, r = average[k], root[k]
            if first:
                torch.mul(dk, dk, out=v)
            else:
                v.mul_(ALPHA).addcmul_(dk, dk, value=1 - ALPHA)
            # √G = (√V + δ)^(-1/2), in place in this chain's own buffer: no temporaries.
            torch.sqrt(v, out=r)
            r.add_(state.delta).reciprocal_().sqrt_()
    else:
        average = None
    new = move(state.position, d, noise, step_size, root)
    return RMSPropState(new, average, root, state.delta), {"drift": d, "root": root}
