"""The dashboard page: a JSON page model built from runs, and the HTML that draws it.

The page model holds everything the browser shows (figures, tables, loss traces) so the
browser-side script only lays it out. Strings from runs reach the page in two ways, both
inert: inside figures they are escaped for Plotly (:func:`figures.plot_text`); in tables they
stay raw and the script writes them with ``textContent``. The model itself is embedded as JSON
in a ``<script type="application/json">`` block with ``<``, ``>`` and ``&`` written as
``\\u003c``-style escapes, so a run named ``</script>`` cannot close the block.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from devinterp.dashboard import assets
from devinterp.dashboard.components import components_figure
from devinterp.dashboard.figures import (
    ESTIMATE_COLUMNS,
    HEALTH_RULES,
    NOT_FINITE_WHY,
    Flag,
    Problem,
    bound_text,
    column_key,
    diagnostics_figure,
    health_flags,
    llc_figure,
    numbers,
    problems,
    rule_for,
    run_color,
    warning_rule,
)
from devinterp.dashboard.influence import influence_panel, susceptibility_panel
from devinterp.run.store import Run, load_run

#: Loss-trace values embedded in a written HTML file (chains × draws summed over checkpoints).
DEFAULT_MAX_TRACE_VALUES = 200_000
#: Largest trace served for one checkpoint by the server (thinned along draws beyond it).
MAX_SERVED_TRACE_VALUES = 400_000
MAX_FLAG_ROWS = 500
CSP = ("default-src 'none'; script-src 'unsafe-inline' 'self'; style-src 'unsafe-inline'; "
        "img-src data: blob: 'self'; connect-src 'self'; font-src data:")


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------
def load_runs(run_dirs: Sequence[str | os.PathLike]) -> list[Run]:
    """Load run directories, refusing directories that hold no run or nothing to draw."""
    if not run_dirs:
        raise ValueError("no run directory given; pass one or more run directories")
    runs = []
    for d in run_dirs:
        if Path(d).is_file():
            raise ValueError(f"{str(d)!r} is a file; pass the run directory that holds it")
        run = load_run(d)
        if not (len(run.llc) or len(run.metrics) or run.settings or run.meta or run.stages
                or run.snapshots):
            raise ValueError(
                f"{str(d)!r} holds no run (no llc.csv, metrics.csv, run.json or snapshots); "
                "pass a directory written by LLCCallback or `devinterp run`, or serve a folder "
                "of runs with `devinterp dashboard ROOT --serve`")
        runs.append(run)
    if not any(len(r.llc) or len(r.metrics) for r in runs):
        raise ValueError(
            f"nothing to draw yet in {', '.join(repr(str(d)) for d in run_dirs)}: no λ̂ rows "
            "(llc.csv) and no logged metrics (metrics.csv); estimate λ̂ first (`devinterp "
            "estimate RUN_DIR`) or watch a training run live with `devinterp dashboard ROOT "
            "--serve`")
    return runs


def run_names(runs: Sequence[Run]) -> list[str]:
    """Display names; runs sharing a name are told apart by their path below a common folder."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    paths = [r.path.resolve() for r in runs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    out = []
    for name, path in zip(names, paths, strict=True):
        if names.count(name) > 1:
            rel = path.relative_to(common).as_posix() if path != common else path.name
            name = f"{name} ({rel})" if rel not in (name, ".") else name
        out.append(name)
    seen: dict[str, int] = {}
    for k, name in enumerate(out):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            out[k] = f"{name} #{seen[name]}"
    return out


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A table cell: numbers to 6 significant digits, containers as compact JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "—"
        return f"{v:.6g}"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False, separators=(", ", ": "))
    return str(value)


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``model.init_args.width``)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def key_value_table(docs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict:
    """Rows ``[key, value per run]`` over the union of keys; ``differs`` marks disagreements."""
    flat = [flatten(d) for d in docs]
    keys: list[str] = []
    seen: set[str] = set()
    for f in flat:
        for k in f:
            if k not in seen:
                seen.add(k)
                keys.append(k)
    rows, differs = [], []
    for k in keys:
        cells = [format_value(f[k]) if k in f else "—" for f in flat]
        rows.append([k, *cells])
        differs.append(len(set(cells)) > 1)
    return {"columns": ["setting", *names], "rows": rows, "differs": differs}


def used_value(llc: Any, key: str) -> str:
    """What the estimator used for a setting left to it (``None`` in settings.json), read
    from the λ̂ table's column of that name: ``auto: 0.0066`` or ``auto: 0.0061–0.0074
    (median 0.0072 over 29 estimates)``; ``default`` when the table does not record it."""
    if key not in llc.columns:
        return "default"
    values = llc[key].dropna()
    if not len(values):
        return "default"
    numeric = np.asarray(pd.to_numeric(values, errors="coerce"), dtype=np.float64)
    if np.isfinite(numeric).all():
        lo, hi = float(numeric.min()), float(numeric.max())
        if lo == hi:
            return f"auto: {format_value(lo)}"
        return (f"auto: {format_value(lo)}–{format_value(hi)} (median "
                f"{format_value(float(np.median(numeric)))} over {len(numeric)} estimates)")
    distinct = list(dict.fromkeys(str(v) for v in values))
    return "auto: " + ", ".join(distinct[:5]) + (", …" if len(distinct) > 5 else "")


def settings_table(runs: Sequence[Run], names: Sequence[str]) -> dict:
    """The sampler settings of each run, with the values used for those left automatic."""
    docs = []
    for run in runs:
        doc = flatten(run.settings)
        docs.append({k: (used_value(run.llc, k) if v is None else v) for k, v in doc.items()})
    return key_value_table(docs, names)


# ----------------------------------------------------------------------------------------------
# Page sections
# ----------------------------------------------------------------------------------------------
def stage_table(runs: Sequence[Run], names: Sequence[str]) -> dict:
    """One row per stage: run (when several), number, type, steps, Δλ̂, Δloss."""
    multi = len(runs) > 1
    columns = (["run"] if multi else []) + ["#", "type", "start step", "end step", "Δλ̂",
                                            "Δloss"]
    rows = []
    for run, name in zip(runs, names, strict=True):
        for k, stage in enumerate(run.stages):
            if not isinstance(stage, Mapping):
                continue
            cells = [str(k + 1), format_value(stage.get("type")),
                     format_value(stage.get("start_step")), format_value(stage.get("end_step")),
                     _signed(stage.get("llc_change")), _signed(stage.get("loss_change"))]
            rows.append(([name] if multi else []) + cells)
    return {"columns": columns, "rows": rows, "type_column": columns.index("type")}


def _signed(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:+.4g}"
    return format_value(value)


def _flag_label(flag: Flag) -> str:
    if column_key(flag.column) == "warnings":
        rule = warning_rule(flag.why)
        return rule.label if rule else "estimator warning"
    if flag.column == "status":
        return "estimate failed"
    if flag.why == NOT_FINITE_WHY:
        return "λ̂ not finite"
    rule = rule_for(flag.column)
    return rule.label if rule else flag.column


def flag_summary(found: Sequence[Problem], names: Sequence[str]) -> list[dict]:
    """Problems grouped by kind, with the runs and steps that have it, for the page's banner."""
    groups: dict[str, list[Problem]] = {}
    for p in found:
        groups.setdefault(_flag_label(p.first), []).append(p)
    order = {label: k for k, label in enumerate(dict.fromkeys(r.label for r in HEALTH_RULES))}
    out = []
    for label, items in sorted(groups.items(), key=lambda kv: order.get(kv[0], -1)):
        steps_of: dict[int, set[int]] = {}
        for p in items:
            steps_of.setdefault(p.run, set()).add(p.step)
        runs = []
        for run in sorted(steps_of):
            steps = sorted(steps_of[run])
            runs.append({"run": run, "name": names[run], "count": len(steps),
                         "steps": steps[:6]})
        whys = list(dict.fromkeys(p.first.why for p in items))
        why = whys[0] + (f" (and {len(whys) - 1} other messages)" if len(whys) > 1 else "")
        out.append({"what": label, "why": why, "runs": runs,
                    "count": sum(r["count"] for r in runs)})
    return out


def llc_table(runs: Sequence[Run], names: Sequence[str], flags: Sequence[Flag]) -> dict:
    """Every λ̂ row as text cells, with the flagged cells listed as ``[row, column]``."""
    multi = len(runs) > 1
    columns: list[str] = []
    for run in runs:
        columns += [c for c in run.llc.columns if c not in columns]
    first = [c for c in ESTIMATE_COLUMNS if c in columns]
    columns = first + [c for c in columns if c not in first]
    flagged_at = {(f.run, f.step, f.column) for f in flags}
    rows, flagged = [], []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        for record in run.llc.to_dict("records"):
            r = len(rows)
            step = int(record["step"])
            rows.append(([name] if multi else []) + [format_value(record.get(c)) for c in columns])
            for k, c in enumerate(columns):
                if (i, step, c) in flagged_at:
                    flagged.append([r, k + int(multi)])
    header = (["run"] if multi else []) + columns
    hints = [bound_text(c) for c in columns]
    return {"columns": header, "hints": ([""] if multi else []) + hints, "rows": rows,
            "flagged": flagged}


def estimates_by_step(run: Run) -> dict[int, tuple[float, float, float]]:
    """``step -> (λ̂, std, L(w*))`` of a run's λ̂ table (NaN where a value is missing)."""
    llc = run.llc
    init = [c for c in llc.columns if column_key(c) == "init_loss"]
    base = llc[init[0]] if init else np.full(len(llc), np.nan)
    return {int(s): (float(m), float(d), float(b)) for s, m, d, b in zip(
        llc["step"].tolist(), np.asarray(llc["llc_mean"], dtype=np.float64).tolist(),
        np.asarray(llc["llc_std"], dtype=np.float64).tolist(),
        np.asarray(base, dtype=np.float64).tolist(), strict=True)}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def trace_payload(run: Run, step: int, max_values: int = MAX_SERVED_TRACE_VALUES,
                  estimates: Mapping[int, tuple[float, float, float]] | None = None
                  ) -> dict | None:
    """The loss trace of ``step`` (chain × draw) for the page, thinned along draws if huge.

    ``estimates`` (from :func:`estimates_by_step`) saves a table lookup per checkpoint.
    """
    trace = run.trace(step)
    if trace is None:
        return None
    trace = np.asarray(trace, dtype=np.float64)
    if trace.ndim != 2:
        trace = trace.reshape(1, -1)
    stride = max(1, math.ceil(trace.size / max(max_values, 1)))
    if estimates is None:
        estimates = estimates_by_step(run)
    llc, std, baseline = estimates.get(int(step), (math.nan, math.nan, math.nan))
    thinned = trace[:, ::stride]
    values = numbers(thinned, 5)
    width = thinned.shape[1]
    return {"chains": [values[c * width:(c + 1) * width] for c in range(thinned.shape[0])],
            "stride": stride, "draws": int(trace.shape[1]),
            "baseline": _finite_or_none(baseline), "llc": _finite_or_none(llc),
            "llc_std": _finite_or_none(std)}


def _spread_pick(candidates: list[int], count: int, first: Sequence[int]) -> list[int]:
    """``count`` steps: ``first`` (flagged ones), then evenly spread in log-step."""
    available = set(candidates)
    picked = [s for s in first if s in available][: max(count // 2, 0)]
    taken = set(picked)
    rest = [s for s in candidates if s not in taken]
    need = count - len(picked)
    if need > 0 and rest:
        logs = np.log10(np.asarray(rest, dtype=np.float64) + 1)
        targets = np.linspace(logs[0], logs[-1], need)
        idx = sorted({int(np.argmin(np.abs(logs - t))) for t in targets})
        extra = [rest[k] for k in idx]
        chosen = set(extra)
        for step in rest:
            if len(extra) >= need:
                break
            if step not in chosen:
                chosen.add(step)
                extra.append(step)
        picked += extra
    return sorted(set(picked))


def embedded_traces(runs: Sequence[Run], refs: Sequence[str], trace_steps: Sequence[list[int]],
                    flags: Sequence[Flag], max_values: int) -> tuple[dict, list[str]]:
    """Loss traces to embed in a file, within ``max_values`` values; and notes on what was cut."""
    out: dict[str, dict[str, dict]] = {}
    notes: list[str] = []
    with_traces = [i for i, steps in enumerate(trace_steps) if steps]
    if not with_traces or max_values <= 0:
        if with_traces:
            notes.append("loss traces are not embedded (--max-trace-values 0)")
        return out, notes
    per_run = max_values // len(with_traces)
    flagged_by_run: dict[int, set[int]] = {}
    for f in flags:
        flagged_by_run.setdefault(f.run, set()).add(f.step)
    kept = total = 0
    for i in with_traces:
        steps = trace_steps[i]
        estimates = estimates_by_step(runs[i])
        probe = trace_payload(runs[i], steps[-1], max(per_run // 2, 1), estimates)
        size = sum(len(c) for c in probe["chains"]) if probe else 1
        count = max(1, min(len(steps), per_run // max(size, 1)))
        flagged = sorted(flagged_by_run.get(i, ()))
        chosen = steps if count >= len(steps) else _spread_pick(steps, count, flagged)
        out[refs[i]] = {}
        for step in chosen:
            payload = probe if step == steps[-1] else trace_payload(
                runs[i], step, max(per_run // 2, 1), estimates)
            if payload is not None:
                out[refs[i]][str(step)] = payload
        kept += len(out[refs[i]])
        total += len(steps)
    if kept < total:
        notes.append(f"Loss traces are embedded for {kept} of {total} checkpoints (flagged ones "
                     "first, the rest spread over training) to keep this file small; serve the "
                     "runs (--serve) or raise --max-trace-values to see them all.")
    return out, notes


def build_page(runs: Sequence[Run], *, refs: Sequence[str] | None = None,
               embed_traces: bool = True,
               max_trace_values: int = DEFAULT_MAX_TRACE_VALUES) -> dict:
    """The page model of one run or a comparison of runs (JSON-able)."""
    names = run_names(runs)
    refs = list(refs) if refs is not None else [str(i) for i in range(len(runs))]
    flags = [f for i, run in enumerate(runs) for f in health_flags(run.llc, i)]
    trace_steps = [run.trace_steps for run in runs]
    notes: list[str] = []
    traces: dict = {}
    if embed_traces:
        traces, notes = embedded_traces(runs, refs, trace_steps, flags, max_trace_values)
        trace_steps = [[int(s) for s in traces.get(ref, {})] for ref in refs]
    for run, name in zip(runs, names, strict=True):
        bad = [k + 1 for k, s in enumerate(run.stages)
               if not (isinstance(s, Mapping) and "start_step" in s and "end_step" in s)]
        if bad:
            notes.append(f"{name}: stage(s) {bad} lack start_step/end_step and are not drawn")
    found = problems(flags)
    flag_rows = [{"run": p.run, "step": p.step, "what": _flag_label(p.first),
                  "column": p.first.column, "value": p.first.value, "why": p.why}
                 for p in found[:MAX_FLAG_ROWS]]
    flagged_steps: dict[int, set[int]] = {}
    for f in flags:
        flagged_steps.setdefault(f.run, set()).add(f.step)
    return {
        "title": names[0] if len(runs) == 1 else f"Comparison of {len(runs)} runs",
        "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "runs": [{
            "name": names[i], "path": str(run.path), "ref": refs[i],
            "color": run_color(i, len(runs)), "points": int(len(run.llc)),
            "last_step": int(run.llc["step"].max()) if len(run.llc) else None,
            "stages": len(run.stages), "trace_steps": trace_steps[i],
            "flagged_steps": sorted(flagged_steps.get(i, ())),
        } for i, run in enumerate(runs)],
        "main": llc_figure(runs, names, flags, found),
        "diagnostics": {
            "figure": diagnostics_figure(runs, names, flags),
            "summary": flag_summary(found, names),
            "flags": flag_rows,
            "more_flags": max(len(found) - MAX_FLAG_ROWS, 0),
            "table": llc_table(runs, names, flags),
        },
        "stages": stage_table(runs, names),
        "components": components_figure(runs, names),
        "influence": influence_panel(runs, names),
        "susceptibilities": susceptibility_panel(runs, names),
        "settings": settings_table(runs, names),
        "config": key_value_table([r.meta for r in runs], names),
        "traces": traces,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------
def script_json(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``<``, ``>`` or ``&`` characters)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def fill(template: str, **values: str) -> str:
    """Replace ``%NAME%`` placeholders in one pass, so inserted text is never scanned again
    (a run named ``%SCRIPT%`` must stay a name)."""
    return re.sub(r"%([A-Z]+)%", lambda m: values.get(m.group(1), m.group(0)), template)


def plotly_js() -> str:
    """plotly.js, basic bundle, shipped with this package (no page ever needs a CDN).

    The dashboard draws only scatter traces and shapes, so the 1.2 MB basic bundle replaces
    the 4.8 MB full one: a page parses in a quarter of the time.
    """
    js = (Path(__file__).parent / "vendor" / "plotly-basic.min.js").read_text(encoding="utf-8")
    # Inline scripts end at the first "</script"; the bundle has none today, but be sure.
    return js.replace("</script", "<\\/script")


def render_html(page: Mapping[str, Any], *, plotly_src: str | None = None,
                live: Mapping[str, Any] | None = None) -> str:
    """The dashboard HTML for a page model.

    Args:
        page: from :func:`build_page`.
        plotly_src: URL of plotly.js (served mode); None embeds it, making the file
            self-contained.
        live: served mode: ``{"page_url", "trace_url", "poll_ms", "index_url"}``.
    """
    config = {"live": bool(live), **(dict(live) if live else {})}
    if plotly_src is None:
        plotly_tag = f"<script>{plotly_js()}</script>"
    else:
        plotly_tag = f'<script src="{html.escape(plotly_src)}"></script>'
    return fill(assets.PAGE_TEMPLATE, CSP=CSP, TITLE=html.escape(str(page["title"])),
                STYLE=assets.STYLE, CONFIG=script_json(config), DATA=script_json(page),
                PLOTLY=plotly_tag, SCRIPT=assets.SCRIPT)


def build_html(run_dirs: Sequence[str | os.PathLike], *,
               max_trace_values: int = DEFAULT_MAX_TRACE_VALUES) -> str:
    """A self-contained dashboard (one HTML file, no network) of one run or a comparison.

    Args:
        run_dirs: run directories (written by ``LLCCallback`` or ``devinterp run``).
        max_trace_values: loss-trace values (chains × draws over checkpoints) to embed; the
            flagged checkpoints come first, the rest are spread evenly in log-step.
    """
    runs = load_runs(run_dirs)
    return render_html(build_page(runs, max_trace_values=max_trace_values))
