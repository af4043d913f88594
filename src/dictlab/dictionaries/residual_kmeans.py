"""Residual k-means: L stages of k-means, each on the residual the previous stages leave."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dictlab.data.distributed import RankSource, world_of
from dictlab.dictionaries.base import Dictionary
from dictlab.dictionaries.kmeans import ClusteringFit, KMeans, default_shift
from dictlab.dictionaries.sampling import as_source
from dictlab.errors import DictlabError


class ResidualKMeans(Dictionary):
    """L stages of k-means, each clustering the residual the previous stages leave (L0 = L).

    Unit s·K + j is centre j of stage s; x̂ = Σ_s c_{s, j_s}.
    """

    kind = "residual_kmeans"

    def __init__(self, k: int, stages: int = 2, max_iter: int = 100, tol: float = 1e-4, seed: int = 0,
                 init_sample: int = 20_000, batch_size: int = 8192):
        if stages < 1:
            raise DictlabError(f"stages must be at least 1, got {stages}")
        self.k, self.stages = k, stages
        self.params = dict(max_iter=max_iter, tol=tol, init_sample=init_sample, batch_size=batch_size)
        self.seed = seed
        self.stages_: list[KMeans] = []

    @property
    def directions(self) -> torch.Tensor:
        if not self.stages_:
            raise DictlabError("this residual_kmeans dictionary is not fitted yet")
        return torch.cat([s.centers for s in self.stages_])

    def _residual(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        for stage in self.stages_[:upto]:
            x = x - stage.centers[stage.assign(x)]
        return x

    unit_kind = "cluster"

    @property
    def encode_flops(self) -> int:
        return self.stages * 2 * self.k * self.d_model

    @property
    def fit_flops_per_row(self) -> int:
        # one stage's Lloyd pass (rows seen sum over stages); re-assigning a row through the earlier stages
        # to form its residual is not counted
        return 2 * self.k * self.d_model + self.d_model

    def clusters(self, x):
        """The first stage's cluster: the coarsest partition."""
        return self.stages_[0].assign(self._check(x))

    def unit_scores(self, x):
        """Per stage, minus the squared distance of the stage's residual to its centre."""
        r, scores, units = self._check(x), [], []
        for s, stage in enumerate(self.stages_):
            j = stage.assign(r)
            r = r - stage.centers[j]
            scores.append(-r.square().sum(1))
            units.append(j + s * self.k)
        scores = torch.stack(scores, 1)
        return scores, torch.stack(units, 1), torch.ones_like(scores, dtype=torch.bool)

    def encode_sparse(self, x):
        r = self._check(x)
        indices = []
        for s, stage in enumerate(self.stages_):
            j = stage.assign(r)
            r = r - stage.centers[j]
            indices.append(j + s * self.k)
        idx = torch.stack(indices, 1)
        return torch.ones(idx.shape, device=idx.device), idx

    def fit(self, data, progress: bool = True) -> ResidualKMeans:
        source = as_source(data, self.params["batch_size"])
        self.stages_ = []
        self.inertia_history_ = []
        for s in range(self.stages):
            def residuals(s=s):
                return (self._residual(x, s) for x in source())

            if world_of(source) is not None:
                residuals = RankSource(residuals, world_of(source))

            stage = KMeans(self.k, seed=self.seed + s, **self.params).fit(residuals, progress)
            self.stages_.append(stage)
            self.inertia_history_.append(stage.inertia_)
        self.inertia_ = self.inertia_history_[-1]
        stages = [st.convergence_ for st in self.stages_]
        changes = [c["final_relative_change"] for c in stages if c["final_relative_change"] is not None]
        self.convergence_ = {"converged": all(c["converged"] for c in stages),
                             "tokens_seen": sum(c["tokens_seen"] for c in stages),
                             "epochs": sum(c["epochs"] for c in stages),
                             "final_relative_change": max(changes) if changes else None}
        return self

    def tensors(self):
        return {**{f"stage{s}": st.centers for s, st in enumerate(self.stages_)},
                **{f"stage{s}_shift": st.shift_ for s, st in enumerate(self.stages_)}}

    def config(self):
        return {"k": self.k, "stages": self.stages, "seed": self.seed, **self.params,
                "stage_inertia": self.inertia_history_}

    @classmethod
    def from_saved(cls, tensors, config):
        rk = cls(config["k"], config["stages"], config["max_iter"], config["tol"], config["seed"],
                 config["init_sample"], config["batch_size"])
        for s in range(rk.stages):
            km = KMeans(rk.k)
            km.cluster_centers_ = tensors[f"stage{s}"].float()
            km.shift_ = default_shift(tensors.get(f"stage{s}_shift"), km.cluster_centers_)
            rk.stages_.append(km)
        rk.inertia_history_ = config["stage_inertia"]
        rk.inertia_ = rk.inertia_history_[-1]
        return rk


class ResidualKMeansFit(ClusteringFit):
    """L stages of k-means, each on the residual of the previous ones (L0 = stages)."""

    method: Literal["residual_kmeans"] = "residual_kmeans"
    stages: int = Field(2, ge=1)

    def folder(self, k: int) -> str:
        return f"{self.method}-L{self.stages}-k{k}"

    def build(self, k: int, d_in: int, d_out: int | None = None) -> ResidualKMeans:
        return ResidualKMeans(k, stages=self.stages, **self.common())
