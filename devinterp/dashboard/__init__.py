"""The dashboard: loss, λ̂ and developmental stages of one run or many, offline or served.

- :func:`build_html` -> one self-contained HTML page (plotly.js embedded, no network).
- :func:`log_to_wandb` attaches that page to a W&B run (``wandb.Html`` under ``dashboard``).
- :func:`serve` / :class:`DashboardServer`: a local server over a folder of runs that picks up
  new λ̂ rows while a run trains.
- :func:`main`: ``devinterp dashboard RUN_DIR ... -o FILE.html`` or ``ROOT --serve``.

Runs are read with :func:`devinterp.run.store.load_run`; figures are built in
:mod:`~devinterp.dashboard.figures`, the page model and HTML in :mod:`~devinterp.dashboard.page`.
"""

from devinterp.dashboard.cli import main
from devinterp.dashboard.page import build_html, build_page, log_to_wandb, render_html
from devinterp.dashboard.server import DashboardServer, serve

__all__ = ["DashboardServer", "build_html", "build_page", "log_to_wandb", "main",
           "render_html", "serve"]
