"""The components panel: every component's λ̂ curve (``llc_components.csv``) as small multiples
with shared axes (step + 1 on a log axis, as the main figure), coloured by the group of curves
of the same shape.

Groups are k-means clusters of the normalized curves, as Wang et al. (2024) group attention
heads: each curve is interpolated onto the steps of all components (in log10(step + 1)),
centred and scaled to unit norm, so curves group by shape, not by level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from devinterp.dashboard.figures import numbers, plot_text, step_x
from devinterp.run.store import Run

__all__ = ["GROUP_COLORS", "component_curves", "components_figure", "group_curves"]

GROUP_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
#: Columns of the grid of small multiples.
_COLUMNS = 4


def component_curves(run: Run) -> pd.DataFrame:
    """The run's long component table, ok rows only (empty when the run has none)."""
    table = run.components
    if "status" in table.columns:
        table = table[table["status"] == "ok"]
    return table.dropna(subset=["llc_mean"]) if "llc_mean" in table.columns else table


def _shapes(table: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Component names and their normalized curves on a common log-step grid (k, points)."""
    names = list(dict.fromkeys(table["component"]))
    grid = np.log10(np.unique(table["step"].to_numpy(dtype=float)) + 1)
    rows = []
    for name in names:
        c = table[table["component"] == name].sort_values("step")
        y = np.interp(grid, np.log10(c["step"].to_numpy(dtype=float) + 1),
                      c["llc_mean"].to_numpy(dtype=float))
        y = y - y.mean()
        norm = np.linalg.norm(y)
        rows.append(y / norm if norm > 0 else y)
    return names, np.array(rows)


def group_curves(table: pd.DataFrame, k: int | None = None, seed: int = 0) -> dict[str, int]:
    """Component -> group (0, 1, ...) by k-means on the normalized curves: k-means++ starts
    from ``seed``, best of 10 restarts. ``k`` default: the number of groups, between 1 and 4,
    whose within-group spread stops falling by more than half when one more is added."""
    names, x = _shapes(table)
    if not names:
        return {}
    n = len(names)
    if k is None:
        k, best = 1, _kmeans(x, 1, seed)
        for j in range(2, min(4, n) + 1):
            trial = _kmeans(x, j, seed)
            if trial[1] > 0.5 * best[1]:
                break
            k, best = j, trial
        labels = best[0]
    else:
        labels = _kmeans(x, max(1, min(k, n)), seed)[0]
    # Groups numbered by first appearance, so colours are stable for the same run.
    order: dict[int, int] = {}
    return {name: order.setdefault(int(g), len(order)) for name, g in zip(names, labels,
                                                                          strict=True)}


def _kmeans(x: np.ndarray, k: int, seed: int, restarts: int = 10, iters: int = 100
            ) -> tuple[np.ndarray, float]:
    """Labels and within-cluster sum of squares of the best of ``restarts`` k-means++ runs."""
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, float] = (np.zeros(len(x), dtype=int), math.inf)
    for _ in range(restarts):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
            p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1 / len(x))
            centres.append(x[rng.choice(len(x), p=p)])
        c = np.array(centres)
        for _ in range(iters):
            labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[labels == j].mean(0) if (labels == j).any() else c[j]
                            for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        labels = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        sse = float(((x - c[labels]) ** 2).sum())
        if sse < best[1] - 1e-12:
            best = (labels, sse)
    return best


def _component_trace(curve: pd.DataFrame, comp: str, axis: str, g: int,
                     show_legend: bool) -> dict[str, Any]:
    """The λ̂ ± std curve of component ``comp`` in panel ``axis``, in the colour of group ``g``."""
    color = GROUP_COLORS[g % len(GROUP_COLORS)]
    return {
        "type": "scatter", "mode": "lines+markers", "xaxis": f"x{axis}",
        "yaxis": f"y{axis}", "name": f"group {g + 1}", "legendgroup": f"group {g + 1}",
        "showlegend": show_legend,
        "x": step_x(curve["step"]),
        "y": numbers(curve["llc_mean"]),
        "error_y": {"type": "data", "array": numbers(curve["llc_std"]) if "llc_std"
                    in curve.columns else [], "visible": "llc_std" in curve.columns,
                    "thickness": 1},
        "line": {"color": color, "width": 1.5}, "marker": {"size": 4},
        "text": [plot_text(comp)] * len(curve),
        "hovertemplate": "%{text}<br>step %{customdata}<br>λ̂ %{y:.4g}<extra></extra>",
        "customdata": [int(s) for s in curve["step"]],
    }


def components_figure(runs: Sequence[Run], names: Sequence[str]) -> dict | None:
    """A Plotly figure: one small panel per component (of the first run with components),
    λ̂ ± std on shared log-step and λ̂ axes, coloured by :func:`group_curves`; None when no run
    has component curves."""
    tables = [component_curves(run) for run in runs]
    found = [i for i, t in enumerate(tables) if len(t)]
    if not found:
        return None
    table, run_name = tables[found[0]], names[found[0]]
    groups = group_curves(table)
    comps = list(groups)
    rows = math.ceil(len(comps) / _COLUMNS)
    gap_x, gap_y = 0.04, 0.12 / max(rows, 1)
    width, height = (1 - gap_x * (_COLUMNS - 1)) / _COLUMNS, (1 - gap_y * (rows - 1)) / rows
    lo = float(np.log10(table["step"].min() + 1))
    hi = float(np.log10(table["step"].max() + 1))
    pad = 0.02 * max(hi - lo, 1.0)
    std = table["llc_std"].fillna(0) if "llc_std" in table.columns else 0.0
    ymin, ymax = float((table["llc_mean"] - std).min()), float((table["llc_mean"] + std).max())
    ypad = 0.05 * max(ymax - ymin, 1e-9)
    data: list[dict[str, Any]] = []
    layout: dict[str, Any] = {
        "height": 150 * rows + 80, "margin": {"l": 50, "r": 10, "t": 40, "b": 40},
        "showlegend": True, "hovermode": "closest",
        "title": {"text": plot_text(f"{run_name}: λ̂ of {len(comps)} components "
                                    f"({len(set(groups.values()))} curve shapes)"),
                  "font": {"size": 13}},
        "annotations": [],
    }
    seen_groups: set[int] = set()
    for i, comp in enumerate(comps):
        r, c = divmod(i, _COLUMNS)
        axis = "" if i == 0 else str(i + 1)
        x0 = c * (width + gap_x)
        y1 = 1 - r * (height + gap_y)
        layout[f"xaxis{axis}"] = {"domain": [x0, x0 + width], "type": "log",
                                  "range": [lo - pad, hi + pad], "anchor": f"y{axis}",
                                  "showticklabels": r == rows - 1,
                                  "title": {"text": "step + 1"} if r == rows - 1 and c == 0
                                  else None}
        layout[f"yaxis{axis}"] = {"domain": [y1 - height, y1], "anchor": f"x{axis}",
                                  "range": [ymin - ypad, ymax + ypad],
                                  "showticklabels": c == 0}
        layout["annotations"].append({
            "text": plot_text(comp), "xref": f"x{axis} domain", "yref": f"y{axis} domain",
            "x": 0.02, "y": 0.98, "xanchor": "left", "yanchor": "top", "showarrow": False,
            "font": {"size": 11}})
        curve = table[table["component"] == comp].sort_values("step")
        g = groups[comp]
        data.append(_component_trace(curve, comp, axis, g, g not in seen_groups))
        seen_groups.add(g)
    return {"data": data, "layout": layout, "groups": {k: v + 1 for k, v in groups.items()}}
