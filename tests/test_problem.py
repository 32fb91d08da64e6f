"""Problem.loss substitutes the sampled weights where at_weights would (tied aliases, a
module registered twice, buffers) and puts the model's own tensors back, even on an error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from devinterp.llc.data import TensorBatches
from devinterp.llc.problem import Problem


class Shared(nn.Module):
    """An embedding tied to the output head, a layer registered under two names, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 3, bias=False)
        self.head = nn.Linear(4, 3, bias=False)
        self.emb.weight = self.head.weight  # tied: one tensor, two names
        self.mid = nn.Linear(3, 3)
        self.mid_again = self.mid  # the same module, registered twice
        self.register_buffer("shift", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.emb.weight.T + self.shift)
        return self.mid_again(self.mid(h)) @ self.head.weight


def problem(model: nn.Module, names: list[str]) -> Problem:
    named = dict(model.named_parameters())
    anchor = {k: named[k].detach().clone() for k in names}
    consts = {k: v.detach() for k, v in named.items() if k not in names}
    consts.update({k: v.detach() for k, v in model.named_buffers()})
    x = torch.randn(8, 4)
    source = TensorBatches(x, torch.randn(8, 4), 8, torch.device("cpu"))
    return Problem(model, anchor, consts, nn.functional.mse_loss, None, source,
                   torch.device("cpu"))


def test_loss_substitutes_every_use_as_functional_call_does_and_restores_the_model() -> None:
    torch.manual_seed(0)
    model = Shared()
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    prob = problem(model, ["emb.weight", "mid.weight"])
    moved = {k: v + 0.1 * torch.randn_like(v) for k, v in prob.anchor.items()}
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    twin = copy.deepcopy(model)  # functional_call does not restore a module registered twice
    for _ in range(2):  # the second call reuses what the first worked out
        got = prob.loss(moved, (x, y))
        want = nn.functional.mse_loss(
            functional_call(twin, {**prob.consts, **moved}, (x,), tie_weights=True), y)
        assert torch.equal(got, want)
    assert not torch.equal(got, prob.loss(prob.anchor, (x, y)))
    after = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


def test_model_tensors_come_back_when_the_loss_raises() -> None:
    model = Shared()
    before = dict(model.named_parameters(remove_duplicate=False))
    prob = problem(model, ["mid.weight"])

    def failing(forward, batch):
        raise RuntimeError("boom")

    prob.batch_loss = failing
    with pytest.raises(RuntimeError, match="boom"):
        prob.loss(prob.anchor, (torch.randn(2, 4), torch.randn(2, 4)))
    assert all(p is before[n] for n, p in model.named_parameters(remove_duplicate=False))


def test_two_values_for_one_tied_tensor_are_rejected_as_at_weights_rejects_them() -> None:
    model = Shared()
    prob = problem(model, ["emb.weight"])
    w = prob.anchor["emb.weight"]
    with pytest.raises(ValueError, match="tied"):
        prob.loss({"head.weight": w, "emb.weight": w + 1}, (torch.randn(2, 4), torch.randn(2, 4)))
