"""Baselines (PCA dense and top-k, the neuron basis top-k): equal to numpy's SVD far from the origin, read
top-k as documented, one pass serving every k, and run from YAML like any learner."""

import json

import numpy as np
import pytest
import torch

from dictlab.dictionaries import load_dictionary
from dictlab.dictionaries.baselines import LinearBasis, PCAFit
from dictlab.errors import DictlabError
from dictlab.measures.metrics import evaluate_reconstruction

D = 12


@pytest.fixture(scope="module")
def rows():
    """Correlated rows at norm 5000 with a decaying spectrum (distinct principal variances)."""
    g = torch.Generator().manual_seed(0)
    far = torch.randn(D, generator=g)
    rotation = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    spread = torch.randn(4000, D, generator=g) * torch.linspace(3, 0.1, D)
    return (5000 * far / far.norm() + spread @ rotation).float()


def test_pca_equals_numpys_svd_far_from_the_origin(rows, tmp_path):
    pca = LinearBasis("pca", 4).fit(rows, progress=False)
    x = rows.double().numpy()
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    cosines = np.abs((pca.basis_.double().numpy() * vt[:4]).sum(1))  # directions up to their sign
    np.testing.assert_allclose(cosines, 1.0, atol=1e-5)
    np.testing.assert_allclose(pca.variances_.numpy(), s[:4] ** 2 / len(x), rtol=1e-5)
    projected = x.mean(0) + centred @ vt[:4].T @ vt[:4]
    rebuilt = pca.decode_sparse(*pca.encode_sparse(rows)).double().numpy()
    assert np.abs(rebuilt - projected).max() < 1e-7 * 5000  # float32 rounding at norm 5000
    metrics, _ = evaluate_reconstruction(pca, rows.split(1000))
    assert metrics.l0 == 4 and metrics.fvu == pytest.approx((s[4:] ** 2).sum() / (s ** 2).sum(), rel=1e-4)
    loaded = load_dictionary(pca.save(tmp_path / "pca"))
    assert torch.equal(loaded.encode(rows[:50]), pca.encode(rows[:50])) and loaded.family == "baselines"


def test_top_k_of_a_basis_keeps_each_rows_largest_coordinates(rows):
    pca = LinearBasis("pca", 3, topk=True).fit(rows, progress=False)
    assert pca.n_latents == D and pca.label == "pca-topk"
    values, indices = pca.encode_sparse(rows)
    coords = (rows - pca.mean_) @ pca.basis_.T
    assert torch.equal(indices, coords.abs().topk(3, dim=1).indices)
    assert torch.equal(values, coords.gather(1, indices))
    full = LinearBasis("pca", D, topk=True).fit(rows, progress=False)  # every coordinate kept: exact
    assert (full.decode_sparse(*full.encode_sparse(rows)) - rows).abs().max() < 2e-3
    neurons = LinearBasis("neurons", 2, topk=True).fit(rows, progress=False)
    values, indices = neurons.encode_sparse(rows)
    centred = rows - neurons.mean_
    assert torch.equal(indices, centred.abs().topk(2, dim=1).indices) and torch.equal(neurons.basis_, torch.eye(D))
    assert torch.allclose(neurons.mean_.double(), rows.double().mean(0), atol=1e-3)
    assert (neurons.encode_flops, pca.encode_flops, LinearBasis("pca", 3).fit(rows, False).encode_flops) == (
        D, 2 * D * D, 2 * D * 3)


def test_bad_baseline_settings_are_refused():
    with pytest.raises(DictlabError, match="the neuron basis is read top-k"):
        LinearBasis("neurons", 2)
    with pytest.raises(DictlabError, match="unknown basis 'ica'; accepted: pca, neurons"):
        LinearBasis("ica", 2)
    with pytest.raises(DictlabError, match="k=20 is larger than the site's width"):
        PCAFit(k=[20]).build(20, 16)


def test_baselines_run_from_yaml_with_one_pass_for_every_k(tmp_path, pile_dir, tiny_models, write_run_config):
    from dictlab.cli import main

    config = write_run_config(tmp_path / "c.yaml", "base", tiny_models["llama"], pile_dir, train_tokens=800,
                              fit=[{"method": "pca", "k": [2, 4]}, {"method": "pca", "k": [2], "topk": True},
                                   {"method": "neurons", "k": [2]}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    results = {r["dictionary"].rsplit("/", 1)[-1]: r
               for r in json.loads((runs / "base" / "results.json").read_text())["results"]}
    assert sorted(results) == ["neurons-topk-k2", "pca-k2", "pca-k4", "pca-topk-k2"]
    assert [results[n]["l0"] for n in ("pca-k2", "pca-k4", "pca-topk-k2", "neurons-topk-k2")] == [2, 4, 2, 2]
    assert results["pca-k4"]["fvu"] < results["pca-k2"]["fvu"] < 1  # more principal directions explain more
    assert {r["family"] for r in results.values()} == {"baselines"} and results["pca-k2"]["epochs"] == 1
    folder = runs / "base" / "dictionaries" / "L1.resid_post"
    small, large = (load_dictionary(folder / f"pca-k{k}") for k in (2, 4))
    assert torch.equal(small.basis_, large.basis_[:2])  # the same pass: the first directions of one basis


def test_baselines_are_fitted_once_whatever_the_run_seeds():
    from dictlab.dictionaries.baselines import NeuronsFit
    from dictlab.dictionaries.fitting import planned_folders
    from dictlab.dictionaries.kmeans import KMeansFit

    folders = planned_folders([PCAFit(k=[2]), NeuronsFit(k=[2]), KMeansFit(k=[4])], ["L1.resid_post"], [0, 1])
    assert sorted(folders) == ["L1.resid_post/kmeans-k4-s0", "L1.resid_post/kmeans-k4-s1",
                               "L1.resid_post/neurons-topk-k2", "L1.resid_post/pca-k2"]
