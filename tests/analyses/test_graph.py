import numpy as np
import pytest
import scipy.sparse
import torch

from dictlab.analyses.graph import (
    aligned,
    binned_mutual_information,
    calibrated_threshold,
    co_activation,
    edges,
    rotated,
)
from dictlab.errors import DictlabError


def codes(n, units, density, seed, shared=None):
    """Non-negative codes; with `shared` ([n] bool), units 0 and 1 also fire wherever it is set."""
    rng = np.random.default_rng(seed)
    out = rng.random((n, units)) * (rng.random((n, units)) < density)
    if shared is not None:
        out[shared, :2] += 1 + rng.random((int(shared.sum()), 2))
    return out


def batches(a, b, size):
    for start in range(0, len(a), size):
        yield scipy.sparse.csr_matrix(a[start:start + size]), scipy.sparse.csr_matrix(b[start:start + size])


def brute_force(a, b):
    """Every pair's Pearson r, Jaccard and co-active count from the dense matrices."""
    r = np.corrcoef(a.T, b.T)[: a.shape[1], a.shape[1]:]
    on_a, on_b = (a != 0).astype(float), (b != 0).astype(float)
    count = on_a.T @ on_b
    jaccard = count / (on_a.sum(0)[:, None] + on_b.sum(0)[None, :] - count)
    return r, jaccard, count


@pytest.mark.parametrize("density", [0.15, 1.0])  # sparse codes, and dense ones (every unit active)
@pytest.mark.parametrize("block_pairs", [1 << 25, 300])  # blocks cut by rows, or by their possible pairs
@pytest.mark.parametrize("batch, block, dense_share", [(7, 10, 2.0), (100, 1 << 16, 2.0), (1000, 50, 2.0),
                                                       (7, 10, 0.0), (100, 50, 0.5)])  # sparse sums, dense sums
def test_streaming_pearson_and_jaccard_equal_numpy(density, batch, block, dense_share, block_pairs):
    rng = np.random.default_rng(0)
    shared = rng.random(600) < 0.2
    a, b = codes(600, 7, density, 1, shared), codes(600, 5, density, 2, shared)
    pairs = co_activation(batches(a, b, batch), block_rows=block, dense_share=dense_share, block_pairs=block_pairs)
    r, jaccard, count = brute_force(a, b)
    assert np.array_equal(pairs.count, count[pairs.i, pairs.j]) and (count[pairs.i, pairs.j] > 0).all()
    assert len(pairs.i) == int((count > 0).sum())  # exactly the co-active pairs
    np.testing.assert_allclose(pairs.pearson(), r[pairs.i, pairs.j], atol=1e-10)
    np.testing.assert_allclose(pairs.jaccard(), jaccard[pairs.i, pairs.j], atol=1e-12)
    assert {(0, 0), (1, 1), (0, 1), (1, 0)} <= {(int(i), int(j)) for i, j in zip(pairs.i, pairs.j)}
    strong = {(int(pairs.i[e]), int(pairs.j[e])) for e in edges(pairs, min_r=0.3, min_count=5)}
    assert strong == {(int(i), int(j)) for i, j in zip(*np.nonzero((np.abs(r) > 0.3) & (count >= 5)))}


@pytest.mark.parametrize("dense_share", [2.0, 0.0])
def test_within_one_dictionary_only_pairs_above_the_diagonal(dense_share):
    a = codes(300, 6, 0.3, 3)
    pairs = co_activation(batches(a, a, 64), same=True, dense_share=dense_share)
    assert (pairs.i < pairs.j).all()
    r, _, count = brute_force(a, a)
    assert len(pairs.i) == int(np.triu(count > 0, 1).sum())
    np.testing.assert_allclose(pairs.pearson(), r[pairs.i, pairs.j], atol=1e-10)


def test_mutual_information_equals_the_closed_form():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(4)
    shared = rng.random(2000) < 0.3
    a, b = codes(2000, 4, 0.2, 5, shared), codes(2000, 3, 0.2, 6, shared)
    pairs = co_activation(batches(a, b, 256))
    binary = pairs.mutual_information()
    for e, (i, j) in enumerate(zip(pairs.i, pairs.j)):
        assert binary[e] == pytest.approx(mutual_info_score(a[:, i] != 0, b[:, j] != 0), abs=1e-12)
    chosen = np.arange(len(pairs.i))
    binned = binned_mutual_information(pairs, chosen, batches(a, b, 300), bins=4)

    def levels(column):
        return np.where(column > 0, np.ceil(column / column.max() * 4).clip(1, 4), 0)

    for e, (i, j) in enumerate(zip(pairs.i, pairs.j)):
        assert binned[e] == pytest.approx(mutual_info_score(levels(a[:, i]), levels(b[:, j])), abs=1e-10)
    assert binned[(pairs.i == 0) & (pairs.j == 0)][0] > binary[(pairs.i == 0) & (pairs.j == 0)][0] > 0.05


def test_the_shuffle_calibrated_threshold_keeps_the_stated_false_edge_rate_on_independent_data():
    n, rate = 20_000, 0.05
    a, b = codes(n, 40, 0.05, 7), codes(n, 40, 0.05, 8)  # independent: every edge is false
    real = co_activation(batches(a, b, 1000))
    b_rows = lambda: iter(torch.from_numpy(b).split(1000))  # noqa: E731
    null_b = np.concatenate([x.numpy() for x in rotated(b_rows, n, 1000)])
    assert np.array_equal(null_b, np.roll(b, -n // 2, axis=0))
    null = co_activation(batches(a, null_b, 1000))
    threshold = calibrated_threshold(null.pearson(), rate)
    observed = float((np.abs(real.pearson()) > threshold).mean())
    assert 0.6 * rate < observed < 1.4 * rate, (threshold, observed)


def test_stores_that_are_not_token_aligned_are_refused_naming_the_row():
    def stream(tokens):
        for start in range(0, len(tokens), 4):
            chunk = torch.tensor(tokens[start:start + 4])
            yield {"token": chunk, "doc": torch.zeros_like(chunk), "context": torch.zeros_like(chunk),
                   "pos": torch.arange(len(chunk))}

    assert len(list(aligned(stream([1, 2, 3, 4, 5]), stream([1, 2, 3, 4, 5])))) == 2
    with pytest.raises(DictlabError, match="at row 5 their token differs \\(6 vs 7\\)"):
        list(aligned(stream([1, 2, 3, 4, 5, 6]), stream([1, 2, 3, 4, 5, 7])))
    with pytest.raises(DictlabError, match="different numbers of rows"):
        list(aligned(stream([1, 2, 3, 4, 5]), stream([1, 2, 3, 4])))


def test_dictlab_graph_within_and_across_sites_writes_every_output(tmp_path, pile_dir, tiny_models, capsys,
                                                                   write_run_config):
    import csv
    import json

    import networkx as nx
    from safetensors.torch import load_file

    from dictlab.cli import main

    config = tmp_path / "c.yaml"
    write_run_config(config, "g", tiny_models["llama"], pile_dir, sites=("resid_mid", "resid_post"),
                     train_tokens=1200,
                     fit=[{"method": "sae", "site": site, "latents": [32], "k": 4, "steps": 40, "batch_size": 64,
                           "lr": 3e-3, "warmup_steps": 4} for site in ("L1.resid_mid", "L1.resid_post")])
    runs = tmp_path / "runs"
    assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    store = runs / "g" / "store"
    mid, post = (runs / "g" / "dictionaries" / site / "sae-topk-n32-k4" for site in ("L1.resid_mid", "L1.resid_post"))
    capsys.readouterr()
    assert main(["--quiet", "graph", "--store", str(store), str(post), "--min-r", "0.1", "--min-count", "2"]) == 0
    assert "edges" in capsys.readouterr().out
    assert main(["--quiet", "graph", "--store", str(store), str(mid), str(post), "--min-r", "0.1",
                 "--min-count", "2"]) == 0
    for out, same in ((post / "graph", True), (mid / "graph-sae-topk-n32-k4", False)):
        summary = json.loads((out / "summary.json").read_text())
        edges = load_file(str(out / "adjacency.safetensors"))
        assert len(edges["r"]) == summary["edges"] > 0
        assert (edges["r"].abs() > 0.1).all() and (edges["count"] >= 2).all()
        if same:
            assert (edges["i"] < edges["j"]).all()
        with open(out / "edges.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == summary["edges"] and float(rows[0]["r"]) == pytest.approx(float(edges["r"][0]))
        graph = nx.read_graphml(out / "graph.graphml")
        assert graph.number_of_edges() == summary["edges"] and summary["nodes"] == len(graph)
        node = next(iter(graph.nodes(data=True)))[1]
        assert {"site", "layer", "unit", "frequency", "top_tokens", "community"} <= set(node) and node["layer"] == 1
        assert node["top_tokens"]  # from the run's interpretation.json
        assert json.loads((out / "graph.json").read_text())["edges"]
        assert (out / "heatmap.png").stat().st_size > 1000 and (out / "degree.png").stat().st_size > 1000
        assert summary["null_edges"] >= 0 and sum(summary["communities"]) == summary["nodes"]


def test_dictlab_graph_refuses_stores_that_are_not_token_aligned(tmp_path, pile_dir, tiny_models, capsys,
                                                                 write_run_config):
    from dictlab.cli import main

    runs = tmp_path / "runs"
    for name, held_out in (("one", "0.2"), ("two", "0.3")):  # other documents held out: other eval tokens
        config = tmp_path / f"{name}.yaml"
        write_run_config(config, name, tiny_models["gpt2"], pile_dir, train_tokens=800,
                         fit=[{"method": "kmeans", "k": [3]}])
        text = config.read_text().replace("eval_fraction: 0.2", f"eval_fraction: {held_out}")
        config.write_text(text + "interpret:\n  enabled: false\n")
        assert main(["--quiet", "--runs-dir", str(runs), "run", str(config)]) == 0
    folders = [runs / n / "dictionaries" / "L1.resid_post" / "kmeans-k3" for n in ("one", "two")]
    capsys.readouterr()
    code = main(["--quiet", "graph", "--store", str(runs / "one" / "store"), "--store-b", str(runs / "two" / "store"),
                 *map(str, folders)])
    err = capsys.readouterr().err
    assert code == 2 and "not token-aligned" in err, err
    assert main(["--quiet", "graph", "--store", str(runs / "one" / "store"), str(folders[0]), "--min-r", "1.5"]) == 2
    assert "--min-r must be in [0, 1)" in capsys.readouterr().err


def test_a_pair_whose_products_cancel_to_zero_keeps_its_count():
    a = np.array([[1.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, 3.0]])  # pair (0, 0): 1·1 + 1·(−1) = 0 exactly
    pairs = co_activation(batches(a, b, 2))
    _, _, count = brute_force(a, b)
    found = {(int(i), int(j)): (int(c), float(p)) for i, j, c, p in zip(pairs.i, pairs.j, pairs.count, pairs.product)}
    assert found[(0, 0)] == (2, 0.0) and found[(1, 1)] == (2, 5.0)
    assert {k: v[0] for k, v in found.items()} == {(int(i), int(j)): int(count[i, j]) for i,
                                                   j in zip(*np.nonzero(count))}
