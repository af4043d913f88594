"""A learner in 30 lines: K training rows drawn at random are the centres; each row goes to the nearest."""

from typing import Literal

import torch
from pydantic import Field

from dictlab.dictionaries import Dictionary, Learner
from dictlab.dictionaries.sampling import scan


class Exemplars(Dictionary):
    kind = "exemplars"  # the name its saved config.json carries
    unit_kind = "cluster"  # one unit per row, like k-means

    def __init__(self, k: int, seed: int = 0, centers: torch.Tensor | None = None):
        self.k, self.seed, self.centers = k, seed, centers

    @property
    def directions(self) -> torch.Tensor:
        return self.centers

    def encode_sparse(self, x):  # distances in float64: rows sit far from the origin
        nearest = torch.cdist(self._check(x).double(), self.centers.double()).argmin(1, keepdim=True)
        return torch.ones(nearest.shape), nearest

    def fit(self, batches, progress: bool = True) -> "Exemplars":
        self.centers = scan(batches, self.k, self.seed)[0]  # a uniform sample of rows, in one pass
        return self

    def tensors(self):
        return {"centers": self.centers}

    def config(self):
        return {"k": self.k, "seed": self.seed}

    @classmethod
    def from_saved(cls, tensors, config):
        return cls(**config, centers=tensors["centers"])


class ExemplarsFit(Learner):
    """The `fit:` entry; defining it registers the method name."""

    method: Literal["exemplars"] = "exemplars"
    size_field = "k"  # the sizes: one dictionary per K (and what --k sets)
    k: list[int] = Field(default_factory=lambda: [64], description="centres")
    seed: int = 0
    batch_size: int = 4096

    def folder(self, k: int) -> str:
        return f"exemplars-k{k}"

    def build(self, k: int, d_in: int, d_out: int | None = None) -> Exemplars:
        return Exemplars(k, self.seed)
