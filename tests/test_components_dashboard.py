"""The dashboard's components panel: small multiples on shared axes, curves grouped by shape."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_dashboard_browser import Watched, browser  # noqa: F401 - the browser fixture

from devinterp.dashboard.components import components_figure, group_curves
from devinterp.dashboard.page import build_page, load_runs, render_html
from devinterp.run.store import COMPONENT_KEY, COMPONENTS_FILE, RunStore

STEPS = [0, 1, 3, 10, 30, 100, 300, 1000]


def planted() -> pd.DataFrame:
    """Three shapes at different levels and scales: rising, falling, a bump in the middle."""
    t = np.log10(np.array(STEPS) + 1) / np.log10(1001)
    shapes = {"rise": t, "fall": 1 - t, "bump": np.exp(-((t - 0.5) / 0.15) ** 2)}
    rng = np.random.default_rng(0)
    rows = []
    for shape, curve in shapes.items():
        for j, (level, scale) in enumerate([(0, 1), (5, 3), (20, 0.5)]):
            y = level + scale * curve + 0.01 * scale * rng.standard_normal(len(t))
            rows += [{"component": f"{shape}{j}", "step": s, "llc_mean": float(v),
                      "llc_std": 0.1, "status": "ok"} for s, v in zip(STEPS, y, strict=True)]
    return pd.DataFrame(rows)


def test_curves_are_grouped_by_shape_not_level():
    groups = group_curves(planted())
    by_shape = {shape: {groups[f"{shape}{j}"] for j in range(3)}
                for shape in ("rise", "fall", "bump")}
    assert all(len(g) == 1 for g in by_shape.values()), groups
    assert len({next(iter(g)) for g in by_shape.values()}) == 3
    # Same table, same groups (seeded k-means).
    assert group_curves(planted()) == groups


def test_the_panel_draws_one_small_multiple_per_component_on_shared_axes(tmp_path):
    store = RunStore(tmp_path / "run", create=True)
    store.upsert_rows(COMPONENTS_FILE, planted().to_dict("records"), key=COMPONENT_KEY)
    store.upsert_rows("llc.csv", [{"step": s, "llc_mean": 1.0, "llc_std": 0.1, "status": "ok"}
                                  for s in STEPS])
    runs = load_runs([tmp_path / "run"])
    fig = components_figure(runs, ["run"])
    assert fig is not None and len(fig["data"]) == 9
    ranges = {tuple(v["range"]) for k, v in fig["layout"].items() if k.startswith("yaxis")}
    assert len(ranges) == 1  # one λ̂ axis for every panel
    xranges = {tuple(v["range"]) for k, v in fig["layout"].items() if k.startswith("xaxis")}
    assert len(xranges) == 1 and all(v["type"] == "log" for k, v in fig["layout"].items()
                                     if k.startswith("xaxis"))
    assert sorted(t["name"] for t in fig["data"] if t["showlegend"]) == [
        "group 1", "group 2", "group 3"]
    page = build_page(runs)
    assert page["components"]["groups"] == fig["groups"]
    html = render_html(page, plotly_src="plotly.js")
    assert 'id="fig-components"' in html and "bump2" in html


def test_a_run_without_components_has_no_panel(tmp_path):
    store = RunStore(tmp_path / "run", create=True)
    store.upsert_rows("llc.csv", [{"step": 0, "llc_mean": 1.0, "llc_std": 0.1, "status": "ok"}])
    assert build_page(load_runs([tmp_path / "run"]))["components"] is None


@pytest.mark.browser
def test_the_panel_draws_in_a_browser(browser, tmp_path):  # noqa: F811 - the fixture
    """The page with a components panel draws offline with no error: 9 panels, log axes."""
    from devinterp.dashboard import build_html

    store = RunStore(tmp_path / "run", create=True)
    store.upsert_rows(COMPONENTS_FILE, planted().to_dict("records"), key=COMPONENT_KEY)
    store.upsert_rows("llc.csv", [{"step": s, "llc_mean": 1.0, "llc_std": 0.1, "status": "ok"}
                                  for s in STEPS])
    out = tmp_path / "page.html"
    out.write_text(build_html([tmp_path / "run"]), encoding="utf-8")
    w = Watched(browser, ("file://",))
    w.open(out.as_uri())
    assert w.page.locator("#components").is_visible()
    fig = w.figure("fig-components")
    assert fig["points"] == [len(STEPS)] * 9
    assert {a["type"] for k, a in fig["axes"].items() if k.startswith("xaxis")} == {"log"}
    assert sorted(set(fig["legend"])) == ["group 1", "group 2", "group 3"]
    w.assert_clean()
    w.close()
