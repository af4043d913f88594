"""Gaussian mixtures (diagonal or spherical covariance) as soft dictionaries; the `gmm` learner."""

from __future__ import annotations

from typing import Literal

import torch

from dictlab.dictionaries.mixture import LOG_2PI, Mixture, MixtureFit
from dictlab.errors import DictlabError


class GaussianMixture(Mixture):
    """Gaussian mixture with diagonal or spherical covariances."""

    kind = "gmm"

    def __init__(self, k: int, covariance: str = "diag", **kw):
        if covariance not in ("diag", "spherical"):
            raise DictlabError(f"unknown covariance {covariance!r}; accepted: diag, spherical")
        super().__init__(k, **kw)
        self.covariance = covariance

    @property
    def encode_flops(self) -> int:
        return 4 * self.k * self.d_model  # x·(μ·prec)ᵀ and x²·precᵀ

    @property
    def fit_flops_per_row(self) -> int:
        return 8 * self.k * self.d_model  # the E-step's two products, the M-step's rᵀx and rᵀx²

    def _log_gauss(self, x):
        # Σ_d (x − μ)²/σ² expanded into matrix products: x²·precᵀ − 2x·(μ·prec)ᵀ + Σ μ²·prec, in float64:
        # for a tight component far from the shift the three terms cancel to a few parts in 10^8 or less
        x = x.double()
        var = self.variances_.double()
        if var.ndim == 1:
            var = var[:, None].expand(-1, x.shape[1])
        prec, mu = 1.0 / var, self.means_.double()
        quad = torch.addmm((mu * mu * prec).sum(1), x, (mu * prec).T, alpha=-2).addmm_(x * x, prec.T)
        return quad.add_(x.shape[1] * LOG_2PI + var.log().sum(1)).mul_(-0.5), {"x": x}

    def _new_stats(self, device):
        return {"n": torch.zeros(self.k, dtype=torch.float64, device=device), "s1": 0, "s2": 0}

    def _accumulate(self, stats, x, resp, extra):
        # float64 as well: E[x²] − μ² cancels in the M-step as the quadratic form does here
        x, resp = extra.get("x", x).double(), resp.double()
        stats["n"] += resp.sum(0)
        stats["s1"] = stats["s1"] + resp.T @ x
        stats["s2"] = stats["s2"] + resp.T @ (x * x)

    def _m_step(self, stats, n):
        nk = stats["n"].clamp_min(10 * torch.finfo(torch.float32).eps)  # an empty component stays finite;
        # a floor, not an offset: n/(n + δ) would bias far components' variances by μ²·δ/n
        means = stats["s1"] / nk[:, None]
        var = stats["s2"] / nk[:, None] - means ** 2
        if self.covariance == "spherical":
            var = var.mean(1)
        self.weights_ = (nk / n).float()
        self.means_ = means.float()
        self.variances_ = self._floor(var, self.kind)

    def _init_from_kmeans(self, means, source):
        stats = self._hard_stats(means, source)
        self._m_step(stats, int(stats["n"].sum()))

    def _init_given(self, init, source):
        self.means_ = init["means"].float()
        d = self.means_.shape[1]
        self.weights_ = init.get("weights", torch.full((self.k,), 1.0 / self.k)).float()
        default = torch.ones(self.k, d) if self.covariance == "diag" else torch.ones(self.k)
        self.variances_ = init.get("variances", default).float()

    def n_parameters(self):
        d = self.means_.shape[1]
        cov = self.k * d if self.covariance == "diag" else self.k
        return self.k * d + cov + self.k - 1

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        comp = torch.multinomial(self.weights_, n, replacement=True, generator=g)
        std = self.variances_.sqrt()
        std = std[comp] if std.ndim == 2 else std[comp, None]
        return self.means_[comp] + std * torch.randn(n, self.means_.shape[1], generator=g) + self.shift_

    def tensors(self):
        return {"weights": self.weights_, "means": self.means_, "variances": self.variances_, "shift": self.shift_}

    def config(self):
        return {**self._base_config(), "covariance": self.covariance}

    @classmethod
    def from_saved(cls, tensors, config):
        m = cls(config["k"], config["covariance"], **{k: config[k] for k in cls._BASE if k != "k"})
        m.weights_, m.means_, m.variances_, m.shift_ = (tensors[n] for n in ("weights", "means", "variances", "shift"))
        m.log_likelihood_history_ = config["log_likelihood_history"]
        return m


class GMMFit(MixtureFit):
    """Gaussian mixture by EM, k-means initialised."""

    method: Literal["gmm"] = "gmm"
    covariance: Literal["diag", "spherical"] = "diag"

    def folder(self, k: int) -> str:
        return f"gmm-{self.covariance}-k{k}"

    def build(self, k: int, d_in: int, d_out: int | None = None) -> GaussianMixture:
        return GaussianMixture(k, covariance=self.covariance, **self.em())

