import numpy as np
import pytest
import scipy.stats

from dictlab.measures.stats import benjamini_hochberg, bootstrap_interval, bootstrap_mean, cohens_d, permutation_test


def test_benjamini_hochberg_equals_scipy():
    rng = np.random.default_rng(0)
    for p in (rng.random(50), rng.random(7) ** 4, np.array([0.01, 0.01, 0.5, 1.0]), np.array([0.03])):
        np.testing.assert_allclose(benjamini_hochberg(p), scipy.stats.false_discovery_control(p, method="bh"))
    assert benjamini_hochberg([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        benjamini_hochberg([0.5, 1.5])


def test_permutation_p_values_are_uniform_under_the_null():
    rng = np.random.default_rng(1)
    p_values = []
    for repeat in range(200):
        x, y = rng.normal(size=40), rng.normal(size=40)  # independent: any alignment is as good as another

        def correlation(permutation, x=x, y=y):
            return np.corrcoef(x, y[permutation])[0, 1]

        p_values.append(permutation_test(correlation, 40, n=99, seed=repeat)["p"])
    assert scipy.stats.kstest(p_values, "uniform").pvalue > 0.01
    x = rng.normal(size=40)
    strong = permutation_test(lambda perm: np.corrcoef(x, (x + 0.3 * rng.normal(size=40))[perm])[0, 1], 40, n=199)
    assert strong["p"] == pytest.approx(1 / 200) and strong["observed"] > strong["null_mean"] + 3 * strong["null_std"]


def test_bootstrap_intervals_cover_the_true_mean_near_the_nominal_rate():
    rng = np.random.default_rng(2)
    covered, covered_fn = 0, 0
    for repeat in range(300):
        sample = rng.exponential(size=60)  # true mean 1, skewed
        _, low, high = bootstrap_mean(sample, n=400, seed=repeat)
        covered += low <= 1.0 <= high
        _, low, high = bootstrap_interval(lambda idx, s=sample: s[idx].mean(), 60, n=200, seed=repeat)
        covered_fn += low <= 1.0 <= high
    assert 0.88 <= covered / 300 <= 0.98 and 0.86 <= covered_fn / 300 <= 0.98  # nominal 0.95; percentile undercovers


def test_cohens_d_closed_form():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 4.0, 5.0, 6.0])
    assert cohens_d(a, b) == pytest.approx(-2 / np.sqrt(5 / 3))
    assert cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0
