import pytest
import torch

from dictlab.dictionaries import KMeans, load_dictionary
from dictlab.dictionaries.kmeans import kmeans_plusplus, random_sample, sq_distances
from dictlab.errors import DictlabError


def blobs(k=8, d=16, per=300, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    x = (centers.repeat_interleave(per, 0) + spread * torch.randn(k * per, d, generator=g))
    return x[torch.randperm(x.shape[0], generator=g)], centers


def test_kmeans_recovers_blob_centres_streaming_in_small_batches():
    x, centers = blobs()
    km = KMeans(8, seed=0, batch_size=97, init_sample=500).fit(x, progress=False)
    # each true centre has a fitted centre within the noise level, and vice versa
    d = sq_distances(centers, km.cluster_centers_).sqrt()
    assert d.min(1).values.max() < 0.05 and d.min(0).values.max() < 0.05
    assert km.inertia_history_ == sorted(km.inertia_history_, reverse=True)
    # inertia of the final assignment ≈ N·d·spread² for Gaussian blobs
    assert km.inertia_ / (x.shape[0] * 16) == pytest.approx(0.05**2, rel=0.1)


def test_encode_is_one_hot_of_the_nearest_centre_and_decode_gives_it_back():
    x, _ = blobs(k=4, d=6)
    km = KMeans(4).fit(x, progress=False)
    codes = km.encode(x[:50])
    assert codes.shape == (50, 4) and torch.equal(codes.sum(1), torch.ones(50))
    nearest = torch.cdist(x[:50], km.directions).argmin(1)
    assert torch.equal(codes.argmax(1), nearest)
    assert torch.equal(km.decode(codes), km.directions[nearest])
    values, idx = km.encode_sparse(x[:50])
    assert torch.equal(km.decode_sparse(values, idx), km.directions[nearest])


def test_save_load_round_trip(tmp_path):
    x, _ = blobs(k=4, d=6)
    km = KMeans(4, seed=3).fit(x, progress=False)
    km.save(tmp_path / "km")
    back = load_dictionary(tmp_path / "km")
    assert isinstance(back, KMeans) and torch.equal(back.directions, km.directions)
    assert back.inertia_ == km.inertia_ and torch.equal(back.encode(x), km.encode(x))


def test_same_seed_same_result_and_empty_clusters_reseeded():
    x, _ = blobs(k=3, d=4, per=50)
    a = KMeans(3, seed=1).fit(x, progress=False)
    b = KMeans(3, seed=1).fit(x, progress=False)
    assert torch.equal(a.directions, b.directions)
    # more clusters than distinct points in a blob layout forces empty clusters; none may stay empty
    km = KMeans(20, seed=0, max_iter=30).fit(x, progress=False)
    counts = torch.bincount(km.encode_sparse(x)[1][:, 0], minlength=20)
    assert (counts > 0).all()


def test_kmeans_plusplus_spreads_over_separated_blobs():
    x, centers = blobs(k=5, d=8, spread=0.01)
    init = kmeans_plusplus(x, 5, seed=0)
    assert len(set(torch.cdist(init, centers).argmin(1).tolist())) == 5


def test_random_sample_is_a_subset_without_repeats():
    x = torch.arange(1000.0).unsqueeze(1)
    s = random_sample(lambda: iter(x.split(64)), 100, seed=0)
    assert s.shape == (100, 1) and len(set(s[:, 0].tolist())) == 100
    assert s.mean() == pytest.approx(500, abs=80)


def test_bad_inputs():
    with pytest.raises(DictlabError, match="k=10 is larger than the number of rows \\(5\\)"):
        KMeans(10).fit(torch.randn(5, 3), progress=False)
    km = KMeans(2).fit(torch.randn(20, 3), progress=False)
    with pytest.raises(DictlabError, match=r"shape \(4, 5\).*expected \[N, 3\]"):
        km.encode(torch.randn(4, 5))
    with pytest.raises(DictlabError, match="not fitted"):
        KMeans(2).directions
