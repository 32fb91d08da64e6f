"""Probe influence in a run: the BIF of a fixed probe set at every checkpoint, from the draws of
that checkpoint's λ̂ estimate, written to the run store. The callback (inline) and
``devinterp estimate`` (deferred runs, or ``--probes FILE``) share it, so a run directory holds
the same ``influence/`` tables whichever wrote them.

A deferred run keeps its probe set in the run directory (``influence/probes.pt``: the probes
collated into ``(inputs, targets)`` tensors, loaded weights-only), named in ``settings.json``
(``probes``, ``influence_train``), so ``devinterp estimate RUN`` records the influence too.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from devinterp.influence import DEFAULT_NUM_TRAIN, ProbeInfluence, influence_rows
from devinterp.llc.observables import probe_chunks
from devinterp.run.store import INFLUENCE_DIR, RunStore, atomic_write_bytes, open_regular
from devinterp.tracking.estimate import EstimateFailure, first_line

__all__ = ["PROBES_FILE", "ProbeRecording", "kept_probes", "load_probes", "save_probes"]

#: Where a deferred run keeps its probe set, relative to the run directory.
PROBES_FILE = f"{INFLUENCE_DIR}/probes.pt"


def save_probes(store: RunStore, probes: Any) -> str:
    """Keep ``probes`` (tensors, a Dataset or a DataLoader of ``(inputs, targets)``) in the
    run directory as collated tensors; returns the path relative to the run directory.

    Raises:
        ValueError: the probes' batches are not ``(inputs, targets)`` tensors.
    """
    parts: list[tuple[Tensor, Tensor]] = []
    for chunk in probe_chunks(probes):
        if not (isinstance(chunk, (tuple, list)) and len(chunk) == 2
                and all(isinstance(t, Tensor) for t in chunk)):
            raise ValueError("a deferred run keeps its probes as (inputs, targets) tensors; "
                             "these probes' batches are not (use mode='inline', or "
                             "devinterp.estimate_bif on the snapshots)")
        parts.append((chunk[0].detach().cpu(), chunk[1].detach().cpu()))
    inputs = torch.cat([p[0] for p in parts])
    targets = torch.cat([p[1] for p in parts])
    (store.path / INFLUENCE_DIR).mkdir(exist_ok=True)
    buf = io.BytesIO()
    torch.save({"inputs": inputs, "targets": targets}, buf)
    atomic_write_bytes(store.path / PROBES_FILE, buf.getvalue())
    return PROBES_FILE


def kept_probes(root: Path, name: str) -> Path:
    """The probe file ``settings.json`` names, refused unless it is inside the run directory
    (a run directory is untrusted input)."""
    path = (root / name).resolve()
    if not name or not path.is_relative_to(root.resolve()):
        raise ValueError(f"{root} names the probe file {name!r}, outside the run directory; "
                         "pass --probes FILE.pt")
    return path


def load_probes(path: str | Path) -> tuple[Tensor, Tensor]:
    """A probe file: ``{"inputs", "targets"}`` or ``(inputs, targets)`` tensors, weights-only.

    Raises:
        ValueError: the file holds something else (named, with what it must hold).
    """
    with open_regular(path) as f:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and {"inputs", "targets"} <= set(obj):
        obj = (obj["inputs"], obj["targets"])
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2
            and all(isinstance(t, Tensor) for t in obj) and len(obj[0]) == len(obj[1])):
        raise ValueError(f"{path} must hold probe tensors: a dict {{'inputs': X, 'targets': Y}}"
                         " or a tuple (X, Y) with one row per probe sample (torch.save)")
    return obj[0], obj[1]


class ProbeRecording:
    """One run's probe influence: a recorder per estimate, then the rows of each checkpoint.

    Args:
        store: the run store the ``influence/`` tables go to.
        probes: the probe set (as :class:`devinterp.influence.ProbeInfluence` takes it).
        num_train: training samples whose influence is recorded.
        seed: the seed the training samples are drawn with (the sampler's).
    """

    def __init__(self, store: RunStore, probes: Any, *, num_train: int | None = None,
                 seed: int = 0) -> None:
        self.store, self.seed = store, seed
        self.influence = ProbeInfluence(probes, num_train=num_train or DEFAULT_NUM_TRAIN)
        self._inputs_saved = False

    @property
    def kind(self) -> str:
        return self.influence.kind

    def recorder(self, data: Any, *, num_chains: int, first_chain: int = 0
                 ) -> tuple[Any, str | None]:
        """A recorder for one estimate, or None and why it could not be made (influence never
        takes λ̂ down with it)."""
        try:
            return self.influence.recorder(data, num_chains=num_chains, first_chain=first_chain,
                                           seed=self.seed), None
        except Exception as e:  # noqa: BLE001 - a bad probe set fails influence, not λ̂
            return None, f"{type(e).__name__}: {first_line(e)}"

    def write(self, step: int, result: Any, recorder: Any, error: str | None) -> str | None:
        """Write the influence of ``step`` from the draws ``recorder`` saw (``result``: the
        λ̂ estimate, or an :class:`EstimateFailure`), or a failed row; returns why there is
        none (None when written). The inputs are kept once, for the dashboard."""
        reason = (result.reason if isinstance(result, EstimateFailure)
                  else error or (None if recorder is not None else "no chain was run"))
        bif = None
        if reason is None:
            try:
                bif = self.influence.result(recorder, result)
            except Exception as e:  # noqa: BLE001 - a diagnostic never ends a run
                reason = first_line(e)
        if bif is None:
            self.store.write_influence(step, reason=reason, kind=self.kind)
            return reason
        self.store.write_influence(step, influence_rows(bif), kind=bif.kind)
        if not self._inputs_saved:
            query_inputs, train_inputs = self.influence.inputs()
            self.store.save_influence_inputs(query_inputs, train_inputs,
                                             self.influence.train_indices)
            self._inputs_saved = True
        return None
