"""``LLCCallback(probes=...)``: the Bayesian influence of training samples on a probe set at
every checkpoint, from the draws of that checkpoint's λ̂ (one estimate), in the run store
(``influence/``, :attr:`devinterp.Run.influence`); training and λ̂ untouched, failures as
failed rows."""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from llc_models import Tiny, regression_data, trainer
from torch.utils.data import DataLoader, TensorDataset

from devinterp import LLCCallback, load_run
from devinterp.cli import main as cli_main
from devinterp.run.estimate import estimate_run

#: Enough draws for the influence ranking; still a fraction of a second per checkpoint.
SETTINGS = {"num_chains": 2, "num_draws": 60, "num_burnin": 10, "step_size": 1e-3,
            "batch_size": 64}
#: Training samples copied into the probe set; the first is pushed far out.
COPIED = (5, 17)


def outlier_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Regression data with sample ``COPIED[0]`` far out: its loss varies most."""
    x, y = regression_data(64)
    x[COPIED[0]] *= 4
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])


class Outliers(Tiny):
    """:class:`Tiny` trained on :func:`outlier_data` (one outlier)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*outlier_data()), batch_size=16, shuffle=True)


def probes() -> tuple[torch.Tensor, torch.Tensor]:
    """The copied training samples, then one fresh sample."""
    x, y = outlier_data()
    fresh_x, fresh_y = regression_data(1, seed=3)
    return torch.cat([x[list(COPIED)], fresh_x]), torch.cat([y[list(COPIED)], fresh_y])


def fit(tmp_path, callbacks, module_class=Outliers, max_steps=8):
    pl.seed_everything(0, verbose=False)
    module = module_class()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks, max_steps=max_steps).fit(module)
    return module, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One run with probes (steps 0, 4, 8), and the same run without them."""
    root = tmp_path_factory.mktemp("probed")
    runs = {}
    for name, extra in (("probed", {"probes": probes()}), ("plain", {})):
        cb = LLCCallback(root / name, every_n_train_steps=4, progress=False, **SETTINGS,
                         **extra)
        module, _ = fit(root, [cb])
        runs[name] = (load_run(root / name), module)
    return runs


def test_the_influence_table_has_a_row_per_step_training_sample_and_probe(probed):
    run, _ = probed["probed"]
    table = run.influence
    assert list(table.columns) == ["step", "train_index", "query_index", "influence", "se",
                                   "kind", "status", "reason"]
    assert sorted(table["step"].unique()) == [0, 4, 8] == run.llc["step"].tolist()
    assert len(table) == 3 * 64 * 3 and (table["status"] == "ok").all()
    assert (table["kind"] == "covariance").all() and table["influence"].notna().all()
    for _, part in table.groupby("step"):
        assert sorted(part["train_index"].unique()) == list(range(64))
        assert sorted(part["query_index"].unique()) == [0, 1, 2]
    inputs = run.influence_inputs()
    assert torch.equal(torch.from_numpy(inputs["query_inputs"]), probes()[0])
    assert np.array_equal(inputs["train_index"], np.arange(64))
    assert torch.equal(torch.from_numpy(inputs["train_inputs"]), outlier_data()[0])


def test_a_copied_training_sample_influences_its_copy_most_at_every_checkpoint(probed):
    """The copy of the training sample whose loss varies most: no training sample covaries
    more with it than its original, and no probe covaries more with the original
    (|Cov(ℓ_i, ℓ_q)| ≤ sd_i·sd_q; a copy's covariance with its original is their variance)."""
    table = probed["probed"][0].influence
    for step, part in table.groupby("step"):
        matrix = part.pivot(index="train_index", columns="query_index", values="influence")
        assert int(matrix[0].idxmax()) == COPIED[0], step
        assert int(matrix.loc[COPIED[0]].idxmax()) == 0, step
    # Influence evolves: the checkpoints' matrices differ.
    first, last = (table[table["step"] == s]["influence"].to_numpy() for s in (0, 8))
    assert not np.allclose(first, last)


def test_probes_change_neither_training_nor_lambda_hat(probed):
    (run, module), (plain, reference) = probed["probed"], probed["plain"]
    for k, v in reference.state_dict().items():
        assert torch.equal(module.state_dict()[k], v), k
    # The same draws: λ̂ with the probes riding on them is λ̂ without them, to the bit.
    assert run.llc["llc_mean"].tolist() == plain.llc["llc_mean"].tolist()
    assert len(plain.influence) == 0


class FailsFromStep4(Outliers):
    """λ̂'s loss raises from step 4 on."""

    def llc_batch_loss(self, forward, batch):
        if self.global_step >= 4:
            raise RuntimeError("vmap: no batching rule for aten::_fused_sdp_choice")
        return self.loss_fn(forward(batch[0]), batch[1])


def test_a_failed_estimate_is_a_failed_influence_row_and_training_goes_on(tmp_path):
    cb = LLCCallback(tmp_path / "run", every_n_train_steps=4, progress=False, probes=probes(),
                     **SETTINGS)
    _, caught = fit(tmp_path, [cb], FailsFromStep4)
    table = load_run(tmp_path / "run").influence
    failed = table[table["status"] == "failed"]
    assert failed["step"].tolist() == [4, 8] and failed["train_index"].isna().all()
    assert (failed["reason"] == "RuntimeError: vmap: no batching rule for "
                                "aten::_fused_sdp_choice").all()
    assert (table[table["step"] == 0]["status"] == "ok").all()
    assert sum("no probe influence" in m for m in caught) == 1


def test_probes_the_loss_cannot_read_fail_the_influence_not_lambda_hat(tmp_path):
    x, y = probes()
    cb = LLCCallback(tmp_path / "run", steps=[4], include_init=False, progress=False,
                     probes=(x[:, :3], y), **SETTINGS)  # three features: the model takes four
    fit(tmp_path, [cb])
    run = load_run(tmp_path / "run")
    assert run.llc["status"].tolist() == ["ok"]
    assert run.influence["status"].tolist() == ["failed"]
    assert "per-sample loss of the probes" in run.influence["reason"][0]  # their forward failed


def test_influence_train_subsamples_the_same_training_samples_at_every_step(tmp_path):
    cb = LLCCallback(tmp_path / "run", steps=[2, 4], include_init=False, progress=False,
                     probes=probes(), influence_train=10, **SETTINGS)
    fit(tmp_path, [cb], max_steps=4)
    table = load_run(tmp_path / "run").influence
    by_step = [sorted(p["train_index"].unique()) for _, p in table.groupby("step")]
    assert len(by_step) == 2 and by_step[0] == by_step[1] and len(by_step[0]) == 10


def test_bad_probes_fail_at_construction():
    with pytest.raises(TypeError, match="probes must be"):
        LLCCallback(every_n_train_steps=1, probes=[1, 2, 3])


def test_a_deferred_run_keeps_its_probes_and_devinterp_estimate_records_the_same_influence(
        tmp_path, probed):
    cb = LLCCallback(tmp_path / "deferred", every_n_train_steps=4, mode="deferred",
                     progress=False, probes=probes(), **SETTINGS)
    fit(tmp_path, [cb])
    run = load_run(tmp_path / "deferred")
    assert run.influence.empty and run.settings["probes"] == "influence/probes.pt"
    kept = torch.load(tmp_path / "deferred" / "influence" / "probes.pt", weights_only=True)
    assert torch.equal(kept["inputs"], probes()[0]) and torch.equal(kept["targets"], probes()[1])
    assert cli_main(["estimate", str(tmp_path / "deferred"), "--quiet"]) == 0
    inline, _ = probed["probed"]
    pd.testing.assert_frame_equal(load_run(tmp_path / "deferred").influence, inline.influence)
    got = load_run(tmp_path / "deferred").influence_inputs()
    for name, array in inline.influence_inputs().items():
        np.testing.assert_array_equal(got[name], array)


def test_devinterp_estimate_probes_file_on_a_run_without_probes(tmp_path, probed):
    cb = LLCCallback(tmp_path / "plain", every_n_train_steps=4, mode="deferred",
                     progress=False, **SETTINGS)
    fit(tmp_path, [cb])
    x, y = probes()
    torch.save({"inputs": x, "targets": y}, tmp_path / "probes.pt")
    assert cli_main(["estimate", str(tmp_path / "plain"), "--probes",
                     str(tmp_path / "probes.pt"), "--quiet"]) == 0
    inline, _ = probed["probed"]
    pd.testing.assert_frame_equal(load_run(tmp_path / "plain").influence, inline.influence)
    # A file that holds no probe tensors is one clear error.
    torch.save({"x": x}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"must hold probe tensors"):
        estimate_run(tmp_path / "plain", probes=str(tmp_path / "bad.pt"), force=True,
                     progress=False)


def test_a_probe_file_outside_the_run_directory_is_refused(tmp_path):
    cb = LLCCallback(tmp_path / "deferred", every_n_train_steps=8, mode="deferred",
                     progress=False, probes=probes(), **SETTINGS)
    fit(tmp_path, [cb])
    settings = tmp_path / "deferred" / "settings.json"
    doc = json.loads(settings.read_text())
    doc["probes"] = "../../elsewhere.pt"
    settings.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="outside the run directory"):
        estimate_run(tmp_path / "deferred", progress=False)
