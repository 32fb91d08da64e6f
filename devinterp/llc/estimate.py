"""``estimate_llc``: validate, build the problem, calibrate, run the chains, summarize."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from devinterp.config import AUTO_ESS, AUTO_RHAT, SamplerConfig
from devinterp.diagnostics import ess, split_rhat
from devinterp.llc import calibration, driver
from devinterp.llc.data import LossFn, TensorBatches, batch_source, to_device
from devinterp.llc.problem import (
    BatchLoss,
    Problem,
    check_loss,
    sampled_parameters,
    vmap_works,
)
from devinterp.llc.result import LLCResult, summarize
from devinterp.samplers import get_kernel

__all__ = ["DEFAULT_LOCALIZATION", "SMALL_MODEL_WORK", "calibrate_step_size", "estimate_llc"]

_DEFAULT = SamplerConfig()
DEFAULT_LOCALIZATION = _DEFAULT.localization
#: Below this many sampled parameters × batch size, estimate_llc runs on one CPU thread by
#: default: per-op work is too small to split (``python tools/bench_threads.py``).
SMALL_MODEL_WORK = 2**26


# The signature and docstring are the public contract (every option with its meaning); the
# body is a few lines over the others because it is the one place that sequences the steps.
def estimate_llc(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    batch_loss: BatchLoss | None = None,
    num_chains: int = _DEFAULT.num_chains,
    num_draws: int | Literal["auto"] = _DEFAULT.num_draws,
    num_burnin: int | None = _DEFAULT.num_burnin,
    batch_size: int = _DEFAULT.batch_size,
    step_size: float | Literal["auto"] = _DEFAULT.step_size,
    localization: float | None = _DEFAULT.localization,
    nbeta: float | None = _DEFAULT.nbeta,
    sampler: Literal["sgld", "rmsprop_sgld"] = _DEFAULT.sampler,
    seed: int = _DEFAULT.seed,
    weights: Sequence[str] | None = _DEFAULT.weights,
    device: str | torch.device | None = None,
    num_samples: int | None = _DEFAULT.num_samples,
    first_chain: int = 0,
    chain_chunk_size: int | None = _DEFAULT.chain_chunk_size,
    vectorize: bool = _DEFAULT.vectorize,
    num_threads: int | None = _DEFAULT.num_threads,
    max_draws: int = _DEFAULT.max_draws,
    progress: bool = False,
    recorders: Sequence[driver.Recorder] = (),
) -> LLCResult:
    """Estimate the local learning coefficient λ̂ of ``model`` at its current weights w*.

    λ̂ = nβ·(E[L_B(w)] − L_B(w*)) with w drawn by SGLD from
    p(w) ∝ exp(−nβ·L(w) − (γ/2)·‖w − w*‖²); the baseline L_B(w*) is paired with every draw's
    minibatch (see :mod:`devinterp.llc` for why).

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
        num_draws: recorded draws per chain, after burn-in; or ``"auto"``: the same chains
            extended in rounds (200 draws, then doubling the total) until split R-hat <= 1.05
            and the ESS >= 400, or ``max_draws`` is reached; ``settings["num_draws"]`` is the
            number drawn, ``diagnostics["draws_converged"]`` (1/0) and
            ``diagnostics["draw_rounds"]`` (draws, R-hat, ESS of each round) say which.
        num_burnin: steps discarded at the start of each chain (they start at w* and would bias
            λ̂ low). Default: ``num_draws // 2`` (auto: 100). The start w* itself is never a
            draw.
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
            (``tools/bench_threads.py``), unless ``OMP_NUM_THREADS`` is set (``--threads`` of
            every command sets it); else torch's setting.
        max_draws: the budget of ``num_draws="auto"``: at most this many draws per chain.
        progress: show a tqdm progress bar.
        recorders: per-draw observables (advanced): objects with ``on_draw(draw, chains,
            position, losses, baseline, batch)``, called at every recorded draw of every chunk
            of chains, and optionally ``bind(problem)``, called once before sampling (see
            :class:`devinterp.llc.driver.Recorder`). Pilot chains of the automatic step are not
            shown to them.

    Returns:
        An :class:`LLCResult`. Arrays of samples are shaped (chain, draw).

    Raises:
        ValueError / TypeError: bad arguments, named with what to do instead.
        AllChainsDivergedError: every chain diverged (use a smaller step size).
    """
    t_start = time.perf_counter()
    cfg = SamplerConfig.from_options({
        "num_chains": num_chains, "num_draws": num_draws, "num_burnin": num_burnin,
        "batch_size": batch_size, "step_size": step_size, "localization": localization,
        "nbeta": nbeta, "sampler": sampler, "seed": seed, "num_samples": num_samples,
        "chain_chunk_size": chain_chunk_size, "vectorize": vectorize,
        "num_threads": num_threads, "weights": weights, "max_draws": max_draws})
    with _prepared(model, data, loss_fn, batch_loss, cfg, device) as (
            prob, params, meta, nbeta, vectorize, notes, use_threads, threads):
        eps, calib = _step_size(prob, cfg, nbeta, vectorize)
        t_cal = time.perf_counter() - t_start
        for recorder in recorders:
            if hasattr(recorder, "bind"):
                recorder.bind(prob)
        runs, rounds = _run_all(prob, cfg, nbeta, eps, vectorize, first_chain, progress,
                                recorders)

    loss = np.concatenate([r.loss for r in runs])
    baseline = runs[0].baseline
    settings = {
        "nbeta": nbeta, "step_size": float(eps), "localization": float(cfg.localization),
        "num_chains": cfg.num_chains, "num_draws": int(loss.shape[1]),
        "num_burnin": cfg.burnin,
        "batch_size": getattr(prob.source, "batch_size", cfg.batch_size),
        "sampler": cfg.sampler, "seed": cfg.seed, "num_samples": prob.source.n,
        "step_size_auto": cfg.step_size == "auto", "vectorize": vectorize, **meta,
        "num_threads": use_threads or threads,
        "weights": None if cfg.weights is None else list(cfg.weights),
        "num_sampled_params": sum(p.numel() for p in params.values()),
    }
    extra = dict(calib)
    if cfg.auto_draws:
        extra.update(draw_rounds=rounds, draws_converged=int(_converged(rounds[-1])),
                     max_draws=cfg.max_draws)
        settings["num_draws_requested"] = "auto"
    extra["divergences"] = [d for r in runs for d in r.divergences]
    extra["calibration_s"] = t_cal if cfg.step_size == "auto" else 0.0
    extra["elapsed_s"] = time.perf_counter() - t_start
    result = summarize(nbeta * (loss - baseline[None, :]), loss, baseline,
                       np.concatenate([r.accept for r in runs]),
                       np.concatenate([r.diverged for r in runs]), settings, extra)
    result.warnings[:0] = notes
    return result


def calibrate_step_size(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    batch_loss: BatchLoss | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The step ``estimate_llc(..., step_size="auto")`` would choose at these weights, without
    running the chains: what run-level calibration (one ε for every checkpoint of a run) calls.

    ``options`` are :func:`estimate_llc`'s sampler options (``step_size`` must stay ``"auto"``).
    Returns ``step_size``, ``nbeta``, ``near_minimum`` (the pilot chains rarely fall below the
    paired baseline: w* is near a local minimum, not on a slope), ``calibration_s`` and the
    calibration's details (rounds, top curvature).
    """
    t_start = time.perf_counter()
    cfg = SamplerConfig.from_options(options)
    if cfg.step_size != "auto":
        raise ValueError(f"calibrate_step_size chooses the step; got step_size="
                         f"{cfg.step_size!r}: leave it unset")
    with _prepared(model, data, loss_fn, batch_loss, cfg, device) as (
            prob, _, _, nbeta, vectorize, _, _, _):
        eps, calib = _step_size(prob, cfg, nbeta, vectorize)
    return {"step_size": float(eps), "nbeta": nbeta, **calib,
            "calibration_s": time.perf_counter() - t_start}


@contextlib.contextmanager
def _prepared(model: nn.Module, data: Any, loss_fn: LossFn | None, batch_loss: BatchLoss | None,
              cfg: SamplerConfig, device: str | torch.device | None) -> Iterator[tuple]:
    """Everything an estimate needs before its chains: the problem (checked), nβ, whether
    chains vectorize, the thread policy; sampling runs inside :func:`sampling`."""
    if (loss_fn is None) == (batch_loss is None):
        raise TypeError("pass exactly one of loss_fn(outputs, targets) or "
                        "batch_loss(forward, batch)")
    params = sampled_parameters(model, cfg.weights)
    prob, meta = _build_problem(model, data, params, loss_fn, batch_loss, cfg, device)
    nbeta = _default_nbeta(prob.source.n) if cfg.nbeta is None else float(cfg.nbeta)
    use_threads = _thread_policy(cfg, params, prob.device)
    notes: list[str] = []
    with sampling(model, prob.device, use_threads) as threads:
        check_loss(prob, cfg.seed)
        vectorize = cfg.vectorize and (cfg.num_chains == 1 or vmap_works(prob, cfg.seed, notes))
        _cache_baseline(prob, cfg, loss_fn)
        yield prob, params, meta, nbeta, vectorize, notes, use_threads, threads


@contextlib.contextmanager
def sampling(model: nn.Module, device: torch.device, num_threads: int | None
             ) -> Iterator[int]:
    """What every estimate runs inside: the model in eval mode, torch at ``num_threads``
    threads (None: as it is), the global random streams forked; all of it restored after.
    Yields the thread count torch had before."""
    modes = [(m, m.training) for m in model.modules()]
    cuda = [device.index or 0] if device.type == "cuda" else []
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        model.eval()
        with torch.random.fork_rng(devices=cuda):
            yield threads
    finally:
        for m, was_training in modes:
            m.training = was_training
        torch.set_num_threads(threads)


def _build_problem(model: nn.Module, data: Any, params: dict[str, nn.Parameter],
                   loss_fn: LossFn | None, batch_loss: BatchLoss | None, cfg: SamplerConfig,
                   device: str | torch.device | None) -> tuple[Problem, dict[str, str]]:
    """The problem at w*, on ``device``; half-precision weights are sampled in float32."""
    dev = torch.device(device) if device is not None else next(iter(params.values())).device
    # Half-precision weights cannot hold a Langevin step (w + ε·drift rounds back to w, and
    # λ̂ reads ~0): sample in float32 master weights, with data cast to match.
    model_dtype = next(iter(params.values())).dtype
    work = torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else None
    source = batch_source(data, cfg.batch_size, dev, cfg.num_samples, work)
    anchor = {k: to_device(v.detach(), dev, work).clone() for k, v in params.items()}
    consts = {k: to_device(v.detach(), dev, work) for k, v in model.named_parameters()
              if k not in params}
    consts.update({k: to_device(v.detach(), dev, work) for k, v in model.named_buffers()})
    meta = {"model_dtype": str(model_dtype).removeprefix("torch."),
            "sample_dtype": str(work or model_dtype).removeprefix("torch.")}
    return Problem(model, anchor, consts, loss_fn, batch_loss, source, dev), meta


def _default_nbeta(n: int | None) -> float:
    """nβ = n / log n (Lau et al.), n the number of samples."""
    if n is None:
        raise ValueError("cannot infer n for nbeta = n/log n from an IterableDataset; pass "
                         "num_samples=n or nbeta=...")
    if n < 2:
        raise ValueError(f"need at least 2 samples for the default nbeta = n/log n, got {n}")
    return n / math.log(n)


def _thread_policy(cfg: SamplerConfig, params: dict[str, nn.Parameter],
                   device: torch.device) -> int | None:
    """The torch threads to use during the call, or None to leave torch's setting."""
    if cfg.num_threads is not None:
        return cfg.num_threads
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None  # an accelerator, or the user chose the process's threads
    work = sum(p.numel() for p in params.values()) * cfg.batch_size
    return 1 if work < SMALL_MODEL_WORK else None


#: Parameter-sized copies one vectorized chain holds at its peak (position, gradient, drift,
#: noise, new position, preconditioner, autograd's batched intermediates), measured by
#: ``tools/bench_memory.py``; activations come on top, hence the safety factor below.
COPIES_PER_CHAIN = 16


def chains_that_fit(prob: Problem, num_chains: int) -> int:
    """How many chains to vectorize at once: all of them, unless their state would take more
    than half the memory free now (CUDA: the device's; CPU: the machine's available RAM)."""
    per_chain = COPIES_PER_CHAIN * sum(v.numel() * v.element_size()
                                       for v in prob.anchor.values())
    free = _free_memory(prob.device)
    if free is None or per_chain == 0:
        return num_chains
    return max(1, min(num_chains, int(0.5 * free // per_chain)))


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now, or None when that cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            return None
    return None


def _cache_baseline(prob: Problem, cfg: SamplerConfig, loss_fn: LossFn | None) -> None:
    """Per-sample losses at w*, when one pass over the data costs less than a baseline
    forward per draw (n/batch forwards against num_draws per chunk of chains: break-even
    measured at about n/batch + 5 = num_draws on the transformers) and the loss is proven to be
    their mean (else a paired forward)."""
    source = prob.source
    chunks = math.ceil(cfg.num_chains / (cfg.chain_chunk_size or cfg.num_chains))
    if isinstance(source, TensorBatches) and loss_fn is not None and (
            source.n <= cfg.first_draws * source.batch_size * chunks):
        prob.baseline_cache = source.per_sample_losses(prob.outputs_at_anchor, loss_fn)


def _step_size(prob: Problem, cfg: SamplerConfig, nbeta: float, vectorize: bool
               ) -> tuple[float, dict]:
    """ε as given, or calibrated (see :mod:`devinterp.llc.calibration`)."""
    if cfg.step_size != "auto":
        return float(cfg.step_size), {}
    return calibration.calibrate(
        prob, seed=cfg.seed, nbeta=nbeta, localization=float(cfg.localization),
        kernel=get_kernel(cfg.sampler), vectorize=vectorize,
        pilot_steps=max(16, min(48, (cfg.burnin + cfg.first_draws) // 16)),
        num_pilot=min(2, cfg.num_chains))


def _run_all(prob: Problem, cfg: SamplerConfig, nbeta: float, eps: float, vectorize: bool,
             first_chain: int, progress: bool, recorders: Sequence[driver.Recorder] = ()
             ) -> tuple[list[driver.ChainRun], list[dict[str, float]]]:
    """Every chain, in chunks of ``chain_chunk_size`` (same numbers as one chunk); with
    ``num_draws="auto"`` in rounds (every chunk's chains stay alive between rounds), and the
    rounds' draws, split R-hat and ESS."""
    chains = list(range(first_chain, first_chain + cfg.num_chains))
    # Sequential chains hold one chain's state at a time; vectorized ones as many as fit.
    chunk = cfg.chain_chunk_size or (chains_that_fit(prob, cfg.num_chains) if vectorize else 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.num_chains * (cfg.burnin + cfg.first_draws), desc="LLC",
                   unit="step", leave=False)

    kw = dict(seed=cfg.seed, kernel=get_kernel(cfg.sampler), step_size=eps, nbeta=nbeta,
              localization=float(cfg.localization), num_burnin=cfg.burnin,
              num_draws=cfg.first_draws, vectorize=vectorize, progress=bar,
              recorders=recorders)
    try:
        if not cfg.auto_draws:  # one chunk alive at a time
            return [driver.run_chains(prob, chains[i : i + chunk], **kw)
                    for i in range(0, cfg.num_chains, chunk)], []
        blocks = [driver.ChainBlock(prob, chains[i : i + chunk], **kw)
                  for i in range(0, cfg.num_chains, chunk)]
        rounds: list[dict[str, float]] = []
        while True:
            for b in blocks:
                b.advance()
            runs = [b.result() for b in blocks]
            rounds.append(_round_summary(runs, nbeta))
            drawn = int(rounds[-1]["num_draws"])
            if _converged(rounds[-1]) or drawn >= cfg.max_draws or not np.isfinite(
                    rounds[-1]["rhat"]):
                return runs, rounds
            more = min(drawn, cfg.max_draws - drawn)
            if bar is not None:
                bar.total += cfg.num_chains * more
            for b in blocks:
                b.extend(more)
    finally:
        if bar is not None:
            bar.close()


def _round_summary(runs: Sequence[driver.ChainRun], nbeta: float) -> dict[str, float]:
    """Draws, split R-hat and ESS of the λ̂ trace of the chains that did not diverge."""
    loss = np.concatenate([r.loss for r in runs])
    ok = ~np.concatenate([r.diverged for r in runs])
    trace = nbeta * (loss[ok] - runs[0].baseline[None, :])
    rhat = split_rhat(trace) if trace.shape[0] > 1 else float("nan")
    return {"num_draws": int(loss.shape[1]), "rhat": float(rhat),
            "ess": float(ess(trace)) if len(trace) else float("nan")}


def _converged(summary: Mapping[str, float]) -> bool:
    """The stopping rule of ``num_draws="auto"``."""
    return bool(summary["rhat"] <= AUTO_RHAT and summary["ess"] >= AUTO_ESS)
