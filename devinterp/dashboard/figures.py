"""Plotly figures (plain ``{"data": [...], "layout": {...}}`` dicts) built from loaded runs.

Figures are built here, in Python, so the browser only draws them and every figure can be
unit-tested without a browser. Two rules hold for everything below:

- Steps are plotted as ``step + 1`` on log axes: the snapshot at initialization is step 0, and
  ``log(0)`` would send a stage band that starts at 0 (and the first λ̂ point) to minus infinity.
  Hover labels show the true step. This is the same ``log(step + 1)`` the stage detector uses.
- Plotly reads HTML-like markup (``<b>``, ``<a href>``, entities) in every text it draws, so each
  string that comes from a run (names, column names, warnings) goes through :func:`plot_text`.

Every trace carries ``meta = {"kind": ..., "run": index}`` and every shape a ``name`` such as
``"stage:0:2"``, so tests (and the page's click handler) can find them without parsing labels.
"""

from __future__ import annotations

import ast
import functools
import html
import json
import math
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from devinterp.health import HEALTH_RULES, HealthRule
from devinterp.run.store import Run

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
STAGE_COLORS = {"A": "#2ca02c", "B": "#ff7f0e"}
STAGE_OTHER_COLOR = "#7f7f7f"
FLAG_COLOR = "#d62728"
LOSS_COLOR = "#555555"
DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12,
        "color": "#222"}
GRID = "#e6e6e6"
STEP_AXIS_TITLE = "training step + 1 (log scale)"
HOVER = "step %{customdata}<br>%{y:.4g}<extra>%{fullData.name}</extra>"
MAX_MARKERS = 400
#: λ̂ columns that are the estimate itself, not diagnostics.
ESTIMATE_COLUMNS = ("step", "llc_mean", "llc_std")


def plot_text(value: Any) -> str:
    """``value`` as text that Plotly shows literally (its markup and entities escaped)."""
    return html.escape(str(value), quote=False)


def step_x(steps: Any) -> list[int]:
    """Log-axis x coordinates of training steps: ``step + 1`` (see the module docstring)."""
    return [int(s) + 1 for s in np.asarray(steps, dtype=np.int64).tolist()]


def numbers(values: Any, digits: int = 6) -> list[float | None]:
    """Floats for JSON with at least ``digits`` significant digits (fewer characters than
    full precision); NaN and inf become None.

    One rounding for the whole array, to the decimals its smallest nonzero magnitude needs,
    keeps this vectorized: traces hold hundreds of thousands of values.
    """
    arr = np.asarray(values, dtype=np.float64).ravel()
    finite = np.isfinite(arr)
    magnitudes = np.abs(arr[finite & (arr != 0)])
    if magnitudes.size:
        decimals = digits - 1 - int(np.floor(np.log10(magnitudes.min())))
        arr = np.round(arr, min(max(decimals, 0), 15))
    out: list[float | None] = arr.tolist()
    if not finite.all():
        out = [v if ok else None for v, ok in zip(out, finite.tolist(), strict=True)]
    return out


def run_color(index: int, n_runs: int) -> str:
    """The colour of run ``index``: blue for a lone run, the palette in a comparison."""
    return PALETTE[0] if n_runs == 1 else PALETTE[index % len(PALETTE)]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


# ----------------------------------------------------------------------------------------------
# Health of each λ̂ estimate
# ----------------------------------------------------------------------------------------------
NOT_FINITE_WHY = "λ̂ is not finite: the chains diverged or the loss at w* is not finite"
#: Position of each diagnostic in the health table: panels, banner lines and merged problems
#: follow it (the most serious first).
_RULE_ORDER = {column: k for k, column in enumerate(dict.fromkeys(r.column
                                                                  for r in HEALTH_RULES))}


@functools.lru_cache(maxsize=4096)
def column_key(column: str) -> str:
    """The diagnostic a column holds, ignoring a logger prefix (``llc/rhat`` -> ``rhat``)."""
    return column.replace(".", "/").split("/")[-1]


@functools.lru_cache(maxsize=4096)
def rules_for(column: str) -> tuple[HealthRule, ...]:
    """The health rules of a λ̂-table column (ignoring a logger prefix), in table order."""
    key = column_key(column)
    return tuple(r for r in HEALTH_RULES if r.column == key)


def rule_for(column: str) -> HealthRule | None:
    """The first health rule of a λ̂-table column (its label names the problem), if any."""
    rules = rules_for(column)
    return rules[0] if rules else None


def bound_text(column: str) -> str:
    """``flagged if < 0.9`` for a column's rules, "" without one (the table's header hint)."""
    rules = rules_for(column)
    lows = [r.low for r in rules if r.low is not None]
    highs = [r.high for r in rules if r.high is not None]
    parts = ([f"< {max(lows):g}"] if lows else []) + ([f"> {min(highs):g}"] if highs else [])
    conditions = sorted({f"{r.when_negative} < 0" for r in rules if r.when_negative})
    if not parts:
        return ""
    return "flagged if " + " or ".join(parts) + (
        f" (when {' and '.join(conditions)})" if conditions else "")


@functools.lru_cache(maxsize=256)
def _template_pattern(template: str) -> re.Pattern[str]:
    """A regular expression matching the warnings a rule's template writes, any values."""
    parts = [re.escape(literal) + (".*?" if field is not None else "")
             for literal, field, _, _ in string.Formatter().parse(template)]
    return re.compile("".join(parts), re.S)


@functools.lru_cache(maxsize=4096)
def warning_rule(text: str) -> HealthRule | None:
    """The health rule whose template wrote the estimator warning ``text``, if one did."""
    return next((r for r in HEALTH_RULES if r.warns and r.template
                 and _template_pattern(r.template).fullmatch(text)), None)


def _text(cell: Any) -> str:
    """A table cell as text; empty cells (read back by pandas as NaN) become ""."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return ""
    return str(cell).strip()


def parse_warnings(cell: Any) -> list[str]:
    """The estimator's warnings stored in one table cell.

    The run store holds them joined by `` | `` (``devinterp.tracking.result_row``); a list
    written as JSON or as a Python repr is read too.
    """
    if isinstance(cell, (list, tuple)):
        return [str(w) for w in cell if str(w).strip()]
    text = _text(cell)
    if text in ("", "[]", "nan", "None"):
        return []
    if text.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if isinstance(value, list):
                return [str(w) for w in value if str(w).strip()]
    return [w.strip() for w in text.split(" | ") if w.strip()]


@dataclass(frozen=True)
class Flag:
    """One problem with the λ̂ estimate of one run at one step."""

    run: int
    step: int
    column: str
    value: str
    why: str


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def warning_columns(llc: pd.DataFrame) -> list[str]:
    return [c for c in llc.columns if column_key(c) == "warnings"]


class _Columns:
    """The numeric columns of a λ̂ table as lists, by diagnostic name, read on first use."""

    def __init__(self, llc: pd.DataFrame) -> None:
        self._llc = llc
        self._names = {column_key(c): c for c in llc.columns if _is_numeric(llc[c])}
        self._lists: dict[str, list[float]] = {}

    def value(self, name: str, k: int) -> float:
        if name not in self._lists:
            self._lists[name] = self._llc[self._names[name]].to_numpy(dtype=np.float64).tolist()
        return self._lists[name][k]

    def row(self, k: int) -> Mapping[str, float]:
        return _Row(self, k)


class _Row(Mapping):
    """Row ``k`` of a :class:`_Columns` as a read-only mapping (built without copying)."""

    def __init__(self, columns: _Columns, k: int) -> None:
        self._columns, self._k = columns, k

    def __getitem__(self, name: str) -> float:
        if name not in self._columns._names:
            raise KeyError(name)
        return self._columns.value(name, self._k)

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns._names)

    def __len__(self) -> int:
        return len(self._columns._names)


def _breaks(rule: HealthRule, value: float, row: Mapping[str, float]) -> bool:
    """``rule.flagged``, and an infinite value beyond a bound breaks it too (an R-hat of inf:
    chains that never moved and disagree)."""
    if math.isinf(value):
        bound = rule.high if value > 0 else rule.low
        return bound is not None and rule.flagged(math.copysign(1e300, value), row)
    return rule.flagged(value, row)


def health_flags(llc: pd.DataFrame, run_index: int = 0) -> list[Flag]:
    """Every flagged value of a λ̂ table: failed estimates, broken health rules
    (:data:`devinterp.health.HEALTH_RULES`, the estimator's own table) and the estimator's
    warnings (one flag per cell; :func:`problems` merges them)."""
    flags: list[Flag] = []
    steps = llc["step"].to_numpy(dtype=np.int64)
    failed: set[int] = set()
    if "status" in llc.columns:
        reasons = llc["reason"].tolist() if "reason" in llc.columns else [""] * len(llc)
        for step, status, reason in zip(steps.tolist(), llc["status"].tolist(), reasons,
                                        strict=True):
            status = _text(status)
            if status and status != "ok":
                failed.add(step)
                why = f"no estimate: {_text(reason)}" if _text(reason) else "no estimate"
                flags.append(Flag(run_index, step, "status", status, why))
    # Every numeric column, for rules that read other values of the row (draws below w*
    # matter when λ̂ < 0).
    table = _Columns(llc)
    for col in llc.columns:
        rules = rules_for(col)
        if not rules or not _is_numeric(llc[col]):
            continue
        values = llc[col].to_numpy(dtype=np.float64).tolist()
        for k, (step, v) in enumerate(zip(steps.tolist(), values, strict=True)):
            if step in failed:
                continue
            row = table.row(k)
            rule = next((r for r in rules if _breaks(r, v, row)), None)
            if rule is not None:
                flags.append(Flag(run_index, step, col, f"{v:.4g}", rule.why))
            elif rules[0].column == "llc_mean" and not math.isfinite(v):
                flags.append(Flag(run_index, step, col, f"{v}", NOT_FINITE_WHY))
    for col in warning_columns(llc):
        for step, cell in zip(steps.tolist(), llc[col].tolist(), strict=True):
            for text in parse_warnings(cell):
                flags.append(Flag(run_index, step, col, "", text))
    flags.sort(key=lambda f: (f.step, f.column))
    return flags


@dataclass(frozen=True)
class Problem:
    """One problem of one estimate, as the page lists it: the flags it stands for (a rule's
    violation and the estimator's warning about the same diagnostic become one problem)."""

    first: Flag
    why: str
    flags: tuple[Flag, ...]

    @property
    def run(self) -> int:
        return self.first.run

    @property
    def step(self) -> int:
        return self.first.step


def problems(flags: Sequence[Flag]) -> list[Problem]:
    """Flags merged into problems, per point in the order of ``flags``, the most serious
    first (linear in their number).

    At one (run, step), an estimator warning written by a health rule's template joins that
    rule's flagged value, and the value its rule depends on (``when_negative``: λ̂ < 0 for the
    draws below w*); the warning's own text, which carries the measured values, becomes the
    problem's explanation. The most serious flag (first in the health table) names it.
    """
    by_point: dict[tuple[int, int], list[Flag]] = {}
    for f in flags:
        by_point.setdefault((f.run, f.step), []).append(f)
    out: list[Problem] = []
    for group in by_point.values():
        members: dict[str, list[Flag]] = {}  # diagnostic -> its flags (a problem each)
        why: dict[str, str] = {}
        # Values first, then the warnings that join them.
        for f in sorted(group, key=lambda f: column_key(f.column) == "warnings"):
            key = column_key(f.column)
            if key == "warnings":
                rule = warning_rule(f.why)
                if rule is None:
                    members[f"warning:{id(f)}"], why[f"warning:{id(f)}"] = [f], f.why
                    continue
                key = rule.column
                why[key] = f.why
                if rule.when_negative in members:  # one cause, one problem
                    members.setdefault(key, []).extend(members.pop(rule.when_negative))
            elif f.column == "status":
                key = f"status:{id(f)}"
            members.setdefault(key, []).append(f)
            why.setdefault(key, f.why)
        here = []
        for key, items in members.items():
            items.sort(key=_seriousness)
            here.append(Problem(items[0], why[key], tuple(items)))
        out += sorted(here, key=lambda p: _seriousness(p.first))  # most serious first
    return out


def _seriousness(flag: Flag) -> int:
    """A flag's place in the health table (failed estimates and unknown warnings last)."""
    return _RULE_ORDER.get(column_key(flag.column), len(_RULE_ORDER))


# ----------------------------------------------------------------------------------------------
# Shared axis helpers
# ----------------------------------------------------------------------------------------------
def loss_columns(metrics: pd.DataFrame) -> list[str]:
    """Metric columns that hold a loss, training losses first."""
    cols = [c for c in metrics.columns if c != "step" and "loss" in c.lower()
            and _is_numeric(metrics[c])]
    return sorted(cols, key=lambda c: (0 if "train" in c.lower() else 1, c))


def step_range(runs: Sequence[Run]) -> tuple[int, int] | None:
    """Smallest and largest plotted ``step + 1`` over the λ̂ and loss rows of ``runs``."""
    xs: list[int] = []
    for run in runs:
        for df in (run.llc, run.metrics):
            if len(df):
                xs += [int(df["step"].min()) + 1, int(df["step"].max()) + 1]
    return (min(xs), max(xs)) if xs else None


def log_range(span: tuple[int, int] | None) -> list[float]:
    """A padded log10 axis range covering ``span`` (Plotly log ranges are in log10 units)."""
    if span is None:
        return [0.0, 1.0]
    lo, hi = math.log10(max(span[0], 1)), math.log10(max(span[1], 1))
    pad = 0.03 * (hi - lo) if hi > lo else 0.25
    return [round(lo - pad, 4), round(hi + pad, 4)]


def _step_axis(range_: list[float], **extra: Any) -> dict:
    # dtick "D2": label 1, 2 and 5 of each decade (not a "9" left of step 1).
    return {"type": "log", "range": range_, "dtick": "D2", "exponentformat": "SI",
            "gridcolor": GRID, "linecolor": "#999", "ticks": "outside", "ticklen": 4, **extra}


def _value_axis(**extra: Any) -> dict:
    return {"gridcolor": GRID, "linecolor": "#999", "zerolinecolor": "#bbb", "ticks": "outside",
            "ticklen": 4, **extra}


def _base_layout(height: int) -> dict:
    return {"height": height, "margin": {"l": 72, "r": 24, "t": 36, "b": 48},
            "hovermode": "closest", "uirevision": "keep", "font": FONT,
            "plot_bgcolor": "white", "paper_bgcolor": "white",
            "legend": {"orientation": "h", "x": 0, "xanchor": "left", "y": 1.0,
                       "yanchor": "bottom", "bgcolor": "rgba(255,255,255,0)",
                       "traceorder": "normal"}}


# ----------------------------------------------------------------------------------------------
# Loss and λ̂ over training, with stages
# ----------------------------------------------------------------------------------------------
def _stage_bounds(stage: dict, lo: int, hi: int) -> tuple[int, int] | None:
    """A stage's plotted ``[step + 1, step + 1]`` clipped to the data, or None if not drawable."""
    try:
        x0, x1 = int(stage["start_step"]) + 1, int(stage["end_step"]) + 1
    except (KeyError, TypeError, ValueError):
        return None
    x0, x1 = max(min(x0, x1), lo), min(max(x0, x1), hi)
    return (x0, x1) if x1 > x0 else None


def stage_label(stage: dict, wide: bool = True) -> str:
    """``A  Δλ̂ +26.4`` (or just the type when the band is narrow)."""
    kind = str(stage.get("type", "?"))
    change = stage.get("llc_change")
    if wide and isinstance(change, (int, float)) and math.isfinite(change):
        return f"{kind}  Δλ̂ {change:+.3g}"
    return kind


def _stage_shapes(run: Run, run_index: int, lo: int, hi: int, axis_span: float,
                  *, xref: str, yref: str, y0: float, y1: float, opacity: float) -> list[dict]:
    shapes = []
    for k, stage in enumerate(run.stages):
        if not isinstance(stage, dict):
            continue
        bounds = _stage_bounds(stage, lo, hi)
        if bounds is None:
            continue
        kind = str(stage.get("type", ""))
        width = (math.log10(bounds[1]) - math.log10(bounds[0])) / max(axis_span, 1e-9)
        # The type letter fits in ~1% of the axis; "A  Δλ̂ +26.4" needs ~9%.
        text = "" if width < 0.01 else plot_text(stage_label(stage, wide=width > 0.09))
        shapes.append({
            "type": "rect", "name": f"stage:{run_index}:{k}", "layer": "below",
            "xref": xref, "yref": yref, "x0": bounds[0], "x1": bounds[1], "y0": y0, "y1": y1,
            # Neighbouring stages of one type alternate in strength so their edge shows.
            "fillcolor": STAGE_COLORS.get(kind, STAGE_OTHER_COLOR),
            "opacity": opacity * (1.0 if k % 2 == 0 else 0.6),
            "line": {"width": 1, "color": "rgba(0,0,0,0.25)"},
            "label": {"text": text, "textposition": "top center",
                      "font": {"size": 11, "color": "#333"}},
        })
    return shapes


def _stage_hover_trace(run: Run, run_index: int, name: str, lo: int, hi: int) -> dict | None:
    """Invisible markers at the middle of each stage lane so a hover tells the stage."""
    xs, texts = [], []
    for k, stage in enumerate(run.stages):
        bounds = _stage_bounds(stage, lo, hi) if isinstance(stage, dict) else None
        if bounds is None:
            continue
        xs.append(math.sqrt(bounds[0] * bounds[1]))
        texts.append(plot_text(
            f"{name} · stage {k + 1}: {stage_label(stage)} · steps "
            f"{stage.get('start_step')}–{stage.get('end_step')}"))
    if not xs:
        return None
    return {"type": "scatter", "mode": "markers", "x": xs, "y": [run_index] * len(xs),
            "xaxis": "x3", "yaxis": "y3", "hovertext": texts, "hoverinfo": "text",
            "marker": {"size": 14, "opacity": 0}, "showlegend": False,
            "meta": {"kind": "stage-hover", "run": run_index}}


def _loss_traces(run: Run, i: int, name: str, n_runs: int, loss_names: list[str],
                 loss_values: list[float]) -> list[dict]:
    """The loss curves of run ``i`` (top panel); adds its columns to ``loss_names`` (whose
    order picks the dash of each column) and its values to ``loss_values``."""
    multi = n_runs > 1
    traces = []
    for j, col in enumerate(loss_columns(run.metrics)):
        rows = run.metrics[["step", col]].dropna()
        if col not in loss_names:
            loss_names.append(col)
        loss_values += rows[col].tolist()
        traces.append({
            "type": "scatter", "mode": "lines", "x": step_x(rows["step"]),
            "y": numbers(rows[col]), "customdata": rows["step"].tolist(),
            "xaxis": "x", "yaxis": "y", "hovertemplate": HOVER,
            "name": plot_text(f"{name} · {col}" if multi else col),
            "line": {"color": run_color(i, n_runs) if multi else LOSS_COLOR, "width": 1.5,
                     "dash": DASHES[loss_names.index(col) % len(DASHES)]},
            "legendgroup": f"run{i}", "showlegend": not multi,
            "meta": {"kind": "loss", "run": i, "column": j},
        })
    return traces


def _llc_traces(runs: Sequence[Run], i: int, name: str) -> list[dict]:
    """The finite λ̂ of run ``i`` (bottom panel): its ± std band, then its curve."""
    multi = len(runs) > 1
    color = run_color(i, len(runs))
    group = f"run{i}"
    llc = runs[i].llc[["step", "llc_mean", "llc_std"]]
    llc = llc[np.isfinite(llc["llc_mean"].to_numpy(dtype=np.float64))]
    steps = llc["step"].tolist()
    band = llc[np.isfinite(llc["llc_std"].to_numpy(dtype=np.float64))]
    traces = []
    if len(band):
        bx = step_x(band["step"])
        upper = (band["llc_mean"] + band["llc_std"]).to_numpy()
        lower = (band["llc_mean"] - band["llc_std"]).to_numpy()
        traces.append({
            "type": "scatter", "mode": "lines", "x": bx + bx[::-1],
            "y": numbers(upper) + numbers(lower[::-1]), "fill": "toself",
            "fillcolor": _rgba(color, 0.08 if multi else 0.2), "line": {"width": 0},
            "hoverinfo": "skip",
            "xaxis": "x2", "yaxis": "y2", "name": "± std over chains",
            "legendgroup": group, "showlegend": not multi,
            "meta": {"kind": "llc-band", "run": i},
        })
    traces.append({
        "type": "scatter", "mode": _line_mode(runs),
        "x": step_x(steps), "y": numbers(llc["llc_mean"]), "customdata": steps,
        "xaxis": "x2", "yaxis": "y2", "hovertemplate": HOVER,
        "name": plot_text(name if multi else "λ̂"),
        "line": {"color": color, "width": 2}, "marker": {"size": 5, "color": color},
        "legendgroup": group, "showlegend": True,
        "meta": {"kind": "llc", "run": i},
    })
    return traces


def _missing_marks(flags: Sequence[Flag]) -> list[dict]:
    """A dotted line at each step with no finite λ̂ (a failed estimate has no point to ring)."""
    missing = sorted({(f.run, f.step) for f in flags
                      if f.column == "status" or f.why == NOT_FINITE_WHY})
    return [{"type": "line", "name": f"missing:{i}:{step}", "xref": "x2", "x0": step + 1,
             "x1": step + 1, "yref": "y2 domain", "y0": 0, "y1": 1, "layer": "above",
             "line": {"color": FLAG_COLOR, "width": 1.5, "dash": "dot"}}
            for i, step in missing]


def _panel_layout(n_runs: int, lanes: bool) -> tuple[int, float, list[float], list[float]]:
    """Figure height (px), the top of the stage lanes and the loss and λ̂ panel domains
    (paper fractions): lanes at the bottom when there are any, then λ̂, then loss."""
    lane_px = 26 * n_runs + 12 if lanes else 0
    lane_gap_px = 56 if lanes else 0
    panels_px = 500
    height = panels_px + lane_px + lane_gap_px + 84
    area = height - 84
    lane_top = (lane_px / area) if lanes else 0.0
    llc_bottom = lane_top + lane_gap_px / area
    split = llc_bottom + (1 - llc_bottom) * 0.5
    return height, lane_top, [split + 0.035, 1.0], [llc_bottom, split - 0.035]


def _add_lane_axes(layout: dict, names: Sequence[str], xr: list[float],
                   lane_top: float) -> dict:
    """Add the stage-lane axes (one row per run, labelled with its name) to ``layout`` and
    return the lanes' caption annotation."""
    labels = [plot_text(_short(n)) for n in names]
    # Room for the longest lane label (~7 px a character at 12 px) left of the panels.
    layout["margin"]["l"] = max(layout["margin"]["l"],
                                16 + 7 * max(len(_short(n)) for n in names))
    layout["xaxis3"] = _step_axis(xr, anchor="y3", matches="x",
                                  title={"text": STEP_AXIS_TITLE})
    layout["yaxis3"] = {"domain": [0, lane_top], "range": [len(names) - 0.5, -0.5],
                        "tickvals": list(range(len(names))), "fixedrange": True,
                        "ticktext": labels, "automargin": True,
                        "showgrid": False, "zeroline": False, "linecolor": "#999"}
    layout["xaxis2"]["showticklabels"] = False
    return {"text": "stages (A: λ̂ rises, B: λ̂ falls)", "xref": "paper",
            "yref": "paper", "x": 0, "y": lane_top, "xanchor": "left",
            "yanchor": "bottom", "showarrow": False,
            "font": {"size": 11, "color": "#555"}}


def _stage_marks(runs: Sequence[Run], names: Sequence[str], lanes: bool, lo: int, hi: int,
                 axis_span: float) -> tuple[list[dict], list[dict]]:
    """The stage shapes and hover traces: a lane per run when ``lanes``, else (one run) bands
    across both panels; several runs without stages get none."""
    shapes: list[dict] = []
    hovers: list[dict] = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        if lanes:
            shapes += _stage_shapes(run, i, lo, hi, axis_span, xref="x3", yref="y3",
                                    y0=i - 0.38, y1=i + 0.38, opacity=0.55)
            hover = _stage_hover_trace(run, i, name, lo, hi)
            if hover is not None:
                hovers.append(hover)
        elif len(runs) == 1:
            shapes += _stage_shapes(run, i, lo, hi, axis_span, xref="x", yref="paper",
                                    y0=0, y1=1, opacity=0.13)
    return shapes, hovers


def _panel_axes(xr: list[float], loss_values: list[float], loss_domain: list[float],
                llc_domain: list[float], lanes: bool) -> dict:
    """The loss (``x``/``y``) and λ̂ (``x2``/``y2``) axes; the loss axis is logarithmic when
    the loss is positive and spans more than a factor 30."""
    log_loss = bool(loss_values) and min(loss_values) > 0 and max(loss_values) / min(
        loss_values) > 30
    return {
        "xaxis": _step_axis(xr, anchor="y", showticklabels=False),
        "yaxis": _value_axis(domain=loss_domain, title={"text": "loss"},
                             **({"type": "log", **loss_axis_ticks(loss_values)} if log_loss
                                else {"type": "linear"}),
                             exponentformat="power"),
        "xaxis2": _step_axis(xr, anchor="y2", matches="x",
                             **({} if lanes else {"title": {"text": STEP_AXIS_TITLE}})),
        "yaxis2": _value_axis(domain=llc_domain,
                              title={"text": "λ̂ (local learning coefficient)"}),
    }


def llc_figure(runs: Sequence[Run], names: Sequence[str],
               flags: Sequence[Flag] = (), found: Sequence[Problem] | None = None) -> dict:
    """Loss (top) and λ̂ ± std (bottom) over ``step + 1`` on a shared log axis, with stages.

    One run: its stages are shaded bands across both panels, labelled with type and Δλ̂.
    Several runs: curves overlaid in one colour per run, and a lane per run below with its
    stages, so runs of one config (e.g. seeds) align on the step axis.
    """
    multi = len(runs) > 1
    span = step_range(runs)
    xr = log_range(span)
    lo, hi = span if span else (1, 10)
    data: list[dict] = []
    annotations: list[dict] = []
    loss_names: list[str] = []
    loss_values: list[float] = []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        data += _loss_traces(run, i, name, len(runs), loss_names, loss_values)
        data += _llc_traces(runs, i, name)
    flagged = _flag_points(runs, problems(flags) if found is None else found)
    if flagged is not None:
        data.append(flagged)

    lanes = multi and any(_stage_bounds(st, lo, hi) for r in runs for st in r.stages
                          if isinstance(st, dict))
    height, lane_top, loss_domain, llc_domain = _panel_layout(len(runs), lanes)
    layout = _base_layout(height)
    layout.update(_panel_axes(xr, loss_values, loss_domain, llc_domain, lanes))
    clipped = llc_axis_range(runs)
    if clipped is not None:
        layout["yaxis2"]["range"] = clipped[0]
        data.append(_offscale_trace(clipped[1], clipped[0], names))
    if lanes:
        annotations.append(_add_lane_axes(layout, names, xr, lane_top))
    if multi and len(loss_names) > 1:
        annotations.append({
            "text": plot_text(" · ".join(f"{DASHES[k % len(DASHES)]}: {c}"
                                         for k, c in enumerate(loss_names))),
            "xref": "paper", "yref": "paper", "x": 1, "y": 1, "xanchor": "right",
            "yanchor": "top", "showarrow": False, "font": {"size": 11, "color": "#555"},
            "bgcolor": "rgba(255,255,255,0.8)"})
    stage_shapes, stage_hovers = _stage_marks(runs, names, lanes, lo, hi, xr[1] - xr[0])
    data += stage_hovers
    # Placeholders sit in the middle of their own panel (paper coordinates: an axis that has
    # no trace is not drawn, and "y domain" of it would fall back onto another panel).
    if not loss_names:
        annotations.append(_empty_note("no loss logged in metrics.csv", loss_domain))
    if not any(len(r.llc) for r in runs):
        annotations.append(_empty_note("no λ̂ estimated yet", llc_domain))
    eps_shapes, eps_notes = _step_size_marks(runs, llc_domain)
    layout["shapes"] = _missing_marks(flags) + stage_shapes + eps_shapes
    layout["annotations"] = annotations + eps_notes
    return {"data": data, "layout": layout}


def _step_size_marks(runs: Sequence[Run], llc_domain: list[float]
                     ) -> tuple[list[dict], list[dict]]:
    """A dotted line across the λ̂ panel, labelled "ε ↓", at every step where run-level
    calibration lowered the step size (``calibration.json``'s ``changes``): points on either
    side were estimated with different settings."""
    shapes: list[dict] = []
    notes: list[dict] = []
    for i, run in enumerate(runs):
        changes = [c for entry in run.calibration.values() if isinstance(entry, dict)
                   for c in entry.get("changes", []) if isinstance(c, dict) and "step" in c]
        for k, c in enumerate(sorted(changes, key=lambda c: c["step"])):
            x = int(c["step"]) + 1
            shapes.append({"type": "line", "name": f"step-size:{i}:{k}", "xref": "x2",
                           "yref": "paper", "x0": x, "x1": x, "y0": llc_domain[0],
                           "y1": llc_domain[1], "line": {"color": "#888", "width": 1,
                                                         "dash": "dot"}})
            notes.append({"text": "ε ↓", "name": f"step-size:{i}:{k}", "xref": "x2",
                          "yref": "paper", "x": math.log10(x), "y": llc_domain[1],
                          "yanchor": "bottom", "showarrow": False,
                          "hovertext": plot_text(
                              f"step {c['step']}: step size lowered {c.get('from', 0):.3g} → "
                              f"{c.get('to', 0):.3g} ({c.get('reason', '')})"),
                          "font": {"size": 11, "color": "#666"}})
    return shapes, notes


def _line_mode(runs: Sequence[Run]) -> str:
    """Markers show where λ̂ was estimated, but thousands of SVG markers slow the page down:
    draw them only while all runs together have few rows."""
    return "lines+markers" if sum(len(r.llc) for r in runs) <= MAX_MARKERS else "lines"


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


def _empty_note(text: str, domain: list[float]) -> dict:
    return {"text": text, "xref": "paper", "yref": "paper", "x": 0.5,
            "y": (domain[0] + domain[1]) / 2, "showarrow": False,
            "font": {"size": 13, "color": "#888"}, "name": "empty"}


def _flag_points(runs: Sequence[Run], found: Sequence[Problem]) -> dict | None:
    """Red rings on the λ̂ curve at every step with a flagged diagnostic or warning."""
    by_point: dict[tuple[int, int], list[str]] = {}
    for p in found:
        by_point.setdefault((p.run, p.step), []).append(
            p.why if not p.first.value else f"{p.first.column} = {p.first.value}: {p.why}")
    values = [dict(zip(r.llc["step"].tolist(), r.llc["llc_mean"].tolist(), strict=True))
              for r in runs]
    xs, ys, texts, steps = [], [], [], []
    for (i, step), whys in sorted(by_point.items()):
        value = float(values[i].get(step, math.nan))
        if not math.isfinite(value):
            continue
        xs.append(step + 1)
        ys.append(value)
        steps.append([i, step])
        texts.append(f"step {step}<br>" + "<br>".join(plot_text(w) for w in whys[:6]))
    if not xs:
        return None
    return {"type": "scatter", "mode": "markers", "x": xs, "y": numbers(ys),
            "customdata": steps, "xaxis": "x2", "yaxis": "y2", "hovertext": texts,
            "hoverinfo": "text", "name": "diagnostic warning",
            "marker": {"symbol": "circle-open", "size": 12, "color": FLAG_COLOR,
                       "line": {"width": 2}},
            "meta": {"kind": "flag", "run": -1}}


def llc_axis_range(runs: Sequence[Run]) -> tuple[list[float], list[tuple[int, int, float]]] | None:
    """A λ̂ axis range that leaves out far negative outliers, and those outliers
    ``(run, step, λ̂)``; None when there are none (the axis then scales itself).

    A λ̂ of -250 at initialization (w* not a minimum yet) next to a curve between 5 and 10
    would flatten the curve on a linear axis. Only negative values are left out: λ̂ < 0 is
    already a failed estimate (flagged), while a large positive λ̂ may be a real jump. They must
    lie more than 3 interquartile ranges below the lower quartile (and there must be at least
    5 estimates to have quartiles).
    """
    points = [(i, int(s), float(v)) for i, r in enumerate(runs)
              for s, v in zip(r.llc["step"].tolist(),
                              np.asarray(r.llc["llc_mean"], dtype=np.float64).tolist(),
                              strict=True) if math.isfinite(v)]
    if len(points) < 5:
        return None
    values = np.array([v for _, _, v in points])
    q1, q3 = np.percentile(values, [25, 75])
    lo = min(0.0, q1 - 3 * (q3 - q1))
    outliers = [p for p in points if p[2] < lo]
    if not outliers:
        return None
    keep_lo, keep_hi = [], []
    for r in runs:
        llc = r.llc[["llc_mean", "llc_std"]].to_numpy(dtype=np.float64)
        mean = llc[:, 0]
        std = np.nan_to_num(llc[:, 1])
        inside = np.isfinite(mean) & (mean >= lo)
        keep_lo += (mean - std)[inside].tolist()
        keep_hi += (mean + std)[inside].tolist()
    y0, y1 = min(keep_lo), max(keep_hi)
    pad = 0.08 * (y1 - y0) if y1 > y0 else 1.0
    return [y0 - pad, y1 + pad], outliers


def _offscale_trace(outliers: list[tuple[int, int, float]], y_range: list[float],
                    names: Sequence[str]) -> dict:
    """Triangles at the bottom of the λ̂ axis where an outlier lies below it."""
    inset = 0.02 * (y_range[1] - y_range[0])
    return {
        "type": "scatter", "mode": "markers", "xaxis": "x2", "yaxis": "y2",
        "x": [s + 1 for _, s, _ in outliers],
        "y": [y_range[0] + inset] * len(outliers),
        "customdata": [[i, s] for i, s, _ in outliers],
        "hovertext": [plot_text(f"{names[i]} · step {s}: λ̂ = {v:.4g}, off the axis "
                                "(double-click the plot to show every point)")
                      for i, s, v in outliers],
        "hoverinfo": "text", "name": "λ̂ off the axis",
        "marker": {"symbol": "triangle-down", "size": 11, "color": FLAG_COLOR},
        "meta": {"kind": "llc-offscale", "run": -1},
    }


def loss_axis_ticks(values: Sequence[float]) -> dict:
    """Ticks of a log loss axis that never collide: 1, 2 and 5 of each decade over at most two
    decades, one label per decade up to eight, then every k-th decade."""
    decades = math.log10(max(values) / min(values))
    if decades <= 2:
        return {"dtick": "D2"}
    return {"dtick": max(1, math.ceil(decades / 8))}


# ----------------------------------------------------------------------------------------------
# Diagnostics over training
# ----------------------------------------------------------------------------------------------
def diagnostic_columns(runs: Sequence[Run]) -> list[str]:
    """Numeric λ̂-table columns worth a panel: those with a health rule, or that vary."""
    cols: list[str] = []
    for run in runs:
        for c in run.llc.columns:
            if c in ESTIMATE_COLUMNS or c in cols or not _is_numeric(run.llc[c]):
                continue
            values = run.llc[c].dropna()
            if rule_for(c) is not None or values.nunique() > 1:
                cols.append(c)
    return sorted(cols, key=lambda c: (_RULE_ORDER.get(column_key(c), len(_RULE_ORDER)), c))


def _diagnostic_traces(runs: Sequence[Run], names: Sequence[str], col: str, k: int,
                       flagged: set[tuple[int, int, str]]) -> list[dict]:
    """Panel ``k`` of the diagnostics: each run's ``col`` over ``step + 1``, then one trace of
    red crosses at its flagged values."""
    ax = "" if k == 0 else str(k + 1)
    traces: list[dict] = []
    bad_x, bad_y, bad_points = [], [], []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        if col not in run.llc.columns:
            continue
        rows = run.llc[["step", col]].dropna()
        color = run_color(i, len(runs))
        traces.append({
            "type": "scatter", "mode": _line_mode(runs),
            "x": step_x(rows["step"]), "y": numbers(rows[col]),
            "customdata": rows["step"].tolist(), "xaxis": f"x{ax}", "yaxis": f"y{ax}",
            "name": plot_text(name), "hovertemplate": HOVER,
            "line": {"color": color, "width": 1.5}, "marker": {"size": 4, "color": color},
            "meta": {"kind": "diagnostic", "run": i, "panel": k},
        })
        for step, value in zip(rows["step"].tolist(), rows[col].tolist(), strict=True):
            if (i, step, col) in flagged:
                bad_x.append(step + 1)
                bad_y.append(value)
                bad_points.append([i, step])
    if bad_x:
        traces.append({
            "type": "scatter", "mode": "markers", "x": bad_x, "y": numbers(bad_y),
            "customdata": bad_points, "xaxis": f"x{ax}", "yaxis": f"y{ax}",
            "hovertext": [plot_text(f"{names[i]} · step {s}: {col} = {v:.4g}")
                          for (i, s), v in zip(bad_points, bad_y, strict=True)],
            "name": "flagged", "hoverinfo": "text", "showlegend": False,
            "marker": {"symbol": "x", "size": 9, "color": FLAG_COLOR},
            "meta": {"kind": "diagnostic-flag", "run": -1, "panel": k},
        })
    return traces


def diagnostics_figure(runs: Sequence[Run], names: Sequence[str],
                       flags: Sequence[Flag] = ()) -> dict | None:
    """One small panel per diagnostic column over ``step + 1``, thresholds dotted, flags red."""
    cols = diagnostic_columns(runs)
    if not cols:
        return None
    xr = log_range(step_range(runs))
    panel_px, gap_px = 110, 34
    area = len(cols) * panel_px + (len(cols) - 1) * gap_px
    height = area + 36 + 48 + 16
    layout = _base_layout(height)
    layout["margin"] = {"l": 72, "r": 24, "t": 52, "b": 48}
    layout["showlegend"] = False  # runs' colours are keyed in the page header and main figure
    data: list[dict] = []
    shapes: list[dict] = []
    annotations: list[dict] = []
    flagged = {(f.run, f.step, f.column) for f in flags}
    for k, col in enumerate(cols):
        ax = "" if k == 0 else str(k + 1)
        top = 1 - k * (panel_px + gap_px) / area
        bottom = max(top - panel_px / area, 0.0)
        last = k == len(cols) - 1
        layout[f"xaxis{ax}"] = _step_axis(
            xr, anchor=f"y{ax}", showticklabels=last,
            **({"matches": "x"} if k else {}),
            **({"title": {"text": STEP_AXIS_TITLE}} if last else {}))
        layout[f"yaxis{ax}"] = _value_axis(domain=[bottom, top])
        caption = col + (f"   ({bound_text(col)})" if rules_for(col) else "")
        annotations.append({"text": plot_text(caption), "xref": "paper", "yref": "paper",
                            "x": 0, "y": top, "xanchor": "left", "yanchor": "bottom",
                            "showarrow": False, "font": {"size": 12, "color": "#333"}})
        bounds = sorted({b for r in rules_for(col) for b in (r.low, r.high) if b is not None})
        shapes += [{"type": "line", "name": f"threshold:{k}", "xref": f"x{ax} domain",
                    "x0": 0, "x1": 1, "yref": f"y{ax}", "y0": bound, "y1": bound,
                    "line": {"color": FLAG_COLOR, "width": 1, "dash": "dot"}}
                   for bound in bounds]
        data += _diagnostic_traces(runs, names, col, k, flagged)
    layout["shapes"] = shapes
    layout["annotations"] = annotations
    return {"data": data, "layout": layout}
