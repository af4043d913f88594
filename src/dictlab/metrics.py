"""Reconstruction and sparsity metrics, streamed over batches with running sums (memory O(batch)).

    MSE = Σ_t ‖x_t − x̂_t‖² / (N·d)                 (per element)
    FVU = Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖²        (x̄: mean of the evaluation set; EV = 1 − FVU)
    cos = mean_t cos(x_t, x̂_t)        L0 = mean_t #{j : code_tj ≠ 0}

The FVU denominator comes from Σ‖x‖² − N‖x̄‖², accumulated in float64 so it stays exact enough.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from dictlab.dictionaries.base import Dictionary


@dataclass(frozen=True)
class Reconstruction:
    n_rows: int
    mse: float
    fvu: float
    explained_variance: float
    cosine: float
    l0: float

    def as_dict(self) -> dict:
        return asdict(self)


class ReconstructionMeter:
    """Accumulates x, x̂ and the active-unit counts batch by batch."""

    def __init__(self):
        self.n = 0
        self.sq_err = 0.0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq_x = 0.0
        self.cos_sum = 0.0
        self.active = 0

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, n_active: torch.Tensor) -> None:
        x64, err = x.double(), (x - x_hat).double()
        self.n += x.shape[0]
        self.sq_err += float((err * err).sum())
        s = x64.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_x += float((x64 * x64).sum())
        self.cos_sum += float(torch.nn.functional.cosine_similarity(x64, x_hat.double(), dim=1, eps=1e-12).sum())
        self.active += int(n_active.sum())

    def result(self) -> Reconstruction:
        if self.n == 0:
            raise ValueError("no rows were evaluated")
        d = self.sum_x.shape[0]
        total_var = self.sum_sq_x - float((self.sum_x * self.sum_x).sum()) / self.n
        fvu = self.sq_err / total_var if total_var > 0 else float("nan")
        return Reconstruction(
            n_rows=self.n,
            mse=self.sq_err / (self.n * d),
            fvu=fvu,
            explained_variance=1 - fvu,
            cosine=self.cos_sum / self.n,
            l0=self.active / self.n,
        )


@torch.no_grad()
def evaluate_reconstruction(dictionary: Dictionary, batches: Iterable) -> Reconstruction:
    """Encode and decode every batch through the dictionary's sparse form and score it.

    A batch is x, or (x, y) for a transcoder: then ŷ = decode(encode(x)) is scored against y.
    """
    meter = ReconstructionMeter()
    for batch in batches:
        x, y = batch if isinstance(batch, tuple) else (batch, batch)
        values, indices = dictionary.encode_sparse(x)
        meter.update(y, dictionary.decode_sparse(values, indices), (values != 0).sum(1))
    return meter.result()
