"""Sparse autoencoders and transcoders as dictionaries: one model, five activation rules.

    pre = (x·s − b_dec) W_enc + b_enc         (s: input scale; transcoders and Gemma Scope skip − b_dec)
    a   = rule(pre)                           relu | topk | batchtopk | jumprelu
    ŷ   = (a W_dec + b_dec) / s

Rules and their training losses (all add the reconstruction error ‖y − ŷ‖², summed over the
model dimension and averaged over the batch, in the scaled space):
  relu       a = ReLU(pre);  + l1 · Σ_j a_j ‖W_dec,j‖  (the penalty scaled by decoder norms)
  topk       the k largest ReLU(pre) per row; + AuxK
  batchtopk  the k·B largest over the whole batch; at inference a learned threshold θ replaces the
             batch rule (θ: running mean of the smallest kept activation); + AuxK
  jumprelu   a = pre · H(pre − θ_j), θ_j = exp(log θ_j) learned per latent through a straight-through
             estimator with a rectangle-kernel pseudo-derivative of bandwidth ε (as Gemma Scope);
             + l0 · Σ_j H(pre_j − θ_j)
Matryoshka (with any rule): the reconstruction term is summed over nested prefixes of the latents,
Σ_m ‖y − (a[:, :m] W_dec[:m] + b_dec)‖², so the first latents must work on their own.
AuxK (Gao et al. 2024): latents that have not fired for `dead_tokens` tokens reconstruct the
residual y − ŷ with their top k_aux pre-activations; the loss is that error over the residual's
variance, weighted by α = 1/32.
Latent sharding (sae_sharding.py) splits the latents of a wide SAE across ranks. SAEs read from other
tools' files may also have rules gated or groupmax, an input normalisation and a skip connection
(sae_variants.py); dictlab does not train those.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dictlab.data.distributed import World, batch_mean
from dictlab.dictionaries.base import Dictionary
from dictlab.dictionaries.sae_rules import JumpReLU, Step, batch_topk_threshold
from dictlab.dictionaries.sae_sharding import FromShards, IntoShards, LatentShard, row_threshold
from dictlab.dictionaries.sae_sparse import Entries, decode, dense_pre, gather_pre, use_sparse
from dictlab.dictionaries.sae_variants import NORMALIZATIONS, denormalized_rows, gated_pre, group_max, normalized_rows
from dictlab.errors import DictlabError

RULES = ("relu", "topk", "batchtopk", "jumprelu")
READ_RULES = ("gated", "groupmax")  # read from other tools' files, not trained here


class SparseAutoencoder(nn.Module, Dictionary):
    """An SAE (d_out = d_in, reading and writing one site) or a transcoder (reading one site and
    reconstructing another). Learned parameters: W_enc, b_enc, W_dec, b_dec (+ log_threshold)."""

    kind = "sae"
    decodings = ()

    def __init__(self, d_in: int, n_latents: int, rule: str = "topk", k: int = 32, d_out: int | None = None,
                 l1_coeff: float = 1e-3, l0_coeff: float = 1e-3, bandwidth: float = 1e-3,
                 jumprelu_init: float = 1e-3, matryoshka: list[int] | None = None, tied: bool = False,
                 normalize_decoder: bool = True, aux_k: int = 512, aux_alpha: float = 1 / 32,
                 dead_tokens: int = 10_000_000, transcoder: bool = False, apply_b_dec_to_input: bool | None = None,
                 seed: int = 0, normalize: str = "none", skip: bool = False):
        nn.Module.__init__(self)
        if rule not in RULES + READ_RULES:
            raise DictlabError(f"unknown SAE rule {rule!r}; accepted: {', '.join(RULES + READ_RULES)}")
        if rule in ("topk", "batchtopk", "groupmax") and not 1 <= k <= n_latents:
            raise DictlabError(f"k={k} must be between 1 and the number of latents ({n_latents})")
        if rule == "groupmax" and n_latents % k:
            raise DictlabError(f"groupmax splits the {n_latents} latents into k={k} equal groups: k must divide them")
        if normalize not in NORMALIZATIONS:
            raise DictlabError(f"unknown input normalisation {normalize!r}; accepted: {', '.join(NORMALIZATIONS)}")
        if matryoshka is not None:
            matryoshka = sorted(set(matryoshka) | {n_latents})
            if matryoshka[0] < 1 or matryoshka[-1] > n_latents:
                raise DictlabError(f"matryoshka prefixes must lie in 1..{n_latents}, got {matryoshka}")
        d_out = d_in if d_out is None else d_out
        self.hparams = dict(d_in=d_in, n_latents=n_latents, rule=rule, k=k, d_out=d_out, l1_coeff=l1_coeff,
                            l0_coeff=l0_coeff, bandwidth=bandwidth, jumprelu_init=jumprelu_init,
                            matryoshka=matryoshka, tied=tied, normalize_decoder=normalize_decoder,
                            aux_k=aux_k, aux_alpha=aux_alpha, dead_tokens=dead_tokens,
                            transcoder=transcoder or d_out != d_in, seed=seed, normalize=normalize, skip=skip)
        # an SAE centres its input by b_dec; a transcoder (and Gemma Scope's SAEs) do not
        if apply_b_dec_to_input is None:
            apply_b_dec_to_input = not self.hparams["transcoder"]
        self.hparams["apply_b_dec_to_input"] = apply_b_dec_to_input
        g = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(n_latents, d_out, generator=g)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        if tied and d_out == d_in:
            self.W_enc = None
        else:  # the encoder starts as the decoder's transpose (a random one for transcoders)
            w_enc = w_dec.T.clone() if d_out == d_in else torch.randn(d_in, n_latents, generator=g) / math.sqrt(d_in)
            self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(jumprelu_init)),
                                          requires_grad=rule == "jumprelu")
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if skip else None
        self.b_gate = nn.Parameter(torch.zeros(n_latents)) if rule == "gated" else None
        self.r_mag = nn.Parameter(torch.zeros(n_latents)) if rule == "gated" else None
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("batch_threshold", torch.zeros(()))  # BatchTopK's inference threshold
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        self.shard: LatentShard | None = None
        self._pre_buffer: torch.Tensor | None = None

    # --- the model ----------------------------------------------------------------------------
    @property
    def encoder(self) -> torch.Tensor:
        return self.W_dec.T if self.W_enc is None else self.W_enc

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def _centred(self, x: torch.Tensor) -> torch.Tensor:
        """x·s (− b_dec), the encoder's input (entering the latent shards)."""
        x = normalized_rows(x, self.hparams["normalize"]) * self.input_scale
        if self.hparams["apply_b_dec_to_input"]:
            x = x - self.b_dec
        return x if self.shard is None else IntoShards.apply(x, self.shard.world)

    def _training_input(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x·s − b_dec without gradient, the centre b_dec) or (x·s, None): the sparse kernels take the
        centre's gradient from the entries (entering the latent shards, so summed over them)."""
        if not self.hparams["apply_b_dec_to_input"]:
            return xs, None
        centre = self.b_dec if self.shard is None else IntoShards.apply(self.b_dec, self.shard.world)
        return xs - self.b_dec.detach(), centre

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams["rule"] == "gated":  # b_enc is the magnitude path's bias
            return gated_pre(self._centred(x), self.encoder, self.b_gate, self.r_mag, self.b_enc)
        return self._centred(x) @ self.encoder + self.b_enc

    def _summed(self, part: torch.Tensor) -> torch.Tensor:
        """A partial reconstruction from this rank's latents, summed over the latent shards."""
        return part if self.shard is None else FromShards.apply(part, self.shard.world)

    def _local(self, upto: int) -> int:
        """How many of this rank's latents lie among the first `upto` of all."""
        return upto if self.shard is None else max(0, min(upto - self.shard.start, self.n_latents))

    def activate(self, pre: torch.Tensor, training: bool = False, world: World | None = None) -> torch.Tensor:
        """The codes of pre-activations. In training, BatchTopK keeps the k·B largest of the whole batch,
        across ranks when `world` is given (each rank holds its part of the batch)."""
        rule, k = self.hparams["rule"], self.hparams["k"]
        if rule in ("relu", "gated"):
            return torch.relu(pre)
        if rule == "groupmax":
            return group_max(torch.relu(pre), k)
        if rule == "jumprelu":
            return JumpReLU.apply(pre, self.threshold, self.hparams["bandwidth"])
        if rule == "topk" or (rule == "batchtopk" and training):
            pos = torch.relu(pre)
            if rule == "topk":
                values, idx = pos.topk(k, dim=1)
                return torch.zeros_like(pos).scatter(1, idx, values)
            if self.shard is not None:  # every rank holds every row, and its own latents
                return pos * (pos >= batch_topk_threshold(pos, k, self.shard.world, pos.shape[0]))
            rows = pos.shape[0] * (1 if world is None else world.size)
            return pos * (pos >= batch_topk_threshold(pos, k, world, rows))
        return pre * (pre > self.batch_threshold)  # batchtopk at inference

    def decode_scaled(self, acts: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        if upto is None:
            return self._summed(acts @ self.W_dec) + self.b_dec
        upto = self._local(upto)
        return self._summed(acts[:, :upto] @ self.W_dec[:upto]) + self.b_dec

    # --- the Dictionary interface --------------------------------------------------------------
    @property
    def directions(self) -> torch.Tensor:
        return (self.W_dec / self.input_scale).detach()

    @property
    def decoder_bias(self) -> torch.Tensor:
        return (self.b_dec / self.input_scale).detach()

    @property
    def d_in(self) -> int:
        return self.hparams["d_in"]

    @property
    def encode_flops(self) -> int:
        return 2 * self.hparams["d_in"] * self.hparams["n_latents"]  # the encoder's product

    @property
    def fit_flops_per_row(self) -> int:
        # 6 × parameters of the two products per row (forward 2, backward 4): the dense formulas' count;
        # the sparse kernels (sae_sparse.py) run fewer once the codes are sparse
        hp = self.hparams
        return 6 * hp["n_latents"] * (hp["d_in"] + hp["d_out"])

    @property
    def target_l0(self) -> float | None:
        return self.hparams["k"] if self.hparams["rule"] in ("topk", "batchtopk", "groupmax") else None

    @property
    def family(self) -> str:
        return "transcoders" if self.hparams["transcoder"] else "SAEs"

    @property
    def label(self) -> str:
        hp = self.hparams
        kind = "transcoder" if hp["transcoder"] else "sae"
        return f"{kind}-{hp['rule']}" + ("-matryoshka" if hp["matryoshka"] else "")

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        d_in = self.hparams["d_in"]
        if x.ndim != 2 or x.shape[1] != d_in:
            raise DictlabError(f"input of shape {tuple(x.shape)} does not fit this SAE: expected [N, {d_in}]")
        return x.float()

    @torch.no_grad()
    def encode_sparse(self, x):
        acts = self.activate(self.pre_activations(self._check(x)))
        if self.hparams["rule"] in ("topk", "groupmax"):  # at most k active per row
            values, idx = acts.topk(self.hparams["k"], dim=1)
            return values, idx
        return acts, torch.arange(acts.shape[1], device=acts.device).expand(acts.shape[0], -1)

    @torch.no_grad()
    def decode_sparse(self, values, indices):
        if values.shape[1] == self.n_latents:  # dense codes: one product, no gather
            return values @ self.directions + self.decoder_bias
        return super().decode_sparse(values, indices)

    @torch.no_grad()
    def reconstruct(self, x, values, indices):
        y = self.decode_sparse(values, indices)
        y = denormalized_rows(y, x.to(y.dtype), self.hparams["normalize"])
        return y if self.W_skip is None else y + x.to(y.dtype) @ self.W_skip.T

    # --- training -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, sparsity_scale: float = 1.0,
                world: World | None = None) -> dict:
        """The training losses (see `loss`): what DistributedDataParallel calls."""
        return self.loss(x, y, sparsity_scale, world)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None, sparsity_scale: float = 1.0,
             world: World | None = None) -> dict:
        """Training losses of one batch (y: the target site for a transcoder, else x).

        One dense product gives the pre-activations; the rest of the step runs over the active entries
        only (sae_sparse.py), or over dense codes when they are not sparse. With `world`, x is this
        rank's part of the batch: the batch statistics (which latents fired, BatchTopK's threshold,
        AuxK's residual variance) are those of the whole batch, and each loss is this rank's mean, so
        the gradients averaged over ranks are those of the whole batch."""
        hp, shard, rows = self.hparams, self.shard, x.shape[0]
        if hp["rule"] in READ_RULES or hp["normalize"] != "none" or hp["skip"]:
            raise DictlabError("this SAE was read from another tool's files (a gated or groupmax rule, an input "
                               "normalisation or a skip connection): dictlab evaluates it but does not train it")
        xs = x * self.input_scale
        y = xs if y is None else y * self.input_scale
        xc, centre = self._training_input(xs)
        pre = self._encoder_product(xc)
        entries = self._training_entries(pre, world)
        prefixes = hp["matryoshka"] or [hp["n_latents"]]
        encoder = (xc, self.encoder, self.b_enc, centre)
        if entries is not None:
            at_entries = gather_pre(pre, *encoder, entries)
            codes = self._sparse_codes(at_entries, entries)
            decoded = [self._summed(decode(codes if m == hp["n_latents"] else codes * (entries.cols < self._local(m)),
                                           self.W_dec, entries)) + self.b_dec for m in prefixes]
            active = codes > 0
            fired = torch.zeros(self.n_latents, dtype=torch.bool, device=x.device)
            fired[entries.cols[active]] = True
        else:
            at_entries = dense_pre(pre, *encoder)
            codes = self.activate(at_entries, training=True, world=world)
            decoded = [self.decode_scaled(codes, m) for m in prefixes]
            active = codes > 0
            fired = active.any(0)
        errors = [nn.functional.mse_loss(d, y, reduction="sum") / rows for d in decoded]
        y_hat = decoded[-1]
        out = {"recon": sum(errors), "mse": errors[-1].detach() / y.shape[1],
               "l0": self._over_shards(active.sum().float().detach() / rows)}
        total = out["recon"]
        if hp["rule"] in ("relu", "jumprelu"):
            per_latent = (lambda t: t) if entries is None else (lambda t: t[entries.cols])
            if hp["rule"] == "relu":
                sparsity, coeff = (codes * per_latent(self.W_dec.norm(dim=1))).sum() / rows, hp["l1_coeff"]
            else:
                steps = Step.apply(at_entries, per_latent(self.threshold), hp["bandwidth"])
                sparsity, coeff = steps.sum() / rows, hp["l0_coeff"]
            if shard is not None:  # this rank's latents' penalty carries the gradient, the value is all latents'
                sparsity = sparsity + (self._over_shards(sparsity.detach()) - sparsity).detach()
            out["sparsity"] = sparsity
            total = total + sparsity_scale * coeff * sparsity
        else:
            with torch.no_grad():
                tokens = rows
                if world is not None:
                    fired = world.max(fired.to(torch.uint8)).bool()
                    tokens *= world.size
                self.tokens_since_fired += tokens
                self.tokens_since_fired[fired] = 0
                if hp["rule"] == "batchtopk":
                    self._track_batch_threshold(codes[active], world)
            out["aux"] = self._aux_loss(pre, encoder, y - y_hat, world)
            total = total + hp["aux_alpha"] * out["aux"]
        dead = (self.tokens_since_fired >= hp["dead_tokens"]).float().sum()
        out["dead_fraction"] = self._over_shards(dead) / hp["n_latents"]
        out["total"] = total
        return out

    @torch.no_grad()
    def _encoder_product(self, xc: torch.Tensor) -> torch.Tensor:
        """pre = xc W_enc + b_enc, the training step's one dense product, in the autocast dtype when autocast
        is on, into a buffer kept between steps: a fresh [B, latents] tensor each step is fresh memory from
        the system, whose page faults cost ~10% of a step on a CPU."""
        device = xc.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xc.dtype
        shape = (xc.shape[0], self.encoder.shape[1])
        buf = self._pre_buffer
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != xc.device:
            buf = self._pre_buffer = torch.empty(shape, dtype=dtype, device=xc.device)
        with torch.autocast(device, enabled=False):
            torch.mm(xc.to(dtype), self.encoder.to(dtype), out=buf)
        return buf.add_(self.b_enc.to(dtype))

    def release_training_buffers(self) -> None:
        self._pre_buffer = None

    @torch.no_grad()
    def _training_entries(self, pre: torch.Tensor, world: World | None) -> Entries | None:
        """The batch's active entries under the rule (for JumpReLU also those within ε/2 below the
        threshold, which carry its gradient), or None when the codes are too dense for the sparse path."""
        rule, k, (rows, n) = self.hparams["rule"], self.hparams["k"], pre.shape
        if rule == "topk":
            if not use_sparse(rows * k, rows, n):
                return None
            return Entries.of_indices(pre.topk(k, dim=1, sorted=False).indices, n)
        if rule == "batchtopk":
            pos = torch.relu(pre)
            if self.shard is not None:  # every rank holds every row, and its own latents
                mask = pos >= batch_topk_threshold(pos, k, self.shard.world, rows)
            else:
                mask = pos >= batch_topk_threshold(pos, k, world, rows * (1 if world is None else world.size))
        elif rule == "relu":
            mask = pre > 0
        else:
            mask = pre > self.threshold - self.hparams["bandwidth"] / 2
        return Entries.of_mask(mask) if use_sparse(int(mask.sum()), rows, n) else None

    def _sparse_codes(self, values: torch.Tensor, entries: Entries) -> torch.Tensor:
        """The codes at the entries from their pre-activations, under the rule."""
        hp = self.hparams
        if hp["rule"] == "jumprelu":
            return JumpReLU.apply(values, self.threshold[entries.cols], hp["bandwidth"])
        codes = torch.relu(values)
        if hp["rule"] == "topk" and self.shard is not None:  # of this rank's k, those among the row's k largest
            per_row = codes.view(entries.n_rows, -1)
            codes = (per_row * (per_row >= row_threshold(per_row, hp["k"], self.shard.world))).flatten()
        return codes

    @torch.no_grad()
    def _track_batch_threshold(self, kept: torch.Tensor, world: World | None) -> None:
        """BatchTopK's inference threshold: a running mean of the smallest kept activation."""
        smallest = kept.min() if kept.numel() else torch.full((), float("inf"), device=kept.device)
        for group in (world, None if self.shard is None else self.shard.world):
            if group is not None:
                smallest = group.min(smallest.reshape(1))[0]
        if not torch.isfinite(smallest):
            return
        if self.batch_threshold == 0:  # the first batch sets it, later ones average in
            self.batch_threshold.copy_(smallest)
        else:
            self.batch_threshold.mul_(0.99).add_(0.01 * smallest)

    def _over_shards(self, value: torch.Tensor) -> torch.Tensor:
        """A sum over this rank's latents made a sum over all latents (no gradient)."""
        return value if self.shard is None else self.shard.world.sum(value.reshape(1).clone())[0]

    def _aux_loss(self, pre: torch.Tensor, encoder: tuple, residual: torch.Tensor,
                  world: World | None = None) -> torch.Tensor:
        """AuxK from the step's pre-activations: the dead latents' top k_aux per row reconstruct the residual
        (over the entries, or as dense codes over the dead latents when those are few)."""
        dead = (self.tokens_since_fired >= self.hparams["dead_tokens"]).nonzero().flatten()
        n_dead = int(self._over_shards(torch.tensor(float(dead.numel()), device=pre.device)))
        if n_dead == 0:
            return torch.zeros((), device=pre.device)
        k_aux = min(self.hparams["aux_k"], n_dead)
        rows, k_here = pre.shape[0], min(k_aux, dead.numel())  # a latent shard may hold no dead latent
        xc, w_enc, b_enc, centre = encoder
        sparse = use_sparse(rows * k_here, rows, dead.numel())
        if sparse:
            with torch.no_grad():
                idx = pre[:, dead].topk(k_here, dim=1).indices
            entries = Entries.of_indices(dead[idx], pre.shape[1])
            values = torch.relu(gather_pre(pre, *encoder, entries)).view(idx.shape)
        else:
            on_dead = torch.relu(dense_pre(pre[:, dead], xc, w_enc[:, dead], b_enc[dead], centre))
            values, idx = on_dead.topk(k_here, dim=1)
        if self.shard is not None:
            values = values * (values >= row_threshold(values, k_aux, self.shard.world))
        if sparse:
            part = decode(values.flatten(), self.W_dec, entries)
        else:
            part = torch.zeros(rows, dead.numel(), dtype=values.dtype, device=pre.device).scatter(
                1, idx, values) @ self.W_dec[dead]
        recon = self._summed(part)
        residual = residual.detach()
        variance = batch_mean(((residual - batch_mean(residual, world)) ** 2).sum(1), world).clamp_min(1e-12)
        return ((residual - recon) ** 2).sum(1).mean() / variance

    @torch.no_grad()
    def project_decoder_gradient(self) -> None:
        """Remove the part of each decoder row's gradient that would change its norm."""
        if self.hparams["normalize_decoder"] and self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        if self.hparams["normalize_decoder"]:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, y: torch.Tensor | None = None, median_iters: int = 20,
                             world: World | None = None) -> None:
        """Input scale so that mean ‖x·s‖ = √d, and b_dec at the geometric median of the targets (of
        the whole batch, over every rank's part when `world` is given)."""
        self.input_scale.fill_(math.sqrt(x.shape[1]) / float(batch_mean(x.norm(dim=1), world)))
        target = (x if y is None else y) * self.input_scale
        median = batch_mean(target, world)
        for _ in range(median_iters):  # Weiszfeld's iteration
            w = 1 / (target - median).norm(dim=1).clamp_min(1e-8)
            median = batch_mean(w[:, None] * target, world) / batch_mean(w, world)
        self.b_dec.copy_(median)

    # --- saving ---------------------------------------------------------------------------------
    def tensors(self):
        return {name: t.detach() for name, t in self.state_dict().items()}

    def config(self):
        return dict(self.hparams)

    @classmethod
    def from_saved(cls, tensors, config):
        sae = cls(**config)
        missing = {n: tuple(t.shape) for n, t in sae.state_dict().items() if n not in tensors}
        if missing:
            raise DictlabError(f"saved SAE lacks tensors {missing}")
        wrong = {n: (tuple(tensors[n].shape), tuple(t.shape)) for n, t in sae.state_dict().items()
                 if tuple(tensors[n].shape) != tuple(t.shape)}
        if wrong:
            raise DictlabError(f"saved SAE tensors have the wrong shapes (found, expected): {wrong}")
        sae.load_state_dict(tensors)
        return sae
