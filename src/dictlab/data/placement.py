"""Where the stages after extraction compute, and how many contexts fit there at once.

The model is loaded onto `distributed.device()` (this process's GPU when there is one; DICTLAB_DEVICE=cpu
keeps a GPU machine on the CPU) and stays there for every stage that runs it: the CE evaluation, the logit
lens, steering and convergence. Dictionaries follow it (`Dictionary.on_device`), store batches are moved
to it as they are read, and only per-unit or per-context summaries come back to the CPU.

Batch sizes of the forward passes are "auto" unless a config gives a number: on a GPU, as many contexts
as fit in half of its free memory by an estimate of what one context holds (`context_bytes`); on a CPU the
small batch that keeps the [tokens, vocabulary] logits of one batch in a few hundred MB.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch

from dictlab.errors import DictlabError

Auto = int | Literal["auto"]
CPU_CONTEXTS = 4  # contexts per forward on a CPU: the logits of 4 x 128 tokens over 262k tokens are 0.5 GB
MOST_CONTEXTS = 256  # beyond this a forward gains nothing on any GPU we know


def model_device(model) -> torch.device:
    """The device the model's weights are on."""
    return next(model.parameters()).device


def to_device(batches: Iterable, device: torch.device) -> Iterator:
    """Store batches (tensors, tuples or dicts of tensors) moved to `device` as they are read."""
    for batch in batches:
        if isinstance(batch, dict):
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        elif isinstance(batch, tuple):
            yield tuple(v.to(device, non_blocking=True) for v in batch)
        else:
            yield batch.to(device, non_blocking=True)


def free_bytes(device: torch.device) -> int:
    """Free memory where `device` computes: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else ():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 << 30


def context_bytes(model, context_length: int, backward: bool = False) -> int:
    """An upper estimate of the device memory one context of `context_length` tokens holds in a forward pass
    that keeps its float32 logits (the CE stage, steering): per token the logits (twice: kept and one being
    reduced), the MLP's widest activations and the attention scores; a backward pass (attribution) about
    triples it."""
    cfg = model.config
    vocab = cfg.vocab_size
    mlp = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    per_token = 4 * (2 * vocab + 4 * mlp + heads * context_length + 8 * cfg.hidden_size)
    return per_token * context_length * (3 if backward else 1)


def contexts_per_batch(model, context_length: int, requested: Auto = "auto", backward: bool = False) -> int:
    """Contexts per forward pass: `requested` when it is a number, else what fits (see the module's doc)."""
    if requested != "auto":
        if not isinstance(requested, int) or requested < 1:
            raise DictlabError(f"a batch size must be a positive integer or 'auto', got {requested!r}")
        return requested
    device = model_device(model)
    if device.type == "cpu":
        return CPU_CONTEXTS
    fits = free_bytes(device) // 2 // max(1, context_bytes(model, context_length, backward))
    return int(max(1, min(MOST_CONTEXTS, fits)))
