"""Mixture models as soft dictionaries: Gaussian mixtures (diagonal, spherical) and mixtures of
probabilistic PCA, fitted by EM over streamed batches with running sufficient statistics.

Encode: responsibilities (decoding `soft`, x̂ = Σ_k r_k μ_k) or their argmax (`hard`, x̂ = μ_k).
Data and means are kept translated by the k-means sample mean (see kmeans.py) for precision.
Every variance is floored at `reg_covar` (added, as scikit-learn does, and clamped): a component
that collapses onto a few points is logged by index and stays finite.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from dictlab.dictionaries.base import Dictionary
from dictlab.dictionaries.kmeans import BatchSource, KMeans, as_source, scan
from dictlab import distributed
from dictlab.distributed import World, world_of
from dictlab.errors import DictlabError

log = logging.getLogger(__name__)
LOG_2PI = math.log(2 * math.pi)


class Mixture(Dictionary):
    """Shared EM driver. Subclasses give per-component log densities and the M-step."""

    decodings = ("hard", "soft")

    def __init__(self, k: int, max_iter: int = 100, tol: float = 1e-3, reg_covar: float = 1e-6, seed: int = 0,
                 init_iter: int = 10, init_sample: int = 20_000, batch_size: int = 8192, decoding: str | None = None):
        if k < 1:
            raise DictlabError(f"k must be a positive integer, got {k}")
        self.k, self.max_iter, self.tol, self.reg_covar, self.seed = k, max_iter, tol, reg_covar, seed
        self.init_iter, self.init_sample, self.batch_size = init_iter, init_sample, batch_size
        self.decoding = self._check_decoding(decoding or self.decodings[0])
        self.shift_: torch.Tensor | None = None
        self.log_likelihood_history_: list[float] = []

    # --- subclass hooks -----------------------------------------------------------------------
    def _log_gauss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """[B, K] log N(x | component k), x already shifted; plus anything the statistics reuse."""
        raise NotImplementedError

    def _new_stats(self, device: torch.device) -> dict:
        raise NotImplementedError

    def _accumulate(self, stats: dict, x: torch.Tensor, resp: torch.Tensor, extra: dict) -> None:
        raise NotImplementedError

    def _m_step(self, stats: dict, n: int) -> None:
        raise NotImplementedError

    def _init_from_kmeans(self, means: torch.Tensor, source: BatchSource) -> None:
        raise NotImplementedError

    def n_parameters(self) -> int:
        raise NotImplementedError

    # --- the shared part ----------------------------------------------------------------------
    @property
    def directions(self) -> torch.Tensor:
        if self.shift_ is None:
            raise DictlabError(f"this {self.kind} dictionary is not fitted yet")
        return self.means_ + self.shift_

    def _log_joint(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        lg, extra = self._log_gauss(x - self.shift_)
        return lg + self.weights_.clamp_min(1e-30).log(), extra

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[N] log p(x) under the mixture."""
        return torch.logsumexp(self._log_joint(self._check(x))[0], 1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        lj = self._log_joint(self._check(x))[0]
        return (lj - torch.logsumexp(lj, 1, keepdim=True)).exp()

    unit_kind = "cluster"

    def clusters(self, x: torch.Tensor) -> torch.Tensor:
        """The most responsible component."""
        return self._log_joint(self._check(x))[0].argmax(1)

    def unit_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The most responsible component and log π_k + log N(x | k) there (higher = more typical)."""
        best, k = self._log_joint(self._check(x))[0].max(1)
        return best.unsqueeze(1), k.unsqueeze(1), torch.ones(len(k), 1, dtype=torch.bool)

    def outlier_score(self, x: torch.Tensor) -> torch.Tensor:
        """−log p(x): large for rows the mixture explains badly."""
        return -self.log_prob(x)

    def encode_sparse(self, x):
        r = self.responsibilities(x)
        if self.decoding == "hard":
            idx = r.argmax(1, keepdim=True)
            return torch.ones(idx.shape), idx
        return r, torch.arange(self.k).expand(r.shape[0], -1)

    def decode_sparse(self, values, indices):
        if values.shape[1] == self.k:  # soft codes cover every component: one product, no gather
            return values @ self.directions
        return super().decode_sparse(values, indices)

    def score(self, data: torch.Tensor | BatchSource) -> tuple[float, int]:
        """(mean log-likelihood per row, rows) over held-out data."""
        total, n = 0.0, 0
        for x in as_source(data, self.batch_size)():
            total += float(self.log_prob(x).sum(dtype=torch.float64))
            n += x.shape[0]
        return total / n, n

    def bic(self, data) -> float:
        ll, n = self.score(data)
        return self._bic(ll, n)

    def _bic(self, ll: float, n: int) -> float:
        return -2 * ll * n + self.n_parameters() * math.log(n)

    def held_out_metrics(self, batches) -> dict:
        ll, n = self.score(batches)
        return {"loglik_per_token": ll, "bic": self._bic(ll, n)}

    def aic(self, data) -> float:
        ll, n = self.score(data)
        return -2 * ll * n + 2 * self.n_parameters()

    def fit(self, data: torch.Tensor | BatchSource, progress: bool = True, init: dict | None = None,
            device: torch.device | str | None = None) -> Mixture:
        """EM until the mean log-likelihood per row improves by less than `tol`.

        `init` may give `means` (and `weights`, `variances`) to start from, e.g. to match another
        implementation; otherwise k-means (`init_iter` Lloyd iterations) seeds the means. The passes
        run on `device` (default: this process's GPU when there is one); the fitted mixture is returned
        on the CPU.
        """
        device = distributed.device() if device is None else torch.device(device)
        source = as_source(data, self.batch_size)
        sample, n_rows = scan(source, max(self.init_sample, self.k), self.seed, device)
        if self.k > n_rows:
            raise DictlabError(f"k={self.k} is larger than the number of rows ({n_rows})")
        if init is not None:
            self.shift_ = torch.zeros(sample.shape[1])
            self._init_given(init, source)
            self._place(device)
        else:
            km = KMeans(self.k, max_iter=self.init_iter, seed=self.seed, init_sample=self.init_sample,
                        batch_size=self.batch_size).fit(source, progress=False, device=device)
            self.shift_ = sample.mean(0).to(device)
            self._init_from_kmeans(km.centers.to(device) - self.shift_, source)
            self._place(device)
        try:
            self._em(source, progress, device)
        finally:
            self._place(torch.device("cpu"))
        return self

    def _place(self, device: torch.device) -> None:
        """Move the learned tensors (attribute NAME_ for each entry NAME of `tensors()`) to a device."""
        for name in self.tensors():
            setattr(self, name + "_", getattr(self, name + "_").to(device))

    def _em(self, source: BatchSource, progress: bool, device: torch.device) -> None:
        history = []
        world = world_of(source)
        bar = tqdm(total=self.max_iter, desc=f"{self.kind} K={self.k}",
                   disable=not progress or not distributed.is_main(world),
                   dynamic_ncols=True, leave=False)
        for _ in range(self.max_iter):
            stats, n = self._new_stats(device), 0
            total = torch.zeros(1, dtype=torch.float64, device=device)  # a tensor: no sync per batch on a GPU
            log_w = self.weights_.clamp_min(1e-30).log()
            for x in source():
                x = x.to(device, non_blocking=True) - self.shift_
                lg, extra = self._log_gauss(x)
                lj = lg + log_w
                norm = torch.logsumexp(lj, 1, keepdim=True)
                total += norm.sum(dtype=torch.float64)
                n += x.shape[0]
                self._accumulate(stats, x, lj.sub_(norm).exp_(), extra)
            if world is not None:
                _reduce(stats, world)
                world.sum(total)
                n = int(world.total(n))
            history.append(float(total) / n)  # of the parameters before this M-step
            self._m_step(stats, n)
            bar.update(1)
            bar.set_postfix(loglik=f"{history[-1]:.5g}/row", refresh=False)
            if len(history) > 1 and abs(history[-1] - history[-2]) < self.tol:
                break
        bar.close()
        self.log_likelihood_history_ = history
        self.n_iter_ = len(history)

    def _hard_stats(self, means: torch.Tensor, source: BatchSource) -> dict:
        """Sufficient statistics of the hard k-means assignment (one pass, where `means` are), for the
        first M-step."""
        stats = self._new_stats(means.device)
        for x in source():
            x = x.to(means.device, non_blocking=True) - self.shift_
            label = torch.cdist(x, means).argmin(1)
            resp = torch.zeros(x.shape[0], self.k, device=x.device).scatter_(1, label[:, None], 1.0)
            self._accumulate(stats, x, resp, {"init": True})
        if world_of(source) is not None:
            _reduce(stats, world_of(source))
        return stats

    def _floor(self, var: torch.Tensor, what: str) -> torch.Tensor:
        collapsed = (var <= self.reg_covar).reshape(var.shape[0], -1).any(1)
        if collapsed.any():
            log.warning("%s: variance of component(s) %s collapsed to the floor %g", self.kind,
                        collapsed.nonzero().flatten().tolist()[:10], self.reg_covar)
        return var.clamp_min(self.reg_covar)

    def _base_config(self) -> dict:
        return {"k": self.k, "max_iter": self.max_iter, "tol": self.tol, "reg_covar": self.reg_covar,
                "seed": self.seed, "init_iter": self.init_iter, "init_sample": self.init_sample,
                "batch_size": self.batch_size, "decoding": self.decoding,
                "log_likelihood_history": self.log_likelihood_history_}

    _BASE = ("k", "max_iter", "tol", "reg_covar", "seed", "init_iter", "init_sample", "batch_size", "decoding")


def _reduce(stats: dict, world: World) -> None:
    """Sum the sufficient statistics of one pass over ranks, in place."""
    if not world.agree(all(isinstance(v, torch.Tensor) for v in stats.values())):
        raise DictlabError("a rank read no rows in an EM pass: give every rank at least one batch")
    for v in stats.values():
        world.sum(v)


class GaussianMixture(Mixture):
    """Gaussian mixture with diagonal or spherical covariances."""

    kind = "gmm"

    def __init__(self, k: int, covariance: str = "diag", **kw):
        if covariance not in ("diag", "spherical"):
            raise DictlabError(f"unknown covariance {covariance!r}; accepted: diag, spherical")
        super().__init__(k, **kw)
        self.covariance = covariance

    def _log_gauss(self, x):
        var = self.variances_
        if var.ndim == 1:
            var = var[:, None].expand(-1, x.shape[1])
        prec = 1.0 / var
        # Σ_d (x − μ)²/σ² expanded into matrix products: x²·precᵀ − 2x·(μ·prec)ᵀ + Σ μ²·prec
        quad = torch.addmm((self.means_ ** 2 * prec).sum(1), x, (self.means_ * prec).T, alpha=-2)
        quad.addmm_(x * x, prec.T)
        return quad.add_(x.shape[1] * LOG_2PI + var.log().sum(1)).mul_(-0.5), {}

    def _new_stats(self, device):
        return {"n": torch.zeros(self.k, dtype=torch.float64, device=device), "s1": 0, "s2": 0}

    def _accumulate(self, stats, x, resp, extra):
        stats["n"] += resp.sum(0).double()
        stats["s1"] = stats["s1"] + (resp.T @ x).double()
        stats["s2"] = stats["s2"] + (resp.T @ (x * x)).double()

    def _m_step(self, stats, n):
        nk = stats["n"] + 10 * torch.finfo(torch.float32).eps  # an empty component keeps finite numbers
        means = stats["s1"] / nk[:, None]
        var = stats["s2"] / nk[:, None] - means ** 2
        if self.covariance == "spherical":
            var = var.mean(1)
        self.weights_ = (nk / n).float()
        self.means_ = means.float()
        self.variances_ = self._floor(var.float() + self.reg_covar, self.kind)

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
        nk = stats["n"] + 10 * torch.finfo(torch.float32).eps
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
        self.sigma2_ = self._floor(s2.float() + self.reg_covar, self.kind)

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
        m.weights_, m.means_, m.W_, m.sigma2_, m.shift_ = (tensors[n] for n in ("weights", "means", "W", "sigma2", "shift"))
        m.log_likelihood_history_ = config["log_likelihood_history"]
        return m
