"""The Langevin integrator shared by the SGLD family, as pure functions over dicts of tensors.

A position is a ``dict[str, Tensor]``; every function works the same whether the tensors carry
a leading chain dimension ``(chain, *shape)`` or not (the updates are elementwise; only the
gradient needs ``torch.func.vmap``, done by the driver).

The potential sampled is ``U(w) = nβ·L(w) + (γ/2)·‖w − w*‖²`` (localized as in Lau et al.,
arXiv 2308.12108) and a step with preconditioner G (G = 1: plain SGLD, Welling & Teh 2011) is
``w ← w − (ε/2)·G·∇U(w) + √(ε·G)·ξ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Position", "StepSize", "drift", "mala_log_accept", "move", "per_chain",
           "preconditioner", "sq_distance"]

Position = dict[str, Tensor]


def drift(position: Position, grad: Position, anchor: Position, nbeta: float,
          localization: float) -> Position:
    """∇U(w) = nβ·∇L(w) + γ·(w − w*)."""
    out = {}
    for k, w in position.items():
        d = torch.sub(w, anchor[k])
        out[k] = d.mul_(localization).add_(grad[k], alpha=nbeta)
    return out


StepSize = float | Tensor


def per_chain(step_size: StepSize, like: Tensor) -> StepSize:
    """ε as given (a float), or a per-chain ε of shape (chain,) shaped to broadcast over
    ``like`` (chain, *param)."""
    if isinstance(step_size, Tensor):
        return step_size.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return step_size


def move(position: Position, drift_: Position, noise: Position, step_size: StepSize,
         root: Position | None = None) -> Position:
    """One (preconditioned) Langevin step: w − (ε/2)·G·∇U(w) + √(ε·G)·ξ, as new tensors;
    ``noise`` ξ is standard normal; ``root`` is √G (None: G = 1). Kernels keep √G rather
    than G: one parameter-sized buffer per chain serves both terms. ``step_size`` is one ε, or
    one per chain (shape (chain,), e.g. components with their own ε in one computation)."""
    new = {}
    for k, w in position.items():
        if isinstance(step_size, Tensor):
            eps = per_chain(step_size, w)
            r = 1.0 if root is None else root[k]
            new[k] = w - (0.5 * eps) * (r * r) * drift_[k] + eps.sqrt() * r * noise[k]
        elif root is None:
            new[k] = torch.add(w, drift_[k], alpha=-0.5 * step_size).add_(
                noise[k], alpha=step_size**0.5)
        else:
            r = root[k]
            step = torch.addcmul(w, r, r * drift_[k], value=-0.5 * step_size)
            new[k] = step.addcmul_(r, noise[k], value=step_size**0.5)
    return new


def preconditioner(info: dict) -> Position | None:
    """G = (√G)² of a kernel step's ``info`` (None for plain SGLD), for MALA accounting."""
    root = info.get("root")
    return None if root is None else {k: r * r for k, r in root.items()}


def _sum_per_chain(t: Tensor, chain_dim: bool) -> Tensor:
    # reshape, not flatten(1): a 0-d parameter stacked over chains is 1-d.
    return t.reshape(t.shape[0], -1).sum(1) if chain_dim else t.sum()


def mala_log_accept(w: Position, w_new: Position, u: Tensor, u_new: Tensor, drift_: Position,
                    drift_new: Position, step_size: StepSize, precond: Position | None = None,
                    *, chain_dim: bool = True) -> Tensor:
    """Log Metropolis-Hastings ratio of the Langevin proposal w → w_new (MALA acceptance).

    ``u`` and ``u_new`` are the potentials U at both ends, per chain. An acceptance near 1 means
    the discretization error of the step is small; far below ~0.9 means the step is too large.
    """
    fwd = torch.zeros_like(u)
    bwd = torch.zeros_like(u)
    for k in w:
        g = 1.0 if precond is None else precond[k]
        var = per_chain(step_size, w[k]) * g
        d_fwd = w_new[k] - w[k] + 0.5 * var * drift_[k]
        d_bwd = w[k] - w_new[k] + 0.5 * var * drift_new[k]
        fwd = fwd + _sum_per_chain(d_fwd * d_fwd / var, chain_dim)
        bwd = bwd + _sum_per_chain(d_bwd * d_bwd / var, chain_dim)
    return (u - u_new) + 0.5 * (fwd - bwd)


def sq_distance(position: Position, anchor: Position, *, chain_dim: bool = True) -> Tensor:
    """‖w − w*‖² (per chain with ``chain_dim``)."""
    total = None
    for k, w in position.items():
        s = _sum_per_chain((w - anchor[k]) ** 2, chain_dim)
        total = s if total is None else total + s
    return total
