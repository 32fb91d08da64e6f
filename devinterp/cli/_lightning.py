"""The LightningCLI side of ``devinterp run``: torch and Lightning are imported here only.

:mod:`devinterp.cli.run` checks the command line, the config file and the run directory
first and imports this module only when the experiment is to be parsed or built, so a typo in a
path is reported in a fraction of a second instead of after the heavy imports.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from devinterp.cli import UsageError
from devinterp.cli.run import CONFIG_FILE, LOG_DIR, PROG, condense_error
from devinterp.run.store import RunStore

__all__ = ["ExperimentCLI", "build_cli"]


def _is_llc_callback(class_path: str) -> bool:
    from devinterp.tracking.callback import LLCCallback

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, LLCCallback)


class ExperimentCLI(LightningCLI):
    """LightningCLI that keeps one run in one directory: its config, λ̂, logs and checkpoints.

    Option names must be spelled out: argparse's prefix matching is off, so
    ``--trainer.max_step=100`` is an error that suggests ``--trainer.max_steps`` instead of a run
    with a setting nobody typed.

    Args:
        args: LightningCLI arguments (``--config FILE`` and overrides).
        run_dir: the run directory; None parses and validates only (nothing is built or written).
    """

    def __init__(self, args: list[str], run_dir: Path | None) -> None:
        self.run_dir = run_dir
        defaults: dict[str, Any] = {}
        if run_dir is not None:
            defaults = {"default_root_dir": str(run_dir), "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": LOG_DIR, "version": ""}}}
        # load_from_checkpoint_support would add `_class_path` / `_instantiator` to the module's
        # hparams; without it they are exactly the init arguments, which is what rebuilds the
        # module in `devinterp estimate` and in `load_from_checkpoint`.
        super().__init__(save_config_callback=None, trainer_defaults=defaults,
                         seed_everything_default=0,
                         parser_kwargs={"exit_on_error": False, "prog": PROG,
                                        "allow_abbrev": False},
                         args=args, run=False, load_from_checkpoint_support=False)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--torch_threads", type=int | None, default=None,
            help="torch intra-op threads (torch.set_num_threads; `devinterp run --threads N` "
                 "overrides it). Models of a few thousand parameters run several times faster "
                 "on 1 (no thread wake-ups per tiny op, and no stall when another process holds "
                 "a core). Default: torch's choice.")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse; an unknown option becomes one line naming it and the closest real option."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise UsageError(condense_error(str(e), options=list(parser._option_string_actions))
                             ) from e

    def llc_callbacks(self) -> list[Any]:
        """The config entries of ``trainer.callbacks`` that are LLCCallbacks."""
        callbacks = self.config.trainer.get("callbacks") or []
        if not isinstance(callbacks, list):
            callbacks = [callbacks]
        return [cb for cb in callbacks
                if isinstance(cb.get("class_path"), str) and _is_llc_callback(cb.class_path)]

    def before_instantiate_classes(self) -> None:
        llc = self.llc_callbacks()
        if not llc:
            raise UsageError(
                "the config has no devinterp.LLCCallback under trainer.callbacks, so there would "
                "be no λ̂, stages or dashboard; add one, e.g. `callbacks: [{class_path: "
                "devinterp.LLCCallback, init_args: {log_spaced: 30}}]` (see configs/)")
        if len(llc) > 1:
            raise UsageError(f"the config lists {len(llc)} LLCCallbacks under trainer.callbacks; "
                             "keep one (they would share one run directory)")
        if self.run_dir is None:
            return
        for cb in llc:
            cb.init_args.dirpath = str(self.run_dir)
        if self.config.get("torch_threads"):
            torch.set_num_threads(self.config.torch_threads)

    def after_instantiate_classes(self) -> None:
        if self.run_dir is None:
            return
        # Only now, once every class was built: a config error leaves no directory behind.
        RunStore(self.run_dir, create=True)
        try:  # keep null values: the saved config must rebuild exactly this run
            text = self.parser.dump(self.config, skip_unset=False)
        except TypeError:  # jsonargparse < 4.49 names it skip_none
            text = self.parser.dump(self.config, skip_none=False)
        (self.run_dir / CONFIG_FILE).write_text(text)

    def instantiate_classes(self) -> None:
        if self.run_dir is not None:
            super().instantiate_classes()


def build_cli(config: Path, overrides: list[str], run_dir: Path | None) -> ExperimentCLI:
    """Parse (and with a ``run_dir``, build) the experiment; config errors become UsageError."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # the seed goes into config.yaml, not onto the console
    try:
        return ExperimentCLI(["--config", str(config), *overrides], run_dir)
    except ArgumentError as e:
        raise UsageError(condense_error(str(e))) from e
    except (MisconfigurationException, ImportError) as e:  # e.g. accelerator=gpu, no GPU
        raise UsageError(f"trainer settings: {e}; change them in the config or overrides "
                         "(--debug shows where)") from e
    except ValueError as e:  # a class refused its arguments; jsonargparse wraps that error
        cause = e.__cause__ if isinstance(e.__cause__, (ValueError, TypeError)) else None
        raise UsageError(str(cause) if cause else condense_error(str(e))) from e
    finally:
        seed_log.setLevel(level)
