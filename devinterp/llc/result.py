"""The outcome of an estimate: :class:`LLCResult`, built from per-chain arrays by
:func:`summarize` (also used to merge DDP shards with :func:`merge_results`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devinterp.diagnostics import ess, split_rhat
from devinterp.health import TARGET_REL_SE, warnings_for
from devinterp.llc.errors import AllChainsDivergedError

__all__ = ["LLCResult", "merge_results", "summarize"]


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


def summarize(llc_trace: np.ndarray, loss_trace: np.ndarray, baseline: np.ndarray,
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
    return summarize(
        np.concatenate([r.llc_trace for r in results]),
        np.concatenate([r.loss_trace for r in results]),
        base,
        np.concatenate([r.chain_acceptance for r in results]),
        diverged,
        settings,
        extra,
    )
