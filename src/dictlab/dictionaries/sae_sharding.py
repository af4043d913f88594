"""Latent sharding (`shard_latents`, for SAEs too wide for one device): each of N ranks holds a
contiguous slice of the latents (its columns of W_enc, rows of W_dec, b_enc, θ) and sees the whole
batch. The centred input enters the slices through an identity whose gradient is summed over ranks,
and the slices' partial reconstructions are summed over ranks (whose gradient is the identity), so
every rank computes the same ŷ and each slice gets the gradient it would get in one process. TopK
and AuxK keep a row's k largest across ranks (each rank offers its own k), BatchTopK the batch's
k·B largest; the sparsity penalties and L0 are summed over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dictlab.data.distributed import World, rank_slice
from dictlab.errors import DictlabError


@dataclass(frozen=True)
class LatentShard:
    """The slice of the latents one rank holds: global indices start..stop-1."""

    world: World
    start: int
    stop: int


class IntoShards(torch.autograd.Function):
    """Identity forward; the gradient is summed over the ranks whose slices read the input."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.world.sum(grad.contiguous().clone()), None


class FromShards(torch.autograd.Function):
    """The sum over ranks of their partial outputs; the gradient of each part is the output's."""

    @staticmethod
    def forward(ctx, part, world):
        return world.sum(part.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def row_threshold(values: torch.Tensor, k: int, world: World) -> torch.Tensor:
    """[B, 1]: each row's k-th largest value among every rank's candidates `values` [B, k_r]."""
    every = world.cat(values.detach().T.contiguous()).T  # [B, Σ k_r]
    return every.topk(min(k, every.shape[1]), dim=1).values[:, -1:]


_SHARDED = ("W_dec", "b_enc", "log_threshold", "tokens_since_fired")  # sliced along dim 0; W_enc along dim 1


@torch.no_grad()
def shard_latents(sae, world: World):
    """Keep this rank's contiguous slice of the latents, in place (every rank starts from the same SAE);
    train it with `train_sweep` (world=None: every rank takes whole batches) and `unshard_latents` it."""
    n, hp = sae.hparams["n_latents"], sae.hparams
    part = rank_slice(n, world)
    smallest = n // world.size
    if hp["rule"] == "topk" and smallest < hp["k"]:
        raise DictlabError(f"{n} latents over {world.size} ranks leave {smallest} on a rank, fewer than k={hp['k']}")
    for name in _SHARDED:
        t = getattr(sae, name)
        sliced = t[part].clone()
        setattr(sae, name, nn.Parameter(sliced, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                else sliced)
    if sae.W_enc is not None:
        sae.W_enc = nn.Parameter(sae.W_enc[:, part].clone())
    sae.shard = LatentShard(world, part.start, part.stop)
    return sae


@torch.no_grad()
def unshard_latents(sae):
    """Gather every rank's slice back into the whole SAE, in place, on every rank (on the CPU)."""
    if sae.shard is None:
        return sae
    world = sae.shard.world
    sae.to("cpu")
    for name in _SHARDED:
        t = getattr(sae, name)
        whole = world.cat(t.detach().contiguous())
        setattr(sae, name, nn.Parameter(whole, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                else whole)
    if sae.W_enc is not None:
        sae.W_enc = nn.Parameter(world.cat(sae.W_enc.detach().T.contiguous()).T.contiguous())
    sae.shard = None
    return sae
