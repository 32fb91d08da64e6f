"""The dashboard: loss, λ̂ and developmental stages of one run or many, offline or served.

- :func:`build_html` -> one self-contained HTML page (plotly.js embedded, no network).
- :func:`serve` / :class:`DashboardServer`: a local server over a folder of runs that picks up
  new λ̂ rows while a run trains.

Runs are read with :func:`devinterp.run.store.load_run`; figures are built in
:mod:`~devinterp.dashboard.figures`, the page model and HTML in :mod:`~devinterp.dashboard.page`.
The command line is :mod:`devinterp.cli.dashboard`; the page is attached to a W&B run by
:func:`devinterp.run.wandb.attach_dashboard`.
"""

from devinterp.dashboard.page import build_html, build_page, render_html
from devinterp.dashboard.server import DashboardServer, serve

__all__ = ["DashboardServer", "build_html", "build_page", "render_html", "serve"]
