"""The SAE rules' pieces that autograd cannot differentiate by itself: JumpReLU's step and its threshold's
straight-through gradient (a rectangle kernel of width ε, as Gemma Scope), and BatchTopK's batch threshold.
Thresholds may be one per latent ([L], broadcast over a dense [B, L] batch) or one per entry (gathered
for the active entries of the sparse training path)."""

from __future__ import annotations

import torch

from dictlab.data.distributed import World


def _like(grad: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """A threshold's gradient: per entry when it was gathered per entry, else summed over the batch."""
    return grad if grad.shape == threshold.shape else grad.sum(0)


class JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ), with ∂/∂θ from a rectangle kernel of width ε around the threshold."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_pre = grad * (pre > threshold)
        grad_threshold = _like(-(threshold / eps) * near * grad, threshold)
        return grad_pre, grad_threshold, None


class Step(torch.autograd.Function):
    """H(pre − θ), with the same pseudo-derivative for θ (the L0 penalty's gradient)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return torch.zeros_like(pre), _like(-(1.0 / eps) * near * grad, threshold), None


def batch_topk_threshold(pos: torch.Tensor, k: int, world: World | None, rows: int) -> torch.Tensor:
    """The (k·B)-th largest value of a batch of B rows held in parts by the ranks of `world` (rows or
    latents), floored just above 0 so that only positive values are kept: each rank's candidates are
    its own k·B largest, as the global ones are among them."""
    flat = pos.detach().flatten()
    top = flat.topk(min(k * rows, flat.numel())).values
    if world is not None:
        top = world.cat(top)
        top = top.topk(min(k * rows, top.numel())).values
    return top[-1].clamp_min(torch.finfo(pos.dtype).tiny)
