"""The SAE training loop: Adam with LR warm-up and linear decay, sparsity-coefficient warm-up,
gradient clipping, unit-norm decoder rows by projected gradients, and a progress bar.

Batches come from a function `start_step -> iterator` of x (or (x, y) pairs for transcoders), so a
run can restart its data stream at any step, e.g. shuffled store batches. Several SAEs (a sweep)
can train on one stream: each batch is read once and serves them all.

Data-parallel training (`world`, under torchrun): each rank takes its part of every batch, the SAEs
are wrapped in DistributedDataParallel (gradients averaged over ranks, overlapping the backward
pass), and the batch statistics are those of the whole batch (see `SparseAutoencoder.loss`), so N
ranks with batches of B/N rows train what one process does with batches of B, up to float rounding.
Rank 0 writes the checkpoints and logs; every rank resumes from the same checkpoint file.
SAEs whose latents are sharded (`shard_latents`) instead take whole batches on every rank; the
gradient norm for clipping is that of all slices, and each rank checkpoints its own slice
(<checkpoint>.rankR-of-N).

Checkpoints hold the models, Adam's states, the schedulers, the RNG state, the step and the logs; a
run started again with the same checkpoint path continues from the last one and ends with weights
bitwise equal to an uninterrupted run's (on the CPU). Files are written atomically and read with
`torch.load(weights_only=True)`: tensors and plain values only, no pickled objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dictlab.data import distributed
from dictlab.data.distributed import World, is_main
from dictlab.data.io import atomic_path, config_hash
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError


@dataclass(frozen=True)
class Plateau:
    """The stopping rule of `steps: auto`: every `every` steps the reconstruction loss on a validation
    slice is measured; once it has improved by less than `tol` (relative) since the measurement nearest
    below (1 − window)·step, the SAE has converged: its learning rate then decays (over the last
    1 − decay_start of the steps it will have taken) and it stops."""

    tol: float = 0.01
    window: float = 0.2
    every: int = 25


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # with `plateau`: the budget (most steps) instead of the length
    lr: float = 2e-4
    warmup_steps: int = 100  # LR rises linearly from 0
    decay_start: float = 0.8  # fraction of the steps after which the LR falls linearly to 0
    sparsity_warmup_steps: int = 0  # the L1 / L0 coefficient rises linearly from 0
    grad_clip: float = 1.0
    seed: int = 0
    autocast: str | None = None  # "bfloat16": the forward pass under autocast on the SAEs' device
    plateau: Plateau | None = None


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


class _Member:
    """One SAE of a sweep with its own optimiser, scheduler and log."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig, world: World | None = None):
        self.sae, self.world, self.cfg = sae, world, cfg
        self.decay_from: int | None = None  # the step its LR began to decay early (a plateau), if it did
        self.end = cfg.steps  # the step it stops before
        self.validation: list[list[float]] = []  # [step, validation loss] of every measurement
        self.model = sae
        if world is not None:
            from torch.nn.parallel import DistributedDataParallel

            # buffers (input scale, dead-latent counters) are updated alike on every rank: nothing to broadcast
            self.model = DistributedDataParallel(sae, device_ids=None if sae.W_dec.device.type == "cpu" else
                                                 [sae.W_dec.device], forward_sync_buffers=False)
        # fused: one pass over each tensor per step (several times faster than the per-op update on a CPU)
        self.opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.999),
                                    fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg, self.decay_from,
                                                                                      self.end))
        self.grad_clip = cfg.grad_clip
        self.autocast = cfg.autocast
        self.history: list[dict] = []

    def state(self) -> dict:
        return {"model": self.sae.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "history": self.history, "decay_from": self.decay_from,
                "end": self.end, "validation": self.validation}

    def restore(self, state: dict) -> None:
        self.sae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.history = state["history"]
        self.decay_from, self.end = state.get("decay_from"), state.get("end", self.cfg.steps)
        self.validation = state.get("validation", [])

    def validate(self, step: int, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Measure the validation loss (mean ‖ŷ − y‖² per row, over every rank's slice); on a plateau
        (see `Plateau`) start the LR's decay and set the step to stop at."""
        sq, rows = _reconstruction_error(self.sae, x, y)
        if self.world is not None:
            sq, rows = self.world.sum(sq), self.world.sum(rows)
        loss = float(sq / rows)
        self.validation.append([step, loss])
        rule, cfg = self.cfg.plateau, self.cfg
        if self.decay_from is not None or step < cfg.warmup_steps or step >= int(cfg.decay_start * cfg.steps):
            return
        earlier = [v for s, v in self.validation if 0 < s <= (1 - rule.window) * step]
        if earlier and earlier[-1] - loss < rule.tol * earlier[-1]:
            self.decay_from = step
            self.end = min(cfg.steps, step + math.ceil(step * (1 - cfg.decay_start) / max(cfg.decay_start, 1e-9)))

    def summary(self, rows_per_step: int) -> dict:
        """How training ended: steps and rows seen, and whether it converged (a plateau) or hit its budget."""
        steps = min(self.end, self.history[-1]["step"] + 1) if self.history else 0
        converged = None if self.cfg.plateau is None else self.decay_from is not None  # None: a fixed length
        return {"steps": steps, "tokens_seen": steps * rows_per_step, "converged": converged,
                "plateau_step": self.decay_from, "validation": self.validation}

    def step(self, x, y, step: int, sparsity_scale: float) -> dict:
        sae, world = self.sae, self.world
        if step == 0:
            sae.initialize_from_data(x, y, world=world)
        with torch.autocast(x.device.type, dtype=getattr(torch, self.autocast or "bfloat16"),
                            enabled=self.autocast is not None):
            losses = self.model(x, y, sparsity_scale=sparsity_scale, world=world)
        finite = bool(torch.isfinite(losses["total"]))
        if not (finite if world is None else world.agree(finite)):  # every rank stops together
            raise DictlabError(f"the loss of SAE {sae.label} became {float(losses['total'])} at step {step}; "
                               "lower the learning rate")
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        sae.project_decoder_gradient()
        if sae.shard is None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.grad_clip)
        else:
            _clip_over_shards(sae, self.grad_clip)
        self.opt.step()
        self.sched.step()
        sae.normalize_decoder_rows()
        return losses

    def logged(self, losses: dict, step: int) -> dict:
        """The step's row of the log: losses averaged over ranks."""
        keys = list(losses)
        values = torch.stack([losses[k].detach().float().reshape(()) for k in keys]).cpu()
        if self.world is not None:
            values = self.world.sum(values) / self.world.size
        return {"step": step, **dict(zip(keys, values.tolist())), "lr": self.sched.get_last_lr()[0]}


@torch.no_grad()
def _clip_over_shards(sae: SparseAutoencoder, max_norm: float) -> None:
    """clip_grad_norm_ with the norm of the whole SAE: every slice's gradients plus the shared b_dec's once."""
    grads = {name: p.grad for name, p in sae.named_parameters() if p.grad is not None}
    sliced = torch.stack([g.square().sum() for name, g in grads.items() if name != "b_dec"]).sum().reshape(1)
    norm = (sae.shard.world.sum(sliced)[0] + grads["b_dec"].square().sum()).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads.values():
        g.mul_(scale)


def _save_checkpoint(path: Path, members: list[_Member], step: int, identity: str) -> None:
    state = {"members": [m.state() for m in members], "rng": torch.get_rng_state(), "step": step,
             "identity": identity}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, identity: str) -> dict:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise DictlabError(f"checkpoint {path} is corrupted or not a dictlab checkpoint ({e}); delete it to "
                           "start over") from e
    if state.get("identity") != identity:
        raise DictlabError(f"checkpoint {path} belongs to another SAE, sweep or training config; delete it or "
                           "train elsewhere")
    return state


@torch.no_grad()
def _reconstruction_error(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor | None):
    """(Σ ‖ŷ − y‖², rows) of the dictionary's own encode and decode, as evaluation will see it."""
    target = x if y is None else y
    sq = torch.zeros((), dtype=torch.float64, device=x.device)
    for xb, yb in zip(x.split(4096), target.split(4096)):
        sq += (sae.decode_sparse(*sae.encode_sparse(xb)) - yb).square().sum(dtype=torch.float64)
    return sq, torch.tensor(float(len(x)), dtype=torch.float64, device=x.device)


def lr_factor(step: int, cfg: TrainConfig, decay_from: int | None = None, end: int | None = None) -> float:
    """Linear warm-up, then 1, then a linear decay to 0 from decay_start·steps (or `decay_from`, a
    plateau's step) to `end` (default: the steps)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    end = cfg.steps if end is None else end
    start = int(cfg.decay_start * cfg.steps) if decay_from is None else decay_from
    decay = 1.0 if step < start else max(0.0, (end - step) / max(1, end - start))
    return warm * decay


def train(sae: SparseAutoencoder, batches: Callable[[int], Iterator], cfg: TrainConfig, progress: bool = True,
          log_every: int = 100, checkpoint: Path | None = None, checkpoint_every: int = 0,
          tensorboard: Path | None = None, wandb_project: str | None = None, wandb_dir: Path | None = None,
          run_name: str | None = None, validation: tuple | None = None) -> list[dict]:
    """Train one SAE in place; returns its logged metrics. See `train_sweep`."""
    return train_sweep([sae], batches, cfg, progress, log_every, checkpoint, checkpoint_every,
                       None if tensorboard is None else [tensorboard], wandb_project, wandb_dir, run_name,
                       validation=validation)[0]


def train_sweep(saes: list[SparseAutoencoder], batches: Callable[[int], Iterator], cfg: TrainConfig,
                progress: bool = True, log_every: int = 100, checkpoint: Path | None = None,
                checkpoint_every: int = 0, tensorboard: list[Path] | None = None,
                wandb_project: str | None = None, wandb_dir: Path | None = None,
                run_name: str | None = None, names: list[str] | None = None,
                world: World | None = None, device: torch.device | str = "cpu",
                validation: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> list[list[dict]]:
    """Train several SAEs in place on one stream of batches (each batch is read once and serves all);
    returns each SAE's logged metrics (every `log_every` steps and the last one).

    Training uses no randomness, so each SAE ends bitwise equal to the same SAE trained alone.
    With `checkpoint`, the state of the whole sweep is saved every `checkpoint_every` steps, and a
    checkpoint already there (for these SAEs and config) is resumed; the file is removed once
    training ends. With `tensorboard` (a folder per SAE), the logged metrics also go to TensorBoard
    event files (a resumed run drops the events past its checkpoint first). With `wandb_project`,
    they go to one Weights & Biases run (keys `train/<name>/...` when several SAEs; the optional
    `wandb` extra; WANDB_MODE=offline works without a login).
    With `world`, `batches` gives this rank's part of each batch (see the module's docstring). The SAEs
    train on `device` and are returned there.
    With `cfg.plateau`, `validation` (rows x, and targets y for transcoders; this rank's part) is what
    the stopping rule measures, and each SAE stops on its own plateau or at the budget; every SAE gets
    `convergence_` (see `_Member.summary`).
    """
    if not saes:
        raise DictlabError("train_sweep needs at least one SAE")
    torch.manual_seed(cfg.seed)
    device = torch.device(device)
    shards = saes[0].shard is not None  # every rank holds a slice of each SAE's latents
    if any((s.shard is not None) != shards for s in saes) or (shards and world is not None):
        raise DictlabError("latent-sharded SAEs train on whole batches (world=None), in a sweep of sharded SAEs")
    main = is_main(saes[0].shard.world if shards else world)
    if shards and checkpoint is not None:
        rank, size = distributed.position(saes[0].shard.world)
        checkpoint = Path(checkpoint).with_name(f"{Path(checkpoint).name}.rank{rank}-of-{size}")
    if cfg.plateau is not None and (validation is None or shards):
        raise DictlabError("the stopping rule (steps: auto) needs validation rows and SAEs whose latents are not "
                           "sharded: give a number of steps")
    if validation is not None:
        validation = tuple(None if v is None else v.to(device) for v in validation)
    members = [_Member(sae.to(device), cfg, world) for sae in saes]
    start = 0
    identity = config_hash({"saes": [sae.config() for sae in saes], "train": asdict(cfg),
                            **({"latent_shard": [[s.shard.start, s.shard.stop] for s in saes]} if shards else {})})
    if checkpoint is not None and Path(checkpoint).exists():
        state = _load_checkpoint(Path(checkpoint), identity)
        for m, member_state in zip(members, state["members"]):
            m.restore(member_state)
        torch.set_rng_state(state["rng"])
        start = state["step"]
    writers = []
    if not main:
        tensorboard, wandb_project = None, None
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writers = [SummaryWriter(str(folder), purge_step=start if start else None) for folder in tensorboard]
    wandb_run = _wandb_run(wandb_project, wandb_dir, run_name, saes, cfg, start)
    names = names or [f"sae{i}" for i in range(len(saes))]
    keys = ["train"] if len(saes) == 1 else [f"train/{name}" for name in names]
    stream = batches(start)
    desc = "SAE " + ",".join(sorted({sae.hparams["rule"] for sae in saes}))
    bar = tqdm(total=cfg.steps, initial=start, desc=desc + (f" x{len(saes)}" if len(saes) > 1 else ""),
               disable=not progress or not main, dynamic_ncols=True)
    rows_per_step = 0
    for step in range(start, cfg.steps):
        if cfg.plateau is not None and step and step % cfg.plateau.every == 0:
            for m in members:
                if step < m.end:
                    m.validate(step, *validation)
        if all(step >= m.end for m in members):
            break
        batch = next(stream)
        x, y = batch if isinstance(batch, tuple) else (batch, None)
        x = x.to(device, non_blocking=True)
        y = None if y is None else y.to(device, non_blocking=True)
        rows_per_step = x.shape[0] * (world.size if world is not None else 1)
        scale = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        logged = step % log_every == 0 or step == cfg.steps - 1
        for i, m in enumerate(members):
            if step >= m.end:
                continue
            losses = m.step(x, y, step, scale)
            if not (logged or step == m.end - 1):
                continue
            row = m.logged(losses, step)
            m.history.append(row)
            for key, value in row.items():
                if writers and key != "step":
                    writers[i].add_scalar(f"train/{key}", value, step)
            if wandb_run is not None:
                wandb_run.log({f"{keys[i]}/{k}": v for k, v in row.items() if k != "step"}, step=step)
        if logged:
            last = [m.history[-1] for m in members]
            bar.set_postfix(mse="/".join(f"{r['mse']:.4g}" for r in last),
                            l0="/".join(f"{r['l0']:.1f}" for r in last), refresh=False)
        bar.update(1)
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            if main or shards:
                _save_checkpoint(Path(checkpoint), members, step + 1, identity)
            if world is not None:
                world.barrier()
    bar.close()
    for m in members:
        if validation is not None:
            m.validate(min(m.end, cfg.steps), *validation)  # the final loss (no longer a stopping decision)
        m.sae.convergence_ = m.summary(rows_per_step)
    for sae in saes:
        sae.release_training_buffers()
    for writer in writers:
        writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    if world is not None:
        world.barrier()  # no rank may still be reading the checkpoint
    if checkpoint is not None and (main or shards):
        Path(checkpoint).unlink(missing_ok=True)
    return [m.history for m in members]


def _wandb_run(project: str | None, folder: Path | None, name: str | None, saes: list, cfg: TrainConfig,
               start: int):
    if project is None:
        return None
    try:
        import wandb
    except ImportError as e:
        raise DictlabError("wandb_project is set but wandb is not installed: pip install -e '.[wandb]'") from e
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, name=name, dir=str(folder) if folder else None,
                      config={"saes": [sae.config() for sae in saes], "train": asdict(cfg), "resumed_at_step": start})
