"""Lloyd and spherical k-means as dictionaries, and their `fit:` entries (kmeans, spherical_kmeans).

K-means is a 1-sparse dictionary. Two decodings share the same assignment j (the nearest centre):
  centroid    x̂ = c_j                 code 1 on unit j
  gain_shape  x̂ = (x·u_j) u_j         code x·u_j on unit j, u_j = c_j / ‖c_j‖ (an SAE with L0 = 1)

The assignment is computed in the frame the fit used: rows and centres less the fit's shift (the
sample mean, kept as `shift_`). Residual streams sit far from the origin (norm ~5000), where
‖x‖² − 2·x·cᵀ + ‖c‖² in float32 cancels enough to send rows to the wrong centre; about the
shift, x − shift is exact in the dimensions that carry the offset, and little is left to cancel.

Fitting streams batches from a source (a store reader or a tensor) and never holds more than one
batch, the k-means++ sample, the accumulators and one label per row. Several K (and n_init restarts)
share each pass (lloyd.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from dictlab.data import distributed
from dictlab.data.distributed import world_of
from dictlab.dictionaries.base import Dictionary
from dictlab.dictionaries.learner import NAME, Learner, positive_sizes
from dictlab.dictionaries.lloyd import lloyd, normalize_rows, sq_distances
from dictlab.dictionaries.sampling import BatchSource, as_source, scan
from dictlab.errors import DictlabError


def kmeans_plusplus(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Greedy k-means++: at each step try 2 + ln k candidates drawn ∝ D², keep the best."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, x.shape[1])
    centers[0] = x[torch.randint(n, (1,), generator=g)]
    x_sq = (x * x).sum(1, keepdim=True)  # once: each of the k steps scores every row again
    closest = sq_distances(x, centers[:1], x_sq=x_sq).squeeze(1)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: any remaining point will do
            cand = torch.randint(n, (trials,), generator=g)
        else:
            cand = torch.multinomial(closest / total, trials, replacement=True, generator=g)
        cand_closest = torch.minimum(closest.unsqueeze(0), sq_distances(x, x[cand], x_sq=x_sq).T)
        best = int(cand_closest.sum(1).argmin())
        centers[i] = x[cand[best]]
        closest = cand_closest[best]
    return centers


def default_shift(saved: torch.Tensor | None, centers: torch.Tensor) -> torch.Tensor:
    """The saved frame of a fit; a dictionary saved without one (older dictlab) takes its centres' mean:
    any point near the data keeps the subtraction exact where it matters."""
    return centers.mean(0) if saved is None else saved.float()


def passes_convergence(history: list[float], converged: bool | None, rows: int) -> dict:
    """How a fit by passes over the data ended (Lloyd, EM): passes, rows seen, whether it met its
    tolerance (None: it has none), and the last pass's relative change of its objective."""
    change = abs(history[-1] - history[-2]) / max(abs(history[-2]), 1e-300) if len(history) > 1 else None
    return {"converged": converged, "tokens_seen": len(history) * rows, "epochs": len(history),
            "final_relative_change": change}


class KMeans(Dictionary):
    """Lloyd k-means. Learned attributes: cluster_centers_, inertia_, n_iter_, inertia_history_."""

    kind = "kmeans"
    decodings = ("centroid", "gain_shape")
    spherical = False

    def __init__(self, k: int, n_init: int = 1, max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                 init_sample: int = 20_000, batch_size: int = 8192, decoding: str | None = None):
        if k < 1:
            raise DictlabError(f"k must be a positive integer, got {k}")
        self.k, self.n_init, self.max_iter, self.tol, self.seed = k, n_init, max_iter, tol, seed
        self.init_sample, self.batch_size = init_sample, batch_size
        self.decoding = self._check_decoding(decoding or self.decodings[0])
        self.cluster_centers_: torch.Tensor | None = None
        self.shift_: torch.Tensor | None = None  # the frame of the fit (Euclidean only)
        self.inertia_ = math.inf
        self.n_iter_ = 0
        self.inertia_history_: list[float] = []

    @property
    def centers(self) -> torch.Tensor:
        if self.cluster_centers_ is None:
            raise DictlabError(f"this {self.kind} dictionary is not fitted yet")
        return self.cluster_centers_

    @property
    def directions(self) -> torch.Tensor:
        return normalize_rows(self.centers) if self.decoding == "gain_shape" else self.centers

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre (highest cosine for spherical k-means), about the fit's shift."""
        if self.spherical:
            return (x @ self.centers.T).argmax(1)
        if self.shift_ is None:
            return sq_distances(x, self.centers).argmin(1)
        return sq_distances(x - self.shift_, self.centers - self.shift_).argmin(1)

    unit_kind = "cluster"

    @property
    def encode_flops(self) -> int:
        return 2 * self.k * self.d_model  # the distance product; the argmin is O(K)

    @property
    def fit_flops_per_row(self) -> int:
        return 2 * self.k * self.d_model + self.d_model  # a pass: assign, then add the row to its centre's sum

    def clusters(self, x):
        return self.assign(self._check(x))

    def unit_scores(self, x):
        x = self._check(x)
        idx = self.assign(x)
        if self.spherical:
            score = (normalize_rows(x) * self.centers[idx]).sum(1, keepdim=True)
        else:
            score = -(x - self.centers[idx]).square().sum(1, keepdim=True)
        return score, idx.unsqueeze(1), torch.ones_like(score, dtype=torch.bool)

    def encode_sparse(self, x):
        x = self._check(x)
        idx = self.assign(x).unsqueeze(1)
        if self.decoding == "gain_shape":
            return (x.unsqueeze(1) @ self.directions[idx].transpose(1, 2)).squeeze(1), idx
        return torch.ones(idx.shape, device=idx.device), idx

    def fit(self, data: torch.Tensor | BatchSource, progress: bool = True,
            init: torch.Tensor | None = None, device: torch.device | str | None = None) -> KMeans:
        """Fit by Lloyd's algorithm; `init` [k, d] replaces k-means++ (e.g. to compare with a peer).
        The passes run on `device` (see `fit_many`)."""
        fit_many([self], data, progress, init=init, device=device)
        return self

    def tensors(self):
        return {"cluster_centers": self.centers, **({} if self.shift_ is None else {"shift": self.shift_})}

    def config(self):
        return {"k": self.k, "n_init": self.n_init, "max_iter": self.max_iter, "tol": self.tol, "seed": self.seed,
                "init_sample": self.init_sample, "batch_size": self.batch_size, "decoding": self.decoding,
                "inertia": self.inertia_, "n_iter": self.n_iter_, "inertia_history": self.inertia_history_,
                "bf16_recheck_fraction": getattr(self, "bf16_recheck_fraction_", None)}

    _PARAMS = ("k", "n_init", "max_iter", "tol", "seed", "init_sample", "batch_size", "decoding")

    @classmethod
    def from_saved(cls, tensors, config):
        km = cls(**{k: config[k] for k in cls._PARAMS if k in config})
        km.cluster_centers_ = tensors["cluster_centers"].float()
        km.shift_ = None if km.spherical else default_shift(tensors.get("shift"), km.cluster_centers_)
        km.inertia_, km.n_iter_ = config["inertia"], config["n_iter"]
        km.inertia_history_ = config["inertia_history"]
        return km


class SphericalKMeans(KMeans):
    """Cosine k-means: unit-normalised data and centres; inertia is Σ (1 − cos).

    Its centres are unit vectors, so only the gain-shape decoding reconstructs a row's scale.
    """

    kind = "spherical_kmeans"
    decodings = ("gain_shape",)
    spherical = True


def fit_many(models: list[KMeans], data: torch.Tensor | BatchSource, progress: bool = True,
             init: torch.Tensor | None = None, device: torch.device | str | None = None) -> list[KMeans]:
    """Fit several k-means models (any K, same kind) with shared passes over the data.

    Each model ends exactly as it would fitted alone: the passes are shared, the arithmetic is not.
    The passes run on `device` (default: this process's GPU when there is one, see
    `distributed.device`); the sample and k-means++ stay on the CPU, the centres come back to it.
    """
    if len({type(m) for m in models}) != 1:
        raise DictlabError("fit_many takes models of one kind")
    first = models[0]
    device = distributed.device() if device is None else torch.device(device)
    source = as_source(data, first.batch_size)
    sample, n_rows, max_abs = scan(source, max(first.init_sample, max(m.k for m in models)), first.seed, device)
    for m in models:
        if m.k > n_rows:
            raise DictlabError(f"k={m.k} is larger than the number of rows ({n_rows})")
    # Euclidean k-means runs on data shifted by the sample mean: distances are unchanged, but
    # ‖x‖² − 2·x·cᵀ + ‖c‖² cancels far less (residual streams sit far from the origin), so fp32
    # assignments match fp64 ones (see test_centering_matches_float64_assignments).
    shift = None if first.spherical else sample.mean(0)
    sample = normalize_rows(sample) if first.spherical else sample - shift
    inits, owners = [], []
    if init is not None:
        if len(models) != 1 or tuple(init.shape) != (first.k, sample.shape[1]):
            raise DictlabError(f"init must be one [k, d] = [{first.k}, {sample.shape[1]}] tensor for one model")
        init = init.float()
        inits, owners = [normalize_rows(init) if first.spherical else init - shift], [first]
    for m in models if init is None else []:
        for run in range(m.n_init):
            c = kmeans_plusplus(sample, m.k, m.seed + run)
            inits.append(normalize_rows(c) if first.spherical else c)
            owners.append(m)
    inits = [c.to(device).contiguous() for c in inits]
    world = world_of(source)
    if world is not None:  # every rank drew the same inits from the same sample; rank 0's are used regardless
        inits = [world.broadcast(c) for c in inits]
    states = lloyd(source, inits, first.max_iter, first.tol, max_abs, n_rows, first.spherical, progress,
                   shift=None if shift is None else shift.to(device))
    for m in models:
        best = min((s for s, o in zip(states, owners) if o is m), key=lambda s: s.history[-1])
        centers = best.centers.cpu()
        m.cluster_centers_ = centers if shift is None else centers + shift.cpu()
        m.shift_ = None if shift is None else shift.cpu()
        m.inertia_, m.n_iter_, m.inertia_history_ = best.history[-1], len(best.history), best.history
        m.bf16_recheck_fraction_ = best.rechecked / best.rows if best.rows else None
        m.n_rows_ = n_rows
        m.convergence_ = passes_convergence(best.history, best.done, n_rows)
    return models


class ClusteringFit(Learner):
    """Options every clustering learner shares (k-means family and mixtures); sizes are the K values."""

    size_field = "k"
    k: list[int] = Field(default_factory=lambda: [64, 128, 256], description="cluster counts")
    name: str | None = NAME
    site: str | None = Field(None, description="fit on this site only (default: every site of the store)")
    max_iter: int = Field(100, ge=1)
    tol: float = Field(1e-4, ge=0, description="stop when inertia improves by less than this fraction")
    seed: int = 0
    batch_size: int = Field(8192, ge=1, description="rows per streamed batch")
    init_sample: int = Field(20_000, ge=1, description="rows k-means++ seeds from")

    _sizes = positive_sizes("k")

    def folder(self, k: int) -> str:
        return f"{self.method}-k{k}"

    def check_size(self, k: int, train_rows: int) -> None:
        if k > train_rows:
            raise DictlabError(f"k={k} is larger than the number of training rows ({train_rows})")

    work_field, work_is_passes = "max_iter", True

    def with_work(self, units: int) -> ClusteringFit:
        return self.model_copy(update={self.work_field: units, "tol": 0.0})

    def capped(self, steps: int, iterations: int, light: bool = False) -> ClusteringFit:
        update = {"max_iter": min(self.max_iter, iterations)}
        if light:
            update["init_sample"] = min(self.init_sample, 5000)
        return self.model_copy(update=update)

    def common(self) -> dict:
        """The settings every clustering dictionary takes."""
        return dict(max_iter=self.max_iter, tol=self.tol, seed=self.seed, init_sample=self.init_sample,
                    batch_size=self.batch_size)


class KMeansFit(ClusteringFit):
    """Lloyd k-means; all K (and n_init restarts) share each pass over the store."""

    method: Literal["kmeans"] = "kmeans"
    n_init: int = Field(1, ge=1, description="k-means++ restarts; the lowest inertia wins")
    shared_passes = True

    def build(self, k: int, d_in: int, d_out: int | None = None) -> KMeans:
        return KMeans(k, n_init=self.n_init, **self.common())

    def fit_group(self, dictionaries, folders, store, site, progress, world) -> None:
        fit_many(dictionaries, store.source(site, "train", self.batch_size, world), progress)


class SphericalKMeansFit(KMeansFit):
    """Cosine k-means on unit-normalised rows."""

    method: Literal["spherical_kmeans"] = "spherical_kmeans"

    def build(self, k: int, d_in: int, d_out: int | None = None) -> SphericalKMeans:
        return SphericalKMeans(k, n_init=self.n_init, **self.common())
