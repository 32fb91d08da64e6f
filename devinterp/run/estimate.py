"""Post-hoc λ̂: :func:`estimate_run` estimates the weight snapshots or Lightning checkpoints of a
run directory and writes the rows to its run store (``devinterp estimate`` is its command line).

A run directory written by :class:`devinterp.LLCCallback` (typically in ``mode="deferred"``)
records what rebuilds the model, data and loss (``run.json``) and the sampler settings
(``settings.json``); a directory holding only Lightning ``ModelCheckpoint`` ``.ckpt`` files
works too, given the module class (``--module``, or found in the checkpoint) and, when the module
cannot provide them, the data and loss; its λ̂ table goes to a sibling directory
(``CKPT_DIR-llc``, or ``--out``), never into the checkpoint folder. Steps already in the λ̂ table
are skipped (``--force`` re-estimates them), unless their snapshot was rewritten since. Several
processes (``--workers N``, which launches them, or ``--workers N --rank R`` per process, or
``torchrun``, which sets ``RANK``/``WORLD_SIZE``) split the snapshots and share the run store.

A run directory is untrusted input: what it records is rebuilt by :mod:`devinterp.run.rebuild`,
which loads weights only and builds only model and datamodule classes of installed packages.

One λ̂ table never mixes sampler settings: every row carries a ``settings_id``; options that
differ from the rows already there, or a table that already mixes them, are refused unless
``--force`` re-estimates every snapshot; ``settings.json`` is updated only once a row with the
new settings is written. An unreadable snapshot is named on stderr and skipped (exit code 1); a
snapshot whose loss is not finite gets a failed row and the others are still estimated.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from devinterp.run.options import check_device, check_job, check_options
from devinterp.run.rebuild import (
    ModelBuilder,
    Source,
    UnreadableSnapshot,
    check_recorded_loss,
    load_checkpoint,
    read_meta,
)
from devinterp.run.store import (
    LLC_FILE,
    METRICS_FILE,
    RUN_FILE,
    SETTINGS_FILE,
    MixedSettingsError,
    RunStore,
    file_sha256,
    settings_id,
)
from devinterp.tracking import (
    ESTIMATOR_OPTIONS,
    EstimateFailure,
    RunCalibration,
    describe,
    estimator_kwargs,
    first_line,
    record_result,
    resolved_num_chains,
    run_estimator,
    weights_finite,
)
from devinterp.tracking.probes import ProbeRecording, kept_probes, load_probes

__all__ = ["EstimateReport", "default_out", "estimate_run", "estimate_run_components",
           "write_stages_or_warn"]

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


def _report_unreadable(report: EstimateReport, path: Path, reason: str) -> None:
    report.unreadable[str(path)] = reason
    print(f"devinterp estimate: cannot read {path} ({reason}); skipped", file=sys.stderr,
          flush=True)



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
    probes: Any = None,
    influence_train: int | None = None,
    **options: Any,
) -> EstimateReport:
    # Longer than 60 lines: the docstring is the API reference; the body is 20 lines.
    """Estimate λ̂ for the snapshots of ``run_dir`` and write the rows to its run store.

    Args:
        run_dir: a run directory (``LLCCallback``'s ``dirpath``), or any directory holding
            Lightning ``.ckpt`` files (searched recursively).
        module: the LightningModule / ``nn.Module`` class, or ``"pkg.mod:Class"`` /
            ``"path/to/file.py:Class"``. Default: from ``run.json``, the checkpoint, or a
            LightningCLI ``config.yaml`` in the directory, checked as
            :mod:`devinterp.run.rebuild` says. It is built from the recorded hyperparameters
            (``save_hyperparameters``).
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
        probes: also record the Bayesian influence of ``influence_train`` training samples on
            these probe samples at every snapshot, from the λ̂ estimate's draws, into
            ``influence/`` (as ``LLCCallback(probes=...)`` does inline): ``(inputs, targets)``
            tensors, a Dataset, a DataLoader, or a ``.pt`` file of them. Default: the probes
            a deferred run kept (``settings.json``'s ``probes``), if any.
        influence_train: training samples whose influence is recorded (default: the run's,
            else :data:`devinterp.influence.DEFAULT_NUM_TRAIN`).
        **options: estimator options overriding ``settings.json`` (``num_chains``, ...).

    Returns:
        An :class:`EstimateReport`.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no snapshot.
        ValueError: bad options; the model, data or loss cannot be rebuilt, or the run
            directory names code it may not run (the message names the option that supplies
            it); or the options (or another process's rows) would mix sampler settings in one
            λ̂ table (:class:`~devinterp.run.store.MixedSettingsError` for the latter).
    """
    check_job(workers, rank, threads)
    check_device(device)
    job = _Job(run_dir, out=out, steps=steps, force=force, options=options)
    job.probes = _probe_recording(job, probes, influence_train)
    builder = ModelBuilder(job.store, job.meta, module, device)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    calibrated = False
    try:
        for src in job.sources[rank::workers]:
            model = job.model(builder, src)
            if model is None:
                continue
            check_recorded_loss(job.meta, loss_fn, batch_loss, type(model), job.store.path)
            if not calibrated:  # only once something is to be estimated
                job.calibrate(builder, data, loss_fn, batch_loss,
                              recalibrate=force and workers == 1)
                calibrated = True
                model = builder.load(src)  # the builder's one module held other weights
            the_data = builder.data(model, data)
            the_loss, the_batch_loss = builder.loss(model, loss_fn, batch_loss)
            job.estimate(src, model, the_data, the_loss, the_batch_loss,
                         save_traces=save_traces, progress=progress)
    finally:
        torch.set_num_threads(threads_before)
        job.target.row_settings, job.target.row_sources, job.target.row_guard = None, {}, None
    return job.report


def estimate_run_components(
    run_dir: str | os.PathLike,
    components: str | Mapping[str, Any],
    *,
    module: type[nn.Module] | str | None = None,
    data: Any = None,
    loss_fn: Callable[..., torch.Tensor] | str | None = None,
    batch_loss: Callable[..., torch.Tensor] | None = None,
    steps: list[int] | None = None,
    force: bool = False,
    device: str | None = None,
    threads: int | None = None,
    **options: Any,
) -> EstimateReport:
    """One λ̂ curve per component (``"heads"``, ``"layers"``, ``"mlps"`` or a mapping, as
    :func:`devinterp.resolve_components` takes) for the weight snapshots of ``run_dir``, into
    its long table ``llc_components.csv``, then ``stages_components.json``: what
    ``devinterp estimate RUN --components heads`` runs.

    The model, data and loss are rebuilt as :func:`estimate_run` rebuilds them (same
    arguments), and the sampler settings are ``settings.json``'s with ``options`` on top, so
    the curves equal those ``LLCCallback(components=...)`` writes inline. A step whose every
    component already has a row is skipped unless ``force``. Returns an
    :class:`EstimateReport` (``failed``: steps with a failed component row)."""
    from devinterp.components import resolve_components
    from devinterp.tracking.components import estimate_component_curves

    check_job(1, 0, threads)
    check_device(device)
    overrides = check_options(estimator_kwargs(dict(options)))
    store = RunStore(run_dir)
    meta = read_meta(store)
    template = _read_settings(store)
    base = {k: template[k] for k in ESTIMATOR_OPTIONS if template.get(k) is not None}
    check_options(base, where=f"in {store.path / SETTINGS_FILE}")
    snaps = store.snapshots()
    if not snaps:
        raise FileNotFoundError(f"{store.path} holds no weight snapshot (snapshots/step_*.pt) "
                                "for component curves; train with LLCCallback(dirpath=...)")
    report = EstimateReport(store.path)
    builder = ModelBuilder(store, meta, module, device)
    model = _first_loadable(builder, snaps, report)
    check_recorded_loss(meta, loss_fn, batch_loss, type(model), store.path)
    the_data = builder.data(model, data)
    the_loss, the_batch_loss = builder.loss(model, loss_fn, batch_loss)
    names = set(resolve_components(model, components))
    table = store.read_components()
    done = {int(s) for s, g in table.groupby("step") if names <= set(g["component"])}
    wanted = sorted(snaps) if steps is None else sorted({int(s) for s in steps})
    report.skipped = [s for s in wanted if s in done and not force]
    todo = [s for s in wanted if s not in report.skipped]
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = estimate_component_curves(store, model, the_data, components, loss_fn=the_loss,
                                         batch_loss=the_batch_loss,
                                         options={**base, **overrides}, steps=todo)
    finally:
        torch.set_num_threads(threads_before)
    failed = {int(r["step"]) for r in rows if r.get("status") != "ok"}
    report.failed = sorted(failed)
    report.estimated = [s for s in todo if s not in failed]
    return report


def _first_loadable(builder: ModelBuilder, snaps: Mapping[int, Path],
                    report: EstimateReport) -> nn.Module:
    """The model built from the first readable snapshot (every step's weights are loaded
    into it in turn); unreadable ones are named on stderr."""
    for step, path in snaps.items():
        try:
            return builder.load(Source(step, path, "snapshot"))
        except UnreadableSnapshot as e:
            _report_unreadable(report, path, str(e))
    raise ValueError(f"no snapshot of {builder.store.path} could be read (named above); "
                     "restore them or train again")


class _Job:
    """One :func:`estimate_run`, planned and checked before anything is written: which
    snapshots, which table, which settings; then the snapshots one at a time."""

    def __init__(self, run_dir: str | os.PathLike, *, out: str | os.PathLike | None,
                 steps: list[int] | None, force: bool, options: Mapping[str, Any]) -> None:
        overrides = check_options(estimator_kwargs(dict(options)))
        self.store = RunStore(run_dir)
        self.meta = read_meta(self.store)
        resolved = default_out(self.store, out)
        #: Rows go to ``<ckpt folder>-llc``, a directory the user did not name: say so.
        self.redirected = out is None and resolved is not None
        self.target = (self.store if resolved is None
                       else _output_store(self.store, Path(resolved), self.meta))
        self.report = EstimateReport(self.target.path)
        self.template = _read_settings(self.target) or (
            _read_settings(self.store) if self.target is not self.store else {})
        base = {k: self.template[k] for k in ESTIMATOR_OPTIONS
                if self.template.get(k) is not None}
        check_options(base, where=f"in {self.target.path / SETTINGS_FILE}")
        self.options = {**base, **overrides}
        self.force, self.settings_recorded = force, False
        self.all_sources: list[Source] = []
        self.sources = self._sources(steps)
        self.calibration = RunCalibration(self.target, self.options)
        self.probes: ProbeRecording | None = None
        table = self.target.read_table(LLC_FILE)
        sid = settings_id(self.options)
        legacy = settings_id(self.template) if self.template else sid  # rows without an id
        changed = {k: v for k, v in overrides.items() if base.get(k) != v}
        _check_table_settings(self.target, table, sid, legacy, changed, base, force,
                              {s.step for s in self.sources})
        self.done = {int(r["step"]): r for r in table.to_dict("records")}
        #: Steps of this job (all workers) not yet written here.
        self.pending = {s.step for s in self.sources}
        self.target.row_settings = self.options
        self.target.row_sources = {s.step: s.path for s in self.sources}
        self.target.row_guard = _settings_guard(self.target, sid, legacy, self.pending)

    def _sources(self, steps: list[int] | None) -> list[Source]:
        sources = _discover(self.store, self.report)
        self.all_sources = sources
        if not sources and not self.report.unreadable:
            raise FileNotFoundError(
                f"{self.store.path} holds no snapshot (snapshots/step_*.pt) and no Lightning "
                ".ckpt file; train with LLCCallback(dirpath=...) or point at a ModelCheckpoint "
                "directory"
            )
        if steps is None:
            return sources
        wanted = {int(s) for s in steps}
        return [s for s in sources if s.step in wanted]

    def model(self, builder: ModelBuilder, src: Source) -> nn.Module | None:
        """The model at ``src``, or None when its row is done or the file is unreadable."""
        if (src.step in self.done and not self.force
                and not _snapshot_changed(self.done[src.step], src)):
            self.report.skipped.append(src.step)
            self.pending.discard(src.step)
            return None
        try:
            return builder.load(src)
        except UnreadableSnapshot as e:
            _report_unreadable(self.report, src.path, str(e))
            self.pending.discard(src.step)
            return None

    def calibrate(self, builder: ModelBuilder, data: Any, loss_fn: Any, batch_loss: Any,
                  recalibrate: bool) -> None:
        """Choose the run's sampler settings on its early and last checkpoints (all of the
        run's snapshots count, not only this job's ``steps``), unless they are chosen already;
        ``recalibrate`` forgets earlier ones first (``force`` in a single process)."""
        if not self.calibration.active:
            return
        if recalibrate:
            self.calibration.forget()
        by_step = {s.step: s for s in self.all_sources}

        def probe_at(step: int) -> dict[str, Any]:
            model = builder.load(by_step[step])
            the_data = builder.data(model, data)
            the_loss, the_batch_loss = builder.loss(model, loss_fn, batch_loss)
            return self.calibration.probe(model, the_data, loss_fn=the_loss,
                                          batch_loss=the_batch_loss)

        entry = self.calibration.calibrate_posthoc(list(by_step), probe_at)
        if entry is None:
            print("devinterp estimate: no checkpoint could be calibrated "
                  f"({self.calibration.failed_reason}); each chooses its own step size",
                  file=sys.stderr, flush=True)
        else:
            on = ", ".join(f"{c['step']} (ε {c['step_size']:.3g})"
                           for c in entry["calibrated_on"])
            print(f"devinterp estimate: run settings ε = {entry['step_size']:.4g}, nβ = "
                  f"{entry['nbeta']:.4g}, calibrated on steps {on}", file=sys.stderr,
                  flush=True)

    def estimate(self, src: Source, model: nn.Module, data: Any, loss_fn: Callable | None,
                 batch_loss: Callable | None, *, save_traces: bool, progress: bool) -> None:
        """Estimate ``model`` (the weights of ``src``) with the run's settings and write its
        row; a failure that says ε is too large lowers it from here on."""
        start = time.perf_counter()
        mark = ""
        recording: dict[str, Any] = {"recorder": None, "error": None}

        def run(opts: Mapping[str, Any]) -> Any:
            recorders = []
            if self.probes is not None:  # a fresh recorder per attempt (ε may be lowered)
                recording["recorder"], recording["error"] = self.probes.recorder(
                    data, num_chains=resolved_num_chains(opts))
                recorders = [recording["recorder"]] if recording["recorder"] else []
            return run_estimator(model, data, loss_fn=loss_fn, batch_loss=batch_loss,
                                 options=opts, recorders=recorders)

        if not weights_finite(model):
            result: Any = EstimateFailure("non-finite weights at this step")
        else:
            result, mark = self.calibration.estimate(src.step, run)
        row = record_result(self.target, src.step, result, save_trace=save_traces,
                            extra={"calibration": mark} if mark else None)
        if self.probes is not None:
            reason = self.probes.write(src.step, result, recording["recorder"],
                                       recording["error"])
            if reason is not None:
                print(f"devinterp estimate: no probe influence at step {src.step} ({reason}); "
                      "its influence row is marked failed", file=sys.stderr, flush=True)
        if mark == "lowered":
            print(f"devinterp estimate: step {src.step}: the run's step size was too large "
                  f"here ({self.calibration.record()['changes'][-1]['reason']}); lowered to "
                  f"{row.get('step_size', float('nan')):.4g} from this step on",
                  file=sys.stderr, flush=True)
        self.pending.discard(src.step)
        if not self.settings_recorded:
            _record_settings(self.target, self.options, self.template)
            self.settings_recorded = True
            if self.redirected:
                print(f"devinterp estimate: {self.store.path} holds Lightning checkpoints; "
                      f"writing λ̂ to the run directory {self.target.path} (--out DIR to "
                      "choose another)", file=sys.stderr, flush=True)
        if row["status"] == "ok":
            self.report.estimated.append(src.step)
        else:
            self.report.failed.append(src.step)
            print(f"devinterp estimate: step {src.step} failed ({row['reason']}); the "
                  "other snapshots are estimated", file=sys.stderr, flush=True)
        if progress:
            print(describe(row, time.perf_counter() - start), flush=True)


def _probe_recording(job: _Job, probes: Any, influence_train: int | None
                     ) -> ProbeRecording | None:
    """The probe influence this job records: the given probes (a ``.pt`` path is loaded),
    else those a deferred run kept, else None."""
    if probes is None and job.template.get("probes"):
        probes = kept_probes(job.store.path, str(job.template["probes"]))
    if probes is None:
        return None
    if isinstance(probes, (str, os.PathLike)):
        probes = load_probes(probes)
    if influence_train is None:
        influence_train = job.template.get("influence_train")
    if influence_train is not None and (not isinstance(influence_train, int)
                                        or influence_train < 1):
        raise ValueError(f"influence_train must be an integer >= 1, got {influence_train!r}")
    return ProbeRecording(job.target, probes, num_train=influence_train,
                          seed=int(job.options.get("seed") or 0))


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
def default_out(store: RunStore, out: str | os.PathLike | None) -> str | os.PathLike | None:
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


def _snapshot_changed(row: Mapping[str, Any], src: Source) -> bool:
    """True when ``src`` is no longer the file the row was estimated from (e.g. resumed
    training rewrote the snapshot): its row is stale and is estimated again."""
    digest = row.get("snapshot_sha256")
    if not isinstance(digest, str) or not digest:
        return False
    try:
        changed = file_sha256(src.path) != digest
    except (OSError, ValueError):  # gone, or no longer a regular file
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
def _discover(store: RunStore, report: EstimateReport) -> list[Source]:
    """Snapshots and checkpoints by step (a snapshot wins over a checkpoint of the same step)."""
    found: dict[int, Source] = {}
    for step, path in store.snapshots().items():
        found[step] = Source(step, path, "snapshot")
    for path in sorted(store.path.rglob("*.ckpt")):
        m = _CKPT_STEP.search(path.name)
        try:
            step = int(m.group(1)) if m else int(load_checkpoint(path, mmap=True)["global_step"])
        except Exception as e:  # truncated, corrupt, not a checkpoint, unsafe pickle, ...
            _report_unreadable(report, path, first_line(e))
            continue
        found.setdefault(step, Source(step, path, "ckpt"))
    return [found[s] for s in sorted(found)]


def write_stages_or_warn(run_dir: str | os.PathLike) -> list[dict]:
    """Detect the stages of the λ̂ curve and write ``stages.json`` (as inline training does at
    its end); a failure is a warning on stderr, not an error: the λ̂ rows are saved."""
    from devinterp.stages import detect_and_write

    try:
        return detect_and_write(run_dir)
    except Exception as e:  # the λ̂ table is the result; stages can be detected again
        print(f"devinterp estimate: warning: no stages.json ({first_line(e)}); the λ̂ rows are "
              f"saved, detect stages with `devinterp stages {run_dir}`", file=sys.stderr)
        return []

