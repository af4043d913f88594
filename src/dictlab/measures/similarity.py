"""Representational similarity of two activation matrices over the same N inputs (rows aligned:
the same tokens, or tokens of two tokenizers matched by character offsets).

    linear CKA (debiased)  HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)), K = X Xᵀ, L = Y Yᵀ, with
                           Song et al.'s unbiased HSIC: ≈ 0 for independent X and Y at any N
    SVCCA                  mean canonical correlation of the top principal subspaces (99% of the variance)
    mutual k-NN            mean over rows of |kNN_X(i) ∩ kNN_Y(i)| / k, cosine neighbours, self excluded
    RSA                    Spearman correlation of the two matrices of pairwise cosine distances
    cosine                 mean row cosine, for two models that share a residual space

CKA's HSIC terms are computed from d×d feature products (O(N d²) time, O(d²) memory), never the N×N
Gram matrices; k-NN and RSA need pairwise similarities and work in row chunks (RSA on a sample).
"""

from __future__ import annotations

import numpy as np
import scipy.stats


def _float64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a [rows, features] matrix, got shape {x.shape}")
    return x


def _check(x: np.ndarray, y: np.ndarray, least: int) -> None:
    if len(x) != len(y):
        raise ValueError(f"the two representations have {len(x)} and {len(y)} rows; they must be aligned row by row")
    if len(x) < least:
        raise ValueError(f"at least {least} rows are needed, got {len(x)}")


def hsic_from_terms(cross, kk_ll, sum_kk, sum_ll, n: int):
    """Song et al. (2012)'s unbiased HSIC of linear kernels of two centred representations, from
    cross = ‖XᵀY‖²_F, kk_ll = Σ_t ‖x_t‖²‖y_t‖², and the sums of the squared row norms (K̃, L̃: the Gram
    matrices with zeroed diagonals; centring makes K̃1 = −kk, so every term is a feature product):
        tr(K̃L̃) = cross − kk_ll,  1ᵀK̃1·1ᵀL̃1 = sum_kk·sum_ll,  1ᵀK̃L̃1 = kk_ll.
    Works elementwise on arrays (numpy or torch) of these terms."""
    return (cross - kk_ll + sum_kk * sum_ll / ((n - 1) * (n - 2)) - 2 * kk_ll / (n - 2)) / (n * (n - 3))


def _hsic_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    kk, ll = (x * x).sum(1), (y * y).sum(1)
    return float(hsic_from_terms(float(np.square(x.T @ y).sum()), float(kk @ ll), kk.sum(), ll.sum(), len(x)))


def linear_cka(x, y) -> float:
    """Debiased linear CKA; 1 for representations equal up to rotation and isotropic scaling."""
    x, y = _float64(x), _float64(y)
    _check(x, y, 4)
    x, y = x - x.mean(0), y - y.mean(0)  # the feature-product form of the unbiased HSIC needs centred rows
    denominator = np.sqrt(_hsic_unbiased(x, x) * _hsic_unbiased(y, y))
    return float(_hsic_unbiased(x, y) / denominator) if denominator > 0 else 0.0


def _top_subspace(x: np.ndarray, keep: float) -> np.ndarray:
    u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    share = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
    return u[:, : int(np.searchsorted(share, keep) + 1)]  # orthonormal basis of the kept components


def svcca(x, y, keep: float = 0.99) -> float:
    """Mean canonical correlation between the principal subspaces holding `keep` of each side's variance."""
    x, y = _float64(x), _float64(y)
    _check(x, y, 2)
    correlations = np.linalg.svd(_top_subspace(x, keep).T @ _top_subspace(y, keep), compute_uv=False)
    return float(np.clip(correlations, 0, 1).mean())


def _neighbours(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    out = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), chunk):
        sim = unit[start:start + chunk] @ unit.T
        sim[np.arange(len(sim)), np.arange(start, start + len(sim))] = -np.inf  # not its own neighbour
        out[start:start + chunk] = np.argpartition(-sim, k, axis=1)[:, :k]
    return out


def mutual_knn(x, y, k: int = 10) -> float:
    """Mean share of each row's k nearest neighbours (cosine) that the two representations agree on."""
    x, y = _float64(x), _float64(y)
    _check(x, y, k + 2)
    a, b = _neighbours(x, k), _neighbours(y, k)
    return float(np.mean([len(np.intersect1d(a[i], b[i], assume_unique=True)) for i in range(len(a))]) / k)


def rsa(x, y, sample: int = 2000, seed: int = 0) -> float:
    """Spearman correlation of the pairwise cosine distances of (a seeded sample of) the rows."""
    x, y = _float64(x), _float64(y)
    _check(x, y, 3)
    if len(x) > sample:
        rows = np.random.default_rng(seed).choice(len(x), sample, replace=False)
        x, y = x[rows], y[rows]
    upper = np.triu_indices(len(x), 1)

    def distances(z):
        unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-300)
        return 1 - (unit @ unit.T)[upper]

    return float(scipy.stats.spearmanr(distances(x), distances(y)).statistic)


def mean_cosine(x, y) -> float:
    """Mean cosine of matching rows (for two models sharing a residual space)."""
    x, y = _float64(x), _float64(y)
    _check(x, y, 1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cosine needs one space: widths {x.shape[1]} and {y.shape[1]} differ")
    norms = np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-300)
    return float(((x * y).sum(1) / norms).mean())


def match_units(correlation, threshold: float = 0.5) -> dict:
    """Units of A (rows) against units of B (columns) by their activation correlation on aligned tokens.

    best: each A unit's most correlated B unit and that r; one_to_one: the Hungarian matching that
    maximises the summed r (each unit used once); the shares of A units whose best (and one-to-one)
    match exceeds `threshold`. The matching is O(n³) on a dense [n_A, n_B] matrix: a few thousand units."""
    from scipy.optimize import linear_sum_assignment

    r = np.nan_to_num(np.asarray(correlation, dtype=np.float64), nan=0.0)
    if r.ndim != 2 or 0 in r.shape:
        raise ValueError(f"expected a non-empty [units A, units B] correlation matrix, got shape {r.shape}")
    best = r.argmax(1)
    rows, cols = linear_sum_assignment(r, maximize=True)
    return {"best": best, "best_r": r[np.arange(len(r)), best], "one_to_one": np.stack([rows, cols], 1),
            "one_to_one_r": r[rows, cols], "best_above": float((r.max(1) > threshold).mean()),
            "one_to_one_above": float((r[rows, cols] > threshold).sum() / len(r))}
