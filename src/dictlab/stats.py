"""Statistics every comparison reports with: bootstrap intervals and permutation tests over resampling
units (documents, contexts), Benjamini–Hochberg correction across the tests of a report, and effect
sizes.

A statistic is written once as a function of an index array: `statistic(index)` computes it over the
units `index` (for the bootstrap: a resample with replacement) or, for a permutation test, over an
alignment `permutation` of one side's units against the other's. Resampling whole documents keeps the
dependence between tokens of one document inside each draw.
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
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def permutation_test(statistic: Callable[[np.ndarray], float], n_units: int, n: int = 1000, seed: int = 0,
                     alternative: str = "greater") -> dict:
    """Observed statistic (identity alignment) against `n` random alignments of the units.

    p = (1 + #{null at least as extreme}) / (n + 1): never 0, and valid (uniform or conservative) under
    the null. Returns the observed value, the null's mean and standard deviation, and p."""
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    rng = np.random.default_rng(seed)
    observed = float(statistic(np.arange(n_units)))
    null = np.array([statistic(rng.permutation(n_units)) for _ in range(n)])
    centre = null.mean()
    if alternative == "greater":
        extreme = null >= observed
    elif alternative == "less":
        extreme = null <= observed
    else:
        extreme = np.abs(null - centre) >= abs(observed - centre)
    return {"observed": observed, "null_mean": float(centre), "null_std": float(null.std(ddof=1)) if n > 1 else 0.0,
            "p": float((1 + extreme.sum()) / (n + 1))}


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
