"""Cross-seed stability: 1.0 for a dictionary against itself, near the null for unrelated random ones,
clusters compared about their own mean, and refused without two seeds."""

import pytest
import torch

from dictlab.dictionaries.kmeans import KMeans
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.measures.stability import mean_over_pairs, stability


def _sae(seed: int) -> SparseAutoencoder:
    return SparseAutoencoder(32, 64, k=4, seed=seed)


def test_a_dictionary_against_itself_is_fully_stable_and_random_ones_score_the_null():
    same = stability(_sae(0), _sae(0))
    assert (same["above_0.7"], same["above_0.9"], same["mean_cosine"]) == (1.0, 1.0, pytest.approx(1.0))
    unrelated = stability(_sae(0), _sae(1))
    assert unrelated["above_0.7"] == 0.0 and unrelated["null_above_0.7"] == 0.0
    assert unrelated["mean_cosine"] == pytest.approx(unrelated["null_mean_cosine"], abs=0.05)
    assert 0.1 < unrelated["mean_cosine"] < 0.5  # the best one-to-one cosines of random 32-d directions


def test_permuted_and_perturbed_units_are_matched_one_to_one():
    a, b = _sae(0), _sae(0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        b.W_dec.copy_(a.W_dec[torch.randperm(64, generator=g)] + 0.05 * torch.randn(64, 32, generator=g))
    s = stability(a, b)
    assert s["above_0.9"] == 1.0 and s["mean_cosine"] > 0.95 and s["null_above_0.7"] == 0.0
    assert mean_over_pairs([s, {k: 0.0 for k in s}])["above_0.9"] == 0.5


def test_clusters_far_from_the_origin_are_compared_about_their_mean():
    g = torch.Generator().manual_seed(0)
    far = torch.full((16,), 5000 / 4.0)
    centres = far + 20 * torch.randn(8, 16, generator=g)
    x = centres[torch.randint(8, (4000,), generator=g)] + torch.randn(4000, 16, generator=g)
    fits = [KMeans(8, seed=s, max_iter=50).fit(x, progress=False) for s in (0, 1)]
    assert stability(*fits)["above_0.9"] == 1.0  # both seeds find the 8 blobs
    shuffled = KMeans(8, seed=2, max_iter=50).fit(x[:, torch.randperm(16, generator=g)], progress=False)
    raw_cos = torch.nn.functional.cosine_similarity(fits[0].directions[:, None], shuffled.directions[None], dim=2)
    assert raw_cos.min() > 0.99  # raw centroids far from the origin all point the same way ...
    assert stability(fits[0], shuffled)["above_0.9"] < 0.5  # ... about their mean, other blobs do not match


def test_stability_needs_two_seeds():
    from dictlab.config import ExperimentConfig

    with pytest.raises(ValueError, match=r"evaluate.stability compares fits of two or more seeds; seeds is None"):
        ExperimentConfig(name="x", evaluate={"stability": True})
    with pytest.raises(ValueError, match=r"seeds is \[0\]: set e.g. seeds: \[0, 1\]"):
        ExperimentConfig(name="x", evaluate={"stability": True}, seeds=[0])
    assert ExperimentConfig(name="x", evaluate={"stability": True}, seeds=[0, 1]).evaluate.stability
