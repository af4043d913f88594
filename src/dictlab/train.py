"""The SAE training loop: Adam with LR warm-up and linear decay, sparsity-coefficient warm-up,
gradient clipping, unit-norm decoder rows by projected gradients, and a progress bar.

Batches come from a function `start_step -> iterator` of x (or (x, y) pairs for transcoders), so a
run can restart its data stream at any step, e.g. shuffled store batches.

Checkpoints hold the model, Adam's state, the scheduler, the RNG state, the step and the log; a
run started again with the same checkpoint path continues from the last one and ends with weights
bitwise equal to an uninterrupted run's (on the CPU). Files are written atomically and read with
`torch.load(weights_only=True)`: tensors and plain values only, no pickled objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError
from dictlab.io import atomic_path, config_hash


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 2e-4
    warmup_steps: int = 100  # LR rises linearly from 0
    decay_start: float = 0.8  # fraction of the steps after which the LR falls linearly to 0
    sparsity_warmup_steps: int = 0  # the L1 / L0 coefficient rises linearly from 0
    grad_clip: float = 1.0
    seed: int = 0


def tensor_batches(x: torch.Tensor, batch_size: int, seed: int = 0,
                   y: torch.Tensor | None = None) -> Callable[[int], Iterator]:
    """Endless shuffled batches of rows of x (with the same rows of y for a transcoder), from any step."""

    def from_step(start: int) -> Iterator:
        def endless():
            g = torch.Generator().manual_seed(seed)
            while True:
                perm = torch.randperm(x.shape[0], generator=g)
                for idx in perm.split(batch_size):
                    if len(idx) == batch_size:
                        yield x[idx] if y is None else (x[idx], y[idx])

        return islice(endless(), start, None)

    return from_step


def _save_checkpoint(path: Path, sae, opt, sched, step: int, history: list, identity: str) -> None:
    state = {"model": sae.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "rng": torch.get_rng_state(), "step": step, "history": history, "identity": identity}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, identity: str) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise DictlabError(f"checkpoint {path} is corrupted or not a dictlab checkpoint ({e}); delete it to "
                           "start over") from e
    if state.get("identity") != identity:
        raise DictlabError(f"checkpoint {path} belongs to another SAE or training config; delete it or train "
                           "elsewhere")
    return state


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    start = int(cfg.decay_start * cfg.steps)
    decay = 1.0 if step < start else max(0.0, (cfg.steps - step) / max(1, cfg.steps - start))
    return warm * decay


def train(sae: SparseAutoencoder, batches: Callable[[int], Iterator], cfg: TrainConfig, progress: bool = True,
          log_every: int = 100, checkpoint: Path | None = None, checkpoint_every: int = 0,
          tensorboard: Path | None = None, wandb_project: str | None = None, wandb_dir: Path | None = None,
          run_name: str | None = None) -> list[dict]:
    """Train in place; returns the logged metrics (every `log_every` steps and the last one).

    With `checkpoint`, the state is saved every `checkpoint_every` steps, and a checkpoint already
    there (for this SAE and config) is resumed. The file is removed once training ends.
    With `tensorboard`, the logged metrics also go to TensorBoard event files in that folder
    (a resumed run drops the events past its checkpoint first). With `wandb_project`, they also go to
    Weights & Biases (the optional `wandb` extra; WANDB_MODE=offline works without a login).
    """
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    history, start = [], 0
    identity = config_hash({"sae": sae.config(), "train": asdict(cfg)})
    if checkpoint is not None and Path(checkpoint).exists():
        state = _load_checkpoint(Path(checkpoint), identity)
        sae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
    writer = None
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard), purge_step=start if start else None)
    wandb_run = None
    if wandb_project is not None:
        try:
            import wandb
        except ImportError as e:
            raise DictlabError("wandb_project is set but wandb is not installed: pip install -e '.[wandb]'") from e
        if wandb_dir is not None:
            Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        wandb_run = wandb.init(project=wandb_project, name=run_name, dir=str(wandb_dir) if wandb_dir else None,
                               config={"sae": sae.config(), "train": asdict(cfg), "resumed_at_step": start})
    stream = batches(start)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"SAE {sae.hparams['rule']}", disable=not progress,
               dynamic_ncols=True)
    for step in range(start, cfg.steps):
        batch = next(stream)
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
            if writer is not None:
                for key, value in row.items():
                    if key != "step":
                        writer.add_scalar(f"train/{key}", value, step)
            if wandb_run is not None:
                wandb_run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
            bar.set_postfix(mse=f"{row['mse']:.4g}", l0=f"{row['l0']:.1f}", refresh=False)
        bar.update(1)
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(Path(checkpoint), sae, opt, sched, step + 1, history, identity)
    bar.close()
    if writer is not None:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return history
