"""Weights & Biases, in one place: λ̂ and stages on the training loss's step axis, the run that
``run.json`` records, and the dashboard page attached to a W&B run.

Every λ̂ value is logged against ``trainer/global_step`` (:data:`STEP_METRIC`), the axis of the
training loss, so values that arrive late (deferred or post-hoc estimates) still line up with
the loss. ``wandb`` is imported only by the functions that talk to it.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

from devinterp.run.store import LLC_FILE, RUN_FILE, RunStore

__all__ = ["LLC_COLUMNS", "STEP_METRIC", "attach_dashboard", "define_llc_metrics",
           "log_llc_rows", "run_record"]

#: The step metric of every ``llc/*`` and ``stage/*`` value: Lightning's training step.
STEP_METRIC = "trainer/global_step"

#: λ̂ table columns logged as ``llc/<column>``, besides ``llc/mean`` and ``llc/std``.
LLC_COLUMNS = ("init_loss", "mala_acceptance", "rhat", "ess", "frac_below_baseline",
               "num_diverged", "step_size", "nbeta")


def define_llc_metrics(run: Any) -> None:
    """Plot ``llc/*`` and ``stage/*`` of the W&B ``run`` against :data:`STEP_METRIC`."""
    run.define_metric(STEP_METRIC)
    run.define_metric("llc/*", step_metric=STEP_METRIC)
    run.define_metric("stage/*", step_metric=STEP_METRIC)


def run_record(run: Any, save_dir: str | os.PathLike | None) -> dict[str, Any]:
    """What ``run.json`` records under ``"wandb"`` so that later commands (``devinterp estimate
    --wandb``) can resume the W&B ``run``: its id, project, entity and local directory."""
    return {"id": run.id, "project": run.project, "entity": run.entity,
            "save_dir": None if save_dir is None else os.fspath(save_dir)}


def attach_dashboard(run_dir: str | os.PathLike, wandb_run: Any) -> None:
    """Attach the run's dashboard to a W&B run as ``wandb.Html`` under the key ``dashboard``."""
    import wandb

    from devinterp.dashboard import build_html

    # A file-like object: a str could be taken for a path; inject=False keeps the page offline
    # (W&B's injected stylesheet is a link to its servers).
    page = io.StringIO(build_html([run_dir]))
    wandb_run.log({"dashboard": wandb.Html(page, inject=False)})


def log_llc_rows(run_dir: str | os.PathLike, *, stages: list[dict] | None = None) -> int:
    """Log every ``ok`` λ̂ row to the W&B run recorded in ``run.json``, on the
    :data:`STEP_METRIC` axis (so the values line up with the loss even though they arrive
    after training), with ``stage/index`` once there are enough rows for stages (``stages``,
    else detected and written here), then attach the dashboard page, as the callback does at
    the end of inline training. Returns the number of rows logged.

    Raises ValueError when ``run.json`` records no W&B run.
    """
    import wandb

    store = RunStore(run_dir)
    info = (store.read_json(RUN_FILE, {}) or {}).get("wandb")
    if not info:
        raise ValueError(f"{store.path / RUN_FILE} records no W&B run; train with a WandbLogger "
                         "and LLCCallback to use --wandb")
    table = store.read_table(LLC_FILE)
    run = wandb.init(id=info["id"], project=info.get("project"), entity=info.get("entity"),
                     dir=info.get("save_dir"), resume="allow")
    try:
        define_llc_metrics(run)
        if stages is None:
            from devinterp.run.estimate import write_stages_or_warn

            stages = write_stages_or_warn(store.path)
        n = 0
        for row in table.to_dict("records"):
            if row.get("status", "ok") == "ok":
                run.log({**_row_metrics(row, stages), STEP_METRIC: int(row["step"])})
                n += 1
        attach_dashboard(store.path, run)
    finally:
        run.finish()
    return n


def _row_metrics(row: dict[str, Any], stages: list[dict]) -> dict[str, float]:
    """A λ̂ row as W&B metrics: ``llc/*`` (finite values only) and ``stage/index``."""
    from devinterp.stages import stage_index

    values = {"mean": row["llc_mean"], "std": row["llc_std"],
              **{k: row[k] for k in LLC_COLUMNS if k in row}}
    metrics = {f"llc/{k}": float(v) for k, v in values.items() if math.isfinite(v)}
    if stages:
        metrics["stage/index"] = float(stage_index(stages, int(row["step"])))
    return metrics
