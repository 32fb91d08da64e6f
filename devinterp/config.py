"""The sampler settings of an LLC estimate: ONE home for their names, defaults and validation.

:func:`devinterp.estimate_llc` takes them as keyword arguments whose defaults are these fields'
defaults; :class:`devinterp.LLCCallback`, ``devinterp estimate`` and the run store read the same
dataclass. It imports no torch, so reading a run directory stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = ["AUTO_DRAWS", "AUTO_ESS", "AUTO_RHAT", "SAMPLER_NAMES", "SamplerConfig",
           "check_weights", "defaults"]

#: The samplers :mod:`devinterp.samplers` provides (its registry checks it has exactly these).
SAMPLER_NAMES = ("sgld", "rmsprop_sgld")
#: ``num_draws="auto"``: the first round's draws per chain; each later round doubles them, until
#: split R-hat <= AUTO_RHAT and the ESS >= AUTO_ESS, or ``max_draws`` is reached.
AUTO_DRAWS = 200
AUTO_RHAT = 1.05
AUTO_ESS = 400


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_weights(weights: Any) -> None:
    """Raise unless ``weights`` is a non-empty list of parameter names / fnmatch patterns."""
    if isinstance(weights, str) or not all(isinstance(w, str) for w in weights):
        raise TypeError(f"weights must be a list of parameter names or fnmatch patterns, got "
                        f"{weights!r}")
    if not weights:
        raise ValueError("weights=[] names no parameter; leave weights unset to sample all "
                         "trainable parameters")


@dataclass(frozen=True)
class SamplerConfig:
    """What an estimate samples with (see :func:`devinterp.estimate_llc` for each meaning).

    ``None`` in ``num_burnin`` / ``nbeta`` / ``num_samples`` / ``chain_chunk_size`` /
    ``num_threads`` / ``weights`` means "derived at run time" (half the draws, n/log n, the
    data's length, all chains at once, the thread policy, all trainable weights).
    ``num_draws="auto"`` extends the chains in rounds until they converge, within
    ``max_draws`` draws per chain (ignored otherwise).

    Raises:
        ValueError: a value out of range, named with its field (TypeError: ``weights`` that
            is not a list of strings).
    """

    num_chains: int = 8
    num_draws: int | Literal["auto"] = 400
    num_burnin: int | None = None
    batch_size: int = 256
    step_size: float | Literal["auto"] = "auto"
    localization: float = 1.0
    nbeta: float | None = None
    sampler: Literal["sgld", "rmsprop_sgld"] = "rmsprop_sgld"
    seed: int = 0
    num_samples: int | None = None
    chain_chunk_size: int | None = None
    vectorize: bool = True
    num_threads: int | None = None
    weights: tuple[str, ...] | None = None
    max_draws: int = 3200

    def __post_init__(self) -> None:
        for name, low in (("num_chains", 1), ("num_draws", 2), ("batch_size", 1),
                          ("max_draws", 4)):
            value = getattr(self, name)
            if name == "num_draws" and value == "auto":
                continue
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}"
                                 f"{' or auto' if name == 'num_draws' else ''}, got {value!r}")
        for name, low in (("num_burnin", 0), ("num_samples", 1), ("chain_chunk_size", 1),
                          ("num_threads", 1)):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < low):
                raise ValueError(f"{name} must be an integer >= {low} or None, got {value!r}")
        if self.step_size != "auto" and not (_is_real(self.step_size)
                                             and 0 < self.step_size < math.inf):
            raise ValueError(f"step_size must be a positive finite float or 'auto', got "
                             f"{self.step_size!r}")
        if not (_is_real(self.localization) and 0 <= self.localization < math.inf):
            raise ValueError(f"localization must be a finite float >= 0, got "
                             f"{self.localization!r}")
        if self.nbeta is not None and not (_is_real(self.nbeta) and 0 < self.nbeta < math.inf):
            raise ValueError(f"nbeta must be a finite float > 0, got {self.nbeta!r}")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {self.sampler!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.vectorize, bool):
            raise ValueError(f"vectorize must be True or False, got {self.vectorize!r}")
        if self.weights is not None:
            check_weights(self.weights)
            object.__setattr__(self, "weights", tuple(self.weights))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SamplerConfig:
        """A config from options where ``None`` means "the default" (the callback's and the
        command line's convention); unknown names are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown sampler options {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    @property
    def auto_draws(self) -> bool:
        """Whether the chains run until they converge (``num_draws="auto"``)."""
        return self.num_draws == "auto"

    @property
    def first_draws(self) -> int:
        """Draws per chain of the first (or only) round."""
        return min(AUTO_DRAWS, self.max_draws) if self.auto_draws else int(self.num_draws)

    @property
    def burnin(self) -> int:
        """The burn-in steps used: ``num_burnin``, or half the (first round's) draws."""
        return self.first_draws // 2 if self.num_burnin is None else self.num_burnin

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values (``weights`` as a list)."""
        out = asdict(self)
        if out["weights"] is not None:
            out["weights"] = list(out["weights"])
        return out


def defaults() -> dict[str, Any]:
    """Every option's default (what ``None`` resolves to before run time)."""
    return SamplerConfig().to_dict()
