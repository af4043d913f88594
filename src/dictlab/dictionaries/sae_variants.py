"""Pieces of SAEs that other tools train and dictlab reads (formats.py), for inference only:

  input normalisation (SAELens `normalize_activations`), per row, undone on the output:
    constant_norm_rescale  x · c, c = √d_in / ‖x‖                     output / c
    layer_norm             (x − μ) / (σ + 1e-5), σ the unbiased std   output · σ + μ
  gated (SAELens)   a = H(x W + b_gate) · ReLU(x (W ⊙ exp r_mag) + b_mag)      (x: the centred input)
  groupmax (sparsify)  the latents split into k equal contiguous groups; each keeps its largest ReLU value
  skip connection   output + x W_skipᵀ, x the raw input (sparsify, SAELens skip transcoders)
"""

from __future__ import annotations

import torch

NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5


def normalized_rows(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "constant_norm_rescale":
        return x * (x.shape[1] ** 0.5 / x.norm(dim=1, keepdim=True))
    if mode == "layer_norm":
        centred = x - x.mean(dim=1, keepdim=True)
        return centred / (centred.std(dim=1, keepdim=True) + LAYER_NORM_EPS)
    return x


def denormalized_rows(y: torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The output y of rows x mapped back by x's own statistics (as SAELens does: σ without its ε)."""
    if mode == "constant_norm_rescale":
        return y / (x.shape[1] ** 0.5 / x.norm(dim=1, keepdim=True))
    if mode == "layer_norm":
        mean = x.mean(dim=1, keepdim=True)
        return y * (x - mean).std(dim=1, keepdim=True) + mean
    return y


def gated_pre(xc: torch.Tensor, w_enc: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor,
              b_mag: torch.Tensor) -> torch.Tensor:
    """The magnitude path's pre-activations where the gate is open, 0 where it is shut (ReLU then gives
    the gated SAE's codes)."""
    gate = (xc @ w_enc + b_gate) > 0
    return (xc @ (w_enc * r_mag.exp()) + b_mag) * gate


def group_max(pos: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense codes keeping, in each of `groups` contiguous equal groups of latents, the largest value."""
    values, idx = pos.unflatten(-1, (groups, -1)).max(dim=-1)
    offsets = torch.arange(groups, device=pos.device) * (pos.shape[1] // groups)
    return torch.zeros_like(pos).scatter(1, idx + offsets, values)
