import torch

from dictlab.dictionaries import KMeans
from dictlab.interpret.splitting import co_activation, split_tree


def planted_hierarchy(seed=0, d=16, per=200):
    """4 parent directions, each split into 2 children; rows sit around the children."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:4] * 20
    nudge = torch.linalg.qr(torch.randn(d, d, generator=g))[0][4:12] * 4
    children = torch.stack([parents[i // 2] + (1 if i % 2 else -1) * nudge[i] for i in range(8)])
    x = children.repeat_interleave(per, 0) + 0.3 * torch.randn(8 * per, d, generator=g)
    return x[torch.randperm(len(x), generator=g)]


def test_kmeans_children_split_their_parents_by_cosine_and_by_co_activation():
    x = planted_hierarchy()
    narrow = KMeans(4, seed=0, n_init=3).fit(x, progress=False)
    wide = KMeans(8, seed=0, n_init=3).fit(x, progress=False)
    tree = split_tree(narrow, wide, x.split(300))
    assert tree["agreement"] == 1.0 and tree["split_fraction"] == 1.0
    assert sorted(len(kids) for kids in tree["splits"].values()) == [2, 2, 2, 2]
    for child in tree["children"]:
        assert child["p_coactivation"] == 1.0 and child["cosine"] > 0.9


def test_co_activation_counts_equal_brute_force():
    x = planted_hierarchy(seed=1)
    a = KMeans(3, seed=0).fit(x, progress=False)
    b = KMeans(5, seed=0).fit(x, progress=False)
    counts, fires = co_activation(a, b, x.split(97))
    la, lb = a.assign(x), b.assign(x)
    brute = torch.zeros(3, 5, dtype=torch.float64)
    for i, j in zip(la.tolist(), lb.tolist()):
        brute[i, j] += 1
    assert torch.equal(counts, brute) and torch.equal(fires, torch.bincount(lb, minlength=5).double())
