"""Sparse training kernels for SAEs: after the one dense product pre = x_c W_enc + b_enc, a training step
touches only the batch's active (row, latent) entries, forwards and backwards.

An `Entries` set lists the active entries of a batch in row order. Over those n entries:
  gather_pre  v_i = pre[r_i, c_i], with the gradients of the encoder's product taken at those entries only:
              ∂W_enc[:, c] = Σ_{i: c_i = c} g_i x_c[r_i],  ∂b_enc[c] = Σ_{i: c_i = c} g_i,
              ∂x_c[r] = Σ_{i: r_i = r} g_i W_enc[:, c_i]
  decode      ŷ_r = Σ_{i: r_i = r} a_i W_dec[c_i], with ∂a_i = g[r_i] · W_dec[c_i] and
              ∂W_dec[c] = Σ_{i: c_i = c} a_i g[r_i]
Each sum is a gather-and-add over rows (an embedding bag: entries grouped by row, or by latent for the
weight gradients), so a step costs one dense product plus O(n·d) instead of three dense products and
a dense [B, latents] gradient. The gradients are exactly those of the dense formulas (tested per rule).
When the codes are dense (a ReLU SAE early in training), three dense products are faster than the
gather-and-add, so `use_sparse` sends a batch to the dense path above a density of 5%.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch.nn import functional as F

SPARSE_MAX_DENSITY = 0.05  # entries / (rows · latents) above which the dense products are the faster path
_SUM = 0  # embedding-bag mode


def use_sparse(count: int, rows: int, latents: int) -> bool:
    return count <= SPARSE_MAX_DENSITY * rows * latents


def _offsets(keys: torch.Tensor, size: int) -> torch.Tensor:
    """Start of each key's run in a key-sorted list."""
    starts = torch.zeros(size, dtype=torch.long, device=keys.device)
    starts[1:] = torch.bincount(keys, minlength=size).cumsum(0)[:-1]
    return starts


class Entries:
    """Active (row, latent) entries of a batch's codes, in row order."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int):
        self.rows, self.cols, self.n_rows, self.n_cols = rows, cols, n_rows, n_cols
        self.row_offsets = _offsets(rows, n_rows)

    @classmethod
    def of_mask(cls, mask: torch.Tensor) -> Entries:
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows, cols, *mask.shape)

    @classmethod
    def of_indices(cls, idx: torch.Tensor, n_cols: int) -> Entries:
        """Entries from per-row latent indices [B, k] (a top-k)."""
        rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
        return cls(rows, idx.flatten(), idx.shape[0], n_cols)

    def __len__(self) -> int:
        return self.rows.numel()

    @cached_property
    def by_col(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, offsets): the entries grouped by latent, for the weight gradients."""
        order = self.cols.argsort(stable=True)
        return order, _offsets(self.cols[order], self.n_cols)

    def per_col(self, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[n_cols, d]: for each latent c, Σ_{i: c_i = c} weights_i · table[r_i]."""
        order, offsets = self.by_col
        return F.embedding_bag(self.rows[order], table, offsets, mode="sum", per_sample_weights=weights[order])

    def per_row(self, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[n_rows, d]: for each row r, Σ_{i: r_i = r} weights_i · table[c_i]."""
        return F.embedding_bag(self.cols, table, self.row_offsets, mode="sum", per_sample_weights=weights)


def _centre_gradient(w_enc: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """The gradient of a centre c subtracted from every row of the input (pre = (x − c) W_enc + b_enc):
    −Σ_rows ∂x_c = −W_enc ∂b_enc, without forming ∂x_c."""
    return -(w_enc.to(grad_b.dtype) @ grad_b)


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, xc, w_enc, b_enc, centre, entries):
        ctx.save_for_backward(xc, w_enc)
        ctx.entries = entries
        return pre[entries.rows, entries.cols].float()

    @staticmethod
    def backward(ctx, grad):
        xc, w_enc = ctx.saved_tensors
        e = ctx.entries
        grad_w = grad_centre = None
        grad_b = torch.zeros(e.n_cols, dtype=grad.dtype, device=grad.device).index_add_(0, e.cols, grad)
        if ctx.needs_input_grad[2]:
            grad_w = e.per_col(xc.to(grad.dtype), grad).T
        if ctx.needs_input_grad[4]:
            grad_centre = _centre_gradient(w_enc, grad_b)
        return None, None, grad_w, grad_b if ctx.needs_input_grad[3] else None, grad_centre, None


def gather_pre(pre: torch.Tensor, xc: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
               centre: torch.Tensor | None, entries: Entries) -> torch.Tensor:
    """[n]: the pre-activations pre = xc W_enc + b_enc (computed without gradient) at the entries, with
    the encoder's gradients taken there only. xc = x − centre carries no gradient itself: the centre's
    (b_dec, for an SAE) comes from the entries' sum."""
    return _GatherPre.apply(pre, xc, w_enc, b_enc, centre, entries)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, w_dec, entries):
        out, offset2bag, _, _ = torch.ops.aten._embedding_bag(w_dec, entries.cols, entries.row_offsets, False, _SUM,
                                                               False, values)
        ctx.save_for_backward(values, w_dec, offset2bag)
        ctx.entries = entries
        return out

    @staticmethod
    def backward(ctx, grad):
        values, w_dec, offset2bag = ctx.saved_tensors
        e = ctx.entries
        grad = grad.contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, w_dec, e.cols, e.row_offsets, offset2bag, _SUM)
        if ctx.needs_input_grad[1]:
            grad_w = e.per_col(grad, values)
        return grad_values, grad_w, None


def decode(values: torch.Tensor, w_dec: torch.Tensor, entries: Entries) -> torch.Tensor:
    """[rows, d]: each row's Σ values_i W_dec[c_i] over its entries (no bias)."""
    return _Decode.apply(values.to(w_dec.dtype), w_dec, entries)


class _DensePre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, xc, w_enc, b_enc, centre):
        ctx.save_for_backward(xc, w_enc)
        return pre.float().view_as(pre)

    @staticmethod
    def backward(ctx, grad):
        xc, w_enc = ctx.saved_tensors
        grad_b = grad.sum(0)
        grad_w = xc.T.to(grad.dtype) @ grad if ctx.needs_input_grad[2] else None
        grad_centre = _centre_gradient(w_enc, grad_b) if ctx.needs_input_grad[4] else None
        return None, None, grad_w, grad_b if ctx.needs_input_grad[3] else None, grad_centre


def dense_pre(pre: torch.Tensor, xc: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
              centre: torch.Tensor | None) -> torch.Tensor:
    """pre (computed without gradient) with the dense gradients of (x − centre) W_enc + b_enc: the path
    for dense codes."""
    return _DensePre.apply(pre, xc, w_enc, b_enc, centre)
