"""The sampler kernels on their own: small properties of each ``init``/``step`` pair."""

from __future__ import annotations

import math

import pytest
import torch

from devinterp.config import SAMPLER_NAMES, SamplerConfig
from devinterp.samplers import KERNELS, get_kernel
from devinterp.samplers.langevin import drift, mala_log_accept, move, sq_distance

NAMES = sorted(KERNELS)


def test_the_registry_and_the_config_name_the_same_samplers():
    assert tuple(KERNELS) == SAMPLER_NAMES
    assert SamplerConfig().sampler in KERNELS
    with pytest.raises(ValueError, match="sampler must be one of"):
        get_kernel("hmc")


def gaussian_chain(name: str, *, a: float, nbeta: float, gamma: float, eps: float,
                   steps: int, chains: int = 2000, burnin: int = 200) -> torch.Tensor:
    """Positions of ``chains`` 1-d chains on U(w) = nβ·a·w²/2 + γ·w²/2 after burn-in."""
    kernel = get_kernel(name)
    g = torch.Generator().manual_seed(0)
    anchor = {"w": torch.zeros(chains, 1, dtype=torch.float64)}
    state = kernel.init(anchor, localization=gamma)
    out = []
    for t in range(steps):
        w = state.position["w"]
        noise = {"w": torch.randn(w.shape, generator=g, dtype=w.dtype)}
        state, _ = kernel.step(state, {"w": a * w}, noise, anchor=anchor, step_size=eps,
                               nbeta=nbeta, localization=gamma, adapt=t < burnin)
        if t >= burnin:
            out.append(state.position["w"].clone())
    return torch.stack(out)  # (step, chain, 1)


@pytest.mark.parametrize("name", NAMES)
def test_stationary_variance_is_the_posterior_variance(name):
    """With a small step the chains' variance is 1/(nβ·a + γ), the Gaussian posterior's.
    (RMSProp adapts G from each chain's own drift during burn-in, which spreads the chains;
    with G frozen they relax back in ~1/(ε·G·a) steps, so only the last draws are compared.)"""
    a, nbeta, gamma = 2.0, 10.0, 1.0
    draws = gaussian_chain(name, a=a, nbeta=nbeta, gamma=gamma, eps=2e-3, steps=2400)[-1000:]
    exact = 1 / (nbeta * a + gamma)
    assert draws.var().item() == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("name", NAMES)
def test_mala_acceptance_tends_to_one_as_the_step_shrinks(name):
    kernel = get_kernel(name)
    a, nbeta, gamma = 3.0, 10.0, 1.0
    anchor = {"w": torch.zeros(256, 3, dtype=torch.float64)}
    start = {"w": torch.randn(256, 3, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64) / math.sqrt(nbeta * a)}

    def potential(w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (nbeta * a + gamma) * (w**2).sum(1)

    mean_acceptance = []
    for eps in (1e-1, 1e-2, 1e-3):
        state = kernel.init(anchor, localization=gamma)
        state = type(state)(**{**state.__dict__, "position": start})
        noise = {"w": torch.randn(256, 3, generator=torch.Generator().manual_seed(2),
                                  dtype=torch.float64)}
        new, info = kernel.step(state, {"w": a * start["w"]}, noise, anchor=anchor,
                                step_size=eps, nbeta=nbeta, localization=gamma, adapt=True)
        w, w2 = start["w"], new.position["w"]
        drift_new = {"w": (nbeta * a + gamma) * w2}
        log_a = mala_log_accept(start, new.position, potential(w), potential(w2),
                                info["drift"], drift_new, eps, info["root"])
        mean_acceptance.append(torch.exp(torch.clamp(log_a, max=0)).mean().item())
    assert mean_acceptance == sorted(mean_acceptance)
    assert mean_acceptance[-1] > 0.99


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_no_noise_no_localization_leaves_the_position(name):
    kernel = get_kernel(name)
    pos = {"a": torch.randn(3, 4), "b": torch.randn(3)}
    anchor = {k: torch.zeros_like(v) for k, v in pos.items()}
    state = kernel.init(pos, localization=0.0)
    zeros = {k: torch.zeros_like(v) for k, v in pos.items()}
    new, _ = kernel.step(state, zeros, zeros, anchor=anchor, step_size=0.1, nbeta=5.0,
                         localization=0.0, adapt=True)
    for k in pos:
        torch.testing.assert_close(new.position[k], pos[k])


@pytest.mark.parametrize("name", NAMES)
def test_a_step_keeps_the_structure_of_the_position(name):
    kernel = get_kernel(name)
    pos = {"scalar": torch.tensor([[0.5], [0.2]]).squeeze(1), "matrix": torch.randn(2, 3, 5),
           "half": torch.randn(2, 4, dtype=torch.float64)}
    state = kernel.init(pos, localization=1.0)
    grads = {k: torch.randn_like(v) for k, v in pos.items()}
    noise = {k: torch.randn_like(v) for k, v in pos.items()}
    new, info = kernel.step(state, grads, noise, anchor=pos, step_size=1e-3, nbeta=10.0,
                            localization=1.0, adapt=True)
    assert new.position.keys() == pos.keys()
    for k, v in pos.items():
        assert new.position[k].shape == v.shape and new.position[k].dtype == v.dtype
        assert info["drift"][k].shape == v.shape
    assert sq_distance(new.position, pos).shape == (2,)  # per chain, 0-d parameters too


def test_rmsprop_preconditioner_is_frozen_after_burn_in():
    kernel = get_kernel("rmsprop_sgld")
    pos = {"w": torch.zeros(4, 3)}
    state = kernel.init(pos, localization=1.0)
    g = torch.Generator().manual_seed(0)
    for t in range(5):
        grads = {"w": torch.randn(4, 3, generator=g)}
        state, info = kernel.step(state, grads, {"w": torch.zeros(4, 3)}, anchor=pos,
                                  step_size=1e-2, nbeta=10.0, localization=1.0, adapt=t < 3)
        if t == 2:
            frozen = info["root"]["w"].clone()
    torch.testing.assert_close(info["root"]["w"], frozen)
    assert (frozen <= 1.0).all()  # √G ≤ G ≤ 1/δ = 1 with δ = √γ = 1
    assert state.average is None  # V is dropped once adaptation ends


@pytest.mark.parametrize("with_root", [False, True])
@pytest.mark.parametrize("per_chain_eps", [False, True])
def test_the_in_place_step_and_mala_ratio_are_the_textbook_formulas(with_root, per_chain_eps):
    """``move`` and ``mala_log_accept`` compute into their own buffers; the numbers are those
    of the formulas written out with temporaries, and ``drift(out=grad)`` is ``drift``."""
    g = torch.Generator().manual_seed(3)
    pos, new_pos, anchor, grad, xi, root = (
        {"a": torch.randn(3, 4, 5, generator=g), "b": torch.randn(3, generator=g)}
        for _ in range(6))
    root = {k: v.abs() + 0.1 for k, v in root.items()} if with_root else None
    eps = torch.tensor([1e-3, 2e-3, 5e-4], dtype=torch.float64) if per_chain_eps else 1e-3
    d = drift(pos, grad, anchor, 10.0, 1.0)
    copy = {k: v.clone() for k, v in grad.items()}
    d_out = drift(pos, copy, anchor, 10.0, 1.0, out=copy)
    for k in pos:
        assert d_out[k].data_ptr() == copy[k].data_ptr()
        torch.testing.assert_close(d_out[k], d[k], rtol=0, atol=0)
    new = move(pos, d, xi, eps, root)
    fwd = bwd = 0.0
    for k, w in pos.items():
        e = eps.float().view(-1, *([1] * (w.dim() - 1))) if per_chain_eps else eps
        G = 1.0 if root is None else root[k] ** 2
        want = w - 0.5 * e * G * d[k] + (e * G) ** 0.5 * xi[k]
        torch.testing.assert_close(new[k], want, rtol=1e-6, atol=1e-7)
        var = e * G
        fwd = fwd + ((new_pos[k] - w + 0.5 * var * d[k]) ** 2 / var).reshape(3, -1).sum(1)
        bwd = bwd + ((w - new_pos[k] + 0.5 * var * grad[k]) ** 2 / var).reshape(3, -1).sum(1)
    u, u_new = torch.zeros(3), torch.ones(3)
    got = mala_log_accept(pos, new_pos, u, u_new, d, grad, eps, root)
    torch.testing.assert_close(got, (u - u_new) + 0.5 * (fwd - bwd), rtol=1e-5, atol=1e-3)
