"""The dashboard in a real headless browser: Debian's chromium driven by Playwright.

Never downloads a browser. Without /usr/bin/chromium (or playwright) these tests skip, unless
DEVINTERP_REQUIRE_BROWSER=1 (CI sets it), where they fail instead.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dashboard import MALICIOUS, STEPS, write_run

from devinterp.dashboard import DashboardServer, build_html
from devinterp.run.store import RunStore

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: Predicates are functions, not expressions: Playwright evals expressions in the page, which
#: the dashboard's Content-Security-Policy (no 'unsafe-eval') rightly forbids.
READY = "() => window.__dashboard && window.__dashboard.ready"

#: What a figure div holds once drawn: trace kinds, shape names, axis ranges, shape paths.
FIGURE_STATE = """(id) => {
  const gd = document.getElementById(id);
  const full = gd._fullLayout;
  const axes = {};
  Object.keys(full).filter(k => /^[xy]axis\\d*$/.test(k)).forEach(k => {
    axes[k] = {type: full[k].type, range: full[k].range.slice()};
  });
  return {
    kinds: gd.data.map(t => t.meta && t.meta.kind),
    points: gd.data.map(t => (t.x || t.y || []).length),
    shapes: (gd.layout.shapes || []).map(s => s.name),
    axes: axes,
    size: {l: full._size.l, t: full._size.t, w: full._size.w, h: full._size.h},
    paths: Array.from(gd.querySelectorAll('.shapelayer path')).map(p => p.getAttribute('d')),
    legend: Array.from(gd.querySelectorAll('.legendtext')).map(e => e.textContent),
  };
}"""


def _unavailable(reason: str) -> None:
    if os.environ.get("DEVINTERP_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} and DEVINTERP_REQUIRE_BROWSER=1")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Watched:
    """A page that records console errors, page errors, dialogs and requests leaving
    ``allowed`` URL prefixes (those are aborted)."""

    def __init__(self, browser: Any, allowed: tuple[str, ...]) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.route("**/*", self._route)
        self.allowed = allowed

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _route(self, route: Any) -> None:
        url = route.request.url
        if url.startswith(self.allowed):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_function(READY, timeout=30_000)

    def figure(self, element_id: str) -> dict:
        return self.page.evaluate(FIGURE_STATE, element_id)

    def assert_clean(self) -> None:
        assert self.errors == [] and self.foreign == [] and self.dialogs == []

    def close(self) -> None:
        self.page.close()


def assert_sane_log_axes(fig: dict, max_step: int) -> None:
    """Every step axis is logarithmic and spans [1, max_step + 1] with a small margin; every
    shape path has finite coordinates inside the drawing (a band at step 0 must not run off to
    minus infinity)."""
    for name, axis in fig["axes"].items():
        lo, hi = axis["range"]
        assert math.isfinite(lo) and math.isfinite(hi) and lo != hi, name  # lanes run reversed
        if name.startswith("x"):
            assert axis["type"] == "log", name
            assert -0.5 < lo <= 0 and math.log10(max_step + 1) <= hi < math.log10(max_step) + 1
    size = fig["size"]
    for path in fig["paths"]:
        assert "NaN" not in path and "Infinity" not in path, path
        xs = [float(v) for v in path.replace("M", " ").replace("H", " ").replace("V", " ")
              .replace("L", " ").replace("Z", " ").replace(",", " ").split()[::2]]
        assert all(size["l"] - 1 <= x <= size["l"] + size["w"] + 1 for x in xs), path


@pytest.fixture
def single_html(tmp_path: Path) -> Path:
    out = tmp_path / "single.html"
    out.write_text(build_html([write_run(tmp_path / "run", name=MALICIOUS)]), encoding="utf-8")
    return out


def test_single_run_page_draws_offline(browser: Any, single_html: Path, tmp_path: Path) -> None:
    w = Watched(browser, ("file://",))
    w.open(single_html.as_uri())
    main = w.figure("fig-main")
    assert sorted(main["kinds"]) == ["flag", "llc", "llc-band", "loss", "loss"]
    assert main["shapes"] == ["stage:0:0", "stage:0:1", "stage:0:2"]
    assert_sane_log_axes(main, max(STEPS))
    diag = w.figure("fig-diag")
    assert diag["kinds"].count("diagnostic") == 6 and diag["kinds"].count("diagnostic-flag") == 2
    assert_sane_log_axes(diag, max(STEPS))
    # The run's name is shown as text, everywhere, and ran nothing.
    assert w.page.inner_text("h1") == MALICIOUS
    assert w.page.title().startswith(MALICIOUS)
    # Diverged chains and R-hat; the estimator's R-hat warning is the same problem, listed once.
    assert w.page.locator("#banner li").count() == 2
    assert w.page.locator("#flag-table tbody tr").count() == 2
    assert w.page.locator("#stage-table td.stage-B").count() == 1
    shot = tmp_path / "dashboard.png"
    w.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000
    w.assert_clean()
    w.close()


def test_trace_selector_click_and_flag_buttons(browser: Any, single_html: Path) -> None:
    w = Watched(browser, ("file://",))
    w.open(single_html.as_uri())
    trace = w.figure("fig-trace")
    assert trace["kinds"] == ["chain"] * 4 + ["baseline"]
    assert w.page.input_value("#trace-step") == "10000"
    first_chain = "document.getElementById('fig-trace').data[0].y[0]"
    w.page.select_option("#trace-step", "10")
    w.page.wait_for_function(f"() => Math.abs({first_chain} - 1.0) < 0.05")  # step 10: loss ~2/2
    assert "λ̂ = 2.000" in w.page.inner_text("#trace-caption")
    # The diverged checkpoint's button in the flag table opens its chains.
    w.page.locator("#flag-table button").first.click()
    w.page.wait_for_function("() => document.getElementById('trace-step').value === '100'")
    # Clicking a λ̂ point selects that checkpoint.
    w.page.evaluate("""() => {
      const gd = document.getElementById('fig-main');
      const llc = gd.data.find(t => t.meta.kind === 'llc');
      gd.emit('plotly_click', {points: [{data: llc, customdata: 1000}]});
    }""")
    w.page.wait_for_function("() => document.getElementById('trace-step').value === '1000'")
    w.page.wait_for_function(f"() => Math.abs({first_chain} - 0.5) < 0.05")
    w.assert_clean()
    w.close()


def test_comparison_page_overlays_runs_with_stage_lanes(browser: Any, tmp_path: Path) -> None:
    names = ["seed 0", "seed 1", MALICIOUS]
    dirs = [write_run(tmp_path / f"s{k}", name=n, seed=k, steps=STEPS[: 3 + k])
            for k, n in enumerate(names)]
    out = tmp_path / "compare.html"
    out.write_text(build_html(dirs), encoding="utf-8")
    w = Watched(browser, ("file://",))
    w.open(out.as_uri())
    main = w.figure("fig-main")
    assert main["kinds"].count("llc") == 3 and main["kinds"].count("loss") == 6
    assert len([s for s in main["shapes"] if s.startswith("stage:")]) == 9
    assert_sane_log_axes(main, max(STEPS))
    assert [n for n in names if n in main["legend"]] == names
    lanes = w.page.evaluate("""() => Array.from(document.querySelectorAll(
        '#fig-main .yaxislayer-above .y3tick text')).map(e => e.textContent)""")
    assert lanes == names
    assert w.page.locator("#trace-run option").count() == 3
    w.page.select_option("#trace-run", "2")
    w.page.wait_for_function("() => document.getElementById('trace-step').value === '10000'")
    w.assert_clean()
    w.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[DashboardServer]:
    root = tmp_path / "root"
    write_run(root / "exp" / "a", name="a")
    write_run(root / "exp" / "b", name="b", traces=False)
    write_run(tmp_path / "outside", name="secret run")
    srv = DashboardServer(root, port=0, poll_seconds=0.3)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_served_pages_follow_a_training_run(browser: Any, served: DashboardServer) -> None:
    base = served.url
    w = Watched(browser, (base,))
    w.open(base)
    links = w.page.locator("#run-table a")
    assert links.count() == 2
    links.first.click()
    w.page.wait_for_url(base + "run/exp/a")
    w.page.wait_for_function(READY)
    llc_points = ("(gd => gd.data.find(t => t.meta.kind === 'llc').x.length)"
                  "(document.getElementById('fig-main'))")
    assert w.page.evaluate(f"() => {llc_points}") == 5
    assert_sane_log_axes(w.figure("fig-main"), max(STEPS))
    # A new λ̂ row while the page is open: it appears without reloading or restarting.
    RunStore(served.root / "exp" / "a").write_llc_row(
        {"step": 50000, "llc_mean": 7.5, "llc_std": 0.2})
    w.page.wait_for_function(f"() => {llc_points} === 6", timeout=15_000)
    assert "6 λ̂ points" in w.page.inner_text("#runs")
    assert_sane_log_axes(w.figure("fig-main"), 50000)
    # Loss traces come from the server on demand.
    w.page.select_option("#trace-step", "100")
    w.page.wait_for_function(
        "() => Math.abs(document.getElementById('fig-trace').data[0].y[0] - 2 / 3) < 0.05")
    # Back to the index, and compare from there.
    w.page.click("#index-link")
    w.page.wait_for_url(base)
    w.page.wait_for_function(READY)
    w.page.locator("#run-table input[type=checkbox]").nth(0).check()
    w.page.locator("#run-table input[type=checkbox]").nth(1).check()
    w.page.click("#compare")
    w.page.wait_for_url("**/compare?run=exp%2Fa&run=exp%2Fb")
    w.page.wait_for_function(READY)
    assert w.figure("fig-main")["kinds"].count("llc") == 2
    w.assert_clean()
    # Nothing outside ROOT, however the path is spelled.
    for path in ("run/../../outside", "run/%2e%2e/%2e%2e/outside", "api/page?run=../outside",
                 "api/page?run=%2e%2e%2foutside", "api/trace?run=../outside&step=0"):
        resp = w.page.request.get(base + path)
        assert resp.status in (403, 404), path
        assert "secret run" not in resp.text()
    w.close()


def test_screenshot_tool_writes_a_png(browser: Any, tmp_path: Path) -> None:
    """tools/screenshot_dashboard.py, run as the README runs it."""
    run = write_run(tmp_path / "run", name="tms")
    out = tmp_path / "stages.png"
    tool = Path(__file__).resolve().parents[1] / "tools" / "screenshot_dashboard.py"
    subprocess.run([sys.executable, str(tool), str(run), "-o", str(out), "--scale", "1"],
                   check=True, capture_output=True, timeout=120)
    data = out.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and width > 1000 and 500 < height < 1500


# ----------------------------------------------------------------------------------------------
# Layout defects (issue 18): each one drawn, measured in the page, and screenshotted
# ----------------------------------------------------------------------------------------------
#: Bounding boxes (page pixels) of the SVG text elements matching a selector inside a figure.
TEXT_BOXES = """([id, selector]) => Array.from(
    document.getElementById(id).querySelectorAll(selector)).map(e => {
  const r = e.getBoundingClientRect();
  return {text: e.textContent, left: r.left, right: r.right, top: r.top, bottom: r.bottom};
})"""


def text_boxes(w: Watched, element_id: str, selector: str) -> list[dict]:
    return w.page.evaluate(TEXT_BOXES, [element_id, selector])


def overlapping(boxes: list[dict]) -> list[tuple[str, str]]:
    """Pairs of boxes that overlap (by more than a pixel each way)."""
    out = []
    for k, a in enumerate(boxes):
        for b in boxes[k + 1:]:
            if (min(a["right"], b["right"]) - max(a["left"], b["left"]) > 1
                    and min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]) > 1):
                out.append((a["text"], b["text"]))
    return out


def open_file(browser: Any, html_text: str, path: Path) -> Watched:
    path.write_text(html_text, encoding="utf-8")
    w = Watched(browser, ("file://",))
    w.open(path.as_uri())
    return w


def shoot(w: Watched, path: Path) -> None:
    w.page.locator("#overview").screenshot(path=str(path))
    assert path.stat().st_size > 20_000


def test_comparison_without_stages_keeps_the_step_axis(browser: Any, tmp_path: Path) -> None:
    dirs = [write_run(tmp_path / f"r{k}", name=f"r{k}", stages=[], seed=k) for k in range(2)]
    w = open_file(browser, build_html(dirs), tmp_path / "nostages.html")
    labels = [b["text"] for b in text_boxes(w, "fig-main", ".xaxislayer-above text")
              if b["bottom"] > b["top"]]
    assert {"1", "10", "100", "1000", "10k"} <= set(labels)
    titles = [b["text"] for b in text_boxes(w, "fig-main", ".infolayer text")]
    assert titles.count("training step + 1 (log scale)") == 1
    shoot(w, tmp_path / "nostages.png")
    w.assert_clean()
    w.close()


def test_stage_lanes_show_whole_run_names(browser: Any, tmp_path: Path) -> None:
    names = ["seed-0-lr-0.001-width-512", "a much longer run name than fits in a lane", "s"]
    dirs = [write_run(tmp_path / f"r{k}", name=n, seed=k) for k, n in enumerate(names)]
    w = open_file(browser, build_html(dirs), tmp_path / "lanes.html")
    figure_left = w.page.evaluate(
        "() => document.getElementById('fig-main').getBoundingClientRect().left")
    lanes = text_boxes(w, "fig-main", ".yaxislayer-above .y3tick text")
    assert [b["text"] for b in lanes] == [names[0], "…" + names[1][-27:], "s"]
    assert all(b["left"] >= figure_left for b in lanes), lanes
    assert overlapping(lanes) == []
    shoot(w, tmp_path / "lanes.png")
    w.assert_clean()
    w.close()


def test_an_outlier_at_step_zero_does_not_flatten_the_curve(browser: Any,
                                                            tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r", create=True)
    for k, step in enumerate(STEPS):
        store.write_llc_row({"step": step, "llc_mean": -250.0 if step == 0 else 5.0 + k,
                             "llc_std": 0.3})
    store.write_metrics([{"step": s, "train_loss": 1.0 / (1 + s)} for s in STEPS])
    w = open_file(browser, build_html([store.path]), tmp_path / "outlier.html")
    fig = w.figure("fig-main")
    lo, hi = fig["axes"]["yaxis2"]["range"]
    assert 4 < lo < 5.7 and 9.3 < hi < 11  # the curve 6..9 (± 0.3) fills the panel
    assert "llc-offscale" in fig["kinds"]
    shoot(w, tmp_path / "outlier.png")
    w.assert_clean()
    w.close()


@pytest.mark.parametrize("decades", [1.5, 4, 9, 20])
def test_log_loss_axis_labels_never_collide(browser: Any, tmp_path: Path,
                                            decades: float) -> None:
    store = RunStore(tmp_path / "r", create=True)
    steps = list(range(0, 10001, 100))
    store.write_metrics([{"step": s, "train_loss": 10 ** (-decades * s / 10000)}
                         for s in steps])
    store.write_llc_row({"step": 0, "llc_mean": 1.0, "llc_std": 0.1})
    w = open_file(browser, build_html([store.path]), tmp_path / "loss.html")
    assert w.figure("fig-main")["axes"]["yaxis"]["type"] == "log"
    ticks = [b for b in text_boxes(w, "fig-main", ".yaxislayer-above .ytick text")
             if b["bottom"] > b["top"]]
    assert len(ticks) >= 2 and overlapping(ticks) == []
    shoot(w, tmp_path / f"loss{decades}.png")
    w.assert_clean()
    w.close()


def test_empty_run_page_placeholders_do_not_overlap(browser: Any, tmp_path: Path) -> None:
    """A run that has just started (settings.json only), as the server shows it."""
    from devinterp.dashboard import build_page, render_html
    from devinterp.run.store import load_run

    store = RunStore(tmp_path / "r", create=True)
    store.write_json("settings.json", {"num_chains": 4})
    html_text = render_html(build_page([load_run(store.path)]))
    w = open_file(browser, html_text, tmp_path / "empty.html")
    notes = text_boxes(w, "fig-main", ".annotation-text")
    assert sorted(b["text"] for b in notes) == ["no loss logged in metrics.csv",
                                                "no λ̂ estimated yet"]
    assert overlapping(notes) == []
    shoot(w, tmp_path / "empty.png")
    w.assert_clean()
    w.close()


def test_settings_show_the_values_used(browser: Any, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "r", create=True)
    for k, step in enumerate(STEPS):
        store.write_llc_row({"step": step, "llc_mean": 1.0 + k, "llc_std": 0.1,
                             "nbeta": 144.8, "step_size": 0.006 + 0.001 * k})
    store.write_json("settings.json", {"num_chains": 4, "nbeta": None, "step_size": None,
                                       "chain_chunk_size": None})
    w = open_file(browser, build_html([store.path]), tmp_path / "settings.html")
    cells = w.page.evaluate("""() => Object.fromEntries(Array.from(
        document.querySelectorAll('#settings-table tbody tr')).map(
        tr => [tr.cells[0].textContent, tr.cells[1].textContent]))""")
    assert cells == {"num_chains": "4", "nbeta": "auto: 144.8",
                     "step_size": "auto: 0.006–0.01 (median 0.008 over 5 estimates)",
                     "chain_chunk_size": "default"}
    w.assert_clean()
    w.close()


def test_index_shows_a_bad_run_in_place(browser: Any, served: DashboardServer) -> None:
    bad = served.root / "exp" / "broken"
    bad.mkdir()
    (bad / "llc.csv").write_text("step,llc_mean\nnot-a-step,1\n")
    w = Watched(browser, (served.url,))
    w.open(served.url)
    assert w.page.locator("#run-table a").count() == 2  # the good runs, still links
    row = w.page.locator("#run-table tr.error")
    assert row.count() == 1 and "exp/broken" in row.inner_text()
    assert "not-a-step" in row.inner_text()  # what is wrong with it
    w.assert_clean()
    w.close()


def test_screenshot_tool_errors_are_one_line_and_keep_the_old_png(browser: Any,
                                                                  tmp_path: Path) -> None:
    tool = Path(__file__).resolve().parents[1] / "tools" / "screenshot_dashboard.py"
    started = RunStore(tmp_path / "started", create=True)
    started.write_json("settings.json", {"num_chains": 4})
    old = tmp_path / "old.png"
    old.write_bytes(b"the good picture")
    for args in ([str(started.path), "-o", str(old)], [str(started.path), "-o", str(tmp_path)]):
        proc = subprocess.run([sys.executable, str(tool), *args], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert old.read_bytes() == b"the good picture"
