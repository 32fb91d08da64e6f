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
           "sq_distance"]

Position = dict[str, Tensor]


def drift(position: Position, grad: Position, anchor: Position, nbeta: float,
          localization: float, *, out: Position | None = None) -> Position:
    """∇U(w) = nβ·∇L(w) + γ·(w − w*); written into ``out`` (e.g. ``grad`` itself, which is
    then consumed) when given, as new tensors otherwise."""
    res = {}
    for k, w in position.items():
        d = torch.sub(w, anchor[k]).mul_(localization)
        res[k] = d.add_(grad[k], alpha=nbeta) if out is None else torch.add(
            d, grad[k], alpha=nbeta, out=out[k])
    return res


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
    one per chain (shape (chain,), e.g. components with their own ε in one computation).

    Every product is computed into the new position's own buffer (at most one more
    temporary, with a per-chain ε): the step is the peak of a chain's memory."""
    new = {}
    for k, w in position.items():
        r = None if root is None else root[k]
        if isinstance(step_size, Tensor):
            eps = per_chain(step_size, w)
            if r is None:
                out, kick = torch.mul(0.5 * eps, drift_[k]), torch.mul(eps.sqrt(), noise[k])
            else:
                out = torch.mul(r, r).mul_(0.5 * eps).mul_(drift_[k])
                kick = torch.mul(r, eps.sqrt()).mul_(noise[k])
            new[k] = torch.sub(w, out, out=out).add_(kick)
        elif r is None:
            new[k] = torch.add(w, drift_[k], alpha=-0.5 * step_size).add_(
                noise[k], alpha=step_size**0.5)
        else:
            out = torch.mul(r, drift_[k])
            torch.addcmul(w, r, out, value=-0.5 * step_size, out=out)
            new[k] = out.addcmul_(r, noise[k], value=step_size**0.5)
    return new


def _sum_per_chain(t: Tensor, chain_dim: bool) -> Tensor:
    # reshape, not flatten(1): a 0-d parameter stacked over chains is 1-d.
    return t.reshape(t.shape[0], -1).sum(1) if chain_dim else t.sum()


def mala_log_accept(w: Position, w_new: Position, u: Tensor, u_new: Tensor, drift_: Position,
                    drift_new: Position, step_size: StepSize, root: Position | None = None,
                    *, chain_dim: bool = True) -> Tensor:
    """Log Metropolis-Hastings ratio of the Langevin proposal w → w_new (MALA acceptance).

    ``u`` and ``u_new`` are the potentials U at both ends, per chain; ``root`` is the proposal's
    √G (None: G = 1). An acceptance near 1 means the discretization error of the step is
    small; far below ~0.9 means the step is too large. Two parameter-sized temporaries of one
    tensor at a time: G is never materialised for the whole position.
    """
    fwd = torch.zeros_like(u)
    bwd = torch.zeros_like(u)
    for k in w:
        eps = per_chain(step_size, w[k])
        var = eps if root is None else torch.mul(root[k], root[k]).mul_(eps)
        d = _plus_half_var_times(torch.sub(w_new[k], w[k]), var, drift_[k])
        fwd = fwd + _sum_per_chain(d.mul_(d).div_(var), chain_dim)
        d = _plus_half_var_times(torch.sub(w[k], w_new[k], out=d), var, drift_new[k])
        bwd = bwd + _sum_per_chain(d.mul_(d).div_(var), chain_dim)
    return (u - u_new) + 0.5 * (fwd - bwd)


def _plus_half_var_times(d: Tensor, var: StepSize, drift_: Tensor) -> Tensor:
    """d + (var/2)·drift, in place in ``d``."""
    if isinstance(var, Tensor):
        return d.addcmul_(var, drift_, value=0.5)
    return d.add_(0.5 * var * drift_)


def sq_distance(position: Position, anchor: Position, *, chain_dim: bool = True) -> Tensor:
    """‖w − w*‖² (per chain with ``chain_dim``)."""
    total = None
    for k, w in position.items():
        s = _sum_per_chain((w - anchor[k]) ** 2, chain_dim)
        total = s if total is None else total + s
    return total
