"""What ``run.json`` records so ``devinterp estimate`` can rebuild the model, data and loss of a
run in another process (its reader is :mod:`devinterp.run.rebuild`, which checks these keys).

Keys: ``name``, ``module`` (``"package.module:Class"``), ``module_file`` (the script of a class
defined in ``__main__``), ``hparams``, ``data`` (``{"kind": "file" | "module_attr" |
"module_train_dataloader" | "datamodule" | "unrecorded", ...}``), ``loss`` (``{"kind":
<a LOSS_ORDER kind> | "function" | "unrecorded", ...}``), ``mode``, ``devinterp_version`` and
``missing`` (what could not be recorded, in words).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp.run.store import RUN_FILE, RunStore
from devinterp.tracking.losses import LossSpec

__all__ = ["DATA_FILE", "MAX_SAVED_DATA_BYTES", "data_recipe", "import_path", "loss_recipe",
           "write_run_file"]

#: Tensor data up to this size is saved into the run directory (``data.pt``) in deferred mode,
#: so ``devinterp estimate`` samples with exactly the data training used.
MAX_SAVED_DATA_BYTES = 256 * 2**20
DATA_FILE = "data.pt"


def write_run_file(store: RunStore, module: nn.Module, *, data: Any, data_given: bool,
                   datamodule: Any, loss: LossSpec, mode: str) -> list[str]:
    """Write ``run.json`` for ``module`` trained on ``data`` (the resolved data; ``data_given``:
    it came from the callback's ``data`` argument) and return what it could not record."""
    import devinterp

    hparams = dict(getattr(module, "hparams", {}))
    unjsonable = [k for k, v in hparams.items() if not _jsonable(v)]
    module_path = import_path(type(module))
    meta: dict[str, Any] = {
        "name": store.path.name if store.path.name != "llc" else store.path.parent.name,
        "module": module_path,
        "module_file": _main_file(type(module)),
        "hparams": {k: v for k, v in hparams.items() if k not in unjsonable},
        "data": data_recipe(store, module, data, data_given=data_given, datamodule=datamodule,
                            save=mode == "deferred"),
        "loss": loss_recipe(module, loss),
        "mode": mode,
        "devinterp_version": devinterp.__version__,
    }
    missing = []
    if module_path is None:
        missing.append(f"the module class ({type(module).__qualname__} is not importable)")
    if unjsonable:
        missing.append(f"hyperparameters {unjsonable} (not JSON)")
    if meta["data"]["kind"] == "unrecorded":
        missing.append("the data")
    if meta["loss"]["kind"] == "unrecorded":
        missing.append("the loss")
    meta["missing"] = missing
    store.update_json(RUN_FILE, meta)
    return missing


def data_recipe(store: RunStore, module: nn.Module, data: Any, *, data_given: bool,
                datamodule: Any, save: bool) -> dict[str, Any]:
    """How to get ``data`` again: saved into the run (``save`` and small tensors), a module
    attribute, the module's ``train_dataloader``, a rebuildable datamodule, or unrecorded."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    tensors = _tensors_of(data)
    if tensors is not None and save:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size <= MAX_SAVED_DATA_BYTES:
            _save_atomic({"tensors": [t.detach().cpu() for t in tensors]}, store.path / DATA_FILE)
            return {"kind": "file", "file": DATA_FILE}
    if data_given:
        return {"kind": "unrecorded", "repr": repr(type(data).__name__)}
    if getattr(module, "llc_data", None) is not None:
        return {"kind": "module_attr", "attr": "llc_data"}
    if is_overridden("train_dataloader", module):
        return {"kind": "module_train_dataloader"}
    dm = datamodule
    if dm is not None and import_path(type(dm)) and all(
        _jsonable(v) for v in dict(dm.hparams).values()
    ):
        return {"kind": "datamodule", "class": import_path(type(dm)),
                "hparams": dict(dm.hparams)}
    return {"kind": "unrecorded"}


def loss_recipe(module: nn.Module, loss: LossSpec) -> dict[str, Any]:
    """How ``devinterp estimate`` finds the loss again: the module convention used, or the
    import path of the ``loss_fn`` argument."""
    if loss.kind != "argument":
        return {"kind": loss.kind}
    if loss.loss_fn is getattr(module, "loss_fn", None):
        return {"kind": "module_loss_fn"}
    path = import_path(loss.loss_fn)
    if path is not None:
        return {"kind": "function", "path": path}
    return {"kind": "unrecorded", "repr": repr(loss.loss_fn)}


def import_path(obj: Any) -> str | None:
    """``"package.module:Qualified.name"`` of a class or function, if importable by name."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    return f"{module}:{qualname}"


def _main_file(cls: type) -> str | None:
    """The script file of a class defined in ``__main__`` (importable from its file)."""
    if cls.__module__ != "__main__":
        return None
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return str(Path(path).resolve()) if path else None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _tensors_of(data: Any) -> list[torch.Tensor] | None:
    """The tensors behind ``data`` when it is tensors or a TensorDataset (else None)."""
    if isinstance(data, DataLoader):
        return None
    if isinstance(data, TensorDataset):
        return list(data.tensors)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return list(data)
    return None


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` that a concurrent reader (``devinterp estimate``) never sees half done."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
