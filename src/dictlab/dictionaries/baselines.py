"""Baselines a learned dictionary must beat, fitted and scored like any other dictionary (one pass over
the training rows: their mean and, for PCA, their covariance).

    pca            the top-n principal directions, every one active: L0 = n, x̂ = μ + Σ_j ((x − μ)·v_j) v_j;
                   at each L0 it shows what sparsity gains over the best dense linear code of that size
    pca, topk      the full principal basis (d directions); each row keeps its k largest |coordinates|
    neurons, topk  the standard basis about the mean; each row keeps the k coordinates with the largest
                   |x_i − μ_i| (the model's own neurons, read as a dictionary)

The covariance is accumulated in float64 about a fixed shift (the first batch's mean, rank 0's under
torchrun), so it does not cancel far from the origin, and summed over ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from dictlab.data.distributed import world_of
from dictlab.dictionaries.base import Dictionary
from dictlab.dictionaries.learner import NAME, Learner, positive_sizes
from dictlab.dictionaries.sampling import as_source
from dictlab.errors import DictlabError


class LinearBasis(Dictionary):
    """An orthonormal basis about the training mean, read densely (its first k directions) or top-k."""

    kind = "basis"
    family = "baselines"

    def __init__(self, basis: str = "pca", k: int = 16, topk: bool = False, batch_size: int = 8192):
        if basis not in ("pca", "neurons"):
            raise DictlabError(f"unknown basis {basis!r}; accepted: pca, neurons")
        if basis == "neurons" and not topk:
            raise DictlabError("the neuron basis is read top-k (read densely it is the identity): set topk")
        if k < 1:
            raise DictlabError(f"k must be a positive integer, got {k}")
        self.basis, self.k, self.topk, self.batch_size = basis, k, topk, batch_size
        self.mean_: torch.Tensor | None = None
        self.basis_: torch.Tensor | None = None  # [d or k, d], orthonormal rows, by decreasing variance
        self.variances_: torch.Tensor | None = None  # the variance along each row of basis_
        self.convergence_: dict | None = None

    @property
    def directions(self) -> torch.Tensor:
        return self.basis_

    @property
    def decoder_bias(self) -> torch.Tensor:
        return self.mean_

    @property
    def label(self) -> str:
        return self.basis + ("-topk" if self.topk else "")

    def encode_sparse(self, x):
        coords = (self._check(x) - self.mean_) @ self.basis_.T
        if not self.topk:
            return coords, torch.arange(coords.shape[1], device=coords.device).expand(coords.shape[0], -1)
        indices = coords.abs().topk(self.k, dim=1).indices
        return coords.gather(1, indices), indices

    @property
    def encode_flops(self) -> int:
        d = self.d_model
        return d if self.basis == "neurons" else 2 * d * self.basis_.shape[0]

    @property
    def fit_flops_per_row(self) -> int:
        d = self.d_model
        return d if self.basis == "neurons" else d + 2 * d * d  # the sum, and the outer product's

    def fit(self, data, progress: bool = True) -> LinearBasis:
        source = as_source(data, self.batch_size)
        world = world_of(source)
        shift, n, total, outer = None, 0, None, None
        for x in tqdm(source(), desc=f"{self.label} (one pass)", disable=not progress, dynamic_ncols=True,
                      leave=False):
            x = x.double()
            if shift is None:  # one shift for every rank: rank 0's first batch mean
                shift = x.mean(0) if world is None else world.broadcast(x.mean(0))
                total = torch.zeros_like(shift)
                outer = torch.zeros(len(shift), len(shift), dtype=torch.float64) if self.basis == "pca" else None
            centred = x - shift
            n += len(x)
            total += centred.sum(0)
            if outer is not None:
                outer += centred.T @ centred
        if world is not None:
            n = int(world.total(n))
            if shift is None:
                raise DictlabError("a rank received no training rows")
            total, outer = world.sum(total), None if outer is None else world.sum(outer)
        if n < 2:
            raise DictlabError(f"a {self.label} baseline needs at least 2 training rows, got {n}")
        d = len(shift)
        if self.k > d:
            raise DictlabError(f"k={self.k} is larger than the width of the rows ({d})")
        mean = total / n
        if outer is None:
            self.basis_ = torch.eye(d)
            self.variances_ = None
        else:
            covariance = outer / n - torch.outer(mean, mean)  # about the shift: no cancellation
            variances, vectors = torch.linalg.eigh(covariance)
            order = variances.flip(0)[: d if self.topk else self.k]
            self.basis_ = vectors.flip(1)[:, : len(order)].T.float().contiguous()
            self.variances_ = order.float()
        self.mean_ = (shift + mean).float()
        self.convergence_ = {"converged": None, "tokens_seen": n, "epochs": 1, "final_relative_change": None}
        return self

    def tensors(self):
        out = {"mean": self.mean_, "basis": self.basis_}
        return out if self.variances_ is None else {**out, "variances": self.variances_}

    def config(self):
        return {"basis": self.basis, "k": self.k, "topk": self.topk, "batch_size": self.batch_size}

    @classmethod
    def from_saved(cls, tensors, config):
        b = cls(config["basis"], config["k"], config["topk"], config["batch_size"])
        b.mean_, b.basis_ = tensors["mean"].float(), tensors["basis"].float()
        b.variances_ = tensors.get("variances")
        return b


class _BasisFit(Learner):
    """Options the baselines share; sizes are the k values (L0)."""

    size_field = "k"
    k: list[int] = Field(default_factory=lambda: [16, 32], description="active directions per token (L0)")
    name: str | None = NAME
    site: str | None = Field(None, description="fit on this site only (default: every site of the store)")
    batch_size: int = Field(8192, ge=1, description="rows per streamed batch")
    shared_passes = True
    seeded = False  # deterministic (a mean and an eigendecomposition): fitted once, whatever the run's seeds

    _sizes = positive_sizes("k")

    def fit_group(self, dictionaries, folders: list[Path], store, site, progress, world) -> None:
        """One pass serves every k: the full basis is fitted once, each dictionary keeps what it reads."""
        full = LinearBasis(dictionaries[0].basis, 1, topk=True, batch_size=self.batch_size)
        full.fit(store.source(site, "train", self.batch_size, world), progress)
        for d in dictionaries:
            n = full.basis_.shape[0] if d.topk else d.k
            d.mean_, d.basis_, d.convergence_ = full.mean_, full.basis_[:n].contiguous(), full.convergence_
            d.variances_ = None if full.variances_ is None else full.variances_[:n]


class PCAFit(_BasisFit):
    """PCA: the top-k principal directions, dense (L0 = k); with `topk`, the full basis read top-k."""

    method: Literal["pca"] = "pca"
    topk: bool = Field(False, description="keep each token's k largest |coordinates| of the full basis "
                                          "(default: the first k principal directions, all active)")

    def folder(self, k: int) -> str:
        return f"pca{'-topk' if self.topk else ''}-k{k}"

    def build(self, k: int, d_in: int, d_out: int | None = None) -> LinearBasis:
        if k > d_in:
            raise DictlabError(f"k={k} is larger than the site's width ({d_in})")
        return LinearBasis("pca", k, self.topk, self.batch_size)


class NeuronsFit(_BasisFit):
    """The standard basis about the mean, read top-k: each token keeps its k largest |x_i − μ_i|."""

    method: Literal["neurons"] = "neurons"

    def folder(self, k: int) -> str:
        return f"neurons-topk-k{k}"

    def build(self, k: int, d_in: int, d_out: int | None = None) -> LinearBasis:
        if k > d_in:
            raise DictlabError(f"k={k} is larger than the site's width ({d_in})")
        return LinearBasis("neurons", k, topk=True, batch_size=self.batch_size)
