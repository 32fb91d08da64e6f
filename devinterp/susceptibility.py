"""Susceptibilities (Baker et al. 2025, arXiv 2504.18274): how a component's posterior responds
to shifting the data toward a probe distribution.

For a component C (a set of parameters), SGLD samples the posterior restricted to C: C's
weights move, every other weight stays at w* (the weight-refined posterior of
``estimate_llc(weights=...)``), p_C(w) ∝ exp(−nβ·L(w) − (γ/2)·‖w_C − w*_C‖²). Shifting the
data distribution from the training data toward probe q by h changes L by h·(ℓ_q − L), and
the posterior mean of the component's observable φ_C = L by

    d E_C[L] / dh = −nβ · Cov_C(L, ℓ_q − L).

The susceptibility reported is that response per unit nβ,

    χ(C, q) = −Cov_C(L(w), ℓ_q(w) − L(w)) = Var_C(L) − Cov_C(L, ℓ_q),

so d E_C[L]/dh = nβ·χ: positive χ, shifting the data toward q raises the loss the component's
posterior settles at; negative, it lowers it. L is the mean loss of a fixed subsample of the
training data and ℓ_q the mean loss of the probe's samples, both evaluated at every draw (no
minibatch noise in either). The peer library centres the same products with expectations of
the unrestricted posterior; here both moments are the restricted posterior's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from devinterp.components import Restriction, resolve_components
from devinterp.config import SamplerConfig
from devinterp.influence import DEFAULT_NUM_TRAIN, subsample
from devinterp.llc import estimate_refined_llc
from devinterp.llc.data import LossFn
from devinterp.llc.observables import (
    DEFAULT_PROBE_CHUNK,
    ProbeLosses,
    ProbeSets,
    probe_chunks,
    probe_count,
)
from devinterp.llc.problem import BatchLoss

__all__ = ["estimate_susceptibilities"]

COLUMNS = ["component", "probe", "susceptibility", "se"]


def estimate_susceptibilities(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    components: Mapping[str, Restriction] | Sequence[str] | str,
    probes: Mapping[str, Any],
    batch_loss: BatchLoss | None = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    probe_chunk_size: int = DEFAULT_PROBE_CHUNK,
    **options: Any,
) -> pd.DataFrame:
    """χ(component, probe) for every component and probe, from the restricted-posterior SGLD
    chains of all components run as one computation (see :mod:`devinterp.susceptibility` for
    the definition and sign).

    The chains are :func:`devinterp.estimate_refined_llc`'s: every component's chains iterate
    the same minibatches and share the paired baseline, the chains of components over the same
    parameters are batched together (``grouping``), and one probe-loss recorder evaluates L
    and every probe at every chain's draw; a component's numbers are those of a run of it
    alone (the same seed gives the same draws).

    Args:
        model, data, loss_fn, batch_loss: as for :func:`devinterp.estimate_llc`.
        components: as :func:`devinterp.estimate_refined_llc` takes them: name ->
            parameter names / ``fnmatch`` patterns (e.g. ``{"layer 0": ["0.*"]}``) or
            ``{parameter: bool mask}``, or a shorthand (``"heads"``, ``"layers"``,
            ``"mlps"``); or a list of patterns, each its own component named by itself.
        probes: name -> probe samples: ``(inputs, targets)`` tensors, a Dataset or a
            DataLoader (read in order).
        num_train: size of the fixed subsample of ``data`` whose mean loss is L (drawn from
            ``seed``; all of ``data`` when it has fewer).
        probe_chunk_size: samples per forward pass.
        **options: estimate_refined_llc's options (num_chains — per component —, num_draws,
            step_size, nbeta, grouping, ...); not ``weights`` (the components choose them).

    Returns:
        A DataFrame with columns ``component``, ``probe``, ``susceptibility``, ``se`` (the
        spread of the per-chain values / √chains); ``.attrs["llc"]`` maps each component to
        the :class:`~devinterp.llc.LLCResult` of its draws.
    """
    if "weights" in options or "recorders" in options:
        raise TypeError("estimate_susceptibilities sets weights= per component and its own "
                        "recorders; pass components={name: [parameter patterns]} instead")
    named = resolve_components(model, _components(components))
    if not isinstance(probes, Mapping) or not probes:
        raise ValueError("probes must be a non-empty mapping name -> probe samples, e.g. "
                         "{'digits': (x, y)}")
    train, _ = subsample(data, num_train, int(options.get("seed", 0)))
    parts = [train, *probes.values()]
    sizes = [probe_count(probe_chunks(p, probe_chunk_size)) for p in parts]
    reduce = torch.zeros(sum(sizes), len(parts), dtype=torch.float64)
    start = 0
    for j, size in enumerate(sizes):
        reduce[start : start + size, j] = 1.0 / size
        start += size
    num_chains = int(options.get("num_chains") or SamplerConfig().num_chains)
    rec = ProbeLosses(ProbeSets(tuple(parts)), len(named) * num_chains, rows=[0],
                      cols=range(len(parts)), chunk_size=probe_chunk_size, reduce=reduce)
    llcs = estimate_refined_llc(model, data, loss_fn, components=named,
                                batch_loss=batch_loss, recorders=[rec], **options)
    rows = []
    for k, (name, llc) in enumerate(llcs.items()):
        keep = np.zeros(len(named) * num_chains, bool)
        keep[k * num_chains : (k + 1) * num_chains] = ~np.isnan(llc.llc_per_chain)
        chi, se = _susceptibility(rec, keep)
        rows += [{"component": name, "probe": probe, "susceptibility": float(chi[j]),
                  "se": float(se[j])} for j, probe in enumerate(probes)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["llc"] = llcs
    return frame


def _susceptibility(rec: ProbeLosses, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """χ_q = Var(L) − Cov(L, ℓ_q) for each probe q (observable 0 is L), pooled over the
    chains ``keep``, and the standard error from the per-chain values."""
    cov, _ = rec.covariance(keep)  # (1, 1 + probes): Cov(L, L), Cov(L, ℓ_q)
    chi = cov[0, 0] - cov[0, 1:]
    _, _, per = rec.moments.per_chain()
    good = keep & (rec.moments.count.cpu().numpy() > 1)
    per_chi = (per[:, 0, :1] - per[:, 0, 1:]).cpu().numpy()[good]
    se = (per_chi.std(0, ddof=1) / np.sqrt(len(per_chi)) if len(per_chi) > 1
          else np.full(chi.shape, np.nan))
    return chi, se


def _components(components: Any) -> Mapping[str, Restriction] | str:
    """Components as estimate_refined_llc takes them: a list of patterns becomes one
    component per pattern, named by it; a single pattern in a mapping, a list of one."""
    if isinstance(components, str):
        return components
    if isinstance(components, Mapping):
        return {k: [v] if isinstance(v, str) else v for k, v in components.items()}
    if isinstance(components, Sequence):
        return {str(p): [p] for p in components}
    raise TypeError("components must be a mapping name -> parameter patterns or masks, a list "
                    f"of patterns or one of 'heads', 'layers', 'mlps'; got "
                    f"{type(components).__name__}")
