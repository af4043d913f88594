"""The SAE training loop: Adam with LR warm-up and linear decay, sparsity-coefficient warm-up,
gradient clipping, unit-norm decoder rows by projected gradients, and a progress bar.

Batches come from any iterator of x (or (x, y) pairs for transcoders), e.g. shuffled store batches.
Checkpoint/resume, TensorBoard/W&B logging and sweeps sharing each batch are not built yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 100  # LR rises linearly from 0
    decay_start: float = 0.8  # fraction of the steps after which the LR falls linearly to 0
    sparsity_warmup_steps: int = 0  # the L1 / L0 coefficient rises linearly from 0
    grad_clip: float = 1.0
    seed: int = 0


def tensor_batches(x: torch.Tensor, batch_size: int, seed: int = 0, y: torch.Tensor | None = None) -> Iterator:
    """Endless shuffled batches of rows of x (with the same rows of y for a transcoder)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(x.shape[0], generator=g)
        for idx in perm.split(batch_size):
            if len(idx) == batch_size:
                yield x[idx] if y is None else (x[idx], y[idx])


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    start = int(cfg.decay_start * cfg.steps)
    decay = 1.0 if step < start else max(0.0, (cfg.steps - step) / max(1, cfg.steps - start))
    return warm * decay


def train(sae: SparseAutoencoder, batches: Iterator, cfg: TrainConfig, progress: bool = True,
          log_every: int = 100) -> list[dict]:
    """Train in place; returns the logged metrics (every `log_every` steps and the last one)."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    history = []
    bar = tqdm(total=cfg.steps, desc=f"SAE {sae.hparams['rule']}", disable=not progress, dynamic_ncols=True)
    for step in range(cfg.steps):
        batch = next(batches)
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        if step == 0:
            sae.initialize_from_data(x, y)
        scale = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        losses = sae.loss(x, y, sparsity_scale=scale)
        if not torch.isfinite(losses["total"]):
            raise DictlabError(f"the SAE loss became {float(losses['total'])} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        sae.project_decoder_gradient()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        sae.normalize_decoder_rows()
        if step % log_every == 0 or step == cfg.steps - 1:
            row = {"step": step, **{k: float(v.detach()) for k, v in losses.items()}, "lr": sched.get_last_lr()[0]}
            history.append(row)
            bar.set_postfix(mse=f"{row['mse']:.4g}", l0=f"{row['l0']:.1f}", refresh=False)
        bar.update(1)
    bar.close()
    return history
