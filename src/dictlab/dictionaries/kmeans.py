"""K-means as a 1-sparse dictionary: Lloyd's algorithm streaming over batches, k-means++ init.

Fitting never holds more than one batch plus the k-means++ sample in memory, so it runs on stores
larger than RAM. Distances come from matrix products, ‖x‖² − 2·x·cᵀ + ‖c‖², over row chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from dictlab.dictionaries.base import Dictionary
from dictlab.errors import DictlabError

BatchSource = Callable[[], Iterator[torch.Tensor]]


def as_source(data: torch.Tensor | BatchSource, batch_size: int) -> BatchSource:
    """A tensor becomes a source of row batches; a source (e.g. a store reader) is kept as is."""
    if isinstance(data, torch.Tensor):
        return lambda: iter(data.float().split(batch_size))
    return data


def sq_distances(x: torch.Tensor, centers: torch.Tensor, center_sq: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] squared Euclidean distances, clamped at 0 against rounding."""
    if center_sq is None:
        center_sq = (centers * centers).sum(1)
    d = (x * x).sum(1, keepdim=True) - 2 * (x @ centers.T) + center_sq
    return d.clamp_min_(0)


def random_sample(source: BatchSource, n: int, seed: int) -> torch.Tensor:
    """A uniform sample of up to n rows without replacement, in one pass (smallest random keys)."""
    g = torch.Generator().manual_seed(seed)
    keep_x, keep_key = None, None
    for batch in source():
        keys = torch.rand(batch.shape[0], generator=g)
        x = batch if keep_x is None else torch.cat([keep_x, batch])
        k = keys if keep_key is None else torch.cat([keep_key, keys])
        if x.shape[0] > n:
            k, idx = torch.topk(k, n, largest=False)
            x = x[idx]
        keep_x, keep_key = x, k
    if keep_x is None:
        raise DictlabError("no data to fit on: the source gave no rows")
    return keep_x


def kmeans_plusplus(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Greedy k-means++: at each step try 2 + ln k candidates drawn ∝ D², keep the best."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, x.shape[1])
    centers[0] = x[torch.randint(n, (1,), generator=g)]
    closest = sq_distances(x, centers[:1]).squeeze(1)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: any remaining point will do
            cand = torch.randint(n, (trials,), generator=g)
        else:
            cand = torch.multinomial(closest / total, trials, replacement=True, generator=g)
        cand_closest = torch.minimum(closest.unsqueeze(0), sq_distances(x, x[cand]).T)
        best = int(cand_closest.sum(1).argmin())
        centers[i] = x[cand[best]]
        closest = cand_closest[best]
    return centers


class KMeans(Dictionary):
    """Lloyd k-means. Learned attributes: cluster_centers_, inertia_, n_iter_, inertia_history_."""

    kind = "kmeans"

    def __init__(self, k: int, n_init: int = 1, max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                 init_sample: int = 20_000, batch_size: int = 8192):
        if k < 1:
            raise DictlabError(f"k must be a positive integer, got {k}")
        self.k, self.n_init, self.max_iter, self.tol, self.seed = k, n_init, max_iter, tol, seed
        self.init_sample, self.batch_size = init_sample, batch_size
        self.cluster_centers_: torch.Tensor | None = None
        self.inertia_ = math.inf
        self.n_iter_ = 0
        self.inertia_history_: list[float] = []

    @property
    def directions(self) -> torch.Tensor:
        if self.cluster_centers_ is None:
            raise DictlabError("this k-means dictionary is not fitted yet")
        return self.cluster_centers_

    def encode_sparse(self, x):
        x = self._check(x)
        idx = sq_distances(x, self.directions).argmin(1, keepdim=True)
        return torch.ones(idx.shape), idx

    def decode_sparse(self, values, indices):
        return values[:, :1] * self.directions[indices[:, 0]]

    def fit(self, data: torch.Tensor | BatchSource, progress: bool = True) -> KMeans:
        source = as_source(data, self.batch_size)
        sample = random_sample(source, max(self.init_sample, self.k), self.seed)
        if sample.shape[0] < self.k:
            raise DictlabError(f"k={self.k} is larger than the number of rows ({sample.shape[0]})")
        best, n_rows = None, 0
        for run in range(self.n_init):
            centers = kmeans_plusplus(sample, self.k, self.seed + run)
            centers, inertia, n_iter, history, n_rows = self._lloyd(source, centers, run, progress)
            if best is None or inertia < best[1]:
                best = (centers, inertia, n_iter, history)
        self.cluster_centers_, self.inertia_, self.n_iter_, self.inertia_history_ = best
        self.n_rows_ = n_rows
        return self

    def _lloyd(self, source: BatchSource, centers: torch.Tensor, run: int, progress: bool):
        k, d = centers.shape
        history = []
        bar = tqdm(total=self.max_iter, desc=f"k-means K={k}" + (f" init {run}" if self.n_init > 1 else ""),
                   disable=not progress, dynamic_ncols=True, leave=False)
        for it in range(1, self.max_iter + 1):
            sums = torch.zeros(k, d, dtype=torch.float64)
            counts = torch.zeros(k, dtype=torch.float64)
            inertia = 0.0
            n_rows = 0
            far_d, far_x = torch.empty(0), torch.empty(0, d)  # the k rows farthest from their centre
            center_sq = (centers * centers).sum(1)
            for x in source():
                dist = sq_distances(x, centers, center_sq)
                best_d, label = dist.min(1)
                inertia += float(best_d.sum(dtype=torch.float64))
                n_rows += x.shape[0]
                counts += torch.bincount(label, minlength=k).double()
                sums.index_add_(0, label, x.double())
                far_d = torch.cat([far_d, best_d])
                far_x = torch.cat([far_x, x])
                if far_d.shape[0] > k:
                    far_d, idx = torch.topk(far_d, k)
                    far_x = far_x[idx]
            history.append(inertia)  # of the assignment to the centres before this update
            empty = counts == 0
            new = (sums / counts.clamp_min(1).unsqueeze(1)).float()
            if empty.any():  # re-seed empty clusters at the points worst served by their centre
                order = torch.argsort(far_d, descending=True)
                new[empty] = far_x[order[: int(empty.sum())]]
            centers = new
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia / max(n_rows, 1):.4g}/row")
            if it > 1 and history[-2] - inertia <= self.tol * history[-2] and not empty.any():
                break
        bar.close()
        return centers, history[-1], it, history, n_rows

    def tensors(self):
        return {"cluster_centers": self.directions}

    def config(self):
        return {"k": self.k, "n_init": self.n_init, "max_iter": self.max_iter, "tol": self.tol, "seed": self.seed,
                "init_sample": self.init_sample, "batch_size": self.batch_size,
                "inertia": self.inertia_, "n_iter": self.n_iter_, "inertia_history": self.inertia_history_}

    @classmethod
    def from_saved(cls, tensors, config):
        km = cls(**{k: config[k] for k in ("k", "n_init", "max_iter", "tol", "seed", "init_sample", "batch_size")})
        km.cluster_centers_ = tensors["cluster_centers"].float()
        km.inertia_, km.n_iter_ = config["inertia"], config["n_iter"]
        km.inertia_history_ = config["inertia_history"]
        return km
