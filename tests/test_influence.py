"""Per-sample observables of the SGLD draws and the Bayesian influence function.

Known truth: for a linear regression with ½·squared-error loss, the localized tempered
posterior is Gaussian, so the posterior covariance of per-sample losses is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from devinterp import estimate_bif, estimate_llc
from devinterp.llc.observables import ProbeLosses


def half_se(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((o - t) ** 2).sum(-1).mean()


def regression(seed: int, n: int = 40, d: int = 3, noise: float = 0.7):
    """A float64 linear model at its exact least-squares fit w*, and its data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    y = x @ w_true + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    w_star = torch.linalg.lstsq(x, y).solution
    with torch.no_grad():
        model.weight.copy_(w_star.T)
    return model, x, y, w_star


def exact_terms(x, y, w_star, nbeta: float, gamma: float, eps: float):
    """The two terms of Cov(ℓ_i, ℓ_j) = ½·C_ij² + m_i·m_j·C_ij under plain SGLD's stationary
    law: Gaussian with mean w* and covariance (Λ(I − εΛ/4))⁻¹, Λ = nβ·XᵀX/n + γI (the
    ε → 0 limit is the posterior itself; the factor removes the step's known O(ε) bias so the
    comparison below is limited by Monte-Carlo error only)."""
    n, d = x.shape
    lam = nbeta * x.T @ x / n + gamma * torch.eye(d, dtype=x.dtype)
    ev, u = torch.linalg.eigh(lam)
    sigma = u @ torch.diag(1 / (ev * (1 - eps * ev / 4))) @ u.T
    c = x @ sigma @ x.T
    m = (y - x @ w_star).squeeze(1)
    return (0.5 * c**2).numpy(), (m[:, None] * m[None, :] * c).numpy()


GAUSSIAN = dict(sampler="sgld", step_size=0.05, nbeta=2.0, localization=1.0, num_burnin=100)


def test_probe_loss_covariance_is_the_exact_gaussian_posterior_covariance():
    """Each chain's covariance matrix is fitted as α·(½C²) + β·(m mᵀ∘C): both coefficients
    must be 1 within 4 standard errors of their mean over independent chains, and those
    errors must be small enough that a wrong sign, a missing term or a factor of 2 fails."""
    model, x, y, w_star = regression(0)
    chains = 16
    rec = ProbeLosses((x, y), chains)
    estimate_llc(model, (x, y), half_se, batch_size=len(x), num_chains=chains,
                 num_draws=800, recorders=[rec], seed=0, **GAUSSIAN)
    sq, mm = exact_terms(x, y, w_star, 2.0, 1.0, 0.05)
    _, _, per_chain = rec.moments.per_chain()
    design = np.stack([sq.ravel(), mm.ravel()], axis=1)
    coef = np.array([np.linalg.lstsq(design, c.ravel(), rcond=None)[0]
                     for c in per_chain.numpy()])
    mean, se = coef.mean(0), coef.std(0, ddof=1) / np.sqrt(chains)
    assert np.all(se < 0.1), se
    assert np.all(np.abs(mean - 1) < 4 * se), (mean, se)
    pooled, _ = rec.covariance()
    truth = sq + mm
    assert np.linalg.norm(pooled - truth) / np.linalg.norm(truth) < 0.2
    # The diagonal is the variance of each loss: ½C_ii² + m_i²·C_ii.
    assert np.corrcoef(np.diag(pooled), np.diag(truth))[0, 1] > 0.9


def test_estimate_bif_is_the_probe_covariance_of_the_llc_draws():
    """Same options, same draws: .llc is the λ̂ estimate and .influence the recorder's
    covariance of train × query (here the first 10 samples × the last 5)."""
    model, x, y, _ = regression(1)
    opts = dict(batch_size=len(x), num_chains=3, num_draws=80, seed=3, **GAUSSIAN)
    r = estimate_bif(model, (x, y), half_se, train=(x[:10], y[:10]), query=(x[-5:], y[-5:]),
                     **opts)
    rec = ProbeLosses((x, y), 3, rows=range(10), cols=range(35, 40))
    plain = estimate_llc(model, (x, y), half_se, recorders=[rec], **opts)
    assert r.influence.shape == r.influence_se.shape == (10, 5)
    np.testing.assert_allclose(r.influence, rec.covariance()[0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(r.llc.llc_per_chain, plain.llc_per_chain)
    assert r.train_indices is None and r.kind == "covariance"
    np.testing.assert_allclose(r.train_loss, rec.mean(), rtol=1e-10)


def test_online_moments_equal_the_covariance_of_the_kept_trace():
    """Running moments, merged over blocks of draws, chunks of chains and chunks of probes,
    give exactly the sample covariance (and correlation) of all draws pooled."""
    model, x, y, _ = regression(2)
    rec = ProbeLosses((x, y), 5, rows=[0, 3, 7, 11], cols=range(20, 40), chunk_size=7,
                      keep_trace=True)
    estimate_llc(model, (x, y), half_se, batch_size=16, num_chains=5, num_draws=71,
                 chain_chunk_size=2, recorders=[rec], seed=1, **{
                     k: v for k, v in GAUSSIAN.items() if k != "num_burnin"})
    trace = rec.trace()
    assert trace.shape == (5, 71, 40)
    flat = trace.reshape(-1, 40).astype(np.float64)
    full = np.cov(flat, rowvar=False)
    cov, se = rec.covariance()
    np.testing.assert_allclose(cov, full[np.ix_([0, 3, 7, 11], range(20, 40))], rtol=1e-5,
                               atol=1e-9)
    assert np.all(np.isfinite(se)) and np.all(se >= 0)
    corr, _ = rec.covariance(kind="correlation")
    full_corr = np.corrcoef(flat, rowvar=False)
    np.testing.assert_allclose(corr, full_corr[np.ix_([0, 3, 7, 11], range(20, 40))],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rec.mean(), flat[:, [0, 3, 7, 11]].mean(0), rtol=1e-5)


def test_per_sample_losses_are_the_llc_loss_per_sample():
    """With the whole data as probes and full batches, the probes' mean loss at each draw is
    the minibatch loss λ̂ was computed from."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
    rec = ProbeLosses((x, y), 2, keep_trace=True, chunk_size=10)
    r = estimate_llc(model, (x, y), half_se, batch_size=32, num_chains=2, num_draws=20,
                     num_burnin=5, step_size=1e-3, recorders=[rec])
    np.testing.assert_allclose(rec.trace().mean(-1), r.loss_trace, rtol=1e-5)
    assert rec.notes == []


def test_per_chain_and_vmapped_probe_forwards_give_the_same_losses():
    """On CPUs a few chains' probe forwards loop over the chains and many chains' are one
    vmapped pass: the chains both runs share (seeded by index) see the same probe losses."""
    model, x, y = classifier_data()
    traces = []
    for chains in (2, 8):
        rec = ProbeLosses((x, y), chains, keep_trace=True)
        estimate_llc(model, (x, y), nn.functional.cross_entropy, num_chains=chains,
                     num_draws=20, step_size=1e-3, seed=0, recorders=[rec])
        assert rec._batch_chains(chains, len(x)) == (chains == 8)
        traces.append(rec.trace()[:2])
    np.testing.assert_allclose(traces[0], traces[1], rtol=1e-5, atol=1e-7)


def test_unreduced_losses_are_used_only_where_they_are_the_per_sample_losses():
    """``loss_fn(..., reduction="none")`` replaces the per-sample vmap when it gives every
    probe's loss; a token mean with ignored targets does not (its unreduced mean over the
    sequence counts the ignored zeros), and is then applied one sample at a time."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, 3, generator=g), torch.randint(0, 4, (12, 5), generator=g)
    model = nn.Linear(3, 4)

    def token_ce(out: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        return nn.functional.cross_entropy(out.transpose(1, 2), t, **kw)

    def plain(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return token_ce(out, t)

    padded = y.clone()
    padded[9:, 3:] = -100  # only in the second chunk
    for targets, unreduced in ((y, True), (padded, False)):
        fast = ProbeLosses((x, targets), 2, keep_trace=True, chunk_size=8, loss_fn=token_ce)
        slow = ProbeLosses((x, targets), 2, keep_trace=True, chunk_size=8, loss_fn=plain)
        estimate_llc(model, (x, y), token_ce, batch_size=12, num_chains=2, num_draws=10,
                     step_size=1e-3, recorders=[fast, slow])
        assert fast._unreduced is unreduced and slow._unreduced is False
        np.testing.assert_allclose(fast.trace(), slow.trace(), rtol=1e-6)


def test_a_batch_loss_gives_the_same_per_sample_losses_as_loss_fn():
    model, x, y, _ = regression(3)
    opts = dict(batch_size=len(x), num_chains=2, num_draws=30, seed=0, **GAUSSIAN)
    a = estimate_bif(model, (x, y), half_se, train=(x, y), query=(x[:4], y[:4]), **opts)
    b = estimate_bif(model, (x, y), batch_loss=lambda f, b: half_se(f(b[0]), b[1]),
                     train=(x, y), query=(x[:4], y[:4]), **opts)
    np.testing.assert_allclose(a.influence, b.influence, rtol=1e-9)


def classifier_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    flip = torch.rand(64, generator=g) < 0.15
    y = ((x[:, 0] + 0.5 * x[:, 1] > 0) ^ flip).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_a_duplicated_training_sample_most_influences_its_copy():
    """Query samples that are copies of training samples. Correlation: each copy's most
    influential training sample is its original (correlation exactly 1). Covariance: a sample
    with a larger loss variance can covary more with a copy than its original does
    (|Cov(ℓ_i, ℓ_q)| ≤ sd_i·sd_q), so the guarantee is for the copy of the training sample
    whose loss varies most: its original comes first."""
    model, x, y = classifier_data()
    picks = [3, 17, 40]
    opts = dict(num_chains=4, num_draws=200, step_size=1e-3, seed=0)
    ce = nn.functional.cross_entropy
    corr = estimate_bif(model, (x, y), ce, train=(x, y), query=(x[picks].clone(),
                        y[picks].clone()), kind="correlation", **opts)
    assert list(corr.influence.argmax(axis=0)) == picks
    np.testing.assert_allclose(corr.influence[picks, range(3)], 1.0, rtol=1e-6)
    assert np.all(np.abs(corr.influence) <= 1 + 1e-9)
    variance = np.diag(estimate_bif(model, (x, y), ce, train=(x, y), query=(x, y),
                                    **opts).influence)
    top = int(variance.argmax())
    cov = estimate_bif(model, (x, y), ce, train=(x, y), query=(x[[top, *picks]].clone(),
                       y[[top, *picks]].clone()), **opts)
    assert int(cov.influence[:, 0].argmax()) == top
    # A copy's covariance with its original is the original's variance.
    np.testing.assert_allclose(cov.influence[[top, *picks], range(4)],
                               variance[[top, *picks]], rtol=1e-6)


def test_influence_is_symmetric_when_train_is_query():
    model, x, y = classifier_data()
    opts = dict(num_chains=2, num_draws=50, step_size=1e-3, seed=0)
    same = estimate_bif(model, (x, y), nn.functional.cross_entropy, train=(x[:20], y[:20]),
                        query=(x[:20].clone(), y[:20].clone()), **opts)
    np.testing.assert_allclose(same.influence, same.influence.T, rtol=1e-9, atol=1e-12)
    probes = (x[:20], y[:20])
    one = estimate_bif(model, (x, y), nn.functional.cross_entropy, train=probes,
                       query=probes, **opts)
    np.testing.assert_allclose(one.influence, one.influence.T, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(one.influence, same.influence, rtol=1e-9, atol=1e-12)
    assert np.all(np.diag(one.influence) > 0)


def test_default_train_set_is_a_stated_subsample_of_the_data():
    model, x, y = classifier_data()
    opts = dict(num_chains=2, num_draws=30, step_size=1e-3, seed=5)
    r = estimate_bif(model, (x, y), nn.functional.cross_entropy, query=(x[:3], y[:3]),
                     num_train=10, **opts)
    assert r.influence.shape == (10, 3) and len(r.train_indices) == 10
    assert len(set(r.train_indices.tolist())) == 10
    idx = torch.as_tensor(r.train_indices)
    direct = estimate_bif(model, (x, y), nn.functional.cross_entropy, train=(x[idx], y[idx]),
                          query=(x[:3], y[:3]), **opts)
    np.testing.assert_allclose(r.influence, direct.influence, rtol=1e-9)
    frame = r.to_frame()
    assert list(frame.columns) == ["train", "query", "train_index", "influence", "se"]
    assert len(frame) == 30
    row = frame[(frame["train"] == 4) & (frame["query"] == 2)].iloc[0]
    assert row["influence"] == r.influence[4, 2] and row["train_index"] == r.train_indices[4]
    top = r.top(1, k=3)
    assert list(top["influence"]) == sorted(r.influence[:, 1], reverse=True)[:3]
    # Drawn from a Dataset or a DataLoader alike: the same samples.
    for data in (TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=16)):
        other = estimate_bif(model, data, nn.functional.cross_entropy, query=(x[:3], y[:3]),
                             num_train=10, **opts)
        np.testing.assert_array_equal(other.train_indices, r.train_indices)


def test_probes_from_a_dataset_or_a_dataloader_match_tensors():
    model, x, y = classifier_data()
    opts = dict(num_chains=2, num_draws=30, step_size=1e-3, seed=0)
    ref = estimate_bif(model, (x, y), nn.functional.cross_entropy, train=(x[:9], y[:9]),
                       query=(x[9:12], y[9:12]), **opts)
    for train, query in (
            (TensorDataset(x[:9], y[:9]), TensorDataset(x[9:12], y[9:12])),
            (DataLoader(TensorDataset(x[:9], y[:9]), batch_size=4, shuffle=True),
             DataLoader(TensorDataset(x[9:12], y[9:12]), batch_size=2))):
        got = estimate_bif(model, (x, y), nn.functional.cross_entropy, train=train,
                           query=query, probe_chunk_size=4, **opts)
        np.testing.assert_allclose(got.influence, ref.influence, rtol=1e-5, atol=1e-9)


class Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def test_bad_input_is_named_with_the_fix():
    model, x, y = classifier_data()
    ce = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="kind must be"):
        estimate_bif(model, (x, y), ce, query=(x, y), kind="cov")
    with pytest.raises(TypeError, match="unknown options.*num_drawz"):
        estimate_bif(model, (x, y), ce, query=(x, y), num_drawz=3)
    with pytest.raises(ValueError, match="same first dimension"):
        estimate_bif(model, (x, y), ce, query=(x, y[:3]))
    with pytest.raises(ValueError, match="probes are empty"):
        estimate_bif(model, (x, y), ce, query=(x[:0], y[:0]))
    with pytest.raises(ValueError, match="IterableDataset; pass train="):
        estimate_bif(model, Stream(x, y), ce, query=(x, y), num_samples=64)
    with pytest.raises(ValueError, match="num_train must be"):
        estimate_bif(model, (x, y), ce, query=(x, y), num_train=0)
    with pytest.raises(ValueError, match="rows must be"):
        ProbeLosses((x, y), 2, rows=[64])
    with pytest.raises(ValueError, match="keep_trace=True"):
        ProbeLosses((x, y), 2).trace()
    with pytest.raises(ValueError, match="reduce must be a .probes, observables. matrix"):
        ProbeLosses((x, y), 2, reduce=torch.ones(63, 2))
    with pytest.raises(ValueError, match="either query=.*or rows=/cols="):
        ProbeLosses((x, y), 2, query=(x, y), rows=[0])
    with pytest.raises(TypeError, match="probes must be a Dataset"):
        ProbeLosses(x, 2)
