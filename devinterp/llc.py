"""Local learning coefficient estimation: λ̂ = nβ·(E_w[L(w)] − L(w*)) by localized, tempered SGLD.

The posterior sampled is p(w) ∝ exp(−nβ·L_n(w) − (γ/2)·‖w − w*‖²) (Lau et al. 2023,
arXiv 2308.12108). Chains are batched into one computation with ``torch.func.vmap`` over a
stacked copy of the trainable parameters; a sequential path (``vectorize=False``) runs the same
chains one by one with the same random numbers.

The baseline is *paired*: at every draw, L_B(w*) is computed on the very minibatch B on which the
chains' L_B(w_t) is computed, and λ̂ averages the differences. Minibatch noise common to both
cancels, so the baseline is neither noisier than the draws nor biased relative to them (a
baseline averaged over other minibatches adds nβ·noise to every chain alike; at nβ = n/log n
that noise can swamp λ; pitfall 1 in SCIENCE.md). All chains share the minibatch of a step, so
the paired baseline costs one extra forward pass per step, whatever the number of chains.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, grad_and_value, vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from devinterp import sampling
from devinterp.diagnostics import ess, split_rhat
from devinterp.health import TARGET_ACCEPTANCE, TARGET_REL_SE, warnings_for

LossFn = Callable[[Tensor, Tensor], Tensor]
BatchLoss = Callable[[Callable[..., Any], Any], Tensor]

DEFAULT_LOCALIZATION = 1.0
#: Below this many sampled parameters × batch size, estimate_llc runs on one CPU thread by
#: default: per-op work is too small to split (``python tools/bench_threads.py``).
SMALL_MODEL_WORK = 2**26
_STEP_CAP = 0.1  # auto step: ε·(nβ·λ_max(H) + γ) <= this (top-direction bias ~ ε·a/4 = 2.5 %)
_DIVERGENCE_FACTOR = 1e4


class AllChainsDivergedError(RuntimeError):
    """Every SGLD chain produced a non-finite or exploding loss."""


class NonFiniteLossError(ValueError):
    """The loss at the checkpoint w* is NaN or infinite: there is no λ̂ to estimate there."""


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------
@dataclass
class LLCResult:
    """The outcome of :func:`estimate_llc`.

    Attributes:
        llc_mean: mean of the per-chain λ̂ over chains that did not diverge.
        llc_std: standard deviation (ddof=1) of those per-chain values.
        llc_per_chain: λ̂ of each chain, shape (chain,); NaN for a diverged chain.
        loss_trace: minibatch loss L_B(w_t) of each draw, shape (chain, draw).
        init_loss: L(w*), the mean of the paired baseline L_B(w*) over the draws' minibatches.
        diagnostics: MALA acceptance, split R-hat and ESS of the λ̂ traces, fraction of draws
            below the baseline, diverged chains, calibration details.
        settings: the sampler settings used, including values chosen automatically.
        warnings: plain-words warnings when diagnostics look bad.
        llc_trace: nβ·(L_B(w_t) − L_B(w*)) per draw, shape (chain, draw): λ̂ is its mean.
        baseline_trace: L_B(w*) of each draw's minibatch, shape (draw,).
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    diagnostics: dict[str, Any]
    settings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    llc_trace: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    baseline_trace: np.ndarray = field(default_factory=lambda: np.zeros(0))
    chain_acceptance: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-able summary (no traces): what a row of the λ̂ table holds."""
        out: dict[str, Any] = {
            "llc_mean": self.llc_mean,
            "llc_std": self.llc_std,
            "init_loss": self.init_loss,
            "llc_per_chain": [float(x) for x in self.llc_per_chain],
        }
        for k, v in self.diagnostics.items():
            if isinstance(v, (int, float, bool, str)) or v is None:
                out[k] = v
            elif isinstance(v, (list, tuple)):
                out[k] = list(v)
        for k, v in self.settings.items():
            out[k] = v
        out["warnings"] = list(self.warnings)
        return out

    def metrics(self) -> dict[str, float]:
        """Scalar metrics for experiment loggers: ``llc/mean``, ``llc/std``, ``llc/<diagnostic>``."""
        out = {"llc/mean": self.llc_mean, "llc/std": self.llc_std, "llc/init_loss": self.init_loss}
        for k in ("mala_acceptance", "rhat", "ess", "frac_below_baseline", "num_diverged",
                  "step_size", "nbeta"):
            v = self.diagnostics.get(k, self.settings.get(k))
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"llc/{k}"] = float(v)
        return out


def _summarize(llc_trace: np.ndarray, loss_trace: np.ndarray, baseline: np.ndarray,
               accept: np.ndarray, diverged: np.ndarray, settings: dict[str, Any],
               extra: dict[str, Any]) -> LLCResult:
    """Build an :class:`LLCResult` from per-chain arrays (also used to merge DDP shards)."""
    ok = ~diverged
    divergences = list(extra.get("divergences", []))
    if not ok.any():
        first = f" (first: {_describe_divergence(divergences[0])})" if divergences else ""
        raise AllChainsDivergedError(
            f"all {len(diverged)} SGLD chains diverged{first} at "
            f"step_size={settings.get('step_size'):.3g}: the step is too large for this "
            "posterior; pass a smaller step_size (e.g. 10x smaller) or a larger localization"
        )
    per_chain = np.where(ok, llc_trace.mean(axis=1), np.nan)
    good = llc_trace[ok]
    k = int(ok.sum())
    llc_mean = float(np.mean(per_chain[ok]))
    llc_std = float(np.std(per_chain[ok], ddof=1)) if k > 1 else 0.0
    diag: dict[str, Any] = dict(extra)
    diag.update(
        mala_acceptance=float(np.nanmean(accept[ok])) if accept.size else float("nan"),
        rhat=split_rhat(good) if good.shape[0] > 1 else float("nan"),
        ess=ess(good),
        frac_below_baseline=float(np.mean(good < 0)),
        num_diverged=int(diverged.sum()),
        diverged_chains=[int(i) for i in np.flatnonzero(diverged)],
        num_ok_chains=k,
        # Precision of λ̂: the standard error of the mean over independent chains.
        llc_se=llc_std / math.sqrt(k) if k > 1 else float("nan"),
        # How often the sampled loss differs from one draw to the next (minus the paired
        # baseline, so minibatch changes do not count): ~1 when the weights move.
        frac_distinct_losses=float(np.mean([len(np.unique(c)) / c.size for c in good])),
    )
    diag["llc_rel_se"] = (diag["llc_se"] / llc_mean if llc_mean > 0 and k > 1
                          else float("nan"))
    if divergences:
        diag["first_divergence"] = _describe_divergence(divergences[0])
    half = good.shape[1] // 2
    if half >= 2:
        # Drift: how far the second half of the draws moved from the first, in units of the
        # per-chain spread of λ̂ (a flat trace gives ~0; a trace still climbing gives a lot).
        first, second = good[:, :half].mean(), good[:, half:].mean()
        spread = max(np.std(good.mean(axis=1)), np.std(good) / math.sqrt(good.shape[1]), 1e-12)
        diag["drift"] = float((second - first) / spread)
    result = LLCResult(
        llc_mean=llc_mean, llc_std=llc_std, llc_per_chain=per_chain,
        loss_trace=loss_trace, init_loss=float(np.mean(baseline)), diagnostics=diag,
        settings=dict(settings), llc_trace=llc_trace, baseline_trace=baseline,
        chain_acceptance=accept,
    )
    result.warnings = _warnings(result)
    return result


def _describe_divergence(d: Mapping[str, Any]) -> str:
    where = "draw" if d["phase"] == "draw" else "burn-in step"
    return f"chain {d['chain']} at {where} {d['step']}, loss {d['loss']:.3g}"


def _warnings(r: LLCResult) -> list[str]:
    """The plain-words warnings of :data:`devinterp.health.HEALTH_RULES` this result breaks."""
    values = {**r.settings, **r.diagnostics, "llc_mean": r.llc_mean}
    rel = values.get("llc_rel_se", float("nan"))
    if math.isfinite(rel):
        factor = (rel / TARGET_REL_SE) ** 2
        values["draws_needed"] = int(math.ceil(factor * r.settings.get("num_draws", 0)))
        values["chains_needed"] = int(math.ceil(factor * values["num_ok_chains"]))
    values.setdefault("model_dtype", "the weights' dtype")
    values.setdefault("first_divergence", "")
    return warnings_for(values)


def merge_results(results: Sequence[LLCResult]) -> LLCResult:
    """Merge results of disjoint chain ranges (e.g. DDP ranks) into one, as if run together."""
    if not results:
        raise ValueError("merge_results needs at least one LLCResult")
    base = np.asarray(results[0].baseline_trace)
    for r in results[1:]:
        if r.llc_trace.shape[1] != results[0].llc_trace.shape[1]:
            raise ValueError("cannot merge results with different num_draws")
    diverged = np.concatenate([np.isnan(r.llc_per_chain) for r in results])
    settings = dict(results[0].settings)
    settings["num_chains"] = int(sum(len(r.llc_per_chain) for r in results))
    extra = {k: v for k, v in results[0].diagnostics.items()
             if k.startswith("calibration") or k in ("hessian_top", "elapsed_s")}
    extra["divergences"] = [d for r in results for d in r.diagnostics.get("divergences", [])]
    return _summarize(
        np.concatenate([r.llc_trace for r in results]),
        np.concatenate([r.loss_trace for r in results]),
        base,
        np.concatenate([r.chain_acceptance for r in results]),
        diverged,
        settings,
        extra,
    )


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` on ``device``; with ``dtype``, its floating-point tensors cast to it."""
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device, dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        parts = [_to_device(v, device, dtype) for v in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


class _TensorBatches:
    """Minibatches drawn without replacement (a fresh permutation per epoch) from tensors."""

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int, device: torch.device,
                 dtype: torch.dtype | None = None):
        self.inputs, self.targets = _to_device((inputs, targets), device, dtype)
        self.n = len(inputs)
        self.batch_size = min(batch_size, self.n)

    def iterate(self, seed: int) -> Iterator[Any]:
        for _, batch in self.indexed(seed):
            yield batch

    def indexed(self, seed: int) -> Iterator[tuple[Tensor | None, Any]]:
        """(sample indices, batch) pairs: the indices let the baseline come from a cache."""
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(self.n, generator=g).to(self.inputs.device)
            for i in range(0, self.n - self.batch_size + 1, self.batch_size):
                idx = perm[i : i + self.batch_size]
                yield idx, (self.inputs[idx], self.targets[idx])

    def per_sample_losses(self, loss: Callable[[Any], Tensor],
                          loss_fn: LossFn) -> Tensor | None:
        """Per-sample losses at w* (float64), if the batch loss is their mean; else None.

        Then L_B(w*) of any minibatch is a gather and a mean: the paired baseline costs no
        forward pass during sampling.
        """
        per_sample = vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))
        parts = []
        with torch.no_grad():
            for i in range(0, self.n, 4096):
                x, y = self.inputs[i : i + 4096], self.targets[i : i + 4096]
                try:
                    parts.append(per_sample(loss(x), y).reshape(-1).double())
                except Exception:  # noqa: BLE001 - a loss vmap cannot split: pay a forward
                    return None
            cache = torch.cat(parts)
            if cache.shape != (self.n,):
                return None
            # The batch loss must be the mean of these terms on every batch, not just on one:
            # a token-mean over padded sequences or a class-weighted loss equals it on a batch
            # that happens to be uniform (e.g. the first rows of class-sorted data), and a
            # mis-paired baseline biases λ̂ with no other sign. So compare on the first and
            # last rows and on random batches.
            b = self.batch_size
            g = torch.Generator().manual_seed(1234)
            checks = [torch.arange(b), torch.arange(self.n - b, self.n)]
            checks += [torch.randperm(self.n, generator=g)[:b] for _ in range(3)]
            for idx in checks:
                idx = idx.to(self.inputs.device)
                direct = loss_fn(loss(self.inputs[idx]), self.targets[idx]).double()
                if not torch.allclose(cache[idx].mean(), direct, rtol=1e-5, atol=1e-7):
                    return None  # not a mean of per-sample terms: pay a paired forward
        return cache


class _LoaderBatches:
    """Minibatches from a DataLoader, reshuffled from ``seed`` (never the global RNG)."""

    def __init__(self, loader: DataLoader, device: torch.device, n: int | None,
                 dtype: torch.dtype | None = None):
        self.loader, self.device, self.n, self.dtype = loader, device, n, dtype

    def indexed(self, seed: int) -> Iterator[tuple[Tensor | None, Any]]:
        for batch in self.iterate(seed):
            yield None, batch

    def iterate(self, seed: int) -> Iterator[Any]:
        loader = self.loader
        if not isinstance(loader.dataset, IterableDataset):
            loader = DataLoader(
                loader.dataset, batch_size=loader.batch_size, shuffle=True,
                generator=torch.Generator().manual_seed(seed), collate_fn=loader.collate_fn,
                drop_last=loader.drop_last, num_workers=0,
            )
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield _to_device(batch, self.device, self.dtype)
            if empty:
                raise ValueError("data is empty: the DataLoader produced no batch")


def _batch_source(data: Any, batch_size: int, device: torch.device, num_samples: int | None,
                  dtype: torch.dtype | None = None) -> _TensorBatches | _LoaderBatches:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, Tensor) for t in data
    ):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data: inputs have {len(x)} rows but targets have {len(y)}; "
                             "pass tensors with the same first dimension")
        if len(x) == 0:
            raise ValueError("data is empty: pass at least one sample")
        return _TensorBatches(x, y, batch_size, device, dtype)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return _batch_source(tuple(data.tensors), batch_size, device, num_samples, dtype)
    if isinstance(data, DataLoader):
        n = num_samples
        if n is None and not isinstance(data.dataset, IterableDataset):
            n = len(data.dataset)
        if n == 0:
            raise ValueError("data is empty: the DataLoader's dataset has no sample")
        return _LoaderBatches(data, device, n, dtype)
    if isinstance(data, Dataset):
        if isinstance(data, IterableDataset):
            loader = DataLoader(data, batch_size=batch_size)
            return _LoaderBatches(loader, device, num_samples, dtype)
        if len(data) == 0:
            raise ValueError("data is empty: the Dataset has no sample")
        loader = DataLoader(data, batch_size=min(batch_size, len(data)))
        return _LoaderBatches(loader, device, len(data), dtype)
    raise TypeError(
        f"data must be a Dataset, a DataLoader or a tuple (inputs, targets) of tensors, got "
        f"{type(data).__name__}"
    )


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def at_weights(model: nn.Module, tensors: Mapping[str, Tensor]) -> contextlib.AbstractContextManager:
    """Run ``model`` (and all its submodules and methods) with its parameters and buffers
    replaced by ``tensors`` inside the block; tied tensors (one tensor registered under several
    names, e.g. GPT-2's output head and input embedding) are replaced under every name.

    This is the context manager behind ``torch.func.functional_call`` (``tie_weights=True``):
    functional_call only runs ``forward``, while a loss may need the model's other methods.
    """
    return _reparametrize_module(model, dict(tensors), tie_weights=True)


@dataclass
class _Problem:
    """Everything the chains need: the loss as a function of parameters, the anchor w*, data."""

    model: nn.Module
    anchor: dict[str, Tensor]
    consts: dict[str, Tensor]
    loss_fn: LossFn | None
    batch_loss: BatchLoss | None
    source: _TensorBatches | _LoaderBatches
    device: torch.device
    baseline_cache: Tensor | None = None  # per-sample losses at w*, when the loss is a mean

    def baseline(self, idx: Tensor | None, batch: Any) -> Tensor:
        """L_B(w*) of this minibatch: from the cache when possible, else one forward pass."""
        if idx is not None and self.baseline_cache is not None:
            return self.baseline_cache[idx].mean()
        return self.loss(self.anchor, batch).detach().double()

    def loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """The batch loss with the model's weights replaced by ``params`` for the whole call,
        so a ``batch_loss`` may run the model, any of its submodules or methods (e.g. a
        LightningModule's ``training_step``) and every use of a tied tensor moves together."""
        with at_weights(self.model, {**self.consts, **params}):
            if self.batch_loss is not None:
                return self.batch_loss(self.model, batch)
            inputs, targets = batch
            return self.loss_fn(self.model(inputs), targets)

    def outputs_at_anchor(self, inputs: Tensor) -> Tensor:
        """The model's outputs at w* (for the per-sample baseline cache)."""
        with at_weights(self.model, {**self.consts, **self.anchor}):
            return self.model(inputs)


def _chain_generators(seed: int, chains: Sequence[int], device: torch.device) -> list:
    gens = []
    for c in chains:
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + 7919 * (c + 1)) % (2**63 - 1))
        gens.append(g)
    return gens


def _noise(gens: list, anchor: dict[str, Tensor]) -> dict[str, Tensor]:
    """Standard normal noise shaped (chain, *param) with each chain's own generator."""
    total = sum(v.numel() for v in anchor.values())
    ref = next(iter(anchor.values()))
    flat = torch.stack([torch.randn(total, generator=g, device=ref.device, dtype=ref.dtype)
                        for g in gens])
    out, i = {}, 0
    for k, v in anchor.items():
        out[k] = flat[:, i : i + v.numel()].view(len(gens), *v.shape)
        i += v.numel()
    return out


@dataclass
class _ChainRun:
    loss: np.ndarray  # (chain, draw) L_B(w_t)
    baseline: np.ndarray  # (draw,) L_B(w*)
    accept: np.ndarray  # (chain,) mean MALA acceptance over recorded transitions
    diverged: np.ndarray  # (chain,) bool
    final: dict[str, Tensor]  # last positions (chain, *param)
    divergences: list[dict[str, Any]]  # per diverged chain: chain, step, phase, loss


def _run_chains(prob: _Problem, chains: Sequence[int], *, seed: int, step_size: float,
                nbeta: float, localization: float, sampler: str, num_burnin: int,
                num_draws: int, vectorize: bool, accept_every: int = 32,
                progress: Any = None) -> _ChainRun:
    """Run the given chains from w* and record losses after burn-in (one chunk of chains)."""
    # The start w* is never a draw (its loss is the baseline: counting it biases λ̂ low), so
    # with num_burnin=0 the first draw is the position after one step.
    num_burnin = max(num_burnin, 1)
    C = len(chains)
    anchor_c = {k: v.unsqueeze(0).expand(C, *v.shape) for k, v in prob.anchor.items()}
    state = sampling.sampler_init(anchor_c, sampler)
    gens = _chain_generators(seed, chains, prob.device)
    grad_fn = grad_and_value(prob.loss)
    if vectorize:
        vgrad = vmap(grad_fn, in_dims=(0, None))
    else:
        def vgrad(params: dict[str, Tensor], batch: Any) -> tuple[dict[str, Tensor], Tensor]:
            outs = [grad_fn({k: v[c] for k, v in params.items()}, batch) for c in range(C)]
            return ({k: torch.stack([g[k] for g, _ in outs]) for k in params},
                    torch.stack([val for _, val in outs]))

    total = num_burnin + num_draws
    dev = prob.device
    loss_rec = torch.full((C, num_draws), float("nan"), device=dev, dtype=torch.float64)
    base_rec = torch.zeros(num_draws, device=dev, dtype=torch.float64)
    acc_sum = torch.zeros(C, device=dev, dtype=torch.float64)
    acc_n = 0
    diverged = torch.zeros(C, dtype=torch.bool, device=dev)
    batches = prob.source.indexed(seed)
    G = None
    delta = math.sqrt(localization) if localization > 0 else 1e-8
    ref = None  # L_B(w*) of the first minibatch: the scale of "exploding"
    prev = None  # each chain's loss at the previous step
    first_bad = torch.full((C,), -1, dtype=torch.long, device=dev)
    bad_loss = torch.zeros(C, dtype=torch.float64, device=dev)
    model_nan = torch.zeros(C, dtype=torch.bool, device=dev)
    # Asking whether a chain diverged (bool(bad.any())) waits for the device at every step; on
    # an accelerator the reset below runs unconditionally instead (same numbers, no wait).
    sync_free = _sync_free(dev)
    for t in range(total):
        idx, batch = next(batches)
        drawing = t >= num_burnin
        accepting = drawing and accept_every and (t - num_burnin) % accept_every == 0
        grads, losses = vgrad(state.position, batch)
        with torch.no_grad():
            losses = losses.detach().double()
            if ref is None or drawing:
                # The paired baseline is only needed for draws (burn-in is thrown away).
                base = prob.baseline(idx, batch)
                if ref is None:
                    if not torch.isfinite(base):
                        raise NonFiniteLossError(
                            f"the loss at w* is not finite ({base.item()}); estimate λ̂ only "
                            "at a checkpoint whose loss is finite")
                    ref = base.abs() + 1
            finite = torch.isfinite(losses)
            bad = ~finite | ((losses - base).abs() > _DIVERGENCE_FACTOR * ref)
            # A loss that turns non-finite straight from an ordinary value (within 100x the
            # loss scale at w*) was not blown up by the step: the model or the loss itself
            # returns NaN/inf near these weights (checked further by _raise_model_nan).
            sane = (torch.ones_like(finite) if prev is None
                    else torch.isfinite(prev) & ((prev - base).abs() <= 100 * ref))
            fresh = bad & ~diverged
            model_nan |= fresh & ~finite & sane
            first_bad = torch.where(fresh & (first_bad < 0), t, first_bad)
            bad_loss = torch.where(fresh, losses, bad_loss)
            prev = losses
            if drawing:
                loss_rec[:, t - num_burnin] = losses
                base_rec[t - num_burnin] = base
            dr = sampling.drift(state.position, grads, anchor_c, nbeta, localization)
            if state.precond is not None and (t < num_burnin or G is None):
                # RMSProp statistics adapt during burn-in only, then G is frozen, so the draws
                # come from a fixed-preconditioner Langevin chain with the right target.
                G = sampling.preconditioner(state, dr, first=t == 0, delta=delta)
            new = sampling.sgld_step(state, dr, _noise(gens, prob.anchor), step_size, G)
        if accepting:
            # MALA acceptance of this very transition, both ends on the same minibatch (on
            # different minibatches the energy difference is dominated by minibatch noise).
            grads_new, losses_new = vgrad(new.position, batch)
            with torch.no_grad():
                u = nbeta * (losses - base) + 0.5 * localization * sampling.sq_distance(
                    state.position, anchor_c).double()
                u_new = nbeta * (losses_new.detach().double() - base) + (
                    0.5 * localization * sampling.sq_distance(new.position, anchor_c).double())
                dr_new = sampling.drift(new.position, grads_new, anchor_c, nbeta, localization)
                log_a = sampling.mala_log_accept(state.position, new.position, u, u_new, dr,
                                                 dr_new, step_size, G)
                acc_sum += torch.exp(torch.clamp(torch.nan_to_num(log_a, nan=-1e30), max=0.0))
                acc_n += 1
        if (not sync_free or t % 16 == 15 or t == total - 1) and bool(model_nan.any()):
            _raise_model_nan(model_nan, state.position, anchor_c, chains, first_bad, num_burnin,
                             base, prev_healthy=~(diverged | bad), exact=not sync_free)
        if sync_free or bool(bad.any()):
            with torch.no_grad():
                # A diverged chain restarts at w* so it cannot poison later arithmetic; its
                # records are dropped and it is left out of λ̂.
                diverged |= bad
                for k, v in new.position.items():
                    new.position[k] = torch.where(diverged.view(C, *([1] * (v.dim() - 1))),
                                                  anchor_c[k], v)
        state = new
        if progress is not None:
            progress.update(C)
    loss_rec[diverged] = float("nan")
    accept = (acc_sum / max(acc_n, 1)).cpu().numpy() if acc_n else np.full(C, np.nan)
    divergences = [
        {"chain": int(chains[c]), "phase": "draw" if t >= num_burnin else "burn-in",
         "step": int(t - num_burnin if t >= num_burnin else t), "loss": float(bad_loss[c])}
        for c, t in enumerate(first_bad.tolist()) if t >= 0
    ]
    return _ChainRun(loss_rec.cpu().numpy(), base_rec.cpu().numpy(), accept,
                     diverged.cpu().numpy(), state.position, divergences)


def _raise_model_nan(flags: Tensor, position: dict[str, Tensor], anchor: dict[str, Tensor],
                     chains: Sequence[int], first_bad: Tensor, num_burnin: int, base: Tensor,
                     prev_healthy: Tensor, exact: bool) -> None:
    """Stop at once when the model, not the step, makes the loss non-finite near w*.

    ``exact`` (the loss was just computed at ``position``): confirm that the weights there are
    finite and not much farther from w* than the healthy chains' (a step that threw a chain far
    away is the step's fault). Without it (accelerators check every 16 steps, and the chain
    has been reset since) the loss-based rule alone decides.
    """
    confirmed, dist = None, float("nan")
    sq = sampling.sq_distance(position, anchor).double() if exact else None
    for c in torch.nonzero(flags).flatten().tolist():
        if exact:
            healthy = sq[prev_healthy & torch.isfinite(sq)]
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
    c = confirmed
    t = int(first_bad[c])
    where = f"draw {t - num_burnin}" if t >= num_burnin else f"burn-in step {t}"
    raise NonFiniteLossError(
        f"the loss became non-finite at sampled weights near w* (chain {chains[c]}, {where}, "
        f"‖w − w*‖ = {dist:.3g}, loss at w* {float(base):.4g}), straight from an ordinary "
        "value: the model or the loss returns NaN/inf there, which a smaller step size does not "
        "fix. Find the operation that does (log or sqrt of values <= 0, 0·inf, x/0, pow with a "
        "negative exponent), or leave those weights out of the sample with weights=[...]")


def _sync_free(device: torch.device) -> bool:
    """Whether the chain loop should avoid host-device synchronisation (not on the CPU)."""
    return device.type != "cpu"


class NonFiniteCurvatureError(RuntimeError):
    """The automatic step size found no finite curvature of the loss (see the message)."""


def _hessian_top(prob: _Problem, params: dict[str, Tensor], batch: Any, iters: int = 6,
                 seed: int = 0, where: str = "w*") -> tuple[float, str]:
    """Largest-magnitude Hessian eigenvalue of the minibatch loss at ``params`` (power
    iteration), and how the Hessian-vector products were computed.

    Exact products (reverse-over-reverse) need second derivatives; where one is missing (a
    fused attention kernel has no double backward) or is NaN where the first derivative is
    finite (``w ** 0`` at ``w = 0``), the products fall back to central finite differences
    of gradients, which need first derivatives only.
    """
    g = torch.Generator(device=prob.device).manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
         for k, p in params.items()}
    grad_fn = grad(lambda p: prob.loss(p, batch))
    scale = math.sqrt(sum(float((p.double() ** 2).sum()) for p in params.values())
                      / max(1, sum(p.numel() for p in params.values())))
    radius = 1e-3 * max(1.0, scale)  # ~ sqrt(float32 resolution) relative to the weights

    def exact(u: dict[str, Tensor]) -> dict[str, Tensor]:
        # Reverse-over-reverse: works for every loss (forward-mode jvp fails on some built-in
        # losses, e.g. nn.MSELoss, with "ZeroTensors are immutable").
        return grad(lambda q: sum((g * u[k]).sum() for k, g in grad_fn(q).items()))(params)

    def finite_difference(u: dict[str, Tensor]) -> dict[str, Tensor]:
        plus = grad_fn({k: p + radius * u[k] for k, p in params.items()})
        minus = grad_fn({k: p - radius * u[k] for k, p in params.items()})
        return {k: (plus[k] - minus[k]) / (2 * radius) for k in params}

    method = "hvp"
    lam = float("nan")
    for _ in range(iters):
        norm = torch.sqrt(sum((x * x).sum() for x in v.values()))
        if norm == 0:
            return 0.0, method
        v = {k: x / norm for k, x in v.items()}
        hv = None
        if method == "hvp":
            try:
                hv = exact(v)
            except (RuntimeError, NotImplementedError):
                hv = None  # no double backward for some op: first derivatives only
            if hv is None or not all(bool(torch.isfinite(x).all()) for x in hv.values()):
                method = "finite_difference"
        if method == "finite_difference":
            hv = finite_difference(v)
        lam = float(sum((hv[k] * v[k]).sum() for k in v))
        if not math.isfinite(lam):
            bad = [k for k, x in hv.items() if not bool(torch.isfinite(x).all())]
            raise NonFiniteCurvatureError(
                f"step_size='auto': the loss's curvature at {where} is not finite, even from "
                f"finite differences of gradients (non-finite in {bad[:5]}); the model or the "
                "loss produces NaN/inf near those weights: pass step_size=... explicitly, or "
                "check the model for operations such as log(0), x/0 or pow with a negative "
                "exponent")
        v = {k: x.detach() for k, x in hv.items()}
    return abs(lam), method


def _cap(a_max: float, sampler: str) -> float:
    """Largest ε for a top curvature ``a_max`` of U. With RMSProp the preconditioner settles
    near 1/√a in a direction of curvature a, so the effective step ε·G·a is ε·√a."""
    return _STEP_CAP / (math.sqrt(a_max) if sampler == "rmsprop_sgld" else a_max)


def _calibrate(prob: _Problem, *, seed: int, nbeta: float, localization: float, sampler: str,
               vectorize: bool, pilot_steps: int, num_pilot: int) -> tuple[float, dict]:
    """Choose ε from data alone: curvature cap, then short pilot chains that must not diverge,
    must keep a MALA acceptance near 0.9, and must not find a curvature the cap did not know."""
    batch = next(prob.source.iterate(seed + 1))
    h0, method = _hessian_top(prob, prob.anchor, batch, seed=seed)
    a_max = nbeta * h0 + localization
    eps = _cap(a_max, sampler)
    rounds = []
    for _ in range(8):
        run = _run_chains(prob, range(num_pilot), seed=seed + 2, step_size=eps, nbeta=nbeta,
                          localization=localization, sampler=sampler, num_burnin=pilot_steps // 2,
                          num_draws=pilot_steps - pilot_steps // 2, vectorize=vectorize,
                          accept_every=2)
        acc = float(np.nanmean(run.accept)) if np.isfinite(run.accept).any() else 0.0
        diverged = bool(run.diverged.any())
        h = 0.0
        if not diverged:
            h, m = _hessian_top(prob, {k: v[0].contiguous() for k, v in run.final.items()},
                                batch, seed=seed, where="a pilot chain's last draw")
            method = m if m != "hvp" else method
        rounds.append({"step_size": eps, "acceptance": acc, "diverged": diverged,
                       "hessian_top": h})
        new = eps
        if diverged:
            new = eps / 10
        else:
            new = min(new, _cap(nbeta * h + localization, sampler))
            if acc < TARGET_ACCEPTANCE:
                # 1 − acceptance grows about linearly in ε (measured on MLPs and deep linear
                # networks): jump to the target in one round, with a margin.
                new = min(new, eps * max(0.05, 0.8 * (1 - TARGET_ACCEPTANCE) / (1 - acc)))
        if new >= 0.8 * eps:
            break
        eps = new
    if not (math.isfinite(eps) and eps > 0):
        raise NonFiniteCurvatureError(
            f"step_size='auto' found no usable step (ε = {eps}; calibration rounds: {rounds}); "
            "pass step_size=... explicitly")
    return eps, {"calibration_rounds": len(rounds), "hessian_top": h0, "calibration": rounds,
                 "calibration_acceptance": rounds[-1]["acceptance"], "curvature_method": method}


def estimate_llc(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    batch_loss: BatchLoss | None = None,
    num_chains: int = 8,
    num_draws: int = 400,
    num_burnin: int | None = None,
    batch_size: int = 256,
    step_size: float | Literal["auto"] = "auto",
    localization: float | None = None,
    nbeta: float | None = None,
    sampler: Literal["sgld", "rmsprop_sgld"] = "rmsprop_sgld",
    seed: int = 0,
    weights: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    num_samples: int | None = None,
    first_chain: int = 0,
    chain_chunk_size: int | None = None,
    vectorize: bool = True,
    num_threads: int | None = None,
    progress: bool = False,
) -> LLCResult:
    """Estimate the local learning coefficient λ̂ of ``model`` at its current weights w*.

    λ̂ = nβ·(E[L_B(w)] − L_B(w*)) with w drawn by SGLD from
    p(w) ∝ exp(−nβ·L(w) − (γ/2)·‖w − w*‖²); the baseline L_B(w*) is paired with every draw's
    minibatch (see the module docstring for why).

    Args:
        model: the network at w*. Its parameters with ``requires_grad`` are sampled (see
            ``weights``); buffers (e.g. BatchNorm statistics) are held fixed and the model is
            evaluated in eval mode. The model itself is never modified.
        data: a ``Dataset``, a ``DataLoader`` (its dataset is reshuffled from ``seed``) or a
            tuple ``(inputs, targets)`` of tensors.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar mean loss of a batch. It should be a
            negative log-likelihood up to a constant (e.g. cross entropy, or ½·squared error for
            unit-variance Gaussian noise) for λ̂ to estimate λ.
        batch_loss: instead of ``loss_fn``, for batches that are not ``(inputs, targets)``:
            ``batch_loss(forward, batch)`` -> scalar, where ``forward(*args)`` runs the model at
            the sampled weights.
        num_chains: number of independent chains (λ̂ per chain, std across chains).
        num_draws: recorded draws per chain, after burn-in.
        num_burnin: steps discarded at the start of each chain (they start at w* and would bias
            λ̂ low). Default: ``num_draws // 2``. The start w* itself is never a draw.
        batch_size: minibatch size for tensors and datasets (a DataLoader keeps its own).
        step_size: ε, or ``"auto"``: ε from the top Hessian eigenvalue (ε·(nβ·λ_max + γ) =
            0.1) and short pilot chains that must not diverge and must keep a MALA acceptance
            of ~0.9 (halving ε otherwise).
        localization: γ, the strength of the pull to w*. Default 1.0. Keep γ ≪ nβ·curvature or
            λ̂ is pushed down.
        nbeta: nβ, the inverse temperature times n. Default n/log n with n the number of
            samples (Lau et al.). Always report nβ with λ̂: other conventions change it a lot.
        sampler: ``"rmsprop_sgld"`` (default): RMSProp-preconditioned SGLD whose preconditioner
            adapts during burn-in and is then frozen, so draws target the right posterior while
            flat (singular) and stiff directions mix at similar speeds; or plain ``"sgld"``.
        seed: seeds minibatch order and each chain's noise; the global RNG is untouched.
        weights: the weight-refined LLC (Wang et al. 2024): names or ``fnmatch`` patterns of
            the parameters SGLD moves (e.g. ``["blocks.0.attn.*"]``), frozen or not; every
            other weight stays at w*. Default: all parameters with ``requires_grad``. (The
            data-refined LLC needs no option: pass the other distribution's data.)
        device: where to sample. Default: the device of the model's parameters.
        num_samples: n, when ``data`` has no length (an IterableDataset).
        first_chain: index of the first chain; chains are seeded by (seed, index), so split
            ranges (DDP ranks) reproduce one run. Merge them with :func:`merge_results`.
        chain_chunk_size: run at most this many chains at once (memory); same numbers.
        vectorize: batch chains with ``torch.func.vmap`` (True) or loop over them (False).
        num_threads: torch intra-op threads during the call (restored afterwards). Default:
            one thread when the model is small (sampled parameters × batch size below
            :data:`SMALL_MODEL_WORK`), where thread hand-offs cost more than they save
            (``tools/bench_threads.py``), else torch's setting.
        progress: show a tqdm progress bar.

    Returns:
        An :class:`LLCResult`. Arrays of samples are shaped (chain, draw).

    Raises:
        ValueError / TypeError: bad arguments, named with what to do instead.
        AllChainsDivergedError: every chain diverged (use a smaller step size).
    """
    t_start = time.perf_counter()
    params = sampled_parameters(model, weights)
    for name, value, low in (("num_chains", num_chains, 1), ("num_draws", num_draws, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if num_burnin is not None and (not isinstance(num_burnin, int) or num_burnin < 0):
        raise ValueError(f"num_burnin must be an integer >= 0 or None, got {num_burnin!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if (loss_fn is None) == (batch_loss is None):
        raise TypeError("pass exactly one of loss_fn(outputs, targets) or "
                        "batch_loss(forward, batch)")
    if sampler not in sampling.SAMPLERS:
        raise ValueError(f"sampler must be one of {sampling.SAMPLERS}, got {sampler!r}")
    if step_size != "auto" and not (isinstance(step_size, (int, float))
                                    and 0 < step_size < math.inf):
        raise ValueError(f"step_size must be a positive finite float or 'auto', got "
                         f"{step_size!r}")
    if localization is not None and not 0 <= localization < math.inf:
        raise ValueError(f"localization must be a finite float >= 0, got {localization}")
    if nbeta is not None and not 0 < nbeta < math.inf:
        raise ValueError(f"nbeta must be a finite float > 0, got {nbeta}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be an integer >= 1 or None, got {num_threads!r}")
    if chain_chunk_size is not None and chain_chunk_size < 1:
        raise ValueError(f"chain_chunk_size must be >= 1, got {chain_chunk_size}")

    dev = torch.device(device) if device is not None else next(iter(params.values())).device
    # Half-precision weights cannot hold a Langevin step (w + ε·drift rounds back to w, and
    # λ̂ reads ~0): sample in float32 master weights, with data cast to match.
    model_dtype = next(iter(params.values())).dtype
    work = torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else None
    source = _batch_source(data, batch_size, dev, num_samples, work)
    n = source.n
    if nbeta is None:
        if n is None:
            raise ValueError("cannot infer n for nbeta = n/log n from an IterableDataset; pass "
                             "num_samples=n or nbeta=...")
        if n < 2:
            raise ValueError(f"need at least 2 samples for the default nbeta = n/log n, got {n}")
        nbeta = n / math.log(n)
    gamma = DEFAULT_LOCALIZATION if localization is None else float(localization)
    burnin = num_draws // 2 if num_burnin is None else num_burnin

    named = dict(model.named_parameters())
    anchor = {k: _to_device(v.detach(), dev, work).clone() for k, v in params.items()}
    consts = {k: _to_device(v.detach(), dev, work) for k, v in named.items() if k not in params}
    consts.update({k: _to_device(v.detach(), dev, work) for k, v in model.named_buffers()})
    prob = _Problem(model, anchor, consts, loss_fn, batch_loss, source, dev)

    modes = [(m, m.training) for m in model.modules()]
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    threads = torch.get_num_threads()
    if num_threads is None and dev.type == "cpu" and (
            sum(p.numel() for p in params.values()) * batch_size < SMALL_MODEL_WORK):
        num_threads = 1
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        model.eval()
        with torch.random.fork_rng(devices=cuda):
            _check_loss(prob, seed)
            notes: list[str] = []
            if vectorize and num_chains > 1:
                vectorize = _vmap_works(prob, seed, notes)
            if isinstance(source, _TensorBatches) and loss_fn is not None and (
                source.n <= 2 * num_draws * source.batch_size * math.ceil(
                    num_chains / (chain_chunk_size or num_chains))
            ):
                # One pass over the data at w* costs less than a baseline forward per draw.
                prob.baseline_cache = source.per_sample_losses(prob.outputs_at_anchor, loss_fn)
            if step_size == "auto":
                eps, calib = _calibrate(prob, seed=seed, nbeta=nbeta, localization=gamma,
                                        sampler=sampler, vectorize=vectorize,
                                        pilot_steps=max(16, min(48, (burnin + num_draws) // 16)),
                                        num_pilot=min(2, num_chains))
            else:
                eps, calib = float(step_size), {}
            t_cal = time.perf_counter() - t_start
            chains = list(range(first_chain, first_chain + num_chains))
            chunk = chain_chunk_size or num_chains
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=num_chains * (burnin + num_draws), desc="LLC", unit="step",
                           leave=False)
            runs = [
                _run_chains(prob, chains[i : i + chunk], seed=seed, step_size=eps, nbeta=nbeta,
                            localization=gamma, sampler=sampler, num_burnin=burnin,
                            num_draws=num_draws, vectorize=vectorize, progress=bar)
                for i in range(0, num_chains, chunk)
            ]
            if bar is not None:
                bar.close()
    finally:
        for m, was_training in modes:
            m.training = was_training
        torch.set_num_threads(threads)

    loss = np.concatenate([r.loss for r in runs])
    baseline = runs[0].baseline
    settings = {
        "nbeta": float(nbeta), "step_size": float(eps), "localization": gamma,
        "num_chains": num_chains, "num_draws": num_draws, "num_burnin": burnin,
        "batch_size": getattr(source, "batch_size", batch_size), "sampler": sampler,
        "seed": seed, "num_samples": n, "step_size_auto": step_size == "auto",
        "vectorize": vectorize, "model_dtype": str(model_dtype).removeprefix("torch."),
        "sample_dtype": str(work or model_dtype).removeprefix("torch."),
        "num_threads": num_threads or threads,
        "weights": None if weights is None else list(weights),
        "num_sampled_params": sum(p.numel() for p in params.values()),
    }
    extra = dict(calib)
    extra["divergences"] = [d for r in runs for d in r.divergences]
    extra["calibration_s"] = t_cal if step_size == "auto" else 0.0
    extra["elapsed_s"] = time.perf_counter() - t_start
    result = _summarize(
        nbeta * (loss - baseline[None, :]), loss, baseline,
        np.concatenate([r.accept for r in runs]),
        np.concatenate([r.diverged for r in runs]), settings, extra,
    )
    result.warnings[:0] = notes
    return result


def check_weights(weights: Sequence[str]) -> None:
    """Raise unless ``weights`` is a non-empty list of parameter names / fnmatch patterns."""
    if isinstance(weights, str) or not all(isinstance(w, str) for w in weights):
        raise TypeError(f"weights must be a list of parameter names or fnmatch patterns, got "
                        f"{weights!r}")
    if not weights:
        raise ValueError("weights=[] names no parameter; leave weights unset to sample all "
                         "trainable parameters")


def parameter_aliases(model: nn.Module) -> dict[str, str]:
    """Every name a parameter is registered under -> its canonical name (the one
    ``named_parameters()`` lists). A tied tensor has several names and one canonical name."""
    canonical: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = canonical.setdefault(id(p), name)
    return out


def sampled_parameters(model: nn.Module, weights: Sequence[str] | None
                        ) -> dict[str, nn.Parameter]:
    """The parameters SGLD moves, by canonical name: those matching ``weights`` (a pattern may
    name any alias of a tied tensor), else the trainable ones. A tied tensor counts once."""
    named = dict(model.named_parameters())
    if weights is None:
        params = {n: p for n, p in named.items() if p.requires_grad}
        if not params:
            raise ValueError("model has no trainable parameters (requires_grad=True); unfreeze "
                             "the weights whose λ̂ you want, or name them with weights=[...]")
        return params
    check_weights(weights)
    aliases = parameter_aliases(model)
    unmatched = [w for w in weights if not any(fnmatch.fnmatchcase(n, w) for n in aliases)]
    if unmatched:
        shown = ", ".join(list(named)[:12]) + (", ..." if len(named) > 12 else "")
        raise ValueError(f"weights {unmatched} match no parameter of "
                         f"{type(model).__name__}; its parameters are: {shown}")
    chosen = {c for n, c in aliases.items() if any(fnmatch.fnmatchcase(n, w) for w in weights)}
    return {n: p for n, p in named.items() if n in chosen}


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"


def _vmap_works(prob: _Problem, seed: int, notes: list[str]) -> bool:
    """Whether ``torch.func.vmap`` can batch the loss's gradient over chains.

    Models with data-dependent control flow, ``.item()``, in-place writes into preallocated
    tensors or ops without a batching rule cannot be vmapped; their chains then run one at a
    time (the same numbers, slower), said once in ``notes``. If one chain cannot be
    differentiated either, the error names the model, both attempts and the fixes.
    """
    batch = next(prob.source.iterate(seed))
    stacked = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in prob.anchor.items()}
    try:
        vmap(grad_and_value(prob.loss), in_dims=(0, None))(stacked, batch)
        return True
    except Exception as vmap_error:  # noqa: BLE001 - any failure: try one chain at a time
        try:
            grad_and_value(prob.loss)(prob.anchor, batch)
        except Exception as seq_error:  # noqa: BLE001
            raise RuntimeError(
                f"cannot differentiate the loss of {type(prob.model).__name__} with respect to "
                f"its weights, neither vectorized over chains ({_first_line(vmap_error)}) nor "
                f"one chain at a time ({_first_line(seq_error)}); the loss must be a "
                "differentiable function of the weights (no .detach(), .item() or numpy on "
                "the path, no optimizer step); pass loss_fn= or batch_loss= that computes it"
            ) from seq_error
        message = (f"torch.func.vmap cannot batch {type(prob.model).__name__} over chains "
                   f"({_first_line(vmap_error)}); its chains ran one at a time (same numbers, "
                   "slower); pass vectorize=False to skip this check")
        warnings.warn(message, stacklevel=3)
        notes.append(message)
        return False


def _check_loss(prob: _Problem, seed: int) -> None:
    """Fail early, with a clear message, on a loss that is not a finite scalar at w*."""
    batch = next(prob.source.iterate(seed))
    with torch.no_grad():
        value = prob.loss(prob.anchor, batch)
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"loss_fn must return a scalar mean loss of the batch, got {shape}; reduce it "
            "(e.g. reduction='mean')"
        )
    if not torch.isfinite(value):
        raise NonFiniteLossError(f"the loss at w* is not finite ({value.item()}); estimate λ̂ only at a "
                         "checkpoint whose loss is finite")
