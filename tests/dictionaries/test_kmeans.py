import pytest
import torch

from dictlab.dictionaries import KMeans, load_dictionary
from dictlab.dictionaries.kmeans import kmeans_plusplus
from dictlab.dictionaries.lloyd import FixedPoint, affine_scores, fixed_point_bits, lloyd, sq_distances
from dictlab.dictionaries.sampling import as_source, random_sample
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
    h = km.inertia_history_
    assert all(b <= a * (1 + 1e-6) for a, b in zip(h, h[1:]))
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
        _ = KMeans(2).directions


# --- the rest of the k-means family ------------------------------------------------------------
from dictlab.dictionaries import MiniBatchKMeans, ResidualKMeans, SphericalKMeans, fit_many  # noqa: E402


def test_inertia_within_one_percent_of_scikit_learn_from_the_same_init():
    from sklearn.cluster import KMeans as SkKMeans

    x, _ = blobs(k=10, d=12, per=200, spread=1.0, seed=4)
    init = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:10]]
    ours = KMeans(10, max_iter=50, tol=0, batch_size=333).fit(x, progress=False, init=init)
    sk = SkKMeans(10, init=init.double().numpy(), n_init=1, max_iter=50, tol=0,
                  algorithm="lloyd").fit(x.double().numpy())
    final = float(sq_distances(x, ours.centers).min(1).values.sum())
    assert final == pytest.approx(sk.inertia_, rel=0.01)


def test_several_k_in_shared_passes_equal_separate_fits():
    x, _ = blobs(k=6, d=5, per=100, spread=0.5)
    together = fit_many([KMeans(3, seed=2), KMeans(7, seed=2, n_init=2)], x, progress=False)
    alone = [KMeans(3, seed=2).fit(x, progress=False), KMeans(7, seed=2, n_init=2).fit(x, progress=False)]
    for a, b in zip(together, alone):
        assert torch.equal(a.centers, b.centers) and a.inertia_history_ == b.inertia_history_


def test_gain_shape_decoding_projects_on_the_unit_centroid():
    x, _ = blobs(k=4, d=6)
    km = KMeans(4).fit(x, progress=False)
    gs = km.with_decoding("gain_shape")
    values, idx = gs.encode_sparse(x)
    u = km.centers / km.centers.norm(dim=1, keepdim=True)
    j = km.assign(x)
    assert torch.equal(idx[:, 0], j)
    expected = (x * u[j]).sum(1, keepdim=True) * u[j]
    torch.testing.assert_close(gs.decode_sparse(values, idx), expected)
    torch.testing.assert_close(gs.decode(gs.encode(x)), expected)
    assert km.decoding == "centroid"  # the view leaves the original alone
    with pytest.raises(DictlabError, match="unknown decoding 'soft'.*centroid, gain_shape"):
        km.with_decoding("soft")


def test_spherical_kmeans_finds_directions_whatever_the_norms():
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(5, 10, generator=g), dim=1)
    x = dirs.repeat_interleave(100, 0) + 0.02 * torch.randn(500, 10, generator=g)
    x = x * torch.rand(500, 1, generator=g).mul(50).add(1)  # norms from 1 to 51
    sk = SphericalKMeans(5, seed=1).fit(x, progress=False)
    assert torch.allclose(sk.centers.norm(dim=1), torch.ones(5))
    assert (sk.centers @ dirs.T).max(1).values.min() > 0.99
    assert sk.decoding == "gain_shape"


def test_minibatch_approaches_full_batch_inertia():
    x, _ = blobs(k=8, d=16, per=500, spread=1.0, seed=1)
    # one seed may land in a local optimum either way: compare the best of 4 restarts of each
    full = KMeans(8, seed=0, n_init=4).fit(x, progress=False)
    best_mb = min(MiniBatchKMeans(8, epochs=3, batch_size=256, seed=s).fit(x, progress=False).inertia_
                  for s in range(4))
    final_full = float(sq_distances(x, full.centers).min(1).values.sum())
    assert best_mb == pytest.approx(final_full, rel=0.03)


def test_residual_kmeans_error_falls_with_each_stage_and_l0_is_the_stage_count(tmp_path):
    x, _ = blobs(k=5, d=8, per=200, spread=1.0)
    rk = ResidualKMeans(5, stages=3, seed=0).fit(x, progress=False)
    assert rk.inertia_history_ == sorted(rk.inertia_history_, reverse=True)
    assert rk.inertia_history_[2] < 0.9 * rk.inertia_history_[0]
    values, idx = rk.encode_sparse(x)
    assert idx.shape == (x.shape[0], 3) and rk.n_latents == 15
    assert ((idx // 5) == torch.arange(3)).all()  # one unit from each stage
    err = float(((x - rk.decode_sparse(values, idx)) ** 2).sum())
    assert err == pytest.approx(rk.inertia_history_[-1], rel=0.05)
    rk.save(tmp_path / "rk")
    assert torch.equal(load_dictionary(tmp_path / "rk").encode(x), rk.encode(x))


@pytest.mark.parametrize("cls", [SphericalKMeans, MiniBatchKMeans])
def test_save_load_round_trip_for_every_kmeans_kind(cls, tmp_path):
    x, _ = blobs(k=4, d=6)
    d = cls(4, seed=3).fit(x, progress=False)
    d.save(tmp_path / "d")
    back = load_dictionary(tmp_path / "d")
    assert type(back) is cls and torch.equal(back.directions, d.directions)
    assert torch.equal(back.encode(x), d.encode(x))


def test_nan_rows_are_counted_and_located():
    x = torch.randn(100, 4)
    x[17, 2] = float("nan")
    x[60] = float("inf")
    with pytest.raises(DictlabError, match=r"2 of 100 rows hold NaN or Inf \(the first is row 17\)"):
        KMeans(3, batch_size=10).fit(x, progress=False)


def test_sampling_pass_never_writes_into_the_data():
    x = torch.arange(4000.0).reshape(1000, 4)
    before = x.clone()
    sample = random_sample(lambda: iter(x.split(100)), 100, seed=1)
    assert torch.equal(x, before) and sample.shape == (100, 4)
    assert len({tuple(r) for r in sample.tolist()}) == 100


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # oneDNN path, then the addmm fallback
def test_distance_product_is_the_affine_map_for_any_chunk_size(dtype):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(37, 24, generator=g, dtype=dtype), torch.randn(37, generator=g, dtype=dtype)
    score = affine_scores(w, b)
    for rows in (1, 333, 2048, 3000):
        x = torch.randn(rows, 24, generator=g, dtype=dtype)
        out = score(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), x.double() @ w.double().T + b.double(), rtol=1e-5, atol=1e-4)


def test_lloyd_assigns_as_float64_does_far_from_the_origin():
    # residual streams sit far from the origin: ‖x‖² − 2·x·c + ‖c‖² in fp32 then cancels badly
    g = torch.Generator().manual_seed(0)
    offset = torch.cat([torch.full((4,), 5000.0), torch.zeros(60)])
    x = torch.randn(4000, 64, generator=g) + offset
    init = x[:32].clone()
    exact = torch.cdist(x.double(), init.double()).argmin(1)
    assert (sq_distances(x, init).argmin(1) != exact).sum() > 100  # the naive fp32 form gets many wrong
    km = KMeans(32, max_iter=1, tol=0).fit(x, progress=False, init=init)
    expected = torch.stack([x.double()[exact == j].mean(0) for j in range(32)]).float()
    torch.testing.assert_close(km.centers, expected)


def test_cluster_sums_moved_row_by_row_equal_a_full_recount_bitwise():
    # after the first pass only the rows that changed cluster are moved between the fixed-point sums
    x, _ = blobs(k=6, d=8, per=400, spread=1.5, seed=3)
    x = x + 5000.0
    max_abs = x.abs().amax(0)
    init = x[:6] - x.mean(0)
    (state,) = lloyd(as_source(x, 300), [init], max_iter=6, tol=0, max_abs=max_abs, rows=len(x),
                     shift=x.mean(0), progress=False)
    labels = torch.cat(state.labels).long()
    assert labels.shape == (len(x),) and len(state.history) == 6
    recount = torch.zeros_like(state.sums).index_add_(0, labels, state.fixed_point(x - x.mean(0)))
    assert torch.equal(state.sums, recount)
    assert torch.equal(state.counts, torch.bincount(labels, minlength=6).double())
    # and the centres they give are the float64 means of the rows (to float32 precision)
    means = torch.stack([(x.double() - x.mean(0).double())[labels == j].mean(0) for j in range(6)])
    torch.testing.assert_close(state.sums / state.fixed_point.unit / state.counts[:, None], means,
                               rtol=0, atol=1e-6)


def test_fixed_point_rounds_to_the_nearest_integer():
    fp = FixedPoint(torch.tensor([0.0, 3.0, -2.0]), torch.device("cpu"))
    x = torch.tensor([[1.4, 0.3, 10.0], [-2.5, -0.06, 3.0], [7.6, 1.0, -1.9]])
    expected = torch.round(x.double() * torch.tensor([1.0, 8.0, 0.25], dtype=torch.float64))
    assert torch.equal(fp(x), expected)
    assert torch.equal(fp(x, torch.tensor([2, 0])), expected[[2, 0]])


def test_a_source_that_changes_between_passes_is_refused():
    x, _ = blobs(k=3, d=4, per=100)
    passes = []

    def source():  # the second pass gives one more batch than the first
        passes.append(1)
        return iter(x.split(100) if len(passes) == 1 else x.split(75))

    with pytest.raises(DictlabError, match="same rows in the same order"):  # (rows not kept: read every pass)
        lloyd(source, [x[:3].clone()], max_iter=3, tol=0, max_abs=x.abs().amax(0), rows=len(x), progress=False,
              cache_bytes=0)


@pytest.mark.parametrize("spherical", [False, True])
def test_rows_kept_after_the_first_pass_give_the_same_fit_bitwise_and_the_source_is_read_once(spherical):
    x, _ = blobs(k=5, d=8, per=300, spread=2.5, seed=4)
    x = x if spherical else x + 5000.0
    shift = None if spherical else x.mean(0)
    init = x[::300][:5].clone() if shift is None else x[::300][:5] - shift
    reads = []

    def source():
        reads.append(1)
        return iter(x.split(256))

    common = dict(max_iter=6, tol=0, max_abs=x.abs().amax(0), rows=len(x), spherical=spherical, shift=shift,
                  progress=False, bf16=False)
    (streamed,) = lloyd(source, [init.clone()], cache_bytes=0, **common)
    passes = len(streamed.history)
    assert passes >= 2 and len(reads) == passes
    (kept,) = lloyd(source, [init.clone()], **common)
    assert len(reads) == passes + 1  # one more read: the first pass; the others replay the kept rows
    assert torch.equal(kept.centers, streamed.centers) and kept.history == streamed.history
    assert all(torch.equal(a, b) for a, b in zip(kept.labels, streamed.labels))
    assert torch.equal(kept.sums, streamed.sums)


def test_fixed_point_scale_stays_a_float32_power_of_two():
    bits = fixed_point_bits(torch.tensor([0.0, 1e-39, 1.0, 3e38]), rows=1000)
    assert bits[0] == bits[1] == 127 and bits[2] == 41 and bits[3] == -87
    fp = FixedPoint(bits, torch.device("cpu"))
    x = torch.tensor([[0.0, 1e-39, -0.75, 3e38], [0.0, -1e-39, 1.0, -1e38]])
    expected = torch.round(x.double() * torch.exp2(bits.double()))
    assert torch.isfinite(fp(x)).all() and torch.equal(fp(x), expected)


@pytest.mark.parametrize("spherical", [False, True])
def test_bfloat16_products_with_the_certified_recheck_assign_as_float32_does(spherical):
    # close clusters, so that many rows need the float32 recheck; far from the origin for Euclidean
    # k-means (its shift handles that; directions that far out would be equal to float32 precision)
    g = torch.Generator().manual_seed(0)
    offset = torch.cat([torch.full((4,), 0.0 if spherical else 5000.0), torch.zeros(28)])
    centres = torch.randn(12, 32, generator=g) * 0.5 + offset
    x = centres[torch.randint(12, (3000,), generator=g)] + 0.4 * torch.randn(3000, 32, generator=g)
    shift = None if spherical else x.mean(0)
    init = x[:12].clone() if shift is None else x[:12] - shift
    if spherical:
        init = init / init.norm(dim=1, keepdim=True)
    common = dict(max_iter=5, tol=0, max_abs=x.abs().amax(0), rows=len(x), spherical=spherical, shift=shift,
                  progress=False)
    (fp32,) = lloyd(as_source(x, 700), [init], bf16=False, **common)
    (bf16,) = lloyd(as_source(x, 700), [init], bf16=True, **common)
    assert all(torch.equal(a, b) for a, b in zip(fp32.labels, bf16.labels))
    assert torch.equal(fp32.centers, bf16.centers)  # exact sums of equal assignments
    assert 0 < bf16.rechecked < bf16.rows and fp32.rows == 0
    # these close clusters need the recheck on over 30% of rows, so the bfloat16 products stop after a pass
    assert bf16.rows == len(x) and not bf16.bf16


def _far_rows(n=20000, d=64, seed=1):
    """Rows at norm ~10000 (four dimensions carry the offset, as in a residual stream), no cluster
    structure: many near-ties, the worst case for the float32 distance form."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + torch.cat([torch.full((4,), 5000.0), torch.zeros(d - 4)])


def _float64_nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x.double(), centers.double()).argmin(1)


@pytest.mark.parametrize("learner", ["kmeans", "minibatch"])
def test_assignment_at_evaluation_matches_float64_far_from_the_origin(learner, tmp_path):
    from dictlab.dictionaries.minibatch_kmeans import MiniBatchKMeans

    x = _far_rows()
    km = (KMeans(32, max_iter=5, init_sample=5000) if learner == "kmeans"
          else MiniBatchKMeans(32, epochs=2, init_sample=5000)).fit(x, progress=False)
    exact = _float64_nearest(x, km.centers)
    assert (sq_distances(x, km.centers).argmin(1) != exact).float().mean() > 1e-3  # the raw float32 form fails
    for model in (km, load_dictionary(km.save(tmp_path / learner))):  # the frame is saved with the centres
        assert (model.clusters(x) == exact).float().mean() >= 0.9999
        _, idx = model.encode_sparse(x)
        assert (idx[:, 0] == exact).float().mean() >= 0.9999


def test_residual_kmeans_assigns_every_stage_as_float64_does(tmp_path):
    from dictlab.dictionaries.residual_kmeans import ResidualKMeans

    x = _far_rows(n=10000)
    rk = ResidualKMeans(16, stages=2, max_iter=5, init_sample=5000).fit(x, progress=False)
    r, expected = x.double(), []
    for s, stage in enumerate(rk.stages_):
        j = _float64_nearest(r, stage.centers)
        r = r - stage.centers.double()[j]
        expected.append(j + s * rk.k)
    expected = torch.stack(expected, 1)
    for model in (rk, load_dictionary(rk.save(tmp_path / "rk"))):
        _, idx = model.encode_sparse(x)
        assert (idx == expected).all(1).float().mean() >= 0.9999
