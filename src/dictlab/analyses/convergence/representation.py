"""Layer × layer representational similarity of two models on the same aligned tokens, with a
permutation null and an interval for every layer pair and metric.

Rows are document-major: D documents × m aligned positions each (row d·m + s is position s of
document d in both models). The metrics are those of measures/similarity.py — debiased linear CKA, SVCCA, mutual
k-NN, RSA and, for two models that share a residual space, the mean cosine — computed for all layer
pairs at once:
- null: documents shuffled against each other (A's document d paired with B's document π(d), position
  by position), so what survives is similarity beyond the shared structure of position and corpus;
- interval: half of the documents drawn without replacement (stats.half_sample_interval): statistics
  over pairs of rows cannot take a bootstrap's duplicated documents.
Each layer is prepared once (centred features, principal basis, neighbour lists, RSA rank matrix); a
permutation only re-indexes B's prepared layers, so the null costs the cross products alone. RSA uses
`rsa_positions` of each document's positions (an N×N rank matrix would not fit); torch runs the
products on the GPU when there is one.
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.stats
import torch
from tqdm.auto import tqdm

from dictlab.measures.similarity import hsic_from_terms
from dictlab.measures.stats import half_sample_interval, half_samples, permutation_summary, unit_rows

METRICS = ("cka", "svcca", "knn", "rsa", "cosine")


def spread(per_doc: int, most: int) -> np.ndarray:
    """`most` of a document's `per_doc` positions, evenly spread (first and last included)."""
    return np.unique(np.round(np.linspace(0, per_doc - 1, most)).astype(int))


def rsa_rows(n_docs: int, per_doc: int, rsa_positions: int) -> np.ndarray:
    """Rows of the RSA subset: `rsa_positions` of every document's positions, evenly spread, document-major."""
    return (np.arange(n_docs)[:, None] * per_doc + spread(per_doc, rsa_positions)).ravel()


class Side:
    """One model's layers prepared for every metric, on the same N rows."""

    def __init__(self, layers: list[torch.Tensor], metrics: tuple, k: int, keep: float, rsa_index: np.ndarray,
                 device: str):
        self.metrics, self.n = metrics, layers[0].shape[0]
        xs = [x.to(device, torch.float32) for x in layers]
        centred = [x - x.mean(0) for x in xs]
        self.widths = [x.shape[1] for x in xs]
        self.centred = torch.cat(centred, 1)
        self.kk = torch.stack([(c * c).sum(1) for c in centred])  # [L, N]: squared norms of the centred rows
        if "cka" in metrics:
            self.hsic = torch.stack([_hsic(c, c, kk, kk, self.n) for c, kk in zip(centred, self.kk)])
        if "svcca" in metrics:
            bases = [_principal_basis(c, keep) for c in centred]
            self.ranks, self.basis = [b.shape[1] for b in bases], torch.cat(bases, 1)
        if "knn" in metrics:
            if self.n <= k + 1:
                raise ValueError(f"mutual k-NN with k = {k} needs more than {k + 1} rows, got {self.n}")
            self.neighbours = torch.stack([_neighbours(x, k) for x in xs])  # [L, N, k]
        if "rsa" in metrics:
            self.rsa = torch.stack([_rank_matrix(x[torch.as_tensor(rsa_index, device=device)]) for x in xs])
        if "cosine" in metrics:
            self.unit = torch.stack([torch.nn.functional.normalize(x, dim=1) for x in xs])  # one width per model

    def permuted(self, rows: np.ndarray, rsa_rows_perm: np.ndarray) -> Side:
        """This side with row r replaced by row rows[r] (and the RSA subset likewise), prepared data re-indexed."""
        out = copy.copy(self)
        r = torch.as_tensor(rows, device=self.centred.device)
        out.centred, out.kk = self.centred[r], self.kk[:, r]
        if "svcca" in self.metrics:
            out.basis = self.basis[r]
        if "knn" in self.metrics:
            inverse = torch.empty_like(r)
            inverse[r] = torch.arange(len(r), device=r.device)
            out.neighbours = inverse[self.neighbours[:, r]]  # row r's neighbours, renamed to the new row order
        if "rsa" in self.metrics:
            q = torch.as_tensor(rsa_rows_perm, device=self.centred.device)
            out.rsa = self.rsa[:, q][:, :, q]
        if "cosine" in self.metrics:
            out.unit = self.unit[:, r]
        return out


def _hsic(x, y, kk, ll, n):
    cross = torch.square(x.T @ y).sum(dtype=torch.float64)
    return hsic_from_terms(cross, (kk.double() * ll.double()).sum(), kk.sum(dtype=torch.float64),
                           ll.sum(dtype=torch.float64), n)


def _principal_basis(centred: torch.Tensor, keep: float) -> torch.Tensor:
    """Orthonormal basis [N, r] of the top principal components holding `keep` of the variance."""
    values, vectors = torch.linalg.eigh(centred.T.double() @ centred.double())
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    share = torch.cumsum(values, 0) / values.sum().clamp_min(1e-300)
    r = int(torch.searchsorted(share, torch.tensor(keep, dtype=share.dtype, device=share.device))) + 1
    r = min(r, int((values > values[0] * 1e-12).sum()))
    return ((centred.double() @ vectors[:, :r]) / values[:r].sqrt()).float()


def _neighbours(x: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    unit = torch.nn.functional.normalize(x, dim=1)
    out = []
    for start in range(0, len(x), chunk):
        sim = unit[start:start + chunk] @ unit.T
        sim[torch.arange(len(sim)), torch.arange(start, start + len(sim))] = -torch.inf  # not its own neighbour
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def _rank_matrix(x: torch.Tensor) -> torch.Tensor:
    """Symmetric [R, R] matrix of the standardised ranks of the pairwise cosine distances (zero diagonal):
    Spearman's ρ of two such matrices is half their elementwise product summed."""
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    upper = torch.triu_indices(len(x), len(x), 1, device=x.device)
    distances = (1 - unit @ unit.T)[upper[0], upper[1]]
    ranks = torch.as_tensor(scipy.stats.rankdata(distances.cpu().numpy()), device=x.device)
    ranks = ranks - ranks.mean()
    ranks = ranks / ranks.norm().clamp_min(1e-300)
    out = torch.zeros(len(x), len(x), dtype=torch.float32, device=x.device)
    out[upper[0], upper[1]] = ranks.float()
    return out + out.T


def _mean_canonical_correlation(cross: torch.Tensor) -> float:
    """Mean singular value of the product of two orthonormal bases, from the eigenvalues of its smaller
    Gram matrix (half the time of an SVD)."""
    m = cross.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram).clamp(0, 1).sqrt().mean())


def scores(a: Side, b: Side) -> dict[str, np.ndarray]:
    """Every metric for every layer pair: {metric: [L_A, L_B]}."""
    out = {}
    if "cka" in a.metrics:
        n = a.n
        cross = torch.stack([torch.stack([block.double().square().sum() for block in
                                          torch.split(a_layer.T @ b.centred, b.widths, 1)])
                             for a_layer in torch.split(a.centred, a.widths, 1)])
        kk_ll = a.kk.double() @ b.kk.double().T
        hsic = hsic_from_terms(cross, kk_ll, a.kk.sum(1, dtype=torch.float64)[:, None],
                               b.kk.sum(1, dtype=torch.float64)[None, :], n)
        denominator = (a.hsic[:, None] * b.hsic[None, :]).sqrt()
        out["cka"] = torch.where(denominator > 0, hsic / denominator.clamp_min(1e-300), 0.0).cpu().numpy()
    if "svcca" in a.metrics:
        out["svcca"] = np.array([[_mean_canonical_correlation(block)
                                  for block in torch.split(basis.T @ b.basis, b.ranks, 1)]
                                 for basis in torch.split(a.basis, a.ranks, 1)])
    if "knn" in a.metrics:
        k = a.neighbours.shape[2]
        out["knn"] = np.array([[float((na.unsqueeze(2) == nb.unsqueeze(1)).sum()) / (a.n * k) for nb in b.neighbours]
                               for na in a.neighbours])
    if "rsa" in a.metrics:
        out["rsa"] = (0.5 * a.rsa.flatten(1) @ b.rsa.flatten(1).T).double().cpu().numpy()
    if "cosine" in a.metrics:
        out["cosine"] = (torch.einsum("lnd,mnd->lm", a.unit.double(), b.unit.double()) / a.n).cpu().numpy()
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def layer_sweep(acts_a: list[torch.Tensor], acts_b: list[torch.Tensor], n_docs: int, per_doc: int,
                metrics=("cka", "svcca", "knn", "rsa"), k: int = 10, keep: float = 0.99, rsa_positions: int = 8,
                permutations: int = 200, n_half: int = 50, level: float = 0.95, seed: int = 0,
                device: str | None = None, progress: bool = False) -> dict:
    """Every metric for every (A layer, B layer) pair with its permutation null and half-sample interval.

    `acts_a`, `acts_b`: one [n_docs·per_doc, d] matrix per layer, document-major and row-aligned.
    Returns {metric: {value, null_mean, null_std, p, z, low, high}}, each an [L_A, L_B] list of lists;
    z = (value − null mean) / null std, the standardised difference from chance."""
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; accepted: {', '.join(METRICS)}")
    if "cosine" in metrics and len({x.shape[1] for x in [*acts_a, *acts_b]}) > 1:
        raise ValueError("cosine needs one residual space: the two models' widths differ")
    n_rows = n_docs * per_doc
    for x in [*acts_a, *acts_b]:
        if x.shape[0] != n_rows:
            raise ValueError(f"expected {n_docs} documents × {per_doc} positions = {n_rows} rows, got {x.shape[0]}")
    if not 1 <= rsa_positions <= per_doc:
        raise ValueError(f"rsa_positions must lie in 1..{per_doc} (the positions per document), got {rsa_positions}")
    device = device or default_device()
    def side(layers, docs):
        return Side(layers, metrics, k, keep, rsa_rows(docs, per_doc, rsa_positions), device)

    a, b = side(acts_a, n_docs), side(acts_b, n_docs)
    observed = scores(a, b)
    rng = np.random.default_rng(seed)
    bar = tqdm(total=permutations + n_half, desc="layer pairs: null and intervals", disable=not progress,
               dynamic_ncols=True)
    null = {m: [] for m in metrics}
    rsa_per_doc = len(spread(per_doc, rsa_positions))
    for _ in range(permutations):
        docs = rng.permutation(n_docs)
        for m, v in scores(a, b.permuted(unit_rows(docs, per_doc), unit_rows(docs, rsa_per_doc))).items():
            null[m].append(v)
        bar.update()
    halves = {m: [] for m in metrics}
    for docs in half_samples(n_docs, n_half, seed + 1):
        rows = torch.as_tensor(unit_rows(docs, per_doc))
        part = scores(side([x[rows] for x in acts_a], len(docs)), side([x[rows] for x in acts_b], len(docs)))
        for m, v in part.items():
            halves[m].append(v)
        bar.update()
    bar.close()
    out = {}
    for m in metrics:
        summary = permutation_summary(observed[m], np.array(null[m]), "greater")
        value, low, high = half_sample_interval(observed[m], np.array(halves[m]), level)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(summary["null_std"] > 0, (value - summary["null_mean"]) / summary["null_std"], np.nan)
        out[m] = {key: np.where(np.isfinite(v), v, None).tolist() for key, v in
                  {"value": value, **summary, "z": z, "low": low, "high": high}.items()}
    return out
