"""Per-sample observables of the SGLD draws: the losses of a fixed probe set at every recorded
draw, for all chains of a chunk at once, accumulated online.

:class:`ProbeLosses` is a recorder for ``estimate_llc(recorders=[...])`` (and
``estimate_refined_llc``). At each draw it evaluates ℓ_i(w) for every probe sample i (the same
loss as λ̂'s, applied to one sample) at the positions of all chains of the chunk — one
vmapped pass over the chains, or on CPUs, where that is slower for a few chains or large
forwards, one forward per chain — and folds them into per-chain running means and a running
cross-covariance between two index sets of the probes (``rows`` × ``cols``, e.g. the training
samples × the query samples of a Bayesian influence function). Draws are buffered in blocks
and merged with Chan et al.'s pairwise update (one matrix product per block), so memory is
O(chains · rows · cols) whatever the number of draws; the (chain, draw, probe) trace is kept
only with ``keep_trace=True``. Nothing waits for the device during sampling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from devinterp.llc.data import to_device
from devinterp.llc.problem import Problem, at_weights, first_line

__all__ = ["DEFAULT_PROBE_CHUNK", "ProbeLosses", "ProbeMoments", "ProbeSets", "probe_chunks",
           "probe_count"]

#: Probe samples evaluated in one forward pass (of one chain, or of all chains of a chunk).
DEFAULT_PROBE_CHUNK = 512
#: Draws buffered per chain before they are merged into the running moments: at least
#: ``_BLOCK``, and up to ``_MAX_BLOCK`` while the buffer stays within the moments' own memory.
#: A merge makes float64 passes over the (rows, cols) co-moment whatever its size (38 ms for
#: 4 chains × 1024 × 1024 probes: 1.2 ms a draw in blocks of 32, 0.6 in blocks of 64, a tenth
#: and a twentieth of those draws' forwards); blocks of 128 raised the peak memory by 30 MB.
_BLOCK = 32
_MAX_BLOCK = 64
#: On CPUs probe forwards loop over the chains of a chunk up to this many chains, or from
#: this many parameters × probe rows per forward on (:meth:`ProbeLosses._batch_chains`).
_LOOP_CHAINS = 4
_LOOP_WORK = 2**20


@dataclass(frozen=True)
class ProbeSets:
    """Several probe sets evaluated as one, in order (probe indices run through them)."""

    parts: tuple[Any, ...]


def probe_chunks(probes: Any, chunk_size: int = DEFAULT_PROBE_CHUNK) -> list[Any]:
    """A fixed probe set as a list of collated chunks, in order: ``(inputs, targets)`` tensors,
    a ``Dataset`` (collated with the default collate) or a ``DataLoader`` (its dataset read in
    order with its ``collate_fn``; never shuffled: probe i must stay probe i)."""
    if chunk_size < 1:
        raise ValueError(f"probe_chunk_size must be at least 1, got {chunk_size}")
    if isinstance(probes, ProbeSets):
        return [c for part in probes.parts for c in probe_chunks(part, chunk_size)]
    if isinstance(probes, TensorDataset) and len(probes.tensors) == 2:
        probes = tuple(probes.tensors)
    if isinstance(probes, (tuple, list)) and len(probes) == 2 and all(
            isinstance(t, Tensor) for t in probes):
        x, y = probes
        if len(x) != len(y):
            raise ValueError(f"probes: inputs have {len(x)} rows but targets have {len(y)}; "
                             "pass tensors with the same first dimension")
        chunks = [(x[i : i + chunk_size], y[i : i + chunk_size])
                  for i in range(0, len(x), chunk_size)]
    elif isinstance(probes, DataLoader):
        if isinstance(probes.dataset, IterableDataset):
            chunks = list(probes)
        else:
            chunks = list(DataLoader(probes.dataset, batch_size=chunk_size, shuffle=False,
                                     collate_fn=probes.collate_fn, num_workers=0))
    elif isinstance(probes, Dataset):
        if isinstance(probes, IterableDataset):
            chunks = list(DataLoader(probes, batch_size=chunk_size, collate_fn=default_collate))
        else:
            chunks = list(DataLoader(probes, batch_size=chunk_size, shuffle=False))
    else:
        raise TypeError("probes must be a Dataset, a DataLoader or a tuple (inputs, targets) "
                        f"of tensors, got {type(probes).__name__}")
    if not chunks or sum(_rows(c) for c in chunks) == 0:
        raise ValueError("probes are empty: pass at least one probe sample")
    return chunks


def probe_count(chunks: Sequence[Any]) -> int:
    """The number of probe samples in collated ``chunks`` (from :func:`probe_chunks`)."""
    return sum(_rows(c) for c in chunks)


def _rows(batch: Any) -> int:
    """The number of samples in a collated batch (its first tensor's leading dimension)."""
    if isinstance(batch, Tensor):
        return len(batch)
    if isinstance(batch, dict):
        return _rows(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return _rows(batch[0])
    raise TypeError(f"cannot tell the number of samples of a probe batch of type "
                    f"{type(batch).__name__}; pass tensors, or batches of tensors")


@dataclass
class ProbeMoments:
    """Per-chain running moments of probe losses (the state a :class:`ProbeLosses` keeps).

    ``count`` (chain,): draws folded in; ``mean_rows`` / ``mean_cols`` (chain, R) / (chain, K):
    means of the row and column probes' losses; ``var_rows`` / ``var_cols``: sums of squared
    deviations; ``cross`` (chain, R, K): the sum of products of deviations (co-moment).
    """

    count: Tensor
    mean_rows: Tensor
    mean_cols: Tensor
    var_rows: Tensor
    var_cols: Tensor
    cross: Tensor

    @classmethod
    def zeros(cls, chains: int, rows: int, cols: int, device: torch.device) -> ProbeMoments:
        z = {"device": device, "dtype": torch.float64}
        return cls(torch.zeros(chains, **z), torch.zeros(chains, rows, **z),
                   torch.zeros(chains, cols, **z), torch.zeros(chains, rows, **z),
                   torch.zeros(chains, cols, **z), torch.zeros(chains, rows, cols, **z))

    def fold(self, chains: slice | Tensor, a: Tensor, b: Tensor) -> None:
        """Merge a block of draws ``a`` (chain, m, R), ``b`` (chain, m, K) of the chains
        ``chains`` (a slice, or indices) (Chan, Golub & LeVeque's pairwise update: exact, one
        matrix product per block). The block's own co-moment is a product of deviations from
        its mean in the losses' precision (float64 matrix products are several times slower
        on CPUs); means and every running sum are float64."""
        m = a.shape[1]
        n = self.count[chains]
        tot = n + m
        same = a is b  # rows and columns are the same observables: one set of deviations
        ma = a.mean(1, dtype=torch.float64)
        mb = ma if same else b.mean(1, dtype=torch.float64)
        da = a - ma.to(a.dtype)[:, None]
        db = da if same else b - mb.to(b.dtype)[:, None]
        delta_a, delta_b = ma - self.mean_rows[chains], mb - self.mean_cols[chains]
        w = (n * m / tot)[:, None]
        cross = self.cross[chains]  # a view for a slice: updated in place
        cross += torch.bmm(da.transpose(1, 2), db)
        cross.baddbmm_(delta_a[:, :, None], (w * delta_b)[:, None, :])
        if not isinstance(chains, slice):
            self.cross[chains] = cross
        sq_a = da.square().sum(1, dtype=torch.float64)
        self.var_rows[chains] += sq_a + w * delta_a * delta_a
        self.var_cols[chains] += (sq_a if same else db.square().sum(1, dtype=torch.float64)
                                  ) + w * delta_b * delta_b
        self.mean_rows[chains] += delta_a * (m / tot)[:, None]
        self.mean_cols[chains] += delta_b * (m / tot)[:, None]
        self.count[chains] = tot

    def pooled(self, keep: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Merge the chains ``keep`` (bool, chain) into one pool of draws: its row and column
        means, variances (ddof=1) and covariance (rows, cols) with the pooled mean, i.e. the
        sample covariance of all their draws together (between-chain spread included)."""
        k = torch.as_tensor(keep, device=self.count.device)
        n = self.count[k]
        total = n.sum()
        mr = (n[:, None] * self.mean_rows[k]).sum(0) / total
        mc = (n[:, None] * self.mean_cols[k]).sum(0) / total
        dr, dc = self.mean_rows[k] - mr, self.mean_cols[k] - mc
        cross = self.cross[k].sum(0) + torch.einsum("c,cr,ck->rk", n, dr, dc)
        vr = self.var_rows[k].sum(0) + (n[:, None] * dr * dr).sum(0)
        vc = self.var_cols[k].sum(0) + (n[:, None] * dc * dc).sum(0)
        return mr, vr / (total - 1), vc / (total - 1), cross / (total - 1)

    def per_chain(self) -> tuple[Tensor, Tensor, Tensor]:
        """Each chain's own variances (chain, R), (chain, K) and covariance (chain, R, K)."""
        d = (self.count - 1).clamp(min=1)
        return (self.var_rows / d[:, None], self.var_cols / d[:, None],
                self.cross / d[:, None, None])


class ProbeLosses:
    """A recorder: the per-sample losses of ``probes`` at every recorded draw of every chain.

    Args:
        probes: the fixed probe set: ``(inputs, targets)`` tensors, a ``Dataset`` or a
            ``DataLoader`` (read in order).
        num_chains: the estimate's number of chains (chain indices are 0..num_chains-1 plus
            ``first_chain``).
        query: a second probe set: the covariance is then probes × query (probe traces list
            the probes first, then the query samples).
        rows, cols: instead, indices into the probes whose cross-covariance is accumulated
            (default: all × all).
        reduce: a (probes, observables) matrix: each draw's probe losses are first mapped to
            linear observables ``losses @ reduce`` (e.g. the mean loss of groups of probes);
            ``rows``/``cols`` then index those observables, and so does the trace.
        loss_fn: ``loss_fn(outputs, targets)``, applied to each probe sample as a batch of one
            (default: the estimate's ``loss_fn``); a loss that takes ``reduction="none"``
            (torch.nn.functional's) is called once per chunk instead, where that gives the
            same per-sample losses at w* (checked on every chunk).
        batch_loss: instead, ``batch_loss(forward, batch)`` applied to each sample of a batch
            (default: the estimate's).
        chunk_size: probe samples per forward pass (several probe sets share chunks when
            their batches concatenate).
        keep_trace: also keep every draw's losses, (chain, draw, probe), in host memory.
        first_chain: the estimate's ``first_chain``.

    After the estimate: :meth:`covariance`, :meth:`mean`, :meth:`trace`.
    """

    def __init__(self, probes: Any, num_chains: int, *, query: Any = None,
                 rows: Sequence[int] | None = None, cols: Sequence[int] | None = None,
                 loss_fn: Any = None, batch_loss: Any = None,
                 chunk_size: int = DEFAULT_PROBE_CHUNK, keep_trace: bool = False,
                 first_chain: int = 0, reduce: Tensor | None = None) -> None:
        self.chunks = probe_chunks(probes, chunk_size)
        self.num_probes = sum(_rows(c) for c in self.chunks)
        everything = range(self.num_probes)
        if query is not None:
            if rows is not None or cols is not None:
                raise ValueError("pass either query= (rows: the probes, columns: the query) "
                                 "or rows=/cols= indices into one probe set, not both")
            more = probe_chunks(query, chunk_size)
            rows = everything
            cols = range(self.num_probes, self.num_probes + sum(_rows(c) for c in more))
            self.chunks += more
            self.num_probes = cols.stop
        self.chunks = _merged(self.chunks, chunk_size)
        self.reduce = None if reduce is None else torch.as_tensor(reduce)
        if self.reduce is not None:
            if self.reduce.dim() != 2 or self.reduce.shape[0] != self.num_probes:
                raise ValueError(f"reduce must be a (probes, observables) matrix with "
                                 f"{self.num_probes} rows, got shape {tuple(self.reduce.shape)}")
            if query is not None:
                raise ValueError("pass either query= or reduce=, not both")
        width = self.num_probes if self.reduce is None else self.reduce.shape[1]
        everything = range(width)
        self.rows = torch.as_tensor(list(everything if rows is None else rows),
                                    dtype=torch.long)
        self.cols = torch.as_tensor(list(everything if cols is None else cols),
                                    dtype=torch.long)
        for name, ix in (("rows", self.rows), ("cols", self.cols)):
            if ix.numel() == 0 or int(ix.min()) < 0 or int(ix.max()) >= width:
                raise ValueError(f"{name} must be non-empty indices into the {width} "
                                 "probe observables")
        self._all_rows = self.rows.equal(torch.arange(width))
        self._all_cols = self.cols.equal(torch.arange(width))
        self.num_chains, self.first_chain = num_chains, first_chain
        self.loss_fn, self.batch_loss = loss_fn, batch_loss
        self.keep_trace = keep_trace
        self.moments: ProbeMoments | None = None
        self.notes: list[str] = []
        self._traces: dict[int, list[Tensor]] = {}
        self._buffer: list[Tensor] = []
        self._buffer_chains: tuple[int, ...] | None = None

    # --- binding: per-sample losses at given weights ------------------------------------
    def bind(self, problem: Problem) -> None:
        """Move the probes next to the model and choose how the per-sample losses run."""
        self.problem = problem
        dev = problem.device
        anchor_dtype = next(iter(problem.anchor.values())).dtype
        model_dtype = next(iter(problem.model.parameters())).dtype
        cast = anchor_dtype if anchor_dtype != model_dtype else None
        self.chunks = [to_device(c, dev, cast) for c in self.chunks]
        if self.loss_fn is None and self.batch_loss is None:
            self.loss_fn, self.batch_loss = problem.loss_fn, problem.batch_loss
        acc = torch.device("cpu") if dev.type == "mps" else dev
        self.rows, self.cols = self.rows.to(acc), self.cols.to(acc)
        if self.reduce is not None:
            self.reduce = self.reduce.to(acc, anchor_dtype)
        self.moments = ProbeMoments.zeros(self.num_chains, len(self.rows), len(self.cols), acc)
        r, k = len(self.rows), len(self.cols)
        self._block = min(_MAX_BLOCK, max(_BLOCK, 2 * r * k // (r + k)))
        self._unreduced = self._vectorized = False
        model = problem.model
        self._tied = any(
            len(list(named(remove_duplicate=False))) != len(list(named()))
            for named in (model.named_parameters, model.named_buffers))
        self._check_per_sample()
        self._unreduced = self._reduction_none_works()
        self._vectorized = self._vmap_works()
        self._num_params = sum(v.numel() for v in (*problem.anchor.values(),
                                                    *problem.consts.values()))
        self._check_matches_batch_loss()

    def per_sample(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """ℓ_i at ``params`` (the weights not given stay at w*) for every sample i of
        ``batch``, (samples,): the estimate's loss applied to each sample alone."""
        prob = self.problem
        with self._at({**prob.consts, **prob.anchor, **params}):
            if self.batch_loss is not None:
                one = vmap(lambda s: self.batch_loss(
                    prob.model, torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), s)))
                return one(batch).reshape(-1)
            inputs, targets = batch
            out = prob.model(inputs)
        if self._unreduced:
            return _per_row_mean(self.loss_fn(out, targets, reduction="none"))
        return vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(
            out, targets).reshape(-1)

    def losses_at(self, position: dict[str, Tensor]) -> Tensor:
        """All probes' losses at the positions (chain, *param) of a chunk: (chain, probe), in
        the loss's dtype."""
        parts = []
        c = next(iter(position.values())).shape[0]
        for batch in self.chunks:
            if self._batch_chains(c, _rows(batch)):
                parts.append(vmap(self.per_sample, in_dims=(0, None))(position, batch))
            else:
                parts.append(torch.stack([self.per_sample(
                    {k: v[i] for k, v in position.items()}, batch) for i in range(c)]))
        return torch.cat(parts, dim=1)

    def _at(self, tensors: dict[str, Tensor]) -> contextlib.AbstractContextManager:
        """:func:`~devinterp.llc.problem.at_weights`, without its search for tied tensors on
        a model that has none (a third of a small forward's overhead: 15 against 41 µs)."""
        if self._tied:
            return at_weights(self.problem.model, tensors)
        return _reparametrize_module(self.problem.model, tensors, tie_weights=False)

    def _batch_chains(self, chains: int, rows: int) -> bool:
        """Whether one vmapped forward over the chains beats a forward per chain. On CPUs
        batched weights turn each layer's GEMM into a slower bmm, and a per-chain loop costs
        ~0.1 ms of overhead per chain against vmap's ~0.5 ms per call, so the loop wins with
        few chains or much work per forward (measured on MLPs: 4 chains, always; 8 and 16
        chains, from parameters × probe rows of ~1.7M on); accelerators always batch."""
        if not self._vectorized:
            return False
        if self.problem.device.type != "cpu":
            return True
        return chains > _LOOP_CHAINS and self._num_params * rows < _LOOP_WORK

    def _reduction_none_works(self) -> bool:
        """Whether ``loss_fn(outputs, targets, reduction="none")`` (torch.nn.functional's
        losses) gives every probe's per-sample loss at w*, averaged over any dimensions after
        the first: then one call replaces a vmap of the loss over the samples (0.76 against
        1.24 ms for 4 × 1024 cross-entropies). Checked on every chunk, since a token mean
        with ignored targets agrees only on chunks without them."""
        if self.batch_loss is not None:
            return False
        prob = self.problem
        with torch.no_grad(), self._at({**prob.consts, **prob.anchor}):
            for inputs, targets in self.chunks:
                out = prob.model(inputs)
                try:
                    fast = _per_row_mean(self.loss_fn(out, targets, reduction="none"))
                except Exception:  # noqa: BLE001 - no such keyword, or another meaning
                    return False
                slow = vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(
                    out, targets).reshape(-1)
                if fast.shape != slow.shape or not torch.allclose(fast, slow, rtol=1e-5,
                                                                  atol=1e-7):
                    return False
        return True

    def _check_per_sample(self) -> None:
        """Fail now, with the fix, when the loss cannot be applied to one sample at a time
        (every chunk at w*: probe sets can differ from the data and from each other)."""
        with torch.no_grad():
            try:
                for batch in self.chunks:
                    self.per_sample({}, batch)
            except Exception as e:  # noqa: BLE001 - any failure: say what the loss must do
                raise RuntimeError(
                    "cannot evaluate the per-sample loss of the probes (the loss applied to "
                    f"one sample at a time): {first_line(e)}; the loss must accept a batch of "
                    "one sample, or pass batch_loss= that does") from e

    def _vmap_works(self) -> bool:
        stacked = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in self.problem.anchor.items()}
        head = self.chunks[0]
        with torch.no_grad():
            try:
                vmap(self.per_sample, in_dims=(0, None))(stacked, head)
                return True
            except Exception as vmap_error:  # noqa: BLE001 - any failure: loop over chains
                self.notes.append("probe losses ran one chain at a time (torch.func.vmap "
                                  f"cannot batch them: {first_line(vmap_error)})")
                return False

    def _check_matches_batch_loss(self) -> None:
        """Note when the per-sample losses do not average to the estimate's batch loss (e.g. a
        token mean over padded sequences): they are then each sample's own loss, not terms of
        the λ̂ loss."""
        head = self.chunks[0]
        with torch.no_grad():
            per = self.per_sample(self.problem.anchor, head).double().mean()
            try:
                batch = self.problem.loss(self.problem.anchor, head).double()
            except Exception:  # noqa: BLE001 - a batch the λ̂ loss cannot read: nothing to compare
                return
        if not torch.allclose(per, batch, rtol=1e-5, atol=1e-7):
            self.notes.append(
                f"the probes' per-sample losses average to {float(per):.6g} but the batch loss "
                f"of the same samples is {float(batch):.6g}: the loss is not a mean of "
                "per-sample terms, so each probe's loss is the loss of that sample alone")

    # --- recording -------------------------------------------------------------------------
    def on_draw(self, draw: int, chains: Sequence[int], position: dict[str, Tensor],
                losses: Tensor, baseline: Tensor, batch: Any) -> None:
        """Evaluate the probes at this draw's positions and buffer them."""
        key = tuple(chains)
        if self._buffer_chains != key:
            self.flush()
            self._buffer_chains = key
        values = self.losses_at(position).to(self.rows.device)
        if self.reduce is not None:
            values = values @ self.reduce
        self._buffer.append(values)
        if self.keep_trace:
            for c, row in zip(chains, values.float().cpu(), strict=True):
                self._traces.setdefault(c, []).append(row)
        if len(self._buffer) >= self._block:
            self.flush()

    def flush(self) -> None:
        """Merge the buffered draws into the running moments."""
        if not self._buffer:
            return
        block = torch.stack(self._buffer, dim=1)  # (chain, m, probe)
        index = [c - self.first_chain for c in self._buffer_chains]
        chains: slice | Tensor = (
            slice(index[0], index[-1] + 1) if index == list(range(index[0], index[-1] + 1))
            else torch.as_tensor(index, device=self.moments.count.device))
        rows = block if self._all_rows else block[:, :, self.rows]
        cols = block if self._all_cols else block[:, :, self.cols]
        self.moments.fold(chains, rows, cols)
        self._buffer = []

    # --- results ---------------------------------------------------------------------------
    def covariance(self, keep: np.ndarray | None = None, kind: str = "covariance"
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The posterior covariance (or correlation) of the row and column probes' losses over
        the draws of the chains ``keep`` (bool, chain; default all), (rows, cols), and its
        standard error: the spread of the per-chain values / √chains (NaN with one chain)."""
        if kind not in ("covariance", "correlation"):
            raise ValueError(f"kind must be 'covariance' or 'correlation', got {kind!r}")
        self.flush()
        m = self.moments
        keep = np.ones(self.num_chains, bool) if keep is None else np.asarray(keep, bool)
        keep = keep & (m.count.cpu().numpy() > 1)
        if not keep.any():
            raise ValueError("no chain has two probe draws to estimate a covariance from; "
                             "pass num_draws >= 2")
        _, vr, vc, cov = m.pooled(keep)
        vr_c, vc_c, cov_c = m.per_chain()
        if kind == "correlation":
            # Clamped: co-moments come from products in the losses' precision, variances not.
            cov = (cov / _sqrt_outer(vr, vc)).clamp(-1, 1)
            cov_c = (cov_c / _sqrt_outer(vr_c, vc_c)).clamp(-1, 1)
        per = cov_c[torch.as_tensor(keep, device=cov_c.device)]
        k = per.shape[0]
        se = (per.std(0, unbiased=True) / math.sqrt(k) if k > 1
              else torch.full_like(cov, float("nan")))
        return cov.cpu().numpy(), se.cpu().numpy()

    def mean(self, keep: np.ndarray | None = None) -> np.ndarray:
        """The posterior mean of the row probes' losses, (rows,)."""
        self.flush()
        keep = np.ones(self.num_chains, bool) if keep is None else np.asarray(keep, bool)
        return self.moments.pooled(keep & (self.moments.count.cpu().numpy() > 0))[0].cpu().numpy()

    def trace(self) -> np.ndarray:
        """Every draw's probe losses, (chain, draw, probe) (only with ``keep_trace=True``)."""
        if not self.keep_trace:
            raise ValueError("the probe-loss trace was not kept; pass keep_trace=True")
        chains = sorted(self._traces)
        return torch.stack([torch.stack(self._traces[c]) for c in chains]).numpy()


def _merged(chunks: list[Any], chunk_size: int) -> list[Any]:
    """Consecutive probe chunks (e.g. of several probe sets) re-split into as few chunks of
    ``chunk_size`` as possible, when their batches concatenate (same structure, dtypes and
    per-sample shapes): fewer, larger forward passes. Probe order is kept."""
    if len(chunks) < 2:
        return chunks
    flat = [tree_flatten(c) for c in chunks]
    spec = flat[0][1]
    columns = list(zip(*(leaves for leaves, _ in flat), strict=False))
    if any(s != spec or len(leaves) != len(columns) for leaves, s in flat) or not all(
            isinstance(t, Tensor) and t.dim() > 0 and t.dtype == col[0].dtype
            and t.shape[1:] == col[0].shape[1:] for col in columns for t in col):
        return chunks
    whole = [torch.cat(col) for col in columns]
    n = len(whole[0])
    if any(len(t) != n for t in whole):
        return chunks
    return [tree_unflatten([t[i : i + chunk_size] for t in whole], spec)
            for i in range(0, n, chunk_size)]


def _per_row_mean(losses: Tensor) -> Tensor:
    """Unreduced losses (samples, ...) as one loss per sample: the mean over the rest."""
    return losses.reshape(len(losses), -1).mean(1)


def _sqrt_outer(a: Tensor, b: Tensor) -> Tensor:
    """√(a_r·b_k) for variances a (..., R), b (..., K), zero variances kept from dividing by 0."""
    tiny = torch.finfo(a.dtype).tiny
    return (a.clamp(min=tiny)[..., :, None] * b.clamp(min=tiny)[..., None, :]).sqrt()
