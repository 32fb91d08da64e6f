"""Dashboard without a browser: figure builder, health flags, escaping, CLI, server, W&B."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from served import running_server

from devinterp import cli
from devinterp.cli import UsageError
from devinterp.cli.dashboard import main
from devinterp.dashboard import DashboardServer, build_html, build_page
from devinterp.dashboard.figures import (
    HEALTH_RULES,
    diagnostics_figure,
    health_flags,
    llc_figure,
    parse_warnings,
    plot_text,
    stage_label,
)
from devinterp.dashboard.page import load_runs, run_names, trace_payload
from devinterp.run.store import SETTINGS_FILE, STAGES_FILE, RunStore, load_run
from devinterp.run.wandb import attach_dashboard as log_to_wandb

STEPS = [0, 10, 100, 1000, 10000]
STAGES = [
    {"start_step": 0, "end_step": 100, "type": "A", "llc_change": 5.0, "loss_change": -1.0},
    {"start_step": 100, "end_step": 1000, "type": "B", "llc_change": -1.0, "loss_change": -0.1},
    {"start_step": 1000, "end_step": 10000, "type": "A", "llc_change": 3.0, "loss_change": -0.2},
]
#: (step, column) of every value the fixture plants outside its health rule.
PLANTED_FLAGS = {(100, "num_diverged"), (1000, "rhat"), (1000, "warnings")}
MALICIOUS = "<script>alert(1)</script>"
#: The estimator's R-hat warning for R-hat 1.5, in its own words (devinterp.health).
RHAT_WARNING = next(r for r in HEALTH_RULES if r.column == "rhat").template.format(value=1.5)


def write_run(path: Path, *, name: str | None = None, steps: list[int] = STEPS,
              stages: list[dict] = STAGES, traces: bool = True, chains: int = 4,
              draws: int = 50, settings: dict | None = None, seed: int = 0) -> Path:
    """A small run directory with planted stages, diagnostics and (chain, draw) loss traces."""
    rng = np.random.default_rng(seed)
    store = RunStore(path, create=True)
    for k, step in enumerate(steps):
        store.write_llc_row({
            "step": step, "llc_mean": 1.0 + k, "llc_std": 0.1 * (k + 1),
            "init_loss": 2.0 / (k + 1),
            "rhat": 1.5 if step == 1000 else 1.01, "ess": 300.0,
            "mala_acceptance": 0.9, "num_diverged": 1 if step == 100 else 0,
            "frac_below_baseline": 0.02,
            # As the run store holds them (devinterp.tracking.result_row): joined by " | ".
            "warnings": RHAT_WARNING if step == 1000 else "",
        })
        if traces:
            store.save_trace(step, 2.0 / (k + 1) + rng.normal(0, 0.01, (chains, draws)))
    store.write_metrics([{"step": s, "train_loss": 3.0 / (1 + s), "val_loss": 3.5 / (1 + s)}
                         for s in steps])
    store.write_json(STAGES_FILE, {"method": "x", "params": {}, "stages": stages})
    store.write_json(SETTINGS_FILE, settings or {"nbeta": 60.0, "step_size": 0.001,
                                                 "num_chains": chains, "num_draws": draws})
    if name is not None:
        store.write_json("run.json", {"name": name})
    return path


def kinds(fig: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for trace in fig["data"]:
        kind = trace["meta"]["kind"]
        out[kind] = out.get(kind, 0) + 1
    return out


def stage_shapes(fig: dict) -> list[dict]:
    return [s for s in fig["layout"]["shapes"] if s["name"].startswith("stage:")]


def embedded(html_text: str, element_id: str) -> object:
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>',
                  html_text, re.S)
    assert m, element_id
    return json.loads(m.group(1))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def test_single_run_figure_has_loss_llc_band_flags_and_stage_bands(run_dir: Path) -> None:
    run = load_run(run_dir)
    fig = llc_figure([run], ["run"], health_flags(run.llc))
    assert kinds(fig) == {"loss": 2, "llc-band": 1, "llc": 1, "flag": 1}
    llc = next(t for t in fig["data"] if t["meta"]["kind"] == "llc")
    assert llc["y"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    band = next(t for t in fig["data"] if t["meta"]["kind"] == "llc-band")
    assert band["y"][0] == pytest.approx(1.1) and band["y"][-1] == pytest.approx(0.9)
    flags = next(t for t in fig["data"] if t["meta"]["kind"] == "flag")
    assert flags["customdata"] == [[0, 100], [0, 1000]]
    shapes = stage_shapes(fig)
    assert [s["label"]["text"] for s in shapes] == ["A  Δλ̂ +5", "B  Δλ̂ -1", "A  Δλ̂ +3"]
    assert all(s["yref"] == "paper" for s in shapes)


def test_step_zero_is_drawn_at_one_on_the_log_axis(run_dir: Path) -> None:
    run = load_run(run_dir)
    fig = llc_figure([run], ["run"])
    llc = next(t for t in fig["data"] if t["meta"]["kind"] == "llc")
    assert llc["x"] == [1, 11, 101, 1001, 10001]
    assert llc["customdata"] == STEPS  # hover shows the true step
    first = stage_shapes(fig)[0]
    assert (first["x0"], first["x1"]) == (1, 101)
    for axis in ("xaxis", "xaxis2"):
        lo, hi = fig["layout"][axis]["range"]
        assert fig["layout"][axis]["type"] == "log"
        assert -0.5 < lo <= 0.0 and math.log10(10001) <= hi < math.log10(10001) + 0.5


def test_stage_bands_are_clipped_to_the_data_and_malformed_stages_skipped(tmp_path: Path) -> None:
    stages = [{"start_step": 0, "end_step": 10**9, "type": "A", "llc_change": 1.0},
              {"start_step": 10**8, "end_step": 10**9, "type": "B"},  # entirely after the data
              {"type": "A"}]  # no steps
    run = load_run(write_run(tmp_path / "r", stages=stages))
    fig = llc_figure([run], ["r"])
    shapes = stage_shapes(fig)
    assert [(s["x0"], s["x1"]) for s in shapes] == [(1, 10001)]
    page = build_page([run])
    assert any("[3]" in note and "not drawn" in note for note in page["notes"])


def test_comparison_overlays_runs_and_draws_a_stage_lane_per_run(tmp_path: Path) -> None:
    dirs = [write_run(tmp_path / f"seed{k}", name=f"seed {k}", seed=k,
                      steps=STEPS[: 3 + k]) for k in range(3)]
    runs = [load_run(d) for d in dirs]
    fig = llc_figure(runs, [r.name for r in runs])
    assert kinds(fig)["llc"] == 3 and kinds(fig)["loss"] == 6
    assert kinds(fig)["stage-hover"] == 3
    lanes = stage_shapes(fig)
    # Each run's stages, clipped to the common step range (steps up to 10000).
    assert len(lanes) == 9 and {s["yref"] for s in lanes} == {"y3"}
    assert sorted({s["y0"] + 0.38 for s in lanes}) == pytest.approx([0, 1, 2])
    assert fig["layout"]["yaxis3"]["ticktext"] == ["seed 0", "seed 1", "seed 2"]
    assert fig["layout"]["xaxis3"]["matches"] == "x"
    colors = {t["line"]["color"] for t in fig["data"] if t["meta"]["kind"] == "llc"}
    assert len(colors) == 3


def test_loss_axis_turns_logarithmic_when_loss_spans_decades(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "r"))  # train_loss from 3 down to 3e-4
    assert llc_figure([run], ["r"])["layout"]["yaxis"]["type"] == "log"
    store = RunStore(tmp_path / "flat", create=True)
    store.write_metrics([{"step": s, "train_loss": 1.0 + 0.1 * k} for k, s in enumerate(STEPS)])
    assert llc_figure([load_run(store.path)], ["f"])["layout"]["yaxis"]["type"] == "linear"


def test_run_with_metrics_only_says_no_llc_yet(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r", create=True)
    store.write_metrics([{"step": 0, "train_loss": 1.0}, {"step": 5, "train_loss": 0.5}])
    fig = llc_figure([load_run(store.path)], ["r"])
    assert kinds(fig) == {"loss": 1, "llc": 1}
    assert any("no λ̂ estimated yet" in a["text"] for a in fig["layout"]["annotations"])
    assert diagnostics_figure([load_run(store.path)], ["r"]) is None


def test_diagnostics_figure_has_a_panel_per_rule_column_with_threshold_and_flags(
        run_dir: Path) -> None:
    run = load_run(run_dir)
    fig = diagnostics_figure([run], ["run"], health_flags(run.llc))
    panels = [t for t in fig["data"] if t["meta"]["kind"] == "diagnostic"]
    captions = [a["text"].split()[0] for a in fig["layout"]["annotations"]]
    # Rule columns in rule order, then columns that vary (init_loss); constant ess stays.
    assert captions == ["num_diverged", "rhat", "mala_acceptance", "ess",
                        "frac_below_baseline", "init_loss"]
    assert len(panels) == 6
    bad = [t for t in fig["data"] if t["meta"]["kind"] == "diagnostic-flag"]
    assert sorted(p for t in bad for p in t["customdata"]) == [[0, 100], [0, 1000]]
    rhat_panel = captions.index("rhat")
    lines = [s for s in fig["layout"]["shapes"] if s["name"] == f"threshold:{rhat_panel}"]
    assert [s["y0"] for s in lines] == [1.1]


# ----------------------------------------------------------------------------------------------
# Health flags
# ----------------------------------------------------------------------------------------------
def test_health_flags_find_exactly_the_planted_problems(run_dir: Path) -> None:
    flags = health_flags(load_run(run_dir).llc)
    assert {(f.step, f.column) for f in flags} == PLANTED_FLAGS
    warning = next(f for f in flags if f.column == "warnings")
    assert warning.why == RHAT_WARNING


@pytest.mark.parametrize(("column", "value", "flagged"), [
    ("rhat", 1.1, False), ("rhat", 1.11, True), ("rhat", float("inf"), True),
    ("rhat", float("nan"), False), ("mala_acceptance", 0.9, False),
    ("mala_acceptance", 0.89, True), ("mala_acceptance", 0.49, True), ("num_diverged", 0, False),
    ("num_diverged", 2, True), ("ess", 9.0, True), ("ess", 10.0, False),
    # Draws below w* matter when λ̂ < 0 (this row's λ̂ is 1.0): see the tests below.
    ("frac_below_baseline", 0.31, False), ("drift", -4.5, True), ("drift", 4.5, True),
    ("llc_mean", -0.2, True), ("llc_mean", float("nan"), True), ("llc/rhat", 2.0, True),
])
def test_health_rule_boundaries(tmp_path: Path, column: str, value: float,
                                flagged: bool) -> None:
    store = RunStore(tmp_path / "r", create=True)
    row = {"step": 7, "llc_mean": 1.0, "llc_std": 0.1}
    row[column] = value
    store.write_llc_row(row)
    flags = health_flags(load_run(store.path).llc)
    assert bool(flags) == flagged
    if flagged:
        assert flags[0].column == column and flags[0].step == 7


def test_ess_is_judged_per_chain_that_did_not_diverge() -> None:
    """λ̂'s error bar needs ~10 effective draws per chain: 4 chains need 40 in all, and a
    diverged chain does not count."""
    from devinterp.health import rule_for

    rule = rule_for("ess")
    assert rule.flagged(39.0, {"num_chains": 4}) and not rule.flagged(40.0, {"num_chains": 4})
    assert not rule.flagged(30.0, {"num_chains": 4, "num_diverged": 1})
    assert rule.flagged(float("nan"), {}) is False


def test_rows_written_by_the_estimator_pipeline(tmp_path: Path) -> None:
    """Rows as ``devinterp.tracking.record_result`` writes them: warnings joined by " | ", and a
    failed step with status and reason (its NaN λ̂ is one flag, not two)."""
    from devinterp.llc import LLCResult
    from devinterp.tracking import record_result

    store = RunStore(tmp_path / "r", create=True)
    trace = np.full((2, 5), 0.5)
    result = LLCResult(
        llc_mean=3.0, llc_std=0.2, llc_per_chain=np.array([2.9, 3.1]), loss_trace=trace,
        init_loss=0.4, diagnostics={"rhat": 1.3, "ess": 250.0, "mala_acceptance": 0.9,
                                    "num_diverged": 0, "frac_below_baseline": 0.0},
        settings={"nbeta": 60.0, "num_chains": 2, "num_draws": 5},
        warnings=["split R-hat is 1.30 (> 1.1): chains disagree", "the λ̂ trace still drifts"])
    record_result(store, 10, result)
    record_result(store, 20, "all 2 SGLD chains diverged")
    run = load_run(store.path)
    flags = {(f.step, f.column, f.why) for f in health_flags(run.llc)}
    assert flags == {
        (10, "rhat", next(r.why for r in HEALTH_RULES if r.column == "rhat")),
        (10, "warnings", "split R-hat is 1.30 (> 1.1): chains disagree"),
        (10, "warnings", "the λ̂ trace still drifts"),
        (20, "status", "no estimate: all 2 SGLD chains diverged"),
    }
    page = build_page([run])
    assert {s["what"] for s in page["diagnostics"]["summary"]} == {
        "estimate failed", "R-hat", "estimator warning"}
    assert [s["name"] for s in page["main"]["layout"]["shapes"]] == ["missing:0:20"]
    assert trace_payload(run, 10)["chains"] == [[0.5] * 5] * 2
    assert page["runs"][0]["trace_steps"] == [10]


def test_every_rule_explains_itself() -> None:
    from devinterp.dashboard.figures import bound_text

    for rule in HEALTH_RULES:
        assert rule.why and rule.label and bound_text(rule.column).startswith("flagged if")
    assert bound_text("mala_acceptance") == "flagged if < 0.9"
    assert bound_text("frac_below_baseline") == "flagged if > 0.3 (when llc_mean < 0)"
    assert bound_text("llc/drift") == "flagged if < -4 or > 4"
    assert bound_text("init_loss") == ""


@pytest.mark.parametrize(("cell", "expected"), [
    ("[]", []), (float("nan"), []), (None, []), ("", []), ("a: x | b", ["a: x", "b"]),
    ('["a", "b"]', ["a", "b"]), ("['it''s', 'b']", ["its", "b"]),
    ("['R-hat is 1.5']", ["R-hat is 1.5"]), ("plain text", ["plain text"]),
    ("[not a list", ["[not a list"]),
])
def test_parse_warnings(cell: object, expected: list[str]) -> None:
    assert parse_warnings(cell) == expected


# ----------------------------------------------------------------------------------------------
# Page model and HTML
# ----------------------------------------------------------------------------------------------
def test_page_model_tables(run_dir: Path) -> None:
    page = build_page([load_run(run_dir)])
    assert page["stages"]["rows"][1] == ["2", "B", "100", "1000", "-1", "-0.1"]
    settings = dict(page["settings"]["rows"])
    assert settings["nbeta"] == "60" and settings["num_chains"] == "4"
    table = page["diagnostics"]["table"]
    assert table["columns"][:3] == ["step", "llc_mean", "llc_std"]
    flagged = {(table["rows"][r][0], table["columns"][c]) for r, c in table["flagged"]}
    assert flagged == {(str(s), c) for s, c in PLANTED_FLAGS}
    summary = {(s["what"], tuple(s["runs"][0]["steps"]))
               for s in page["diagnostics"]["summary"]}
    # The estimator's R-hat warning and the R-hat rule's flag at step 1000 are one problem.
    assert summary == {("diverged chains", (100,)), ("R-hat", (1000,))}
    rows = [(f["step"], f["what"], f["why"]) for f in page["diagnostics"]["flags"]]
    assert rows == [(100, "diverged chains", next(r.why for r in HEALTH_RULES
                                                  if r.column == "num_diverged")),
                    (1000, "R-hat", RHAT_WARNING)]
    assert page["runs"][0]["trace_steps"] == STEPS
    assert page["runs"][0]["flagged_steps"] == [100, 1000]


def test_comparison_tables_mark_settings_that_differ(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", settings={"nbeta": 60.0, "seed": 0, "opt": {"lr": 0.1}})
    b = write_run(tmp_path / "b", settings={"nbeta": 60.0, "seed": 1, "opt": {"lr": 0.1}})
    page = build_page(load_runs([a, b]))
    t = page["settings"]
    assert t["columns"] == ["setting", "a", "b"]
    assert dict(zip([r[0] for r in t["rows"]], t["differs"], strict=True)) == {
        "nbeta": False, "seed": True, "opt.lr": False}
    assert page["stages"]["columns"][0] == "run" and len(page["stages"]["rows"]) == 6
    rhat = next(s for s in page["diagnostics"]["summary"] if s["what"] == "R-hat")
    assert rhat["count"] == 2 and [r["name"] for r in rhat["runs"]] == ["a", "b"]


def test_runs_with_one_name_get_told_apart(tmp_path: Path) -> None:
    dirs = [write_run(tmp_path / f"seed{k}" / "run", traces=False) for k in range(2)]
    names = run_names(load_runs(dirs))
    assert names == ["run (seed0/run)", "run (seed1/run)"]


def test_traces_embedded_within_budget_flagged_first(tmp_path: Path) -> None:
    steps = [0, *range(10, 400, 10)]
    run = load_run(write_run(tmp_path / "r", steps=steps, chains=2, draws=10))
    full = build_page([run], max_trace_values=10**6)
    assert sorted(int(s) for s in full["traces"]["0"]) == steps and not full["notes"]
    small = build_page([run], max_trace_values=100)  # room for 5 traces of 2 × 10
    chosen = sorted(int(s) for s in small["traces"]["0"])
    assert len(chosen) == 5 and small["runs"][0]["trace_steps"] == chosen
    assert 100 in chosen  # the flagged (diverged) step comes first
    assert any("for 5 of 40 checkpoints" in n for n in small["notes"])
    none = build_page([run], max_trace_values=0)
    assert none["traces"] == {} and none["runs"][0]["trace_steps"] == []


def test_trace_payload_matches_the_saved_trace_and_thins_draws(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "r", chains=3, draws=40))
    saved = run.trace(100)
    payload = trace_payload(run, 100)
    assert np.allclose(payload["chains"], saved, rtol=1e-4)
    assert payload["baseline"] == pytest.approx(2.0 / 3) and payload["llc"] == 3.0
    thin = trace_payload(run, 100, max_values=30)
    assert thin["stride"] == 4 and len(thin["chains"][0]) == 10 and thin["draws"] == 40
    assert np.allclose(thin["chains"], saved[:, ::4], rtol=1e-4)
    assert trace_payload(run, 12345) is None


def test_html_is_self_contained(run_dir: Path) -> None:
    text = build_html([run_dir])
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    outside_plotly = re.sub(r"<script>/\*\*\s*\* plotly\.js.*?</script>", "", text, flags=re.S)
    assert len(outside_plotly) < len(text) - 1_000_000  # plotly.js is embedded, once
    assert len(re.findall(r"\* plotly\.js \(basic - minified\) v\d", text)) == 1
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", outside_plotly)


def test_run_strings_are_escaped_everywhere(tmp_path: Path) -> None:
    evil_config = "</script><script>alert(2)</script>"
    d = write_run(tmp_path / "r", name=MALICIOUS,
                  settings={"note": evil_config, "%SCRIPT%": "%DATA%"})
    RunStore(d).write_metrics([{"step": 0, "<b>loss</b>": 1.0}])
    text = build_html([d])
    # Exactly our four script elements; the names never open or close one.
    assert text.count("<script") == 4 and text.count("</script>") == 4
    assert MALICIOUS not in text and evil_config not in text and "<b>loss" not in text
    page = embedded(text, "dashboard-data")
    assert page["title"] == MALICIOUS
    assert ["note", evil_config] in page["settings"]["rows"]
    assert ["%SCRIPT%", "%DATA%"] in page["settings"]["rows"]
    names = {t["name"] for t in page["main"]["data"]}
    assert "&lt;b&gt;loss&lt;/b&gt;" in names  # Plotly shows it as text
    assert f"<title>{'&lt;script&gt;alert(1)&lt;/script&gt;'} · devinterp dashboard</title>" in text


def test_plot_text_escapes_markup_but_not_quotes() -> None:
    assert plot_text('<a href="x">&</a>') == '&lt;a href="x"&gt;&amp;&lt;/a&gt;'
    assert stage_label({"type": "B", "llc_change": -1.57}) == "B  Δλ̂ -1.57"
    assert stage_label({"type": "A", "llc_change": None}) == "A"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def test_cli_writes_a_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "d.html"
    assert main([str(run_dir), "-o", str(out)]) == 0
    assert out.stat().st_size > 1_000_000 and "wrote" in capsys.readouterr().out
    assert embedded(out.read_text(), "dashboard-data")["title"] == "run"


@pytest.mark.parametrize(("args", "message"), [
    (["{run}"], "-o FILE.html"),
    (["{run}", "{run}", "--serve"], "one folder"),
    (["{run}", "--serve", "-o", "x.html"], "exclude each other"),
    (["{tmp}/missing", "-o", "x.html"], "does not exist"),
    (["{tmp}/empty", "-o", "x.html"], "holds no run"),
])
def test_cli_errors_are_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                 args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["dashboard", *(a.format(run=run_dir, tmp=tmp_path) for a in args)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_usage_error_type(run_dir: Path) -> None:
    with pytest.raises(UsageError):
        main([str(run_dir)])


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "root"
    write_run(root / "exp" / "a", name="a")
    write_run(root / "exp" / "b", name="b", traces=False)
    (root / "exp" / "a" / "snapshots").mkdir()  # never listed as a run
    with running_server(root) as srv:
        yield srv


def get(srv: DashboardServer, path: str) -> tuple[int, bytes]:
    """A raw GET: the path goes on the wire as written (no client-side normalisation)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def test_server_lists_runs_and_serves_pages(server: DashboardServer) -> None:
    status, body = get(server, "/api/runs")
    runs = json.loads(body)
    assert status == 200 and [r["ref"] for r in runs] == ["exp/a", "exp/b"]
    assert runs[0]["points"] == 5 and runs[0]["flagged"] == 2
    status, body = get(server, "/")
    assert status == 200 and b"exp/a" in body
    assert b"<title>Runs \xc2\xb7 devinterp dashboard</title>" in body
    assert not re.search(rb"%[A-Z]+%", body)  # every placeholder filled
    status, body = get(server, "/run/exp/a")
    assert status == 200 and b'src="/static/plotly.js"' in body
    assert b"* plotly.js v" not in body  # served once, cached by the browser
    status, body = get(server, "/static/plotly.js")
    assert status == 200 and body.startswith(b"/**") and len(body) > 1_000_000
    status, body = get(server, "/compare?run=exp/a&run=exp/b")
    assert status == 200 and b"Comparison of 2 runs" in body


def test_server_picks_up_new_llc_rows(server: DashboardServer) -> None:
    _, body = get(server, "/api/page?run=exp/a")
    before = json.loads(body)
    assert before["runs"][0]["points"] == 5
    RunStore(server.root / "exp" / "a").write_llc_row(
        {"step": 20000, "llc_mean": 9.0, "llc_std": 0.5})
    _, body = get(server, "/api/page?run=exp/a")
    after = json.loads(body)
    assert after["runs"][0]["points"] == 6 and after["signature"] != before["signature"]
    llc = next(t for t in after["main"]["data"] if t["meta"]["kind"] == "llc")
    assert llc["customdata"][-1] == 20000


def test_server_serves_traces_on_demand(server: DashboardServer) -> None:
    status, body = get(server, "/api/trace?run=exp/a&step=1000")
    saved = load_run(server.root / "exp" / "a").trace(1000)
    assert status == 200 and np.allclose(json.loads(body)["chains"], saved, rtol=1e-4)
    assert get(server, "/api/trace?run=exp/b&step=1000")[0] == 404
    assert get(server, "/api/trace?run=exp/a&step=x")[0] == 400


@pytest.mark.parametrize(("path", "status"), [
    # A run directory sits next to ROOT (tmp_path/outside), reachable by "..": must be 403.
    ("/run/../outside", 403), ("/run/%2e%2e/outside", 403), ("/run/%2E%2E%2Foutside", 403),
    ("/api/page?run=../outside", 403), ("/api/page?run=%2e%2e%2foutside", 403),
    ("/compare?run=exp/a&run=../outside", 403), ("/api/trace?run=../outside&step=0", 403),
    ("/run/link", 403),  # a symlink inside ROOT that points outside
    ("/api/page?run=" + "%2e%2e%2f" * 12 + "etc", 403), ("/run/../../../../../../etc", 403),
    # No route serves files by path.
    ("/../outside/llc.csv", 404), ("/%2e%2e/outside/llc.csv", 404),
    ("/static/../../outside/llc.csv", 404), ("/run/exp/a/llc.csv", 404),
    ("/exp/a/llc.csv", 404), ("/api/page?run=/etc", 404),  # taken relative to ROOT
])
def test_server_refuses_paths_outside_root(server: DashboardServer, tmp_path: Path,
                                           path: str, status: int) -> None:
    outside = write_run(tmp_path / "outside", name="secret run")
    os.symlink(outside, server.root / "link")
    code, body = get(server, path)
    assert code == status, (path, code, body[:200])
    assert b"secret run" not in body and b"llc_mean" not in body


def test_server_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        DashboardServer(tmp_path / "nope", port=0)
    with pytest.raises(ValueError, match="--poll"):
        DashboardServer(tmp_path, port=0, poll_seconds=0)


def test_serve_reports_a_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    busy = DashboardServer(tmp_path, port=0)
    try:
        port = str(busy.server_address[1])
        assert cli.main(["dashboard", str(tmp_path), "--serve", "--port", port]) == 2
    finally:
        busy.server_close()
    assert "pick another port with --port" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# W&B
# ----------------------------------------------------------------------------------------------
def test_log_to_wandb_attaches_the_page_offline(run_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb_dir = tmp_path / "wandb_dir"
    wb_dir.mkdir()
    run = wandb.init(project="devinterp-test", dir=str(wb_dir), mode="offline")
    try:
        log_to_wandb(run_dir, run)
    finally:
        run.finish()
    files = list(wb_dir.rglob("media/html/dashboard_*.html"))
    assert len(files) == 1
    text = files[0].read_text(encoding="utf-8")
    assert "app.wandb.ai" not in text  # no injected stylesheet: the page stays offline
    assert embedded(text, "dashboard-data")["title"] == "run"


# ----------------------------------------------------------------------------------------------
# One problem per diagnostic; ESS per chain; values used; λ̂ outliers; log loss ticks
# ----------------------------------------------------------------------------------------------
#: A value that breaks each rule the estimator also warns about, and the row's context.
BROKEN = {"num_diverged": 2, "rhat": 1.5, "mala_acceptance": 0.31, "frac_below_baseline": 0.77,
          "drift": 6.0}
CONTEXT = {"num_chains": 4, "first_divergence": "chain 1 at draw 7", "llc_mean": -2.0}


def estimator_warning(column: str, value: float | None = None) -> str:
    """The warning the estimator writes for ``value`` (default ``BROKEN[column]``), from its
    own template."""
    value = BROKEN[column] if value is None else value
    rule = next(r for r in HEALTH_RULES if r.column == column and r.warns
                and r.flagged(value, CONTEXT))
    return rule.template.format(value=value, **CONTEXT)


def rule_label(column: str) -> str:
    return next(r.label for r in HEALTH_RULES if r.column == column)


@pytest.mark.parametrize("column", sorted(BROKEN))
def test_a_violation_and_its_warning_are_one_problem(tmp_path: Path, column: str) -> None:
    from devinterp.dashboard.figures import problems

    llc_mean = CONTEXT["llc_mean"] if column == "frac_below_baseline" else 2.0
    row = {"step": 5, "llc_mean": llc_mean, "llc_std": 0.1, column: BROKEN[column],
           "warnings": estimator_warning(column) + " | an unrelated warning"}
    store = RunStore(tmp_path / "r", create=True)
    store.write_llc_row(row)
    flags = health_flags(load_run(store.path).llc)
    found = problems(flags)
    # Draws below w* with λ̂ < 0 are one problem, named by the more serious negative λ̂.
    head = "llc_mean" if column == "frac_below_baseline" else column
    assert [(p.first.column, p.why) for p in found] == [
        (head, estimator_warning(column)), ("warnings", "an unrelated warning")]
    assert sum(len(p.flags) for p in found) == len(flags)
    page = build_page([load_run(store.path)])
    assert [s["what"] for s in page["diagnostics"]["summary"]] == ["estimator warning",
                                                                   rule_label(head)]


def test_a_warning_without_its_value_is_named_by_its_rule(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r", create=True)
    store.write_llc_row({"step": 1, "llc_mean": 2.0, "llc_std": 0.1,
                         "warnings": estimator_warning("drift")})
    page = build_page([load_run(store.path)])
    assert [(f["what"], f["why"]) for f in page["diagnostics"]["flags"]] == [
        ("λ̂ trace drift", estimator_warning("drift"))]


def test_quickstart_step_zero_is_three_problems_not_six(tmp_path: Path) -> None:
    """Step 0 of the quickstart run: λ̂ < 0 with 77 % of draws below w*, R-hat 1.14, ESS 20,
    and the estimator's two warnings about them."""
    from devinterp.dashboard.figures import problems

    store = RunStore(tmp_path / "r", create=True)
    texts = [estimator_warning("frac_below_baseline", 0.77), estimator_warning("rhat", 1.14)]
    store.write_llc_row({"step": 0, "llc_mean": -2.88, "llc_std": 1.7, "ess": 19.8,
                         "num_chains": 4, "frac_below_baseline": 0.77, "rhat": 1.14,
                         "warnings": " | ".join(texts)})
    flags = health_flags(load_run(store.path).llc)
    assert len(flags) == 6
    found = problems(flags)
    assert [p.first.column for p in found] == ["llc_mean", "rhat", "ess"]
    assert [p.why for p in found][:2] == texts


def test_settings_left_automatic_show_the_values_used(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r", create=True)
    store.upsert_rows("llc.csv", [{"step": s, "llc_mean": 1.0, "llc_std": 0.1, "nbeta": 144.8,
                                   "step_size": [0.006, 0.007, 0.009][k], "sampler": "sgld"}
                                  for k, s in enumerate([0, 10, 20])])
    store.write_json(SETTINGS_FILE, {"num_chains": 4, "nbeta": None, "step_size": None,
                                     "sampler": None, "vectorize": None,
                                     "schedule": {"steps": None}})
    rows = dict(build_page([load_run(store.path)])["settings"]["rows"])
    assert rows == {"num_chains": "4", "nbeta": "auto: 144.8",
                    "step_size": "auto: 0.006–0.009 (median 0.007 over 3 estimates)",
                    "sampler": "auto: sgld", "vectorize": "default",
                    "schedule.steps": "default"}


def test_llc_axis_leaves_out_a_far_negative_outlier_only(tmp_path: Path) -> None:
    def figure(values: list[float]) -> dict:
        store = RunStore(tmp_path / f"r{len(list(tmp_path.iterdir()))}", create=True)
        store.upsert_rows("llc.csv", [{"step": s, "llc_mean": v, "llc_std": 0.5}
                                      for s, v in zip(STEPS, values, strict=True)])
        return llc_figure([load_run(store.path)], ["r"])

    fig = figure([-250.0, 6.0, 7.0, 8.0, 9.0])
    assert fig["layout"]["yaxis2"]["range"] == pytest.approx([5.5 - 0.32, 9.5 + 0.32])
    off = next(t for t in fig["data"] if t["meta"]["kind"] == "llc-offscale")
    assert off["customdata"] == [[0, 0]] and "-250" in off["hovertext"][0]
    assert off["y"][0] == pytest.approx(5.18 + 0.02 * 4.64)
    # A real jump up, a mild negative start, or too few points: the axis scales itself.
    for values in ([2.0, 2.0, 2.0, 2.0, 300.0], [-3.0, 1.0, 4.0, 7.0, 8.0],
                   [-250.0, 6.0, 7.0, 8.0, 9.0][1:] + [float("nan")]):
        fig = figure(values)
        assert "range" not in fig["layout"]["yaxis2"]
        assert "llc-offscale" not in kinds(fig)


@pytest.mark.parametrize(("decades", "dtick"), [(1.5, "D2"), (2, "D2"), (3, 1), (8, 1),
                                                (9, 2), (20, 3)])
def test_log_loss_axis_thins_its_ticks(decades: float, dtick: object) -> None:
    from devinterp.dashboard.figures import loss_axis_ticks

    assert loss_axis_ticks([1.0, 10.0 ** -decades]) == {"dtick": dtick}


def test_comparison_without_stages_has_no_lane(tmp_path: Path) -> None:
    runs = [load_run(write_run(tmp_path / f"r{k}", stages=[], seed=k)) for k in range(2)]
    layout = llc_figure(runs, ["a", "b"])["layout"]
    assert "xaxis3" not in layout and "yaxis3" not in layout
    assert layout["xaxis2"]["title"]["text"] == "training step + 1 (log scale)"
    assert layout["xaxis2"].get("showticklabels", True)


def test_empty_panels_place_their_notes_apart(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r", create=True)
    store.write_json(SETTINGS_FILE, {"num_chains": 4})
    fig = llc_figure([load_run(store.path)], ["r"])
    notes = [a for a in fig["layout"]["annotations"] if a.get("name") == "empty"]
    assert len(notes) == 2 and {a["yref"] for a in notes} == {"paper"}
    assert abs(notes[0]["y"] - notes[1]["y"]) > 0.3


def test_static_files_are_package_data() -> None:
    """The templates, stylesheet and scripts are files in the package, listed as package data
    (else a wheel would ship a dashboard without its script)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from devinterp.dashboard import assets

    package = Path(assets.__file__).parent
    static = sorted(p.relative_to(package).as_posix() for p in (package / "static").iterdir())
    assert static == ["static/head.html", "static/helpers.js", "static/index.html",
                      "static/index.js", "static/page.html", "static/page.js",
                      "static/style.css"]
    pyproject = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["devinterp.dashboard"]
    assert [f for f in static if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
    for script in (assets.SCRIPT, assets.INDEX_SCRIPT):
        assert "function el(tag, className, text)" in script and "@helpers" not in script
        assert ".innerHTML" not in script  # run strings go in through textContent only

