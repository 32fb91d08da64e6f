"""Probe influence and susceptibilities in the run store and the dashboard: the long influence
table by checkpoint (failed checkpoints as rows), the inputs that draw it, the top-k table and
image grid of a query sample, and the component × probe heatmap."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_dashboard_browser import Watched, browser  # noqa: F401 - the browser fixture

from devinterp.dashboard import build_html
from devinterp.dashboard.influence import (
    diverging_color,
    image_rows,
    influence_panel,
    png_data_uri,
    susceptibility_panel,
    top_influences,
)
from devinterp.dashboard.page import build_page
from devinterp.run.store import INFLUENCE_COLUMNS, SUSCEPTIBILITY_COLUMNS, RunStore, load_run

STEPS = [0, 10, 100]
NUM_TRAIN, NUM_QUERY = 12, 3


def planted(step: int) -> pd.DataFrame:
    """Influence where training sample (3·query + step) mod 12 is query's most influential,
    then the next ones in order."""
    rows = []
    for q in range(NUM_QUERY):
        best = (3 * q + step) % NUM_TRAIN
        for t in range(NUM_TRAIN):
            rows.append({"train_index": 100 + t, "query_index": q,
                         "influence": 1.0 / (1 + (t - best) % NUM_TRAIN), "se": 0.01})
    return pd.DataFrame(rows)


def write_influence_run(path: Path, *, images: bool = True) -> RunStore:
    store = RunStore(path, create=True)
    for step in STEPS:
        store.write_llc_row({"step": step, "llc_mean": 1.0, "llc_std": 0.1, "status": "ok"})
        store.write_influence(step, planted(step))
    store.write_llc_row({"step": 1000, "llc_mean": float("nan"), "status": "failed",
                         "reason": "every chain diverged"})
    store.write_influence(1000, reason="every chain diverged")
    rng = np.random.default_rng(0)
    shape = (1, 8, 8) if images else (4,)
    store.save_influence_inputs(rng.normal(size=(NUM_QUERY, *shape)),
                                rng.normal(size=(NUM_TRAIN, *shape)),
                                np.arange(100, 100 + NUM_TRAIN))
    frame = pd.DataFrame([{"component": c, "probe": p, "susceptibility": v, "se": 0.1}
                          for c, row in zip(["blocks.0", "blocks.1"], [[2.0, -1.0, 0.0],
                                                                        [-2.0, 1.0, 0.5]],
                                            strict=True)
                          for p, v in zip(["code", "prose", "math"], row, strict=True)])
    store.write_susceptibilities(100, frame)
    store.write_susceptibilities(1000, frame.assign(susceptibility=frame["susceptibility"] / 2))
    return store


def test_the_store_keeps_influence_by_checkpoint_with_failed_rows(tmp_path):
    store = write_influence_run(tmp_path / "run")
    run = load_run(store.path)
    table = run.influence
    assert list(table.columns) == list(INFLUENCE_COLUMNS)
    assert len(table) == len(STEPS) * NUM_TRAIN * NUM_QUERY + 1
    failed = table[table["status"] == "failed"]
    assert failed["step"].tolist() == [1000] and failed["train_index"].isna().all()
    assert failed["reason"].tolist() == ["every chain diverged"]
    # Writing a checkpoint again replaces it (a re-estimate), it never duplicates rows.
    store.write_influence(1000, planted(0))
    again = load_run(store.path).influence
    assert len(again) == (len(STEPS) + 1) * NUM_TRAIN * NUM_QUERY
    assert (again["status"] == "ok").all()
    inputs = run.influence_inputs()
    assert inputs["query_inputs"].shape == (NUM_QUERY, 1, 8, 8)
    assert inputs["train_index"].tolist() == list(range(100, 100 + NUM_TRAIN))
    with pytest.raises(ValueError, match="not both"):
        store.write_influence(5, planted(0), reason="x")


def test_the_store_keeps_susceptibilities_by_step(tmp_path):
    run = load_run(write_influence_run(tmp_path / "run").path)
    table = run.susceptibilities
    assert list(table.columns) == list(SUSCEPTIBILITY_COLUMNS)
    assert table["step"].tolist() == [100] * 6 + [1000] * 6
    assert table[table["step"] == 1000]["susceptibility"].tolist() == [
        1.0, -0.5, 0.0, -1.0, 0.5, 0.25]


def test_a_run_without_influence_has_empty_tables_and_no_panels(tmp_path):
    store = RunStore(tmp_path / "run", create=True)
    store.write_llc_row({"step": 0, "llc_mean": 1.0, "llc_std": 0.1, "status": "ok"})
    run = load_run(store.path)
    assert list(run.influence.columns) == list(INFLUENCE_COLUMNS) and not len(run.influence)
    assert list(run.susceptibilities.columns) == list(SUSCEPTIBILITY_COLUMNS)
    assert run.influence_inputs() == {}
    page = build_page([run])
    assert page["influence"] is None and page["susceptibilities"] is None


def test_top_influences_are_the_largest_first():
    table = planted(10).assign(step=10, status="ok")
    top = top_influences(table, 10, 2, k=4)
    best = (3 * 2 + 10) % NUM_TRAIN
    assert top["rank"].tolist() == [1, 2, 3, 4]
    assert top["train_index"].tolist() == [100 + (best + i) % NUM_TRAIN for i in range(4)]
    assert top["influence"].is_monotonic_decreasing


def decode_png(uri: str) -> np.ndarray:
    """The pixels of a ``data:image/png`` URI written by :func:`png_data_uri`."""
    data = base64.b64decode(uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = 3 if colour == 2 else 1
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * channels)
    assert depth == 8 and (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, channels).squeeze(-1) if channels == 1 else \
        raw[:, 1:].reshape(h, w, 3)


def test_thumbnails_are_valid_pngs_of_the_inputs():
    image = np.arange(16, dtype=float).reshape(4, 4)
    pixels = decode_png(png_data_uri(image))
    assert pixels.shape == (56, 56)  # 4 px scaled by 14
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255 and pixels[0, 14] == 17
    colour = decode_png(png_data_uri(np.random.default_rng(0).normal(size=(7, 5, 3))))
    assert colour.shape == (56, 40, 3)
    assert image_rows(np.zeros((2, 3, 5, 5))).shape == (2, 5, 5, 3)  # NCHW
    assert image_rows(np.zeros((2, 5, 5, 1))).shape == (2, 5, 5)  # NHWC grey
    assert image_rows(np.zeros((2, 4))) is None  # tabular
    assert image_rows(np.zeros((2, 4, 5, 6))) is None  # no channel axis


def test_the_influence_panel_lists_each_querys_top_training_samples(tmp_path):
    run = load_run(write_influence_run(tmp_path / "run").path)
    panel = influence_panel([run], ["run"], k=5)
    assert panel["steps"] == STEPS and [q["index"] for q in panel["queries"]] == [0, 1, 2]
    assert panel["failed"] == [{"step": 1000, "reason": "every chain diverged"}]
    for step in STEPS:
        for q in range(NUM_QUERY):
            rows = panel["top"][str(step)][str(q)]
            assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
            assert rows[0][1] == 100 + (3 * q + step) % NUM_TRAIN and rows[0][2] == 1.0
    listed = {r[1] for s in panel["top"].values() for rows in s.values() for r in rows}
    assert set(map(int, panel["train_images"])) == listed
    inputs = run.influence_inputs()
    first = decode_png(panel["queries"][0]["image"])
    expected = inputs["query_inputs"][0, 0]
    # Brightest pixel of the thumbnail is the largest input value.
    assert np.unravel_index(first[::7, ::7].argmax(), (8, 8)) == np.unravel_index(
        expected.argmax(), (8, 8))


def test_tabular_inputs_give_a_table_without_images(tmp_path):
    run = load_run(write_influence_run(tmp_path / "run", images=False).path)
    panel = influence_panel([run], ["run"])
    assert panel["train_images"] == {} and all(q["image"] is None for q in panel["queries"])
    assert len(panel["top"]["0"]["0"]) == 10


def test_the_heatmap_colours_are_symmetric_about_zero(tmp_path):
    run = load_run(write_influence_run(tmp_path / "run").path)
    panel = susceptibility_panel([run], ["run"])
    assert panel["components"] == ["blocks.0", "blocks.1"]
    assert panel["probes"] == ["code", "prose", "math"] and panel["steps"] == [100, 1000]
    cells = panel["cells"]["100"]
    assert [c[0] for c in cells[0]] == [2.0, -1.0, 0.0] and cells[0][0][1] == 0.1
    assert cells[0][0][2] == "rgb(178,24,43)" and cells[1][0][2] == "rgb(33,102,172)"
    assert cells[0][2][2] == "rgb(255,255,255)"
    # Each checkpoint is scaled by its own largest |value|: halved values, same colours.
    assert [c[2] for c in panel["cells"]["1000"][0]] == [c[2] for c in cells[0]]
    assert diverging_color(None, 1.0) == diverging_color(float("nan"), 1.0)


@pytest.mark.browser
def test_the_influence_table_grid_and_heatmap_render(browser, tmp_path):  # noqa: F811
    """Offline page: the top-10 table and thumbnails of the chosen probe follow the selects,
    and the heatmap cells carry their colours; no console error, no network."""
    store = write_influence_run(tmp_path / "run")
    out = tmp_path / "page.html"
    out.write_text(build_html([store.path]), encoding="utf-8")
    w = Watched(browser, ("file://",))
    w.open(out.as_uri())
    page = w.page
    assert page.locator("#influence").is_visible()
    assert page.locator("#susceptibilities").is_visible()
    rows = page.locator("#influence-table tbody tr")
    assert rows.count() == 10
    # The last checkpoint with influence (100) and the first probe are shown first.
    assert rows.nth(0).locator("td").nth(1).text_content() == str(100 + (0 + 100) % 12)
    assert page.locator("#influence-grid img").count() == 10
    assert page.locator("#influence-query-image img").count() == 1
    page.select_option("#influence-step", "10")
    page.select_option("#influence-query", "2")
    assert rows.nth(0).locator("td").nth(1).text_content() == str(100 + (6 + 10) % 12)
    widths = page.eval_on_selector_all("#influence-grid img", "els => els.map(e => "
                                       "e.naturalWidth)")
    assert widths == [56] * 10  # decoded PNGs, not broken images
    assert "every chain diverged" in page.locator("#influence-caption").text_content()
    cells = page.locator("#susceptibility-heatmap td.cell")
    assert cells.count() == 6
    assert cells.nth(0).evaluate("e => e.style.backgroundColor") == "rgb(178, 24, 43)"
    assert cells.nth(0).get_attribute("title").startswith("blocks.0 × code: 1.000")
    page.select_option("#susceptibility-step", "100")
    assert cells.nth(0).get_attribute("title").startswith("blocks.0 × code: 2.000")
    w.assert_clean()
    w.close()


def test_served_runs_check_and_watch_the_influence_folder(tmp_path):
    from devinterp.dashboard.server import HTTPError, check_run_files, dir_signature

    store = write_influence_run(tmp_path / "run")
    before = dir_signature(store.path)
    store.write_influence(2000, planted(0))
    assert dir_signature(store.path) != before
    (store.path / "influence" / "step_000003000.csv").symlink_to("/etc/hostname")
    with pytest.raises(HTTPError, match="links outside"):
        check_run_files(tmp_path, store.path)
