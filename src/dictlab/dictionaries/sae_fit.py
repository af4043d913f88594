"""The `sae` learner: sparse autoencoders and transcoders trained on shuffled store batches, a sweep of
widths and sparsities sharing each batch (train.py), data-parallel or latent-sharded under torchrun."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Literal

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator

from dictlab.data import distributed
from dictlab.data.precision import bfloat16_is_faster
from dictlab.data.store import Store
from dictlab.dictionaries.learner import NAME, Learner
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.dictionaries.sae_sharding import shard_latents, unshard_latents
from dictlab.dictionaries.train import Plateau, TrainConfig, train_sweep
from dictlab.errors import DictlabError


class SAEFit(Learner):
    """A sparse autoencoder (or, with target_site, a transcoder) trained on shuffled store batches."""

    method: Literal["sae"] = "sae"
    size_field = "latents"
    work_field = "steps"
    shared_passes = True
    rule: Literal["topk", "batchtopk", "relu", "jumprelu"] = "topk"
    name: str | None = NAME
    latents: list[int] = Field(default_factory=lambda: [4096], description="dictionary widths")
    k: int | list[int] = Field(32, description="active latents per row (topk, batchtopk); a list sweeps it")
    matryoshka: list[int] | None = Field(None, description="nested prefix sizes (the full width is added)")
    site: str | None = Field(None, description="input site (default: every site of the store)")
    target_site: str | None = Field(None, description="transcoder: the site to reconstruct")
    l1_coeff: float | list[float] = Field(1e-3, description="relu: L1 penalty, scaled by decoder norms; a list "
                                          "sweeps it")
    l0_coeff: float | list[float] = Field(1e-3, description="jumprelu: L0 penalty; a list sweeps it")
    bandwidth: float = Field(1e-3, gt=0, description="jumprelu: width of the pseudo-derivative's kernel")
    jumprelu_init: float = Field(1e-3, gt=0, description="jumprelu: initial threshold")
    tied: bool = False
    normalize_decoder: bool = True
    aux_k: int = Field(512, ge=1)
    aux_alpha: float = Field(1 / 32, ge=0)
    dead_tokens: int = Field(10_000_000, ge=1, description="a latent silent this long counts as dead")
    steps: int | Literal["auto"] = Field("auto", description="training steps, or `auto`: until the validation loss "
                                        "plateaus (plateau_tol, plateau_window), within max_tokens")
    max_tokens: int | None = Field(100_000_000, ge=1, description="steps: auto: the budget, in training rows")
    plateau_tol: float = Field(0.01, gt=0, description="steps: auto: converged when the validation loss improved "
                               "by less than this fraction ...")
    plateau_window: float = Field(0.2, gt=0, le=1, description="... over this fraction of the steps so far")
    validation_tokens: int = Field(8192, ge=1, description="steps: auto: train-split rows held out of training to "
                                   "measure the loss on (the first rows of every shard)")
    validate_every: int = Field(25, ge=1, description="steps: auto: steps between validation losses")
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    decay_start: float = Field(0.8, ge=0, le=1, description="fraction of steps after which the LR decays to 0")
    sparsity_warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(500, ge=0, description="steps between checkpoints (0: none)")
    shard_latents: bool = Field(False, description="under torchrun, split the latents across the ranks instead "
                                "of the batch (each rank holds 1/N of them and reads every batch): for SAEs too "
                                "wide for one device; one process ignores it")
    bf16_autocast: bool = Field(True, validation_alias=AliasChoices("bf16_autocast", "gpu_bf16"),
                                description="train under bfloat16 autocast (the encoder's product in bf16; "
                                "parameters, Adam and the losses in float32) on a GPU, and on a CPU whose bf16 "
                                "products are measured faster than float32 (native bf16: AVX-512 BF16, AMX); "
                                "AVX2-only CPUs train in float32. (`gpu_bf16` is accepted as its old name)")
    log_every: int = Field(100, ge=1, description="steps between logged metrics (console, TensorBoard)")
    wandb_project: str | None = Field(None, description="also log to this Weights & Biases project")

    @field_validator("latents", "k", "l1_coeff", "l0_coeff")
    @classmethod
    def _in_range(cls, v, info):
        counts = info.field_name in ("latents", "k")
        values = v if isinstance(v, list) else [v]
        if not values or any(x < (1 if counts else 0) for x in values):
            what = "a positive integer" if counts else "a number >= 0"
            raise ValueError(f"{info.field_name} must be {what} or a non-empty list of them")
        if len(set(values)) < len(values):
            raise ValueError(f"{info.field_name} lists a value twice: {values}")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.steps == "auto" and self.max_tokens is None:
            raise ValueError("steps: auto needs max_tokens, the most training rows it may take (or give steps)")
        return self

    @model_validator(mode="after")
    def _sweeps_fit_the_rule(self):
        swept = {"k": ("topk", "batchtopk"), "l1_coeff": ("relu",), "l0_coeff": ("jumprelu",)}
        for name, rules in swept.items():
            if isinstance(getattr(self, name), list) and self.rule not in rules:
                raise ValueError(f"a list of {name} sweeps rule {' or '.join(rules)}, not {self.rule}")
        return self

    def sizes(self) -> list[dict]:
        """The sweep: one SAE per width and value of k / l1_coeff / l0_coeff; all train on each batch."""
        as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
        return [{"latents": n, "k": k, "l1_coeff": l1, "l0_coeff": l0} for n in self.latents
                for k in as_list(self.k) for l1 in as_list(self.l1_coeff) for l0 in as_list(self.l0_coeff)]

    def folder(self, member: dict) -> str:
        name = f"{'transcoder' if self.target_site else 'sae'}-{self.rule}"
        name += "-matryoshka" if self.matryoshka else ""
        name += f"-n{member['latents']}" + (f"-k{member['k']}" if self.rule in ("topk", "batchtopk") else "")
        for key, tag in (("l1_coeff", "l1"), ("l0_coeff", "l0")):
            if isinstance(getattr(self, key), list):
                name += f"-{tag}_{member[key]:g}"
        return name

    def build(self, member: dict, d_in: int, d_out: int | None = None) -> SparseAutoencoder:
        return SparseAutoencoder(
            d_in, member["latents"], rule=self.rule, k=member["k"], d_out=d_out, l1_coeff=member["l1_coeff"],
            l0_coeff=member["l0_coeff"], bandwidth=self.bandwidth, jumprelu_init=self.jumprelu_init,
            matryoshka=self.matryoshka, tied=self.tied, normalize_decoder=self.normalize_decoder, aux_k=self.aux_k,
            aux_alpha=self.aux_alpha, dead_tokens=self.dead_tokens, transcoder=self.target_site is not None,
            seed=self.seed)

    def autocast(self, device) -> str | None:
        """The training's autocast dtype on `device`: bfloat16 where its products pay (see bf16_autocast)."""
        return "bfloat16" if self.bf16_autocast and bfloat16_is_faster(str(device)) else None

    def fit_group(self, saes, folders, store, site, progress, world) -> None:
        """Train the SAEs of this entry as a sweep sharing each batch, on this process's device. The sweep's
        checkpoint sits beside their folders, their TensorBoard logs under <run>/tensorboard/<site>/<name>."""
        device = distributed.device()
        auto = self.steps == "auto"
        plateau = Plateau(self.plateau_tol, self.plateau_window, self.validate_every) if auto else None
        cfg = TrainConfig(steps=self.most_work(), lr=self.lr, warmup_steps=self.warmup_steps,
                          decay_start=self.decay_start, sparsity_warmup_steps=self.sparsity_warmup_steps,
                          grad_clip=self.grad_clip, seed=self.seed, autocast=self.autocast(device), plateau=plateau)
        run = folders[0].parent.parent.parent
        name = folders[0].name + (f"-and-{len(folders) - 1}-more" if len(folders) > 1 else "")
        if world is not None and self.shard_latents:  # every rank holds a slice of each SAE's latents, whole batches
            saes = [shard_latents(sae, world) for sae in saes]
            world = None
        validation = validation_rows(store, site, self, world) if auto else None
        histories = train_sweep(saes, lambda start: sae_batches(store, site, self, start, world), cfg, progress,
                                log_every=self.log_every, checkpoint=folders[0].with_name(f".{name}.checkpoint.pt"),
                                checkpoint_every=self.checkpoint_every,
                                tensorboard=[run / "tensorboard" / site / f.name for f in folders],
                                wandb_project=self.wandb_project, wandb_dir=run, run_name=f"{site}/{name}",
                                names=[f.name for f in folders], world=world, device=device, validation=validation)
        train_rows = store.rows("train", shard_rows=self.training_rows(store))
        for sae, history in zip(saes, histories):
            unshard_latents(sae).to("cpu")
            sae.history_ = history
            sae.convergence_["epochs"] = sae.convergence_["tokens_seen"] / max(train_rows, 1)

    def most_work(self) -> int:
        """Training steps: `steps`, or with `auto` the most that max_tokens allows."""
        return max(1, self.max_tokens // self.batch_size) if self.steps == "auto" else self.steps

    def training_rows(self, store: Store) -> slice | None:
        """The rows of every train shard that training reads: all, or (steps: auto) those after the
        validation slice at each shard's start, ~validation_tokens rows in all."""
        if self.steps != "auto":
            return None
        shards = len(store.shards("train"))
        per_shard = -(-self.validation_tokens // max(shards, 1))
        if per_shard * shards >= store.rows("train"):
            raise DictlabError(f"validation_tokens={self.validation_tokens} leaves no training rows: the train split "
                               f"holds {store.rows('train')} (lower validation_tokens, or extract more)")
        return slice(per_shard, None)

    def with_work(self, units: int) -> SAEFit:
        return self.model_copy(update={"steps": units, "warmup_steps": 0, "checkpoint_every": 0,
                                       "log_every": 10**6})

    def capped(self, steps: int, iterations: int, light: bool = False) -> SAEFit:
        update = {"steps": steps if self.steps == "auto" else min(self.steps, steps),
                  "batch_size": min(self.batch_size, 1024),
                  "warmup_steps": min(self.warmup_steps, steps // 10)}
        if light:
            update.update(checkpoint_every=0, log_every=10)
        return self.model_copy(update=update)



def sae_batches(store: Store, site: str, spec: SAEFit, start: int = 0,
                world: distributed.World | None = None) -> Iterator:
    """Endless full batches of shuffled training rows, a new order each epoch; (x, y) for a transcoder.

    Starts at batch `start`: whole epochs are skipped without reading them. With `world`, this rank's
    part of each batch (batch_size / N rows) from its own shards.
    """
    columns = (spec.target_site,) if spec.target_site else ()
    size = local_batch_size(spec.batch_size, world)
    kept = spec.training_rows(store)
    # the reader carries rows across shards, so only the epoch's last batch can be short
    per_epoch = store.rows("train", world, kept) // size
    if per_epoch == 0:
        raise DictlabError(f"batch_size={spec.batch_size} exceeds the store's {store.rows('train', world, kept)} "
                           "training rows" + ("" if world is None else f" of rank {world.rank} (times {world.size} "
                                                                        "ranks)"))
    epoch, skip = divmod(start, per_epoch)
    while True:
        batches = store.batches(site, "train", size, shuffle=True, seed=spec.seed + epoch, columns=columns,
                                world=world, shard_rows=kept)
        full = (b for b in batches if (b["x"] if columns else b).shape[0] == size)
        for b in islice(full, skip, None):
            yield (b["x"], b[spec.target_site]) if columns else b
        epoch, skip = epoch + 1, 0


def local_batch_size(batch_size: int, world: distributed.World | None) -> int:
    """Rows of each batch that one rank holds."""
    if world is None:
        return batch_size
    if batch_size % world.size:
        raise DictlabError(f"batch_size={batch_size} does not divide among {world.size} ranks: give a multiple of "
                           f"{world.size}, so that every rank holds the same part of each batch")
    return batch_size // world.size


def validation_rows(store: Store, site: str, spec: SAEFit, world: distributed.World | None = None):
    """The validation slice of `steps: auto` (this rank's part): (x, y) with y the target site's rows for
    a transcoder, else None."""
    held_out = slice(0, spec.training_rows(store).start)
    columns = (spec.target_site,) if spec.target_site else ()
    parts = list(store.batches(site, "train", 1 << 16, columns=columns, world=world, shard_rows=held_out))
    if not columns:
        return torch.cat(parts), None
    return torch.cat([p["x"] for p in parts]), torch.cat([p[spec.target_site] for p in parts])
