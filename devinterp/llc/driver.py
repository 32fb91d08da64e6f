"""The chain driver: runs a kernel's ``step`` over a chunk of chains from w*, feeding what each
step produced to recorder objects (the λ̂ trace, MALA acceptance, divergence, and any per-draw
observable a caller plugs in).

All chains of a chunk share each step's minibatch and its paired baseline L_B(w*); each chain has
its own noise stream seeded by (seed, chain index), so splitting chains into chunks, ranks or a
sequential loop gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from devinterp.llc.errors import NonFiniteLossError
from devinterp.llc.problem import Problem
from devinterp.samplers import Kernel
from devinterp.samplers.langevin import (
    Position,
    StepSize,
    drift,
    mala_log_accept,
    sq_distance,
)

__all__ = ["ChainBlock", "ChainRun", "Recorder", "Restriction", "run_chains"]

#: A loss this many times the loss scale at w* away from the baseline has exploded.
DIVERGENCE_FACTOR = 1e4
#: On accelerators the model-NaN check syncs with the device only this often.
_CHECK_EVERY = 16


class Recorder(Protocol):
    """Sees every recorded draw of a chunk of chains: the draw's index, the chains' indices,
    the positions (chain, *param) it was computed at, the chains' minibatch losses (chain,),
    the paired baseline, and the minibatch itself. This is where per-draw observables plug in
    (``estimate_llc(recorders=[...])``; a recorder with a ``bind(problem)`` method is given
    the :class:`~devinterp.llc.problem.Problem` first, to evaluate the model at positions)."""

    def on_draw(self, draw: int, chains: Sequence[int], position: Position, losses: Tensor,
                baseline: Tensor, batch: Any) -> None: ...


@dataclass
class ChainRun:
    """What one chunk of chains produced."""

    loss: np.ndarray  # (chain, draw) L_B(w_t)
    baseline: np.ndarray  # (draw,) L_B(w*)
    accept: np.ndarray  # (chain,) mean MALA acceptance over recorded transitions
    diverged: np.ndarray  # (chain,) bool
    final: dict[str, Tensor]  # last positions (chain, *param)
    divergences: list[dict[str, Any]]  # per diverged chain: chain, step, phase, loss


def chain_generators(seed: int, chains: Sequence[int], device: torch.device) -> list:
    """One noise generator per chain, seeded by (seed, chain index)."""
    gens = []
    for c in chains:
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + 7919 * (c + 1)) % (2**63 - 1))
        gens.append(g)
    return gens


@dataclass(frozen=True)
class Restriction:
    """Which weights each chain of a chunk moves (weight-refined λ̂ of several components in
    one computation). ``params[c]``: the parameters chain ``c`` draws noise for, in anchor
    order (so its noise stream is the one ``estimate_llc(weights=params[c])`` draws);
    ``masks``: (chain, *param) 0/1 tensors that zero the gradient and the noise of every
    entry a chain does not move, which therefore stays at w*."""

    params: tuple[tuple[str, ...], ...]
    masks: Position


def noise(gens: list, anchor: Position, params: Sequence[Sequence[str]] | None = None
          ) -> Position:
    """Standard normal noise shaped (chain, *param) with each chain's own generator, drawn
    straight into one buffer (no per-chain copies to stack). With ``params``, chain ``c``
    draws only for ``params[c]`` (the others get zeros), in anchor order."""
    total = sum(v.numel() for v in anchor.values())
    ref = next(iter(anchor.values()))
    if params is None:
        flat = torch.empty(len(gens), total, device=ref.device, dtype=ref.dtype)
        for row, g in zip(flat, gens, strict=True):
            torch.randn(total, generator=g, device=ref.device, dtype=ref.dtype, out=row)
    else:
        flat = torch.zeros(len(gens), total, device=ref.device, dtype=ref.dtype)
        offsets, i = {}, 0
        for k, v in anchor.items():
            offsets[k], i = (i, i + v.numel()), i + v.numel()
        for row, g, names in zip(flat, gens, params, strict=True):
            draw = torch.randn(sum(anchor[k].numel() for k in names), generator=g,
                               device=ref.device, dtype=ref.dtype)
            j = 0
            for k in names:
                a, b = offsets[k]
                row[a:b] = draw[j : j + b - a]
                j += b - a
    out, i = {}, 0
    for k, v in anchor.items():
        out[k] = flat[:, i : i + v.numel()].view(len(gens), *v.shape)
        i += v.numel()
    return out


def masked(position: Position, masks: Position | None) -> Position:
    """``position`` with every entry a chain does not move set to 0, in place."""
    if masks is not None:
        for k, v in position.items():
            v.mul_(masks[k])
    return position


def chain_gradients(prob: Problem, chains: int, vectorize: bool) -> Callable:
    """``(position (chain, *param), batch) -> (grads, losses (chain,))``, vmapped or looped."""
    grad_fn = grad_and_value(prob.loss)
    if vectorize:
        return vmap(grad_fn, in_dims=(0, None))

    def looped(params: Position, batch: Any) -> tuple[Position, Tensor]:
        outs = [grad_fn({k: v[c] for k, v in params.items()}, batch) for c in range(chains)]
        return ({k: torch.stack([g[k] for g, _ in outs]) for k in params},
                torch.stack([val for _, val in outs]))

    return looped


def sync_free(device: torch.device) -> bool:
    """Whether the chain loop should avoid host-device synchronisation (not on the CPU)."""
    return device.type != "cpu"


class DrawRecorder:
    """The λ̂ trace's raw material: L_B(w_t) per chain and draw, and the paired L_B(w*)."""

    def __init__(self, chains: int, draws: int, device: torch.device) -> None:
        self.loss = torch.full((chains, draws), float("nan"), device=device,
                               dtype=torch.float64)
        self.baseline = torch.zeros(draws, device=device, dtype=torch.float64)

    def grow(self, more: int) -> None:
        """Room for ``more`` draws after the current ones."""
        self.loss = torch.cat([self.loss, torch.full((self.loss.shape[0], more), float("nan"),
                                                     device=self.loss.device,
                                                     dtype=self.loss.dtype)], dim=1)
        self.baseline = torch.cat([self.baseline, self.baseline.new_zeros(more)])

    def on_draw(self, draw: int, chains: Sequence[int], position: Position, losses: Tensor,
                baseline: Tensor, batch: Any) -> None:
        self.loss[:, draw] = losses
        self.baseline[draw] = baseline


class MalaRecorder:
    """MALA acceptance of every ``every``-th recorded transition, both ends on the same
    minibatch (on different minibatches the energy difference is dominated by their noise)."""

    def __init__(self, chains: int, device: torch.device, every: int, nbeta: float,
                 localization: float, step_size: float) -> None:
        self.sum = torch.zeros(chains, device=device, dtype=torch.float64)
        self.count = 0
        self.every, self.nbeta, self.gamma, self.eps = every, nbeta, localization, step_size

    def due(self, draw: int) -> bool:
        return bool(self.every) and draw % self.every == 0

    def on_transition(self, gradients: Callable, old: Position, new: Position, info: dict,
                      losses: Tensor, base: Tensor, anchor: Position, batch: Any) -> None:
        with torch.no_grad():
            u = self.nbeta * (losses - base) + 0.5 * self.gamma * sq_distance(
                old, anchor).double()
        grads_new, losses_new = gradients(new, batch)
        with torch.no_grad():
            u_new = self.nbeta * (losses_new.detach().double() - base) + (
                0.5 * self.gamma * sq_distance(new, anchor).double())
            dr_new = drift(new, grads_new, anchor, self.nbeta, self.gamma, out=grads_new)
            log_a = mala_log_accept(old, new, u, u_new, info["drift"], dr_new, self.eps,
                                    info["root"])
            self.sum += torch.exp(torch.clamp(torch.nan_to_num(log_a, nan=-1e30), max=0.0))
            self.count += 1

    def acceptance(self, chains: int) -> np.ndarray:
        if not self.count:
            return np.full(chains, np.nan)
        return (self.sum / self.count).cpu().numpy()


class DivergenceMonitor:
    """Tells which chains diverged, and why. A loss that turns non-finite straight from an
    ordinary value (within 100x the loss scale at w*) was not blown up by the step: the model or
    the loss returns NaN/inf near those weights, and the run stops at once (checked further by
    :func:`_raise_model_nan`). An exploding loss is the step's: that chain restarts at w*, is
    dropped from λ̂, and its first bad step is reported."""

    def __init__(self, chains: Sequence[int], num_burnin: int, device: torch.device) -> None:
        C = len(chains)
        self.chains, self.num_burnin = list(chains), num_burnin
        self.ref: Tensor | None = None  # |L_B(w*)| + 1 of the first minibatch: the scale
        self.prev: Tensor | None = None  # each chain's loss at the previous step
        self.diverged = torch.zeros(C, dtype=torch.bool, device=device)
        self.first_bad = torch.full((C,), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros(C, dtype=torch.float64, device=device)
        self.model_nan = torch.zeros(C, dtype=torch.bool, device=device)

    def start(self, base: Tensor) -> None:
        if not torch.isfinite(base):
            raise NonFiniteLossError(f"the loss at w* is not finite ({base.item()}); estimate "
                                     "λ̂ only at a checkpoint whose loss is finite")
        self.ref = base.abs() + 1

    def check(self, t: int, losses: Tensor, base: Tensor) -> Tensor:
        """The chains whose loss at step ``t`` is non-finite or exploding (chain,)."""
        finite = torch.isfinite(losses)
        bad = ~finite | ((losses - base).abs() > DIVERGENCE_FACTOR * self.ref)
        sane = (torch.ones_like(finite) if self.prev is None
                else torch.isfinite(self.prev) & ((self.prev - base).abs() <= 100 * self.ref))
        fresh = bad & ~self.diverged
        self.model_nan |= fresh & ~finite & sane
        self.first_bad = torch.where(fresh & (self.first_bad < 0), t, self.first_bad)
        self.bad_loss = torch.where(fresh, losses, self.bad_loss)
        self.prev = losses
        return bad

    def records(self) -> list[dict[str, Any]]:
        out = []
        for c, t in enumerate(self.first_bad.tolist()):
            if t >= 0:
                draw = t >= self.num_burnin
                out.append({"chain": self.chains[c], "phase": "draw" if draw else "burn-in",
                            "step": t - self.num_burnin if draw else t,
                            "loss": float(self.bad_loss[c])})
        return out


class ChainBlock:
    """One chunk of chains from w*, advanced step by step and extendable: more draws continue
    the same chains (same noise streams, minibatch order and preconditioner), so a run of
    ``num_draws`` draws extended by ``k`` equals a run of ``num_draws + k`` draws.

    The start w* is never a draw (its loss is the baseline: counting it biases λ̂ low), so with
    ``num_burnin=0`` the first draw is the position after one step. ``step_size`` is one ε or
    one per chain (chain,); ``restriction`` limits what each chain moves.
    """

    def __init__(self, prob: Problem, chains: Sequence[int], *, seed: int, kernel: Kernel,
                 step_size: StepSize, nbeta: float, localization: float, num_burnin: int,
                 num_draws: int, vectorize: bool, accept_every: int = 32, progress: Any = None,
                 recorders: Sequence[Recorder] = (), restriction: Restriction | None = None
                 ) -> None:
        self.prob, self.chains, self.kernel = prob, list(chains), kernel
        self.step_size, self.nbeta, self.localization = step_size, nbeta, localization
        self.num_burnin = max(num_burnin, 1)
        self.progress, self.recorders = progress, recorders
        C, dev = len(chains), prob.device
        self.anchor = {k: v.unsqueeze(0).expand(C, *v.shape) for k, v in prob.anchor.items()}
        self.state = kernel.init(self.anchor, localization=localization)
        self.gens = chain_generators(seed, chains, dev)
        self.masks = None if restriction is None else restriction.masks
        self.params = None if restriction is None else restriction.params
        self._unmasked = chain_gradients(prob, C, vectorize)
        self.draws = DrawRecorder(C, num_draws, dev)
        self.mala = MalaRecorder(C, dev, accept_every, nbeta, localization, step_size)
        self.monitor = DivergenceMonitor(chains, self.num_burnin, dev)
        # Asking whether a chain diverged (bool(bad.any())) waits for the device at every
        # step; on an accelerator the reset below runs unconditionally (same numbers, no wait).
        self.free = sync_free(dev)
        self.batches = prob.source.indexed(seed)
        self.total = self.num_burnin + num_draws
        self.t = 0
        self.base: Tensor | None = None

    def gradients(self, position: Position, batch: Any) -> tuple[Position, Tensor]:
        grads, losses = self._unmasked(position, batch)
        return masked(grads, self.masks), losses

    def extend(self, more_draws: int) -> None:
        """Make room for ``more_draws`` draws after those planned; :meth:`advance` runs them."""
        self.draws.grow(more_draws)
        self.total += more_draws

    # One loop, on purpose over the ~60-line budget: the order of a step (gradient, baseline,
    # divergence check, recorders, kernel step, MALA, model-NaN check, reset) is the
    # algorithm, and each of those is one call into its own object above.
    def advance(self) -> None:
        """Run the chains up to the planned number of steps (burn-in + draws)."""
        C, anchor, monitor, mala = len(self.chains), self.anchor, self.monitor, self.mala
        state, free = self.state, self.free
        for t in range(self.t, self.total):
            idx, batch = next(self.batches)
            draw = t - self.num_burnin
            grads, losses = self.gradients(state.position, batch)
            with torch.no_grad():
                losses = losses.detach().double()
                if self.base is None or draw >= 0:
                    # The paired baseline is only needed for draws (burn-in is thrown away).
                    self.base = self.prob.baseline(idx, batch)
                    if monitor.ref is None:
                        monitor.start(self.base)
                base = self.base
                bad = monitor.check(t, losses, base)
                if draw >= 0:
                    for recorder in (self.draws, *self.recorders):
                        recorder.on_draw(draw, self.chains, state.position, losses, base, batch)
                xi = masked(noise(self.gens, self.prob.anchor, self.params), self.masks)
                new, info = self.kernel.step(state, grads, xi, anchor=anchor,
                                             step_size=self.step_size, nbeta=self.nbeta,
                                             localization=self.localization,
                                             adapt=t < self.num_burnin)
            # Released before the MALA check's gradient and the next step's, the peaks of a
            # step: the gradient, the noise and the old state (with RMSProp's squared-drift
            # average until the first draw) would otherwise stay alive through them.
            del grads, xi
            old, state = state.position, new
            if draw >= 0 and mala.due(draw):
                mala.on_transition(self.gradients, old, new.position, info, losses, base,
                                   anchor, batch)
            del info
            last = t == self.total - 1
            if (not free or t % _CHECK_EVERY == _CHECK_EVERY - 1 or last) and bool(
                    monitor.model_nan.any()):
                _raise_model_nan(monitor, old, anchor, base, bad, exact=not free)
            del old
            if free or bool(bad.any()):
                with torch.no_grad():
                    # A diverged chain restarts at w* so it cannot poison later arithmetic;
                    # its records are dropped and it is left out of λ̂.
                    monitor.diverged |= bad
                    for k, v in state.position.items():
                        state.position[k] = torch.where(
                            monitor.diverged.view(C, *([1] * (v.dim() - 1))), anchor[k], v)
            if self.progress is not None:
                self.progress.update(C)
        self.state, self.t = state, self.total

    def result(self) -> ChainRun:
        """What the chains produced so far (the draws of diverged chains are NaN)."""
        loss = self.draws.loss.clone()
        loss[self.monitor.diverged] = float("nan")
        return ChainRun(loss.cpu().numpy(), self.draws.baseline.cpu().numpy(),
                        self.mala.acceptance(len(self.chains)),
                        self.monitor.diverged.cpu().numpy(), self.state.position,
                        self.monitor.records())


def run_chains(prob: Problem, chains: Sequence[int], *, seed: int, kernel: Kernel,
               step_size: StepSize, nbeta: float, localization: float, num_burnin: int,
               num_draws: int, vectorize: bool, accept_every: int = 32, progress: Any = None,
               recorders: Sequence[Recorder] = (), restriction: Restriction | None = None
               ) -> ChainRun:
    """Run ``chains`` from w* for ``num_burnin + num_draws`` steps; record the draws
    (:class:`ChainBlock` run once)."""
    block = ChainBlock(prob, chains, seed=seed, kernel=kernel, step_size=step_size,
                       nbeta=nbeta, localization=localization, num_burnin=num_burnin,
                       num_draws=num_draws, vectorize=vectorize, accept_every=accept_every,
                       progress=progress, recorders=recorders, restriction=restriction)
    block.advance()
    return block.result()


def _raise_model_nan(monitor: DivergenceMonitor, position: Position, anchor: Position,
                     base: Tensor, bad: Tensor, exact: bool) -> None:
    """Stop at once when the model, not the step, makes the loss non-finite near w*.

    ``exact`` (the loss was just computed at ``position``): confirm that the weights there are
    finite and not much farther from w* than the healthy chains' (a step that threw a chain far
    away is the step's fault). Without it (accelerators check every few steps, and the chain
    has been reset since) the loss-based rule alone decides.
    """
    flags = monitor.model_nan
    confirmed, dist = None, float("nan")
    sq = sq_distance(position, anchor).double() if exact else None
    healthy_chains = ~(monitor.diverged | bad)
    for c in torch.nonzero(flags).flatten().tolist():
        if exact:
            healthy = sq[healthy_chains & torch.isfinite(sq)]
            finite = all(bool(torch.isfinite(v[c]).all()) for v in position.values())
            if not finite or (healthy.numel() and float(sq[c]) > 100 * float(healthy.max())
                              + 1e-12):
                flags[c] = False  # the step threw it far away: an ordinary divergence
                continue
            dist = float(sq[c].sqrt())
        confirmed = c
        break
    if confirmed is None:
        return
    t = int(monitor.first_bad[confirmed])
    where = (f"draw {t - monitor.num_burnin}" if t >= monitor.num_burnin
             else f"burn-in step {t}")
    raise NonFiniteLossError(
        f"the loss became non-finite at sampled weights near w* (chain "
        f"{monitor.chains[confirmed]}, {where}, ‖w − w*‖ = {dist:.3g}, loss at w* "
        f"{float(base):.4g}), straight from an ordinary value: the model or the loss returns "
        "NaN/inf there, which a smaller step size does not fix. Find the operation that does "
        "(log or sqrt of values <= 0, 0·inf, x/0, pow with a negative exponent), or leave those "
        "weights out of the sample with weights=[...]")
