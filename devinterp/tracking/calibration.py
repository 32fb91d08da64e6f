"""Run-level calibration: one set of sampler settings for every checkpoint of a run.

With ``step_size="auto"`` chosen per checkpoint, neighbouring points of a λ̂ curve are estimated
with different ε and are not comparable (on transformers λ̂ jumped by hundreds between them).
So :class:`devinterp.LLCCallback` and ``devinterp estimate``, with ``step_size`` unset, choose ε
(and nβ) once per run with :func:`devinterp.llc.calibrate_step_size` and hold them fixed:

- post-hoc: calibrate on the last checkpoint and on an early one (the first at or after a tenth
  of the last step) before estimating any; the run's ε is the smaller of the two;
- inline: calibrate at the first checkpoint that is near a minimum (the pilot chains rarely fall
  below the paired baseline); the checkpoints before it wait, as snapshots, and are estimated
  with the run's settings as soon as there are some (or at the end of training, calibrated on
  the last checkpoint, when training never gets near a minimum).

A checkpoint that fails with the run's settings (every chain or some chains diverged, or a MALA
acceptance below :data:`MALA_FLOOR`) is estimated again with ε halved, up to
:data:`MAX_LOWERINGS` times, and the lower ε is kept from then on. The settings, the checkpoints
they were calibrated on and every change are kept in the run store's ``calibration.json`` under
the run's settings id; each λ̂ row records the ε and nβ it used and, in ``calibration``, how
(``"run"``, ``"lowered"`` where ε was lowered, ``"checkpoint"`` where calibration failed and the
checkpoint chose its own ε).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from devinterp.run.store import CALIBRATION_FILE, RunStore, settings_id
from devinterp.tracking.estimate import EstimateFailure, estimator_kwargs, first_line
from devinterp.tracking.losses import estimating

__all__ = ["MALA_FLOOR", "MAX_LOWERINGS", "RunCalibration", "early_and_last", "is_calibrated_run"]

#: A MALA acceptance below this is far from the target (0.9): the step is too large.
MALA_FLOOR = 0.5
#: At most this many halvings of ε for one checkpoint.
MAX_LOWERINGS = 3
#: The settings a run-level calibration fixes (when the user left them to the estimator).
_FIXED = ("step_size", "nbeta", "localization")


def is_calibrated_run(options: Mapping[str, Any]) -> bool:
    """Whether these options leave ε unset: then the run chooses it once. A given
    ``step_size`` is used as it is, ``"auto"`` included (chosen at every checkpoint, as
    :func:`devinterp.estimate_llc` chooses it per call)."""
    return options.get("step_size") is None


def early_and_last(steps: Iterable[int]) -> list[int]:
    """The checkpoints a post-hoc calibration uses: the first at or after a tenth of the last
    step (an early one, past the first transient) and the last."""
    steps = sorted(set(int(s) for s in steps))
    if not steps:
        return []
    last = steps[-1]
    early = next((s for s in steps[:-1] if s >= last / 10), None)
    return [last] if early is None else [early, last]


class RunCalibration:
    """The sampler settings of one run (one settings id) in one run store.

    The entry is cached in memory once read or chosen; :meth:`refresh` reads the file again
    (post-hoc workers share it). Under DDP every rank holds the entry and only global rank 0
    writes it (``write=False`` elsewhere).

    Args:
        store: where ``calibration.json`` is kept.
        options: the sampler options as the user gave them (None = the estimator's default).
    """

    def __init__(self, store: RunStore, options: Mapping[str, Any]) -> None:
        self.store = store
        self.options = dict(options)
        self.key = settings_id(self.options)
        self.active = is_calibrated_run(self.options)
        #: Why the last calibration attempt found no settings ("" when it did).
        self.failed_reason = ""
        self._entry: dict[str, Any] | None = None

    # -- the record ------------------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        """This run's entry of ``calibration.json``, or None before calibration."""
        if self._entry is None:
            doc = self.store.read_json(CALIBRATION_FILE, {}) or {}
            entry = doc.get(self.key) if isinstance(doc, dict) else None
            if isinstance(entry, dict) and "step_size" in entry:
                self._entry = entry
        return self._entry

    def refresh(self) -> None:
        """Forget the cached entry: the next :meth:`record` reads the file."""
        self._entry = None

    @property
    def calibrated(self) -> bool:
        return self.record() is not None

    def estimator_options(self) -> dict[str, Any]:
        """The options to estimate with: the user's, with the run's settings filled in."""
        entry = self.record() if self.active else None
        if entry is None:
            return dict(self.options)
        fixed = {k: entry[k] for k in _FIXED
                 if entry.get(k) is not None and self.options.get(k) in (None, "auto")}
        return {**self.options, **fixed}

    def row_mark(self, lowered: bool) -> str:
        """The ``calibration`` column of a row estimated now."""
        if not self.active:
            return ""
        if lowered:
            return "lowered"
        return "run" if self.calibrated else "checkpoint"

    # -- choosing ---------------------------------------------------------------------------------
    def probe(self, model: nn.Module, data: Any, *, loss_fn: Callable | None,
              batch_loss: Callable | None) -> dict[str, Any]:
        """Calibrate at one checkpoint (the model at its weights): ``step_size``, ``nbeta``,
        ``near_minimum``, ``calibration_s``, ... as :func:`devinterp.llc.calibrate_step_size`
        returns them. Raises what it raises (a non-finite loss or curvature)."""
        from devinterp.llc import calibrate_step_size

        kwargs = {k: v for k, v in estimator_kwargs(self.options).items() if k != "step_size"}
        with estimating(model):
            return calibrate_step_size(model, data, loss_fn, batch_loss=batch_loss, **kwargs)

    def fix(self, probes: Mapping[int, Mapping[str, Any]], how: str, *,
            attempts: Iterable[Mapping[str, Any]] = (), write: bool = True,
            locked: bool = False) -> dict[str, Any]:
        """Hold the run's settings from calibrations at the checkpoints ``probes`` (step ->
        :meth:`probe`'s result): the smallest ε (stable at every one of them), the nβ (and γ,
        when calibration chooses it) of the last. ``how`` says which rule chose the
        checkpoints; ``attempts`` are earlier calibrations that were not used (their cost
        counts in ``calibration_s``)."""
        if not probes:
            raise ValueError("run calibration needs at least one calibrated checkpoint")
        last = probes[max(probes)]
        used = [_attempt(s, p) for s, p in sorted(probes.items())]
        tried = [dict(a) for a in attempts]
        entry: dict[str, Any] = {
            "step_size": min(float(p["step_size"]) for p in probes.values()),
            "nbeta": float(last["nbeta"]),
            "rule": how,
            "calibrated_on": used,
            "attempts": tried,
            "calibration_s": sum(a["calibration_s"] for a in used + tried),
            "changes": [],
        }
        if last.get("localization") is not None:
            entry["localization"] = float(last["localization"])
        entry["initial_step_size"] = entry["step_size"]
        self._entry = entry
        if write:
            self._write(locked=locked)
        return entry

    def calibrate_posthoc(self, steps: Iterable[int], probe_at: Callable[[int], Mapping[str, Any]]
                          ) -> dict[str, Any] | None:
        """Calibrate on :func:`early_and_last` of ``steps`` (``probe_at(step)``: :meth:`probe`
        at that checkpoint) unless already calibrated (by another process, an earlier call,
        the inline run); returns the entry, or None when no checkpoint could be calibrated
        (then each checkpoint chooses its own ε; :attr:`failed_reason` says why)."""
        if not self.active:
            return None
        with self.store.lock():
            self.refresh()
            entry = self.record()
            if entry is not None:
                return entry
            probes: dict[int, Mapping[str, Any]] = {}
            errors = []
            for step in early_and_last(steps):
                try:
                    probes[step] = probe_at(step)
                except Exception as e:  # noqa: BLE001 - one bad checkpoint: use the others
                    errors.append(f"step {step}: {type(e).__name__}: {first_line(e)}")
            if not probes:
                self.failed_reason = "; ".join(errors)
                return None
            return self.fix(probes, "early and last checkpoints", locked=True)

    def forget(self, *, write: bool = True) -> None:
        """Drop this run's settings (a forced re-estimate chooses them again); ``write``: also
        from ``calibration.json``."""
        self._entry = None
        if not write:
            return
        with self.store.lock():
            doc = self.store.read_json(CALIBRATION_FILE, {}) or {}
            if isinstance(doc, dict) and doc.pop(self.key, None) is not None:
                self.store.write_json(CALIBRATION_FILE, doc)

    # -- failures ----------------------------------------------------------------------------------
    @staticmethod
    def failure(result: Any) -> str | None:
        """Why ``result`` says the run's ε is too large here, or None."""
        if isinstance(result, EstimateFailure):
            return result.reason if result.diverged else None
        d = getattr(result, "diagnostics", {})
        if int(d.get("num_diverged", 0) or 0) > 0:
            return f"{int(d['num_diverged'])} chain(s) diverged"
        acc = d.get("mala_acceptance")
        if acc is not None and math.isfinite(acc) and acc < MALA_FLOOR:
            return f"MALA acceptance {acc:.2f} < {MALA_FLOOR}"
        return None

    def lower(self, step: int, reason: str, *, write: bool = True) -> float:
        """Halve the run's ε from ``step`` on, recording the change; returns the new ε.
        With ``write``, under the store's lock from the entry on disk (another worker may
        have lowered it meanwhile)."""

        def halve() -> float:
            entry = self.record()
            if entry is None:
                raise RuntimeError("lower() before the run was calibrated")
            new = entry["step_size"] / 2
            entry["changes"].append({"step": int(step), "from": entry["step_size"], "to": new,
                                     "reason": reason})
            entry["step_size"] = new
            return new

        if not write:
            return halve()
        with self.store.lock():
            self.refresh()
            new = halve()
            self._write(locked=True)
        return new

    def estimate(self, step: int, run: Callable[[Mapping[str, Any]], Any]
                 ) -> tuple[Any, str]:
        """``run(options)`` with the run's settings (as on disk now); on a failure that says ε
        is too large, halve ε and run again (at most :data:`MAX_LOWERINGS` times). Returns the
        result and the row's ``calibration`` mark."""
        self.refresh()
        result = run(self.estimator_options())
        lowered = False
        if self.active and self.calibrated:
            for _ in range(MAX_LOWERINGS):
                reason = self.failure(result)
                if reason is None:
                    break
                self.lower(step, reason)
                lowered = True
                result = run(self.estimator_options())
        return result, self.row_mark(lowered)

    def _write(self, locked: bool = False) -> None:
        def write() -> None:
            doc = self.store.read_json(CALIBRATION_FILE, {}) or {}
            if not isinstance(doc, dict):
                raise ValueError(f"{self.store.path / CALIBRATION_FILE} must hold a JSON object;"
                                 " restore it or delete it")
            doc[self.key] = dict(self._entry or {})
            self.store.write_json(CALIBRATION_FILE, doc)

        if locked:
            write()
        else:
            with self.store.lock():
                write()


def _attempt(step: int, probe: Mapping[str, Any]) -> dict[str, Any]:
    """What the record keeps of one checkpoint's calibration."""
    return {"step": int(step), "step_size": float(probe["step_size"]),
            "near_minimum": bool(probe.get("near_minimum", False)),
            "calibration_s": float(probe.get("calibration_s", 0.0))}
