"""Mini-batch k-means: centres move batch by batch, for data streamed in a shuffled order."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from dictlab.data.distributed import world_of
from dictlab.dictionaries.kmeans import ClusteringFit, KMeans, kmeans_plusplus, passes_convergence
from dictlab.dictionaries.lloyd import sq_distances
from dictlab.dictionaries.sampling import BatchSource, as_source, scan
from dictlab.errors import DictlabError


class MiniBatchKMeans(KMeans):
    """Mini-batch k-means (Sculley 2010): per-centre learning rate 1/count, streamed over epochs.

    One batch in memory at a time; `inertia_` comes from a final full pass, comparable with Lloyd's.
    """

    kind = "minibatch_kmeans"
    data_parallel = False  # the centres move batch by batch
    _PARAMS = KMeans._PARAMS + ("epochs",)

    def __init__(self, k: int, epochs: int = 2, batch_size: int = 4096, **kw):
        super().__init__(k, batch_size=batch_size, **kw)
        self.epochs = epochs

    def config(self):
        return {**super().config(), "epochs": self.epochs}

    def fit(self, data, progress: bool = True, shuffled: BatchSource | None = None) -> MiniBatchKMeans:
        """`shuffled(epoch)` may give the batches of each epoch in a new order (a store reader does)."""
        source = as_source(data, self.batch_size)
        if world_of(source) is not None:
            raise DictlabError("mini-batch k-means updates its centres batch by batch and is not data-parallel: "
                               "fit it in one process (a distributed run fits it on rank 0)")
        sample, n_rows, _ = scan(source, max(self.init_sample, self.k), self.seed)
        if self.k > n_rows:
            raise DictlabError(f"k={self.k} is larger than the number of rows ({n_rows})")
        shift = sample.mean(0)  # the frame of the fit, as Lloyd's (see kmeans.py)
        centers = kmeans_plusplus(sample - shift, self.k, self.seed)
        counts = torch.zeros(self.k)
        bar = tqdm(total=self.epochs, desc=f"mini-batch k-means K={self.k}", disable=not progress,
                   dynamic_ncols=True, leave=False)
        history = []
        for epoch in range(self.epochs):
            ewa = None
            for x in (shuffled(epoch) if shuffled else source()):
                x = x - shift
                dist = sq_distances(x, centers)
                best, label = dist.min(1)
                batch_counts = torch.bincount(label, minlength=self.k).float()
                sums = torch.zeros_like(centers).index_add_(0, label, x)
                counts += batch_counts
                hit = batch_counts > 0
                # c ← c + (Σ_batch x − m·c) / count: the running mean of every point the centre has seen
                centers[hit] += (sums[hit] - batch_counts[hit, None] * centers[hit]) / counts[hit, None]
                per_row = float(best.mean())
                ewa = per_row if ewa is None else 0.9 * ewa + 0.1 * per_row
            history.append(ewa)
            bar.update(1)
            bar.set_postfix(batch_inertia=f"{ewa:.4g}/row", refresh=False)
        bar.close()
        self.cluster_centers_, self.shift_ = centers + shift, shift
        self.inertia_ = sum(float(sq_distances(x - shift, centers).min(1).values.sum(dtype=torch.float64))
                            for x in source())
        self.n_iter_, self.inertia_history_, self.n_rows_ = self.epochs, history, n_rows
        self.convergence_ = passes_convergence(history, None, n_rows)  # a fixed number of epochs
        return self


class MiniBatchKMeansFit(ClusteringFit):
    """Mini-batch k-means over shuffled store batches, for data that does not fit in RAM."""

    method: Literal["minibatch_kmeans"] = "minibatch_kmeans"
    epochs: int = Field(2, ge=1, description="passes over the train split")
    work_field = "epochs"
    batch_size: int = Field(4096, ge=1)

    def build(self, k: int, d_in: int, d_out: int | None = None) -> MiniBatchKMeans:
        return MiniBatchKMeans(k, epochs=self.epochs, **self.common())

    def fit_group(self, dictionaries, folders, store, site, progress, world) -> None:
        for d in dictionaries:
            d.fit(store.source(site, "train", self.batch_size, world), progress, shuffled=lambda e: store.batches(
                site, "train", self.batch_size, shuffle=True, seed=self.seed + e))

    def capped(self, steps: int, iterations: int, light: bool = False) -> MiniBatchKMeansFit:
        return super().capped(steps, iterations, light).model_copy(update={"epochs": 1})
