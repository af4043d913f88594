import numpy as np
import pytest
import scipy.stats

from dictlab.measures.similarity import linear_cka, mean_cosine, mutual_knn, rsa, svcca


def rotation(d: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]


def unbiased_hsic_from_grams(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (the paper's K and L)
    """Song et al. (2012), eq. 5, written with the N×N Gram matrices."""
    n = len(k)
    k, l = k.copy(), l.copy()  # noqa: E741
    np.fill_diagonal(k, 0), np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def test_cka_equals_the_gram_matrix_formula_and_is_one_for_a_rotated_copy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + 3.0
    y = np.tanh(x @ rng.normal(size=(8, 5))) + rng.normal(size=(60, 5))
    xc, yc = x - x.mean(0), y - y.mean(0)
    grams = [z @ z.T for z in (xc, yc)]
    expected = unbiased_hsic_from_grams(grams[0], grams[1]) / np.sqrt(
        unbiased_hsic_from_grams(grams[0], grams[0]) * unbiased_hsic_from_grams(grams[1], grams[1]))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-10)
    assert linear_cka(x, 2.5 * x @ rotation(8, 1) + 7.0) == pytest.approx(1.0, abs=1e-10)


def test_debiased_cka_of_independent_data_is_near_zero_at_small_n():
    rng = np.random.default_rng(1)
    values = [linear_cka(rng.normal(size=(50, 200)), rng.normal(size=(50, 300))) for _ in range(20)]
    assert abs(np.mean(values)) < 0.02  # the biased estimator would sit near 0.8 here (d ≫ N)


def test_svcca_knn_rsa_and_cosine_on_known_cases():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 12)) * np.linspace(3, 0.5, 12)
    rotated = x @ rotation(12, 3)
    assert svcca(x, rotated) == pytest.approx(1.0, abs=1e-8)
    assert mutual_knn(x, rotated, k=10) == 1.0
    assert rsa(x, rotated) == pytest.approx(1.0, abs=1e-10)
    noise = rng.normal(size=(300, 12))
    assert svcca(x, noise) < 0.35 and mutual_knn(x, noise, k=10) < 0.15 and abs(rsa(x, noise)) < 0.1
    # mutual k-NN equals a brute-force count
    y = x + rng.normal(size=x.shape)
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    sx, sy = unit(x) @ unit(x).T, unit(y) @ unit(y).T
    np.fill_diagonal(sx, -np.inf), np.fill_diagonal(sy, -np.inf)
    nx, ny = np.argsort(-sx, axis=1)[:, :10], np.argsort(-sy, axis=1)[:, :10]
    brute = np.mean([len(set(a) & set(b)) for a, b in zip(nx, ny)]) / 10
    assert mutual_knn(x, y, k=10) == pytest.approx(brute)
    # RSA equals scipy's Spearman of the distance vectors
    d = lambda z: 1 - (unit(z) @ unit(z).T)[np.triu_indices(len(z), 1)]  # noqa: E731
    assert rsa(x, y) == pytest.approx(scipy.stats.spearmanr(d(x), d(y)).statistic)
    assert mean_cosine(x, x) == pytest.approx(1.0) and mean_cosine(x, -x) == pytest.approx(-1.0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="aligned row by row"):
        linear_cka(np.zeros((10, 3)), np.zeros((9, 3)))
    with pytest.raises(ValueError, match="one space"):
        mean_cosine(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"\[rows, features\]"):
        svcca(np.zeros(5), np.zeros(5))


def test_hungarian_matching_recovers_a_planted_permutation():
    from dictlab.measures.similarity import match_units

    rng = np.random.default_rng(4)
    a = rng.exponential(size=(2000, 30)) * (rng.random((2000, 30)) < 0.2)  # sparse, unit-like activations
    permutation = rng.permutation(30)
    b = a[:, permutation] + 0.3 * rng.normal(size=a.shape)
    # r[i, j]: unit i of A against unit j of B; unit i of A is unit inverse[i] of B
    r = np.corrcoef(a.T, b.T)[:30, 30:]
    matched = match_units(r)
    inverse = np.argsort(permutation)
    assert np.array_equal(matched["one_to_one"][:, 1], inverse) and np.array_equal(matched["best"], inverse)
    assert matched["one_to_one_above"] == 1.0
    # with half of B's units replaced by noise, half of A finds no match above the threshold
    b[:, :15] = rng.normal(size=(2000, 15))
    half = match_units(np.corrcoef(a.T, b.T)[:30, 30:])
    assert half["best_above"] == pytest.approx(0.5, abs=0.04)
