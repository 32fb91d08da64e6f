"""Per-head behaviour scores of the induction language model, against exact values."""

from __future__ import annotations

import math

import torch

from devinterp.components import attention_heads
from experiments.induction_lm import InductionLM, attention_patterns, head_scores


def small() -> InductionLM:
    torch.manual_seed(0)
    return InductionLM(vocab_size=16, seq_len=32, copy_len=4, num_copies=2, width=16,
                       num_heads=2, num_samples=64, num_val_samples=16)


def test_patterns_reproduce_each_attention_layer_output():
    """Patterns @ values through the output projection is what the layer computed."""
    model = small().eval()
    tokens = torch.randint(16, (3, 32))
    seen = []
    attn = model.transformer.blocks[1].attn
    hook = attn.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    patterns = attention_patterns(model, tokens)
    hook.remove()
    model(tokens)
    x, out = seen[-1]
    b, s, w = x.shape
    v = attn.qkv(x).split(w, dim=-1)[2].view(b, s, 2, -1).transpose(1, 2)
    mixed = (patterns[1] @ v).transpose(1, 2).reshape(b, s, w)
    torch.testing.assert_close(attn.out(mixed), out)
    assert all(torch.allclose(p.sum(-1), torch.ones(())) for p in patterns)


def test_uniform_attention_gives_the_exact_scores_and_heads_are_named_as_components():
    """With zero query/key weights every head attends uniformly over the t + 1 visible
    positions: previous-token score = mean 1/(t + 1) over t ≥ 1, induction score = mean
    1/(t + 1) over the repeat."""
    model = small()
    with torch.no_grad():
        for block in model.transformer.blocks:
            block.attn.qkv.weight[: 2 * 16].zero_()
            block.attn.qkv.bias[: 2 * 16].zero_()
    scores = head_scores(model, half=10)
    assert list(scores) == list(attention_heads(model))
    prev = sum(1 / (t + 1) for t in range(1, 32)) / 31
    ind = sum(1 / (t + 1) for t in range(10, 20)) / 10
    for s in scores.values():
        assert math.isclose(s["previous_token"], prev, rel_tol=1e-5)
        assert math.isclose(s["induction"], ind, rel_tol=1e-5)


def test_the_default_repeat_distance_is_inside_the_trained_copy_distances():
    """Copies sit copy_len to 2 × copy_len tokens after their source; the default block
    length is 1.5 × copy_len (6 for copy_len 4)."""
    model = small()
    assert head_scores(model) == head_scores(model, half=6)
    assert head_scores(model) != head_scores(model, half=10)
