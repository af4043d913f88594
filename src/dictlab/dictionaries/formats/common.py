"""What every format's reader and writer share: reading a config and its tensors with one-line errors that
name the file and field, the checks on them (shapes, float dtype, finite values), and dictlab's input
scale s folded into the weights on export (W_enc·s, W_dec/s, b_dec/s, W_skip unchanged), which leaves every
code and reconstruction unchanged, so the files hold plain unscaled SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError


def read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DictlabError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(cfg, dict):
        raise DictlabError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def field(cfg: dict, name: str, path: Path, kind: type | tuple = int, default=None):
    """cfg[name], checked to be of `kind` (missing: `default`, or an error when there is none)."""
    if name not in cfg or cfg[name] is None:
        if default is None:
            raise DictlabError(f"{path}: field {name!r} is missing")
        return default
    value = cfg[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        accepted = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DictlabError(f"{path}: field {name!r} is {value!r}; expected {accepted}")
    return value


def choice(cfg: dict, name: str, path: Path, accepted, default: str | None = None) -> str:
    value = cfg.get(name) or default
    if value not in accepted:
        raise DictlabError(f"{path}: {name} {value!r} is not supported; accepted: {', '.join(accepted)}")
    return value


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise DictlabError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DictlabError(f"{path}: not a readable safetensors file ({e})") from e


def checked(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], where: Path | str) -> dict:
    """The expected tensors as float32, after checking that each is there, of its shape, a float, finite."""
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise DictlabError(f"{where}: missing tensors {missing} (expected shapes: {expected})")
    wrong = {n: (tuple(tensors[n].shape), shape) for n, shape in expected.items() if tuple(tensors[n].shape) != shape}
    if wrong:
        raise DictlabError(f"{where}: tensors of the wrong shape (found, expected): {wrong}")
    for name in expected:
        t = tensors[name]
        if not t.is_floating_point():
            raise DictlabError(f"{where}: tensor {name} has dtype {t.dtype}; expected a float dtype")
        if not torch.isfinite(t).all():
            raise DictlabError(f"{where}: tensor {name} holds NaN or Inf values")
    return {name: tensors[name].float() for name in expected}


def filled(sae: SparseAutoencoder, tensors: dict[str, torch.Tensor]) -> SparseAutoencoder:
    """The SAE with its parameters set from the (checked) tensors, by dictlab's names; `threshold` sets a
    JumpReLU's per-latent thresholds, `batch_threshold` a BatchTopK's."""
    with torch.no_grad():
        for name, t in tensors.items():
            if name == "threshold":
                sae.log_threshold.copy_(t.clamp_min(1e-30).log())
            else:
                getattr(sae, name).copy_(t)
    return sae


def folded(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The SAE's tensors by dictlab's names with the input scale folded in (W_enc [d_in, L], W_dec [L, d_out])."""
    s = float(sae.input_scale)
    out = {"W_enc": sae.encoder * s, "W_dec": sae.W_dec / s, "b_enc": sae.b_enc, "b_dec": sae.b_dec / s}
    for name in ("W_skip", "b_gate", "r_mag"):
        if getattr(sae, name) is not None:
            out[name] = getattr(sae, name)
    return {n: t.detach().float().contiguous().clone() for n, t in out.items()}


def export_threshold(sae: SparseAutoencoder) -> torch.Tensor:
    """The per-latent threshold a JumpReLU file holds: a JumpReLU's own, or a BatchTopK's one threshold
    (its running estimate of the smallest kept activation, tracked in training) for every latent. The
    pre-activations are unchanged by the folding, so the threshold is too."""
    if sae.hparams["rule"] == "batchtopk":
        return torch.full((sae.n_latents,), float(sae.batch_threshold))
    return sae.threshold.detach().float().clone()
