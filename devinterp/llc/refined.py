"""``estimate_refined_llc``: the weight-refined λ̂ of many components in one computation.

Every component gets ``num_chains`` chains; all K × C chains run as one chunked, vectorized
computation over the union of the components' parameters, each chain's gradient and noise
masked to its component (:class:`devinterp.llc.driver.Restriction`). They share each step's
minibatch and its paired baseline L_B(w*), the data pipeline and the Python overhead, which K
separate calls would each pay. A chain of component k draws the noise stream that
``estimate_llc(weights=<k's parameters>)`` draws for the same chain index, so a component of
whole parameters gives that call's numbers: exactly with a fixed ``step_size``; with
``step_size="auto"`` each component is calibrated on its own restriction (the ε that call would
pick), and the per-chain ε agrees to float rounding.
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
_CALL_OPTIONS = ("device", "first_chain", "progress")


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
        **options: every option of :func:`devinterp.estimate_llc` except ``weights`` and
            ``recorders``, with the same defaults; ``num_chains`` is per component and
            ``chain_chunk_size`` counts (component, chain) pairs.

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
    device, first_chain = options.get("device"), int(options.get("first_chain", 0))
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
    modes = [(m, m.training) for m in model.modules()]
    cuda = [prob.device.index or 0] if prob.device.type == "cuda" else []
    threads = torch.get_num_threads()
    use_threads = _thread_policy(cfg, union, prob.device)
    notes: list[str] = []
    try:
        if use_threads is not None:
            torch.set_num_threads(use_threads)
        model.eval()
        with torch.random.fork_rng(devices=cuda):
            check_loss(prob, cfg.seed)
            vectorize = cfg.vectorize and vmap_works(prob, cfg.seed, notes)
            _cache_baseline(prob, cfg, loss_fn)
            t_cal = time.perf_counter()
            for comp in comps:
                comp.step_size, comp.calibration = _step_size(
                    comp.problem(prob), cfg, nbeta, vectorize)
            t_cal = time.perf_counter() - t_cal
            runs = _run_all(prob, cfg, nbeta, comps, vectorize, first_chain,
                            bool(options.get("progress", False)))
    finally:
        for m, was_training in modes:
            m.training = was_training
        torch.set_num_threads(threads)
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
        }
        extra = dict(comp.calibration)
        extra["divergences"] = comp.divergences
        extra["calibration_s"] = t_cal if cfg.step_size == "auto" else 0.0
        extra["elapsed_s"] = elapsed
        loss = np.concatenate(comp.loss)
        try:
            result = summarize(nbeta * (loss - runs[0].baseline[None, :]), loss,
                               runs[0].baseline, np.concatenate(comp.accept),
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


def _run_all(prob: Problem, cfg: SamplerConfig, nbeta: float, comps: list[_Component],
             vectorize: bool, first_chain: int, progress: bool) -> list[driver.ChainRun]:
    """All (component, chain) pairs in chunks; each chunk's outputs go back to its components."""
    pairs = [(comp, first_chain + c) for comp in comps for c in range(cfg.num_chains)]
    chunk = cfg.chain_chunk_size or (chains_that_fit(prob, len(pairs)) if vectorize else 1)
    rows = {id(comp): comp.restriction_rows(prob.anchor) for comp in comps}
    fixed = cfg.step_size != "auto"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs) * (cfg.burnin + cfg.num_draws), desc="refined LLC",
                   unit="step", leave=False)
    runs = []
    try:
        for i in range(0, len(pairs), chunk):
            part = pairs[i : i + chunk]
            restriction = driver.Restriction(
                params=tuple(rows[id(comp)][0] for comp, _ in part),
                masks={k: torch.stack([rows[id(comp)][1][k] for comp, _ in part])
                       for k in prob.anchor})
            eps: float | Tensor = (float(cfg.step_size) if fixed else torch.tensor(
                [comp.step_size for comp, _ in part], dtype=torch.float64, device=prob.device))
            run = driver.run_chains(
                prob, [c for _, c in part], seed=cfg.seed, kernel=get_kernel(cfg.sampler),
                step_size=eps, nbeta=nbeta, localization=float(cfg.localization),
                num_burnin=cfg.burnin, num_draws=cfg.num_draws, vectorize=vectorize,
                progress=bar, restriction=restriction)
            _hand_back(run, [comp for comp, _ in part])
            runs.append(run)
    finally:
        if bar is not None:
            bar.close()
    return runs


def _hand_back(run: driver.ChainRun, owners: list[_Component]) -> None:
    """Split a chunk's (chain,) outputs by component, in chain order."""
    for j, comp in enumerate(owners):
        comp.loss.append(run.loss[j : j + 1])
        comp.accept.append(run.accept[j : j + 1])
        comp.diverged.append(run.diverged[j : j + 1])
    # The monitor reports diverged chains in position order, one record each.
    for j, record in zip(np.flatnonzero(run.diverged), run.divergences, strict=True):
        owners[j].divergences.append(record)
