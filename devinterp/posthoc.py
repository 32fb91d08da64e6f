"""``devinterp estimate RUN_DIR``: λ̂ for the weight snapshots or Lightning checkpoints of a run.

A run directory written by :class:`devinterp.LLCCallback` (typically in ``mode="deferred"``)
records what rebuilds the model, data and loss (``run.json``) and the sampler settings
(``settings.json``); a directory holding only Lightning ``ModelCheckpoint`` ``.ckpt`` files
works too, given the module class (``--module``, or found in the checkpoint) and, when the module
cannot provide them, the data and loss. Steps already in the λ̂ table are skipped (``--force``
re-estimates them). Several processes (``--workers N --rank R``, or ``torchrun`` which sets
``RANK``/``WORLD_SIZE``) split the snapshots between them and share the run store safely.

An unreadable snapshot is named on stderr and skipped; the exit code is then 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from devinterp.cli import ArgumentParser
from devinterp.fabric import (
    ESTIMATOR_OPTIONS,
    describe,
    estimator_kwargs,
    module_loss,
    record_result,
    run_estimator,
    training_data,
    weights_finite,
    write_settings,
)
from devinterp.store import LLC_FILE, METRICS_FILE, RUN_FILE, SETTINGS_FILE, RunStore

_CKPT_STEP = re.compile(r"step=(\d+)")


@dataclass
class EstimateReport:
    """What :func:`estimate_run` did, by training step.

    Attributes:
        estimated: steps whose λ̂ row was written with ``status="ok"``.
        failed: steps whose row was written with ``status="failed"`` (e.g. all chains diverged).
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
            LightningCLI ``config.yaml`` in the directory. It is built from the recorded
            hyperparameters (``save_hyperparameters``).
        data: Dataset, DataLoader, ``(inputs, targets)`` tensors, ``"pkg.mod:function"``
            returning one of them, or a ``.pt`` file of tensors. Default: as recorded in
            ``run.json``, else the module's ``llc_data`` or ``train_dataloader().dataset``.
        loss_fn: ``loss_fn(outputs, targets)`` or ``"pkg.mod:function"``. Default: as recorded,
            else the module's ``llc_batch_loss`` method or ``loss_fn`` attribute.
        batch_loss: ``batch_loss(forward, batch)`` instead of ``loss_fn``.
        steps: only these steps. Default: every snapshot.
        out: write the λ̂ table, traces and settings into this run directory instead (created,
            starting from ``run_dir``'s ``run.json``, ``settings.json`` and ``metrics.csv``),
            e.g. one directory per weight-refined λ̂ curve of one training run; snapshots are
            read from ``run_dir``.
        force: re-estimate steps already in the table.
        workers, rank: this process takes every ``workers``-th snapshot starting at ``rank``.
        device: where to sample (default: CPU).
        save_traces: save per-chain loss traces, shape (chain, draw).
        progress: print one line per estimate.
        **options: estimator options overriding ``settings.json`` (``num_chains``, ...).

    Returns:
        An :class:`EstimateReport`.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no snapshot.
        ValueError: the model, data or loss cannot be rebuilt (the message names the option
            that supplies it), or options conflict with the settings of existing rows.
    """
    if workers < 1 or not 0 <= rank < workers:
        raise ValueError(f"need workers >= 1 and 0 <= rank < workers, got workers={workers}, "
                         f"rank={rank}")
    store = RunStore(run_dir)
    meta = store.read_json(RUN_FILE, {}) or {}
    target = store if out is None else _output_store(store, Path(out), meta)
    report = EstimateReport(target.path)
    options = _settings(target, estimator_kwargs(options), force)
    sources = _discover(store, report)
    if not sources and not report.unreadable:
        raise FileNotFoundError(
            f"{store.path} holds no snapshot (snapshots/step_*.pt) and no Lightning .ckpt file; "
            "train with LLCCallback(dirpath=...) or point at a ModelCheckpoint directory"
        )
    if steps is not None:
        wanted = {int(s) for s in steps}
        sources = [s for s in sources if s.step in wanted]
    mine = sources[rank::workers]
    existing = set(target.read_table(LLC_FILE)["step"].tolist())
    builder = _ModelBuilder(store, meta, module, device)
    for src in mine:
        if src.step in existing and not force:
            report.skipped.append(src.step)
            continue
        try:
            model = builder.load(src)
        except UnreadableSnapshot as e:
            _report_unreadable(report, src.path, str(e))
            continue
        the_data = builder.data(model, data)
        the_loss, the_batch_loss = builder.loss(model, loss_fn, batch_loss)
        start = time.perf_counter()
        if not weights_finite(model):
            result: Any = "non-finite weights at this step"
        else:
            result = run_estimator(model, the_data, loss_fn=the_loss, batch_loss=the_batch_loss,
                                   options=options)
        row = record_result(target, src.step, result, save_trace=save_traces)
        (report.estimated if row["status"] == "ok" else report.failed).append(src.step)
        if progress:
            print(describe(row, time.perf_counter() - start), flush=True)
    return report


def _output_store(source: RunStore, out: Path, meta: Mapping[str, Any]) -> RunStore:
    """The run directory ``out`` for λ̂ of ``source``'s snapshots: it gets ``source``'s
    ``run.json`` (named after ``out``, pointing at ``source``), sampler settings and training
    metrics, so the dashboard and stage detector read it as a run of its own."""
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
    settings = source.read_json(SETTINGS_FILE)
    if settings is not None and target.read_json(SETTINGS_FILE) is None:
        target.write_json(SETTINGS_FILE, settings)  # the same sampler, unless overridden
    metrics = source.read_table(METRICS_FILE)
    if len(metrics) and not len(target.read_table(METRICS_FILE)):
        target.write_metrics(metrics.to_dict("records"))
    return target


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
            _report_unreadable(report, path, _first_line(e))
            continue
        found.setdefault(step, _Source(step, path, "ckpt"))
    return [found[s] for s in sorted(found)]


def _load_ckpt(path: Path, mmap: bool = False) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError("not a Lightning checkpoint (no 'state_dict')")
    return dict(ckpt)


def _settings(store: RunStore, overrides: dict[str, Any], force: bool) -> dict[str, Any]:
    """Sampler settings: ``settings.json`` with ``overrides`` on top (recorded if new)."""
    stored = store.read_json(SETTINGS_FILE)
    if stored is None:
        write_settings(store, overrides)
        return overrides
    base = {k: stored.get(k) for k in ESTIMATOR_OPTIONS if stored.get(k) is not None}
    changed = {k: v for k, v in overrides.items() if base.get(k) != v}
    if changed and len(store.read_table(LLC_FILE)) and not force:
        raise ValueError(
            f"options {changed} differ from the settings of the rows already in "
            f"{store.path / LLC_FILE} ({ {k: base.get(k) for k in changed} }); pass --force to "
            "re-estimate every snapshot with them, or use another run directory"
        )
    if changed:
        store.update_json(SETTINGS_FILE, changed)
    return {**base, **overrides}


# ----------------------------------------------------------------------------------------------
# Rebuilding the model, the data and the loss
# ----------------------------------------------------------------------------------------------
class _ModelBuilder:
    """Builds the module once per set of hyperparameters and loads each snapshot into it."""

    def __init__(self, store: RunStore, meta: Mapping[str, Any], module: Any,
                 device: str | None) -> None:
        self.store, self.meta, self.device = store, meta, device
        self.cls = load_object(module) if isinstance(module, str) else module
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
            raise UnreadableSnapshot(_first_line(e)) from e
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
                                     f"{_first_line(e)}") from e
        return model

    def _class(self, ckpt: Mapping[str, Any] | None) -> type[nn.Module]:
        if self.cls is not None:
            return self.cls
        path = self.meta.get("module")
        if path is None and ckpt is not None:
            for key, state in (ckpt.get("callbacks") or {}).items():
                if str(key).startswith("LLCCallback") and isinstance(state, Mapping):
                    path = state.get("module")
        if path is None:
            path = _cli_class_path(self.store.path)
        if path is None:
            raise ValueError(
                f"cannot tell which module class the snapshots of {self.store.path} belong to; "
                "pass --module package.module:ClassName"
            )
        self.cls = load_object(path, self.meta.get("module_file"))
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
            return _data_from_file(self.store.path / recipe["file"])
        if kind == "datamodule":
            dm = load_object(recipe["class"])(**(recipe.get("hparams") or {}))
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
        if batch_loss is not None:
            return None, batch_loss
        if isinstance(loss_fn, str):
            loss_fn = load_object(loss_fn)
        if loss_fn is not None:
            return loss_fn, None
        recipe = self.meta.get("loss") or {}
        if recipe.get("kind") == "function":
            return load_object(recipe["path"]), None
        found = module_loss(model, prefer_loss_fn=recipe.get("kind") == "module_loss_fn")
        if found is not None:
            return found
        raise ValueError(
            f"cannot rebuild the loss for {self.store.path}: the module has no `loss_fn` or "
            "`llc_batch_loss`; pass --loss package.module:function (outputs, targets) -> loss"
        )


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


def load_object(spec: str, main_file: str | None = None) -> Any:
    """Import ``"package.module:Qualified.name"`` or ``"path/to/file.py:name"``.

    A class recorded from a script (``__main__``) is imported from ``main_file`` under another
    module name, so the script's ``if __name__ == "__main__":`` block does not run.
    """
    mod_name, sep, qualname = spec.rpartition(":")
    if not sep or not mod_name or not qualname:
        raise ValueError(f"{spec!r} is not an import path; write package.module:Name or "
                         "path/to/file.py:Name")
    if mod_name == "__main__" and main_file:
        mod_name = main_file
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


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="devinterp estimate",
        description="Estimate λ̂ for the weight snapshots (or Lightning .ckpt files) of a run "
                    "directory and write them to its λ̂ table.",
    )
    p.add_argument("run_dir", help="run directory (LLCCallback dirpath, or a .ckpt folder)")
    p.add_argument("--module", help="model class, package.module:Class or file.py:Class")
    p.add_argument("--data", help="package.module:function returning the data, or FILE.pt")
    p.add_argument("--loss", help="package.module:function(outputs, targets) -> mean loss")
    p.add_argument("--steps", help="comma-separated steps to estimate (default: all)")
    p.add_argument("--out", metavar="DIR",
                   help="write λ̂ into this run directory instead (e.g. one per weight-refined "
                   "curve); it gets RUN_DIR's run.json and training metrics")
    p.add_argument("--force", action="store_true", help="re-estimate steps already done")
    p.add_argument("--workers", type=int, help="number of processes sharing the snapshots "
                                               "(default: $WORLD_SIZE or 1)")
    p.add_argument("--rank", type=int, help="this process's index (default: $RANK or 0)")
    p.add_argument("--device", help="where to sample, e.g. cuda:0 (default: cpu)")
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


def main(argv: list[str] | None = None) -> int:
    """``devinterp estimate``; returns 1 when a snapshot could not be read, else 0."""
    args = _parser().parse_args(argv)
    if args.wandb and args.out:
        raise ValueError("--wandb adds λ̂ to the training run's W&B curve llc/*; with --out that "
                         "would mix two curves: drop --wandb (or --out)")
    workers = args.workers if args.workers is not None else int(os.environ.get("WORLD_SIZE", 1))
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    steps = None
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"--steps must be comma-separated integers, got {args.steps!r}") from e
    options = {k: getattr(args, k) for k in ESTIMATOR_OPTIONS if getattr(args, k, None) is not None}
    report = estimate_run(
        args.run_dir, module=args.module, data=args.data, loss_fn=args.loss, steps=steps,
        out=args.out, force=args.force, workers=workers, rank=rank, device=args.device,
        save_traces=not args.no_traces, progress=not args.quiet, **options,
    )
    if not args.quiet:
        print(f"devinterp estimate: {len(report.estimated)} estimated, {len(report.failed)} "
              f"failed, {len(report.skipped)} already done, {len(report.unreadable)} unreadable "
              f"({report.run_dir})")
    if args.wandb:
        log_to_wandb(report.run_dir)
    return 1 if report.unreadable else 0


def log_to_wandb(run_dir: str | os.PathLike) -> int:
    """Log every ``ok`` λ̂ row to the W&B run recorded in ``run.json``, on the
    ``trainer/global_step`` axis (so the values line up with the loss even though they arrive
    after training), with ``stage/index`` once there are enough rows for stages, then attach the
    dashboard page, as the callback does at the end of inline training. Returns the number of
    rows logged."""
    import wandb

    from devinterp.dashboard import log_to_wandb as attach_dashboard
    from devinterp.stages import detect_and_write, stage_index

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
        stages = detect_and_write(store.path)
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
