"""The SGLD family as pure update functions over dicts of tensors.

A position is a ``dict[str, Tensor]``. Every function here works the same whether the tensors
carry a leading chain dimension ``(chain, *shape)`` or not, because the update is elementwise:
only the gradient needs ``torch.func.vmap`` (done by the driver in :mod:`devinterp.llc`).

The potential sampled is ``U(w) = nβ·L(w) + (γ/2)·‖w − w*‖²`` and the SGLD step is
``w ← w − (ε/2)·∇U(w) + N(0, ε·I)`` (Welling & Teh 2011; localized as in Lau et al. 2023).
The RMSProp-preconditioned variant (Li et al. 2016) scales drift by G and noise by √G with
``G = 1 / (√V + δ)``, ``V`` a running average of the squared drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Position = dict[str, Tensor]

SAMPLERS = ("sgld", "rmsprop_sgld")


@dataclass
class SamplerState:
    """What a chain carries from step to step.

    ``precond`` is None for plain SGLD; for RMSProp-SGLD it is the running squared-drift average.
    """

    position: Position
    precond: Position | None = None


def sampler_init(position: Position, sampler: str = "sgld") -> SamplerState:
    """Initial state of a chain (or a stack of chains) at ``position`` (copied)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    pos = {k: v.detach().clone() for k, v in position.items()}
    precond = {k: torch.zeros_like(v) for k, v in pos.items()} if sampler == "rmsprop_sgld" else None
    return SamplerState(pos, precond)


def drift(position: Position, grad: Position, anchor: Position, nbeta: float,
          localization: float) -> Position:
    """∇U(w) = nβ·∇L(w) + γ·(w − w*)."""
    out = {}
    for k, w in position.items():
        d = torch.sub(w, anchor[k])
        out[k] = d.mul_(localization).add_(grad[k], alpha=nbeta)
    return out


def preconditioner(state: SamplerState, drift_: Position, *, alpha: float = 0.99,
                   delta: float = 1e-8, first: bool = False) -> Position | None:
    """Update the RMSProp average in place and return G = 1/(√V + δ); None for plain SGLD."""
    if state.precond is None:
        return None
    out = {}
    for k, d in drift_.items():
        v = state.precond[k]
        if first:
            v.copy_(d * d)
        else:
            v.mul_(alpha).addcmul_(d, d, value=1 - alpha)
        out[k] = 1.0 / (v.sqrt() + delta)
    return out


def sgld_step(state: SamplerState, drift_: Position, noise: Position, step_size: float,
              precond: Position | None = None) -> SamplerState:
    """One (preconditioned) Langevin step: w ← w − (ε/2)·G·∇U(w) + √(ε·G)·ξ.

    Pure in the sense that the returned state is new tensors; ``noise`` is standard normal.
    """
    new = {}
    root = step_size**0.5
    for k, w in state.position.items():
        if precond is None:
            new[k] = torch.add(w, drift_[k], alpha=-0.5 * step_size).add_(noise[k], alpha=root)
        else:
            g = precond[k]
            step = torch.addcmul(w, g, drift_[k], value=-0.5 * step_size)
            new[k] = step.addcmul_(g.sqrt(), noise[k], value=root)
    return SamplerState(new, state.precond)


def _sum_per_chain(t: Tensor, chain_dim: bool) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1) if chain_dim else t.sum()


def mala_log_accept(w: Position, w_new: Position, u: Tensor, u_new: Tensor, drift_: Position,
                    drift_new: Position, step_size: float, precond: Position | None = None,
                    *, chain_dim: bool = True) -> Tensor:
    """Log Metropolis-Hastings ratio of the Langevin proposal w → w_new (MALA acceptance).

    ``u`` and ``u_new`` are the potentials U at both ends, per chain. An acceptance near 1 means
    the discretization error of the step is small; far below ~0.9 means the step is too large.
    """
    fwd = torch.zeros_like(u)
    bwd = torch.zeros_like(u)
    for k in w:
        g = 1.0 if precond is None else precond[k]
        var = step_size * g
        d_fwd = w_new[k] - w[k] + 0.5 * var * drift_[k]
        d_bwd = w[k] - w_new[k] + 0.5 * var * drift_new[k]
        fwd = fwd + _sum_per_chain(d_fwd * d_fwd / var, chain_dim)
        bwd = bwd + _sum_per_chain(d_bwd * d_bwd / var, chain_dim)
    return (u - u_new) + 0.5 * (fwd - bwd)


def sq_distance(position: Position, anchor: Position, *, chain_dim: bool = True) -> Tensor:
    """‖w − w*‖² per chain."""
    total = None
    for k, w in position.items():
        s = _sum_per_chain((w - anchor[k]) ** 2, chain_dim)
        total = s if total is None else total + s
    return total
