"""Every dictionary runs where its tensors are: moved to another device (here "meta", which refuses to
mix with CPU tensors, so a tensor made on the CPU inside encode or decode is an error on the CPU too),
encoding and decoding stay there. What a stage needs to run its dictionaries on a GPU."""

import pytest
import torch

from dictlab.dictionaries import (
    GaussianMixture,
    KMeans,
    MiniBatchKMeans,
    MixturePPCA,
    ResidualKMeans,
    SparseAutoencoder,
    SphericalKMeans,
)


def blobs(n=600, d=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, d, generator=g)[torch.randint(6, (n,), generator=g)] * 3 + torch.randn(n, d, generator=g)


def fitted():
    x = blobs()
    yield KMeans(4, max_iter=3).fit(x, progress=False)
    yield SphericalKMeans(4, max_iter=3).fit(x, progress=False)
    yield MiniBatchKMeans(4, epochs=1, batch_size=128).fit(x, progress=False)
    yield ResidualKMeans(3, stages=2, max_iter=3).fit(x, progress=False)
    yield GaussianMixture(3, max_iter=3).fit(x, progress=False)
    yield GaussianMixture(3, covariance="spherical", max_iter=3).fit(x, progress=False)
    yield MixturePPCA(3, q=2, max_iter=3).fit(x, progress=False)
    for rule in ("topk", "batchtopk", "relu", "jumprelu"):
        yield SparseAutoencoder(8, 16, rule=rule, k=3)
    yield SparseAutoencoder(8, 16, rule="topk", k=3, d_out=5)  # a transcoder


@pytest.mark.parametrize("dictionary", list(fitted()), ids=lambda d: f"{d.kind}-{getattr(d, 'rule', '')}")
def test_encode_and_decode_stay_on_the_dictionarys_device(dictionary):
    x = torch.empty(10, dictionary.d_in, device="meta")
    for decoding in dictionary.decodings or (None,):
        view = (dictionary.with_decoding(decoding) if decoding else dictionary).on_device("meta")
        assert all(t.device.type == "meta" for t in view.tensors().values())
        values, indices = view.encode_sparse(x)
        assert values.device.type == indices.device.type == "meta"
        assert view.decode_sparse(values, indices).device.type == "meta"
        assert view.decode(view.encode(x)).device.type == "meta"
