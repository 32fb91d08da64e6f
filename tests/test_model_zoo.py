"""λ̂ of models the field trains, unchanged: Hugging Face causal LMs (GPT-2 with tied
embeddings, Llama) on dict batches with their default attention, a TransformerLens
attention-only ``HookedTransformer``, a CNN with BatchNorm and Dropout, a GRU and an LSTM, a
``torch.compile``d module, frozen parameters, ``torch.nn.utils.parametrize``, and a model
``torch.func.vmap`` cannot batch. Each goes through ``estimate_llc`` and through
``LLCCallback`` on a LightningModule whose only loss is its ``training_step``.

The models are tiny random-init configs built in code (``tests/zoo_models.py``): nothing is
downloaded. The Hugging Face and TransformerLens tests skip only when those packages are not
installed (they are in the ``dev`` extra, so CI runs them).
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from zoo_models import (
    CNN,
    VOCAB,
    CausalLMModule,
    EarlyExit,
    HookedLMModule,
    Recurrent,
    Same,
    SupervisedModule,
    TokenDataset,
    frozen_mlp,
    gpt2,
    hf_loss,
    hooked_loss,
    hooked_transformer,
    image_data,
    llama,
    mlp,
    regression_data,
    sequence_data,
    supervised_loss,
    symmetric_mlp,
)

from devinterp import LLCCallback, LLCResult, estimate_llc, load_run

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

pytestmark = [
    # vmap runs fused attention and RNN kernels through its slow per-example fallback: right
    # numbers, and a performance note from PyTorch on every call.
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    # transformer-lens 3 announces HookedTransformer's removal in 4 (the extras pin < 4).
    pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning"),
]

#: 2 chains x 20 draws: about a second per estimate on these models.
FAST = {"num_chains": 2, "num_draws": 20, "num_burnin": 10}


def tokens() -> DataLoader:
    """Dict batches ``{"input_ids", "attention_mask", "labels"}`` through a DataLoader."""
    return DataLoader(TokenDataset(), batch_size=16)


def num_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameter entries (a tied tensor counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def assert_finite(result: LLCResult) -> None:
    assert np.isfinite(result.llc_per_chain).all(), result.llc_per_chain
    assert math.isfinite(result.llc_mean) and math.isfinite(result.llc_std)


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"estimate_llc changed {k}"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- packaging -------------------------------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter importing torch
def test_hugging_face_packages_are_an_extra_and_never_imported_by_devinterp():
    """transformers / transformer-lens are in the hf and dev extras only, and importing the
    estimator or the CLI does not import them (they cost seconds and hundreds of MB). (Lightning
    does, through torchmetrics, whenever transformers is installed.)"""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = ("transformers", "transformer-lens")
    assert not [d for d in project["dependencies"] if d.startswith(names)]
    for extra in ("hf", "dev"):
        assert {d.split(">")[0].split("=")[0] for d in project["optional-dependencies"][extra]
                if d.startswith(names)} == set(names), extra
    code = ("import sys, devinterp, devinterp.llc, devinterp.cli; "
            "print(sorted(m for m in ('transformers', 'transformer_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "[]", out.stderr


# -- Hugging Face causal LMs, default attention ----------------------------------------------------
def test_gpt2_tied_embeddings_with_default_attention_and_auto_step():
    """GPT-2 as built (sdpa attention, whose CPU kernel has no double backward) under the
    default step_size="auto": finite λ̂, the tied head/embedding sampled once, model intact."""
    pytest.importorskip("transformers")
    model = gpt2()
    assert model.config._attn_implementation == "sdpa"  # the default is what is tested
    assert model.lm_head.weight is model.transformer.wte.weight
    before = snapshot(model)
    result = estimate_llc(model, tokens(),
                          batch_loss=lambda forward, batch: forward(**batch).loss, **FAST)
    assert_finite(result)
    assert result.settings["step_size_auto"]
    assert math.isfinite(result.settings["step_size"]) and result.settings["step_size"] > 0
    every_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert result.settings["num_sampled_params"] == num_params(model) < every_name
    assert_unchanged(model, before)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_weights_may_name_either_alias_of_the_tied_tensor():
    pytest.importorskip("transformers")
    model = gpt2()
    results = {
        name: estimate_llc(model, tokens(), batch_loss=hf_loss, weights=[name], step_size=1e-4,
                           **FAST)
        for name in ("lm_head.weight", "transformer.wte.weight")
    }
    head, embedding = results["lm_head.weight"], results["transformer.wte.weight"]
    assert head.settings["num_sampled_params"] == VOCAB * 16
    assert embedding.settings["num_sampled_params"] == VOCAB * 16
    assert_finite(head)
    # One tensor under two names: the same chains, whichever name picks it.
    np.testing.assert_array_equal(head.llc_per_chain, embedding.llc_per_chain)


def test_llama_with_default_attention_and_auto_step():
    """Llama (RMSNorm, rotary embeddings, grouped-query attention, untied head) with its
    default attention; a weight-refined λ̂ of the attention block samples exactly its
    projections."""
    pytest.importorskip("transformers")
    model = llama()
    assert model.config._attn_implementation == "sdpa"
    before = snapshot(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # rotary inv_freq (not saved)
    result = estimate_llc(model, tokens(), batch_loss=hf_loss, **FAST)
    assert_finite(result)
    assert result.settings["num_sampled_params"] == num_params(model)
    attn = estimate_llc(model, tokens(), batch_loss=hf_loss, weights=["model.layers.0.self_attn.*"],
                        step_size=1e-4, **FAST)
    assert_finite(attn)
    projections = model.model.layers[0].self_attn
    assert attn.settings["num_sampled_params"] == num_params(projections) > 0
    assert_unchanged(model, before)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


# -- TransformerLens -------------------------------------------------------------------------------
def test_hooked_transformer_attention_only():
    pytest.importorskip("transformer_lens")
    model = hooked_transformer()
    assert model.cfg.attn_only
    before = snapshot(model)
    result = estimate_llc(model, tokens(), batch_loss=hooked_loss, **FAST)
    assert_finite(result)
    assert result.settings["num_sampled_params"] == num_params(model)
    # The per-layer λ̂ of the papers: only the attention weights move.
    attn = estimate_llc(model, tokens(), batch_loss=hooked_loss, weights=["blocks.0.attn.*"],
                        step_size=1e-4, **FAST)
    assert_finite(attn)
    assert attn.settings["num_sampled_params"] == num_params(model.blocks[0].attn)
    assert_unchanged(model, before)


# -- CNN with BatchNorm and Dropout ----------------------------------------------------------------
def test_cnn_batchnorm_statistics_and_modes_are_restored_and_dropout_is_off():
    x, y = image_data()
    torch.manual_seed(0)
    model = CNN(dropout=0.5)
    with torch.no_grad():
        for i in range(0, 64, 16):  # running statistics away from their initial values
            model(x[i : i + 16])
    model.train()
    model.head.eval()  # a mixed state must come back as it was, not as all-train
    modes = {name: m.training for name, m in model.named_modules()}
    before = snapshot(model)
    assert before["bn.num_batches_tracked"].item() == 4
    result = estimate_llc(model, (x, y), F.cross_entropy, **FAST)
    assert_finite(result)
    assert_unchanged(model, before)  # running_mean, running_var, num_batches_tracked
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    # Sampling runs the model in eval mode: Dropout is the identity and BatchNorm uses its
    # running statistics, so the same weights without the Dropout layer give the same chains.
    plain = CNN(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    reference = estimate_llc(plain, (x, y), F.cross_entropy, **FAST)
    np.testing.assert_array_equal(result.llc_per_chain, reference.llc_per_chain)


# -- GRU / LSTM ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_networks_are_vectorized_and_match_the_sequential_path(cell):
    x, y = sequence_data()
    torch.manual_seed(0)
    model = Recurrent(cell)
    kwargs = dict(FAST, step_size=1e-3)
    vectorized = estimate_llc(model, (x, y), F.mse_loss, **kwargs)
    sequential = estimate_llc(model, (x, y), F.mse_loss, vectorize=False, **kwargs)
    assert_finite(vectorized)
    assert vectorized.settings["vectorize"] is True  # vmap batched it: no fallback needed
    np.testing.assert_allclose(vectorized.loss_trace, sequential.loss_trace, rtol=1e-5)
    np.testing.assert_allclose(vectorized.llc_per_chain, sequential.llc_per_chain, rtol=1e-3,
                               atol=1e-4)


# -- what vmap cannot batch ------------------------------------------------------------------------
def test_a_model_vmap_cannot_batch_falls_back_to_sequential_chains_and_says_so_once():
    x, y = regression_data()
    torch.manual_seed(0)
    model = EarlyExit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = estimate_llc(model, (x, y), F.mse_loss, step_size=1e-3, **FAST)
    said = [w for w in caught if "vmap" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert sum("vmap" in w for w in result.warnings) == 1
    assert result.settings["vectorize"] is False
    sequential = estimate_llc(model, (x, y), F.mse_loss, step_size=1e-3, vectorize=False, **FAST)
    np.testing.assert_array_equal(result.llc_per_chain, sequential.llc_per_chain)
    assert_finite(result)


# -- torch.compile ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_module_gives_the_eager_modules_estimate():
    """torch.func cannot enter a compiled region called from eager code (PyTorch #128711), so
    the chains' gradients run the original module eagerly: the same chains as uncompiled. The
    compiled graph still runs the gradient-free forwards (the loss check, the baseline at w*),
    which inductor may round differently in the last bits: hence a tolerance, not equality."""
    x, y = regression_data()
    eager = mlp()
    compiled = torch.compile(mlp())
    assert [n for n, _ in compiled.named_parameters()][0].startswith("_orig_mod.")
    reference = estimate_llc(eager, (x, y), F.mse_loss, step_size=1e-3, **FAST)
    result = estimate_llc(compiled, (x, y), F.mse_loss, step_size=1e-3, **FAST)
    assert_finite(result)
    assert result.settings["num_sampled_params"] == num_params(eager)
    np.testing.assert_allclose(result.llc_per_chain, reference.llc_per_chain, rtol=1e-5)


# -- frozen parameters -----------------------------------------------------------------------------
def test_only_trainable_parameters_are_sampled_and_frozen_ones_stay_frozen():
    x, y = regression_data()
    model = frozen_mlp()
    before = snapshot(model)
    result = estimate_llc(model, (x, y), F.mse_loss, step_size=1e-3, **FAST)
    assert_finite(result)
    assert result.settings["num_sampled_params"] == num_params(model[2]) == 9
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    assert_unchanged(model, before)
    # Known truth: the same as the unfrozen network with weights= naming the trainable layer.
    refined = estimate_llc(mlp(), (x, y), F.mse_loss, step_size=1e-3, weights=["2.*"], **FAST)
    np.testing.assert_array_equal(result.llc_per_chain, refined.llc_per_chain)


# -- torch.nn.utils.parametrize --------------------------------------------------------------------
def test_parametrized_weight_moves_through_its_original():
    """The sampled tensor is the parametrization's ``original``; moving it moves the weight the
    model uses. Known truth: under the identity parametrization, sampling ``original`` is
    sampling the weight itself, so the chains equal a plain network's."""
    from torch.nn.utils import parametrize

    x, y = regression_data()
    plain = mlp()
    wrapped = mlp()
    parametrize.register_parametrization(wrapped[0], "weight", Same())
    assert "0.parametrizations.weight.original" in dict(wrapped.named_parameters())
    kwargs = dict(FAST, step_size=1e-3)
    ref = estimate_llc(plain, (x, y), F.mse_loss, weights=["0.weight"], **kwargs)
    via = estimate_llc(wrapped, (x, y), F.mse_loss,
                       weights=["0.parametrizations.weight.original"], **kwargs)
    assert via.settings["num_sampled_params"] == 32
    np.testing.assert_array_equal(via.llc_per_chain, ref.llc_per_chain)
    assert np.ptp(via.loss_trace) > 0  # the loss moved: the original reached the forward

    model = symmetric_mlp()
    before = snapshot(model)
    result = estimate_llc(model, (x, y), F.mse_loss, step_size=1e-3, **FAST)
    assert_finite(result)
    assert result.settings["num_sampled_params"] == num_params(model) == 16 + 4 + 4 + 1
    assert_unchanged(model, before)
    w = model[0].weight
    assert torch.equal(w, w.T) and parametrize.is_parametrized(model[0], "weight")


# -- the same models inside unchanged LightningModules ---------------------------------------------
# The callback takes the loss from training_step. Known truth: its estimate at step 0 (before
# any training) is estimate_llc's on the wrapped model with the same loss, data and seed. A
# callback that sampled other tensors (a tied one twice, frozen ones), used another loss or
# other minibatches, or left the module in train mode would give other chains.
def fit_with_callback(tmp_path: Path, module: pl.LightningModule, dataset: Dataset,
                      max_steps: int = 2) -> pd.DataFrame:
    """Train ``max_steps`` steps with an LLCCallback every 2 steps (and at step 0); return the
    λ̂ table."""
    # step_size="auto": chosen at each checkpoint as a direct estimate_llc call chooses it, so
    # step 0 can be compared with one (unset, the run's one step comes from a later checkpoint:
    # tests/test_run_calibration.py).
    callback = LLCCallback(tmp_path / "llc", every_n_train_steps=2, batch_size=16,
                           step_size="auto", progress=False, **FAST)
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, default_root_dir=tmp_path,
                         callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*the trainer has no logger.*")
        trainer.fit(module, DataLoader(dataset, batch_size=16, shuffle=True))
    table = load_run(tmp_path / "llc").llc
    assert table["step"].tolist() == list(range(0, max_steps + 1, 2))
    assert (table["status"] == "ok").all(), table[["step", "status", "reason"]]
    assert np.isfinite(table["llc_mean"].to_numpy(float)).all()
    return table


def assert_step0_matches(table: pd.DataFrame, reference: LLCResult) -> None:
    row = table.set_index("step").loc[0]
    np.testing.assert_allclose(row["llc_mean"], reference.llc_mean, rtol=1e-9)
    np.testing.assert_allclose(row["step_size"], reference.settings["step_size"], rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_causal_lm_in_an_unchanged_lightning_module(tmp_path, arch):
    pytest.importorskip("transformers")
    pl.seed_everything(0, verbose=False)
    module = CausalLMModule(arch)
    reference = estimate_llc(module.model, TokenDataset(), batch_loss=hf_loss, batch_size=16,
                             **FAST)
    table = fit_with_callback(tmp_path, module, TokenDataset())
    assert_step0_matches(table, reference)


@pytest.mark.slow
def test_hooked_transformer_in_an_unchanged_lightning_module(tmp_path):
    pytest.importorskip("transformer_lens")
    pl.seed_everything(0, verbose=False)
    module = HookedLMModule()
    reference = estimate_llc(module.model, TokenDataset(), batch_loss=hooked_loss,
                             batch_size=16, **FAST)
    table = fit_with_callback(tmp_path, module, TokenDataset())
    assert_step0_matches(table, reference)


@pytest.mark.parametrize("kind", [
    "cnn", "gru", "lstm", "frozen", "parametrized",
    pytest.param("early_exit", marks=pytest.mark.filterwarnings(
        "ignore:torch.func.vmap cannot batch:UserWarning")),  # said, and tested, above
    pytest.param("compiled", marks=pytest.mark.slow),
])
def test_small_models_in_an_unchanged_lightning_module(tmp_path, kind):
    pl.seed_everything(0, verbose=False)
    module = SupervisedModule(kind)
    reference = estimate_llc(module.model, module.dataset(), batch_size=16,
                             batch_loss=functools.partial(supervised_loss, kind), **FAST)
    table = fit_with_callback(tmp_path, module, module.dataset())
    assert_step0_matches(table, reference)
