"""Rebuilding what a snapshot needs to be estimated: the model class and its weights, the data
and the loss, from what a run directory records (``run.json``, a checkpoint, a LightningCLI
``config.yaml``) or from what the user names.

A run directory is untrusted input. Snapshots and checkpoints are loaded with
``weights_only=True`` (a pickled payload never runs). From ``run.json``, a checkpoint or a
``config.yaml``, only classes are built, and only ``nn.Module`` / ``LightningDataModule``
subclasses from installed or importable packages outside the run directory
(:func:`recorded_class`); a recorded loss function only from ``torch.nn.functional`` or the
model's own package; a recorded script file (``.py``) never. What the user names
(``module="file.py:Class"``, ``data``, ``loss_fn``) is imported as given (:func:`load_object`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from devinterp.run.store import RUN_FILE, RunStore, open_regular
from devinterp.tracking import first_line, module_loss, training_data

__all__ = ["ModelBuilder", "Source", "UnreadableSnapshot", "check_recorded_loss",
           "load_checkpoint", "load_object", "load_weights", "read_meta", "recorded_class"]


class UnreadableSnapshot(Exception):
    """A snapshot or checkpoint file that cannot be read, or whose weights do not fit."""


@dataclass
class Source:
    """One file to estimate: the weights at training step ``step``."""

    step: int
    path: Path
    kind: str  # "snapshot" (a state dict) or "ckpt" (a Lightning checkpoint)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


#: The types ``run.json`` entries must have (absent or null: not recorded).
_META_TYPES: dict[str, type] = {"name": str, "module": str, "module_file": str, "hparams": dict,
                                "data": dict, "loss": dict}
_RECIPE_TYPES: dict[str, dict[str, type]] = {
    "data": {"kind": str, "file": str, "class": str, "hparams": dict},
    "loss": {"kind": str, "path": str},
}


def read_meta(store: RunStore) -> dict[str, Any]:
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


def load_weights(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, of a regular file only (a FIFO would
    block the load: :func:`~devinterp.run.store.open_regular`)."""
    with open_regular(path) as f:
        if mmap:  # torch memory-maps a path, not a file object (checked: it is regular)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(f, map_location="cpu", weights_only=True)


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint's dictionary (weights only), or ValueError if it is not one."""
    ckpt = load_weights(path, mmap=mmap)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError("not a Lightning checkpoint (no 'state_dict')")
    return dict(ckpt)


class ModelBuilder:
    """Builds the module once per set of hyperparameters and loads each snapshot into it."""

    def __init__(self, store: RunStore, meta: Mapping[str, Any], module: Any,
                 device: str | None) -> None:
        self.store, self.meta, self.device = store, meta, device
        self.cls = _user_class(module) if module is not None else None
        self.models: dict[str, nn.Module] = {}
        self._data: Any = None

    def load(self, src: Source) -> nn.Module:
        """The module with the weights of ``src``. A file that cannot be read or whose weights
        do not fit raises :class:`UnreadableSnapshot`; a class that cannot be found or built
        raises ValueError (that is the run's problem, not the file's)."""
        try:
            if src.kind == "snapshot":
                state, ckpt = load_weights(src.path), None
                hparams = self.meta.get("hparams", {}) or {}
            else:
                ckpt = load_checkpoint(src.path)
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
    obj = load_weights(path)
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
            # The script's own folder, as `python script.py` has it: its sibling modules
            # (`from model_defs import Net`) import as they do in training.
            folder = str(file.resolve().parent)
            if folder not in sys.path:
                sys.path.append(folder)
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


def check_recorded_loss(meta: Mapping[str, Any], loss_fn: Any, batch_loss: Any,
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

