import math

import pytest
import torch

from dictlab.dictionaries import KMeans
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.measures.metrics import (
    ClusterSample,
    ReconstructionMeter,
    cluster_quality,
    cluster_sizes,
    evaluate_reconstruction,
)


def dense(codes: torch.Tensor):
    return codes, torch.arange(codes.shape[1]).expand(codes.shape[0], -1)


def test_closed_forms_on_a_small_example():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])  # mean (2, 0)
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    codes = torch.tensor([[0.5, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    m = ReconstructionMeter(3)
    m.update(x, x_hat, *dense(codes))
    r = m.result()
    # squared errors: 1, 0, 0, 8 -> 9; deviations from the mean: 1, 1, 4, 4 -> 10
    assert r.mse == pytest.approx(9 / (4 * 2))
    assert r.fvu == pytest.approx(9 / 10) and r.explained_variance == pytest.approx(0.1)
    cos = [1 / 2**0.5, 1.0, 1.0, 0.0]  # x̂ = 0 has cosine 0
    assert r.cosine == pytest.approx(sum(cos) / 4)
    # Σ‖x̂‖² = 2 + 9 + 8 = 19; Σ x·x̂ = 1 + 9 + 8 = 18
    assert r.relative_norm == pytest.approx(19 / 18)
    assert r.l0 == 0.75 and r.n_rows == 4 and r.l0_histogram == [1, 3]
    assert r.l1 == pytest.approx((0.5 + 2 + 1) / 4)
    # latent frequencies 2/4, 1/4, 0: one dead of three, two dense (> 0.1)
    assert r.dead_fraction == pytest.approx(1 / 3) and r.dense_fraction == pytest.approx(2 / 3)
    hist = r.log10_frequency_histogram
    assert sum(hist) == 2 and hist[-1] == 1 and hist[-2] == 1  # log10 0.5 in [-0.5, 0], log10 0.25 in [-1, -0.5)


def test_shrunk_reconstructions_have_relative_norm_below_one():
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
    m = ReconstructionMeter(1)
    m.update(x, 0.5 * x, torch.ones(100, 1), torch.zeros(100, 1, dtype=torch.long))
    assert m.result().relative_norm == pytest.approx(0.5)


def test_streaming_equals_one_batch_and_mean_prediction_has_fvu_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) * 5 + 100  # a large offset: FVU must use variance about the mean
    codes = (torch.rand(1000, 6, generator=g) > 0.7).float() * torch.randn(1000, 6, generator=g)
    mean = x.mean(0, keepdim=True).expand_as(x)
    whole, parts = ReconstructionMeter(6), ReconstructionMeter(6)
    whole.update(x, mean, *dense(codes))
    for a, b, c in zip(x.split(77), mean.split(77), codes.split(77)):
        parts.update(a, b, *dense(c))
    assert whole.result().fvu == pytest.approx(1.0, abs=1e-9)
    one, streamed = whole.result().as_dict(), parts.result().as_dict()
    for key, value in one.items():
        assert streamed[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    assert streamed["mse"] == pytest.approx(float(((x - mean) ** 2).mean()), rel=1e-6)


def test_kmeans_with_k_equal_n_reconstructs_exactly():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    km = KMeans(12, seed=0).fit(x, progress=False)
    r, rows_per_s = evaluate_reconstruction(km, x.split(5))
    assert r.fvu == pytest.approx(0, abs=1e-10) and r.cosine == pytest.approx(1) and r.l0 == 1
    assert r.dead_fraction == 0 and r.l0_histogram == [0, 12] and rows_per_s > 0


def blobs_with_labels(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 3, generator=g) * 4
    labels = torch.randint(0, 5, (400,), generator=g)
    x = centers[labels] + torch.randn(400, 3, generator=g)
    labels[0] = 7  # a cluster of one row: its silhouette is 0
    return x + 50, labels  # far from the origin, as activations are


def test_cluster_quality_equals_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    x, labels = blobs_with_labels()
    q = ClusterSample(x).quality(labels)
    xn, ln = x.double().numpy(), labels.numpy()
    assert q["silhouette"] == pytest.approx(metrics.silhouette_score(xn, ln), rel=1e-6)
    assert q["calinski_harabasz"] == pytest.approx(metrics.calinski_harabasz_score(xn, ln), rel=1e-6)
    assert q["davies_bouldin"] == pytest.approx(metrics.davies_bouldin_score(xn, ln), rel=1e-6)
    means = {int(c): x[labels == c].double().mean(0) for c in labels.unique()}
    inertia = sum(float(((x[i].double() - means[int(c)]) ** 2).sum()) for i, c in enumerate(labels)) / len(x)
    assert q["inertia"] == pytest.approx(inertia, rel=1e-9)
    one = ClusterSample(x).quality(torch.zeros(400, dtype=torch.long))  # one cluster: only inertia is defined
    assert math.isnan(one["silhouette"]) and one["inertia"] > 0


def test_sample_rows_do_not_depend_on_batching():
    x = torch.randn(1000, 4, generator=torch.Generator().manual_seed(2))
    a = ClusterSample.from_batches(x.split(64), 1000, 100, seed=3)
    b = ClusterSample.from_batches(x.split(999), 1000, 100, seed=3)
    assert torch.equal(a.rows, b.rows) and a.rows.shape == (100, 4)
    assert len({tuple(r.tolist()) for r in a.rows}) == 100  # distinct rows of x
    assert ClusterSample.from_batches(x.split(64), 1000, 5000, seed=3).rows.shape == (1000, 4)


def test_cluster_size_entropy():
    out = cluster_sizes([torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3])], 6)
    p = torch.tensor([2, 2, 1, 1]) / 6
    assert out["cluster_entropy"] == pytest.approx(float(-(p * p.log()).sum()))
    assert out["clusters_used"] == 4


def test_an_sae_row_belongs_to_its_latent_with_the_largest_weighted_activation():
    sae = SparseAutoencoder(4, 6, rule="relu", seed=0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.tensor([1.0, 5.0, 1.0, 1.0, 1.0, 1.0])[:, None])
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    values, indices = sae.encode_sparse(x)
    weight = values * sae.directions.norm(dim=1)
    expected = torch.where(weight.amax(1) > 0, weight.argmax(1), 6)
    assert torch.equal(sae.clusters(x), expected)
    km = KMeans(3).fit(x, progress=False)
    sample = ClusterSample(x)
    q = cluster_quality(km, sample, lambda: x.split(7))
    assert q["clusters_used"] == 3 and q["silhouette"] == pytest.approx(sample.quality(km.assign(x))["silhouette"])
