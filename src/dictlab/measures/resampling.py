"""Intervals over held-out documents, paired across dictionaries.

Every headline number of a dictionary (FVU, CE recovered, KL) is a ratio of sums over tokens, and a
document's tokens are not independent of each other, so the resampling unit is the document. One set of
seeded bootstrap draws — draw b takes document d `counts[b, d]` times — is applied to every dictionary
of a run: the same resampled documents for every row, so that the difference between two rows' draws
is the paired bootstrap of their difference. Per document, only sums are kept (squared errors, the
row count, Σx and Σ‖x‖² for the FVU denominator; summed NLLs and KLs for CE), and a draw's statistic
is computed from weighted sums of them: exactly what the metric gives on the resampled rows (tested
against concatenating the resampled documents).

    FVU*  = Σ_d c_d e_d / (Σ_d c_d q_d − ‖Σ_d c_d s_d‖² / Σ_d c_d n_d)
            e_d = Σ_t‖x_t − x̂_t‖², q_d = Σ_t‖x_t − m‖², s_d = Σ_t (x_t − m), n_d rows (m: any fixed
            shift, here the split's mean, so the float64 sums do not cancel far from the origin)
    CE recovered* = Σ_d c_d (A_d − S_d) / Σ_d c_d (A_d − C_d)    A, S, C: summed NLL of the ablated,
                                                                spliced and clean forwards
    KL* = Σ_d c_d K_d / Σ_d c_d n_d
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95


def draw_counts(n_documents: int, n_draws: int, seed: int) -> np.ndarray | None:
    """[n_draws, n_documents] float64: how often each document is taken by each bootstrap draw (the same
    for every dictionary given the same seed and documents); None with fewer than 2 documents, where a
    bootstrap says nothing."""
    if n_documents < 2 or n_draws < 1:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_documents, (n_draws, n_documents))
    counts = np.zeros((n_draws, n_documents))
    np.add.at(counts, (np.arange(n_draws)[:, None], picks), 1.0)
    return counts


def fvu_draws(counts: np.ndarray, sq_err, rows, sq_x, sum_x) -> np.ndarray:
    """[n_draws] FVU of each draw, from per-document sums (see the module docstring)."""
    sq_err, rows, sq_x = (np.asarray(a, dtype=np.float64) for a in (sq_err, rows, sq_x))
    shifted = counts @ np.asarray(sum_x, dtype=np.float64)
    variance = counts @ sq_x - (shifted * shifted).sum(1) / (counts @ rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (counts @ sq_err) / variance


def ratio_draws(counts: np.ndarray, numerators, denominators) -> np.ndarray:
    """[n_draws] Σ c·numerator / Σ c·denominator of each draw."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (counts @ np.asarray(numerators, dtype=np.float64)) / (counts @ np.asarray(denominators,
                                                                                          dtype=np.float64))


def interval(draws, level: float = LEVEL) -> tuple[float, float] | None:
    """The percentile interval of the finite draws; None without at least 2 of them."""
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if len(draws) < 2:
        return None
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def paired_difference(a_draws, b_draws, a_value: float, b_value: float, level: float = LEVEL) -> dict | None:
    """a − b with the percentile interval of the paired draws, and whether that interval excludes 0."""
    bounds = interval(np.asarray(a_draws, dtype=np.float64) - np.asarray(b_draws, dtype=np.float64), level)
    if bounds is None:
        return None
    return {"difference": a_value - b_value, "low": bounds[0], "high": bounds[1],
            "significant": bool(bounds[0] > 0 or bounds[1] < 0)}
