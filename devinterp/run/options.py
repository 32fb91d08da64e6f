"""Sampler options and devices for post-hoc estimation, checked before anything is written, so
that a bad value fails at once rather than being recorded in ``settings.json`` or failing at
every snapshot."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from devinterp.tracking import first_line

__all__ = ["check_device", "check_job", "check_options"]


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: ``option: (check, what it must be)`` for :func:`check_options`.
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_chains": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_draws": (lambda v: v == "auto" or (_is_int(v) and v >= 2),
                  "an integer >= 2 (λ̂ needs draws beyond the starting point) or 'auto'"),
    "max_draws": (lambda v: _is_int(v) and v >= 4, "an integer >= 4"),
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


def check_job(workers: int, rank: int, threads: int | None) -> None:
    """Raise ValueError unless ``0 <= rank < workers`` and ``threads`` is None or >= 1."""
    if not _is_int(workers) or workers < 1 or not _is_int(rank) or not 0 <= rank < workers:
        raise ValueError(f"need workers >= 1 and 0 <= rank < workers, got workers={workers}, "
                         f"rank={rank}")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
