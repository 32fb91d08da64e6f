"""``devinterp.components``: head masks for every attention layout, checked against what an
attention layer computes (its output is the sum of its heads' outputs plus a shared bias)."""

from __future__ import annotations

import pytest
import torch
import zoo_models
from torch import Tensor, nn

from devinterp.components import (
    attention_heads,
    layers,
    mlps,
    preview,
    resolve_components,
)
from experiments.transformer import Transformer


def experiment_transformer() -> nn.Module:
    torch.manual_seed(0)
    return Transformer(16, 2, 4, 8)


def multihead() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)


# (model builder, input builder, name of the first attention module)
LAYOUTS = {
    "fused_linear": (experiment_transformer, lambda: torch.randn(2, 8, 16), "blocks.0.attn"),
    "multihead": (multihead, lambda: torch.randn(2, 5, 16), "self_attn"),
    "gpt2_conv1d": (zoo_models.gpt2, lambda: torch.randint(0, 64, (2, 6)), "transformer.h.0.attn"),
    "llama_gqa": (zoo_models.llama, lambda: torch.randint(0, 64, (2, 6)),
                  "model.layers.0.self_attn"),
    "transformer_lens": (zoo_models.hooked_transformer, lambda: torch.randint(0, 64, (2, 6)),
                         "blocks.0.attn"),
}


def attention_output(model: nn.Module, module: str, x: Tensor, keep: dict[str, Tensor]) -> Tensor:
    """The output of attention module ``module`` with every entry of its parameters outside
    ``keep`` set to 0 (the layer's input does not depend on them: it is the first layer)."""
    seen: list[Tensor] = []
    target = model.get_submodule(module)
    handle = target.register_forward_hook(
        lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    params = {}
    for name, p in model.named_parameters():
        if name.startswith(f"{module}."):
            p = p.detach() * keep.get(name, torch.zeros(p.shape, dtype=torch.bool))
        params[name] = p.detach()
    try:
        with torch.no_grad():
            torch.func.functional_call(model.eval(), params, (x,))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_heads_of_a_layer_add_up_to_the_layer(layout):
    """Keeping only head h's entries gives head h's contribution; the heads' contributions
    plus the output with only the entries of no head (the shared output bias) give the whole
    layer. A mask that mixed heads, or split q/k/v in the wrong place, breaks the sum."""
    build, inputs, module = LAYOUTS[layout]
    model, x = build(), inputs()
    heads = attention_heads(model)
    first = {k: v for k, v in heads.items() if k.startswith("L0H")}
    assert len(first) >= 2
    names = [n for n, _ in model.named_parameters() if n.startswith(f"{module}.")]
    everything = {n: torch.ones(model.get_parameter(n).shape, dtype=torch.bool) for n in names}
    covered = {n: torch.zeros_like(m) for n, m in everything.items()}
    for masks in first.values():
        for n, m in masks.items():
            covered[n] |= m
    rest = {n: ~m for n, m in covered.items()}
    full = attention_output(model, module, x, everything)
    parts = sum(attention_output(model, module, x, masks) for masks in first.values())
    torch.testing.assert_close(parts + attention_output(model, module, x, rest), full,
                               rtol=1e-4, atol=1e-5)
    # Keeping a head matters: no head's contribution is zero.
    for masks in first.values():
        assert attention_output(model, module, x, masks).abs().max() > 1e-4


@pytest.mark.parametrize("layout", ["fused_linear", "multihead", "gpt2_conv1d",
                                    "transformer_lens"])
def test_without_grouped_queries_the_heads_partition_the_projections(layout):
    """Every q/k/v entry and every output-projection weight belongs to exactly one head; the
    output bias to none."""
    build, _, module = LAYOUTS[layout]
    model = build()
    first = [m for k, m in attention_heads(model).items() if k.startswith("L0H")]
    counts: dict[str, Tensor] = {}
    for masks in first:
        for n, m in masks.items():
            counts[n] = counts.get(n, torch.zeros(m.shape, dtype=torch.long)) + m.long()
    assert all(int(c.max()) == 1 for c in counts.values()), {n: int(c.max())
                                                               for n, c in counts.items()}
    biases = {"fused_linear": "out.bias", "multihead": "out_proj.bias",
              "gpt2_conv1d": "c_proj.bias", "transformer_lens": "b_O"}
    for n, _ in model.named_parameters():
        if n.startswith(f"{module}."):
            if n.endswith(biases[layout]):
                assert n not in counts
            else:
                assert int(counts[n].min()) == 1, n


def test_grouped_query_heads_share_their_key_value_rows():
    model = zoo_models.llama()
    h0, h1 = attention_heads(model)["L0H0"], attention_heads(model)["L0H1"]
    k = "model.layers.0.self_attn.k_proj.weight"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(h0[k], h1[k]) and bool(h0[k].all())
    assert not bool((h0[q] & h1[q]).any()) and bool((h0[q] | h1[q]).all())


def test_heads_are_named_by_layer_and_head_across_layers():
    model = experiment_transformer()
    heads = attention_heads(model)
    assert list(heads) == [f"L{i}H{h}" for i in range(2) for h in range(4)]
    assert set(heads["L1H2"]) == {"blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias",
                                  "blocks.1.attn.out.weight"}
    # Head 2's query rows are 8..11 of 16 (width 16, 4 heads of 4), keys 24..27, values 40..43.
    rows = heads["L1H2"]["blocks.1.attn.qkv.weight"].any(1).nonzero().flatten().tolist()
    assert rows == [8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43]


def test_layers_and_mlps_name_whole_blocks():
    model = experiment_transformer()
    assert layers(model)["L1"] == [n for n, _ in model.named_parameters()
                                   if n.startswith("blocks.1.")]
    assert mlps(model) == {f"L{i}MLP": [f"blocks.{i}.mlp.{j}.{w}" for j in (0, 2)
                                        for w in ("weight", "bias")] for i in range(2)}
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    assert layers(plain) == {"L0": ["0.weight", "0.bias"], "L1": ["2.weight", "2.bias"]}
    with pytest.raises(ValueError, match="found no MLPs"):
        mlps(zoo_models.hooked_transformer())


def test_preview_shows_parameter_shape_and_entries():
    model = experiment_transformer()
    text = preview(model, {"L0H0": attention_heads(model)["L0H0"], "mlp": ["blocks.0.mlp.*"]})
    lines = text.splitlines()
    assert lines[0].split() == ["component", "parameter", "shape", "entries"]
    assert ["L0H0", "blocks.0.attn.qkv.weight", "48×16", "192", "of", "768"] in [
        line.split() for line in lines]
    assert lines[-1].split() == ["mlp", "(total)", str(16 * 64 + 64 + 64 * 16 + 16)]


def test_shorthands_and_tied_names_resolve_to_canonical_masks():
    model = zoo_models.gpt2()
    heads = resolve_components(model, "heads")
    assert list(heads) == ["L0H0", "L0H1"]
    # lm_head.weight is transformer.wte.weight: either name resolves to the canonical one.
    tied = resolve_components(model, {"head": {"lm_head.weight": torch.ones(64, 16).bool()}})
    assert list(tied["head"]) == ["transformer.wte.weight"]
