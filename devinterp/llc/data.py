"""Where minibatches come from: tensors (sampled without replacement, with a per-sample
baseline cache when the loss allows it) or a DataLoader, reshuffled from the estimate's seed and
never from the global random stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

__all__ = ["LoaderBatches", "LossFn", "TensorBatches", "batch_source", "to_device"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``batch`` on ``device``; with ``dtype``, its floating-point tensors cast to it."""
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device, dtype, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        parts = [to_device(v, device, dtype) for v in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return batch


class TensorBatches:
    """Minibatches drawn without replacement (a fresh permutation per epoch) from tensors."""

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int, device: torch.device,
                 dtype: torch.dtype | None = None):
        self.inputs, self.targets = to_device((inputs, targets), device, dtype)
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
            # Chunks of a few minibatches: sequence models ran 2x slower in chunks of 4096 rows
            # than of 256 (tools/bench_llc.py --transformer, the in-context regression).
            rows = 4 * self.batch_size
            for i in range(0, self.n, rows):
                x, y = self.inputs[i : i + rows], self.targets[i : i + rows]
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


class LoaderBatches:
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
                yield to_device(batch, self.device, self.dtype)
            if empty:
                raise ValueError("data is empty: the DataLoader produced no batch")


def batch_source(data: Any, batch_size: int, device: torch.device, num_samples: int | None,
                  dtype: torch.dtype | None = None) -> TensorBatches | LoaderBatches:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, Tensor) for t in data
    ):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data: inputs have {len(x)} rows but targets have {len(y)}; "
                             "pass tensors with the same first dimension")
        if len(x) == 0:
            raise ValueError("data is empty: pass at least one sample")
        return TensorBatches(x, y, batch_size, device, dtype)
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return batch_source(tuple(data.tensors), batch_size, device, num_samples, dtype)
    if isinstance(data, DataLoader):
        n = num_samples
        if n is None and not isinstance(data.dataset, IterableDataset):
            n = len(data.dataset)
        if n == 0:
            raise ValueError("data is empty: the DataLoader's dataset has no sample")
        return LoaderBatches(data, device, n, dtype)
    if isinstance(data, Dataset):
        if isinstance(data, IterableDataset):
            loader = DataLoader(data, batch_size=batch_size)
            return LoaderBatches(loader, device, num_samples, dtype)
        if len(data) == 0:
            raise ValueError("data is empty: the Dataset has no sample")
        loader = DataLoader(data, batch_size=min(batch_size, len(data)))
        return LoaderBatches(loader, device, len(data), dtype)
    raise TypeError(
        f"data must be a Dataset, a DataLoader or a tuple (inputs, targets) of tensors, got "
        f"{type(data).__name__}"
    )
