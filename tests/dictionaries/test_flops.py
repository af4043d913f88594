"""FLOP counts (encode per token, fit per training row and pass): by hand from the shapes, and against
torch's own counter of the products `encode_sparse` runs."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dictlab.dictionaries.gmm import GaussianMixture
from dictlab.dictionaries.kmeans import KMeans
from dictlab.dictionaries.mppca import MixturePPCA
from dictlab.dictionaries.residual_kmeans import ResidualKMeans
from dictlab.dictionaries.sae import SparseAutoencoder

K, D, Q = 5, 8, 2


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    return torch.randn(600, D) + 3


def _counted_per_row(dictionary, x) -> float:
    with FlopCounterMode(display=False) as counter:
        dictionary.encode_sparse(x)
    return counter.get_total_flops() / len(x)


@pytest.mark.parametrize("make, encode, fit", [
    (lambda: KMeans(K, max_iter=3), 2 * K * D, 2 * K * D + D),
    (lambda: ResidualKMeans(K, stages=2, max_iter=3), 2 * 2 * K * D, 2 * K * D + D),
    (lambda: MixturePPCA(K, q=Q, max_iter=2), 2 * K * (D + D * Q + Q * Q + Q),
     2 * K * (D + D * Q + Q * Q + Q) + 2 * K * D * (1 + Q)),
])
def test_counts_equal_hand_counts_and_torchs_counter(make, encode, fit, rows):
    d = make().fit(rows)
    assert (d.encode_flops, d.fit_flops_per_row) == (encode, fit)
    # torch counts the same products (per-call terms such as Σ μ·W add < 1% here)
    assert _counted_per_row(d, rows) == pytest.approx(encode, rel=0.01)


def test_gmm_counts_both_products_of_its_quadratic_form(rows):
    gmm = GaussianMixture(K, max_iter=2).fit(rows)
    assert (gmm.encode_flops, gmm.fit_flops_per_row) == (4 * K * D, 8 * K * D)
    # torch's counter sees the out-of-place product only (it does not count the in-place addmm_)
    assert _counted_per_row(gmm, rows) == pytest.approx(2 * K * D)


def test_sae_and_transcoder_counts(rows):
    sae = SparseAutoencoder(D, 32, k=4)
    assert sae.encode_flops == 2 * D * 32 == _counted_per_row(sae, rows)
    assert sae.fit_flops_per_row == 6 * 2 * D * 32  # 6 x the parameters of the two products
    transcoder = SparseAutoencoder(D, 32, k=4, d_out=3)
    assert transcoder.fit_flops_per_row == 6 * 32 * (D + 3) and transcoder.family == "transcoders"
