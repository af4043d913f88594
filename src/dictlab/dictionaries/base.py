"""The one interface every learner shares, and its on-disk format (safetensors + JSON, no pickles).

    codes = d.encode(x)        # [N, d_model] -> [N, n_latents], mostly zeros
    x_hat = d.decode(codes)    # back to [N, d_model]
    values, indices = d.encode_sparse(x)   # [N, k] each: the active units only
    x_hat = d.decode_sparse(values, indices)

`directions` is [n_latents, d_model] (centroids or decoder rows). K-means is a 1-sparse dictionary,
so everything downstream is written once against this interface.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from dictlab.data.io import atomic_path, read_json, sha256_file, write_json
from dictlab.errors import DictlabError, DiskFull

REGISTRY: dict[str, type[Dictionary]] = {}
WEIGHTS, CONFIG = "weights.safetensors", "config.json"


class Dictionary(ABC):
    kind: ClassVar[str]
    decodings: ClassVar[tuple[str, ...]] = ()  # ways to decode one fit; the first is the default
    decoding: str | None = None
    unit_kind: ClassVar[str] = "latent"  # "cluster": each row belongs to one unit per stage
    data_parallel: ClassVar[bool] = True  # its fit takes one rank's part of the data (a RankSource)

    def _check_decoding(self, name: str) -> str:
        if name not in self.decodings:
            raise DictlabError(f"unknown decoding {name!r} for {self.kind}; accepted: {', '.join(self.decodings)}")
        return name

    def with_decoding(self, name: str) -> Dictionary:
        """A view of this fitted dictionary that decodes another way (the weights are shared)."""
        view = copy.copy(self)
        view.decoding = self._check_decoding(name)
        return view

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls

    @property
    @abstractmethod
    def directions(self) -> torch.Tensor: ...

    @property
    def n_latents(self) -> int:
        return self.directions.shape[0]

    @property
    def d_model(self) -> int:
        """Width of what the dictionary reconstructs."""
        return self.directions.shape[1]

    @property
    def d_in(self) -> int:
        """Width of what it encodes (differs from d_model only for transcoders)."""
        return self.d_model

    @abstractmethod
    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each [N, k]: the k active units of each row and their codes."""

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nk,nkd->nd", values, self.directions[indices]) + self.decoder_bias

    def reconstruct(self, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """What the dictionary gives back for rows x encoded as (values, indices): the decoded codes, plus
        what depends on x itself in an SAE read from another tool (a skip connection, an input normalisation)."""
        return self.decode_sparse(values, indices)

    @property
    def decoder_bias(self) -> torch.Tensor:
        return torch.zeros(self.d_model, device=self.directions.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = self.encode_sparse(self._check(x))
        codes = torch.zeros(x.shape[0], self.n_latents, dtype=values.dtype, device=values.device)
        return codes.scatter_(1, indices, values)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.directions + self.decoder_bias

    @property
    def device(self) -> torch.device:
        """Where the dictionary's tensors are (and where it encodes)."""
        return self.directions.device

    def on_device(self, device: torch.device | str) -> Dictionary:
        """This dictionary with every tensor on `device`, for the stages that run where the model runs
        (a module moves itself; the others are rebuilt from their saved form; already there: itself)."""
        if self.device == torch.device(device):
            return self
        if isinstance(self, torch.nn.Module):
            return self.to(device)
        return type(self).from_saved({k: t.to(device) for k, t in self.tensors().items()}, self.config())

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise DictlabError(
                f"input of shape {tuple(x.shape)} does not fit this {self.kind} dictionary: "
                f"expected [N, {self.d_model}]"
            )
        return x.float()

    def clusters(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's cluster: its active unit with the largest |a_j|·‖d_j‖, or n_latents for a row
        with none active. K-means (nearest centre) and mixtures (most responsible component) override."""
        values, indices = self.encode_sparse(x)
        weight = values.abs() * self.directions.norm(dim=1)[indices]
        best = indices.gather(1, weight.argmax(1, keepdim=True)).squeeze(1)
        return torch.where(weight.amax(1) > 0, best, self.n_latents)

    def unit_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, units, active) [N, k] each: how strongly or typically each row shows a unit, and
        whether the unit is active there. Latents: the codes, active where non-zero. Clusters override:
        minus the squared distance to the row's centre (higher = more typical), always active."""
        values, indices = self.encode_sparse(x)
        return values, indices, values != 0

    def unit_activity(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, units, active) [N, k]: how much each unit is active on each row, for statistics of
        which units fire together. Latents: their codes; clusters: 1 on the row's unit(s)."""
        values, units, active = self.unit_scores(x)
        if self.unit_kind == "cluster":
            values = torch.ones_like(values)
        return values, units, active

    @property
    def label(self) -> str:
        """The method's name in result tables."""
        return self.kind

    # Counted, not timed: floating-point operations of the dominant products, from the shapes (a
    # multiply-add counts 2), so that learners compare at equal cost on any machine.
    @property
    def encode_flops(self) -> int | None:
        """Operations to encode one row (None: not counted for this kind)."""
        return None

    @property
    def fit_flops_per_row(self) -> int | None:
        """Operations per training row per pass of its fit (its fit's rows seen × this = its fit FLOPs)."""
        return None

    @property
    def target_l0(self) -> float | None:
        """The L0 its fit aimed at (a top-k rule's k), set beside the L0 measured; None: no such aim."""
        return None

    @property
    def family(self) -> str:
        """The family a report colours it by: clustering, mixtures, SAEs, transcoders or baselines."""
        return "clustering" if self.unit_kind == "cluster" else "SAEs"

    def held_out_metrics(self, batches) -> dict:
        """Extra metrics on held-out data (`batches()` gives fresh row batches); none by default."""
        return {}

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def config(self) -> dict: ...

    @classmethod
    @abstractmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], config: dict) -> Dictionary: ...

    def save(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Write weights.safetensors then config.json, which records the weights' sha256 (checked on every
        load) and marks a complete dictionary."""
        folder = Path(folder)
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        try:
            with atomic_path(folder / WEIGHTS) as tmp:
                save_file(tensors, str(tmp))
        except DiskFull as e:
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise DiskFull(f"{e}: these weights need about {need:,} bytes; free that much and rerun (finished "
                           "dictionaries are kept)") from e
        write_json(folder / CONFIG, {"kind": self.kind, "config": self.config(),
                                     "weights_sha256": sha256_file(folder / WEIGHTS), **(extra or {})})
        return folder


def load_dictionary(folder: str | Path) -> Dictionary:
    folder = Path(folder)
    if not (folder / CONFIG).exists() or not (folder / WEIGHTS).exists():
        raise DictlabError(f"{folder} holds no saved dictionary (expected {CONFIG} and {WEIGHTS})")
    meta = read_json(folder / CONFIG)
    cls = REGISTRY.get(meta.get("kind"))
    if cls is None:
        raise DictlabError(f"{folder}: unknown dictionary kind {meta.get('kind')!r}; known: {', '.join(REGISTRY)}")
    recorded = meta.get("weights_sha256")  # (absent in folders saved before dictlab recorded it)
    if recorded is not None and sha256_file(folder / WEIGHTS) != recorded:
        raise DictlabError(f"{folder / WEIGHTS}: its sha256 differs from the one {CONFIG} recorded (damaged or "
                           "changed since it was saved); fit or import it again (remove the folder and rerun)")
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DictlabError(f"{folder / WEIGHTS}: not a readable safetensors file ({e})") from e
    return cls.from_saved(tensors, meta["config"])
