"""Mixtures of probabilistic PCA as soft dictionaries; the `mppca` learner."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from dictlab.dictionaries.mixture import LOG_2PI, Mixture, MixtureFit
from dictlab.errors import DictlabError


class MixturePPCA(Mixture):
    """Mixture of probabilistic PCA (Tipping & Bishop 1999): component k is N(μ_k, W_k W_kᵀ + σ_k² I)
    with W_k of rank q. Densities use the Woodbury identity, so nothing d×d is ever formed:
        C⁻¹ = (I − W M⁻¹ Wᵀ)/σ²,   log|C| = (d − q) log σ² + log|M|,   M = WᵀW + σ² I  (q×q)
    """

    kind = "mppca"

    def __init__(self, k: int, q: int = 4, **kw):
        if q < 1:
            raise DictlabError(f"q (rank of each component) must be at least 1, got {q}")
        super().__init__(k, **kw)
        self.q = q

    @property
    def encode_flops(self) -> int:
        k, d, q = self.k, self.d_model, self.q
        return 2 * k * (d + d * q + q * q + q)  # ‖x − μ‖², z = Wᵀ(x − μ), then zᵀ(M⁻¹z)

    @property
    def fit_flops_per_row(self) -> int:
        return self.encode_flops + 2 * self.k * self.d_model * (1 + self.q)  # and the M-step's rᵀx, x(r z)ᵀ

    def _log_gauss(self, x):
        # float64: ‖x − μ‖² − zᵀM⁻¹z cancels almost entirely when σ² is small, which fp32 cannot resolve
        x = x.double()
        d, q = x.shape[1], self.q
        mu, w, s2 = self.means_.double(), self.W_.double(), self.sigma2_.double()
        sq = (torch.addmm((mu * mu).sum(1), x, mu.T, alpha=-2) + (x * x).sum(1, keepdim=True)).clamp_min_(0)
        # z_k = W_kᵀ(x − μ_k), all components in one product: [B, K, q]
        z = (x @ w.permute(1, 0, 2).reshape(d, -1)).reshape(-1, self.k, q) - torch.einsum("kd,kdq->kq", mu, w)
        m = w.transpose(1, 2) @ w + s2[:, None, None] * torch.eye(q, dtype=torch.float64, device=x.device)
        chol = torch.linalg.cholesky(m)
        m_inv = torch.cholesky_inverse(chol)
        quad = (sq - torch.einsum("bkq,kqr,bkr->bk", z, m_inv, z)) / s2
        logdet = (d - q) * s2.log() + 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)
        return (-0.5 * (d * LOG_2PI + logdet + quad)).float(), {"sq": sq, "z": z}

    def _new_stats(self, device):
        return {"n": torch.zeros(self.k, dtype=torch.float64, device=device), "s1": 0, "sq": 0, "xz": 0, "rz": 0}

    def _accumulate(self, stats, x, resp, extra):
        if extra.get("init"):  # hard init: the spread about each k-means centre, no subspace yet
            sq = torch.cdist(x, self._init_means) ** 2
            z = torch.zeros(x.shape[0], self.k, self.q, device=x.device)
        else:
            sq, z = extra["sq"], extra["z"]
        resp, x = resp.double(), x.double()
        stats["n"] += resp.sum(0)
        stats["s1"] = stats["s1"] + resp.T @ x
        stats["sq"] = stats["sq"] + (resp * sq).sum(0)
        rz = resp[:, :, None] * z
        stats["xz"] = stats["xz"] + x.T @ rz.reshape(x.shape[0], -1)  # Σ r x zᵀ, [d, K·q]
        stats["rz"] = stats["rz"] + rz.sum(0)  # Σ r z, [K, q]

    def _m_step(self, stats, n):
        d, q = stats["s1"].shape[1], self.q
        nk = stats["n"].clamp_min(10 * torch.finfo(torch.float32).eps)  # an empty component stays finite
        old_mu, old_w = self.means_.double(), self.W_.double()
        old_s2 = self.sigma2_.double()
        mu = stats["s1"] / nk[:, None]
        delta = mu - old_mu
        # A = Σ r (x − μ_old) zᵀ = Σ r x zᵀ − μ_old (Σ r z)ᵀ; then S'W about the new mean (T&B, appendix C)
        xz = stats["xz"].reshape(d, self.k, q).permute(1, 0, 2)
        a = xz - old_mu[:, :, None] * stats["rz"][:, None, :]
        sw = a / nk[:, None, None] - delta[:, :, None] * torch.einsum("kd,kdq->kq", delta, old_w)[:, None, :]
        tr_s = stats["sq"] / nk - (delta * delta).sum(1)
        eye = torch.eye(q, dtype=torch.float64, device=old_w.device)
        m = old_w.transpose(1, 2) @ old_w + old_s2[:, None, None] * eye
        m_inv = torch.linalg.inv(m)
        inner = old_s2[:, None, None] * eye + m_inv @ old_w.transpose(1, 2) @ sw
        w_new = sw @ torch.linalg.inv(inner)
        s2 = (tr_s - ((sw @ m_inv) * w_new).sum((1, 2))) / d
        self.weights_ = (nk / n).float()
        self.means_, self.W_ = mu.float(), w_new.float()
        self.sigma2_ = self._floor(s2, self.kind)

    def _init_from_kmeans(self, means, source):
        self._init_means = means
        self.means_ = means
        g = torch.Generator().manual_seed(self.seed)
        stats = self._hard_stats(means, source)
        nk = stats["n"] + 1e-9
        spread = (stats["sq"] / nk / means.shape[1]).float().clamp_min(self.reg_covar)
        self.weights_ = (nk / nk.sum()).float()
        # small random subspaces; EM turns them towards each component's principal directions
        self.W_ = torch.randn(self.k, means.shape[1], self.q, generator=g).to(means.device) * (
            0.1 * spread.sqrt())[:, None, None]
        self.sigma2_ = spread
        del self._init_means

    def _init_given(self, init, source):
        self.means_ = init["means"].float()
        self.weights_ = init.get("weights", torch.full((self.k,), 1.0 / self.k)).float()
        g = torch.Generator().manual_seed(self.seed)
        self.W_ = init.get("W", 0.1 * torch.randn(self.k, self.means_.shape[1], self.q, generator=g)).float()
        self.sigma2_ = init.get("sigma2", torch.ones(self.k)).float()

    def n_parameters(self):
        d, q = self.means_.shape[1], self.q
        return self.k * (d + d * q - q * (q - 1) // 2 + 1) + self.k - 1

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        comp = torch.multinomial(self.weights_, n, replacement=True, generator=g)
        latent = torch.randn(n, self.q, 1, generator=g)
        noise = torch.randn(n, self.means_.shape[1], generator=g) * self.sigma2_[comp, None].sqrt()
        return self.means_[comp] + (self.W_[comp] @ latent).squeeze(2) + noise + self.shift_

    def tensors(self):
        return {"weights": self.weights_, "means": self.means_, "W": self.W_, "sigma2": self.sigma2_,
                "shift": self.shift_}

    def config(self):
        return {**self._base_config(), "q": self.q}

    @classmethod
    def from_saved(cls, tensors, config):
        m = cls(config["k"], config["q"], **{k: config[k] for k in cls._BASE if k != "k"})
        names = ("weights", "means", "W", "sigma2", "shift")
        m.weights_, m.means_, m.W_, m.sigma2_, m.shift_ = (tensors[n] for n in names)
        m.log_likelihood_history_ = config["log_likelihood_history"]
        return m


class MPPCAFit(MixtureFit):
    """Mixture of probabilistic PCA: each component a rank-q subspace plus isotropic noise."""

    method: Literal["mppca"] = "mppca"
    q: int = Field(4, ge=1, description="rank of each component's subspace")

    def folder(self, k: int) -> str:
        return f"mppca-q{self.q}-k{k}"

    def build(self, k: int, d_in: int, d_out: int | None = None) -> MixturePPCA:
        return MixturePPCA(k, q=self.q, **self.em())

