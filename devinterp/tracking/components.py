"""Per-component λ̂ curves in a run: one :func:`devinterp.estimate_refined_llc` call per step,
kept as one long table ``llc_components.csv`` (``component, step, llc_mean, llc_std, ...``;
:meth:`RunStore.read_components`, :attr:`devinterp.Run.components`), and the stages of every
component's curve (``stages_components.json``, :attr:`devinterp.Run.component_stages`).

The callback (``LLCCallback(components=...)``) and post-hoc estimation call the same functions
here, so a run directory holds the same table whichever wrote it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from devinterp.run.store import COMPONENT_KEY, COMPONENT_STAGES_FILE, COMPONENTS_FILE, RunStore
from devinterp.tracking.calibration import RunCalibration
from devinterp.tracking.estimate import (
    EstimateFailure,
    estimator_kwargs,
    failed_row,
    first_line,
    result_row,
)
from devinterp.tracking.losses import estimating

__all__ = ["COMPONENTS_FILE", "COMPONENT_STAGES_FILE", "component_rows", "detect_component_stages",
           "estimate_component_curves", "merge_components", "run_components",
           "write_component_rows"]


def run_components(model: nn.Module, data: Any, components: Any, *,
                   loss_fn: Callable[..., Tensor] | None = None,
                   batch_loss: Callable[..., Tensor] | None = None,
                   options: Mapping[str, Any] | None = None, first_chain: int = 0,
                   num_chains: int | None = None) -> dict[str, Any] | EstimateFailure:
    """Every component's ``LLCResult`` on chains ``[first_chain, first_chain + num_chains)``
    (``self.log`` silenced, the optimizer out of reach), or an :class:`EstimateFailure` when
    the checkpoint has no λ̂ (a component's chains all diverged, a non-finite loss at w*)."""
    from devinterp.llc import AllChainsDivergedError, NonFiniteLossError, estimate_refined_llc

    kwargs = estimator_kwargs(options or {})
    kwargs.pop("weights", None)
    if num_chains is not None:
        kwargs["num_chains"] = num_chains
    try:
        with estimating(model):
            return estimate_refined_llc(model, data, loss_fn, batch_loss=batch_loss,
                                        components=components, first_chain=first_chain,
                                        **kwargs)
    except (AllChainsDivergedError, NonFiniteLossError) as e:
        return EstimateFailure(first_line(e))


def merge_components(outcomes: list[Any]) -> dict[str, Any] | EstimateFailure:
    """One result per component from the ranks' outcomes (dicts of ``LLCResult``, failures or
    None: no chains), as :func:`devinterp.tracking.distributed.merge` does for one result."""
    from devinterp.tracking.distributed import merge

    results = [o for o in outcomes if isinstance(o, Mapping)]
    if not results:
        failures = [o for o in outcomes if isinstance(o, EstimateFailure)]
        return failures[0] if failures else EstimateFailure("no chain was run")
    others = [o for o in outcomes if not isinstance(o, Mapping)]
    return {name: merge([r[name] for r in results] + others) for name in results[0]}


def component_rows(step: int, outcome: dict[str, Any] | EstimateFailure,
                   names: list[str] | None = None) -> list[dict[str, Any]]:
    """The long-table rows of one step: ``component``, then the columns of a λ̂ row
    (``step, llc_mean, llc_std, init_loss, <diagnostics>, <settings>, status, reason,
    warnings``) and ``num_sampled_params``. A failure gives a failed row per component in
    ``names``."""
    if isinstance(outcome, EstimateFailure):
        return [{"component": n, **failed_row(step, outcome.reason)} for n in names or []]
    rows = []
    for name, result in outcome.items():
        if isinstance(result, EstimateFailure):
            row = failed_row(step, result.reason)
        else:
            row = result_row(step, result)
            row["num_sampled_params"] = int(result.settings["num_sampled_params"])
        rows.append({"component": name, **row})
    return rows


def write_component_rows(store: RunStore, rows: list[Mapping[str, Any]]) -> None:
    """Insert or replace rows of the long table by (component, step), atomically and under the
    store's lock (a resumed run re-estimating a step replaces its rows; the others stay)."""
    store.upsert_rows(COMPONENTS_FILE, rows, key=COMPONENT_KEY)


def detect_component_stages(store: RunStore, **options: Any) -> dict[str, list[dict]]:
    """The stages of every component's curve (:func:`devinterp.detect_stages`), written to
    ``stages_components.json``; a component with fewer than 5 λ̂ rows has none."""
    from devinterp.stages import detect_stages

    table = store.read_components()
    out: dict[str, list[dict]] = {}
    for name, curve in table.groupby("component", sort=False):
        ok = curve[curve["status"] == "ok"] if "status" in curve.columns else curve
        out[str(name)] = detect_stages(ok.drop(columns="component"), **options) if len(
            ok) >= 5 else []
    store.write_json(COMPONENT_STAGES_FILE, out)
    return out


def estimate_component_curves(store: RunStore, model: nn.Module, data: Any, components: Any,
                              *, loss_fn: Callable[..., Tensor] | None = None,
                              batch_loss: Callable[..., Tensor] | None = None,
                              options: Mapping[str, Any] | None = None,
                              steps: list[int] | None = None) -> list[dict[str, Any]]:
    """Post-hoc component curves of a run directory: load each snapshot (``steps``, default
    all) into ``model`` (weights only), estimate every component with the run's sampler
    settings (:mod:`devinterp.tracking.calibration`: those of its λ̂ curve, else calibrated on
    an early and the last snapshot), write its rows to the long table, then the stages of
    every curve. What ``devinterp estimate RUN --components heads``
    calls once it has rebuilt the model, data and loss; a snapshot that cannot be read or
    estimated gives failed rows naming why, and the others go on. Returns the rows written."""
    from devinterp.components import resolve_components
    from devinterp.run.rebuild import load_weights

    names = list(resolve_components(model, components))
    snaps = store.snapshots()
    wanted = sorted(snaps) if steps is None else sorted(steps)
    missing = [s for s in wanted if s not in snaps]
    if missing:
        raise ValueError(f"no snapshot for steps {missing} in {store.path}; its snapshots are "
                         f"at steps {sorted(snaps)[:12]}")
    calibration = RunCalibration(store, options or {})
    if wanted:
        def probe_at(step: int) -> dict[str, Any]:
            model.load_state_dict(load_weights(snaps[step]))
            return calibration.probe(model, data, loss_fn=loss_fn, batch_loss=batch_loss)

        calibration.calibrate_posthoc(snaps, probe_at)  # the λ̂ curve's, when it has one
    written: list[dict[str, Any]] = []
    for step in wanted:
        try:
            model.load_state_dict(load_weights(snaps[step]))
            outcome = run_components(model, data, components, loss_fn=loss_fn,
                                     batch_loss=batch_loss,
                                     options=calibration.estimator_options())
        except Exception as e:  # noqa: BLE001 - one bad snapshot must not lose the others
            outcome = EstimateFailure(f"{type(e).__name__}: {first_line(e)}")
        rows = component_rows(step, outcome, names)
        write_component_rows(store, rows)
        written += rows
    detect_component_stages(store)
    return written
