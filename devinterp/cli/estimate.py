"""``devinterp estimate RUN_DIR``: λ̂ for the weight snapshots or Lightning checkpoints of a run
(:func:`devinterp.run.estimate.estimate_run`), then its stages and, with ``--wandb``, its W&B
curve. ``--workers N`` launches N processes that split the snapshots (or one per ``--rank R``,
or ``torchrun``, which sets ``RANK``/``WORLD_SIZE``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

from devinterp.cli import ArgumentParser, UsageError, add_threads_argument, apply_threads
from devinterp.config import SAMPLER_NAMES, SamplerConfig
from devinterp.run.estimate import (
    default_out,
    estimate_run,
    estimate_run_components,
    write_stages_or_warn,
)
from devinterp.run.options import check_device, check_options
from devinterp.run.store import RunStore
from devinterp.run.wandb import log_llc_rows
from devinterp.tracking import ESTIMATOR_OPTIONS

__all__ = ["main"]


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
    p.add_argument("--components", choices=["heads", "layers", "mlps"],
                   help="one λ̂ curve per attention head, layer or MLP instead, into the run's "
                   "llc_components.csv (then stages_components.json); steps already there are "
                   "skipped unless --force")
    p.add_argument("--probes", metavar="FILE.pt",
                   help="also record the Bayesian influence of training samples on these probe "
                   "samples at every snapshot (torch.save of {'inputs': X, 'targets': Y}); a "
                   "deferred run with LLCCallback(probes=...) records its own")
    p.add_argument("--influence-train", type=int, metavar="N",
                   help="training samples whose influence on the probes is recorded "
                   "(default 512, or the run's)")
    p.add_argument("--device", help="where to sample, e.g. cuda:0 (default: cpu)")
    add_threads_argument(p, default="the estimator's own choice")
    p.add_argument("--no-traces", action="store_true", help="do not save loss traces")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--wandb", action="store_true",
                   help="afterwards, log every λ̂ row to the run's W&B run (recorded by the "
                        "callback) on the trainer/global_step axis")
    g = p.add_argument_group("sampler settings (default: the run's settings.json)")
    _add_sampler_flags(g)
    return p


#: SamplerConfig fields whose flag is not a plain int/float: how to parse them (vectorize and
#: num_threads have no flag here: chains give the same numbers either way, --threads sets
#: threads for the whole command).
_SPECIAL_FLAGS: dict[str, dict[str, Any] | None] = {
    "step_size": {"type": lambda text: _step_size(text)},
    "num_draws": {"type": lambda text: _num_draws(text), "metavar": "N|auto",
                  "help": "draws per chain, or auto: until the chains converge (within "
                          "--max-draws)"},
    "sampler": {"choices": list(SAMPLER_NAMES)},
    "weights": {"type": lambda text: _patterns(text), "metavar": "PATTERNS",
                "help": "weight-refined λ̂: comma-separated parameter names or fnmatch "
                        "patterns SGLD moves (the rest stay at the snapshot), e.g. "
                        "'blocks.0.attn.*'"},
    "vectorize": None,
    "num_threads": None,
}


def _add_sampler_flags(group: Any) -> None:
    """One --flag per SamplerConfig field, so a new sampler option is a flag with no edit here
    (an int or float field needs none; another kind needs an entry in _SPECIAL_FLAGS)."""
    hints = typing.get_type_hints(SamplerConfig)
    for f in dataclasses.fields(SamplerConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in _SPECIAL_FLAGS:
            if _SPECIAL_FLAGS[f.name] is not None:
                group.add_argument(flag, dest=f.name, **_SPECIAL_FLAGS[f.name])
            continue
        kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        kind = int if int in kinds else float if float in kinds else None
        if kind is None:
            raise TypeError(f"SamplerConfig.{f.name} needs an entry in _SPECIAL_FLAGS")
        group.add_argument(flag, dest=f.name, type=kind)


def _step_size(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def _num_draws(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


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
    steps = _steps(args.steps)
    options = {k: getattr(args, k) for k in ESTIMATOR_OPTIONS if getattr(args, k, None) is not None}
    check_options(options, label=_flag)
    check_device(args.device)
    apply_threads(args.threads)  # here and in the workers launched below
    if args.components:
        return _components(args, steps, workers, options)
    if workers > 1 and args.rank is None and "RANK" not in os.environ:
        run_dir = default_out(RunStore(args.run_dir), args.out) or args.run_dir
        code = _launch(argv, workers)
    else:
        code, run_dir = _estimate(args, steps, workers, rank, options)
        if workers > 1:  # the other workers may still be writing: no stages or W&B yet
            if rank == 0:
                print(f"devinterp estimate: when every worker is done, `devinterp estimate "
                      f"{run_dir}{' --wandb' if args.wandb else ''}` writes stages.json"
                      f"{' and logs to W&B' if args.wandb else ''}", file=sys.stderr)
            return code
    if code == 2:
        return code
    stages = write_stages_or_warn(run_dir)
    if args.wandb:
        log_llc_rows(run_dir, stages=stages)
    return code


def _steps(text: str | None) -> list[int] | None:
    """``--steps 10,20``: the steps to estimate (None: all)."""
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"--steps must be comma-separated integers, got {text!r}") from e


def _estimate(args: argparse.Namespace, steps: list[int] | None, workers: int, rank: int,
              options: dict[str, Any]) -> tuple[int, Path]:
    """This process's share of the snapshots; returns the exit code and the run directory
    the rows went to. A disk error is one line that says the rows so far are kept."""
    try:
        report = estimate_run(
            args.run_dir, module=args.module, data=args.data, loss_fn=args.loss,
            steps=steps, out=args.out, force=args.force, workers=workers,
            rank=rank, device=args.device, save_traces=not args.no_traces,
            progress=not args.quiet, probes=args.probes, influence_train=args.influence_train,
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
    return (1 if report.unreadable else 0), report.run_dir


def _components(args: argparse.Namespace, steps: list[int] | None, workers: int,
                options: dict[str, Any]) -> int:
    """``--components``: every component's curve for the run's snapshots, in this process."""
    refused = [flag for flag, given in (("--out", args.out), ("--wandb", args.wandb),
                                        ("--weights", args.weights),
                                        ("--workers", workers > 1)) if given]
    if refused:
        raise ValueError(f"--components writes the run's own component table in one process; "
                         f"drop {', '.join(refused)}")
    report = estimate_run_components(
        args.run_dir, args.components, module=args.module, data=args.data, loss_fn=args.loss,
        steps=steps, force=args.force, device=args.device, **options)
    if not args.quiet:
        print(f"devinterp estimate: {args.components}: {len(report.estimated)} steps "
              f"estimated, {len(report.failed)} with a failed component, "
              f"{len(report.skipped)} already done, {len(report.unreadable)} unreadable "
              f"({report.run_dir})")
    return 1 if report.unreadable else 0


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

