import pytest
import torch

from dictlab.dictionaries import KMeans
from dictlab.metrics import ReconstructionMeter, evaluate_reconstruction


def test_closed_forms_on_a_small_example():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])  # mean (2, 0)
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    m = ReconstructionMeter()
    m.update(x, x_hat, torch.tensor([1, 1, 1, 0]))
    r = m.result()
    # squared errors: 1, 0, 0, 8 -> 9; deviations from the mean: 1, 1, 4, 4 -> 10
    assert r.mse == pytest.approx(9 / (4 * 2))
    assert r.fvu == pytest.approx(9 / 10) and r.explained_variance == pytest.approx(0.1)
    cos = [1 / 2**0.5, 1.0, 1.0, 0.0]  # x̂ = 0 has cosine 0
    assert r.cosine == pytest.approx(sum(cos) / 4)
    assert r.l0 == 0.75 and r.n_rows == 4


def test_streaming_equals_one_batch_and_mean_prediction_has_fvu_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 8, generator=g) * 5 + 100  # a large offset: FVU must use variance about the mean
    mean = x.mean(0, keepdim=True).expand_as(x)
    whole, parts = ReconstructionMeter(), ReconstructionMeter()
    whole.update(x, mean, torch.ones(1000))
    for a, b in zip(x.split(77), mean.split(77)):
        parts.update(a, b, torch.ones(a.shape[0]))
    assert whole.result().fvu == pytest.approx(1.0, abs=1e-9)
    assert parts.result().fvu == pytest.approx(whole.result().fvu, rel=1e-12)
    assert parts.result().mse == pytest.approx(float(((x - mean) ** 2).mean()), rel=1e-6)


def test_kmeans_with_k_equal_n_reconstructs_exactly():
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    km = KMeans(12, seed=0).fit(x, progress=False)
    r = evaluate_reconstruction(km, x.split(5))
    assert r.fvu == pytest.approx(0, abs=1e-10) and r.cosine == pytest.approx(1) and r.l0 == 1
