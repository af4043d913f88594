import logging

import numpy as np
import pytest
import torch

from dictlab.dictionaries import GaussianMixture, MixturePPCA, load_dictionary
from dictlab.errors import DictlabError


def blobs(k=5, d=8, per=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=g) * 4
    scale = torch.rand(k * per, 1, generator=g) + 0.5
    return mu.repeat_interleave(per, 0) + torch.randn(k * per, d, generator=g) * scale


def planted_ppca(n=3000, d=20, q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, d, q, generator=g) * 3
    mu = torch.randn(2, d, generator=g) * 10
    comp = torch.randint(0, 2, (n,), generator=g)
    x = mu[comp] + (w[comp] @ torch.randn(n, q, 1, generator=g)).squeeze(2) + 0.1 * torch.randn(n, d, generator=g)
    return x, w, mu


def test_diag_gmm_matches_scikit_learn_from_the_same_init():
    from sklearn.mixture import GaussianMixture as SkGMM

    x = blobs()
    init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:5]]
    ours = GaussianMixture(5, max_iter=40, tol=0, batch_size=300).fit(x, progress=False, init={"means": init})
    sk = SkGMM(5, covariance_type="diag", means_init=init.double().numpy(), weights_init=np.full(5, 0.2),
               precisions_init=np.ones((5, 8)), max_iter=40, tol=0, reg_covar=1e-6).fit(x.double().numpy())
    assert ours.score(x)[0] == pytest.approx(sk.score(x.double().numpy()), abs=1e-3)
    torch.testing.assert_close(ours.log_prob(x[:50]).double(),
                               torch.from_numpy(sk.score_samples(x[:50].double().numpy())),
                               atol=2e-3, rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: GaussianMixture(5, max_iter=30, tol=0),
                                  lambda: GaussianMixture(5, covariance="spherical", max_iter=30, tol=0),
                                  lambda: MixturePPCA(5, q=2, max_iter=30, tol=0)])
def test_em_log_likelihood_never_decreases(make):
    h = make().fit(blobs(), progress=False).log_likelihood_history_
    assert all(b >= a - 1e-6 for a, b in zip(h, h[1:])), h


def test_mppca_recovers_a_planted_low_rank_structure():
    x, w, mu = planted_ppca()
    m = MixturePPCA(2, q=2, max_iter=200, tol=1e-7).fit(x, progress=False)
    torch.testing.assert_close(m.sigma2_, torch.full((2,), 0.01), atol=2e-3, rtol=0)
    for k in range(2):
        j = int(torch.cdist(m.directions[k : k + 1], mu).argmin())
        q1, q2 = torch.linalg.qr(m.W_[k])[0], torch.linalg.qr(w[j])[0]
        assert torch.linalg.svdvals(q1.T @ q2).min() > 0.999  # same subspace: all principal angles ~0
    # the model's samples lie on the planted planes, off them only by the noise: (d − q)·σ² = 0.18
    s = m.sample(2000)
    off = []
    for j in range(2):
        basis = torch.linalg.qr(w[j])[0]
        r = s - mu[j]
        off.append(((r - r @ basis @ basis.T) ** 2).sum(1))
    assert float(torch.stack(off).min(0).values.mean()) == pytest.approx(0.18, rel=0.2)


def test_mixture_api_encode_decode_and_criteria(tmp_path):
    x = blobs()
    gmm = GaussianMixture(5, seed=0).fit(x, progress=False)
    r = gmm.responsibilities(x[:30])
    torch.testing.assert_close(r.sum(1), torch.ones(30))
    hard = gmm.decode(gmm.encode(x[:30]))
    assert torch.equal(hard, gmm.directions[r.argmax(1)])
    soft = gmm.with_decoding("soft")
    torch.testing.assert_close(soft.decode(soft.encode(x[:30])), r @ gmm.directions)
    assert gmm.outlier_score(torch.full((1, 8), 100.0)) > gmm.outlier_score(x[:1]) + 100
    ll, n = gmm.score(x)
    assert gmm.bic(x) == pytest.approx(-2 * ll * n + gmm.n_parameters() * np.log(n))
    assert gmm.aic(x) == pytest.approx(-2 * ll * n + 2 * gmm.n_parameters())
    assert gmm.n_parameters() == 5 * 8 * 2 + 4
    s = gmm.sample(500, seed=1)
    assert s.shape == (500, 8) and gmm.score(s)[0] == pytest.approx(ll, abs=0.5)
    for d in (gmm, MixturePPCA(3, q=2).fit(x, progress=False)):
        d.save(tmp_path / d.kind)
        back = load_dictionary(tmp_path / d.kind)
        torch.testing.assert_close(back.log_prob(x[:20]), d.log_prob(x[:20]))


def test_fixed_seed_gives_identical_mixtures():
    x = blobs()
    a = GaussianMixture(4, seed=7, max_iter=10).fit(x, progress=False)
    b = GaussianMixture(4, seed=7, max_iter=10).fit(x, progress=False)
    assert torch.equal(a.means_, b.means_) and a.log_likelihood_history_ == b.log_likelihood_history_


def test_collapsed_component_is_logged_by_index_and_stays_finite(caplog):
    x = blobs(k=3, d=4, per=100)
    x[:40] = 30.0  # forty identical rows far from the rest: the component sitting on them has zero variance
    with caplog.at_level(logging.WARNING):
        gmm = GaussianMixture(4, seed=0, max_iter=20, reg_covar=1e-6).fit(x, progress=False)
    assert "collapsed to the floor" in caplog.text and "component(s) [" in caplog.text
    assert torch.isfinite(gmm.log_prob(x)).all() and (gmm.variances_ >= 1e-6).all()


def test_bad_inputs():
    with pytest.raises(DictlabError, match="k=50 is larger than the number of rows \\(20\\)"):
        GaussianMixture(50).fit(torch.randn(20, 3), progress=False)
    with pytest.raises(DictlabError, match="unknown covariance 'full'"):
        GaussianMixture(2, covariance="full")
    gmm = GaussianMixture(2).fit(torch.randn(50, 3), progress=False)
    with pytest.raises(DictlabError, match=r"expected \[N, 3\]"):
        gmm.log_prob(torch.randn(5, 4))


def _far(x: torch.Tensor) -> torch.Tensor:
    """Rows moved to norm ~10000, the offset carried by four dimensions as in a residual stream."""
    return x + torch.cat([torch.full((4,), 5000.0), torch.zeros(x.shape[1] - 4)])


@pytest.mark.parametrize("given_init", [False, True])
def test_tight_components_far_from_the_origin_keep_their_variances_and_weights(given_init):
    # two components of std 0.05, 300 apart: the expanded quadratic form and E[x²] − μ² cancel in float32
    g = torch.Generator().manual_seed(0)
    d, sizes = 16, (600, 1400)
    centres = torch.zeros(2, d)
    centres[1, 4] = 300.0
    label = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])
    x = _far(centres[label] + 0.05 * torch.randn(len(label), d, generator=g))
    init = {"means": _far(centres) + 0.01} if given_init else None
    gmm = GaussianMixture(2, max_iter=20, seed=0).fit(x, progress=False, init=init)
    order = torch.cdist(_far(centres), gmm.directions).argmin(1)  # fitted component of each true one
    for j in range(2):
        rows = x.double()[label == j]
        expected = rows.var(0, correction=0) + gmm.reg_covar
        torch.testing.assert_close(gmm.variances_[order[j]].double(), expected, rtol=0.02, atol=0)
        assert float(gmm.weights_[order[j]]) == pytest.approx(sizes[j] / sum(sizes), rel=0.02)


def test_one_em_step_equals_a_float64_em_step_far_from_the_origin():
    x = _far(blobs(k=3, d=8, per=500, seed=2))
    init = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:3]] + 0.5
    gmm = GaussianMixture(3, max_iter=1, tol=0, reg_covar=1e-6).fit(x, progress=False, init={"means": init})
    # the same step in float64 on the raw rows: unit variances, equal weights to start
    x64, mu = x.double(), init.double()
    log_r = -0.5 * torch.cdist(x64, mu) ** 2
    r = (log_r - torch.logsumexp(log_r, 1, keepdim=True)).exp()
    nk = r.sum(0)
    means = (r.T @ x64) / nk[:, None]
    var = torch.stack([(r[:, j:j + 1] * (x64 - means[j]) ** 2).sum(0) / nk[j] for j in range(3)]) + 1e-6
    torch.testing.assert_close(gmm.weights_.double(), nk / len(x), rtol=1e-6, atol=0)
    torch.testing.assert_close(gmm.directions.double(), means, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gmm.variances_.double(), var, rtol=1e-6, atol=0)
