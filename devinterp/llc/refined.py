"""``estimate_refined_llc``: the weight-refined λ̂ of many components in one computation.

Every component gets ``num_chains`` chains, masked to the component: each chain's gradient and
noise are zero outside it (:class:`devinterp.llc.driver.Restriction`), so those weights stay at
w*. All chains iterate the same minibatches and share the paired baseline L_B(w*), the data,
the checks and the Python overhead that K separate calls would each pay. The chains of
components that touch the same parameters (the heads of a layer) run as one chunked,
vectorized computation; components over other parameters either join them in one computation
or run as their own groups (:func:`plan`: joint on small models, where per-step overhead
dominates; grouped on larger ones, where batching weights a chain does not move costs more).

A chain of component k draws the noise stream that ``estimate_llc(weights=<k's parameters>)``
draws for the same chain index, so a component of whole parameters gives that call's numbers:
exactly with a fixed ``step_size``; with ``step_size="auto"`` each component is calibrated on
its own restriction (the ε that call would pick) and the per-chain ε agrees to float rounding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from devinterp.config import SamplerConfig
from devinterp.llc import driver
from devinterp.llc.data import LossFn
from devinterp.llc.estimate import (
    _build_problem,
    _cache_baseline,
    _default_nbeta,
    _step_size,
    _thread_policy,
    chains_that_fit,
    sampling,
)
from devinterp.llc.problem import BatchLoss, Problem, check_loss, vmap_works
from devinterp.llc.result import LLCResult, summarize
from devinterp.samplers import get_kernel

if TYPE_CHECKING:
    from devinterp.components import Restriction

__all__ = ["estimate_refined_llc"]

_OPTIONS = ("num_chains", "num_draws", "num_burnin", "batch_size", "step_size",
            "localization", "nbeta", "sampler", "seed", "num_samples", "chain_chunk_size",
            "vectorize", "num_threads")
_CALL_OPTIONS = ("device", "first_chain", "progress", "grouping", "recorders")
#: ``grouping="auto"`` runs every chain in one computation below this many sampled
#: parameters × batch size: ``tools/bench_refined.py`` measured joint 0.54× the time of
#: separate calls at 0.1M (a 26k-parameter transformer, batch 4) and grouped faster than
#: joint at 1.6M (batch 64).
JOINT_WORK = 2**19


def estimate_refined_llc(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    components: Mapping[str, Restriction] | str,
    batch_loss: BatchLoss | None = None,
    **options: Any,
) -> dict[str, LLCResult]:
    """The weight-refined λ̂ (Wang et al. 2024) of every component, in one call.

    Args:
        model, data, loss_fn, batch_loss: as :func:`devinterp.estimate_llc`.
        components: ``{name: restriction}``; a restriction is a list of parameter names /
            ``fnmatch`` patterns (whole tensors, as ``weights=`` takes) or a mapping
            ``{parameter_name: bool tensor of that parameter's shape}`` (True = this entry
            moves). Or a shorthand: ``"heads"``, ``"layers"``, ``"mlps"``
            (:mod:`devinterp.components`). Everything outside a component stays at w*.
        **options: every option of :func:`devinterp.estimate_llc` except ``weights``, with the
            same defaults; ``num_chains`` is per component and ``chain_chunk_size`` counts
            (component, chain) pairs. ``recorders`` are bound to the problem over the union
            of the components' parameters and see pair (k, c), the chain c (counted from
            ``first_chain``) of the k-th component, as chain ``k·num_chains + c``. One more
            option, ``grouping``: ``"joint"`` runs every chain in one computation,
            ``"grouped"`` one computation per set of parameters (the heads of a layer share
            one), ``"auto"`` (default) joint on small work, else grouped (:func:`plan`); same
            draws to float rounding.

    Returns:
        ``{name: LLCResult}`` in the order of ``components``; each result's settings name its
        ``component``, its ``weights`` (the parameters it touches), its own ``step_size`` and
        ``num_sampled_params`` (the entries it moves).
    """
    t_start = time.perf_counter()
    unknown = sorted(set(options) - set(_OPTIONS) - set(_CALL_OPTIONS))
    if unknown:
        hint = (" (a component's weights go in components=)" if "weights" in unknown else "")
        raise TypeError(f"estimate_refined_llc got unknown options {unknown}{hint}; known: "
                        f"{sorted(_OPTIONS + _CALL_OPTIONS)}")
    cfg = SamplerConfig.from_options({k: options.get(k) for k in _OPTIONS})
    if cfg.auto_draws:
        raise ValueError("estimate_refined_llc runs a fixed number of draws; pass num_draws=N "
                         "(num_draws='auto' is estimate_llc's)")
    device, first_chain = options.get("device"), int(options.get("first_chain", 0))
    grouping = options.get("grouping", "auto")
    if grouping not in ("auto", "joint", "grouped"):
        raise ValueError(f"grouping must be 'auto', 'joint' or 'grouped', got {grouping!r}")
    if (loss_fn is None) == (batch_loss is None):
        raise TypeError("pass exactly one of loss_fn(outputs, targets) or "
                        "batch_loss(forward, batch)")
    # Imported here: devinterp.components imports devinterp.llc, which imports this module.
    from devinterp.components import resolve_components

    resolved = resolve_components(model, components)
    named = dict(model.named_parameters())
    union = {k: named[k] for k in named if any(k in m for m in resolved.values())}
    prob, meta = _build_problem(model, data, union, loss_fn, batch_loss, cfg, device)
    comps = [_Component(name, masks, prob) for name, masks in resolved.items()]
    nbeta = _default_nbeta(prob.source.n) if cfg.nbeta is None else float(cfg.nbeta)
    use_threads = _thread_policy(cfg, union, prob.device)
    notes: list[str] = []
    with sampling(model, prob.device, use_threads) as threads:
        check_loss(prob, cfg.seed)
        vectorize = cfg.vectorize and vmap_works(prob, cfg.seed, notes)
        _cache_baseline(prob, cfg, loss_fn)
        recorders = list(options.get("recorders", ()))
        for recorder in recorders:
            if hasattr(recorder, "bind"):
                recorder.bind(prob)
        t_cal = time.perf_counter()
        for comp in comps:
            comp.step_size, comp.calibration = _step_size(comp.problem(prob), cfg, nbeta,
                                                          vectorize)
        t_cal = time.perf_counter() - t_cal
        how, groups = plan(prob, cfg, comps, grouping, vectorize)
        _run_all(prob, cfg, nbeta, groups, vectorize, first_chain,
                 bool(options.get("progress", False)), comps, recorders)
    elapsed = time.perf_counter() - t_start
    out = {}
    for comp in comps:
        settings = {
            "component": comp.name, "nbeta": nbeta, "step_size": comp.step_size,
            "localization": float(cfg.localization), "num_chains": cfg.num_chains,
            "num_draws": cfg.num_draws, "num_burnin": cfg.burnin,
            "batch_size": getattr(prob.source, "batch_size", cfg.batch_size),
            "sampler": cfg.sampler, "seed": cfg.seed, "num_samples": prob.source.n,
            "step_size_auto": cfg.step_size == "auto", "vectorize": vectorize, **meta,
            "num_threads": use_threads or threads, "weights": list(comp.masks),
            "num_sampled_params": comp.size, "num_components": len(comps),
            "components_run": how,
        }
        extra = dict(comp.calibration)
        extra["divergences"] = comp.divergences
        extra["calibration_s"] = t_cal if cfg.step_size == "auto" else 0.0
        extra["elapsed_s"] = elapsed
        loss = np.concatenate(comp.loss)
        try:
            result = summarize(nbeta * (loss - comp.baseline[None, :]), loss,
                               comp.baseline, np.concatenate(comp.accept),
                               np.concatenate(comp.diverged), settings, extra)
        except Exception as e:
            e.add_note(f"(component {comp.name!r} of estimate_refined_llc)")
            raise
        result.warnings[:0] = notes
        out[comp.name] = result
    return out


@dataclass
class _Component:
    """One component: its masks over the union's parameters, its ε, and its chains' output."""

    name: str
    masks: dict[str, Tensor]
    prob: Problem
    step_size: float = math.nan
    calibration: dict[str, Any] = field(default_factory=dict)
    loss: list[np.ndarray] = field(default_factory=list)
    accept: list[np.ndarray] = field(default_factory=list)
    diverged: list[np.ndarray] = field(default_factory=list)
    divergences: list[dict[str, Any]] = field(default_factory=list)
    baseline: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        dev = self.prob.device
        self.masks = {k: m.to(dev) for k, m in self.masks.items()}
        self.whole = all(bool(m.all()) for m in self.masks.values())
        self.size = int(sum(int(m.sum()) for m in self.masks.values()))

    def problem(self, prob: Problem) -> Problem:
        """The component's own problem, for its automatic step: whole parameters are sampled
        as ``estimate_llc(weights=...)`` samples them; partial ones as the vector of the
        entries they move (so the curvature and the pilot chains see only those)."""
        moved = {k: v for k, v in prob.anchor.items() if k in self.masks}
        fixed = {**prob.consts, **{k: v for k, v in prob.anchor.items() if k not in moved}}
        if self.whole:
            return replace(prob, anchor=moved, consts=fixed)
        return _EntriesProblem(prob.model, {k: v[self.masks[k]] for k, v in moved.items()},
                               {**fixed}, prob.loss_fn, prob.batch_loss, prob.source,
                               prob.device, prob.baseline_cache, full=moved,
                               index={k: torch.nonzero(self.masks[k].flatten()).flatten()
                                      for k in moved})

    def restriction_rows(self, anchor: Mapping[str, Tensor]) -> tuple[tuple[str, ...],
                                                                       dict[str, Tensor]]:
        """The parameters this component draws noise for (anchor order) and its 0/1 masks."""
        names = tuple(k for k in anchor if k in self.masks)
        masks = {k: (self.masks[k].to(v.dtype) if k in self.masks
                     else torch.zeros((), dtype=v.dtype, device=v.device).expand(v.shape))
                 for k, v in anchor.items()}
        return names, masks


@dataclass
class _EntriesProblem(Problem):
    """A problem whose sampled variables are some entries of some parameters (1-D vectors):
    the loss writes them into the full tensors at w*, so the automatic step's curvature and
    pilot chains see exactly the component's subspace."""

    full: dict[str, Tensor] = field(default_factory=dict)
    index: dict[str, Tensor] = field(default_factory=dict)

    def loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        whole = {k: self.full[k].flatten().scatter(0, self.index[k], v).view_as(self.full[k])
                 for k, v in params.items()}
        return super().loss(whole, batch)


def parameter_groups(comps: list[_Component]) -> list[tuple[tuple[str, ...], list[_Component]]]:
    """Components that share one vectorized computation: those that touch the same parameters
    (e.g. the heads of a layer). Parameters no chain of a group moves are constants of its
    computation, not batched over chains, so the layers below them run once per step instead
    of once per chain, and no chain computes gradients it would mask (merging a layer with
    its MLP, or every component into one computation, measured slower in
    ``tools/bench_refined.py``)."""
    groups: dict[tuple[str, ...], list[_Component]] = {}
    for comp in comps:
        groups.setdefault(tuple(comp.masks), []).append(comp)
    return list(groups.items())


def plan(prob: Problem, cfg: SamplerConfig, comps: list[_Component], grouping: str,
         vectorize: bool) -> tuple[str, list[tuple[tuple[str, ...], list[_Component]]]]:
    """How to run the chains: ``"grouped"`` (one computation per :func:`parameter_groups`
    group) or ``"joint"`` (every chain in one computation over all components' parameters).
    Joint shares each step's Python and dispatch overhead among all K × C chains, which wins
    on small work; grouped batches only what a group moves, which wins once the arithmetic
    dominates. ``"auto"`` picks joint below :data:`JOINT_WORK` sampled parameters × batch
    size (a rule, not a timing, so the same call always gives the same numbers)."""
    groups = parameter_groups(comps)
    if grouping == "auto":
        work = sum(v.numel() for v in prob.anchor.values()) * cfg.batch_size
        grouping = "joint" if vectorize and len(groups) > 1 and work < JOINT_WORK else "grouped"
    if grouping == "joint":
        return "joint", [(tuple(prob.anchor), comps)]
    return "grouped", groups


def _group_problem(prob: Problem, names: tuple[str, ...]) -> Problem:
    """``prob`` sampling only ``names``; the rest of its anchor becomes constants."""
    if names == tuple(prob.anchor):
        return prob
    return replace(prob, anchor={k: prob.anchor[k] for k in names},
                   consts={**prob.consts, **{k: v for k, v in prob.anchor.items()
                                             if k not in names}})


def _run_all(prob: Problem, cfg: SamplerConfig, nbeta: float,
             groups: list[tuple[tuple[str, ...], list[_Component]]], vectorize: bool,
             first_chain: int, progress: bool, comps: list[_Component],
             recorders: list[driver.Recorder]) -> None:
    """All (component, chain) pairs, group by group in chunks; every group iterates the same
    minibatches (same seed) and shares the paired-baseline cache; each chunk's outputs go
    back to its components, its draws to ``recorders`` (pairs numbered in ``comps``
    order)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(len(m) for _, m in groups) * cfg.num_chains * (cfg.burnin + cfg.num_draws)
        bar = tqdm(total=total, desc="refined LLC", unit="step", leave=False)
    try:
        for names, members in groups:
            _run_group(_group_problem(prob, names), cfg, nbeta, members, vectorize,
                       first_chain, bar, [_Pairs(r, comps, cfg.num_chains, first_chain)
                                          for r in recorders])
    finally:
        if bar is not None:
            bar.close()


def _run_group(prob: Problem, cfg: SamplerConfig, nbeta: float, comps: list[_Component],
               vectorize: bool, first_chain: int, bar: Any, recorders: list[_Pairs]) -> None:
    """One group's (component, chain) pairs in chunks of one vectorized computation each."""
    pairs = [(comp, first_chain + c) for comp in comps for c in range(cfg.num_chains)]
    chunk = cfg.chain_chunk_size or (chains_that_fit(prob, len(pairs)) if vectorize else 1)
    rows = {id(comp): comp.restriction_rows(prob.anchor) for comp in comps}
    fixed = cfg.step_size != "auto"
    # Chains that move every weight of the group need no masks: the unrestricted noise
    # stream over the group's weights is the restricted one (same draws, less work).
    whole = all(comp.whole and tuple(comp.masks) == tuple(prob.anchor) for comp in comps)
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        restriction = None if whole else driver.Restriction(
            params=tuple(rows[id(comp)][0] for comp, _ in part),
            masks={k: torch.stack([rows[id(comp)][1][k] for comp, _ in part])
                   for k in prob.anchor})
        eps: float | Tensor = (float(cfg.step_size) if fixed else torch.tensor(
            [comp.step_size for comp, _ in part], dtype=torch.float64, device=prob.device))
        run = driver.run_chains(
            prob, [c for _, c in part], seed=cfg.seed, kernel=get_kernel(cfg.sampler),
            step_size=eps, nbeta=nbeta, localization=float(cfg.localization),
            num_burnin=cfg.burnin, num_draws=cfg.num_draws, vectorize=vectorize,
            progress=bar, restriction=restriction,
            recorders=[r.chunk(part) for r in recorders])
        _hand_back(run, [comp for comp, _ in part])


@dataclass
class _Pairs:
    """A recorder that sees the (component, chain) pairs of a chunk as chains numbered
    ``k·num_chains + c`` (k the component's position, c the chain counted from
    ``first_chain``): the chain indices run_chains reports repeat across components."""

    recorder: driver.Recorder
    comps: list[_Component]
    num_chains: int
    first_chain: int
    index: tuple[int, ...] = ()

    def chunk(self, part: list[tuple[_Component, int]]) -> _Pairs:
        order = {id(comp): k for k, comp in enumerate(self.comps)}
        return replace(self, index=tuple(order[id(comp)] * self.num_chains + c - self.first_chain
                                         for comp, c in part))

    def on_draw(self, draw: int, chains: Any, position: dict[str, Tensor], losses: Tensor,
                baseline: Tensor, batch: Any) -> None:
        self.recorder.on_draw(draw, self.index, position, losses, baseline, batch)


def _hand_back(run: driver.ChainRun, owners: list[_Component]) -> None:
    """Split a chunk's (chain,) outputs by component, in chain order."""
    for j, comp in enumerate(owners):
        comp.loss.append(run.loss[j : j + 1])
        comp.accept.append(run.accept[j : j + 1])
        comp.diverged.append(run.diverged[j : j + 1])
        comp.baseline = run.baseline
    # The monitor reports diverged chains in position order, one record each.
    for j, record in zip(np.flatnonzero(run.diverged), run.divergences, strict=True):
        owners[j].divergences.append(record)
