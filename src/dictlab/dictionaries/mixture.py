"""Mixture models as soft dictionaries (gmm.py: Gaussian mixtures, mppca.py: mixtures of
probabilistic PCA), fitted by EM over streamed batches with running sufficient statistics.

Encode: responsibilities (decoding `soft`, x̂ = Σ_k r_k μ_k) or their argmax (`hard`, x̂ = μ_k).
Data and means are kept translated by the k-means sample mean (see kmeans.py) for precision.
Every variance is floored at `reg_covar` (added, as scikit-learn does, and clamped): a component
that collapses onto a few points is logged by index and stays finite.
"""

from __future__ import annotations

import logging
import math

import torch
from pydantic import Field
from tqdm.auto import tqdm

from dictlab.data import distributed
from dictlab.data.distributed import World, world_of
from dictlab.dictionaries.base import Dictionary
from dictlab.dictionaries.kmeans import ClusteringFit, KMeans, passes_convergence
from dictlab.dictionaries.sampling import BatchSource, as_source, scan
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
        """[B, K] log N(x | component k), x already shifted; plus anything the statistics reuse.
        EM keeps the precision it is given (float64 for a Gaussian mixture); encoding rounds to float32."""
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
        return (lg + self.weights_.clamp_min(1e-30).log()).float(), extra

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """[N] log p(x) under the mixture."""
        return torch.logsumexp(self._log_joint(self._check(x))[0], 1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        lj = self._log_joint(self._check(x))[0]
        return (lj - torch.logsumexp(lj, 1, keepdim=True)).exp()

    unit_kind = "cluster"
    family = "mixtures"

    def clusters(self, x: torch.Tensor) -> torch.Tensor:
        """The most responsible component."""
        return self._log_joint(self._check(x))[0].argmax(1)

    def unit_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The most responsible component and log π_k + log N(x | k) there (higher = more typical)."""
        best, k = self._log_joint(self._check(x))[0].max(1)
        return best.unsqueeze(1), k.unsqueeze(1), torch.ones(len(k), 1, dtype=torch.bool, device=k.device)

    def outlier_score(self, x: torch.Tensor) -> torch.Tensor:
        """−log p(x): large for rows the mixture explains badly."""
        return -self.log_prob(x)

    def encode_sparse(self, x):
        r = self.responsibilities(x)
        if self.decoding == "hard":
            idx = r.argmax(1, keepdim=True)
            return torch.ones(idx.shape, device=idx.device), idx
        return r, torch.arange(self.k, device=r.device).expand(r.shape[0], -1)

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
        sample, n_rows, _ = scan(source, max(self.init_sample, self.k), self.seed, device)
        if self.k > n_rows:
            raise DictlabError(f"k={self.k} is larger than the number of rows ({n_rows})")
        self.shift_ = sample.mean(0).to(device)
        if init is not None:  # given in the data's frame, kept about the shift like every other parameter
            self._init_given({**init, "means": init["means"].to(device).float() - self.shift_}, source)
        else:
            km = KMeans(self.k, max_iter=self.init_iter, seed=self.seed, init_sample=self.init_sample,
                        batch_size=self.batch_size).fit(source, progress=False, device=device)
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
        converged = len(history) > 1 and abs(history[-1] - history[-2]) < self.tol
        self.convergence_ = passes_convergence(history, converged, n)

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
        """The variances as kept (float32): the data's (float64) plus `reg_covar`, never below it. A
        component is reported collapsed where the data's variance is under the floor itself."""
        collapsed = (var < self.reg_covar).reshape(var.shape[0], -1).any(1)
        var = var.float() + self.reg_covar
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


class MixtureFit(ClusteringFit):
    """Options every EM-fitted mixture shares; k-means initialised."""

    k: list[int] = Field(default_factory=lambda: [64])
    tol: float = Field(1e-3, ge=0, description="stop when the log-likelihood per row improves by less")
    reg_covar: float = Field(1e-6, gt=0, description="added to every variance, and its floor")
    init_iter: int = Field(10, ge=1, description="k-means iterations of the init")

    def em(self) -> dict:
        return dict(reg_covar=self.reg_covar, init_iter=self.init_iter, **self.common())

