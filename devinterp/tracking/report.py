"""What the callback adds once inline training ends: the stages of the λ̂ curve on every logger,
and the dashboard page on the W&B run. Both only warn when they fail: training is done."""

from __future__ import annotations

from typing import Any

from devinterp.run.store import LLC_FILE, RunStore
from devinterp.tracking.loggers import Warn, log_metrics

__all__ = ["attach_dashboard", "log_stages"]


def log_stages(loggers: list[Any], store: RunStore, warn: Warn) -> None:
    """Detect the developmental stages of the λ̂ curve, write ``stages.json`` and log
    ``stage/index`` (the 1-based stage each λ̂ step lies in; a milestone closes its stage) at the
    λ̂ steps, so every logger shows the stages on the λ̂ axis. Fewer than 5 λ̂ rows: nothing."""
    from devinterp.stages import detect_and_write, stage_index

    try:
        stages = detect_and_write(store.path)
        if not stages:
            return
        llc = store.read_table(LLC_FILE)
        for step in llc[llc["status"] == "ok"]["step"].astype(int):
            log_metrics(loggers, step, {"stage/index": float(stage_index(stages, step))})
    except Exception as e:  # noqa: BLE001 - the training run is done; keep it that way
        warn("stages", f"LLCCallback: could not detect stages ({type(e).__name__}: {e}); run "
                       f"`devinterp stages {store.path}` instead")


def attach_dashboard(loggers: list[Any], store: RunStore, warn: Warn) -> None:
    """With a WandbLogger, attach the dashboard page (curves and stages) to the W&B run, next to
    the native λ̂ charts."""
    from lightning.pytorch.loggers import WandbLogger

    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return
    try:
        from devinterp.run.wandb import attach_dashboard as attach_page

        for lg in wandb_loggers:
            attach_page(store.path, lg.experiment)
    except Exception as e:  # noqa: BLE001 - the training run is done; keep it that way
        warn("dashboard", f"LLCCallback: could not attach the dashboard to W&B "
                          f"({type(e).__name__}: {e}); run `devinterp dashboard {store.path} "
                          "-o dashboard.html` instead")
