"""Bayesian influence functions (BIF; Kreer et al. 2025, arXiv 2509.26544) from the same SGLD
draws as λ̂.

The posterior is the localized, tempered posterior at w* that :func:`devinterp.estimate_llc`
samples, p(w) ∝ exp(−nβ·L_n(w) − (γ/2)·‖w − w*‖²). The influence of training sample i on
query sample j is the posterior covariance of their per-sample losses,

    influence[i, j] = Cov_w(ℓ_i(w), ℓ_j(w)),

estimated from all draws of all chains that did not diverge (one pooled sample covariance,
ddof=1). Sign: positive when the two losses move together, i.e. when giving sample i more
weight lowers the query loss: upweighting ℓ_i by ε in L_n changes E_w[ℓ_j] by
−ε·β·influence[i, j] to first order (β = nβ/n). Kreer et al.'s BIF is the negative of this
(the change of the query loss rather than its decrease); multiply by −β to get it in their
units. ``kind="correlation"`` divides by both losses' posterior standard deviations (their
normalized BIF), which puts samples whose losses vary by different amounts on one scale.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from devinterp.config import SamplerConfig
from devinterp.llc import estimate_llc
from devinterp.llc.data import LossFn
from devinterp.llc.observables import DEFAULT_PROBE_CHUNK, ProbeLosses, probe_chunks
from devinterp.llc.problem import BatchLoss, first_line
from devinterp.llc.result import LLCResult

__all__ = ["DEFAULT_NUM_TRAIN", "BIFResult", "ProbeInfluence", "estimate_bif", "influence_rows"]

#: Training samples drawn from ``data`` when ``train`` is not given.
DEFAULT_NUM_TRAIN = 512


@dataclass
class BIFResult:
    """The outcome of :func:`estimate_bif`.

    Attributes:
        influence: (len(train), len(query)) posterior covariance (or correlation) of the
            per-sample losses; row i is training sample i, column j query sample j.
        influence_se: its standard error, the spread of the per-chain estimates / √chains
            (NaN with one chain).
        llc: the :class:`~devinterp.llc.LLCResult` of the same draws.
        kind: ``"covariance"`` or ``"correlation"``.
        train_indices: the rows' indices into ``data`` when the training samples were drawn
            from it (``train=None``), else None.
        train_loss: posterior mean loss of each training sample, (len(train),).
        notes: remarks on how the probe losses were computed.
    """

    influence: np.ndarray
    influence_se: np.ndarray
    llc: LLCResult
    kind: str
    train_indices: np.ndarray | None = None
    train_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    notes: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (train, query) pair with columns ``train``, ``query``
        (positions in the train and query sets), ``train_index`` (index into ``data``, when
        the training samples were drawn from it), ``influence`` and ``se``."""
        t, q = self.influence.shape
        train = np.repeat(np.arange(t), q)
        frame = pd.DataFrame({"train": train, "query": np.tile(np.arange(q), t)})
        if self.train_indices is not None:
            frame["train_index"] = self.train_indices[train]
        frame["influence"] = self.influence.reshape(-1)
        frame["se"] = self.influence_se.reshape(-1)
        return frame

    def top(self, query: int, k: int = 10) -> pd.DataFrame:
        """The ``k`` most influential training samples of query sample ``query``."""
        frame = self.to_frame()
        return frame[frame["query"] == query].nlargest(k, "influence").reset_index(drop=True)


_LLC_OPTIONS = set(inspect.signature(estimate_llc).parameters) - {
    "model", "data", "loss_fn", "batch_loss", "recorders"}


def estimate_bif(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    query: Dataset | DataLoader | tuple[Tensor, Tensor],
    train: Dataset | DataLoader | tuple[Tensor, Tensor] | None = None,
    batch_loss: BatchLoss | None = None,
    kind: Literal["covariance", "correlation"] = "covariance",
    num_train: int = DEFAULT_NUM_TRAIN,
    probe_chunk_size: int = DEFAULT_PROBE_CHUNK,
    **options: Any,
) -> BIFResult:
    """The Bayesian influence of training samples on query samples at the model's weights w*.

    SGLD samples the localized tempered posterior at w* exactly as :func:`estimate_llc` does
    (same options, same draws: ``.llc`` is that estimate); at every draw the per-sample losses
    of ``train`` and ``query`` are evaluated at every chain's weights, and their posterior
    covariance is accumulated online (memory independent of the number of draws). See
    :mod:`devinterp.influence` for the sign convention and normalization.

    Args:
        model, data, loss_fn, batch_loss: as for :func:`estimate_llc` (the posterior's data
            and loss). A per-sample loss is that loss applied to one sample.
        query: the samples whose loss is explained: ``(inputs, targets)`` tensors, a Dataset
            or a DataLoader (read in order).
        train: the training samples whose influence is measured; default ``num_train``
            samples of ``data`` drawn without replacement from ``seed`` (all of them when
            ``data`` has fewer), their indices in ``.train_indices``. Pass ``train=query``
            for a symmetric influence matrix.
        kind: ``"covariance"`` (default) or ``"correlation"``.
        num_train: how many training samples to draw from ``data`` when ``train`` is None.
        probe_chunk_size: probe samples per forward pass (memory: chains × this many).
        **options: any option of :func:`estimate_llc` (num_chains, num_draws, step_size,
            nbeta, localization, sampler, seed, ...).

    Returns:
        A :class:`BIFResult`; ``.influence`` is (len(train), len(query)).
    """
    unknown = sorted(set(options) - _LLC_OPTIONS)
    if unknown:
        raise TypeError(f"estimate_bif got unknown options {unknown}; it takes "
                        f"estimate_llc's options: {sorted(_LLC_OPTIONS)}")
    if kind not in ("covariance", "correlation"):
        raise ValueError(f"kind must be 'covariance' or 'correlation', got {kind!r}")
    indices = None
    if train is None:
        train, indices = subsample(data, num_train, int(options.get("seed", 0)))
    num_chains = int(options.get("num_chains") or SamplerConfig().num_chains)
    first_chain = int(options.get("first_chain", 0))
    recorder = ProbeLosses(train, num_chains, query=None if train is query else query,
                           chunk_size=probe_chunk_size, first_chain=first_chain)
    llc = estimate_llc(model, data, loss_fn, batch_loss=batch_loss, recorders=[recorder],
                       **options)
    keep = ~np.isnan(llc.llc_per_chain)
    influence, se = recorder.covariance(keep, kind)
    train_loss = recorder.mean(keep)
    return BIFResult(influence=influence, influence_se=se, llc=llc, kind=kind,
                     train_indices=indices, train_loss=train_loss, notes=list(recorder.notes))


def subsample(data: Any, size: int, seed: int) -> tuple[Any, np.ndarray]:
    """``size`` samples of ``data`` drawn without replacement from ``seed`` (all of them when
    it has fewer), in data order and in the form ``data`` came in, and their indices."""
    if size < 1:
        raise ValueError(f"num_train must be at least 1, got {size}")
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = tuple(data.tensors)
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, IterableDataset):
        raise ValueError("cannot draw training samples from an IterableDataset; pass train= "
                         "(the samples whose influence to measure)")
    n = len(data[0]) if isinstance(data, (tuple, list)) else len(dataset)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(size, n)].sort().values
    if isinstance(data, (tuple, list)):
        return (data[0][idx], data[1][idx]), idx.numpy()
    subset = Subset(dataset, idx.tolist())
    if isinstance(data, DataLoader):
        return DataLoader(subset, batch_size=data.batch_size or 1,
                          collate_fn=data.collate_fn), idx.numpy()
    return subset, idx.numpy()


def influence_rows(result: BIFResult) -> pd.DataFrame:
    """The long rows of a :class:`BIFResult` as the run store keeps them: ``train_index``
    (the training sample's index into the data, or its position in ``train``),
    ``query_index`` (the probe's position), ``influence``, ``se``."""
    frame = result.to_frame()
    train = frame["train_index"] if "train_index" in frame.columns else frame["train"]
    return pd.DataFrame({"train_index": train.to_numpy(), "query_index": frame["query"],
                         "influence": frame["influence"], "se": frame["se"]})


class _Guarded:
    """A recorder that never fails the estimate it rides on: the first error of ``inner``
    (binding or a draw) is kept in ``error`` and the recorder goes quiet, so λ̂ of the same
    draws is still estimated."""

    def __init__(self, inner: ProbeLosses) -> None:
        self.inner = inner
        self.error: str | None = None

    def _fail(self, e: Exception) -> None:
        self.error = f"{type(e).__name__}: {first_line(e)}"

    def bind(self, problem: Any) -> None:
        try:
            self.inner.bind(problem)
        except Exception as e:  # noqa: BLE001 - influence must not take λ̂ down with it
            self._fail(e)

    def on_draw(self, *args: Any) -> None:
        if self.error is None:
            try:
                self.inner.on_draw(*args)
            except Exception as e:  # noqa: BLE001
                self._fail(e)


class ProbeInfluence:
    """The BIF of a fixed probe set, at checkpoint after checkpoint, from the draws of each
    checkpoint's λ̂ estimate (one estimate, not two): what ``LLCCallback(probes=...)`` records.

    The training samples are the same at every checkpoint: ``num_train`` samples of the data
    drawn from ``seed`` (all of them when the data has fewer), so influence can be followed
    over training. Per checkpoint: :meth:`recorder` goes into ``estimate_llc(recorders=[...])``
    (or the callback's estimator), then :meth:`result` gives the :class:`BIFResult` of those
    draws. A recorder that fails (a loss that cannot be applied to one sample) leaves λ̂ alone;
    :meth:`result` then raises with its reason.

    Args:
        probes: the query samples: ``(inputs, targets)`` tensors, a Dataset or a DataLoader
            (read in order), as :func:`estimate_bif`'s ``query``. Checked here.
        num_train: training samples whose influence is recorded.
        kind: ``"covariance"`` or ``"correlation"``.
        probe_chunk_size: probe samples per forward pass.
    """

    def __init__(self, probes: Any, *, num_train: int = DEFAULT_NUM_TRAIN,
                 kind: Literal["covariance", "correlation"] = "covariance",
                 probe_chunk_size: int = DEFAULT_PROBE_CHUNK) -> None:
        if kind not in ("covariance", "correlation"):
            raise ValueError(f"kind must be 'covariance' or 'correlation', got {kind!r}")
        if num_train < 1:
            raise ValueError(f"num_train must be at least 1, got {num_train}")
        probe_chunks(probes, probe_chunk_size)  # a bad probe set fails now, not at a checkpoint
        self.probes, self.num_train, self.kind = probes, num_train, kind
        self.probe_chunk_size = probe_chunk_size
        self.train: Any = None
        self.train_indices: np.ndarray | None = None

    def recorder(self, data: Any, *, num_chains: int, first_chain: int = 0,
                 seed: int = 0) -> _Guarded:
        """A recorder of the probe and training losses for one estimate on chains
        ``[first_chain, first_chain + num_chains)``; the training samples are drawn from
        ``data`` the first time (and kept)."""
        if self.train is None:
            self.train, self.train_indices = subsample(data, self.num_train, seed)
        return _Guarded(ProbeLosses(self.train, num_chains, query=self.probes,
                                    chunk_size=self.probe_chunk_size, first_chain=first_chain))

    def result(self, recorder: _Guarded, llc: LLCResult) -> BIFResult:
        """The :class:`BIFResult` of the draws ``recorder`` saw, whose λ̂ is ``llc``.

        Raises:
            RuntimeError: the recorder failed (its reason), or no chain has two draws.
        """
        if recorder.error is not None:
            raise RuntimeError(recorder.error)
        keep = ~np.isnan(llc.llc_per_chain)
        try:
            influence, se = recorder.inner.covariance(keep, self.kind)
        except ValueError as e:
            raise RuntimeError(first_line(e)) from e
        return BIFResult(influence=influence, influence_se=se, llc=llc, kind=self.kind,
                         train_indices=self.train_indices, train_loss=recorder.inner.mean(keep),
                         notes=list(recorder.inner.notes))

    def inputs(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The input tensors of the probes and of the training samples, as arrays (None for
        a set whose batches are not ``(inputs, targets)`` tensors); after :meth:`recorder`."""
        return (_inputs(self.probes, self.probe_chunk_size),
                None if self.train is None else _inputs(self.train, self.probe_chunk_size))


def _inputs(samples: Any, chunk_size: int) -> np.ndarray | None:
    """The inputs of a sample set, concatenated: the first tensor of every collated batch."""
    parts = []
    for chunk in probe_chunks(samples, chunk_size):
        head = chunk[0] if isinstance(chunk, (tuple, list)) else None
        if not isinstance(head, Tensor):
            return None
        head = head.detach().cpu()
        parts.append((head.float() if head.is_floating_point() else head).numpy())
    return np.concatenate(parts)
