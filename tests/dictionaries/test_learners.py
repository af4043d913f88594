"""Learners build themselves: the registry, the YAML schema built from it, and the docs' example learner
(docs/examples/exemplars.py) fitted and scored like any other, through the library and through a run."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dictlab.dictionaries import LEARNERS, load_dictionary
from dictlab.dictionaries.base import REGISTRY
from dictlab.dictionaries.sampling import as_source
from dictlab.measures.metrics import evaluate_reconstruction

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "exemplars.py"


@pytest.fixture
def exemplars():
    """The example module, loaded as a user's own file would be; its learner is unregistered afterwards."""
    spec = importlib.util.spec_from_file_location("exemplars_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    LEARNERS.pop("exemplars", None)
    REGISTRY.pop("exemplars", None)


def test_every_shipped_method_is_registered_with_its_options():
    assert list(LEARNERS) == ["kmeans", "spherical_kmeans", "minibatch_kmeans", "residual_kmeans", "gmm", "mppca",
                              "pca", "neurons", "sae", "pretrained"]
    for method, learner in LEARNERS.items():
        assert learner.model_fields["method"].default == method


def test_the_example_learner_fits_blobs_far_from_the_origin(exemplars, tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 30 + 5000 / 4  # norm ~5000: activations sit far from the origin
    x = centres[torch.randint(4, (4000,), generator=g)] + 0.1 * torch.randn(4000, 16, generator=g)
    d = exemplars.ExemplarsFit(k=[64]).build(64, 16).fit(as_source(x, 512))
    metrics, _ = evaluate_reconstruction(d, x.split(512))
    # every blob holds some of the 64 sampled rows, so each row's nearest centre is in its own blob:
    # the error is two within-blob variances, 2 · 16 · 0.01 per row, against ~16 · 900 of spread
    assert metrics.l0 == 1.0 and metrics.fvu < 1e-3
    loaded = load_dictionary(d.save(tmp_path / "ex"))
    assert torch.equal(loaded.encode(x[:100]), d.encode(x[:100]))


def test_the_example_learner_runs_from_yaml_beside_kmeans(exemplars, tmp_path, pile_dir, tiny_models,
                                                          write_run_config):
    from dictlab.cli import main

    config = write_run_config(tmp_path / "c.yaml", "ex", tiny_models["gpt2"], pile_dir, train_tokens=800,
                              fit=[{"method": "exemplars", "k": [4, 8]}, {"method": "kmeans", "k": [4]}])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    results = json.loads((runs / "ex" / "results.json").read_text())["results"]
    rows = {Path(r["dictionary"]).name: r for r in results if r["method"] == "exemplars"}
    assert sorted(rows) == ["exemplars-k4", "exemplars-k8"]
    for r in rows.values():  # scored like every other dictionary: reconstruction, clusters, the model's loss
        assert r["l0"] == 1 and r["fvu"] > 0 and "silhouette" in r and "ce_recovered_vs_zero" in r
    assert "exemplars-k8" in (runs / "ex" / "report.html").read_text()
    # and --k sets its sizes, as it does k-means'
    assert main(["--quiet", "--runs-dir", str(runs), "fit", str(config), "--k", "3"]) == 0
    assert (runs / "ex" / "dictionaries" / "L1.resid_post" / "exemplars-k3" / "config.json").exists()


def test_a_second_learner_under_a_taken_method_name_is_refused():
    from typing import Literal

    from dictlab.dictionaries import Learner
    from dictlab.errors import DictlabError

    taken = "method 'kmeans' is already the learner dictlab.dictionaries.kmeans.KMeansFit"
    with pytest.raises(DictlabError, match=taken):
        class Clash(Learner):
            method: Literal["kmeans"] = "kmeans"
    assert LEARNERS["kmeans"].__name__ == "KMeansFit"
