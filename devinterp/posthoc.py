"""``devinterp estimate RUN_DIR``: λ̂ for the weight snapshots or Lightning checkpoints of a run.

A run directory written by :class:`devinterp.LLCCallback` (typically in ``mode="deferred"``)
records what rebuilds the model, data and loss (``run.json``) and the sampler settings
(``settings.json``); a directory holding only Lightning ``ModelCheckpoint`` ``.ckpt`` files
works too, given the module class (``--module``, or found in the checkpoint) and, when the module
cannot provide them, the data and loss; its λ̂ table goes to a sibling directory
(``CKPT_DIR-llc``, or ``--out``), never into the checkpoint folder. Steps already in the λ̂ table
are skipped (``--force`` re-estimates them), unless their snapshot was rewritten since. Several
processes (``--workers N``, which launches them, or ``--workers N --rank R`` per process, or
``torchrun``, which sets ``RANK``/``WORLD_SIZE``) split the snapshots and share the run store.

A run directory is untrusted input. Snapshots and checkpoints are loaded with
``weights_only=True`` (a pickled payload never runs). From ``run.json``, a checkpoint or a
``config.yaml``, only classes are built, and only ``nn.Module`` / ``LightningDataModule``
subclasses from installed or importable packages outside the run directory; a recorded loss
function only from ``torch.nn.functional`` or the model's own package; a recorded script file
(``.py``) never. What the user names (``--module file.py:Class``, ``--data``, ``--loss``) is
imported as given.

One λ̂ table never mixes sampler settings: every row carries a ``settings_id``; options that
differ from the rows already there, or a table that already mixes them, are refused unless
``--force`` re-estimates every snapshot; ``settings.json`` is updated only once a row with the
new settings is written. An unreadable snapshot is named on stderr and skipped (exit code 1); a
snapshot whose loss is not finite gets a failed row and the others are still estimated.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from devinterp.cli import ArgumentParser, UsageError, add_threads_argument, apply_threads
from devinterp.fabric import (
    ESTIMATOR_OPTIONS,
    describe,
    estimator_kwargs,
    first_line,
    module_loss,
    record_result,
    run_estimator,
    training_data,
    weights_finite,
)
from devinterp.store import (
    LLC_FILE,
    METRICS_FILE,
    RUN_FILE,
    SETTINGS_FILE,
    MixedSettingsError,
    RunStore,
    file_sha256,
    settings_id,
)

_CKPT_STEP = re.compile(r"step=(\d+)")


@dataclass
class EstimateReport:
    """What :func:`estimate_run` did, by training step.

    Attributes:
        run_dir: the run directory the λ̂ rows were written to.
        estimated: steps whose λ̂ row was written with ``status="ok"``.
        failed: steps whose row was written with ``status="failed"`` (e.g. all chains diverged,
            or the loss at the snapshot is not finite).
        skipped: steps already in the λ̂ table (not re-estimated without ``force``).
        unreadable: snapshot files that could not be read or loaded, with the reason.
    """

    run_dir: Path
    estimated: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)


class UnreadableSnapshot(Exception):
    """A snapshot or checkpoint file that cannot be read, or whose weights do not fit."""


def _report_unreadable(report: EstimateReport, path: Path, reason: str) -> None:
    report.unreadable[str(path)] = reason
    print(f"devinterp estimate: cannot read {path} ({reason}); skipped", file=sys.stderr,
          flush=True)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


@dataclass
class _Source:
    step: int
    path: Path
    kind: str  # "snapshot" (a state dict) or "ckpt" (a Lightning checkpoint)


def estimate_run(
    run_dir: str | os.PathLike,
    *,
    module: type[nn.Module] | str | None = None,
    data: Any = None,
    loss_fn: Callable[..., torch.Tensor] | str | None = None,
    batch_loss: Callable[..., torch.Tensor] | None = None,
    steps: list[int] | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    workers: int = 1,
    rank: int = 0,
    device: str | None = None,
    threads: int | None = None,
    save_traces: bool = True,
    progress: bool = True,
    **options: Any,
) -> EstimateReport:
    """Estimate λ̂ for the snapshots of ``run_dir`` and write the rows to its run store.

    Args:
        run_dir: a run directory (``LLCCallback``'s ``dirpath``), or any directory holding
            Lightning ``.ckpt`` files (searched recursively).
        module: the LightningModule / ``nn.Module`` class, or ``"pkg.mod:Class"`` /
            ``"path/to/file.py:Class"``. Default: from ``run.json``, the checkpoint, or a
            LightningCLI ``config.yaml`` in the directory, checked as the module docstring says.
            It is built from the recorded hyperparameters (``save_hyperparameters``).
        data: Dataset, DataLoader, ``(inputs, targets)`` tensors, ``"pkg.mod:function"``
            returning one of them, or a ``.pt`` file of tensors. Default: as recorded in
            ``run.json``, else the module's ``llc_data`` or ``train_dataloader().dataset``.
        loss_fn: ``loss_fn(outputs, targets)`` or ``"pkg.mod:function"``. Default: as recorded,
            else the module's ``llc_batch_loss`` method or ``loss_fn`` attribute.
        batch_loss: ``batch_loss(forward, batch)`` instead of ``loss_fn``.
        steps: only these steps. Default: every snapshot.
        out: write the λ̂ table, traces and settings into this run directory instead (created,
            starting from ``run_dir``'s ``run.json`` and ``metrics.csv``), e.g. one directory per
            weight-refined λ̂ curve of one training run; snapshots are read from ``run_dir``.
            Default for a folder of ``.ckpt`` files only: the sibling ``<folder>-llc``.
        force: re-estimate steps already in the table (every one, when the settings change).
        workers, rank: this process takes every ``workers``-th snapshot starting at ``rank``.
        device: where to sample (default: CPU).
        threads: torch intra-op threads for this call, restored afterwards (default: as they
            are; the estimator still runs a small model on one thread, its own policy).
        save_traces: save per-chain loss traces, shape (chain, draw).
        progress: print one line per estimate.
        **options: estimator options overriding ``settings.json`` (``num_chains``, ...).

    Returns:
        An :class:`EstimateReport`.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no snapshot.
        ValueError: bad options; the model, data or loss cannot be rebuilt, or the run
            directory names code it may not run (the message names the option that supplies
            it); or the options (or another process's rows) would mix sampler settings in one
            λ̂ table (:class:`~devinterp.store.MixedSettingsError` for the latter).
    """
    if not _is_int(workers) or workers < 1 or not _is_int(rank) or not 0 <= rank < workers:
        raise ValueError(f"need workers >= 1 and 0 <= rank < workers, got workers={workers}, "
                         f"rank={rank}")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    check_device(device)
    overrides = check_options(estimator_kwargs(options))
    store = RunStore(run_dir)
    meta = _read_meta(store)
    given, out = out, _default_out(store, out)
    redirected = given is None and out is not None
    target = store if out is None else _output_store(store, Path(out), meta)
    report = EstimateReport(target.path)
    template = _read_settings(target) or (_read_settings(store) if target is not store else {})
    base = {k: template[k] for k in ESTIMATOR_OPTIONS if template.get(k) is not None}
    check_options(base, where=f"in {target.path / SETTINGS_FILE}")
    the_options = {**base, **overrides}
    sid = settings_id(the_options)
    sources = _discover(store, report)
    if not sources and not report.unreadable:
        raise FileNotFoundError(
            f"{store.path} holds no snapshot (snapshots/step_*.pt) and no Lightning .ckpt file; "
            "train with LLCCallback(dirpath=...) or point at a ModelCheckpoint directory"
        )
    if steps is not None:
        wanted = {int(s) for s in steps}
        sources = [s for s in sources if s.step in wanted]
    table = target.read_table(LLC_FILE)
    legacy = settings_id(template) if template else sid  # rows from before rows had an id
    changed = {k: v for k, v in overrides.items() if base.get(k) != v}
    _check_table_settings(target, table, sid, legacy, changed, base, force,
                          {s.step for s in sources})
    done = {int(r["step"]): r for r in table.to_dict("records")}
    builder = _ModelBuilder(store, meta, module, device)
    pending = {s.step for s in sources}  # steps of this job (all workers) not yet written here
    target.row_settings = the_options
    target.row_sources = {s.step: s.path for s in sources}
    target.row_guard = _settings_guard(target, sid, legacy, pending)
    settings_recorded = False
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for src in sources[rank::workers]:
            if src.step in done and not force and not _snapshot_changed(done[src.step], src):
                report.skipped.append(src.step)
                pending.discard(src.step)
                continue
            try:
                model = builder.load(src)
            except UnreadableSnapshot as e:
                _report_unreadable(report, src.path, str(e))
                pending.discard(src.step)
                continue
            _check_recorded_loss(meta, loss_fn, batch_loss, type(model), store.path)
            the_data = builder.data(model, data)
            the_loss, the_batch_loss = builder.loss(model, loss_fn, batch_loss)
            start = time.perf_counter()
            if not weights_finite(model):
                result: Any = "non-finite weights at this step"
            else:
                result = run_estimator(model, the_data, loss_fn=the_loss,
                                       batch_loss=the_batch_loss, options=the_options)
            row = record_result(target, src.step, result, save_trace=save_traces)
            pending.discard(src.step)
            if not settings_recorded:
                _record_settings(target, the_options, template)
                settings_recorded = True
                if redirected:
                    print(f"devinterp estimate: {store.path} holds Lightning checkpoints; "
                          f"writing λ̂ to the run directory {target.path} (--out DIR to choose "
                          "another)", file=sys.stderr, flush=True)
            if row["status"] == "ok":
                report.estimated.append(src.step)
            else:
                report.failed.append(src.step)
                print(f"devinterp estimate: step {src.step} failed ({row['reason']}); the "
                      "other snapshots are estimated", file=sys.stderr, flush=True)
            if progress:
                print(describe(row, time.perf_counter() - start), flush=True)
    finally:
        torch.set_num_threads(threads_before)
        target.row_settings, target.row_sources, target.row_guard = None, {}, None
    return report


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# Options, devices and the run's own files, checked before anything is written
# ----------------------------------------------------------------------------------------------
def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: ``option: (check, what it must be)`` for :func:`check_options`.
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_chains": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_draws": (lambda v: _is_int(v) and v >= 2,
                  "an integer >= 2 (λ̂ needs draws beyond the starting point)"),
    "num_burnin": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "step_size": (lambda v: v == "auto" or (_finite(v) and v > 0),
                  "'auto' or a finite number > 0"),
    "localization": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "nbeta": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "sampler": (lambda v: v in ("sgld", "rmsprop_sgld"), "'sgld' or 'rmsprop_sgld'"),
    "seed": (_is_int, "an integer"),
    "num_samples": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (the number of samples)"),
    "chain_chunk_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "vectorize": (lambda v: isinstance(v, bool), "true or false"),
    "weights": (lambda v: isinstance(v, (list, tuple)) and bool(v)
                and all(isinstance(w, str) and w for w in v),
                "a non-empty list of parameter names or patterns"),
}


def check_options(options: Mapping[str, Any], *, where: str = "",
                  label: Callable[[str], str] = str) -> dict[str, Any]:
    """Raise ValueError, naming the option, unless every estimator option has a usable value
    (``None`` = the estimator's default); returns the options that are set.

    Up front, so that a bad value fails before any row or ``settings.json`` is written rather
    than being recorded, or failing at every snapshot. ``where`` says where the values came
    from (e.g. ``"in RUN/settings.json"``); ``label`` turns an option into its name for the
    user (e.g. ``--num-draws``).
    """
    for k, v in options.items():
        if v is None or k not in _OPTION_RULES:
            continue
        ok, what = _OPTION_RULES[k]
        if not ok(v):
            place = f" {where}" if where else ""
            raise ValueError(f"{label(k)}{place} must be {what}, got {v!r}")
    return {k: v for k, v in options.items() if v is not None}


def check_device(device: str | None) -> None:
    """Raise ValueError unless ``device`` names a device this machine has (None = CPU)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({first_line(e)}); use cpu, "
                         "cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: this machine has no usable CUDA device; use "
                             "cpu, or install the CUDA build of torch")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine; use cpu")


#: The types ``run.json`` entries must have (absent or null: not recorded).
_META_TYPES: dict[str, type] = {"name": str, "module": str, "module_file": str, "hparams": dict,
                                "data": dict, "loss": dict}
_RECIPE_TYPES: dict[str, dict[str, type]] = {
    "data": {"kind": str, "file": str, "class": str, "hparams": dict},
    "loss": {"kind": str, "path": str},
}


def _read_meta(store: RunStore) -> dict[str, Any]:
    """``run.json``, checked to have the shape the callback writes (a clear error otherwise)."""
    path = store.path / RUN_FILE
    meta = store.read_json(RUN_FILE, {})
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(meta).__name__}; restore "
                         "it, or delete it and pass --module/--data/--loss")
    for key, kind in _META_TYPES.items():
        _check_type(path, key, meta.get(key), kind)
    for key, fields in _RECIPE_TYPES.items():
        for sub, kind in fields.items():
            _check_type(path, f"{key}.{sub}", (meta.get(key) or {}).get(sub), kind)
    return meta


def _check_type(path: Path, key: str, value: Any, kind: type) -> None:
    if value is not None and not isinstance(value, kind):
        names = {str: "a string", dict: "a JSON object"}
        raise ValueError(f"{path}: {key!r} must be {names[kind]}, got {value!r}; fix it, or "
                         "pass --module/--data/--loss instead")


def _read_settings(store: RunStore) -> dict[str, Any]:
    """``settings.json`` (``{}`` if missing), checked to be a JSON object."""
    settings = store.read_json(SETTINGS_FILE)
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"{store.path / SETTINGS_FILE} must hold a JSON object, got a "
                         f"{type(settings).__name__}; restore it or delete it")
    return settings


# ----------------------------------------------------------------------------------------------
# Where rows go, and keeping one table at one set of settings
# ----------------------------------------------------------------------------------------------
def _default_out(store: RunStore, out: str | os.PathLike | None) -> str | os.PathLike | None:
    """``out``, or for a folder of Lightning checkpoints only (no run store of its own) the
    sibling ``<folder>-llc``: the checkpoint folder is the user's, and is left as it is."""
    if out is not None or (store.path / RUN_FILE).exists() or store.snapshots():
        return out
    if not any(store.path.rglob("*.ckpt")):
        return out
    return store.path.resolve().parent / f"{store.path.resolve().name}-llc"


def _output_store(source: RunStore, out: Path, meta: Mapping[str, Any]) -> RunStore:
    """The run directory ``out`` for λ̂ of ``source``'s snapshots: it gets ``source``'s
    ``run.json`` (named after ``out``, pointing at ``source``) and training metrics, so the
    dashboard and stage detector read it as a run of its own (its ``settings.json`` is written
    with its first row)."""
    if out.resolve() == source.path.resolve():
        return source
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the λ̂ table")
    target = RunStore(out, create=True)
    if target.read_json(RUN_FILE) is None:
        # Not the W&B run: its llc/* curve is the training run's, not this one's.
        kept = {k: v for k, v in meta.items() if k != "wandb"}
        target.write_json(RUN_FILE, {**kept, "name": out.name,
                                     "snapshots_from": str(source.path.resolve())})
    metrics = source.read_table(METRICS_FILE)
    if len(metrics) and not len(target.read_table(METRICS_FILE)):
        target.write_metrics(metrics.to_dict("records"))
    return target


def _row_ids(table: pd.DataFrame, legacy: str) -> pd.Series:
    """Each row's ``settings_id``; ``legacy`` for rows written before rows carried one."""
    if "settings_id" not in table.columns:
        return pd.Series([legacy] * len(table), index=table.index, dtype=object)
    return table["settings_id"].astype(object).where(table["settings_id"].notna(), legacy)


def _steps_text(steps: pd.Series) -> str:
    values = [int(s) for s in steps]
    shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
    return f"step{'s' if len(values) > 1 else ''} {shown}"


def _check_table_settings(target: RunStore, table: pd.DataFrame, sid: str, legacy: str,
                          changed: Mapping[str, Any], base: Mapping[str, Any], force: bool,
                          selected: set[int]) -> None:
    """Refuse, before estimating, whatever would leave rows of other settings in the table."""
    if not len(table):
        return
    other = table[(_row_ids(table, legacy) != sid).to_numpy()]
    if not len(other):
        return
    llc = target.path / LLC_FILE
    if not force:
        if changed:
            raise ValueError(
                f"options {dict(changed)} differ from the settings of the rows already in "
                f"{llc} ({ {k: base.get(k) for k in changed} }); pass --force to re-estimate "
                "every snapshot with them, or use another run directory (--out DIR)"
            )
        raise ValueError(
            f"{llc} mixes sampler settings: {len(other)} of {len(table)} rows "
            f"({_steps_text(other['step'])}) were estimated with other settings than "
            f"{target.path / SETTINGS_FILE}'s (an interrupted --force, or a resumed run with "
            "new settings); pass --force to re-estimate every snapshot with them, or --out DIR"
        )
    left = other[~other["step"].isin(selected)]
    if len(left):
        raise ValueError(
            f"--force would leave {len(left)} rows of {llc} ({_steps_text(left['step'])}) at "
            "other sampler settings than the re-estimated ones; drop --steps to re-estimate "
            "every snapshot (a row without a snapshot: delete it), or use --out DIR"
        )


def _settings_guard(target: RunStore, sid: str, legacy: str, pending: set[int]
                    ) -> Callable[[pd.DataFrame, dict[str, Any]], None]:
    """The store's ``row_guard`` for this command: under the table's lock, refuse a row when
    another process has meanwhile written rows of other settings that this job will not
    overwrite (two concurrent ``devinterp estimate`` with different options)."""

    def guard(table: pd.DataFrame, row: dict[str, Any]) -> None:
        if not len(table):
            return
        others = table[table["step"] != int(row["step"])]
        stale = others[((_row_ids(others, legacy) != sid) & ~others["step"].isin(pending))
                       .to_numpy()]
        if len(stale):
            raise MixedSettingsError(
                f"another process wrote rows of other sampler settings to {target.path / LLC_FILE} "
                f"({_steps_text(stale['step'])}) while this estimate ran; stopped here so that "
                "one table does not mix settings: run one estimate at a time per run "
                "directory, or give each its own --out DIR"
            )

    return guard


def _snapshot_changed(row: Mapping[str, Any], src: _Source) -> bool:
    """True when ``src`` is no longer the file the row was estimated from (e.g. resumed
    training rewrote the snapshot): its row is stale and is estimated again."""
    digest = row.get("snapshot_sha256")
    if not isinstance(digest, str) or not digest:
        return False
    try:
        changed = file_sha256(src.path) != digest
    except OSError:
        return True  # re-read below, and named there if unreadable
    if changed:
        print(f"devinterp estimate: {src.path} changed since its λ̂ row was written; "
              f"estimating step {src.step} again", file=sys.stderr, flush=True)
    return changed


def _record_settings(target: RunStore, options: Mapping[str, Any],
                     template: Mapping[str, Any]) -> None:
    """Write ``settings.json`` once a row with these settings exists (so a command that fails
    or is interrupted first records nothing): ``template``'s entries (the run's schedule,
    mode, ...) with every estimator option as used (None = the estimator's default)."""
    target.update_json(SETTINGS_FILE, {**template,
                                       **{k: options.get(k) for k in ESTIMATOR_OPTIONS}})


# ----------------------------------------------------------------------------------------------
# Snapshots
# ----------------------------------------------------------------------------------------------
def _discover(store: RunStore, report: EstimateReport) -> list[_Source]:
    """Snapshots and checkpoints by step (a snapshot wins over a checkpoint of the same step)."""
    found: dict[int, _Source] = {}
    for step, path in store.snapshots().items():
        found[step] = _Source(step, path, "snapshot")
    for path in sorted(store.path.rglob("*.ckpt")):
        m = _CKPT_STEP.search(path.name)
        try:
            step = int(m.group(1)) if m else int(_load_ckpt(path, mmap=True)["global_step"])
        except Exception as e:  # truncated, corrupt, not a checkpoint, unsafe pickle, ...
            _report_unreadable(report, path, first_line(e))
            continue
        found.setdefault(step, _Source(step, path, "ckpt"))
    return [found[s] for s in sorted(found)]


def _load_ckpt(path: Path, mmap: bool = False) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError("not a Lightning checkpoint (no 'state_dict')")
    return dict(ckpt)


# ----------------------------------------------------------------------------------------------
# Rebuilding the model, the data and the loss
# ----------------------------------------------------------------------------------------------
class _ModelBuilder:
    """Builds the module once per set of hyperparameters and loads each snapshot into it."""

    def __init__(self, store: RunStore, meta: Mapping[str, Any], module: Any,
                 device: str | None) -> None:
        self.store, self.meta, self.device = store, meta, device
        self.cls = _user_class(module) if module is not None else None
        self.models: dict[str, nn.Module] = {}
        self._data: Any = None

    def load(self, src: _Source) -> nn.Module:
        """The module with the weights of ``src``. A file that cannot be read or whose weights
        do not fit raises :class:`UnreadableSnapshot`; a class that cannot be found or built
        raises ValueError (that is the run's problem, not the file's)."""
        try:
            if src.kind == "snapshot":
                state, ckpt = torch.load(src.path, map_location="cpu", weights_only=True), None
                hparams = self.meta.get("hparams", {}) or {}
            else:
                ckpt = _load_ckpt(src.path)
                state = ckpt["state_dict"]
                hparams = dict(ckpt.get("hyper_parameters") or self.meta.get("hparams") or {})
        except Exception as e:  # truncated, corrupt, not a checkpoint, unsafe pickle, ...
            raise UnreadableSnapshot(first_line(e)) from e
        cls = self._class(ckpt)
        # LightningCLI records its own bookkeeping (_class_path, _instantiator) among the
        # hyperparameters; they are not init arguments.
        hparams = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        key = f"{_qualified(cls)}:{json.dumps(hparams, sort_keys=True, default=repr)}"
        if key not in self.models:
            try:
                model = cls(**hparams)
            except TypeError as e:
                raise ValueError(f"cannot build {cls.__qualname__}(**{hparams}) ({e}); pass "
                                 "--module with a class these hyperparameters fit") from e
            self.models[key] = model.to(self.device) if self.device else model
        model = self.models[key]
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UnreadableSnapshot(f"weights do not match {cls.__qualname__}: "
                                     f"{first_line(e)}") from e
        return model

    def _class(self, ckpt: Mapping[str, Any] | None) -> type[nn.Module]:
        """The model class: ``--module``, else the one the run records, checked by
        :func:`recorded_class` (a run directory is untrusted input)."""
        if self.cls is not None:
            return self.cls
        spec, what = self.meta.get("module"), f"{self.store.path / RUN_FILE} ('module')"
        if spec is None and ckpt is not None:
            for key, state in (ckpt.get("callbacks") or {}).items():
                if str(key).startswith("LLCCallback") and isinstance(state, Mapping):
                    spec, what = state.get("module"), "a checkpoint's LLCCallback state"
        if spec is None:
            spec, what = _cli_class_path(self.store.path), "config.yaml (model.class_path)"
        if spec is None:
            raise ValueError(
                f"cannot tell which module class the snapshots of {self.store.path} belong to; "
                "pass --module package.module:ClassName"
            )
        self.cls = recorded_class(spec, nn.Module, what, self.store.path,
                                  script=self.meta.get("module_file"))
        return self.cls

    def data(self, model: nn.Module, given: Any) -> Any:
        """The data to sample with (resolved once: the same for every snapshot)."""
        if self._data is None:
            self._data = self._resolve_data(model, given)
        return self._data

    def _resolve_data(self, model: nn.Module, given: Any) -> Any:
        if isinstance(given, str):
            return _data_from_file(Path(given)) if given.endswith(".pt") else load_object(given)()
        if given is not None:
            return given
        recipe = self.meta.get("data") or {}
        kind = recipe.get("kind")
        if kind == "file":
            return _data_from_file(_inside_run(self.store.path, recipe.get("file") or ""))
        if kind == "datamodule":
            from lightning.pytorch import LightningDataModule

            where = f"{self.store.path / RUN_FILE} (data.class)"
            cls = recorded_class(recipe.get("class"), LightningDataModule, where,
                                 self.store.path)
            dm = cls(**(recipe.get("hparams") or {}))
            dm.prepare_data()
            dm.setup("fit")
            return training_data(dm.train_dataloader())
        if kind == "module_attr" or getattr(model, "llc_data", None) is not None:
            return model.llc_data
        if kind == "module_train_dataloader" or _overrides_train_dataloader(model):
            return training_data(model.train_dataloader())
        raise ValueError(
            f"cannot rebuild the data for {self.store.path}: the run did not record it and the "
            f"module has no `llc_data` or `train_dataloader()`; pass --data package.module:fn "
            "(returning a Dataset or (inputs, targets)) or --data FILE.pt"
        )

    def loss(self, model: nn.Module, loss_fn: Any, batch_loss: Any
             ) -> tuple[Callable | None, Callable | None]:
        """``(loss_fn, batch_loss)``: the one given, else the function ``run.json`` records,
        else the module's, in ``fabric.module_loss``'s order with the recorded convention
        first (``llc_batch_loss``, ``loss_fn``, ``training_step``)."""
        if isinstance(loss_fn, str):
            loss_fn = load_object(loss_fn)
        recipe = self.meta.get("loss") or {}
        if loss_fn is None and batch_loss is None and recipe.get("kind") == "function":
            loss_fn = load_object(recipe["path"])
        found = module_loss(model, loss_fn, batch_loss, recorded=recipe.get("kind"),
                            fix="pass --loss package.module:function (outputs, targets) -> loss")
        return found.loss_fn, found.batch_loss


def _overrides_train_dataloader(model: nn.Module) -> bool:
    try:
        from lightning.pytorch import LightningModule
        from lightning.pytorch.utilities.model_helpers import is_overridden
    except ImportError:
        return callable(getattr(model, "train_dataloader", None))
    if isinstance(model, LightningModule):
        return is_overridden("train_dataloader", model)
    return callable(getattr(model, "train_dataloader", None))


def _data_from_file(path: Path) -> Any:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    tensors = obj.get("tensors") if isinstance(obj, Mapping) else obj
    if not isinstance(tensors, (list, tuple)) or not all(
        isinstance(t, torch.Tensor) for t in tensors
    ):
        raise ValueError(f"{path} does not hold a list of tensors; save (inputs, targets) with "
                         "torch.save")
    return tuple(tensors) if len(tensors) == 2 else TensorDataset(*tensors)


def _inside(path: str | os.PathLike, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


def _inside_run(root: Path, name: str) -> Path:
    """``root / name``, refused unless it stays inside the run directory ``root``."""
    path = root / name
    if not name or not _inside(path, root):
        raise ValueError(f"{root / RUN_FILE} names the data file {name!r}, outside the run "
                         "directory; pass --data FILE.pt")
    return path


def _cli_class_path(root: Path) -> str | None:
    """The model class of a LightningCLI run (``config.yaml``: ``model.class_path``)."""
    import yaml

    for path in sorted(root.rglob("config.yaml")):
        try:
            cfg = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        model = cfg.get("model") if isinstance(cfg, dict) else None
        if isinstance(model, dict) and isinstance(model.get("class_path"), str):
            cp = model["class_path"]
            mod, _, name = cp.rpartition(".")
            return f"{mod}:{name}" if mod else None
    return None


def load_object(spec: str) -> Any:
    """Import ``"package.module:Qualified.name"`` or ``"path/to/file.py:name"``.

    For what the user names (an argument or a command-line option): this runs that code. A
    file is imported under another module name, so a script's ``if __name__ == "__main__":``
    block does not run. What a run directory names goes through :func:`recorded_class`.
    """
    mod_name, sep, qualname = spec.rpartition(":")
    if not sep or not mod_name or not qualname:
        raise ValueError(f"{spec!r} is not an import path; write package.module:Name or "
                         "path/to/file.py:Name")
    if mod_name.endswith(".py"):
        file = Path(mod_name)
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist (from {spec!r})")
        name = f"_devinterp_user_{abs(hash(str(file.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            spec_ = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[name] = module
            spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"cannot import {mod_name!r} (from {spec!r}): {e}; check the "
                             "path, or run from the directory that makes it importable") from e
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"{mod_name!r} has no {qualname!r} (from {spec!r})") from e
    return obj


def _user_class(module: type[nn.Module] | str) -> type[nn.Module]:
    """The class passed as ``module`` / ``--module``, which must be an ``nn.Module``."""
    cls = load_object(module) if isinstance(module, str) else module
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"--module {module!r} is not a torch.nn.Module class; name the "
                         "LightningModule or nn.Module the snapshots belong to")
    return cls


def recorded_class(spec: Any, base: type, what: str, run_dir: Path, *,
                   script: str | None = None) -> type:
    """The class that a run directory's metadata (``what``) names, if it may be built.

    A run directory from someone else is untrusted input, and building what it names runs
    code. So the name must be ``package.module:Class`` of an installed or importable package
    that does not live inside the run directory, the module is checked before it is
    imported, and the object must be a subclass of ``base`` (``nn.Module`` or
    ``LightningDataModule``): never a function (``os:system``) and never a ``.py`` file
    (``script``: the file a class defined in ``__main__`` came from, suggested to the user).
    """
    trust = "a run directory is untrusted input, so devinterp estimate does not import it"
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} names {spec!r}, not package.module:Class; pass --module")
    mod_name, _, qualname = spec.rpartition(":")
    if mod_name == "__main__" or mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
        file = script if mod_name == "__main__" and script else mod_name
        raise ValueError(f"{what} names {spec!r}, a class from a script file; {trust}: if you "
                         f"trust {file}, pass --module {file}:{qualname}")
    for name in (mod_name.split(".")[0], mod_name):
        try:
            found = importlib.util.find_spec(name)  # imports parent packages only (checked)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ValueError(f"{what} names {spec!r}, but {name!r} is not an installed or "
                             "importable package; install it, or pass --module")
        places = [found.origin, *(found.submodule_search_locations or [])]
        if any(p and p not in ("built-in", "frozen") and _inside(p, run_dir) for p in places):
            raise ValueError(f"{what} names {spec!r}, which would be imported from inside the "
                             f"run directory {run_dir}; {trust}: pass --module if you trust it")
    obj = load_object(spec)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise ValueError(f"{what} names {spec!r}, which is not a {base.__qualname__} subclass; "
                         f"{trust} unless it names a model or datamodule class: pass --module "
                         "(and --data/--loss) yourself")
    return obj


#: Where a recorded loss function may come from, besides the model class's own package.
_LOSS_MODULES = ("torch.nn.functional",)


def _check_recorded_loss(meta: Mapping[str, Any], loss_fn: Any, batch_loss: Any,
                         cls: type, run_dir: Path) -> None:
    """Refuse a loss function named by ``run.json`` (and not passed by the user) unless it is
    from ``torch.nn.functional`` or the model class's own package, checked as
    :func:`recorded_class` checks classes."""
    recipe = meta.get("loss") or {}
    if loss_fn is not None or batch_loss is not None or recipe.get("kind") != "function":
        return
    path = recipe.get("path")
    mod_name = str(path).rpartition(":")[0]
    package = cls.__module__.split(".")[0]
    allowed = mod_name in _LOSS_MODULES or (
        package != "__main__" and not package.startswith("_devinterp_user_")
        and mod_name.split(".")[0] == package
    )
    where = f"{run_dir / RUN_FILE} (loss.path)"
    if not allowed or mod_name.endswith(".py") or "/" in mod_name:
        raise ValueError(f"{where} names the loss {path!r}, outside torch.nn.functional and "
                         f"the model's package; a run directory is untrusted input, so it is "
                         f"not imported: pass --loss {path} if you trust it")
    found = importlib.util.find_spec(mod_name.split(".")[0])
    if found is not None and found.origin and _inside(found.origin, run_dir):
        raise ValueError(f"{where} names {path!r}, inside the run directory; pass --loss")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="devinterp estimate",
        description="Estimate λ̂ for the weight snapshots (or Lightning .ckpt files) of a run "
                    "directory and write them to its λ̂ table. A run directory is untrusted "
                    "input: only model and datamodule classes of installed packages are built "
                    "from what it records.",
    )
    p.add_argument("run_dir", help="run directory (LLCCallback dirpath, or a .ckpt folder)")
    p.add_argument("--module", help="model class, package.module:Class or file.py:Class")
    p.add_argument("--data", help="package.module:function returning the data, or FILE.pt")
    p.add_argument("--loss", help="package.module:function(outputs, targets) -> mean loss")
    p.add_argument("--steps", help="comma-separated steps to estimate (default: all)")
    p.add_argument("--out", metavar="DIR",
                   help="write λ̂ into this run directory instead (e.g. one per weight-refined "
                   "curve); it gets RUN_DIR's run.json and training metrics. Default for a "
                   "folder of .ckpt files: the sibling FOLDER-llc")
    p.add_argument("--force", action="store_true",
                   help="re-estimate steps already done (needed to change the settings of a "
                        "table: every snapshot is then re-estimated, so rows never mix)")
    p.add_argument("--workers", type=int, help="number of processes sharing the snapshots; "
                   "without --rank (and outside torchrun) this command launches them "
                   "(default: $WORLD_SIZE or 1)")
    p.add_argument("--rank", type=int, help="this process's index (default: $RANK or 0)")
    p.add_argument("--device", help="where to sample, e.g. cuda:0 (default: cpu)")
    add_threads_argument(p, default="the estimator's own choice")
    p.add_argument("--no-traces", action="store_true", help="do not save loss traces")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--wandb", action="store_true",
                   help="afterwards, log every λ̂ row to the run's W&B run (recorded by the "
                        "callback) on the trainer/global_step axis")
    g = p.add_argument_group("sampler settings (default: the run's settings.json)")
    g.add_argument("--num-chains", type=int)
    g.add_argument("--num-draws", type=int)
    g.add_argument("--num-burnin", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--step-size", type=_step_size)
    g.add_argument("--localization", type=float)
    g.add_argument("--nbeta", type=float)
    g.add_argument("--sampler", choices=["sgld", "rmsprop_sgld"])
    g.add_argument("--seed", type=int)
    g.add_argument("--num-samples", type=int)
    g.add_argument("--chain-chunk-size", type=int)
    g.add_argument("--weights", type=_patterns, metavar="PATTERNS",
                   help="weight-refined λ̂: comma-separated parameter names or fnmatch patterns "
                   "SGLD moves (the rest stay at the snapshot), e.g. 'blocks.0.attn.*'")
    return p


def _step_size(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def _patterns(text: str) -> list[str]:
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"--weights needs at least one parameter name or pattern, got {text!r}")
    return patterns


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    """``devinterp estimate``; returns 1 when a snapshot could not be read, else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.wandb and args.out:
        raise ValueError("--wandb adds λ̂ to the training run's W&B curve llc/*; with --out that "
                         "would mix two curves: drop --wandb (or --out)")
    workers = args.workers if args.workers is not None else int(os.environ.get("WORLD_SIZE", 1))
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    if workers < 1 or not 0 <= rank < workers:
        raise ValueError(f"need --workers >= 1 and 0 <= --rank < --workers, got "
                         f"--workers {workers} --rank {rank}")
    steps = None
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"--steps must be comma-separated integers, got {args.steps!r}") from e
    options = {k: getattr(args, k) for k in ESTIMATOR_OPTIONS if getattr(args, k, None) is not None}
    check_options(options, label=_flag)
    check_device(args.device)
    apply_threads(args.threads)  # here and in the workers launched below
    if workers > 1 and args.rank is None and "RANK" not in os.environ:
        run_dir = _default_out(RunStore(args.run_dir), args.out) or args.run_dir
        code = _launch(argv, workers)
    else:
        try:
            report = estimate_run(
                args.run_dir, module=args.module, data=args.data, loss_fn=args.loss,
                steps=steps, out=args.out, force=args.force, workers=workers, rank=rank,
                device=args.device, save_traces=not args.no_traces, progress=not args.quiet,
                **options,
            )
        except (FileNotFoundError, NotADirectoryError, PermissionError):  # one line already
            raise
        except OSError as e:  # e.g. a full disk: the rows written so far are whole and kept
            raise UsageError(f"cannot write {e.filename or 'the run directory'}: "
                             f"{e.strerror or e}; the λ̂ rows written so far are kept: free "
                             "space (or choose --out DIR) and run again to continue") from e
        if not args.quiet:
            print(f"devinterp estimate: {len(report.estimated)} estimated, {len(report.failed)} "
                  f"failed, {len(report.skipped)} already done, {len(report.unreadable)} "
                  f"unreadable ({report.run_dir})")
        code, run_dir = (1 if report.unreadable else 0), report.run_dir
        if workers > 1:  # the other workers may still be writing: no stages or W&B yet
            if rank == 0:
                print(f"devinterp estimate: when every worker is done, `devinterp estimate "
                      f"{run_dir}{' --wandb' if args.wandb else ''}` writes stages.json"
                      f"{' and logs to W&B' if args.wandb else ''}", file=sys.stderr)
            return code
    if code == 2:
        return code
    stages = write_stages(run_dir)
    if args.wandb:
        log_to_wandb(run_dir, stages=stages)
    return code


def _launch(argv: list[str], workers: int) -> int:
    """Run this command as ``workers`` processes (``--rank 0`` … ``--rank N-1``), wait for
    them, and return the worst exit code. Stages and W&B are left to this process."""
    child = [a for a in argv if a != "--wandb"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    procs = [subprocess.Popen([sys.executable, "-m", "devinterp", "estimate", *child,
                               "--workers", str(workers), "--rank", str(r)], env=env)
             for r in range(workers)]
    codes = [p.wait() for p in procs]
    for r, c in enumerate(codes):
        if c not in (0, 1):
            print(f"devinterp estimate: worker {r} of {workers} exited with code {c}",
                  file=sys.stderr)
    return 2 if any(c not in (0, 1) for c in codes) else max(codes)


def write_stages(run_dir: str | os.PathLike) -> list[dict]:
    """Detect the stages of the λ̂ curve and write ``stages.json`` (as inline training does at
    its end); a failure is a warning on stderr, not an error: the λ̂ rows are saved."""
    from devinterp.stages import detect_and_write

    try:
        return detect_and_write(run_dir)
    except Exception as e:  # the λ̂ table is the result; stages can be detected again
        print(f"devinterp estimate: warning: no stages.json ({first_line(e)}); the λ̂ rows are "
              f"saved, detect stages with `devinterp stages {run_dir}`", file=sys.stderr)
        return []


def log_to_wandb(run_dir: str | os.PathLike, *, stages: list[dict] | None = None) -> int:
    """Log every ``ok`` λ̂ row to the W&B run recorded in ``run.json``, on the
    ``trainer/global_step`` axis (so the values line up with the loss even though they arrive
    after training), with ``stage/index`` once there are enough rows for stages (``stages``,
    else detected and written here), then attach the dashboard page, as the callback does at
    the end of inline training. Returns the number of rows logged."""
    import wandb

    from devinterp.dashboard import log_to_wandb as attach_dashboard
    from devinterp.stages import stage_index

    store = RunStore(run_dir)
    info = (store.read_json(RUN_FILE, {}) or {}).get("wandb")
    if not info:
        raise ValueError(f"{store.path / RUN_FILE} records no W&B run; train with a WandbLogger "
                         "and LLCCallback to use --wandb")
    table = store.read_table(LLC_FILE)
    run = wandb.init(id=info["id"], project=info.get("project"), entity=info.get("entity"),
                     dir=info.get("save_dir"), resume="allow")
    try:
        run.define_metric("trainer/global_step")
        run.define_metric("llc/*", step_metric="trainer/global_step")
        run.define_metric("stage/*", step_metric="trainer/global_step")
        if stages is None:
            stages = write_stages(store.path)
        n = 0
        for row in table.to_dict("records"):
            if row.get("status", "ok") != "ok":
                continue
            values = {"mean": row["llc_mean"], "std": row["llc_std"],
                      **{k: row[k] for k in _WANDB_COLUMNS if k in row}}
            metrics = {f"llc/{k}": float(v) for k, v in values.items() if math.isfinite(v)}
            if stages:
                metrics["stage/index"] = float(stage_index(stages, int(row["step"])))
            run.log({**metrics, "trainer/global_step": int(row["step"])})
            n += 1
        attach_dashboard(store.path, run)
    finally:
        run.finish()
    return n


_WANDB_COLUMNS = ("init_loss", "mala_acceptance", "rhat", "ess", "frac_below_baseline",
                  "num_diverged", "step_size", "nbeta")
