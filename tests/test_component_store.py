"""The run store's keyed upsert and the per-component table it keeps (``llc_components.csv``,
``stages_components.json``), read back by ``load_run(path)``; no torch needed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from devinterp.run.store import (
    COMPONENT_KEY,
    COMPONENT_STAGES_FILE,
    COMPONENTS_FILE,
    LLC_FILE,
    RunStore,
    load_run,
)


def test_a_keyed_upsert_replaces_its_component_and_step_only(tmp_path):
    store = RunStore(tmp_path, create=True)
    store.upsert_rows(COMPONENTS_FILE, [{"component": c, "step": s, "llc_mean": float(s)}
                                        for c in ("b", "a") for s in (1, 0)], key=COMPONENT_KEY)
    store.upsert_rows(COMPONENTS_FILE, [{"component": "a", "step": 1, "llc_mean": 9.0},
                                        {"component": "c", "step": 0, "llc_mean": 5.0}],
                      key=COMPONENT_KEY)
    table = load_run(tmp_path).components
    assert table[["component", "step"]].values.tolist() == [
        ["a", 0], ["a", 1], ["b", 0], ["b", 1], ["c", 0]]
    np.testing.assert_array_equal(table["llc_mean"], [0.0, 9.0, 0.0, 1.0, 5.0])
    # Writing the same rows again changes nothing (idempotent), and the step table is apart.
    before = (tmp_path / COMPONENTS_FILE).read_bytes()
    store.upsert_rows(COMPONENTS_FILE, [{"component": "a", "step": 1, "llc_mean": 9.0}],
                      key=COMPONENT_KEY)
    assert (tmp_path / COMPONENTS_FILE).read_bytes() == before
    assert not (tmp_path / LLC_FILE).exists()


def test_the_default_key_is_the_step(tmp_path):
    store = RunStore(tmp_path, create=True)
    store.upsert_rows("t.csv", [{"step": 2, "x": 1}, {"step": 1, "x": 2}])
    store.upsert_rows("t.csv", [{"step": 2, "x": 3}])
    assert store.read_table("t.csv")[["step", "x"]].values.tolist() == [[1, 2], [2, 3]]


def test_bad_keys_are_refused_in_one_line(tmp_path):
    store = RunStore(tmp_path, create=True)
    with pytest.raises(ValueError, match=r"needs the key columns \['component', 'step'\]; a "
                                         r"row lacks \['component'\]"):
        store.upsert_rows(COMPONENTS_FILE, [{"step": 0}], key=COMPONENT_KEY)
    with pytest.raises(ValueError, match="must include 'step'"):
        store.upsert_rows(COMPONENTS_FILE, [{"component": "a"}], key=("component",))
    assert not (tmp_path / COMPONENTS_FILE).exists()


def test_concurrent_keyed_upserts_lose_no_row(tmp_path):
    store = RunStore(tmp_path, create=True)

    def write(name: str) -> None:
        for s in range(15):
            RunStore(tmp_path).upsert_rows(COMPONENTS_FILE, [{"component": name, "step": s,
                                                              "llc_mean": 1.0}],
                                           key=COMPONENT_KEY)

    threads = [threading.Thread(target=write, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.read_components()) == 45


def test_a_run_without_components_has_an_empty_table_with_its_columns(tmp_path):
    run = load_run(RunStore(tmp_path, create=True).path)
    assert len(run.components) == 0 and run.component_stages is None
    assert list(run.components.columns) == ["component", "step", "llc_mean", "llc_std",
                                            "status", "reason"]


def test_numeric_component_names_read_back_as_text_and_stages_load(tmp_path):
    store = RunStore(tmp_path, create=True)
    store.upsert_rows(COMPONENTS_FILE, [{"component": "0", "step": 3, "llc_mean": 1.0}],
                      key=COMPONENT_KEY)
    store.upsert_rows(COMPONENTS_FILE, [{"component": "0", "step": 3, "llc_mean": 2.0}],
                      key=COMPONENT_KEY)
    store.write_json(COMPONENT_STAGES_FILE, {"0": [{"start": 0, "end": 3}]})
    run = load_run(tmp_path)
    assert run.components["component"].tolist() == ["0"]
    assert run.components["llc_mean"].tolist() == [2.0]
    assert run.component_stages == {"0": [{"start": 0, "end": 3}]}
    store.write_json(COMPONENT_STAGES_FILE, [1, 2])
    with pytest.raises(ValueError, match="stages_components.json must map each component"):
        load_run(tmp_path)
