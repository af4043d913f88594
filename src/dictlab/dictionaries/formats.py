"""Read and write the SAE formats researchers already have.

SAELens (a folder): `cfg.json` (d_in, d_sae, architecture: standard | topk | batchtopk | jumprelu,
apply_b_dec_to_input, normalize_activations, hook_name, k for topk) and `sae_weights.safetensors`
(W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], threshold [d_sae] for
JumpReLU). Gemma Scope: `params.npz` with the same five arrays; encode = ReLU(x W_enc + b_enc)
where it exceeds the threshold, x not centred by b_dec.

dictlab's input scale s is folded into the weights on export (W_enc·s, W_dec/s, b_dec/s), which
leaves every reconstruction unchanged, so the files hold plain unscaled SAEs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dictlab.data.io import atomic_path, write_json
from dictlab.dictionaries.sae import SparseAutoencoder
from dictlab.errors import DictlabError

ARCHITECTURES = {"standard": "relu", "relu": "relu", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}


def _check_tensors(tensors: dict[str, torch.Tensor], d_in: int, d_sae: int, jumprelu: bool, where: str) -> None:
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if jumprelu:
        expected["threshold"] = (d_sae,)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise DictlabError(f"{where}: missing tensors {missing} (expected shapes: {expected})")
    wrong = {n: (tuple(tensors[n].shape), shape) for n, shape in expected.items() if tuple(tensors[n].shape) != shape}
    if wrong:
        raise DictlabError(f"{where}: tensors of the wrong shape (found, expected): {wrong}")


def _from_arrays(tensors: dict[str, torch.Tensor], rule: str, k: int, apply_b_dec: bool) -> SparseAutoencoder:
    d_in, d_sae = tensors["W_enc"].shape
    sae = SparseAutoencoder(d_in, d_sae, rule=rule, k=k, apply_b_dec_to_input=apply_b_dec,
                            normalize_decoder=False)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"])
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_enc.copy_(tensors["b_enc"])
        sae.b_dec.copy_(tensors["b_dec"])
        if rule == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
    return sae


def read_saelens(folder: str | Path) -> SparseAutoencoder:
    folder = Path(folder)
    cfg_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    for f in (cfg_path, weights):
        if not f.exists():
            raise DictlabError(f"{folder} is not a SAELens folder: {f.name} is missing")
    cfg = json.loads(cfg_path.read_text())
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise DictlabError(f"{cfg_path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise DictlabError(f"{cfg_path}: normalize_activations={norm!r} needs dataset statistics dictlab cannot "
                           "recover from the file; only 'none' is supported")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise DictlabError(f"{weights}: not a readable safetensors file ({e})") from e
    rule = ARCHITECTURES[arch]
    _check_tensors(tensors, cfg["d_in"], cfg["d_sae"], rule == "jumprelu", str(weights))
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 1)
    return _from_arrays({n: t.float() for n, t in tensors.items()}, rule, k, cfg.get("apply_b_dec_to_input", True))


def exported_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The SAE's weights with the input scale folded in (see the module docstring)."""
    s = float(sae.input_scale)
    out = {"W_enc": (sae.encoder * s).detach(), "W_dec": (sae.W_dec / s).detach(), "b_enc": sae.b_enc.detach(),
           "b_dec": (sae.b_dec / s).detach()}
    if sae.hparams["rule"] == "jumprelu":
        out["threshold"] = sae.threshold.detach()
    return {n: t.contiguous().clone() for n, t in out.items()}


def write_saelens(sae: SparseAutoencoder, folder: str | Path, hook_name: str = "") -> Path:
    if sae.hparams["transcoder"]:
        raise DictlabError("the SAELens SAE format holds SAEs, not transcoders")
    if sae.hparams["rule"] == "batchtopk":
        raise DictlabError("export a BatchTopK SAE as jumprelu-style thresholds is not supported yet")
    folder = Path(folder)
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.hparams["rule"]]
    with atomic_path(folder / "sae_weights.safetensors") as tmp:
        save_file(exported_tensors(sae), str(tmp))
    cfg = {"architecture": arch, "d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": sae.hparams["apply_b_dec_to_input"], "normalize_activations": "none",
           "hook_name": hook_name}
    if arch == "topk":
        cfg["k"] = sae.hparams["k"]
    write_json(folder / "cfg.json", cfg)
    return folder


def read_gemma_scope(path: str | Path) -> SparseAutoencoder:
    """A Gemma Scope `params.npz` (JumpReLU; loaded without pickles)."""
    path = Path(path)
    if path.is_dir():
        path = path / "params.npz"
    if not path.exists():
        raise DictlabError(f"{path} not found (a Gemma Scope SAE is a params.npz file)")
    try:
        with np.load(path, allow_pickle=False) as data:
            tensors = {n: torch.from_numpy(np.asarray(data[n], dtype=np.float32)) for n in data.files}
    except (ValueError, OSError) as e:
        raise DictlabError(f"{path}: not a readable .npz file ({e})") from e
    if "W_enc" not in tensors:
        raise DictlabError(f"{path}: missing tensors ['W_enc'] (found {sorted(tensors)})")
    d_in, d_sae = tensors["W_enc"].shape
    _check_tensors(tensors, d_in, d_sae, True, str(path))
    return _from_arrays(tensors, "jumprelu", 1, apply_b_dec=False)


def load_sae(source: str) -> SparseAutoencoder:
    """An SAE from a dictlab folder, a SAELens folder, a Gemma Scope params.npz (file or folder), or
    `hub:REPO/PATH` — a folder of a hub repository holding params.npz, such as Gemma Scope's
    `hub:google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82` (needs a reachable hub)."""
    if source.startswith("hub:"):
        repo_and_path = source[4:].strip("/").split("/")
        if len(repo_and_path) < 3:
            raise DictlabError(f"{source!r}: expected hub:OWNER/REPO/PATH/TO/FOLDER")
        repo, path = "/".join(repo_and_path[:2]), "/".join(repo_and_path[2:])
        from huggingface_hub import hf_hub_download

        try:
            local = hf_hub_download(repo, f"{path}/params.npz")
        except Exception as e:  # offline, missing repo or file: huggingface_hub has many error types
            raise DictlabError(f"could not download {path}/params.npz from {repo}: {e}") from e
        return read_gemma_scope(local)
    p = Path(source)
    if p.is_file() and p.suffix == ".npz":
        return read_gemma_scope(p)
    if p.is_dir():
        if (p / "cfg.json").exists():
            return read_saelens(p)
        if (p / "params.npz").exists():
            return read_gemma_scope(p)
        if (p / "config.json").exists():
            from dictlab.dictionaries.base import load_dictionary

            sae = load_dictionary(p)
            if isinstance(sae, SparseAutoencoder):
                return sae
    raise DictlabError(f"no SAE found at {source!r}: expected a dictlab or SAELens folder, a params.npz, "
                       "or hub:OWNER/REPO/PATH")
