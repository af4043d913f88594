"""Held-out metrics, defined once. Reconstruction and sparsity are streamed over batches with running
sums (memory O(batch + n_latents)); cluster quality is computed on a seeded sample of rows.

Reconstruction, over the N evaluated rows of width d (x̂: the decoding, ŷ for a transcoder):
    MSE = Σ_t ‖x_t − x̂_t‖² / (N·d)                 per element
    FVU = Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖²        x̄: mean of the evaluated rows; EV = 1 − FVU
    cos = mean_t cos(x_t, x̂_t)                     (x̂ = 0 counts as 0)
    relative_norm γ = Σ_t ‖x̂_t‖² / Σ_t x_t·x̂_t     the scale that best maps x̂ back onto x is 1/γ:
                                                   γ < 1 means shrunk reconstructions
Sparsity, over the codes a_t:
    L0 = mean_t #{j : a_tj ≠ 0} (and its histogram)     L1 = mean_t Σ_j |a_tj|
    frequency f_j = #{t : a_tj ≠ 0} / N;   dead: f_j = 0;   dense: f_j > 0.1
    log-frequency histogram: counts of log10 f_j over FREQ_EDGES (dead latents left out)
Cluster quality (a row's cluster is `Dictionary.clusters`: the nearest centroid, the most responsible
component, or an SAE's latent with the largest |a_j|·‖d_j‖), Euclidean, on a seeded sample:
    silhouette = mean_t (b_t − a_t) / max(a_t, b_t)  (0 for a row alone in its cluster)
    Calinski–Harabasz = [tr(B) / (k − 1)] / [tr(W) / (n − k)]
    Davies–Bouldin = mean_i max_{j≠i} (s_i + s_j) / ‖μ_i − μ_j‖,  s_i: mean distance to centroid i
    inertia = tr(W) / n: mean squared distance of a row to its cluster's mean in the sample
and over the whole split: cluster-size entropy H = −Σ_c p_c ln p_c (nats) and clusters used.

Sums are accumulated in float64 so the FVU denominator Σ‖x‖² − N‖x̄‖² stays exact enough.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from dictlab.data.store import select_rows
from dictlab.dictionaries.base import Dictionary

DENSE_FREQUENCY = 0.1
FREQ_EDGES = [x / 2 for x in range(-16, 1)]  # log10 frequency, 1e-8 .. 1, half-decade bins


@dataclass(frozen=True)
class Reconstruction:
    n_rows: int
    mse: float
    fvu: float
    explained_variance: float
    cosine: float
    relative_norm: float
    l0: float
    l1: float
    dead_fraction: float
    dense_fraction: float
    l0_histogram: list[int]  # rows with L0 = 0, 1, 2, ...
    log10_frequency_histogram: list[int]  # latents per FREQ_EDGES bin

    def as_dict(self) -> dict:
        return asdict(self)


class ReconstructionMeter:
    """Accumulates x, x̂ and the codes batch by batch, as float64 tensors where the batches are (a GPU
    keeps its sums and is read once, in `result`)."""

    def __init__(self, n_latents: int, n_documents: int = 0):
        self.n, self.n_latents, self.n_documents = 0, n_latents, n_documents
        self.sums: dict[str, torch.Tensor] | None = None
        self.sum_x: torch.Tensor | None = None
        self.fires: torch.Tensor | None = None
        self.l0_counts: torch.Tensor | None = None
        self.documents: dict[str, torch.Tensor] | None = None  # per-document sums (resampling.py)

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
               documents: torch.Tensor | None = None) -> None:
        """x, x̂: [N, d]; the codes as (values, indices) [N, k] pairs, zeros where a slot is inactive;
        `documents` [N]: each row's document as a position in 0 .. n_documents − 1 (for intervals)."""
        if self.sums is None:
            zero = torch.zeros((), dtype=torch.float64, device=x.device)
            self.sums = {k: zero.clone() for k in ("sq_err", "sum_sq_x", "sum_sq_hat", "dot", "cos", "l1")}
            self.sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.fires = torch.zeros(self.n_latents, dtype=torch.long, device=x.device)
            self.l0_counts = torch.zeros(values.shape[1] + 1, dtype=torch.long, device=x.device)
        x64, hat64 = x.double(), x_hat.double()
        err = x64 - hat64
        self.n += x.shape[0]
        s = self.sums
        row_sq_err = (err * err).sum(1)
        s["sq_err"] += row_sq_err.sum()
        if documents is not None:
            self._add_documents(x64, row_sq_err, documents.to(x.device))
        self.sum_x += x64.sum(0)
        s["sum_sq_x"] += (x64 * x64).sum()
        s["sum_sq_hat"] += (hat64 * hat64).sum()
        s["dot"] += (x64 * hat64).sum()
        s["cos"] += torch.nn.functional.cosine_similarity(x64, hat64, dim=1, eps=1e-12).sum()
        active = values != 0
        s["l1"] += values.abs().double().sum()
        self.fires += torch.bincount(indices[active], minlength=self.n_latents)
        l0 = torch.bincount(active.sum(1), minlength=values.shape[1] + 1)
        if len(l0) > len(self.l0_counts):  # a batch with more slots than the first
            l0[: len(self.l0_counts)] += self.l0_counts
            self.l0_counts = l0
        else:
            self.l0_counts[: len(l0)] += l0

    def _add_documents(self, x64: torch.Tensor, row_sq_err: torch.Tensor, documents: torch.Tensor) -> None:
        if self.documents is None:
            zeros = torch.zeros(self.n_documents, dtype=torch.float64, device=x64.device)
            # shift: the first batch's mean, fixed from then on (any fixed shift gives the same FVU)
            self.documents = {"sq_err": zeros, "rows": zeros.clone(), "sq_x": zeros.clone(), "shift": x64.mean(0),
                              "sum_x": torch.zeros(self.n_documents, x64.shape[1], dtype=torch.float64,
                                                   device=x64.device)}
        d = self.documents
        centred = x64 - d["shift"]
        d["sq_err"].index_add_(0, documents, row_sq_err)
        d["rows"].index_add_(0, documents, torch.ones_like(row_sq_err))
        d["sq_x"].index_add_(0, documents, (centred * centred).sum(1))
        d["sum_x"].index_add_(0, documents, centred)

    def per_document(self) -> dict | None:
        """Per-document sums for `resampling.fvu_draws` (numpy, float64): sq_err, rows, sq_x, sum_x;
        None when no document positions were given."""
        if self.documents is None:
            return None
        return {k: v.cpu().numpy() for k, v in self.documents.items() if k != "shift"}

    def result(self) -> Reconstruction:
        if self.n == 0:
            raise ValueError("no rows were evaluated")
        sums = {k: float(v) for k, v in self.sums.items()}
        sum_x, fires = self.sum_x.cpu(), self.fires.cpu()
        l0_counts = self.l0_counts.cpu()
        l0_counts = l0_counts[: int(l0_counts.nonzero().max()) + 1] if l0_counts.any() else l0_counts[:1]
        d = sum_x.shape[0]
        total_var = sums["sum_sq_x"] - float((sum_x * sum_x).sum()) / self.n
        fvu = sums["sq_err"] / total_var if total_var > 0 else math.nan
        freq = fires.double() / self.n
        live = freq[freq > 0].log10()
        edges = torch.tensor(FREQ_EDGES, dtype=torch.float64)
        bins = torch.bucketize(live, edges[1:-1], right=True)  # bin i: edges[i] <= log10 f < edges[i+1]
        return Reconstruction(
            n_rows=self.n,
            mse=sums["sq_err"] / (self.n * d),
            fvu=fvu,
            explained_variance=1 - fvu,
            cosine=sums["cos"] / self.n,
            relative_norm=sums["sum_sq_hat"] / sums["dot"] if sums["dot"] else math.nan,
            l0=float((l0_counts * torch.arange(len(l0_counts))).sum()) / self.n,
            l1=sums["l1"] / self.n,
            dead_fraction=float((fires == 0).double().mean()),
            dense_fraction=float((freq > DENSE_FREQUENCY).double().mean()),
            l0_histogram=l0_counts.tolist(),
            log10_frequency_histogram=torch.bincount(bins, minlength=len(FREQ_EDGES) - 1).tolist(),
        )


@torch.no_grad()
def evaluate_reconstruction(dictionary: Dictionary, batches: Iterable) -> tuple[Reconstruction, float]:
    """Encode and decode every batch through the dictionary's sparse form and score it; also returns
    the encoding throughput (rows/s, encode_sparse alone).

    A batch is x, or (x, y) for a transcoder: then ŷ = decode(encode(x)) is scored against y.
    """
    result, rows_per_s, _ = evaluate_with_documents(dictionary, batches)
    return result, rows_per_s


@torch.no_grad()
def evaluate_with_documents(dictionary: Dictionary, batches: Iterable,
                            n_documents: int = 0) -> tuple[Reconstruction, float, dict | None]:
    """`evaluate_reconstruction`, where a batch may also be (x, y, documents), each row's document as a
    position below `n_documents`; also returns the per-document sums that intervals are resampled from
    (None without document positions)."""
    import time

    meter, encode_seconds = ReconstructionMeter(dictionary.n_latents, n_documents), 0.0
    for batch in batches:
        x, y, documents = (*batch, None)[:3] if isinstance(batch, tuple) else (batch, batch, None)
        _wait(x)
        start = time.perf_counter()
        values, indices = dictionary.encode_sparse(x)
        _wait(values)
        encode_seconds += time.perf_counter() - start
        meter.update(y, dictionary.reconstruct(x, values, indices), values, indices, documents)
    result = meter.result()
    return result, result.n_rows / encode_seconds if encode_seconds > 0 else math.inf, meter.per_document()


def _wait(t: torch.Tensor) -> None:
    """Let a GPU finish its queued work, so that a timer measures it."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


# --- cluster quality ---------------------------------------------------------------------------------
class ClusterSample:
    """A seeded sample of rows and their pairwise distances, shared by every dictionary of a site."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows.float()
        x = rows.double()
        self.x = x - x.mean(0)  # distances do not change; the products cancel less
        sq = (self.x * self.x).sum(1)
        dist = torch.empty(len(x), len(x))
        for i in range(0, len(x), 1024):
            part = sq[i:i + 1024, None] - 2 * self.x[i:i + 1024] @ self.x.T + sq[None]
            dist[i:i + 1024] = part.clamp_min_(0).sqrt_().float()
        dist.fill_diagonal_(0)
        self.dist = dist

    @classmethod
    def from_batches(cls, batches: Iterable[torch.Tensor], n_rows: int, size: int, seed: int) -> ClusterSample:
        """Rows at `size` seeded random positions of the stream (all rows when there are fewer)."""
        chosen = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))[:size].sort().values
        return cls(torch.cat([x for _, x in select_rows(batches, chosen)]))

    def quality(self, labels: torch.Tensor) -> dict:
        """Silhouette, Calinski–Harabasz, Davies–Bouldin and inertia of these labels (one per row)."""
        nan = {"silhouette": math.nan, "calinski_harabasz": math.nan, "davies_bouldin": math.nan}
        _, lab = torch.unique(labels, return_inverse=True)
        n, k = len(lab), int(lab.max()) + 1 if len(lab) else 0
        counts = torch.bincount(lab, minlength=k).double()
        means = torch.zeros(k, self.x.shape[1], dtype=torch.float64).index_add_(0, lab, self.x) / counts[:, None]
        to_own = (self.x - means[lab]).norm(dim=1)
        within = float((to_own * to_own).sum())
        out = {"inertia": within / n}
        if not 2 <= k <= n - 1:
            return {**nan, **out}
        # silhouette: mean distance of each row to every cluster
        per_cluster = torch.zeros(n, k, dtype=torch.float64)
        for i in range(0, n, 1024):
            per_cluster[i:i + 1024].index_add_(1, lab, self.dist[i:i + 1024].double())
        own = counts[lab]
        a = per_cluster[torch.arange(n), lab] / (own - 1).clamp_min(1)
        others = per_cluster / counts
        others[torch.arange(n), lab] = math.inf
        b = others.min(1).values
        s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-300), torch.zeros(n, dtype=torch.float64))
        between = float((counts * (means * means).sum(1)).sum())  # about the sample mean, which is 0
        spread = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, to_own) / counts
        gaps = torch.cdist(means, means)
        gaps.fill_diagonal_(math.inf)
        gaps[gaps == 0] = math.inf
        ratio = ((spread[:, None] + spread[None]) / gaps).max(1).values
        return {**out, "silhouette": float(s.mean()),
                "calinski_harabasz": between / (k - 1) / (within / (n - k)) if within > 0 else math.inf,
                "davies_bouldin": float(ratio.mean())}


def cluster_sizes(labels: Iterable[torch.Tensor], n_units: int) -> dict:
    """Entropy (nats) of the cluster sizes over a whole split, and how many clusters are used."""
    counts = torch.zeros(n_units, dtype=torch.long)
    for lab in labels:
        counts = counts.to(lab.device) + torch.bincount(lab, minlength=n_units)
    counts = counts.cpu()
    p = counts[counts > 0].double() / counts.sum()
    return {"cluster_entropy": float(-(p * p.log()).sum()), "clusters_used": int((counts > 0).sum())}


@torch.no_grad()
def cluster_quality(dictionary: Dictionary, sample: ClusterSample, batches: Callable[[], Iterable]) -> dict:
    """Every cluster-quality number of one dictionary: on the sample, and entropy over `batches()`."""
    # + 1: rows with no active unit (an SAE can leave some) form one more cluster
    sizes = cluster_sizes((dictionary.clusters(x) for x in batches()), dictionary.n_latents + 1)
    return {**sample.quality(dictionary.clusters(sample.rows.to(dictionary.device)).cpu()), **sizes}
