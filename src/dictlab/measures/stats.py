"""Statistics every comparison reports with: bootstrap intervals and permutation tests over resampling
units (documents, contexts), Benjamini–Hochberg correction across the tests of a report, and effect
sizes.

A statistic is written once as a function of an index array: `statistic(index)` computes it over the
units `index` (for the bootstrap: a resample with replacement) or, for a permutation test, over an
alignment `permutation` of one side's units against the other's. Resampling whole documents keeps the
dependence between tokens of one document inside each draw.

Statistics over pairs of rows (CKA, k-NN, RSA) break under the bootstrap: a document drawn twice pairs
every row with an exact copy of itself. For those, `half_sample_interval` draws half of the documents
without replacement: given the sample, the spread of a half-sample estimate about the full one equals
the full estimate's sampling spread (for a mean, (s²/h)(1 − h/n) = s²/n at h = n/2), and no row is
ever duplicated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n_units: int, n: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """The statistic on all units, and its percentile bootstrap interval over `n` resamples of the units."""
    if n_units < 1:
        raise ValueError("the bootstrap needs at least one unit to resample")
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng.integers(0, n_units, n_units)) for _ in range(n)])
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(statistic(np.arange(n_units))), float(low), float(high)


def bootstrap_mean(values, n: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean over units (one value each) and its percentile bootstrap interval, vectorised."""
    return bootstrap_ratio(values, np.ones(len(values)), n, level, seed)


def bootstrap_ratio(numerators, denominators, n: int = 1000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """Σ numerators / Σ denominators over units (say, per document: the sum of a per-token score and the
    number of tokens, so every token weighs the same), with its percentile bootstrap interval over units."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if den.sum() <= 0:
        raise ValueError("the denominators sum to zero: nothing to average")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(num), (n, len(num)))
    totals = den[draws].sum(1)
    ratios = num[draws].sum(1)[totals > 0] / totals[totals > 0]
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(num.sum() / den.sum()), float(low), float(high)


def permutation_test(statistic: Callable[[np.ndarray], float], n_units: int, n: int = 1000, seed: int = 0,
                     alternative: str = "greater") -> dict:
    """Observed statistic (identity alignment) against `n` random alignments of the units.

    p = (1 + #{null at least as extreme}) / (n + 1): never 0, and valid (uniform or conservative) under
    the null. Returns the record of `tested`: observed, null mean and std, p, z."""
    rng = np.random.default_rng(seed)
    observed = float(statistic(np.arange(n_units)))
    return tested(observed, np.array([statistic(rng.permutation(n_units)) for _ in range(n)]), alternative)


def permutation_summary(observed, null, alternative: str = "greater") -> dict:
    """The null's mean and standard deviation and the permutation p-value of `observed` (any shape)
    against `null` ([n permutations, *shape]): p = (1 + #{null at least as extreme}) / (n + 1)."""
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64)
    centre = null.mean(0)
    if alternative == "greater":
        extreme = null >= observed
    elif alternative == "less":
        extreme = null <= observed
    else:
        extreme = np.abs(null - centre) >= np.abs(observed - centre)
    spread = null.std(0, ddof=1) if len(null) > 1 else np.zeros_like(centre)
    return {"null_mean": centre, "null_std": spread, "p": (1 + extreme.sum(0)) / (len(null) + 1)}


def tested(observed: float, null, alternative: str = "greater") -> dict:
    """One test's record, as every comparison reports it: the observed value beside its permutation
    null (mean, standard deviation), the p-value, and the standardised difference z = (observed − null
    mean) / null std (None for a null without spread)."""
    s = permutation_summary(observed, null, alternative)
    z = (observed - s["null_mean"]) / s["null_std"] if s["null_std"] > 0 else None
    return {"observed": float(observed), "null_mean": float(s["null_mean"]), "null_std": float(s["null_std"]),
            "p": float(s["p"]), "z": None if z is None else float(z), "alternative": alternative}


def half_samples(n_units: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """`n` seeded draws of half of the units (rounded down, at least 2), without replacement, sorted."""
    if n_units < 4:
        raise ValueError(f"half-sampling needs at least 4 units, got {n_units}")
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_units, n_units // 2, replace=False)) for _ in range(n)]


def half_sample_interval(full, draws, level: float = 0.95) -> tuple:
    """The full-sample value and its normal interval, full ± z·s, where s is the standard deviation of
    the statistic over half-samples of the units (`half_samples`): the half-sample spread about the full
    value is the full value's sampling spread, so no rescaling is needed. Centred on `full`, so a
    statistic whose level drifts with the sample size (k-NN overlap) is not shifted by the halving.
    Elementwise: `full` of any shape, `draws` [n half-samples, *shape]; floats for a scalar."""
    import scipy.stats

    full, draws = np.asarray(full, dtype=np.float64), np.asarray(draws, dtype=np.float64)
    if len(draws) < 2:
        raise ValueError(f"the interval needs at least 2 half-samples, got {len(draws)}")
    spread = draws.std(0, ddof=1) * scipy.stats.norm.ppf((1 + level) / 2)
    out = (full, full - spread, full + spread)
    return tuple(float(v) for v in out) if full.ndim == 0 else out


def unit_rows(units: np.ndarray, per_unit: int) -> np.ndarray:
    """Row indices of the given units (documents) when rows are laid out unit-major, `per_unit` rows each:
    a permutation of documents becomes the permutation of rows that keeps each row's position."""
    units = np.asarray(units, dtype=np.int64)
    return (units[:, None] * per_unit + np.arange(per_unit)).ravel()


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (the false discovery rate at which each test is rejected)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(p)
    ranked = p[order] * len(p) / np.arange(1, len(p) + 1)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def cohens_d(a, b) -> float:
    """(mean a − mean b) / pooled standard deviation."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0
